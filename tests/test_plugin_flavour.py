"""The TokenGather plugin flavour of a whole exported model, against the native flavour, with a dynamic batch.

Both graphs run on ONNX Runtime's CPU provider (TokenGather through the onnxruntime-extensions custom op) at
batches other than the one traced, so a batch size frozen into the plugin's output shapes would show here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.int8 import quantize_for_export, transplant_qdq
from compress import create_dynamicvit
from export.deploy import deploy_copy
from export.onnx_export import export_onnx
from export.validate import onnxruntime_session, pytorch_reference
from trt_plugins import ONNX_DOMAIN, PLUGIN_NAME

pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions not installed")

KEEP = 0.7
TRACED_BATCH = 2  # the profile's OPT in export.build; the checks below run at other batches
CHECKED_BATCHES = (1, 5)
# The two flavours compute the same float operations on the same tokens (the gather is an exact copy),
# so float32 logits may differ only by ONNX Runtime's kernel choices; float16 graphs (INT8: float16 + Q/DQ)
# by float16 rounding.
LOGIT_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "int8": 1e-2}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_dynamicvit("dynamicvit_deit_tiny", keep_ratio=KEEP, img_size=64).eval()


def dynamic_graph(model, flavour: str, precision: str):
    return export_onnx(deploy_copy(model, KEEP, precision), flavour, batch_size=TRACED_BATCH, dynamic_batch=True,
                       with_indices=True)


def int8_graphs(model):
    """Q/DQ calibrated on the float32 native graph, placed on the mixed float16 native and plugin graphs."""
    images = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    quantized, _ = quantize_for_export(dynamic_graph(model, "native", "fp32"), images, method="ort")
    return (transplant_qdq(quantized, dynamic_graph(model, "native", "fp16")),
            transplant_qdq(quantized, dynamic_graph(model, "plugin", "fp16")))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plugin_flavour_with_dynamic_batch_equals_native(model, precision):
    if precision == "int8":
        native, plugin = int8_graphs(model)
    else:
        native, plugin = dynamic_graph(model, "native", precision), dynamic_graph(model, "plugin", precision)
    gathers = [n for n in plugin.graph.node if n.op_type == PLUGIN_NAME and n.domain == ONNX_DOMAIN]
    assert len(gathers) == len(model.config.pruning_locations)
    assert plugin.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    native_session, plugin_session = onnxruntime_session(native), onnxruntime_session(plugin)
    generator = torch.Generator().manual_seed(5)
    for batch in CHECKED_BATCHES:
        images = torch.randn(batch, 3, 64, 64, generator=generator)
        native_out = native_session.run(None, {"images": images.numpy()})
        plugin_out = plugin_session.run(None, {"images": images.numpy()})
        assert plugin_out[0].shape == (batch, model.num_classes)
        np.testing.assert_allclose(plugin_out[0], native_out[0], rtol=0, atol=LOGIT_TOLERANCE[precision])
        for stage, (got, expected) in enumerate(zip(plugin_out[1:], native_out[1:]), start=1):
            np.testing.assert_array_equal(got, expected, err_msg=f"batch {batch}, stage {stage}")
        if precision == "fp32":  # and both keep the tokens float32 PyTorch keeps
            _, reference_kept = pytorch_reference(model, images)
            for got, expected in zip(plugin_out[1:], reference_kept):
                np.testing.assert_array_equal(got, expected)
