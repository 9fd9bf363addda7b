"""``python -m compress.tocom_import REF.pth -o plugin.safetensors``: convert a reference-layout ToCom file.

Reads a plugin saved by the ToCom reference code (JieShibo/ToCom: ``{'model': {blocks.{i}.attn.q_tocom.adapter_down
.weight [R, C], ...adapter_up.weight [C, R], the same for v_tocom}}``, optional ``module.`` prefix, saved from GPU)
and writes this project's plugin file: safetensors with metadata recording the degree kind (ToMe r, grid 0..16),
rank, width, depth, default scale and where it came from. The reference's masks count from the last rank channel,
this project's from the first: the slices are reversed on the way in, so ToCom(r_src -> r_tgt) is unchanged.
Nothing is written unless the whole file converts.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from compress.models import tocom, tocom_files

from compress.plumbing.cli import HelpFormatter, add_version_argument, exit_codes_epilog, exit_from_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress.tocom_import", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter, epilog=exit_codes_epilog())
    add_version_argument(parser)
    parser.add_argument("reference", metavar="REF.pth", help="ToCom file saved by the reference code (default: none, required)")
    parser.add_argument("--out", "-o", required=True, metavar="PLUGIN",
                        help="where the converted plugin is written, .safetensors (default: none, required)")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"default scale s recorded in the plugin (default: the reference's training scale "
                        f"{tocom.TRAINING_SCALE:g}; the reference sweeps {', '.join(f'{s:g}' for s in tocom.SCALE_CANDIDATES)})")
    return parser


def convert(reference: str, out: str, scale: float | None = None) -> tocom.TokenCompensator:
    """Load ``reference``, set its default scale, save it to ``out`` atomically; the plugin."""
    plugin, _ = tocom_files.load_reference_plugin(reference)
    if scale is not None:
        plugin.default_scale = tocom.check_scale(scale)
    tocom_files.save_plugin(plugin, out)
    return plugin


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plugin = convert(args.reference, args.out, args.scale)
    print(f"converted {args.reference}: ToMe r plugin, width {plugin.embed_dim}, depth {plugin.depth}, rank "
          f"{plugin.rank} ({plugin.rank_per_step} per step of r 0..16), default scale {plugin.default_scale:g} "
          f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
