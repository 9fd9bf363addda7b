"""The export contract of a token-reduction method, and DynamicViT's implementation of it.

The export pipeline (``export.api``) knows no method by name: everything that differs between methods is a step
of the method, so a new method (token merging: ``export.tome_export``; a worked example: docs/architecture.md)
plugs in without editing the pipeline, validation or quantisation. A method has two parts.

Its **options** (``MethodOptions``), a frozen value that ``ExportRequest.method`` carries (``DynamicViTOptions(keep,
gather)``, ``ToMeOptions(r, r_train, flavour)``):

- ``name``; ``flavour``: the graph flavour asked for (one of the contract's ``flavours``);
- ``check(request, engines_here)``: refuse bad or idle options before any work (``ExportError``, one line);
  ``engines_here``: TensorRT engines will be built on this machine;
- ``prepare(request) -> (subject, contract, tocom entry or None)``: load the subject (``export.subject``), resolve
  the degree, merge a ToCom plugin (``request.tocom``, ``request.tocom_scale``) into a copy of its weights.

Its **contract** (``ExportContract``), built by ``prepare`` at the resolved degree:

- ``name``; ``flavours``: the graph flavours it can write (the first is the default); ``float_scopes``: ONNX node
  name scopes that INT8 quantisation leaves in floating point;
- ``degree_tag``: the degree in the default output folder's name (``keep0.6``, ``r8``); ``keep_ratio``: the
  manifest's ``keep_ratio`` (None for a method without one); ``decisions``: what its debug outputs are, in words;
- ``deploy_copy(model, precision)``: an eval-mode copy at the export's degree; never modifies ``model``;
- ``export_onnx(deployed, flavour, batch_size, dynamic_batch, opset, with_debug)`` -> a checked ModelProto whose
  outputs are ``logits`` [B, classes] float32 and, with ``with_debug``, ``debug_output_names(model)`` (int64
  [B, n] each: the decisions that are compared as sets per row and in order);
- ``reference(model)`` -> ``images -> (logits, [debug arrays])``: float32 PyTorch, the ground truth;
- ``describe(model)`` -> the manifest's method entry (``method``, the degree, tokens per stage or block);
  ``degree_text(model)``: the degree in the summary's words; ``macs(model)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import numpy as np
import onnx
import torch

import trt_plugins
from compress.models.complexity import analytic_macs
from compress.models.dynamicvit import DynamicViTBase
from compress.models.tocom_files import merge_plugin_file
from compress.models.token_select import TIE_RULE
from export.deploy import deploy_copy
from export.errors import ExportError
from export.onnx_export import export_onnx, output_names
from export.selection import SELECTION_FLAVOURS
from export.subject import ExportSubject, load_subject, with_model_copy

Reference = tuple[np.ndarray, list[np.ndarray]]


class ExportContract(Protocol):
    """What the pipeline asks of a method at its resolved degree (see the module docstring)."""

    name: str
    flavours: tuple[str, ...]
    float_scopes: tuple[str, ...]
    degree_tag: str
    keep_ratio: float | None
    decisions: str

    def deploy_copy(self, model, precision: str): ...
    def export_onnx(self, deployed, flavour: str, batch_size: int, dynamic_batch: bool, opset: int,
                    with_debug: bool) -> onnx.ModelProto: ...
    def debug_output_names(self, model) -> list[str]: ...
    def reference(self, model) -> Callable[[torch.Tensor], Reference]: ...
    def describe(self, model) -> dict: ...
    def degree_text(self, model) -> str: ...
    def macs(self, model) -> int: ...


class MethodOptions(Protocol):
    """A method's options, as ``ExportRequest.method`` carries them (see the module docstring)."""

    name: ClassVar[str]
    runtime_refusals: ClassVar[dict]  # {flavour: {runtime key ("rtx"): why that runtime cannot build it}}

    @property
    def flavour(self) -> str: ...
    def check(self, request, engines_here: bool) -> None: ...
    def prepare(self, request) -> tuple[ExportSubject, ExportContract, dict | None]: ...


# --- DynamicViT ------------------------------------------------------------------------------------------------------


# Runtimes that cannot build a flavour, and why ({flavour: {runtime key: reason}}): refused before any work.
DYNAMICVIT_RUNTIME_REFUSALS = {
    "plugin": {"rtx": "it has no plugin layer, and its ONNX parser aborts the whole process on a TokenGather node "
                      "(use --gather native)"},
}


class DynamicViTExport:
    """DynamicViT (any family: timm DeiT, LV-ViT) exported at a keep ratio with deterministic top-k."""

    name = "dynamicvit"
    flavours = SELECTION_FLAVOURS
    runtime_refusals = DYNAMICVIT_RUNTIME_REFUSALS
    # The prediction modules' scores choose the kept tokens: quantising them changes which tokens survive.
    float_scopes = ("/score_predictor",)
    decisions = "kept tokens"

    def __init__(self, keep_ratio: float):
        self.keep_ratio = float(keep_ratio)

    @property
    def degree_tag(self) -> str:
        return f"keep{self.keep_ratio:g}"

    def deploy_copy(self, model: DynamicViTBase, precision: str) -> DynamicViTBase:
        return deploy_copy(model, self.keep_ratio, precision)

    def export_onnx(self, deployed: DynamicViTBase, flavour: str, batch_size: int, dynamic_batch: bool, opset: int,
                    with_debug: bool) -> onnx.ModelProto:
        return export_onnx(deployed, flavour, batch_size, dynamic_batch, opset, with_indices=with_debug)

    def debug_output_names(self, model: DynamicViTBase) -> list[str]:
        return output_names(len(model.stage_keep_counts(self.keep_ratio)), True)[1:]

    def reference(self, model: DynamicViTBase) -> Callable[[torch.Tensor], Reference]:
        reference_model = model.eval()

        def run(images: torch.Tensor) -> Reference:
            with torch.no_grad():
                logits, kept = reference_model.forward_pruned(images, return_indices=True, keep_ratio=self.keep_ratio)
            return logits.numpy(), [k.numpy() for k in kept]

        return run

    def describe(self, model: DynamicViTBase) -> dict:
        return {
            "method": self.name,
            "keep_ratio": self.keep_ratio,
            "patches": model.num_patches,
            "kept_per_stage": model.stage_keep_counts(self.keep_ratio),
            "stages_before_blocks": list(model.config.pruning_locations),
            "tie_rule": TIE_RULE,
            "runtime_refusals": self.runtime_refusals,
        }

    def degree_text(self, model: DynamicViTBase) -> str:
        return f"at keep {self.keep_ratio:g} (patch tokens {model.num_patches} -> {model.stage_keep_counts(self.keep_ratio) or 'dense'})"

    def macs(self, model: DynamicViTBase) -> int:
        return analytic_macs(model.cost_shape(), self.keep_ratio)


def with_tocom(subject: ExportSubject, plugin: Path, keep: float, scale: float | None) -> tuple[ExportSubject, dict]:
    """A copy of the subject with ToCom(rho_train -> keep) folded into its qkv weights; and the manifest entry."""
    if subject.rho_train is None:
        raise ExportError("--tocom needs the keep ratio the model was trained at, and this checkpoint does not "
                          "record it (use a checkpoint written by compress.train)")
    merged = with_model_copy(subject)
    return merged, merge_plugin_file(merged.model, plugin, keep, scale)


@dataclass(frozen=True)
class DynamicViTOptions:
    """DynamicViT token pruning: ``keep`` the keep ratio rho (None: the checkpoint's training keep ratio),
    ``gather`` the token selection in the graph (``native`` TopK + GatherND, or the ``plugin`` TokenGather)."""

    keep: float | None = None
    gather: str = "native"
    name: ClassVar[str] = DynamicViTExport.name
    runtime_refusals: ClassVar[dict] = DYNAMICVIT_RUNTIME_REFUSALS

    @property
    def flavour(self) -> str:
        return self.gather

    def check(self, request, engines_here: bool) -> None:
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ExportError(f"--keep must be in (0, 1], got {self.keep}")
        if self.gather not in SELECTION_FLAVOURS:
            raise ExportError(f"--gather must be one of {SELECTION_FLAVOURS}, got {self.gather!r}")
        if engines_here and self.gather == "plugin":
            trt_plugins.find_plugin_library()  # before any work: a missing library names its build command

    def prepare(self, request) -> tuple[ExportSubject, DynamicViTExport, dict | None]:
        subject = load_subject(request.checkpoint, request.model)
        if self.keep is not None:  # the loader's "no training keep ratio recorded" note does not apply
            subject = replace(subject, notes=[note for note in subject.notes if "no training keep ratio" not in note])
        keep = self.keep if self.keep is not None else subject.model.keep_ratio
        subject.model.stage_keep_counts(keep)  # a keep that keeps no token: refused before any work
        tocom = None
        if request.tocom is not None:
            subject, tocom = with_tocom(subject, request.tocom, keep, request.tocom_scale)
        return subject, DynamicViTExport(keep), tocom


DEFAULT_METHOD: MethodOptions = DynamicViTOptions()  # what an ExportRequest exports when it names no method
