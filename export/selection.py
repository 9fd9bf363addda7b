"""The two ONNX flavours of DynamicViT's token selection, one stage each.

Both take the tokens [B, T, C] and the prediction module's keep scores [B, T, 1] (CLS +inf, see
``PredictionModule.keep_scores``) and return CLS and the k best patch tokens [B, 1 + k, C], with their token
indices [B, 1 + k, 1] int64 for the debug outputs:

- ``native``: one TopK (axis 1, largest, sorted) and one GatherND (batch_dims 1) on its indices as they come;
  runs on any ONNX runtime and TensorRT;
- ``plugin``: one ``trt.plugins::TokenGather`` node per stage, the TensorRT plugin of ``trt_plugins``
  (op type, version and namespace attributes follow the TensorRT ONNX parser's plugin convention), fed the
  patch tokens' scores.

Both compute ``compress.models.token_select.select_scored_tokens`` and follow the project's tie rule: ONNX TopK
orders equal values by lower index, and the plugin is held to the same rule.
"""
from __future__ import annotations

import torch

import trt_plugins
from compress.models.token_select import gather_tokens, select_tokens

SELECTION_FLAVOURS = ("native", "plugin")


class GatherTokens(torch.autograd.Function):
    """Eager: ``gather_tokens``. ONNX: one GatherND with batch_dims 1, which takes TopK's [B, k, 1] indices as
    they are (GatherElements would need them expanded to [B, k, C] first)."""

    @staticmethod
    def forward(ctx, tokens, token_indices):
        return gather_tokens(tokens, token_indices)

    @staticmethod
    def symbolic(g, tokens, token_indices):
        gathered = g.op("GatherND", tokens, token_indices, batch_dims_i=1)
        # The exporter would otherwise give the output the traced example's sizes, batch included, and fold a
        # dynamic batch into a constant downstream. varyingSizes() gives None for each dynamic axis.
        batch, _, channels = tokens.type().varyingSizes()
        gathered.setType(tokens.type().with_sizes([batch, token_indices.type().varyingSizes()[1], channels]))
        return gathered


def native_token_selector(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exports as TopK + GatherND. Under eager PyTorch it is only used while tracing, so torch.topk's
    unspecified tie order never decides a result outside ONNX."""
    token_indices = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True).indices
    return GatherTokens.apply(tokens, token_indices), token_indices


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
        patch_scores = scores[:, 1:, 0]
        if not with_indices:
            return TokenGatherFunction.apply(tokens, patch_scores, k, False), None
        kept, patch_indices = TokenGatherFunction.apply(tokens, patch_scores, k, True)
        cls = torch.zeros_like(patch_indices[:, :1])
        return kept, torch.cat([cls, patch_indices + 1], dim=1).long()[..., None]

    return select
