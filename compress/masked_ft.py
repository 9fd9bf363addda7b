"""``python -m compress.masked_ft``: masked fine-tuning of a full-image ViT before DynamicViT training.

Method (Shi & Wang, arXiv 2310.17177): ``compress.training.masking``. This command is ``compress.train``'s loop with
the masked objective: ``python -m compress.masked_ft --init BASE.pth --out runs/masked`` fine-tunes a base
model; ``--mask-ratio-max 0`` is plain supervised training of the dense backbone (as
``python -m compress.train --dense``). The result initialises ``python -m compress.train --init``.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from compress.plumbing.cli import exit_from_cli
from compress.training import train


def build_parser() -> argparse.ArgumentParser:
    return train.build_parser(masked=True)


def main(argv: Sequence[str] | None = None) -> int:
    config = train.config_from_args(build_parser().parse_args(argv), mode="masked")
    train.print_checkpoint_location(train.train(config), config.epochs)
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
