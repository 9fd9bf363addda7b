"""``python -m compress.describe CHECKPOINT``: what a checkpoint holds and what it costs.

Prints the architecture read from the checkpoint, the parameter count, the tokens kept at each
pruning stage and the analytic MACs at the chosen keep ratio against the dense backbone.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from compress.models import create_model
from compress.models.checkpoint import LoadedCheckpoint, load_dynamicvit
from compress.models.complexity import analytic_macs
from compress.models.token_select import TIE_RULE
from compress.plumbing.cli import add_version_argument, exit_from_cli, keep_ratio_argument, parser_from_docstring

DEFAULT_MODEL = "dynamicvit_deit_small"  # described when neither a checkpoint nor --model is given


def build_parser() -> argparse.ArgumentParser:
    parser = add_version_argument(parser_from_docstring("python -m compress.describe", __doc__))
    parser.add_argument("checkpoint", nargs="?", default=None, help="reference .pth ({'model': ...}), this project's checkpoint, "
                        "a plain state dict or a timm/DeiT backbone (.pth/.safetensors) "
                        "(default: none: --model with random weights, labelled as such)")
    parser.add_argument("--model", "-m", default=None,
                        help="architecture name when the checkpoint cannot tell it (default: read from the checkpoint; "
                        f"without one, {DEFAULT_MODEL})")
    parser.add_argument("--keep", "-k", type=keep_ratio_argument, default=None,
                        help="keep ratio rho in (0, 1] (default: the checkpoint's training keep ratio, else the "
                        "architecture's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint is None:
        model = create_model(args.model or DEFAULT_MODEL, keep_ratio=args.keep)
        loaded = LoadedCheckpoint(model, ["no checkpoint given: random weights (architecture only)"])
    else:
        loaded = load_dynamicvit(args.checkpoint, model_name=args.model, keep_ratio=args.keep)
    model = loaded.model
    shape = model.cost_shape()
    pruned, dense = analytic_macs(shape, model.keep_ratio), analytic_macs(shape, 1.0)
    print(f"checkpoint   {args.checkpoint or '(none: random weights)'}")
    print(f"backbone     {model.config.backbone} {model.config.backbone_kwargs or ''}".rstrip())
    print(f"parameters   {sum(p.numel() for p in model.parameters()):,}")
    print(f"stages       before blocks {list(model.config.pruning_locations)}")
    print(f"keep ratio   {model.keep_ratio}: patch tokens {shape.num_patches} -> {model.stage_keep_counts()}")
    print(f"MACs         {pruned / 1e9:.3f} G vs dense {dense / 1e9:.3f} G (ratio {pruned / dense:.3f})")
    print(f"tie rule     {TIE_RULE}")
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
