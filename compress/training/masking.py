"""Random patch masking for masked fine-tuning (Shi & Wang, arXiv 2310.17177; no public code).

Image patches are removed from the token sequence (MAE-like: removed, not zeroed) and the model classifies
from the patches that remain, so that it is already used to seeing few tokens when DynamicViT starts pruning.

Choices made here (the paper publishes none): one mask ratio per batch, drawn uniformly from [min, max]; every
image in the batch keeps the same number of patches, each image its own random subset; the CLS token stays.
Shapes: images [batch, 3, H, W]; patch indices [batch, kept] into the row-major patch grid.
"""
from __future__ import annotations

import torch

from compress.models.token_select import gather_kept_tokens


def sample_mask_ratio(low: float, high: float) -> float:
    """One mask ratio uniformly from [low, high] (torch's global generator, so seeded runs repeat)."""
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"mask ratios must satisfy 0 <= min <= max < 1, got [{low}, {high}]")
    return low + (high - low) * float(torch.rand(()))


def visible_patch_count(num_patches: int, mask_ratio: float) -> int:
    """Patches left after masking a fraction ``mask_ratio`` of them (at least one)."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_visible_patches(batch: int, num_patches: int, num_visible: int, device=None) -> torch.Tensor:
    """An independent uniform random subset of ``num_visible`` patch indices per image: [batch, num_visible] int64,
    ascending within each row (the order does not matter to the model; sorted reads better in tests)."""
    noise = torch.rand(batch, num_patches, device=device)
    return noise.argsort(dim=1)[:, :num_visible].sort(dim=1).values


def forward_visible_patches(model, images: torch.Tensor, patch_indices: torch.Tensor) -> torch.Tensor:
    """Logits of a DynamicViT's dense backbone run on CLS + the given patches only.

    images: [B, 3, H, W]; patch_indices: [B, k] into the patch grid. Position embeddings are
    added before the gather, so every kept token still knows where it came from.
    """
    tokens = gather_kept_tokens(model.embed(images), patch_indices)
    for block in model.blocks:
        tokens = block(tokens)
    return model.classify(model.norm(tokens))


def forward_randomly_masked(model, images: torch.Tensor, mask_ratio_min: float, mask_ratio_max: float) -> torch.Tensor:
    """Draw a mask ratio and a random subset per image, then classify from the visible patches
    (``mask_ratio_max`` 0: the plain dense forward)."""
    if mask_ratio_max <= 0.0:
        return model.forward_dense(images)[0]
    num_visible = visible_patch_count(model.num_patches, sample_mask_ratio(mask_ratio_min, mask_ratio_max))
    indices = random_visible_patches(images.shape[0], model.num_patches, num_visible, images.device)
    return forward_visible_patches(model, images, indices)
