"""``python -m export.bench``: the latency benchmark's command (``export.on_target.bench``, torch-free).

It adds the one case that needs torch, PyTorch eager timing of a checkpoint: torch and the model code are
imported only when a checkpoint is timed, so the command runs on a target with nothing but TensorRT, onnx,
ONNX Runtime and numpy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from compress.plumbing.cli import exit_from_cli
from export.on_target import bench


def pytorch_runner(path: Path, backend: str, batch: int, threads: int, keep: float | None) -> Callable[[], object]:
    """One timed call of the checkpoint's pruned forward on ``backend`` (pytorch-cpu or pytorch-cuda)."""
    import torch  # optional here: only checkpoints are timed in PyTorch

    from compress.models.checkpoint import load_dynamicvit

    if threads:
        torch.set_num_threads(threads)
    model = load_dynamicvit(path, keep_ratio=keep).model.eval()
    device = torch.device("cuda" if backend == "pytorch-cuda" else "cpu")
    model.to(device)
    images = torch.randn(batch, *model.image_shape, device=device)

    def run():
        with torch.inference_mode():
            model.forward_pruned(images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def main(argv: Sequence[str] | None = None) -> int:
    return bench.main(argv, checkpoint_runner=pytorch_runner)


if __name__ == "__main__":
    exit_from_cli(main)
