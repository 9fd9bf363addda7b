import contextlib
import importlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compress import create_dynamicvit
from compress.data.datasets import DemoDigits
from compress.plumbing.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def torch_free_env(tmp_path: Path) -> dict:
    """PYTHONPATH with torch.py and timm.py that refuse to import, ahead of the installed packages."""
    blocked = tmp_path / "blocked"
    blocked.mkdir(exist_ok=True)
    for name in ("torch", "timm"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is blocked: the target-side tools must not need it')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(REPO)])}


def run_in_process(module: str, *args) -> subprocess.CompletedProcess:
    """``python -m module args`` without a new interpreter (no 5 s of torch and timm imports): the same
    ``run_cli(main)`` that the module's ``__main__`` runs, argparse's exits included."""
    main = importlib.import_module(module).main
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = run_cli(main, [str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess([module, *args], code, stdout.getvalue(), stderr.getvalue())


def demo_batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` images and labels of the demo digits' training split (real data, fixed placement)."""
    data = DemoDigits("train", random_placement=False)
    images, labels = zip(*(data[i] for i in range(size)))
    return torch.stack(images), torch.tensor(labels)


def assert_masked_forward_matches_pruned(model, images: torch.Tensor) -> None:
    """The training forward (dropped tokens stay, attention masking) driven by inference's top-k choices gives
    inference's logits and kept sets, for any family. Dropped tokens still receive eps/N of attention and kept
    tokens see dropped values at that weight, so the two differ by O(1e-6); 1e-4 absolute bounds that with margin.
    """
    from compress.models.token_select import top_k_decision

    counts = model.stage_keep_counts()

    def topk(log_probs, previous, stage):
        return top_k_decision(log_probs[..., 0], previous, counts[stage])

    with torch.no_grad():
        logits, kept = model.forward_pruned(images, return_indices=True)
        masked = model.forward_masked(images, decide=topk)
    torch.testing.assert_close(masked.logits, logits, atol=1e-4, rtol=0)
    for decision, positions in zip(masked.stage_decisions, kept):
        for row in range(len(images)):
            assert set(decision[row].nonzero().flatten().tolist()) == set(positions[row].tolist())
    assert masked.patch_tokens.shape == (len(images), model.num_patches, model.embed_dim)


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
