"""Build-level checks of the TokenGather plugin that need no GPU: nvcc, C++ against TensorRT headers, CLI."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

import trt_plugins
from compress.plumbing.cli import EXIT_USER_ERROR, run_cli
from compress.plumbing.errors import PipelineError
from trt_plugins import build as plugin_build

TOKEN_GATHER_DIR = trt_plugins.PACKAGE_DIR / "token_gather"
DEFAULT_ARCHS = plugin_build.DEFAULT_CUDA_ARCHS.split(";")


def test_default_architectures_cover_turing_to_hopper_and_orin():
    assert {"75", "87", "90"} <= set(DEFAULT_ARCHS)
    cmake_text = (trt_plugins.PACKAGE_DIR / "CMakeLists.txt").read_text()
    assert f'set(CMAKE_CUDA_ARCHITECTURES "{plugin_build.DEFAULT_CUDA_ARCHS}")' in cmake_text


def test_cpp_constants_match_python_constants():
    header = (TOKEN_GATHER_DIR / "tokenGatherConstants.h").read_text()
    values = dict(re.findall(r'constexpr char const\* (\w+) = "([^"]*)";', header))
    assert values == {
        "kPLUGIN_NAME": trt_plugins.PLUGIN_NAME,
        "kPLUGIN_VERSION": trt_plugins.PLUGIN_VERSION,
        "kPLUGIN_NAMESPACE": trt_plugins.PLUGIN_NAMESPACE,
        "kFIELD_KEEP": trt_plugins.ATTR_KEEP,
        "kFIELD_WITH_INDICES": trt_plugins.ATTR_WITH_INDICES,
    }


def test_spec_names_match_python_constants():
    spec = json.loads(trt_plugins.SPEC_PATH.read_text())
    assert (spec["op"], spec["onnx_domain"]) == (trt_plugins.PLUGIN_NAME, trt_plugins.ONNX_DOMAIN)
    assert (spec["plugin_version"], spec["plugin_namespace"]) == (trt_plugins.PLUGIN_VERSION,
                                                                  trt_plugins.PLUGIN_NAMESPACE)
    assert set(spec["attributes"]) >= {trt_plugins.ATTR_KEEP, trt_plugins.ATTR_WITH_INDICES}


@pytest.mark.skipif(plugin_build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_kernel_compiles_for_every_default_architecture(tmp_path):
    """One nvcc call, every default SASS target plus PTX for the newest (forward compatibility)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in DEFAULT_ARCHS]
    gencode.append(f"-gencode=arch=compute_{DEFAULT_ARCHS[-1]},code=compute_{DEFAULT_ARCHS[-1]}")
    command = [plugin_build.find_nvcc(), "-c", "-O3", "-std=c++17", "--threads", "0", *gencode,
               "-Xcompiler", "-Wall,-Wextra", str(TOKEN_GATHER_DIR / "tokenGatherKernel.cu"),
               "-o", str(tmp_path / "tokenGatherKernel.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    assert (tmp_path / "tokenGatherKernel.o").stat().st_size > 0


def _cuda_include_dir():
    nvcc = plugin_build.find_nvcc()
    from trt_plugins.token_gather_cuda import cuda_toolkit_root

    root = cuda_toolkit_root()
    return root / "include" if nvcc and root else None


@pytest.mark.parametrize("dynamic_registration", [0, 1], ids=["register_on_load", "getCreators"])
def test_plugin_compiles_against_tensorrt_headers(tmp_path, dynamic_registration):
    """Compiles the IPluginV3 code when NvInfer.h is found ($TensorRT_ROOT or the standard dirs)."""
    header_dir = plugin_build.find_tensorrt_header(None)
    if header_dir is None:
        pytest.skip("TensorRT headers not found (set TensorRT_ROOT to a dir with include/NvInfer.h)")
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_include = _cuda_include_dir()
    if cxx is None or cuda_include is None:
        pytest.skip("a C++ compiler and the CUDA toolkit headers are needed")
    command = [cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fPIC", "-fvisibility=hidden", "-c",
               f"-DTOKEN_GATHER_DYNAMIC_REGISTRATION={dynamic_registration}", "-isystem", str(header_dir),
               "-isystem", str(cuda_include), str(TOKEN_GATHER_DIR / "tokenGatherPlugin.cpp"),
               "-o", str(tmp_path / "tokenGatherPlugin.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"


def test_build_cli_reports_missing_tensorrt_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trt_plugins.build", "--tensorrt-root", str(tmp_path),
                             "--build-dir", str(tmp_path / "build")],
                            capture_output=True, text=True, cwd=trt_plugins.PACKAGE_DIR.parent)
    assert result.returncode == EXIT_USER_ERROR
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "NvInfer.h" in lines[0]


def test_build_cli_reports_missing_cmake(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plugin_build.shutil, "which", lambda name: None)
    assert run_cli(plugin_build.main, ["--build-dir", str(tmp_path)]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.startswith("error: cmake not found")


def test_a_failing_cmake_step_names_the_step_and_its_exit_code(capsys):
    with pytest.raises(plugin_build.BuildStepFailed, match=r"\[2/2\] build failed \(exit code 3\)") as caught:
        plugin_build.run_step("[2/2] build", [sys.executable, "-c", "raise SystemExit(3)"])
    assert not isinstance(caught.value, PipelineError)  # not the user's input: exit 1, not 2
    assert capsys.readouterr().out.startswith("-- [2/2] build: ")


def test_library_path_and_load_error_without_a_build(tmp_path, monkeypatch):
    monkeypatch.delenv(trt_plugins.LIBRARY_ENV, raising=False)
    assert trt_plugins.library_path("dynamic", tmp_path).name == "libtoken_gather_plugin_dynamic.so"
    with pytest.raises(trt_plugins.PluginNotBuiltError, match="python -m trt_plugins.build"):
        trt_plugins.load_plugin_library(tmp_path)


def test_preflight_names_both_builds_and_the_build_command_when_none_exists(tmp_path, monkeypatch):
    monkeypatch.delenv(trt_plugins.LIBRARY_ENV, raising=False)
    with pytest.raises(PipelineError) as caught:
        trt_plugins.find_plugin_library(tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, trt_plugins.PluginNotBuiltError) and "\n" not in message
    assert f"`python -m trt_plugins.build --build-dir {tmp_path}`" in message
    assert all(name in message for name in trt_plugins.LIBRARY_NAMES.values())

    def preflight_cli(argv):  # what an export stage does first when the plugin flavour is asked for
        trt_plugins.find_plugin_library(tmp_path)

    assert run_cli(preflight_cli) == EXIT_USER_ERROR  # one error line, exit code 2


@pytest.mark.parametrize("registration", ["static", "dynamic"])
def test_preflight_accepts_either_registration_build(tmp_path, monkeypatch, registration):
    monkeypatch.delenv(trt_plugins.LIBRARY_ENV, raising=False)
    built = trt_plugins.library_path(registration, tmp_path)
    built.parent.mkdir(parents=True)
    built.write_bytes(b"\x7fELF")
    assert trt_plugins.find_plugin_library(tmp_path) == trt_plugins.PluginLibrary(built, registration)


def test_preflight_prefers_the_self_registering_build_and_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(trt_plugins.LIBRARY_ENV, raising=False)
    for registration in trt_plugins.LIBRARY_NAMES:
        path = trt_plugins.library_path(registration, tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF")
    assert trt_plugins.find_plugin_library(tmp_path).registration == "static"
    chosen = tmp_path / "elsewhere.so"
    monkeypatch.setenv(trt_plugins.LIBRARY_ENV, str(chosen))
    with pytest.raises(trt_plugins.PluginNotBuiltError, match="elsewhere.so"):  # the user's path, nothing else
        trt_plugins.find_plugin_library()
    chosen.write_bytes(b"\x7fELF")
    assert trt_plugins.find_plugin_library() == trt_plugins.PluginLibrary(chosen, "static")


def test_a_library_that_cannot_be_loaded_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(trt_plugins.LIBRARY_ENV, raising=False)
    broken = trt_plugins.library_path("static", tmp_path)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a shared object")
    with pytest.raises(trt_plugins.PluginLoadError, match="python -m trt_plugins.build"):
        trt_plugins.load_plugin_library(tmp_path)


def test_trt_plugins_package_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import trt_plugins, trt_plugins.build, "
            "trt_plugins.ort_token_gather; assert 'torch' not in sys.modules or sys.modules['torch'] is None")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=trt_plugins.PACKAGE_DIR.parent)
    assert result.returncode == 0, result.stderr
