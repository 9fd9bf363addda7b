"""Small facts read from an ONNX graph, shared by calibration and export (needs onnx only: no torch, no runtime)."""
from __future__ import annotations

import onnx

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size of the graph's first input, or None when the batch axis is dynamic (or unknown)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (ai.onnx) operator set the graph imports."""
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, for every tensor whose type the graph states or shape inference finds.

    Unknown tensors (outputs of ops shape inference does not know, such as custom-domain nodes without stated
    types) are absent.
    """
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.input, *inferred.value_info, *inferred.output) if v.type.tensor_type.elem_type}
    types.update({i.name: i.data_type for i in inferred.initializer})
    for node in inferred.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types
