"""The export contract of a token-reduction method, and DynamicViT's implementation of it.

The export pipeline (``export.api``) knows nothing about a method beyond this contract, so a new method (token
merging: ``export.tome_export.ToMeExport``) or a new backbone family of an existing one (LV-ViT, through
``compress.dynamicvit.DynamicViTBase``) plugs in without editing the pipeline, validation or quantisation:

- ``name``; ``flavours``: the graph flavours it can write (the first is the default); ``float_scopes``: ONNX node
  name scopes that INT8 quantisation leaves in floating point;
- ``deploy_copy(model, precision)``: an eval-mode copy at the export's degree (keep ratio, r); never modifies
  ``model``;
- ``export_onnx(deployed, flavour, batch_size, dynamic_batch, opset, with_debug)`` -> a checked ModelProto whose
  outputs are ``logits`` [B, classes] float32 and, with ``with_debug``, ``debug_output_names(model)`` (int64
  [B, n] each: the decisions that are compared as sets per row and in order);
- ``reference(model)`` -> ``images -> (logits, [debug arrays])``: float32 PyTorch, the ground truth;
- ``describe(model)`` -> the manifest's method entry (degree, tokens per stage); ``macs(model)``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import torch

from compress.complexity import analytic_macs
from compress.dynamicvit import DynamicViTBase
from compress.token_select import TIE_RULE
from export.deploy import deploy_copy
from export.onnx_export import export_onnx, output_names
from export.selection import SELECTION_FLAVOURS

Reference = tuple[np.ndarray, list[np.ndarray]]


class DynamicViTExport:
    """DynamicViT (any family: timm DeiT, LV-ViT) exported at a keep ratio with deterministic top-k."""

    name = "dynamicvit"
    flavours = SELECTION_FLAVOURS
    # The prediction modules' scores choose the kept tokens: quantising them changes which tokens survive.
    float_scopes = ("/score_predictor",)

    def __init__(self, keep_ratio: float):
        self.keep_ratio = float(keep_ratio)

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
        }

    def macs(self, model: DynamicViTBase) -> int:
        return analytic_macs(model.cost_shape(), self.keep_ratio)
