"""TensorRT for RTX as an engine backend: the pure decisions, and the real runtime where it is installed.

TensorRT-RTX's ONNX parser and builder run on a machine without a GPU, so wherever the ``[rtx]`` extra is installed
(the ``dev`` extra includes it) these tests build real engines: through ``python -m export.build --backend rtx`` and
``python -m export.engine DIR --backend rtx`` (the latter with torch and timm unimportable, as on a target). Running
an engine needs an RTX-class GPU; without one the engines are listed as built and not checked, and the tests say so.
The graphs of every export contract (DynamicViT, LV-ViT, ToMe) are parsed and built in tests/test_tensorrt_support.py;
here the fourth method, the test tree's fixed-stride pruning, is parsed and built too.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_in_process, torch_free_env
from export.on_target import engine as engine_cli
from export.on_target.golden import sha256_of
from export.on_target.runtimes import (RTX_DEFAULT_TARGETS, TENSORRT, TENSORRT_RTX, engine_mismatch, engine_runtime,
                                       import_bindings, parse_compute_capabilities, rtx_targets_gpu)
from export.on_target.tensorrt_engine import TensorRTError, flavour_refusal, plan_engine, portability_problem

REPO = Path(__file__).resolve().parents[1]
RTX_MISSING = None if import_bindings(TENSORRT_RTX) is not None else "TensorRT-RTX is not installed (pip install -e '.[rtx]')"
NEEDS_RTX = pytest.mark.skipif(RTX_MISSING is not None, reason=str(RTX_MISSING))
RTX_BUILT = {"runtime": "TensorRT-RTX", "tensorrt_rtx": "1.7.1.116", "compute_capabilities": list(RTX_DEFAULT_TARGETS)}
RTX_4090 = {"tensorrt": None, "tensorrt_rtx": "1.7.1.116", "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}


# ----------------------------------------------------------------------------- pure decisions


def test_rtx_plans_are_strongly_typed_without_a_flag_and_carry_their_targets():
    plan = plan_engine("1.7.1.116", "fp16", chosen=TENSORRT_RTX)
    assert plan.network_flags == () and plan.strongly_typed and not plan.tf32 and plan.runtime == "rtx"
    assert plan.compute_capabilities == RTX_DEFAULT_TARGETS and plan.onnx_role == "onnx_fp16"
    turing = plan_engine("1.7.1.116", "fp32", chosen=TENSORRT_RTX, compute_capabilities=("7.5",))
    assert turing.compute_capabilities == ("7.5",)
    assert plan_engine("10.3.0.30", "fp32").network_flags == ("STRONGLY_TYPED",)  # TensorRT 10 is unchanged
    with pytest.raises(TensorRTError, match="TensorRT-RTX cannot build the plugin flavour"):
        plan_engine("1.7.1.116", "fp32", "plugin", chosen=TENSORRT_RTX)


def test_rtx_engines_run_where_their_compute_capability_is_targeted():
    assert [rtx_targets_gpu(cc) for cc in ("8.0", "8.6", "8.9", "12.0", "12.1")] == [True] * 5
    assert [rtx_targets_gpu(cc) for cc in ("7.5", "8.7", "9.0", None)] == [False] * 4  # Turing, Orin, Hopper, none
    assert rtx_targets_gpu("7.5", ("7.5",)) and not rtx_targets_gpu("8.6", ("7.5",))
    assert portability_problem(RTX_BUILT, RTX_4090) is None
    hopper = portability_problem(RTX_BUILT, {**RTX_4090, "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert "GPUs of compute capability 8.0, 8.6, 8.9, 12.0+ (here: NVIDIA H100, 9.0)" in hopper
    assert "--backend rtx" in hopper
    other = portability_problem(RTX_BUILT, {**RTX_4090, "tensorrt_rtx": "1.8.0.1"})
    assert "TensorRT-RTX 1.7.1.116 (here: 1.8.0.1)" in other


def test_compute_capabilities_parse_from_the_command_line():
    assert parse_compute_capabilities("default") == RTX_DEFAULT_TARGETS
    assert parse_compute_capabilities("8.6, 7.5,8.6") == ("8.6", "7.5")
    for bad in ("9.0", "", "8.6,sm89"):
        with pytest.raises(Exception, match="compute capabilities must be"):
            parse_compute_capabilities(bad)


def test_an_engine_of_one_runtime_is_refused_by_the_other_from_its_first_bytes():
    assert engine_runtime(b"ftrt\0\0\0\0") is TENSORRT and engine_runtime(b"vtrt\0\0\0\0") is TENSORRT_RTX
    assert engine_runtime(b"\x7fELF") is None
    assert engine_mismatch(b"ftrt....", TENSORRT) is None and engine_mismatch(b"????", TENSORRT_RTX) is None
    assert "it is a TensorRT-RTX engine, not a TensorRT one" in engine_mismatch(b"vtrt....", TENSORRT)
    assert "it is a TensorRT engine, not a TensorRT-RTX one" in engine_mismatch(b"ftrt....", TENSORRT_RTX)


def test_flavours_are_refused_by_the_manifest_and_by_plugin_nodes():
    scatter = {"gather": "scatter", "method": {"runtime_refusals": {"scatter": {"rtx": "no plugins"}}}}
    assert flavour_refusal(scatter, TENSORRT_RTX) == "TensorRT-RTX cannot build the scatter flavour: no plugins"
    assert flavour_refusal(scatter, TENSORRT) is None
    old_plugin_folder = {"gather": "plugin", "method": {}}  # written before runtimes recorded their refusals
    assert "aborts on a TokenGather node" in flavour_refusal(old_plugin_folder, TENSORRT_RTX, has_plugin_nodes=True)
    assert flavour_refusal(old_plugin_folder, TENSORRT, has_plugin_nodes=True) is None


# ----------------------------------------------------------------------------- the real TensorRT-RTX


@pytest.fixture(scope="module")
def rtx_export(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m export.build --keep 0.6 --fp16 --backend rtx``: the demo model, float32 and float16 engines."""
    if RTX_MISSING:
        pytest.skip(RTX_MISSING)
    out = tmp_path_factory.mktemp("rtx") / "demo"
    done = subprocess.run([sys.executable, "-m", "export.build", "--keep", "0.6", "--fp16", "--backend", "rtx",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


def assert_rtx_engines_listed(folder: Path, precisions: set[str]) -> dict:
    """Every RTX engine of ``precisions`` is a file in the folder, listed as an artefact with its sha256, and
    described with the runtime, its version, its targets and build time; checked only where it can run."""
    manifest = json.loads((folder / "manifest.json").read_text())
    engines = {key: facts for key, facts in manifest["engines"].items() if facts["runtime"] == "TensorRT-RTX"}
    assert {facts["precision"] for facts in engines.values()} == precisions and set(engines) == {
        f"{p}.rtx" for p in precisions}
    listed = {a["path"]: a for a in manifest["artifacts"] if a["role"] == "engine"}
    for facts in engines.values():
        path = folder / facts["path"]
        assert path.read_bytes()[:4] == b"vtrt" and sha256_of(path) == facts["sha256"] == listed[facts["path"]]["sha256"]
        assert facts["tensorrt_rtx"] == import_bindings(TENSORRT_RTX).__version__
        assert facts["compute_capabilities"] == list(RTX_DEFAULT_TARGETS) and facts["build_seconds"] > 0
        assert facts["layers"] > 100 and facts["bytes"] == path.stat().st_size
        if manifest["target"]["gpu"] is None:  # no GPU: built, listed, and said to be unchecked
            assert facts["passed"] is None and facts["unchecked"] == "no CUDA GPU is visible"
        else:
            assert facts["passed"] is not False
    return manifest


@NEEDS_RTX
def test_export_build_writes_rtx_engines_for_every_precision_without_a_gpu(rtx_export):
    folder, done = rtx_export
    manifest = assert_rtx_engines_listed(folder, {"fp32", "fp16"})
    assert manifest["engine"] == {"built": True, "runtime": "TensorRT-RTX"}
    rtx_table = manifest["tensorrt_support"]["versions"]["rtx"]
    assert rtx_table["supported"] and rtx_table["target"]
    real = manifest["real_parser"]
    assert real["ran"] and real["all_built"] and len(real["graphs"]) == 4  # two graphs and their debug twins
    assert all(v["parsed"] and v["built"] and v["layers"] > 100 for v in real["graphs"].values())
    assert "TensorRT-RTX 1.7.1.116 parser and CPU build: 4 of 4 graphs built" in done.stdout
    lines = done.stdout.strip().splitlines()
    assert "engine model_fp16.rtx.engine: TensorRT-RTX" in done.stdout and lines[-3].startswith("PASSED")
    assert lines[-1].endswith("--backend rtx --no-build` checks and times the TensorRT-RTX engines built here")


@NEEDS_RTX
def test_export_engine_builds_rtx_engines_on_a_copied_folder_without_torch(rtx_export, tmp_path):
    source, _ = rtx_export
    folder = tmp_path / "copied"
    shutil.copytree(source, folder)
    for engine in folder.glob("*.rtx.engine"):  # as if the folder had been exported without engines
        engine.unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest = {**manifest, "engines": {}, "artifacts": [a for a in manifest["artifacts"] if a["role"] != "engine"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    env = torch_free_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "export.engine", str(folder), "--backend", "rtx"], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_rtx_engines_listed(folder, {"fp32", "fp16"})
    assert "TensorRT-RTX 1.7.1.116" in done.stdout and ("BUILT: 2 TensorRT-RTX engine(s)" in done.stdout
                                                         or "PASSED: 2 engine(s)" in done.stdout)
    # an RTX engine is never given to TensorRT: the TensorRT re-check finds none to check
    recheck = run_in_process("export.engine", folder, "--backend", "trt", "--no-build")
    assert recheck.returncode == 2 and "lists no TensorRT engine to check" in recheck.stderr


@NEEDS_RTX
def test_a_tensorrt_engine_given_to_tensorrt_rtx_is_refused_in_one_line(rtx_export, tmp_path):
    from export.on_target.tensorrt_engine import TensorRTRunner

    impostor = tmp_path / "model_fp32.engine"
    impostor.write_bytes(b"ftrt" + (rtx_export[0] / "model_fp32.rtx.engine").read_bytes()[4:])
    with pytest.raises(TensorRTError, match="it is a TensorRT engine, not a TensorRT-RTX one"):
        TensorRTRunner(impostor, chosen=TENSORRT_RTX)


@NEEDS_RTX
@pytest.mark.parametrize("flags, reason", [
    (["--keep", "0.6", "--gather", "plugin"], "TensorRT-RTX cannot build the plugin flavour"),
    (["--tome-r", "4", "--tome-flavour", "scatter"], "TensorRT-RTX cannot build the scatter flavour"),
])
def test_flavours_rtx_cannot_take_are_refused_before_any_work(flags, reason, tmp_path):
    out = tmp_path / "refused"
    done = run_in_process("export.build", *flags, "--backend", "rtx", "--out", out)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and reason in lines[0] and "nothing was written" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@NEEDS_RTX
def test_the_target_side_refuses_a_plugin_folder_for_rtx_before_its_parser(tmp_path):
    out = tmp_path / "plugin"
    exported = run_in_process("export.build", "--keep", "0.6", "--gather", "plugin", "--backend", "ort", "--out", out)
    assert exported.returncode == 0, exported.stderr
    before = {p.name: sha256_of(p) for p in out.iterdir()}
    done = run_in_process("export.engine", out, "--backend", "rtx")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "TensorRT-RTX cannot build the plugin flavour" in lines[0]
    assert {p.name: sha256_of(p) for p in out.iterdir()} == before  # nothing written


@NEEDS_RTX
def test_the_fixed_stride_method_of_the_test_tree_parses_and_builds(tmp_path):
    """The fourth export contract: its float32 graphs (static and dynamic batch, with and without decisions) through
    TensorRT-RTX's real parser and CPU builder."""
    import torch

    from compress.models import create_model
    from export.on_target.tensorrt_engine import probe_graph
    from fixed_stride_method import FixedStrideExport

    model = create_model("dynamicvit_deit_tiny", 0.7, (1, 2, 3), img_size=64, depth=4, num_classes=10).eval()
    method = FixedStrideExport(stride=3, after_block=2)
    deployed = method.deploy_copy(model, "fp32")
    for dynamic in (False, True):
        for debug in (False, True):
            path = tmp_path / f"fixed_stride_{dynamic}_{debug}.onnx"
            path.write_bytes(method.export_onnx(deployed, "gather", 2, dynamic, 17, debug).SerializeToString())
            verdict = probe_graph(TENSORRT_RTX, path, {}, dynamic_dims=(1, 2, 4))
            assert verdict["parsed"] and verdict["built"] and verdict["layers"] > 100, verdict
    assert torch.is_tensor(model.cls_token)


RTX_CANNOT_RUN = None
if RTX_MISSING is None:
    from export.on_target.environment import run_unavailable_reason

    RTX_CANNOT_RUN = run_unavailable_reason(TENSORRT_RTX)


@NEEDS_RTX
@pytest.mark.skipif(RTX_CANNOT_RUN is not None, reason=f"TensorRT-RTX engines cannot run here: {RTX_CANNOT_RUN}")
def test_rtx_engines_agree_with_the_golden_data_and_are_timed_on_an_rtx_gpu(rtx_export, tmp_path):
    folder = tmp_path / "on_gpu"
    shutil.copytree(rtx_export[0], folder)
    done = run_in_process("export.engine", folder, "--backend", "rtx", "--no-build", "-n", "5", "--warmup", "2")
    assert done.returncode == 0 and "PASSED: 2 engine(s)" in done.stdout, done.stdout + done.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("fp32.rtx", "fp16.rtx"):
        facts = manifest["engines"][key]
        assert facts["passed"] is True and facts["comparisons"] and facts["timing"]["1"]["device_ms"]["median"] > 0
