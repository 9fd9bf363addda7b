import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compress import create_dynamicvit
from compress.models.checkpoint import save_dynamicvit
from conftest import run_in_process
from export.deploy import deploy_copy
from export.onnx_export import export_onnx
from export.validate import onnxruntime_session, pytorch_reference

REPO = Path(__file__).resolve().parents[1]
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "LayerNormalization", "Softmax", "Erf")


def run_build(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "export.build", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def run_graph(proto, images):
    return onnxruntime_session(proto).run(None, {"images": images.numpy()})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ck") / "tiny.pth"
    save_dynamicvit(create_dynamicvit("dynamicvit_deit_tiny", keep_ratio=0.7), path)
    return path


@pytest.mark.slow
def test_random_deit_small_at_keep_07_exports_and_validates(tmp_path):
    out = tmp_path / "small"
    result = run_build("--model", "dynamicvit_deit_small", "--keep", "0.7", "--gather", "plugin", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(out)
    assert {a["role"] for a in manifest["artifacts"]} == {"onnx", "onnx_debug", "onnx_plugin", "onnx_plugin_debug",
                                                          "golden", "trtexec"}
    assert manifest["tokens"]["kept_per_stage"] == [137, 96, 67]
    assert manifest["input"]["shape"] == [1, 3, 224, 224]  # the static graph's real input shape
    for role in ("onnx", "onnx_plugin"):
        (check,) = manifest["validation"][role]["comparisons"]
        assert manifest["validation"][role]["shipped_vs_debug_max_abs"] <= 1e-6
        assert check["max_abs_error"] <= 1e-4 and check["kept_sets_identical"] and check["passed"]
    # plugin flavour: a TensorRT engine where TensorRT is; never a TensorRT-RTX one (auto does not pick it)
    engine = manifest["engine"]
    assert engine["built"] or (engine["reason"].startswith("TensorRT is not installed; TensorRT-RTX ") and any(
        why in engine["reason"] for why in ("is not installed", "cannot build the plugin flavour")))
    assert "RANDOM WEIGHTS" in result.stdout


def test_plugin_and_native_graphs_differ_only_in_the_selection_nodes(tiny_model):
    images = torch.randn(2, 3, 224, 224)
    native = export_onnx(deploy_copy(tiny_model, 0.7), "native", batch_size=2)
    plugin = export_onnx(deploy_copy(tiny_model, 0.7), "plugin", batch_size=2)
    native_ops = Counter(n.op_type for n in native.graph.node)
    plugin_ops = Counter(n.op_type for n in plugin.graph.node)
    assert (native_ops["TopK"], native_ops["GatherND"], native_ops["TokenGather"]) == (3, 3, 0)
    assert (plugin_ops["TopK"], plugin_ops["GatherND"], plugin_ops["TokenGather"]) == (0, 0, 3)
    assert all(native_ops[op] == plugin_ops[op] > 0 for op in COMPUTE_OPS), (native_ops, plugin_ops)

    def weights(proto):
        return sorted(onnx.numpy_helper.to_array(t).tobytes().hex()[:64] + str(t.dims) for t in proto.graph.initializer
                      if np.prod(t.dims) > 1000)

    assert weights(native) == weights(plugin)
    native_out = run_graph(export_onnx(deploy_copy(tiny_model, 0.7), "native", batch_size=2, with_indices=True), images)
    plugin_out = run_graph(export_onnx(deploy_copy(tiny_model, 0.7), "plugin", batch_size=2, with_indices=True), images)
    np.testing.assert_array_equal(run_graph(native, images)[0], native_out[0])
    np.testing.assert_array_equal(native_out[0], plugin_out[0])  # float32: exactly equal, indices included
    for a, b in zip(native_out[1:], plugin_out[1:]):
        np.testing.assert_array_equal(a, b)


def test_ties_follow_the_rule_in_pytorch_onnx_and_plugin(tiny_model):
    for predictor in tiny_model.score_predictor:  # every patch token gets the same keep score
        torch.nn.init.zeros_(predictor.out_conv[4].weight)
        torch.nn.init.zeros_(predictor.out_conv[4].bias)
    images = torch.randn(2, 3, 224, 224)
    _, reference = pytorch_reference(tiny_model, images)
    assert [r.tolist() for r in reference] == [[list(range(k))] * 2 for k in (137, 96, 67)]
    for flavour in ("native", "plugin"):
        outputs = run_graph(export_onnx(deploy_copy(tiny_model, 0.7), flavour, batch_size=2, with_indices=True), images)
        for got, want in zip(outputs[1:], reference):
            np.testing.assert_array_equal(got, want, err_msg=flavour)


def test_reexport_is_byte_identical(tiny_model):
    first = export_onnx(deploy_copy(tiny_model, 0.6), "native").SerializeToString()
    second = export_onnx(deploy_copy(tiny_model, 0.6), "native").SerializeToString()
    assert first == second


def test_dynamic_batch_graph_runs_other_batch_sizes(tiny_model):
    proto = export_onnx(deploy_copy(tiny_model, 0.5), "native", batch_size=2, dynamic_batch=True, with_indices=True)
    images = torch.randn(3, 3, 224, 224)
    tiny_model.keep_ratio = 0.5
    logits, _ = pytorch_reference(tiny_model, images)
    outputs = run_graph(proto, images)
    np.testing.assert_allclose(outputs[0], logits, atol=1e-4, rtol=0)
    assert [o.shape for o in outputs[1:]] == [(3, 98), (3, 49), (3, 24)]


def test_dense_export_has_no_selection(tiny_model):
    proto = export_onnx(deploy_copy(tiny_model, 1.0), "native", batch_size=1)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["TopK"] == 0 and ops["LogSoftmax"] == 0 and ops["LayerNormalization"] == 25


def test_fp16_graph_is_mixed_and_close(tiny_model):
    proto = export_onnx(deploy_copy(tiny_model, 0.7, "fp16"), "native", batch_size=4)
    by_type = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if np.prod(t.dims) > 1000)
    assert by_type["FLOAT16"] > 0 and by_type["FLOAT"] > 0  # predictors and norms stay float32
    images = torch.randn(4, 3, 224, 224)
    logits, _ = pytorch_reference(tiny_model, images)
    got = run_graph(proto, images)[0]
    assert got.dtype == np.float32
    assert np.abs(got - logits).max() < 1e-2  # measured ~1e-3 on DeiT-S; float16 has ~3 decimal digits


def test_build_writes_manifest_and_reexport_hashes_match(tmp_path, tiny_checkpoint):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        result = run_build("--checkpoint", tiny_checkpoint, "--keep", "0.6", "--fp16", "--dynamic-batch", "1,2,4", "--out", out)
        assert result.returncode == 0, result.stderr
    first, second = manifest_of(a), manifest_of(b)
    # Every graph, debug twin, the golden data and trtexec.txt are byte-identical on re-export. Engines are not: a
    # TensorRT-RTX engine (built here whenever the runtime is installed) differs between two builds of one graph.
    def reproducible(manifest):
        return [(x["path"], x["sha256"]) for x in manifest["artifacts"] if x["role"] != "engine"]

    assert reproducible(first) == reproducible(second) and len(reproducible(first)) == 6
    assert first["keep_ratio"] == 0.6 and first["tokens"]["kept_per_stage"] == [117, 70, 42]
    assert first["batch"] == {"dynamic": True, "min": 1, "opt": 2, "max": 4}
    assert first["input"]["shape"] == ["batch", 3, 224, 224]
    # The dynamic graph is validated at the profile's MIN, OPT and MAX; float32 within 1e-4 at each.
    fp32 = first["validation"]["onnx"]["comparisons"]
    assert sorted(c["batch"] for c in fp32) == [1, 2, 4] and all(c["max_abs_error"] <= 1e-4 for c in fp32)
    # Random images only: the float16 graph is reported, not judged on top-1 (and the summary says so).
    assert all(c["finite"] and c["min_top1_agreement"] is None for c in first["validation"]["onnx_fp16"]["comparisons"])
    for artifact in first["artifacts"]:
        assert (a / artifact["path"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging folders left behind


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--keep", "0"], "expected a number in (0, 1]"),
        (["--keep", "1.5"], "expected a number in (0, 1]"),
        (["--keep", "nan"], "expected a number in (0, 1]"),
        (["--tocom-scale", "0.1"], "--tocom-scale does nothing without --tocom"),
        (["--calib-data", "demo"], "--calib-data does nothing without --int8"),
        (["--val-data", "/nonexistent/images"], "--val-data"),
        (["--model", "resnet50"], "Supported: deit"),
        (["--batch-size", "0"], "--batch-size"),
        (["--opset", "13"], "--opset"),
        (["--keep", "0.05"], "keeps no patch token"),
        (["--model", "dynamicvit_deit_small"], "shape mismatches"),
        (["--int8"], "--int8 needs --calib-data"),
        (["--int8", "--calib-data", "/nonexistent/calibration"], "calibration"),
        (["--backend", "trt"], "--backend trt"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(tmp_path, tiny_checkpoint, extra, fragment):
    """In process (the exit code and the one line of a real process: test_corrupt_checkpoint_and_unwritable_out)."""
    out = tmp_path / "out"
    result = run_in_process("export.build", "--checkpoint", tiny_checkpoint, "--out", out, *extra)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # neither --out nor a staging folder


def test_corrupt_checkpoint_and_unwritable_out(tmp_path, tiny_checkpoint):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    result = run_build("--checkpoint", corrupt, "--out", tmp_path / "o1")
    assert result.returncode == 2 and "corrupt or truncated" in result.stderr and "Traceback" not in result.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_build("--checkpoint", tiny_checkpoint, "--out", blocker / "sub")
    assert result.returncode == 2 and "cannot write to" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "corrupt.pth"]


def test_out_folder_with_foreign_content_is_never_replaced(tmp_path, tiny_checkpoint):
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = run_build("--checkpoint", tiny_checkpoint, "--backend", "ort", "--out", precious)
    assert result.returncode == 2 and "other content" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    # A previous export folder: what its manifest lists is replaced, what the user put there stays (and is named).
    previous = tmp_path / "previous"
    assert run_build("--checkpoint", tiny_checkpoint, "--backend", "ort", "--fp16", "--out", previous).returncode == 0
    (previous / "notes.txt").write_text("my notes")
    (previous / "other.onnx").write_text("not ours")
    result = run_build("--checkpoint", tiny_checkpoint, "--backend", "ort", "--out", previous)
    assert result.returncode == 0, result.stderr
    assert "notes.txt in place (not written by this tool)" in result.stdout and "other.onnx" in result.stdout
    names = {p.name for p in previous.iterdir()}
    assert {"notes.txt", "other.onnx", "model.onnx", "golden.npz", "manifest.json"} <= names
    assert "model_native_fp16.onnx" not in names  # listed by the old manifest, not written this time: removed
    assert (previous / "notes.txt").read_text() == "my notes"
    assert {a["path"] for a in manifest_of(previous)["artifacts"]} <= names


def test_what_a_killed_export_left_is_removed_by_the_next_run(tmp_path, tiny_checkpoint):
    """A SIGKILLed export leaves its staging folder and its lock file, which no process holds any more (the kill
    points themselves: tests/test_folder_transaction.py)."""
    out = tmp_path / "out"
    stale = tmp_path / ".out.staging"
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    (tmp_path / ".out.lock").write_text("999999999 python -m export.build\n")
    result = run_build("--checkpoint", tiny_checkpoint, "--backend", "ort", "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"removed {stale}, left by a writer that was killed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tocom_is_merged_before_export_and_recorded(tmp_path, tiny_checkpoint):
    from compress.models.checkpoint import load_dynamicvit
    from compress.models.tocom import plugin_for_model
    from compress.models.tocom_files import save_plugin

    model = load_dynamicvit(tiny_checkpoint).model
    plugin = plugin_for_model(model)
    torch.manual_seed(5)
    for layer in plugin.layers:  # a trained plugin has non-zero up projections; a fresh one changes nothing
        torch.nn.init.normal_(layer.q_up, std=0.05)
        torch.nn.init.normal_(layer.v_up, std=0.05)
    save_plugin(plugin, tmp_path / "tocom.safetensors")
    plain, merged = tmp_path / "plain", tmp_path / "merged"
    assert run_build("--checkpoint", tiny_checkpoint, "--keep", "0.5", "--backend", "ort", "--out", plain).returncode == 0
    result = run_build("--checkpoint", tiny_checkpoint, "--keep", "0.5", "--tocom", tmp_path / "tocom.safetensors",
                       "--tocom-scale", "0.1", "--backend", "ort", "--out", merged)
    assert result.returncode == 0, result.stderr
    entry = manifest_of(merged)["tocom"]
    assert (entry["rho_train"], entry["keep"], entry["scale"]) == (0.7, 0.5, 0.1)
    assert manifest_of(merged)["validation"]["onnx"]["comparisons"][0]["max_abs_error"] <= 1e-4
    assert manifest_of(merged)["artifacts"][0]["sha256"] != manifest_of(plain)["artifacts"][0]["sha256"]
    off_grid = run_build("--checkpoint", tiny_checkpoint, "--keep", "0.55", "--tocom", tmp_path / "tocom.safetensors",
                         "--out", tmp_path / "off")
    assert off_grid.returncode == 2 and "grid" in off_grid.stderr and "Traceback" not in off_grid.stderr


def test_demo_model_is_the_default_and_int8_validates_on_its_test_images(tmp_path):
    out = tmp_path / "demo"
    result = run_build("--keep", "0.7", "--fp16", "--int8", "--calib-data", "demo", "--backend", "ort", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(out)
    assert manifest["model"]["label"] == "demo" and not manifest["model"]["random_weights"]
    assert {a["role"] for a in manifest["artifacts"]} >= {"onnx", "onnx_fp16", "onnx_int8", "golden"}
    assert manifest["precision"] == ["fp32", "fp16", "int8"]
    by_inputs = {c["inputs"]: c for c in manifest["validation"]["onnx"]["comparisons"]}
    assert by_inputs["demo-test"]["max_abs_error"] <= 1e-4 and by_inputs["demo-test"]["kept_sets_identical"]
    for role in ("onnx_fp16", "onnx_int8"):
        real = {c["inputs"]: c for c in manifest["validation"][role]["comparisons"]}["demo-test"]
        assert real["finite"] and real["top1_agreement"] >= 0.95, (role, real)
    calibration = json.dumps(manifest["validation"]["onnx_int8"]["int8"])
    assert "hash" in calibration and "size" in calibration


def test_val_data_judges_reduced_precision_on_real_images_and_a_broken_int8_graph_fails(tmp_path):
    """--val-data: real images (here the demo digits as a .npy, preprocessed) judge fp16 and INT8 by top-1
    agreement; an INT8 graph whose Q/DQ scales are broken fails that gate through the export's own check."""
    from calibration.data import load_calibration_data
    from export.api import ValidationFailed, check_graph
    from export.subject import demo_subject
    from export.methods import DynamicViTExport

    subject = demo_subject()
    images = subject.real_images["demo-test"].numpy()
    np.save(tmp_path / "val.npy", images)
    out = tmp_path / "out"
    result = run_build("--keep", "0.7", "--fp16", "--int8", "--calib-data", "demo", "--val-data", tmp_path / "val.npy",
                       "--backend", "ort", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(out)
    assert "val-data" in manifest["validation_inputs"] and "calib-data" not in manifest["validation_inputs"]
    for role in ("onnx_fp16", "onnx_int8"):
        judged = {c["inputs"]: c for c in manifest["validation"][role]["comparisons"]}["val-data"]
        assert judged["min_top1_agreement"] == 0.95 and judged["top1_agreement"] >= 0.95 and judged["passed"]
    int8 = onnx.load(str(out / "model_native_int8.debug.onnx"))
    scales = {n.input[1] for n in int8.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for tensor in int8.graph.initializer:
        if tensor.name in scales:
            values = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array((values * 50).astype(values.dtype), tensor.name))
    method = DynamicViTExport(0.7)
    val = {"val-data": torch.from_numpy(load_calibration_data(str(tmp_path / "val.npy"), subject.model)[0])}
    with pytest.raises(ValidationFailed, match="top-1 agreement"):
        check_graph(int8, int8, method.reference(subject.model), val, "int8", "onnx_int8", "x.onnx", "native", [1])


def test_tome_exports_through_the_same_pipeline_and_refuses_dynamicvit_options(tmp_path):
    out = tmp_path / "tome"
    result = run_build("--tome-r", "8", "--fp16", "--backend", "ort", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(out)
    assert manifest["method"]["method"] == "tome" and manifest["method"]["r"] == 8
    assert manifest["tokens"]["tokens_per_block"][0] == 65 and manifest["keep_ratio"] is None
    assert {"onnx", "onnx_debug", "onnx_fp16", "golden", "trtexec"} <= {a["role"] for a in manifest["artifacts"]}
    fp32 = manifest["validation"]["onnx"]["comparisons"]
    assert all(c["passed"] and c["kept_sets_identical"] and c["max_abs_error"] <= 1e-4 for c in fp32)
    assert "at r 8 (tokens 65 -> 17)" in result.stdout and "PASSED" in result.stdout
    for extra, fragment in ((["--tome-r", "8", "--keep", "0.5"], "--keep is DynamicViT's keep ratio"),
                            (["--tome-flavour", "scatter"], "do nothing without --tome-r"),
                            (["--tome-r", "8", "--gather", "plugin"], "--gather is DynamicViT's")):
        bad = run_build(*extra, "--out", tmp_path / "bad")
        assert bad.returncode == 2 and fragment in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def graph_ops(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node if n.op_type not in ("Constant", "Identity"))


def test_each_pruning_stage_adds_the_fewest_operators_and_float32_graphs_have_no_cast(tiny_model):
    """Per stage: the prediction module (LayerNorm, 4 MatMuls, 3 GELUs as 5 Erf-form nodes each, 3 Slices, one
    ReduceMean, 4 Adds), the +inf/bias Add, one TopK and one GatherND: 32 operators (50 before the margin score,
    the CLS-first TopK and the GatherND). Graphs at fixed batch; the float32 graph holds no Cast at all."""
    dense = graph_ops(export_onnx(deploy_copy(tiny_model, 1.0), "native"))
    pruned = graph_ops(export_onnx(deploy_copy(tiny_model, 0.7), "native"))
    stages = tiny_model.num_stages
    assert (sum(pruned.values()) - sum(dense.values())) / stages <= 32, (dense, pruned)
    assert pruned["TopK"] == pruned["GatherND"] == stages
    assert pruned["LogSoftmax"] == pruned["Concat"] - dense["Concat"] == pruned["Cast"] - dense["Cast"] == 0
    assert dense["Cast"] == 0
    fp16 = graph_ops(export_onnx(deploy_copy(tiny_model, 0.7, "fp16"), "native"))
    # float16: a Cast pair per LayerNorm outside the predictors, one Cast into each predictor, none in attention
    norms = fp16["LayerNormalization"] - stages
    assert fp16["Cast"] == 2 * norms + stages + 2  # + the images in, the logits out
