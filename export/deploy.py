"""The deploy transform: a DynamicViT turned into the exact graph that is exported.

- deterministic top-k at the chosen keep ratio (the training-time Gumbel path is never exported);
- attention with an explicit float32 softmax instead of timm's fused kernel, so the ONNX graph is
  plain MatMul/Softmax and a float16 graph still normalises attention in float32;
- optionally float16 ("mixed"): weights and activations in float16, with the norms (LayerNorm, BatchNorm), the
  attention softmax and the prediction modules (whose scores decide which tokens survive) kept in float32;
The ToCom delta for (training keep ratio -> deploy keep ratio) is merged into the weights before this copy
is made (``export.build.merge_tocom``), so the merged model is what gets exported and validated.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from compress.dynamicvit import DynamicViTBase
from compress.errors import PipelineError

PRECISIONS = ("fp32", "fp16")


FLOAT32_NORMS = (nn.LayerNorm, nn.BatchNorm2d)


class Float32Norm(nn.Module):
    """A LayerNorm or BatchNorm computed in float32 inside a float16 graph (fp16 variance overflows on ViT
    activations; a BatchNorm's folded scale can leave the float16 range)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


class Float32Island(nn.Module):
    """A module kept in float32 within a float16 graph; its outputs stay float32.

    Used for the prediction modules: their keep scores choose the surviving tokens, and float16
    scores would create ties and selections that float32 PyTorch never makes.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.module(x.float(), *args)


def to_mixed_float16(model: DynamicViTBase) -> DynamicViTBase:
    """Float16 weights and activations except norms, attention softmax and prediction modules."""
    model = model.half()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FLOAT32_NORMS) and not isinstance(module, Float32Norm):
                setattr(module, child_name, Float32Norm(child))
    model.score_predictor = nn.ModuleList(Float32Island(p.module if isinstance(p, Float32Island) else p)
                                          for p in model.score_predictor)
    return model


def deploy_copy(model: DynamicViTBase, keep_ratio: float, precision: str = "fp32") -> DynamicViTBase:
    """An eval-mode copy of ``model`` ready for export at ``keep_ratio``; ``model`` is left unchanged."""
    if precision not in PRECISIONS:
        raise PipelineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    deployed = copy.deepcopy(model).eval()
    deployed.keep_ratio = keep_ratio
    deployed.explicit_attention = True  # float32 softmax as plain nodes, never a fused attention kernel
    for parameter in deployed.parameters():
        parameter.requires_grad_(False)
    return to_mixed_float16(deployed) if precision == "fp16" else deployed



