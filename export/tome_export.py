"""The export contract of token merging (ToMe), the counterpart of ``export.methods.DynamicViTExport``.

Graph contract: input ``images`` [B, 3, H, W] float32; output ``logits`` [B, classes] float32; the debug twin also
outputs ``merges_block{l}`` [B, r_l] int64 for every block l that merges: one code per merged token, in rank
order, ``source * t_l + destination`` with both as positions in block l's sequence of t_l tokens
(``compress.tome.merge_decisions``). The codes are unique per row, so comparing them as sets checks which tokens
merged where, and in order checks the ranking. Token counts are static; the batch is static or dynamic.

Graph flavours (the merge's row additions; everything else is the same graph):
- ``onehot`` (default): a one-hot MatMul adds the merged tokens into their destinations: no scatter at all;
- ``scatter``: ScatterElements with reduction "add" (opset >= 16; TensorRT runs it through the ScatterElements
  plugin of its plugin library, from TensorRT 10).
Both write the matching (``compress.tome``) as ReduceMin + ArgMin (first minimum: the lower B index), one TopK
ranking the A tokens (ONNX's tie rule: the lower index first, which eager PyTorch's stable sort follows) and one
TopK putting the kept indices in ascending order, and gather rows with GatherND (batch_dims 1): no data-dependent
branch, so PyTorch and ONNX take the same decisions by the same tie rule. In float16 graphs the matching scores,
the merge sums and sizes, the weighted average, the attention softmax and the norms stay float32.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn

from compress.dynamicvit import as_float32
from compress.errors import PipelineError
from compress.tome import (MERGE_FLAVOURS, TIE_RULE, ToMeViT, check_schedule_merges, merges_in_block, parse_r_schedule,
                          token_counts)
from export.deploy import PRECISIONS, with_float32_norms
from export.onnx_export import MIN_OPSET, torchscript_export
from export.tensorrt_engine import minimum_version_problem

Reference = tuple[np.ndarray, list[np.ndarray]]
MIN_SCATTER_OPSET = 16  # ScatterElements' "add" reduction; torch writes an overwriting scatter below it
# The oldest TensorRT that builds each flavour: one-hot graphs use native layers only (the project's engine path
# starts at 10); ScatterElements with a reduction goes through the ScatterElements plugin, shipped from 10.
MIN_TENSORRT_VERSION = {"onehot": "10.0", "scatter": "10.0"}


class ToMeExportError(PipelineError):
    """An export request the ToMe graphs cannot meet (flavour, opset, TensorRT version)."""


def check_flavour(flavour: str) -> str:
    if flavour not in MERGE_FLAVOURS:
        raise ToMeExportError(f"ToMe graph flavour must be one of {', '.join(MERGE_FLAVOURS)}, got {flavour!r}")
    return flavour


def check_tensorrt_version(flavour: str, version: str) -> None:
    """ToMeExportError when TensorRT ``version`` ('10.3.0.30') is older than the flavour's minimum."""
    manifest = {"gather": check_flavour(flavour), "method": {"min_tensorrt_version": MIN_TENSORRT_VERSION}}
    problem = minimum_version_problem(manifest, version)
    if problem:
        raise ToMeExportError(f"ToMe: {problem}")


def to_mixed_float16(model: ToMeViT) -> ToMeViT:
    """Float16 weights and activations; the norms compute in float32 (the merge's scores and averages already do)."""
    return with_float32_norms(model.half())


class ToMeGraph(nn.Module):
    """images float32 -> logits float32 (and the merge codes of every merging block) with one flavour."""

    def __init__(self, model: ToMeViT, flavour: str, with_debug: bool):
        super().__init__()
        self.model = model
        self.with_debug = with_debug
        self.dtype = model.cls_token.dtype
        model.merge_flavour = check_flavour(flavour)

    def forward(self, images: torch.Tensor):
        if images.dtype != self.dtype:  # float16 graphs take float32 images (a Cast only where one is needed)
            images = images.to(self.dtype)
        logits, decisions = self.model.forward_with_decisions(images)
        return (as_float32(logits), *decisions) if self.with_debug else as_float32(logits)


def merging_blocks(num_tokens: int, schedule: Sequence[int]) -> list[int]:
    """The blocks that merge at least one token."""
    counts = token_counts(num_tokens, schedule)
    return [block for block, r in enumerate(schedule) if merges_in_block(counts[block], r) > 0]


def export_module(graph: nn.Module, images: torch.Tensor, output_names: list[str], dynamic_batch: bool,
                  opset: int) -> onnx.ModelProto:
    """TorchScript ONNX export of ``graph`` on ``images`` (input ``images``), checked and shape-inferred."""
    return torchscript_export(graph, images, opset, output_names, dynamic_batch)


class ToMeExport:
    """ToMe exported at a fixed r schedule (an int: the same r in every block, or one r per block)."""

    name = "tome"
    flavours = MERGE_FLAVOURS
    # INT8 leaves the merges in float: their scores decide which tokens merge (``compress.tome.TokenMerge``).
    float_scopes: tuple[str, ...] = ("/token_merge",)

    def __init__(self, r: int | Sequence[int]):
        self.r = r if isinstance(r, int) else tuple(r)

    def schedule(self, model: ToMeViT) -> tuple[int, ...]:
        """The r of every block; ToMeError for an r the model's token count cannot merge."""
        schedule = parse_r_schedule(self.r, len(model.blocks))
        check_schedule_merges(model.num_patches + 1, schedule)
        return schedule

    def deploy_copy(self, model: ToMeViT, precision: str) -> ToMeViT:
        """An eval-mode copy at this r (``model`` is left unchanged); float16 "mixed" for precision fp16."""
        if precision not in PRECISIONS:
            raise ToMeExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        deployed = copy.deepcopy(model).eval()
        deployed.r_schedule = self.schedule(model)
        for parameter in deployed.parameters():
            parameter.requires_grad_(False)
        return to_mixed_float16(deployed) if precision == "fp16" else deployed

    def graph(self, deployed: ToMeViT, flavour: str, with_debug: bool) -> nn.Module:
        return ToMeGraph(deployed, flavour, with_debug).eval()

    def debug_output_names(self, model: ToMeViT) -> list[str]:
        return [f"merges_block{block}" for block in merging_blocks(model.num_patches + 1, self.schedule(model))]

    def export_onnx(self, deployed: ToMeViT, flavour: str, batch_size: int, dynamic_batch: bool, opset: int,
                    with_debug: bool) -> onnx.ModelProto:
        """A checked ModelProto of ``deployed`` (a ``deploy_copy``); nothing is written."""
        if opset < MIN_OPSET:
            raise ToMeExportError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
        if flavour == "scatter" and opset < MIN_SCATTER_OPSET:
            raise ToMeExportError(f"the scatter flavour needs opset >= {MIN_SCATTER_OPSET} (ScatterElements 'add')")
        graph = self.graph(copy.deepcopy(deployed), flavour, with_debug)
        names = ["logits", *(self.debug_output_names(deployed) if with_debug else [])]
        images = torch.randn(batch_size, *deployed.image_shape)
        return export_module(graph, images, names, dynamic_batch, opset)

    def reference(self, model: ToMeViT) -> Callable[[torch.Tensor], Reference]:
        """Float32 eager PyTorch at this r: images -> (logits, [merge codes per merging block])."""
        reference_model = self.deploy_copy(model, "fp32")

        def run(images: torch.Tensor) -> Reference:
            with torch.no_grad():
                logits, decisions = reference_model.forward_with_decisions(images.float())
            return logits.numpy(), [d.numpy() for d in decisions]

        return run

    def describe(self, model: ToMeViT) -> dict:
        schedule = self.schedule(model)
        counts = model.token_counts(schedule)
        return {
            "method": self.name,
            "r": self.r if isinstance(self.r, int) else list(self.r),
            "r_schedule": list(schedule),
            "merges_per_block": [before - after for before, after in zip(counts, counts[1:])],
            "tokens_per_block": counts,
            "proportional_attention": True,
            "tie_rule": TIE_RULE,
            "min_tensorrt_version": dict(MIN_TENSORRT_VERSION),
        }

    def macs(self, model: ToMeViT) -> int:
        return model.macs(self.schedule(model))
