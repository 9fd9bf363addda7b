"""Analytic multiply-accumulate counts of a DynamicViT at a keep ratio (pure arithmetic).

Counts the matrix products (patch embedding, qkv, attention scores and weighted sum, projection,
MLP, prediction modules, head); norms, softmax and activations are left out, as in the paper's
GMACs (DeiT-S: 4.60 G dense, 2.98 G at rho 0.7).
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.models.token_select import keep_counts


@dataclass(frozen=True)
class VitShape:
    """The numbers of a ViT that its cost depends on."""

    embed_dim: int
    depth: int
    mlp_hidden: int
    num_patches: int
    pruning_locations: tuple[int, ...]
    stem_macs: int  # images -> patch tokens (a convolution, or LV-ViT's convolutional stem)
    head_macs: int  # final tokens -> logits
    per_token_head_macs: int = 0  # a head applied to every final patch token (LV-ViT's aux_head)



def tokens_per_block(shape: VitShape, keep_ratio: float) -> list[int]:
    """Sequence length (CLS included) each block runs on."""
    counts = dict(zip(shape.pruning_locations, keep_counts(keep_ratio, shape.num_patches, len(shape.pruning_locations))))
    lengths, current = [], shape.num_patches
    for index in range(shape.depth):
        current = counts.get(index, current)
        lengths.append(current + 1)
    return lengths


def block_macs(tokens: int, embed_dim: int, mlp_hidden: int) -> int:
    """qkv + attention scores + weighted sum + projection + MLP of one transformer block."""
    return 4 * tokens * embed_dim**2 + 2 * tokens**2 * embed_dim + 2 * tokens * embed_dim * mlp_hidden


def predictor_macs(tokens: int, embed_dim: int) -> int:
    """One prediction module on ``tokens`` patch tokens: C->C, C->C/2, C/2->C/4, C/4->2."""
    c = embed_dim
    return tokens * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)


def analytic_macs(shape: VitShape, keep_ratio: float) -> int:
    """Total MACs of one image at ``keep_ratio`` (1.0: the dense backbone, no predictors)."""
    lengths = tokens_per_block(shape, keep_ratio)
    total = shape.stem_macs + sum(block_macs(n, shape.embed_dim, shape.mlp_hidden) for n in lengths)
    if keep_counts(keep_ratio, shape.num_patches, len(shape.pruning_locations)):
        # Each predictor scores the patch tokens still present before its block.
        total += sum(predictor_macs(lengths[i - 1] - 1, shape.embed_dim) for i in shape.pruning_locations)
    return total + shape.head_macs + shape.per_token_head_macs * (lengths[-1] - 1)
