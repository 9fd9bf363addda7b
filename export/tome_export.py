"""The export contract of token merging (ToMe), the counterpart of ``export.methods.DynamicViTExport``.

Graph contract: input ``images`` [B, 3, H, W] float32; output ``logits`` [B, classes] float32; the debug twin also
outputs ``merges_block{l}`` [B, r_l] int64 for every block l that merges: one code per merged token, in rank
order, ``source * t_l + destination`` with both as positions in block l's sequence of t_l tokens
(``compress.models.tome.merge_decisions``). The codes are unique per row, so comparing them as sets checks which tokens
merged where, and in order checks the ranking. Token counts are static; the batch is static or dynamic.

Graph flavours (the merge's row additions; everything else is the same graph):
- ``onehot`` (default): a one-hot MatMul adds the merged tokens into their destinations: no scatter at all;
- ``scatter``: ScatterElements with reduction "add" (opset >= 16; TensorRT runs it through the ScatterElements
  plugin of its plugin library, from TensorRT 10).
Both write the matching (``compress.models.tome``) as ReduceMin + ArgMin (first minimum: the lower B index), one TopK
ranking the A tokens (ONNX's tie rule: the lower index first, which eager PyTorch's stable sort follows) and one
TopK putting the kept indices in ascending order, and gather rows with GatherND (batch_dims 1): no data-dependent
branch, so PyTorch and ONNX take the same decisions by the same tie rule. In float16 graphs the matching scores,
the merge sums and sizes, the weighted average, the attention softmax and the norms stay float32.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn

from compress.models.dynamicvit import as_float32
from compress.models.tocom_files import merge_tome_plugin_file
from compress.models.tome import (MERGE_FLAVOURS, TIE_RULE, ToMeViT, check_schedule_merges, create_tome, load_tome,
                                  merges_in_block, parse_r_schedule, token_counts)
from compress.plumbing.errors import PipelineError
from export.deploy import PRECISIONS, with_float32_norms
from export.errors import ExportError
from export.onnx_export import MIN_OPSET, torchscript_export
from export.subject import ExportSubject, demo_subject, seeded_random_weights, with_model_copy
from export.on_target.tensorrt_engine import minimum_version_problem

Reference = tuple[np.ndarray, list[np.ndarray]]
MIN_SCATTER_OPSET = 16  # ScatterElements' "add" reduction; torch writes an overwriting scatter below it
# The oldest TensorRT that builds each flavour: one-hot graphs use native layers only (the project's engine path
# starts at 10); ScatterElements with a reduction goes through the ScatterElements plugin, shipped from 10.
MIN_TENSORRT_VERSION = {"onehot": "10.0", "scatter": "10.0"}
# TensorRT-RTX ships no plugin library, and its parser refuses ScatterElements with a reduction ("Unsupported
# reduction type", TensorRT-RTX 1.7.1): the scatter flavour cannot be built there.
RUNTIME_REFUSALS = {"scatter": {"rtx": "its ONNX parser refuses ScatterElements with a reduction (it ships no "
                                       "ScatterElements plugin; use --tome-flavour onehot)"}}


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
    # INT8 leaves the merges in float: their scores decide which tokens merge (``compress.models.tome.TokenMerge``).
    float_scopes: tuple[str, ...] = ("/token_merge",)
    decisions = "merges"
    keep_ratio = None  # ToMe's degree is r; the manifest's keep_ratio stays empty

    def __init__(self, r: int | Sequence[int]):
        self.r = r if isinstance(r, int) else tuple(r)

    @property
    def r_entry(self) -> int | list[int]:
        """r as the manifest and the summary state it: one int, or one r per block."""
        return self.r if isinstance(self.r, int) else list(self.r)

    @property
    def degree_tag(self) -> str:
        return f"r{self.r}" if isinstance(self.r, int) else "r" + "-".join(map(str, self.r))

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
            "r": self.r_entry,
            "r_schedule": list(schedule),
            "merges_per_block": [before - after for before, after in zip(counts, counts[1:])],
            "tokens_per_block": counts,
            "proportional_attention": True,
            "tie_rule": TIE_RULE,
            "min_tensorrt_version": dict(MIN_TENSORRT_VERSION),
            "runtime_refusals": RUNTIME_REFUSALS,
        }

    def degree_text(self, model: ToMeViT) -> str:
        counts = model.token_counts(self.schedule(model))
        return f"at r {self.r_entry} (tokens {counts[0]} -> {counts[-1]})"

    def macs(self, model: ToMeViT) -> int:
        return model.macs(self.schedule(model))


def load_tome_subject(checkpoint: Path | None, model_name: str | None, r: int) -> ExportSubject:
    """A ToMe model at ``r`` from a timm/DeiT checkpoint (or a DynamicViT's backbone); else the demo ViT's
    backbone with its test images; else ``model_name`` with seeded random weights."""
    if checkpoint is not None:
        model, notes = load_tome(checkpoint, r, model_name)
        return ExportSubject(model, Path(checkpoint).stem, str(checkpoint), False, notes, None)
    if model_name is None:
        demo = demo_subject()
        model, notes = load_tome(demo.source, r)
        return replace(demo, model=model, label="demo-tome", notes=notes)
    seeded_random_weights()
    return ExportSubject(create_tome(model_name, r), f"{model_name}-tome-random",
                         f"{model_name} (random weights)", True, [], None)


def with_tome_tocom(subject: ExportSubject, plugin: Path, r_train: int, r: int,
                    scale: float | None) -> tuple[ExportSubject, dict]:
    """A copy of a ToMe subject with ToCom(r_train -> r) folded into its qkv weights; and the manifest entry."""
    merged = with_model_copy(subject)
    return merged, merge_tome_plugin_file(merged.model, plugin, r_train, r, scale)


@dataclass(frozen=True)
class ToMeOptions:
    """Token merging (ToMe): ``r`` tokens merged per block, on a plain timm/DeiT checkpoint fine-tuned at
    ``r_train`` (the source degree of a ToCom merge; None: 0); ``flavour``: how merged rows are added."""

    r: int
    r_train: int | None = None
    flavour: str = MERGE_FLAVOURS[0]
    name: ClassVar[str] = ToMeExport.name
    runtime_refusals: ClassVar[dict] = RUNTIME_REFUSALS

    def check(self, request, engines_here: bool) -> None:
        if self.flavour not in MERGE_FLAVOURS:
            raise ExportError(f"--tome-flavour must be one of {MERGE_FLAVOURS}, got {self.flavour!r}")
        if self.r < 0 or (self.r_train or 0) < 0:
            raise ExportError(f"--tome-r and --tome-r-train must be >= 0, got {self.r} and {self.r_train}")
        if self.r_train is not None and request.tocom is None:
            raise ExportError("--tome-r-train does nothing without --tocom (it is the source degree of the ToCom merge)")

    def prepare(self, request) -> tuple[ExportSubject, ToMeExport, dict | None]:
        subject = load_tome_subject(request.checkpoint, request.model, self.r)
        method, tocom = ToMeExport(self.r), None
        method.schedule(subject.model)  # an r the token count cannot merge: refused before any work
        if request.tocom is not None:
            subject, tocom = with_tome_tocom(subject, request.tocom, self.r_train or 0, self.r, request.tocom_scale)
        return subject, method, tocom
