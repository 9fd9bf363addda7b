"""``python -m compress.train``: DynamicViT training, or dense and masked training of the base (``compress.training.train``)."""
from compress.plumbing.cli import exit_from_cli
from compress.training.train import build_parser, main  # noqa: F401  (the command's parser, for its help and tests)

if __name__ == "__main__":
    exit_from_cli(main)
