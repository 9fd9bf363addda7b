"""``python -m export.engine EXPORT_DIR``: the target-side stage's command (``export.on_target.engine``, torch-free)."""
from compress.plumbing.cli import exit_from_cli
from export.on_target.engine import main

if __name__ == "__main__":
    exit_from_cli(main)
