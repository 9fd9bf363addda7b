"""Shared command-line plumbing: user errors become one line on stderr and a non-zero exit.

Every CLI of this project keeps the same exit codes: 0 success, 2 bad input (one ``error:`` line, nothing
written), 130 interrupted; a tool adds its own (a benchmark's "regression", a sweep's "no choice") as 1.
This module stays free of torch: the target-side tools import it on machines without it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import signal
import sys
from typing import Callable, NoReturn, Sequence

from compress.plumbing.errors import PipelineError

DISTRIBUTION = "vit-prune-deploy"
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a PipelineError prints ``error: <message>`` (no traceback) and returns 2, Ctrl-C returns 130."""
    try:
        return main(argv) or EXIT_OK
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_from_cli(main: Callable[[Sequence[str] | None], int | None]) -> NoReturn:
    """The ``__main__`` entry of every CLI: ``run_cli(main)``, then exit with its code.

    Once the work is done, Ctrl-C is ignored: a late one arriving while the interpreter shuts down would
    otherwise turn a finished, published run into a KeyboardInterrupt exit.
    """
    code = run_cli(main)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" unless the help text already says what the default is; keeps the line breaks of
    the description and the epilog (the exit-code table)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text or action.default is argparse.SUPPRESS else super()._get_help_string(action)


def exit_codes_epilog(*own: tuple[int, str]) -> str:
    """The exit-code table a CLI's --help ends with; ``own``: (code, meaning) of the tool's own codes."""
    codes = [(EXIT_OK, "success"), *own,
             (EXIT_USER_ERROR, "bad input or options: one 'error: ...' line on stderr"),
             (EXIT_INTERRUPTED, "interrupted (Ctrl-C)")]
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in sorted(codes))


def package_version() -> str:
    """This tool's installed version (the source tree's, when run from a checkout that is not installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_version_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--version``: print ``<prog> <version>`` and exit 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the tool's version and exit")
    return parser


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


def describe_bounds(low: float | None, high: float | None, low_open: bool, noun: str) -> str:
    """'a number in (0, 1]', 'an integer >= 1', 'a number' (finite) ... for argparse messages."""
    if low is not None and high is not None:
        return f"{noun} in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{noun} <= {high:g}"
    return f"a finite {noun.split()[-1]}"


def bounded(convert: Callable[[str], float | int], low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type``: a finite number in [low, high] (``low_open``: (low, high]); None leaves a side open.

    Checked when the command line is parsed, so a bad value is refused before any work.
    """
    domain = describe_bounds(low, high, low_open, "an integer" if convert is int else "a number")

    def parse(text: str) -> float | int:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text!r}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in its messages
    return parse


positive_int = bounded(int, 1)
non_negative_int = bounded(int, 0)
positive_float = bounded(float, 0.0, low_open=True)
keep_ratio_argument = bounded(float, 0.0, 1.0, low_open=True)
fraction_argument = bounded(float, 0.0, 1.0)


def parser_from_docstring(prog: str, docstring: str, *own_codes: tuple[int, str]) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of a ``python -m x: what it does`` module docstring and
    whose epilog is the rest (up to its own "Exit codes:" paragraph) followed by the exit-code table."""
    first, _, details = docstring.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=first.split(": ", 1)[-1], formatter_class=HelpFormatter,
                                   epilog=details.rsplit("\nExit codes:", 1)[0] + "\n\n" + exit_codes_epilog(*own_codes))
