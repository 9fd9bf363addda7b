"""Calibration data, INT8 Q/DQ placement, Q/DQ transplant onto the mixed float16 graph, its debug twin and the
plugin flavour, and the deployed INT8 graph of the demo model judged on its test images."""
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calibration import data as calib_data
from calibration.int8 import (
    FLOAT16_QDQ_MIN_OPSET,
    Int8Options,
    QuantizationError,
    count_qdq,
    plan_placement,
    qdq_chains,
    qdq_signature,
    quantize_for_export,
    quiet,
    transplant_qdq,
    with_opset,
)
from calibration.onnx_graph import default_opset, element_types
from compress import create_dynamicvit
from compress.models.checkpoint import demo_checkpoint_path
from compress.models.checkpoint import load_dynamicvit
from compress.plumbing.errors import PipelineError
from export.deploy import deploy_copy
from export.evaluate import int8_vs_float, onnx_logits
from export.onnx_export import export_onnx
from export.on_target.compare import (
                                      REDUCED_PRECISION_MIN_TOP1_AGREEMENT,
                                      compare,
                                      onnxruntime_session,
                                      run_batched,
                                      session_runner,
                                      )
from export.validate import pytorch_reference

DEMO_LIKE = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10,
                 pruning_locations=(1, 3, 5))
DEMO_MAX_TOP1_DROP = 0.01  # one percentage point (a fraction) on the demo test split
# The deployed INT8 graph (mixed float16 + Q/DQ) keeps, per pruning stage and averaged over the demo test images,
# at least this fraction of the tokens float32 PyTorch keeps. Measured: 0.990 / 0.983 / 0.980 (44/31/21 of 64
# patches); int8 rounding moves scores near the top-k boundary, so identical sets on every image are not expected.
DEMO_MIN_KEPT_OVERLAP = 0.97
BROKEN_SCALE_FACTOR = 50.0  # every Q/DQ scale multiplied by this: the agreement gate must fail


def demo_like_model(keep=0.7):
    torch.manual_seed(0)
    return create_dynamicvit("vit_small_patch16_224", keep_ratio=keep, **DEMO_LIKE).eval()


@pytest.fixture(scope="module")
def small_graphs():
    model = demo_like_model()
    graphs = {
        "native": export_onnx(deploy_copy(model, 0.7), "native"),
        "debug": export_onnx(deploy_copy(model, 0.7), "native", with_indices=True),
        "plugin": export_onnx(deploy_copy(model, 0.7), "plugin"),
        "plugin_debug": export_onnx(deploy_copy(model, 0.7), "plugin", with_indices=True),
        "fp16": export_onnx(deploy_copy(model, 0.7, "fp16"), "native"),
        "fp16_debug": export_onnx(deploy_copy(model, 0.7, "fp16"), "native", with_indices=True),
        "fp16_plugin_debug": export_onnx(deploy_copy(model, 0.7, "fp16"), "plugin", with_indices=True),
    }
    return model, graphs


@pytest.fixture(scope="module")
def small_int8(small_graphs):
    _, graphs = small_graphs
    images = calib_data.load_calibration_set("demo", demo_preprocessing(), 64, use_cache=False).images
    return quantize_for_export(graphs["native"], images, method="ort", calibration_info={"hash": "h", "size": 64,
                                                                                          "source": "demo"})


def demo_preprocessing():
    return calib_data.Preprocessing((3, 64, 64), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------- calibration data


def test_array_source_gives_a_fixed_seeded_sample(tmp_path):
    array = np.random.default_rng(1).standard_normal((50, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "calib.npy", array)
    first = calib_data.load_calibration_set(tmp_path / "calib.npy", demo_preprocessing(), 20, seed=3)
    again = calib_data.load_calibration_set(tmp_path / "calib.npy", demo_preprocessing(), 20, seed=3)
    other = calib_data.load_calibration_set(tmp_path / "calib.npy", demo_preprocessing(), 20, seed=4)
    assert first.images.shape == (20, 3, 64, 64) and first.info["size"] == 20
    assert first.info["hash"] == again.info["hash"] != other.info["hash"]
    np.testing.assert_array_equal(first.images, array[calib_data.seeded_sample(50, 20, 3)])
    everything = calib_data.load_calibration_set(tmp_path / "calib.npy", demo_preprocessing(), 500)
    assert everything.info["size"] == 50


def test_uint8_npz_with_labels_is_normalised_with_the_model_mean_and_std(tmp_path):
    raw = np.full((4, 64, 64, 3), 255, dtype=np.uint8)  # NHWC raw pixels
    np.savez(tmp_path / "calib.npz", images=raw, labels=np.arange(4))
    loaded = calib_data.load_calibration_set(tmp_path / "calib.npz", demo_preprocessing(), 4)
    assert loaded.images.shape == (4, 3, 64, 64) and np.allclose(loaded.images, 1.0)
    assert loaded.labels.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: np.save(p / "x.npy", np.zeros((2, 3, 32, 32), np.float32)), "do not fit the model's input"),
    (lambda p: (p / "x.txt").write_text("hello"), "neither a folder nor"),
    (lambda p: (p / "x.npy").write_bytes(b"garbage"), "cannot read image array"),
])
def test_unusable_calibration_data_is_one_clear_pipeline_error(tmp_path, make, message):
    make(tmp_path)
    target = next(iter(tmp_path.iterdir()), tmp_path / "missing.npy")
    with pytest.raises(PipelineError, match=message) as caught:
        calib_data.load_calibration_set(target, demo_preprocessing(), 8)
    assert "\n" not in str(caught.value)


def test_image_folder_uses_the_eval_transform_labels_by_class_folder_and_a_cache(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for class_index, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((80, 96, 3), 40 * (i + class_index), np.uint8)).save(root / name / f"{i}.png")
    cache = tmp_path / "cache"
    first = calib_data.load_calibration_set(root, demo_preprocessing(), 4, seed=0, cache_dir=cache)
    again = calib_data.load_calibration_set(root, demo_preprocessing(), 4, seed=0, cache_dir=cache)
    assert first.images.shape == (4, 3, 64, 64) and first.images.dtype == np.float32
    assert first.info["cache"]["hit"] is False and again.info["cache"]["hit"] is True
    assert first.info["hash"] == again.info["hash"]
    assert sorted(set(first.labels.tolist())) <= [0, 1]
    (root / "dog" / "0.png").touch()  # a changed listing is a different calibration set
    changed = calib_data.load_calibration_set(root, demo_preprocessing(), 4, seed=0, cache_dir=cache)
    assert changed.info["cache"]["hit"] is False


def test_demo_source_reads_the_train_split_and_refuses_other_normalisation():
    calibration = calib_data.load_calibration_set("demo", demo_preprocessing(), 16, use_cache=False)
    assert calibration.images.shape == (16, 3, 64, 64) and calibration.info["source"] == "demo-digits:train"
    assert -1.0 <= calibration.images.min() and calibration.images.max() <= 1.0
    imagenet = calib_data.Preprocessing((3, 64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(PipelineError, match="not trained on the demo dataset"):
        calib_data.load_calibration_set("demo", imagenet, 16, use_cache=False)


def test_preprocessing_follows_the_checkpoint_data_spec_then_timm():
    model = create_dynamicvit("dynamicvit_deit_tiny", img_size=64, depth=4, pruning_locations=(1, 2, 3))
    assert calib_data.preprocessing_for(model, {"data": {"mean": [0.5] * 3, "std": [0.5] * 3}}).mean == (0.5,) * 3
    timm_default = calib_data.preprocessing_for(model)  # DeiT's pretrained config: ImageNet statistics, bicubic
    assert timm_default.input_size == (3, 64, 64) and timm_default.mean == (0.485, 0.456, 0.406)
    assert timm_default.interpolation == "bicubic" and timm_default.crop_pct == 0.9  # timm: DeiT resizes 224/0.9


# ----------------------------------------------------------------------------- INT8 placement


def test_placement_quantises_only_weighted_products_outside_the_prediction_modules(small_graphs):
    _, graphs = small_graphs
    placement = plan_placement(graphs["native"])
    nodes = {n.name: n for n in graphs["native"].graph.node}
    assert {nodes[n].op_type for n in placement.quantize} == {"Conv", "MatMul", "Gemm"}
    assert not any("score_predictor" in n for n in placement.quantize)
    reasons = set(placement.kept_float.values())
    assert any("/score_predictor" in r for r in reasons) and any("attention" in r for r in reasons)
    # 6 blocks x (qkv, proj, fc1, fc2) + patch embedding + head
    assert len(placement.quantize) == 6 * 4 + 2
    everything = plan_placement(graphs["native"], Int8Options(quantize_predictors=True, quantize_attention=True))
    assert not everything.kept_float


def test_float_scopes_are_the_methods_choice(small_graphs):
    """Another method passes its own scopes: none (every weighted product), or more than DynamicViT's."""
    _, graphs = small_graphs
    no_scopes = plan_placement(graphs["native"], float_scopes=())
    # plus 3 prediction modules x 5 weighted products: in_conv, local and global halves of out_conv's first
    # linear, out_conv's last linear, and the keep-minus-drop margin of the score
    assert len(no_scopes.quantize) == 6 * 4 + 2 + 3 * 5
    wider = plan_placement(graphs["native"], float_scopes=("/score_predictor", "/patch_embed"))
    assert len(wider.quantize) == 6 * 4 + 1
    assert [r for n, r in wider.kept_float.items() if "patch_embed" in n] == ["in float scope /patch_embed "
                                                                               "(its outputs select the kept tokens)"]


def test_ort_int8_is_symmetric_per_channel_and_leaves_accuracy_critical_ops_float(small_graphs, small_int8):
    _, graphs = small_graphs
    quantized, report = small_int8
    assert report["method"] == "ort" and report["calibration_set"] == {"hash": "h", "size": 64, "source": "demo"}
    assert report["qdq"]["quantized_nodes"] == len(report["quantized_nodes"]) == 26
    for op in ("Add", "LayerNormalization", "Softmax", "TopK", "GatherND"):
        assert op in report["float_op_types"]
    constants = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    consumers = {n.name: n.op_type for n in quantized.graph.node}
    for chain in qdq_chains(quantized):
        assert consumers[chain.consumer] in ("Conv", "MatMul", "Gemm")
        zero_point = constants[chain.dequantize.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric int8, as TensorRT requires
        if chain.quantize is None:  # a weight: int8 constant, one scale per output channel
            scale = constants[chain.dequantize.input[1]]
            assert constants[chain.dequantize.input[0]].dtype == np.int8 and scale.size > 1
    assert count_qdq(quantized)["quantize_nodes"] == 26  # one activation Q per quantised product
    onnx.checker.check_model(quantized)


def test_the_debug_twin_and_plugin_flavour_get_identical_qdq(small_graphs, small_int8):
    model, graphs = small_graphs
    quantized, _ = small_int8
    images = torch.randn(2, 3, 64, 64)
    feed = {"images": images.numpy()[:1]}
    shipped = onnxruntime_session(quantized).run(None, feed)[0]
    for name in ("debug", "plugin", "plugin_debug"):
        twin = transplant_qdq(quantized, graphs[name])
        assert qdq_signature(twin) == qdq_signature(quantized), name
        onnx.checker.check_model(twin)
        outputs = onnxruntime_session(twin).run(None, feed)
        np.testing.assert_array_equal(outputs[0], shipped)
        assert len(outputs) == (4 if name.endswith("debug") else 1)  # logits (+ kept tokens of 3 stages)


def test_qdq_on_the_mixed_float16_graph_keeps_its_types_and_quantises_only_the_products(small_graphs, small_int8):
    """What a strongly typed TensorRT engine runs: int8 products, float16 elsewhere, the float32 norms kept."""
    _, graphs = small_graphs
    quantized, _ = small_int8
    mixed = transplant_qdq(quantized, graphs["fp16_debug"])
    onnx.checker.check_model(mixed)
    assert default_opset(mixed) >= FLOAT16_QDQ_MIN_OPSET  # QuantizeLinear takes float16 from opset 19 on
    placed, calibrated = qdq_signature(mixed), qdq_signature(quantized)
    assert [row[:2] + row[3:] for row in placed] == [row[:2] + row[3:] for row in calibrated]  # same placement
    # the same scales, rounded to float16: relative error <= 2**-11 for normal float16 numbers
    for mixed_row, float_row in zip(placed, calibrated):
        np.testing.assert_allclose(mixed_row[2], float_row[2], rtol=2.0 ** -11, atol=0, err_msg=mixed_row[0])
    # Nothing but the Q/DQ nodes was added: the rest is the validated mixed graph, node for node.
    original = with_opset(graphs["fp16_debug"], default_opset(mixed))
    added = [n for n in mixed.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert [n.name for n in mixed.graph.node if n not in added] == [n.name for n in original.graph.node]
    types, nodes = element_types(mixed), {n.name: n for n in mixed.graph.node}
    constants = {i.name: i for i in mixed.graph.initializer}
    for chain in qdq_chains(mixed):  # every quantised product is a float16 one fed by float16 DQ outputs
        assert constants[chain.dequantize.input[1]].data_type == onnx.TensorProto.FLOAT16, chain.consumer
        assert types[nodes[chain.consumer].output[0]] == onnx.TensorProto.FLOAT16
    op_output_types = {}
    for node in mixed.graph.node:
        op_output_types.setdefault(node.op_type, set()).add(types.get(node.output[0]))
    assert op_output_types["LayerNormalization"] == {onnx.TensorProto.FLOAT}  # the only float32 island
    assert op_output_types["Softmax"] == {onnx.TensorProto.FLOAT16}  # attention runs in float16, as TensorRT's MHA
    assert onnx.TensorProto.FLOAT16 in op_output_types["Add"]  # residual adds run in float16, not quantised
    assert not any(c.consumer.startswith("/score_predictor") for c in qdq_chains(mixed))


def test_mixed_float16_int8_flavours_agree(small_graphs, small_int8):
    """The shipped graph, its debug twin and the plugin flavour, all mixed float16 + Q/DQ, compute the same."""
    _, graphs = small_graphs
    quantized, _ = small_int8
    feed = {"images": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).numpy()}
    shipped = onnxruntime_session(transplant_qdq(quantized, graphs["fp16"])).run(None, feed)
    debug = onnxruntime_session(transplant_qdq(quantized, graphs["fp16_debug"])).run(None, feed)
    plugin = onnxruntime_session(transplant_qdq(quantized, graphs["fp16_plugin_debug"])).run(None, feed)
    assert np.isfinite(shipped[0]).all()
    np.testing.assert_array_equal(debug[0], shipped[0])
    np.testing.assert_array_equal(plugin[0], shipped[0])
    for kept_native, kept_plugin in zip(debug[1:], plugin[1:]):
        np.testing.assert_array_equal(kept_plugin, kept_native)


def test_quantiser_chatter_is_muted_and_nothing_else(small_graphs, capsys, caplog):
    """ONNX Runtime's calibrators print progress and its quantiser warns on the root logger: neither reaches
    stdout or the log, while the process's own logging and stdout stay as they were."""
    import onnxruntime.quantization.calibrate as calibrator

    _, graphs = small_graphs
    images = calib_data.load_calibration_set("demo", demo_preprocessing(), 8, use_cache=False).images
    root, stdout = logging.getLogger(), sys.stdout
    with caplog.at_level(logging.INFO):
        level = root.level
        quantize_for_export(graphs["native"], images, method="ort", options=Int8Options(calibration="percentile"))
        with quiet():
            assert root.level == level and sys.stdout is stdout
            exec("print('calibrator progress')", vars(calibrator))  # a print inside the quantiser's module
            logging.warning("the application's own warning")
        exec("print('calibrator after quiet')", vars(calibrator))
    assert capsys.readouterr().out == "calibrator after quiet\n"
    assert [r.getMessage() for r in caplog.records] == ["the application's own warning"]
    assert not hasattr(calibrator, "print") and not root.filters


def test_transplant_refuses_a_graph_of_another_model(small_int8):
    quantized, _ = small_int8
    other = export_onnx(deploy_copy(create_dynamicvit("dynamicvit_deit_tiny", keep_ratio=0.7, depth=2,
                                                      pruning_locations=(1,)).eval(), 0.7), "native")
    with pytest.raises(QuantizationError, match="not in the other graph"):
        transplant_qdq(quantized, other)


def test_quantize_for_export_errors_are_clear(small_graphs):
    _, graphs = small_graphs
    with pytest.raises(QuantizationError, match="do not fit the graph input"):
        quantize_for_export(graphs["native"], np.zeros((4, 3, 32, 32), np.float32), method="ort")
    with pytest.raises(QuantizationError, match="native-selection export"):
        quantize_for_export(graphs["plugin"], np.zeros((4, 3, 64, 64), np.float32), method="ort")
    with pytest.raises(QuantizationError, match="calibrate the float32 export"):
        quantize_for_export(graphs["fp16"], np.zeros((4, 3, 64, 64), np.float32), method="ort")
    with pytest.raises(QuantizationError, match="method must be one of"):
        quantize_for_export(graphs["native"], np.zeros((4, 3, 64, 64), np.float32), method="tensorrt")


def test_modelopt_method_without_modelopt_names_the_install_command(small_graphs):
    from calibration.int8 import modelopt_available

    if modelopt_available():
        pytest.skip("nvidia-modelopt is installed here")
    _, graphs = small_graphs
    with pytest.raises(QuantizationError, match=r"pip install 'nvidia-modelopt\[onnx\]'"):
        quantize_for_export(graphs["native"], np.zeros((4, 3, 64, 64), np.float32), method="modelopt")


def test_int8_tensorrt_engine_runs_the_mixed_float16_qdq_graph(small_graphs, small_int8, tmp_path):
    from export.on_target.environment import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import tensorrt as trt
    from export.on_target.tensorrt_engine import TensorRTRunner, build_engine, plan_engine

    _, graphs = small_graphs
    quantized, _ = small_int8
    deployed = transplant_qdq(quantized, graphs["fp16"])
    onnx.save(deployed, str(tmp_path / "int8.onnx"))
    build_engine(plan_engine(trt.__version__, "int8"), tmp_path / "int8.onnx", tmp_path / "int8.engine",
                 {"dynamic": False, "min": 1, "opt": 1, "max": 1}, "images", (3, 64, 64), None)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).numpy()
    with TensorRTRunner(tmp_path / "int8.engine") as runner:
        logits = runner(images)[0]
    expected = onnxruntime_session(deployed).run(None, {"images": images})[0]
    assert np.isfinite(logits).all() and logits.argmax(1).tolist() == expected.argmax(1).tolist()


# ----------------------------------------------------------------------------- the demo model


def demo_checkpoint() -> Path:
    """The shipped demo model; ``VPD_DEMO_CHECKPOINT`` may point at another model trained on the demo dataset."""
    return Path(os.environ.get("VPD_DEMO_CHECKPOINT") or demo_checkpoint_path())


@pytest.fixture(scope="module")
def demo_int8():
    """The demo model, its calibrated Q/DQ on the float32 graph, the deployed mixed float16 INT8 debug graph, and
    the demo test split."""
    loaded = load_dynamicvit(demo_checkpoint())
    model = loaded.model
    calibration, info = calib_data.load_calibration_data("demo", model, loaded.metadata, num_images=256,
                                                         use_cache=False)
    fp32 = export_onnx(deploy_copy(model, model.keep_ratio), "native")
    int8, report = quantize_for_export(fp32, calibration, method="ort", calibration_info=info)
    mixed = export_onnx(deploy_copy(model, model.keep_ratio, "fp16"), "native", dynamic_batch=True, with_indices=True)
    test = calib_data.load_calibration_set("demo", calib_data.preprocessing_for(model, loaded.metadata), 10**6,
                                           use_cache=False, demo_split="test")
    return model, fp32, int8, report, transplant_qdq(int8, mixed), test


def test_int8_demo_model_keeps_test_accuracy_within_one_point(demo_int8):
    model, fp32, int8, report, _, test = demo_int8
    result = int8_vs_float(fp32, int8, test.images, test.labels)
    print(f"\ndemo model keep {model.keep_ratio}: float32 {result['fp32_top1']:.4f}, INT8 {result['int8_top1']:.4f} "
          f"(drop {result['top1_drop']:.4f}), top-1 agreement {result['top1_agreement']:.4f} on "
          f"{result['images']} test images; {report['qdq']}")
    assert result["top1_drop"] <= DEMO_MAX_TOP1_DROP
    assert result["top1_agreement"] >= 0.97
    assert onnx_logits(int8, test.images[:3]).shape == (3, model.num_classes)


def deployed_vs_pytorch(model, graph: onnx.ModelProto, images: np.ndarray):
    """The export stage's judgement of a reduced-precision debug graph on real images."""
    outputs = run_batched(session_runner(onnxruntime_session(graph)), images)
    reference = pytorch_reference(model, torch.from_numpy(images))
    return compare(reference, outputs, "demo-test", None, REDUCED_PRECISION_MIN_TOP1_AGREEMENT)


def test_deployed_int8_graph_keeps_the_tokens_float32_pytorch_keeps(demo_int8):
    model, _, _, _, deployed, test = demo_int8
    result = deployed_vs_pytorch(model, deployed, test.images)
    print(f"\nmixed float16 + INT8 vs float32 PyTorch on {result.images} demo test images: top-1 agreement "
          f"{result.top1_agreement:.4f}, kept-token overlap per stage {[round(o, 4) for o in result.kept_overlap]}")
    assert result.passed and result.top1_agreement >= REDUCED_PRECISION_MIN_TOP1_AGREEMENT
    assert len(result.kept_overlap) == len(model.config.pruning_locations)
    assert min(result.kept_overlap) >= DEMO_MIN_KEPT_OVERLAP


def test_int8_graph_with_broken_scales_fails_the_agreement_gate(demo_int8):
    model, _, _, _, deployed, test = demo_int8
    broken = onnx.ModelProto()
    broken.CopyFrom(deployed)
    scales = {n.input[1] for n in broken.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for tensor in broken.graph.initializer:
        if tensor.name in scales:
            values = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array((values * BROKEN_SCALE_FACTOR).astype(values.dtype), tensor.name))
    result = deployed_vs_pytorch(model, broken, test.images)
    print(f"\nscales x {BROKEN_SCALE_FACTOR:g}: top-1 agreement {result.top1_agreement:.4f}")
    assert not result.passed and result.top1_agreement < REDUCED_PRECISION_MIN_TOP1_AGREEMENT
