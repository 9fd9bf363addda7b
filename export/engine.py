"""``python -m export.engine EXPORT_DIR``: the target-side stage's command (``export.target.engine``, torch-free)."""
from compress.plumbing.cli import exit_from_cli
from export.target.engine import main

if __name__ == "__main__":
    exit_from_cli(main)
