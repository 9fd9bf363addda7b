"""The two ONNX flavours of DynamicViT's token selection.

- ``native``: standard operators only (TopK + GatherElements); runs on any ONNX runtime and TensorRT.
- ``plugin``: one ``trt.plugins::TokenGather`` node per stage, the TensorRT plugin of ``trt_plugins``
  (op type, version and namespace attributes follow the TensorRT ONNX parser's plugin convention).

Both compute ``compress.token_select.select_tokens`` and follow the project's tie rule: ONNX TopK
orders equal values by lower index, and the plugin is held to the same rule.
"""
from __future__ import annotations

import torch

import trt_plugins
from compress.token_select import gather_kept_tokens, select_tokens

SELECTION_FLAVOURS = ("native", "plugin")


def native_token_selector(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exports as TopK(largest, sorted) + GatherElements. Under eager PyTorch it is only used while
    tracing, so torch.topk's unspecified tie order never decides a result outside ONNX."""
    patch_indices = torch.topk(scores, k, dim=1, largest=True, sorted=True).indices
    return gather_kept_tokens(tokens, patch_indices), patch_indices


class TokenGatherFunction(torch.autograd.Function):
    """Eager: the reference op. ONNX: one TokenGather node (the TensorRT plugin)."""

    @staticmethod
    def forward(ctx, tokens, scores, k: int, with_indices: bool):
        kept, patch_indices = select_tokens(tokens, scores, k)
        return (kept, patch_indices.to(torch.int32)) if with_indices else kept

    @staticmethod
    def symbolic(g, tokens, scores, k: int, with_indices: bool):
        outputs = g.op(
            f"{trt_plugins.ONNX_DOMAIN}::{trt_plugins.PLUGIN_NAME}",
            tokens,
            scores,
            **{
                f"{trt_plugins.ATTR_KEEP}_i": k,
                f"{trt_plugins.ATTR_WITH_INDICES}_i": int(with_indices),
                "plugin_version_s": trt_plugins.PLUGIN_VERSION,
                "plugin_namespace_s": trt_plugins.PLUGIN_NAMESPACE,
            },
            outputs=2 if with_indices else 1,
        )
        # Output shapes as static as the native flavour's: token count 1 + k and channels fixed, the batch
        # fixed or symbolic (None, with --dynamic-batch). varyingSizes() gives None for each dynamic axis.
        batch, _, channels = tokens.type().varyingSizes()
        kept = outputs[0] if with_indices else outputs
        kept.setType(tokens.type().with_sizes([batch, 1 + k, channels]))
        if with_indices:
            outputs[1].setType(scores.type().with_sizes([batch, k]).with_dtype(torch.int32))
        return outputs


def plugin_token_selector(with_indices: bool):
    """A selector emitting TokenGather nodes; ``with_indices`` adds the kept-index output (debug graphs)."""

    def select(tokens: torch.Tensor, scores: torch.Tensor, k: int):
        if with_indices:
            kept, patch_indices = TokenGatherFunction.apply(tokens, scores, k, True)
            return kept, patch_indices.long()
        return TokenGatherFunction.apply(tokens, scores, k, False), None

    return select
