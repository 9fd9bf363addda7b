"""``python -m compress.seed_grid``: the demo's claims over seeds with 95 % intervals (``compress.training.seed_grid``)."""
from compress.plumbing.cli import exit_from_cli
from compress.training.seed_grid import build_parser, main  # noqa: F401  (the command's parser, for its help and tests)

if __name__ == "__main__":
    exit_from_cli(main)
