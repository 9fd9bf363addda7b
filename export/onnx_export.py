"""Writing a deploy-ready DynamicViT as ONNX (TorchScript-based exporter: deterministic, opset 17+).

Graph contract: input ``images`` [B, 3, H, W] float32; output ``logits`` [B, classes] float32 (float16
graphs cast at both ends); with ``with_indices`` (debug graphs used by validation) also
``kept_stage{k}`` [B, k_stage] int64, the kept patch positions of every stage on the original grid.
Token counts per stage are static; the batch is static or dynamic.
"""
from __future__ import annotations

import io
import warnings

import onnx
import torch
import torch.nn as nn

from compress.models.dynamicvit import DynamicViTBase, as_float32
from compress.plumbing.cli import package_version
from compress.plumbing.errors import PipelineError
from export.selection import SELECTION_FLAVOURS, native_token_selector, plugin_token_selector

MIN_OPSET = 17  # LayerNormalization is one node from opset 17 on (fp16-safe on TensorRT)


class ExportGraph(nn.Module):
    """images -> logits (and kept positions) with a chosen selection flavour."""

    def __init__(self, model: DynamicViTBase, flavour: str, with_indices: bool):
        super().__init__()
        if flavour not in SELECTION_FLAVOURS:
            raise PipelineError(f"gather flavour must be one of {SELECTION_FLAVOURS}, got {flavour!r}")
        self.model = model
        self.with_indices = with_indices
        self.dtype = next(model.parameters()).dtype  # first parameter: cls_token, float16 in fp16 graphs
        model.token_selector = native_token_selector if flavour == "native" else plugin_token_selector(with_indices)

    def forward(self, images: torch.Tensor):
        if images.dtype != self.dtype:  # float16 graphs take float32 images (a Cast node only where one is needed)
            images = images.to(self.dtype)
        if not self.with_indices:
            return as_float32(self.model.forward_pruned(images))
        logits, kept = self.model.forward_pruned(images, return_indices=True)
        return (as_float32(logits), *kept)


def torchscript_export(module: nn.Module, images: torch.Tensor, opset: int, names: list[str], dynamic_batch: bool,
                       custom_opsets: dict | None = None, strict_shapes: bool = True) -> onnx.ModelProto:
    """``torch.onnx.export`` (TorchScript exporter) of ``module`` on ``images`` (input ``images``, outputs ``names``,
    the batch axis dynamic or not) to a checked, shape-inferred ModelProto named as this tool's.

    Any failure is one line: the exporter's own failures carry the whole TorchScript graph (often 100 KB), so only
    their first line is kept. ``strict_shapes`` False for graphs with custom ops whose shapes ONNX cannot infer.
    """
    dynamic_axes = {name: {0: "batch"} for name in ["images", *names]} if dynamic_batch else None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter warns about its own deprecation and about timm's shape asserts,
            # which are constants for a fixed image size.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (images,), buffer, dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                              custom_opsets=custom_opsets,
                              # PRESERVE (the module is in eval mode) exports the same graph as EVAL but does not
                              # fold BatchNorm into the convolution before it: float32 and float16 graphs (whose
                              # BatchNorm runs in float32 behind a Cast) then share the convolution weights, which
                              # INT8's Q/DQ transplant needs. ONNX Runtime and TensorRT fold it when they build.
                              training=torch.onnx.TrainingMode.PRESERVE)
    except Exception as exc:  # the exporter raises many types; none of them is useful beyond its first line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PipelineError(f"ONNX export failed (opset {opset}): {first_line}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "vit-prune-deploy"
    proto.producer_version = package_version()  # this tool's version (the exporter sets torch's)
    try:
        onnx.checker.check_model(proto)
        return onnx.shape_inference.infer_shapes(proto, strict_mode=strict_shapes)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PipelineError(f"exported ONNX failed onnx.checker/shape inference: {exc}") from None


def output_names(num_stages: int, with_indices: bool) -> list[str]:
    return ["logits"] + ([f"kept_stage{k}" for k in range(1, num_stages + 1)] if with_indices else [])


def export_onnx(
    model: DynamicViTBase,
    flavour: str = "native",
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = MIN_OPSET,
    with_indices: bool = False,
) -> onnx.ModelProto:
    """Export a ``deploy_copy`` of a DynamicViT; returns the checked ModelProto (nothing is written)."""
    if opset < MIN_OPSET:
        raise PipelineError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    graph = ExportGraph(model, flavour, with_indices).eval()
    images = torch.randn(batch_size, *model.image_shape)
    stages = len(model.stage_keep_counts())
    names = output_names(stages, with_indices)
    return torchscript_export(graph, images, opset, names, dynamic_batch,
                              custom_opsets={"trt.plugins": 1} if flavour == "plugin" else None,
                              strict_shapes=flavour == "native")
