"""export.engine and export.on_target.tensorrt_engine: version logic, trtexec lines, portability, and the target-side check.

The export folder is the demo model exported by export.build (plugin flavour, mixed float16, dynamic batch
1,2,4), with its debug twins and golden data; the check runs the real CLI, also with torch and timm unimportable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import torch_free_env
from export.on_target import engine as engine_cli
from export.on_target.golden import GOLDEN_FILE, sha256_of
from export.on_target.tensorrt_engine import (plan_engine, portability_problem, tensorrt_unavailable_reason, timing_cache_path,
                                              trtexec_commands, trtexec_text)

REPO = Path(__file__).resolve().parents[1]
SHARES_EXPORT = pytest.mark.slow  # uses the module's export folder: one export.build of the demo model (20-50 s)
HERE_10_3 = {"tensorrt": "10.3.0.30", "gpu": "Orin (nvgpu)", "compute_capability": "8.7"}
DEPRECATED_ON_11 = ("--fp16", "--int8", "--best", "--stronglyTyped", "--useCudaGraph", "--noDataTransfers",
                    "--useSpinWait")


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "demo"
    built = subprocess.run([sys.executable, "-m", "export.build", "--keep", "0.6", "--fp16", "--gather", "plugin",
                            "--dynamic-batch", "1,2,4", "--backend", "ort", "--out", str(out)], capture_output=True,
                           text=True, cwd=REPO, timeout=600)
    assert built.returncode == 0, built.stderr
    roles = {a["role"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert {"golden", "onnx_debug", "onnx_plugin_debug", "onnx_fp16_debug", "trtexec"} <= roles, roles
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    copy.mkdir(parents=True)
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def run_engine_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "export.engine", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=env)


# ----------------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize("version", ["10.3.0.30", "11.1.0.7"])
@pytest.mark.parametrize("precision,gather,role", [("fp32", "native", "onnx"), ("fp32", "plugin", "onnx_plugin"),
                                                   ("fp16", "plugin", "onnx_fp16"), ("int8", "native", "onnx_int8")])
def test_engine_plan_per_tensorrt_version_and_precision(version, precision, gather, role):
    plan = plan_engine(version, precision, gather)
    assert plan.onnx_role == role and plan.strongly_typed and plan.tf32 is False
    assert plan.builder_flags == ()  # never FP16/INT8: the precision is in the validated graph
    assert plan.network_flags == (("STRONGLY_TYPED",) if version.startswith("10.") else ())


def test_engine_plan_refuses_tensorrt_older_than_10_and_unknown_precision():
    with pytest.raises(engine_cli.TensorRTError, match="older than 10.0"):
        plan_engine("8.6.1", "fp16")
    with pytest.raises(engine_cli.TensorRTError, match="unknown precision"):
        plan_engine("10.3.0", "bf16")


def test_trtexec_lines_for_10_3_and_11():
    batch = {"dynamic": True, "min": 1, "opt": 4, "max": 8}
    lines_10 = trtexec_commands("10.3", plan_engine("10.3", "fp16", "plugin"), "model_plugin_fp16.onnx", "m.engine",
                                "images", (3, 224, 224), batch, "libtoken_gather_plugin.so")
    assert lines_10["build"] == ("trtexec --onnx=model_plugin_fp16.onnx --saveEngine=m.engine --stronglyTyped --noTF32 "
                                 "--minShapes=images:1x3x224x224 --optShapes=images:4x3x224x224 "
                                 "--maxShapes=images:8x3x224x224 --staticPlugins=libtoken_gather_plugin.so --skipInference")
    assert lines_10["time"] == ("trtexec --loadEngine=m.engine --shapes=images:4x3x224x224 "
                                "--staticPlugins=libtoken_gather_plugin.so --useCudaGraph --noDataTransfers --useSpinWait")
    for precision in ("fp32", "fp16", "int8"):
        lines_11 = trtexec_commands("11", plan_engine("11.0", precision), "m.onnx", "m.engine", "images", (3, 64, 64),
                                    {"dynamic": False, "min": 1, "opt": 1, "max": 1})
        words = " ".join(lines_11.values()).split()
        assert not [w for w in words if w.split("=")[0] in DEPRECATED_ON_11], words
        assert "--noTF32" in words and not any(w.startswith("--minShapes") for w in words)  # static batch: no profile


def test_portability_refuses_another_tensorrt_or_gpu():
    assert portability_problem(HERE_10_3, dict(HERE_10_3)) is None
    other_version = portability_problem(HERE_10_3, {**HERE_10_3, "tensorrt": "10.7.0.23"})
    assert "TensorRT 10.3.0.30 (here: 10.7.0.23)" in other_version and "rebuild it here" in other_version
    other_gpu = portability_problem(HERE_10_3, {**HERE_10_3, "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert "compute capability 8.7" in other_gpu and "NVIDIA H100, 9.0" in other_gpu
    manifest = {"engines": {"fp16": {**HERE_10_3, "path": "model_fp16.engine"}}}
    assert engine_cli.engine_problem(manifest, "model_fp16.engine", HERE_10_3) is None
    assert "not portable" in engine_cli.engine_problem(manifest, "model_fp16.engine", {**HERE_10_3, "tensorrt": None})
    assert "not described" in engine_cli.engine_problem(manifest, "other.engine", HERE_10_3)


def test_manifest_lists_passing_engines_only():
    manifest = {"artifacts": [{"path": "model.onnx", "role": "onnx"},
                              {"path": "model_fp16.engine", "role": "engine", "sha256": "old"}],
                "engines": {"fp16": {"path": "model_fp16.engine", "passed": True}, "fp32": {"path": "model_fp32.engine"}}}
    engines = {"fp16": {"path": "model_fp16.engine", "passed": False, "sha256": None},
               "int8": {"path": "model_int8.engine", "passed": True, "sha256": "abc"}}
    updated = engine_cli.with_engines(manifest, engines, HERE_10_3)
    assert updated["artifacts"] == [{"path": "model.onnx", "role": "onnx"},
                                    {"path": "model_int8.engine", "role": "engine", "sha256": "abc", "precision": "int8",
                                     "runtime": "TensorRT"}]
    assert set(updated["engines"]) == {"fp32", "int8"} and updated["target"] == HERE_10_3
    assert manifest["engines"]["fp16"]["passed"]  # the input is left as it was


def test_timing_cache_is_keyed_by_tensorrt_version_and_gpu(tmp_path):
    paths = {timing_cache_path(tmp_path, HERE_10_3), timing_cache_path(tmp_path, {**HERE_10_3, "tensorrt": "11.0"}),
             timing_cache_path(tmp_path, {**HERE_10_3, "gpu": "RTX 4090", "compute_capability": "8.9"})}
    assert len(paths) == 3 and all(p.parent == tmp_path for p in paths)


# ----------------------------------------------------------------------------- the check on ONNX Runtime


@SHARES_EXPORT
def test_ort_check_passes_at_min_opt_and_max(export_folder):
    result = run_engine_cli(export_folder, "--backend", "ort")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch sizes [1, 2, 4]" in result.stdout and result.stdout.strip().endswith("agree with the golden data")
    assert "PASSED: 3 graph(s)" in result.stdout
    for role in ("onnx", "onnx_plugin", "onnx_fp16"):
        rows = [line for line in result.stdout.splitlines() if line.strip().startswith(role + " ")]
        assert {row.split()[2] for row in rows} == {"b1", "b2", "b4"}, rows


@SHARES_EXPORT
def test_trtexec_text_names_the_shipped_graphs(export_folder):
    manifest = json.loads((export_folder / "manifest.json").read_text())
    text = trtexec_text(manifest)
    assert "--onnx=model_plugin.onnx" in text and "--onnx=model_plugin_fp16.onnx" in text
    assert text.count("--staticPlugins=") == 8  # build + time, fp32 + fp16, 10.3 + 11


@SHARES_EXPORT
def test_a_disagreeing_graph_exits_1(export_folder, tmp_path):
    folder = copy_of(export_folder, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / GOLDEN_FILE) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["demo-test/logits"] = arrays["demo-test/logits"] + 1e-2  # every float32 graph is now 1e-2 off
    np.savez(folder / GOLDEN_FILE, **arrays)
    entry = next(a for a in manifest["artifacts"] if a["role"] == "golden")
    entry["sha256"] = sha256_of(folder / GOLDEN_FILE)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = run_engine_cli(folder, "--backend", "ort")
    assert result.returncode == engine_cli.EXIT_DISAGREES, result.stdout + result.stderr
    assert "FAILED: onnx, onnx_plugin disagree with the golden data" in result.stdout


@SHARES_EXPORT
@pytest.mark.parametrize("damaged", ["model.onnx", "model_plugin_fp16.debug.onnx", GOLDEN_FILE])
def test_a_changed_file_is_refused(export_folder, tmp_path, damaged):
    folder = copy_of(export_folder, tmp_path)
    data = bytearray((folder / damaged).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / damaged).write_bytes(bytes(data))
    result = run_engine_cli(folder, "--backend", "ort")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"error: {folder / damaged} differs from the file the manifest recorded (sha256 "
                                     "mismatch): it was changed or truncated after export; copy the export folder again")


@SHARES_EXPORT
def test_bad_folders_are_one_error_line(export_folder, tmp_path):
    cases = {tmp_path / "missing": "export folder not found", tmp_path: "has no manifest.json"}
    corrupt = copy_of(export_folder, tmp_path / "c")
    (corrupt / GOLDEN_FILE).write_bytes(b"not a zip file")
    manifest = json.loads((corrupt / "manifest.json").read_text())
    next(a for a in manifest["artifacts"] if a["role"] == "golden")["sha256"] = sha256_of(corrupt / GOLDEN_FILE)
    (corrupt / "manifest.json").write_text(json.dumps(manifest))
    cases[corrupt] = "cannot read golden data"
    no_golden = copy_of(export_folder, tmp_path / "g")
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["role"] != "golden"]
    (no_golden / "manifest.json").write_text(json.dumps(manifest))
    cases[no_golden] = "lists no golden data"
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "manifest.json").write_text("{not json")
    cases[tmp_path / "j"] = "cannot read"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"artifacts": []}))
    cases[tmp_path / "b"] = "has no batch profile or input description"
    cases[export_folder / "manifest.json"] = "is not a folder"
    for folder, message in cases.items():
        result = run_engine_cli(folder, "--backend", "ort")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (folder, result.stderr)


@SHARES_EXPORT
def test_missing_plugin_library_is_one_error_line_before_any_work(export_folder, tmp_path):
    env = {**os.environ, "TOKEN_GATHER_PLUGIN_LIBRARY": str(tmp_path / "nowhere" / "libtoken_gather_plugin.so")}
    result = run_engine_cli(export_folder, "--backend", "trt", env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "TokenGather plugin library is not built" in result.stderr and "python -m trt_plugins.build" in result.stderr


@SHARES_EXPORT
def test_no_tensorrt_is_one_error_line(export_folder, tmp_path):
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present here")
    library = tmp_path / "libtoken_gather_plugin.so"
    library.write_bytes(b"")  # the preflight checks that a build exists; TensorRT is checked next
    result = run_engine_cli(export_folder, "--backend", "trt", env={**os.environ, "TOKEN_GATHER_PLUGIN_LIBRARY": str(library)})
    assert result.returncode == 2 and result.stdout == "", result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot build engines here: {tensorrt_unavailable_reason()}; install TensorRT")
    for flag, value in (("-n", "0"), ("--warmup", "-1"), ("--backend", "cuda")):
        bad = run_engine_cli(export_folder, flag, value)
        assert bad.returncode == 2 and "error: argument" in bad.stderr and "Traceback" not in bad.stderr


@SHARES_EXPORT
def test_an_engine_built_elsewhere_is_refused_before_tensorrt_is_touched(export_folder, tmp_path):
    folder = copy_of(export_folder, tmp_path)
    (folder / "model_fp16.engine").write_bytes(b"an engine built on a Jetson")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest = engine_cli.with_engines(manifest, {"fp16": {**HERE_10_3, "path": "model_fp16.engine", "passed": True,
                                                           "sha256": sha256_of(folder / "model_fp16.engine")}}, HERE_10_3)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = run_engine_cli(folder, "--backend", "trt", "--no-build")
    assert result.returncode == 2 and result.stdout == "", result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: refusing {folder / 'model_fp16.engine'}: engine built for TensorRT 10.3.0.30")
    assert "engines are not portable: rebuild it here with python -m export.engine EXPORT_DIR" in line
    nothing = run_engine_cli(export_folder, "--backend", "trt", "--no-build")
    assert nothing.returncode == 2 and "lists no TensorRT engine to check" in nothing.stderr
    wrong = run_engine_cli(export_folder, "--backend", "ort", "--no-build")
    assert wrong.returncode == 2 and "--no-build checks engines: it needs --backend trt or rtx" in wrong.stderr


@SHARES_EXPORT
def test_engine_and_bench_run_without_torch_and_timm(export_folder, tmp_path):
    env = torch_free_env(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert blocked.returncode == 1 and "torch is blocked" in blocked.stderr  # the block works
    for module in ("export.engine", "export.bench"):
        helped = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                                cwd=REPO, timeout=120)
        assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr
    checked = run_engine_cli(export_folder, "--backend", "ort", env=env)
    assert checked.returncode == 0 and "PASSED" in checked.stdout, checked.stderr
    benched = subprocess.run([sys.executable, "-m", "export.bench", str(export_folder / "model.onnx"), "-n", "3",
                              "--warmup", "1", "--out", str(tmp_path / "bench")], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=120)
    assert benched.returncode == 0 and "model.onnx" in benched.stdout, benched.stderr


# ----------------------------------------------------------------------------- on TensorRT (GPU machines)


@SHARES_EXPORT
@pytest.mark.skipif(tensorrt_unavailable_reason() is not None, reason=f"{tensorrt_unavailable_reason()}")
def test_engines_build_check_time_and_publish(export_folder, tmp_path):
    import trt_plugins

    try:
        trt_plugins.find_plugin_library()
    except trt_plugins.PluginNotBuiltError as error:
        pytest.skip(str(error))
    folder = copy_of(export_folder, tmp_path)
    result = run_engine_cli(folder, "--backend", "trt", "-n", "5", "--warmup", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["engines"]) == {"fp32", "fp16"} and manifest["target"]["compute_capability"]
    for precision, facts in manifest["engines"].items():
        assert facts["passed"] and (folder / facts["path"]).is_file()
        assert {c["batch"] for c in facts["comparisons"]} == {1, 2, 4}
        assert facts["timing"]["2"]["device_ms"]["median"] > 0
        assert facts["timing"]["2"]["end_to_end_ms"]["median"] >= facts["timing"]["2"]["device_ms"]["median"]


def test_engine_stage_refuses_a_tensorrt_older_than_the_flavour_needs():
    from export.on_target.tensorrt_engine import minimum_version_problem

    manifest = {"gather": "scatter", "method": {"method": "tome", "min_tensorrt_version": {"scatter": "10.0"}}}
    assert minimum_version_problem(manifest, "10.3.0.30") is None and minimum_version_problem(manifest, "11.1") is None
    assert "need TensorRT 10.0 or newer, this is 8.6.1" in minimum_version_problem(manifest, "8.6.1")
    assert minimum_version_problem({"gather": "native", "method": {"method": "dynamicvit"}}, "8.6.1") is None
