"""``python -m compress.demo``: the built-in demo model, trained from scratch in one command (``compress.training.demo``)."""
from compress.plumbing.cli import exit_from_cli
from compress.training.demo import build_parser, main  # noqa: F401  (the command's parser, for its help and tests)

if __name__ == "__main__":
    exit_from_cli(main)
