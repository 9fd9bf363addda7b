"""Shared command-line plumbing: user errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from compress.errors import PipelineError

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a PipelineError prints ``error: <message>`` (no traceback) and returns 2."""
    try:
        return main(argv) or 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_number_list(text: str, convert: Callable[[str], float | int] = float) -> tuple:
    """'0.05,0.1' or '0.05 0.1' -> (0.05, 0.1); ValueError when a part is not a number."""
    return tuple(convert(part) for part in text.replace(",", " ").split())


def number_list_argument(convert: Callable[[str], float | int], example: str) -> Callable[[str], tuple]:
    """An argparse ``type`` for comma- or space-separated numbers, with a message that shows an example."""

    def parse(text: str) -> tuple:
        try:
            return parse_number_list(text, convert)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like '{example}', got {text!r}") from None

    return parse
