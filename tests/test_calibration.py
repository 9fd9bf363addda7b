"""Calibration data, INT8 Q/DQ placement, Q/DQ transplant onto the debug twin and plugin flavour, demo accuracy."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calibration import data as calib_data
from calibration.int8 import (
    Int8Options,
    QuantizationError,
    count_qdq,
    plan_placement,
    qdq_chains,
    qdq_signature,
    quantize_for_export,
    transplant_qdq,
)
from compress import create_dynamicvit
from compress.errors import PipelineError
from export.deploy import deploy_copy
from export.evaluate import int8_vs_float, onnx_logits
from export.onnx_export import export_onnx
from export.validate import compare, onnxruntime_session, pytorch_reference

DEMO_LIKE = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10,
                 pruning_locations=(1, 3, 5))
DEMO_MAX_TOP1_DROP = 0.01  # one percentage point (a fraction) on the demo test split


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
    assert any("prediction module" in r for r in reasons) and any("attention" in r for r in reasons)
    # 6 blocks x (qkv, proj, fc1, fc2) + patch embedding + head
    assert len(placement.quantize) == 6 * 4 + 2
    everything = plan_placement(graphs["native"], Int8Options(quantize_predictors=True, quantize_attention=True))
    assert not everything.kept_float


def test_ort_int8_is_symmetric_per_channel_and_leaves_accuracy_critical_ops_float(small_graphs, small_int8):
    _, graphs = small_graphs
    quantized, report = small_int8
    assert report["method"] == "ort" and report["calibration_set"] == {"hash": "h", "size": 64, "source": "demo"}
    assert report["qdq"]["quantized_nodes"] == len(report["quantized_nodes"]) == 26
    for op in ("Add", "LayerNormalization", "Softmax", "TopK", "GatherElements"):
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
        if name.endswith("debug"):  # the kept tokens can be compared with PyTorch's
            result = compare(pytorch_reference(model, images[:1]), outputs, "random", None)
            assert result.top1_agreement in (0.0, 1.0) and len(outputs) == 4


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
    with pytest.raises(QuantizationError, match="method must be one of"):
        quantize_for_export(graphs["native"], np.zeros((4, 3, 64, 64), np.float32), method="tensorrt")


def test_modelopt_method_without_modelopt_names_the_install_command(small_graphs):
    from calibration.int8 import modelopt_available

    if modelopt_available():
        pytest.skip("nvidia-modelopt is installed here")
    _, graphs = small_graphs
    with pytest.raises(QuantizationError, match=r"pip install 'nvidia-modelopt\[onnx\]'"):
        quantize_for_export(graphs["native"], np.zeros((4, 3, 64, 64), np.float32), method="modelopt")


def test_int8_tensorrt_engine_builds_from_the_qdq_graph(small_int8, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from export.tensorrt_engine import build_engine, plan_engine

    quantized, _ = small_int8
    onnx.save(quantized, str(tmp_path / "int8.onnx"))
    plan = plan_engine(tmp_path / "int8.onnx", None, False)
    facts = build_engine(plan, tmp_path / "int8.engine", (1, 1, 1), (3, 64, 64), tmp_path / "cache", False)
    assert (tmp_path / "int8.engine").stat().st_size > 0 and facts["tensorrt"]


# ----------------------------------------------------------------------------- the demo model


def demo_checkpoint() -> Path | None:
    """The shipped demo model; ``VPD_DEMO_CHECKPOINT`` may point at another model trained on the demo dataset."""
    if os.environ.get("VPD_DEMO_CHECKPOINT"):
        return Path(os.environ["VPD_DEMO_CHECKPOINT"])
    try:
        from compress.demo import demo_checkpoint_path
    except ImportError:
        return None
    path = Path(demo_checkpoint_path())
    return path if path.is_file() else None


@pytest.mark.skipif(demo_checkpoint() is None, reason="the demo model is not shipped in this checkout yet")
def test_int8_demo_model_keeps_test_accuracy_within_one_point():
    from compress.checkpoint import load_dynamicvit

    loaded = load_dynamicvit(demo_checkpoint())
    model = loaded.model
    calibration, info = calib_data.load_calibration_data("demo", model, loaded.metadata, num_images=256,
                                                         use_cache=False)
    fp32 = export_onnx(deploy_copy(model, model.keep_ratio), "native")
    int8, report = quantize_for_export(fp32, calibration, method="ort", calibration_info=info)
    test = calib_data.load_calibration_set("demo", calib_data.preprocessing_for(model, loaded.metadata), 10**6,
                                           use_cache=False, demo_split="test")
    result = int8_vs_float(fp32, int8, test.images, test.labels)
    print(f"\ndemo model keep {model.keep_ratio}: float32 {result['fp32_top1']:.4f}, INT8 {result['int8_top1']:.4f} "
          f"(drop {result['top1_drop']:.4f}), top-1 agreement {result['top1_agreement']:.4f} on "
          f"{result['images']} test images; {report['qdq']}")
    assert result["top1_drop"] <= DEMO_MAX_TOP1_DROP
    assert result["top1_agreement"] >= 0.97
    assert onnx_logits(int8, test.images[:3]).shape == (3, model.num_classes)
