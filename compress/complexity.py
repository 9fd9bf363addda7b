"""Analytic multiply-accumulate counts of a DynamicViT at a keep ratio (pure arithmetic).

Counts the matrix products (patch embedding, qkv, attention scores and weighted sum, projection,
MLP, prediction modules, head); norms, softmax and activations are left out, as in the paper's
GMACs (DeiT-S: 4.60 G dense, 2.98 G at rho 0.7).
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.token_select import keep_counts


@dataclass(frozen=True)
class VitShape:
    """The numbers of a ViT that its cost depends on."""

    embed_dim: int
    depth: int
    mlp_hidden: int
    num_patches: int
    patch_size: int
    in_chans: int
    num_classes: int
    pruning_locations: tuple[int, ...]


def vit_shape(model) -> VitShape:
    """Read the shape off a ``compress.dynamicvit.DynamicViT``."""
    first = model.blocks[0]
    patch = model.patch_embed.proj
    return VitShape(
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        mlp_hidden=first.mlp.fc1.out_features,
        num_patches=model.num_patches,
        patch_size=patch.kernel_size[0],
        in_chans=patch.in_channels,
        num_classes=model.num_classes,
        pruning_locations=tuple(model.config.pruning_locations),
    )


def tokens_per_block(shape: VitShape, keep_ratio: float) -> list[int]:
    """Sequence length (CLS included) each block runs on."""
    if keep_ratio >= 1.0:
        return [shape.num_patches + 1] * shape.depth
    counts = keep_counts(keep_ratio, shape.num_patches, len(shape.pruning_locations))
    lengths, current = [], shape.num_patches
    for index in range(shape.depth):
        if index in shape.pruning_locations:
            current = counts[shape.pruning_locations.index(index)]
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
    total = shape.num_patches * shape.in_chans * shape.patch_size**2 * shape.embed_dim
    total += sum(block_macs(n, shape.embed_dim, shape.mlp_hidden) for n in lengths)
    if keep_ratio < 1.0:
        # Each predictor scores the patch tokens still present before its block.
        total += sum(predictor_macs(lengths[i - 1] - 1, shape.embed_dim) for i in shape.pruning_locations)
    return total + shape.embed_dim * shape.num_classes
