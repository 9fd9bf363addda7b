"""Two CPU processes under torchrun (gloo on 127.0.0.1): DDP training ends with identical weights on both ranks."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from compress.train import TrainConfig, train

    out = sys.argv[1]
    mode = sys.argv[2]
    result = train(TrainConfig(mode=mode, out=out, embed_dim=32, depth=4, num_heads=2, epochs=1, batch_size=16,
                               limit_train=96, limit_eval=40, lr=1e-3, warmup_epochs=0.5, backbone_frozen_epochs=0,
                               ema_decay=0.9, device="cpu"))
    torch.save({"step": result.step, "model": result.model.state_dict()}, f"{out}/rank{os.environ['RANK']}.pt")
    """
)


def _run_two_ranks(tmp_path: Path, mode: str) -> tuple[dict, dict]:
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out), mode]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return (torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True))


def _assert_same(rank0: dict, rank1: dict) -> None:
    assert rank0["step"] == rank1["step"] == 3  # 96 images / 2 ranks / 16 per step
    for name, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][name]), name


def test_dynamicvit_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    rank0, rank1 = _run_two_ranks(tmp_path, "dynamicvit")
    _assert_same(rank0, rank1)
    written = torch.load(tmp_path / "dynamicvit" / "model.pth", weights_only=True)  # rank 0 wrote it
    assert written["training"]["world_size"] == 2
    for name, value in rank0["model"].items():
        assert torch.equal(value, written["model"][name]), name


def test_masked_ft_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    """Prediction modules take no part in masked/dense training: DDP must not wait for their gradients."""
    _assert_same(*_run_two_ranks(tmp_path, "masked"))
