"""The deploy transform: a DynamicViT turned into the exact graph that is exported.

- deterministic top-k at the chosen keep ratio (the training-time Gumbel path is never exported), scored by the
  prediction modules' ``keep_scores`` (the fewest operations per stage);
- attention as plain MatMul/Softmax nodes instead of timm's fused kernel, in the pattern TensorRT fuses into one
  attention kernel: the scale on Q, then MatMul, Softmax, MatMul, all in the graph's precision;
- optionally float16 ("mixed"): weights and activations in float16, with the norms (LayerNorm, BatchNorm) and the
  prediction modules (whose scores decide which tokens survive) kept in float32;
The ToCom delta for (training keep ratio -> deploy keep ratio) is merged into the weights before this copy
is made (``export.api``), so the merged model is what gets exported and validated.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from compress.models.dynamicvit import DynamicViTBase, as_float32
from compress.plumbing.errors import PipelineError

PRECISIONS = ("fp32", "fp16")


FLOAT32_NORMS = (nn.LayerNorm, nn.BatchNorm2d)


class Float32Norm(nn.Module):
    """A LayerNorm or BatchNorm computed in float32 inside a float16 graph (fp16 variance overflows on ViT
    activations; a BatchNorm's folded scale can leave the float16 range)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(as_float32(x)).to(x.dtype)


class KeepScorer(nn.Module):
    """A prediction module in a deploy copy: its ``keep_scores``, in float32 in every graph.

    The scores choose the surviving tokens, and float16 scores would create ties and selections that float32
    PyTorch never makes. Running them as this module's forward puts their nodes under the module's exporter
    scope (``/score_predictor.k/...``), which INT8 quantisation leaves in floating point.
    """

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor.float()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.predictor.keep_scores(as_float32(tokens))

    def keep_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens)


def with_float32_norms(model: nn.Module, keep: tuple[type, ...] = ()) -> nn.Module:
    """Every norm of ``model`` wrapped in ``Float32Norm``, except inside modules of the types ``keep`` (already float32)."""
    kept_inside = {id(m) for k in model.modules() if isinstance(k, keep) for m in k.modules()}
    for module in list(model.modules()):
        if id(module) in kept_inside or isinstance(module, Float32Norm):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, FLOAT32_NORMS):
                setattr(module, child_name, Float32Norm(child))
    return model


def to_mixed_float16(model: DynamicViTBase) -> DynamicViTBase:
    """Float16 weights and activations except the norms and the prediction modules (``KeepScorer``)."""
    model = with_float32_norms(model.half(), keep=(KeepScorer,))
    for scorer in model.score_predictor:
        scorer.float()
    return model


def deploy_copy(model: DynamicViTBase, keep_ratio: float, precision: str = "fp32") -> DynamicViTBase:
    """An eval-mode copy of ``model`` ready for export at ``keep_ratio``; ``model`` is left unchanged."""
    if precision not in PRECISIONS:
        raise PipelineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    deployed = copy.deepcopy(model).eval()
    deployed.keep_ratio = keep_ratio
    deployed.explicit_attention = True  # MatMul/Softmax nodes that TensorRT fuses, never timm's fused kernel
    deployed.score_predictor = nn.ModuleList(KeepScorer(p) for p in deployed.score_predictor)
    for parameter in deployed.parameters():
        parameter.requires_grad_(False)
    return to_mixed_float16(deployed) if precision == "fp16" else deployed
