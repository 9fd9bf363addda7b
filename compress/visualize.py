"""``python -m compress.visualize``: which patch tokens each pruning stage keeps, drawn on test images.

One row per image: the input, then one panel per stage with the dropped patches dimmed and the
kept ones outlined; the title gives the predicted and true class. Uses the inference forward
(deterministic top-k, the project's tie rule) at the checkpoint's keep ratio or ``--keep``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from compress import engine
from compress.checkpoint import load_dynamicvit
from compress.engine import prepare_output


def kept_patch_masks(kept_positions: list[torch.Tensor], num_patches: int) -> torch.Tensor:
    """Per-stage kept positions [B, k_s] -> boolean masks [stages, B, num_patches] over the patch grid."""
    batch = kept_positions[0].shape[0]
    masks = torch.zeros(len(kept_positions), batch, num_patches, dtype=torch.bool)
    for stage, positions in enumerate(kept_positions):
        masks[stage].scatter_(1, positions.cpu().long(), True)
    return masks


def dim_dropped(image: torch.Tensor, mask: torch.Tensor, patch: int, factor: float = 0.25) -> torch.Tensor:
    """image [H, W, 3] in [0, 1]; mask [grid*grid] of kept patches -> dropped patches darkened."""
    grid = image.shape[0] // patch
    pixel_keep = mask.reshape(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    return image * (factor + (1.0 - factor) * pixel_keep.unsqueeze(-1).to(image.dtype))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress.visualize", description=__doc__.splitlines()[0],
                                     formatter_class=engine.HelpFormatter)
    parser.add_argument("--checkpoint", "-c", default=None, help="DynamicViT checkpoint (default: the shipped demo model)")
    parser.add_argument("--keep", "-k", type=float, default=None, help="keep ratio (default: the checkpoint's)")
    parser.add_argument("--images", "-n", type=int, default=6, help="how many demo test images")
    parser.add_argument("--first", type=int, default=0, help="index of the first demo test image")
    parser.add_argument("--out", "-o", default="docs/demo_kept_tokens.png", help="PNG to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from compress.demo import demo_checkpoint_path, demo_dataset

    args = build_parser().parse_args(argv)
    checkpoint = args.checkpoint or str(demo_checkpoint_path())
    model = load_dynamicvit(checkpoint, keep_ratio=args.keep).model.eval()
    data = demo_dataset("test")
    chosen = range(args.first, min(args.first + args.images, len(data)))
    images = torch.stack([data[i][0] for i in chosen])
    labels = [data[i][1] for i in chosen]
    with torch.no_grad():
        logits, kept = model.forward_pruned(images, return_indices=True)
    masks = kept_patch_masks(kept, model.num_patches)
    patch = model.patch_embed.patch_size[0]
    grid = images.shape[-1] // patch
    pictures = (images.permute(0, 2, 3, 1) * 0.5 + 0.5).clamp(0, 1)  # demo normalisation: mean = std = 0.5
    counts = model.stage_keep_counts()
    columns = 1 + len(kept)
    figure, axes = plt.subplots(len(chosen), columns, figsize=(2.0 * columns, 2.1 * len(chosen)), squeeze=False)
    for row, index in enumerate(chosen):
        prediction = int(logits[row].argmax())
        axes[row][0].imshow(pictures[row].numpy())
        axes[row][0].set_title(f"#{index}: pred {prediction} / true {labels[row]}", fontsize=8)
        for stage in range(len(kept)):
            axis = axes[row][stage + 1]
            axis.imshow(dim_dropped(pictures[row], masks[stage, row], patch).numpy())
            for position in kept[stage][row].tolist():
                y, x = divmod(position, grid)
                axis.add_patch(patches.Rectangle((x * patch - 0.5, y * patch - 0.5), patch, patch, fill=False,
                                                 edgecolor="tab:orange", linewidth=0.6))
            if row == 0:
                block = model.config.pruning_locations[stage]
                axis.set_title(f"stage {stage + 1} (before block {block}):\n{counts[stage]}/{model.num_patches} kept", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"DynamicViT keep ratio {model.keep_ratio}: patches kept per stage (dimmed = dropped)", fontsize=9)
    figure.tight_layout()
    out = Path(args.out)
    prepare_output(out.parent)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from compress.cli import run_cli

    raise SystemExit(run_cli(main))
