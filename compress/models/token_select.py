"""Token selection for DynamicViT inference: pure tensor functions.

The project's one tie rule, which every backend (PyTorch, ONNX TopK, the TensorRT
TokenGather plugin, the ONNX Runtime custom op) must follow:

    Kept patch tokens are ordered by descending keep score; among equal scores the
    token with the LOWER index comes first (the ONNX TopK rule).

The CLS token is always kept and always first.
"""
from __future__ import annotations

import torch

from compress.plumbing.errors import InvalidKeepRatio

TIE_RULE = "descending score; equal scores: lower token index first (ONNX TopK rule)"


def keep_counts(keep_ratio: float, num_patches: int, num_stages: int = 3) -> list[int]:
    """Patch tokens kept after each pruning stage: ``int(num_patches * keep_ratio**k)``, k = 1..num_stages.

    Truncation with float powers, exactly as the reference implementation (DeiT-S at rho 0.7: 137 / 96 / 67).
    Keep ratio 1.0 is the dense model: no pruning stage at all, so ``[]`` (this is the one place that decides it).
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise InvalidKeepRatio(f"keep ratio must be in (0, 1], got {keep_ratio}")
    if keep_ratio == 1.0:
        return []
    counts = [int(num_patches * keep_ratio**k) for k in range(1, num_stages + 1)]
    if counts[-1] < 1:
        raise InvalidKeepRatio(
            f"keep ratio {keep_ratio} keeps no patch token at stage {counts.index(0) + 1} "
            f"of {num_stages} ({num_patches} patches: counts {counts})"
        )
    return counts


def top_k_patch_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, in the project's tie rule.

    scores: [batch, tokens] -> [batch, k] int64, descending score, ties to the lower index.
    A stable descending sort gives exactly that order; torch.topk promises no tie order
    (and differs between CPU and CUDA), so it is not used here.
    """
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


CLS_KEEP_SCORE = float("inf")  # above every finite score: the CLS token is always selected, and first


def scores_with_cls(patch_scores: torch.Tensor) -> torch.Tensor:
    """Patch keep scores [batch, patches] -> token keep scores [batch, 1 + patches, 1], CLS's +inf first."""
    cls = patch_scores.new_full((patch_scores.shape[0], 1), CLS_KEEP_SCORE)
    return torch.cat([cls, patch_scores], dim=1)[..., None]


def top_k_token_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Token keep scores [batch, 1 + patches, 1] (CLS +inf) -> the CLS token and the ``k`` best patch tokens as
    token indices [batch, 1 + k, 1] int64, in the tie rule (CLS first: no finite score reaches +inf)."""
    return top_k_patch_indices(scores[..., 0], k + 1)[..., None]


def gather_tokens(tokens: torch.Tensor, token_indices: torch.Tensor) -> torch.Tensor:
    """tokens [batch, tokens, channels], token_indices [batch, k, 1] -> tokens[b, token_indices[b, i]] [batch, k, channels].

    The ONNX export writes this as one GatherND (batch_dims 1) on the index tensor as it is.
    """
    return torch.gather(tokens, 1, token_indices.expand(-1, -1, tokens.shape[-1]))


def select_scored_tokens(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicViT's inference selection, one top-k and one gather: tokens [batch, 1 + patches, channels] and token
    keep scores [batch, 1 + patches, 1] (CLS +inf) -> (CLS and the ``k`` best patch tokens [batch, 1 + k, channels],
    their token indices [batch, 1 + k, 1] int64)."""
    token_indices = top_k_token_indices(scores, k)
    return gather_tokens(tokens, token_indices), token_indices


def gather_kept_tokens(tokens: torch.Tensor, patch_indices: torch.Tensor) -> torch.Tensor:
    """CLS token followed by the chosen patch tokens.

    tokens: [batch, 1 + patches, channels]; patch_indices: [batch, k] into the patch tokens
    (0 = first token after CLS) -> [batch, 1 + k, channels].
    """
    cls = torch.zeros_like(patch_indices[:, :1])
    return gather_tokens(tokens, torch.cat([cls, patch_indices + 1], dim=1)[..., None])


def select_tokens(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The TokenGather op: keep CLS and the ``k`` best-scoring patch tokens.

    tokens: [batch, 1 + patches, channels]; scores: [batch, patches] keep scores.
    Returns (kept tokens [batch, 1 + k, channels], kept patch indices [batch, k] int64).
    This is the reference every other implementation of the op is tested against.
    """
    patch_indices = top_k_patch_indices(scores, k)
    return gather_kept_tokens(tokens, patch_indices), patch_indices


def top_k_decision(scores: torch.Tensor, previous_decision: torch.Tensor, k: int) -> torch.Tensor:
    """A hard 0/1 keep decision marking the ``k`` best tokens among those still kept.

    scores: [batch, patches]; previous_decision: [batch, patches] (1 = kept so far).
    Tokens already dropped get -inf so they are never chosen again. Used to drive the
    training (masked) forward with inference's choices, which proves the two agree.
    """
    masked = scores.masked_fill(previous_decision <= 0, float("-inf"))
    decision = torch.zeros_like(scores)
    return decision.scatter(1, top_k_patch_indices(masked, k), 1.0)


def masked_attention_softmax(logits: torch.Tensor, decision: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's attention masking (softmax over kept keys only), computed in float32.

    logits: [batch, heads, tokens, tokens] pre-softmax attention; decision: [batch, tokens]
    with 1 for kept tokens (CLS included). With G_ij = 1 if i == j else d_j:
    A_ij = (exp(a_ij - max_j a_ij) G_ij + eps/N) / (sum_j exp(a_ij - max_j a_ij) G_ij + eps).
    The diagonal keeps a dropped token attending to itself so its row stays finite.
    """
    num_tokens = logits.shape[-1]
    keep = decision.to(torch.float32).reshape(decision.shape[0], 1, 1, num_tokens)
    eye = torch.eye(num_tokens, dtype=torch.float32, device=logits.device).view(1, 1, num_tokens, num_tokens)
    gate = keep + (1.0 - keep) * eye
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    weights = shifted.to(torch.float32).exp() * gate
    weights = (weights + eps / num_tokens) / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights.to(logits.dtype)
