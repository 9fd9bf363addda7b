"""``python -m compress.tocom_train``: Token Compensator training (``compress.training.tocom_train``)."""
from compress.plumbing.cli import exit_from_cli
from compress.training.tocom_train import build_parser, main  # noqa: F401  (the command's parser, for its help and tests)

if __name__ == "__main__":
    exit_from_cli(main)
