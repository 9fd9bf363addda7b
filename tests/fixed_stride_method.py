"""A third token-reduction method, defined in the test tree only: fixed-stride pruning.

After block ``after_block`` the sequence keeps CLS and every ``stride``-th patch token (positions 0, stride,
2 * stride, ...): no scores, no data-dependent choice. It is here to prove that the export pipeline
(``export.api.export_model``) takes a method it has never heard of through the contract of ``export.methods``
alone: options that check and prepare themselves, and a contract that deploys, exports, references, describes and
counts. docs/architecture.md walks through it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import onnx
import torch
import torch.nn as nn

from compress.models.complexity import block_macs
from compress.models.dynamicvit import DynamicViT
from export.errors import ExportError
from export.onnx_export import torchscript_export
from export.subject import ExportSubject, load_subject


class FixedStridePruned(nn.Module):
    """images [B, 3, H, W] -> logits [B, classes] (and, for the debug twin, the kept patch positions [B, n] int64)."""

    def __init__(self, model: DynamicViT, stride: int, after_block: int, with_debug: bool = False):
        super().__init__()
        self.model, self.after_block, self.with_debug = model, after_block, with_debug
        kept = torch.arange(0, model.num_patches, stride)
        self.register_buffer("kept", kept, persistent=False)
        self.register_buffer("rows", torch.cat([torch.zeros(1, dtype=torch.long), kept + 1]), persistent=False)

    def forward(self, images: torch.Tensor):
        x = self.model.embed(images)
        for index, block in enumerate(self.model.blocks):
            if index == self.after_block:
                x = x[:, self.rows]  # CLS (row 0) and the kept patch rows
            x = self.model.run_block(block, x)
        logits = self.model.classify(self.model.norm(x))
        return (logits, self.kept.expand(images.shape[0], -1)) if self.with_debug else logits


class FixedStrideExport:
    """The contract of ``export.methods`` for fixed-stride pruning (float32 graphs only)."""

    name = "fixed-stride"
    flavours = ("gather",)
    float_scopes: tuple[str, ...] = ()
    keep_ratio = None
    decisions = "kept tokens"

    def __init__(self, stride: int, after_block: int):
        self.stride, self.after_block = stride, after_block

    @property
    def degree_tag(self) -> str:
        return f"stride{self.stride}"

    def kept(self, model: DynamicViT) -> int:
        return len(range(0, model.num_patches, self.stride))

    def deploy_copy(self, model: DynamicViT, precision: str) -> FixedStridePruned:
        if precision != "fp32":
            raise ExportError(f"{self.name} writes float32 graphs only, not {precision}")
        return FixedStridePruned(copy.deepcopy(model).eval(), self.stride, self.after_block).eval()

    def export_onnx(self, deployed: FixedStridePruned, flavour: str, batch_size: int, dynamic_batch: bool, opset: int,
                    with_debug: bool) -> onnx.ModelProto:
        graph = FixedStridePruned(deployed.model, self.stride, self.after_block, with_debug).eval()
        names = ["logits", *(self.debug_output_names(deployed.model) if with_debug else [])]
        return torchscript_export(graph, torch.randn(batch_size, *deployed.model.image_shape), opset, names,
                                  dynamic_batch)

    def debug_output_names(self, model: DynamicViT) -> list[str]:
        return ["kept_patches"]

    def reference(self, model: DynamicViT) -> Callable[[torch.Tensor], tuple[np.ndarray, list[np.ndarray]]]:
        graph = FixedStridePruned(model, self.stride, self.after_block, with_debug=True).eval()

        def run(images: torch.Tensor):
            with torch.no_grad():
                logits, kept = graph(images.float())
            return logits.numpy(), [kept.numpy()]

        return run

    def describe(self, model: DynamicViT) -> dict:
        return {"method": self.name, "stride": self.stride, "after_block": self.after_block,
                "patches": model.num_patches, "kept_per_stage": [self.kept(model)]}

    def degree_text(self, model: DynamicViT) -> str:
        return f"at stride {self.stride} after block {self.after_block} (patch tokens {model.num_patches} -> {self.kept(model)})"

    def macs(self, model: DynamicViT) -> int:
        shape = model.cost_shape()
        tokens = [shape.num_patches + 1 if block < self.after_block else self.kept(model) + 1
                  for block in range(shape.depth)]
        return shape.stem_macs + sum(block_macs(n, shape.embed_dim, shape.mlp_hidden) for n in tokens) + shape.head_macs


@dataclass(frozen=True)
class FixedStrideOptions:
    """Keep CLS and every ``stride``-th patch token from block ``after_block`` on."""

    stride: int = 2
    after_block: int = 2
    name: ClassVar[str] = FixedStrideExport.name

    @property
    def flavour(self) -> str:
        return FixedStrideExport.flavours[0]

    def check(self, request, engines_here: bool) -> None:
        if self.stride < 1:
            raise ExportError(f"{self.name}: stride must be >= 1, got {self.stride}")
        if request.fp16 or request.int8:
            raise ExportError(f"{self.name} writes float32 graphs only (no --fp16 / --int8)")

    def prepare(self, request) -> tuple[ExportSubject, FixedStrideExport, None]:
        if request.tocom is not None:
            raise ExportError(f"{self.name} has no ToCom plugins (its degree is not on any plugin's grid)")
        subject = load_subject(request.checkpoint, request.model)
        if not 0 <= self.after_block < len(subject.model.blocks):
            raise ExportError(f"{self.name}: after_block must be a block of the model (0..{len(subject.model.blocks) - 1}), "
                              f"got {self.after_block}")
        return subject, FixedStrideExport(self.stride, self.after_block), None
