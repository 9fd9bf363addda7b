import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compress import create_dynamicvit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    """DeiT-Tiny DynamicViT (random weights, eval mode): the real architecture, small enough for CI."""
    return create_dynamicvit("dynamicvit_deit_tiny", keep_ratio=0.7).eval()


@pytest.fixture
def torchrun(tmp_path):
    """Run a script as CPU processes under torchrun (gloo on 127.0.0.1): ``torchrun(script, *args, nproc=2)``.

    The script gets an output folder as ``sys.argv[1]`` (then ``args``) and saves what it wants checked as
    ``<folder>/rank<RANK>.pt``; returns (the folder, the rank files loaded, in rank order). Fails on a non-zero exit.
    """
    def run(script: str, *args, nproc: int = 2) -> tuple[Path, list[dict]]:
        path = tmp_path / "rank_main.py"
        path.write_text(textwrap.dedent(script))
        out = tmp_path / "torchrun_out"
        out.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(path),
                   str(out), *map(str, args)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return out, [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(nproc)]

    return run
