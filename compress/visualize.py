"""``python -m compress.visualize``: which patch tokens each pruning stage keeps, drawn on images.

One row per image: the input, then one panel per stage with the dropped patches dimmed and the
kept ones outlined; the title gives the predicted (and, when known, the true) class. Uses the inference
forward (deterministic top-k, the project's tie rule) at the checkpoint's keep ratio or ``--keep``.
Images come at the model's own input size and preprocessing from the demo test split, an image folder or a
.npy/.npz file (the sources calibration reads).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib import patches
from matplotlib.figure import Figure

from compress.data.images import DEMO_SOURCE, ImageSample, Preprocessing, load_images, preprocessing_for, range_pick
from compress.models.checkpoint import demo_checkpoint_path
from compress.models.checkpoint import load_dynamicvit
from compress.plumbing.cli import (
    add_version_argument,
    exit_from_cli,
    keep_ratio_argument,
    non_negative_int,
    parser_from_docstring,
    positive_int,
)
from compress.plumbing.files import atomic_write, prepare_output

DEFAULT_OUT = "runs/kept_tokens.png"  # an ignored folder: the picture shipped under docs/ is written on request only


def kept_patch_masks(kept_positions: list[torch.Tensor], num_patches: int) -> torch.Tensor:
    """Per-stage kept positions [B, k_s] -> boolean masks [stages, B, num_patches] over the patch grid."""
    batch = kept_positions[0].shape[0]
    masks = torch.zeros(len(kept_positions), batch, num_patches, dtype=torch.bool)
    for stage, positions in enumerate(kept_positions):
        masks[stage].scatter_(1, positions.cpu().long(), True)
    return masks


def dim_dropped(image: torch.Tensor, mask: torch.Tensor, patch: tuple[int, int], factor: float = 0.25) -> torch.Tensor:
    """image [H, W, C] in [0, 1]; mask [grid_h * grid_w] of kept patches -> dropped patches darkened."""
    grid = (image.shape[0] // patch[0], image.shape[1] // patch[1])
    pixel_keep = mask.reshape(grid).repeat_interleave(patch[0], 0).repeat_interleave(patch[1], 1)
    return image * (factor + (1.0 - factor) * pixel_keep.unsqueeze(-1).to(image.dtype))


def displayable(images: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """Model inputs [N, C, H, W] -> pictures [N, H, W, C] in [0, 1] (the normalisation undone)."""
    mean = torch.tensor(preprocessing.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).reshape(1, -1, 1, 1)
    return (torch.from_numpy(images) * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def kept_tokens_figure(model, sample: ImageSample, first: int, preprocessing: Preprocessing) -> Figure:
    """The picture: one row per image of ``sample`` (numbered from ``first``), one column per stage."""
    images = torch.from_numpy(sample.images)
    with torch.no_grad():
        logits, kept = model.forward_pruned(images, return_indices=True)
    masks = kept_patch_masks(kept, model.num_patches)
    patch = tuple(model.patch_embed.patch_size)
    grid_width = images.shape[-1] // patch[1]
    pictures = displayable(sample.images, preprocessing)
    gray = pictures.shape[-1] == 1
    counts = model.stage_keep_counts()
    rows, columns = len(images), 1 + len(kept)
    figure = Figure(figsize=(2.0 * columns, 2.1 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)

    def show(axis, picture: torch.Tensor) -> None:
        axis.imshow(picture.squeeze(-1).numpy() if gray else picture.numpy(), cmap="gray" if gray else None)

    for row in range(rows):
        truth = "" if sample.labels is None else f" / true {int(sample.labels[row])}"
        show(axes[row][0], pictures[row])
        axes[row][0].set_title(f"#{first + row}: pred {int(logits[row].argmax())}{truth}", fontsize=8)
        for stage in range(len(kept)):
            axis = axes[row][stage + 1]
            show(axis, dim_dropped(pictures[row], masks[stage, row], patch))
            for position in kept[stage][row].tolist():
                y, x = divmod(position, grid_width)
                axis.add_patch(patches.Rectangle((x * patch[1] - 0.5, y * patch[0] - 0.5), patch[1], patch[0],
                                                 fill=False, edgecolor="tab:orange", linewidth=0.6))
            if row == 0:
                block = model.config.pruning_locations[stage]
                axis.set_title(f"stage {stage + 1} (before block {block}):\n{counts[stage]}/{model.num_patches} kept",
                               fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"DynamicViT keep ratio {model.keep_ratio}: patches kept per stage (dimmed = dropped)", fontsize=9)
    figure.tight_layout()
    return figure


def build_parser() -> argparse.ArgumentParser:
    parser = add_version_argument(parser_from_docstring("python -m compress.visualize", __doc__))
    parser.add_argument("--checkpoint", "-c", default=None, help="DynamicViT checkpoint (default: the shipped demo model)")
    parser.add_argument("--keep", "-k", type=keep_ratio_argument, default=None,
                        help="keep ratio in (0, 1] (default: the checkpoint's)")
    parser.add_argument("--data", default=DEMO_SOURCE,
                        help="images to draw: 'demo' (its test split), an image folder (root/<class>/... gives the "
                             "true class) or a .npy/.npz, preprocessed at the model's input size")
    parser.add_argument("--images", "-n", type=positive_int, default=6, help="how many images")
    parser.add_argument("--first", type=non_negative_int, default=0,
                        help="index of the first image (a folder's images in sorted order)")
    parser.add_argument("--out", "-o", type=Path, default=Path(DEFAULT_OUT), help="PNG to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepare_output(args.out.parent)  # an unwritable destination is refused before the model runs
    loaded = load_dynamicvit(args.checkpoint or demo_checkpoint_path(), keep_ratio=args.keep)
    model = loaded.model.eval()
    preprocessing = preprocessing_for(model, loaded.metadata)
    sample = load_images(args.data, preprocessing, range_pick(args.first, args.images))
    figure = kept_tokens_figure(model, sample, args.first, preprocessing)
    atomic_write(args.out, lambda path: figure.savefig(path, format="png", dpi=110))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
