"""Training plumbing shared by ``compress.train`` and ``compress.masked_ft``.

Pure schedule arithmetic, the reference recipe's parameter groups, a parameter EMA, the
distributed environment (torchrun / DistributedDataParallel), evaluation, and the JSON-lines
log. The method itself lives in ``compress.losses`` and ``compress.masked_ft``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from compress.errors import PipelineError

FROZEN_PARAMETERS = ("cls_token", "pos_embed")  # frozen in DynamicViT training (reference recipe)
PREDICTOR_PREFIX = "score_predictor."


class OutputError(PipelineError):
    """An output folder that cannot be created or written."""


# ----------------------------------------------------------------------------- schedules


def scheduled_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int, warmup_lr: float = 1e-6) -> float:
    """Per-iteration learning rate: linear warm-up from ``warmup_lr`` to ``base_lr``, then cosine to ``min_lr``.

    ``step`` counts optimizer steps from 0; past ``total_steps`` the rate stays at ``min_lr``.
    """
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(lr_per_1024: float, global_batch: int) -> float:
    """The recipe's linear scaling rule: lr is quoted for a global batch of 1024."""
    return lr_per_1024 * global_batch / 1024


def apply_lr(optimizer: torch.optim.Optimizer, lr: float, epoch: int) -> None:
    """Set each group's rate: lr * its ``lr_scale``, or 0 while ``epoch < frozen_epochs``.

    Freezing by a zero rate (AdamW's decoupled decay is lr-scaled, so nothing moves) keeps
    the set of parameters with gradients fixed, which DistributedDataParallel requires.
    """
    for group in optimizer.param_groups:
        frozen = epoch < group.get("frozen_epochs", 0)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------- parameter groups


def _no_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases and norm weights (1-D) are not decayed, as in timm and DeiT."""
    return parameter.ndim <= 1 or name.endswith(".bias")


def _groups(named, weight_decay: float, **extra) -> list[dict]:
    decay = [p for n, p in named if not _no_weight_decay(n, p)]
    no_decay = [p for n, p in named if _no_weight_decay(n, p)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def dynamicvit_param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float, backbone_frozen_epochs: int) -> list[dict]:
    """The reference recipe: cls_token and pos_embed frozen; predictors at full rate;
    the rest of the backbone at ``backbone_lr_scale`` x the rate, held still for ``backbone_frozen_epochs``."""
    predictors, backbone = [], []
    for name, parameter in model.named_parameters():
        if name in FROZEN_PARAMETERS:
            parameter.requires_grad_(False)
            continue
        parameter.requires_grad_(True)
        (predictors if name.startswith(PREDICTOR_PREFIX) else backbone).append((name, parameter))
    return _groups(predictors, weight_decay, name="predictors", lr_scale=1.0) + _groups(
        backbone, weight_decay, name="backbone", lr_scale=backbone_lr_scale, frozen_epochs=backbone_frozen_epochs
    )


def backbone_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Plain supervised training of the dense backbone: every backbone parameter at the full rate.

    The prediction modules take no part in a dense forward; they get no gradient and must not
    be handed to DistributedDataParallel as trainable (it would wait for their gradients).
    """
    named = []
    for name, parameter in model.named_parameters():
        trainable = not name.startswith(PREDICTOR_PREFIX)
        parameter.requires_grad_(trainable)
        if trainable:
            named.append((name, parameter))
    return _groups(named, weight_decay, name="backbone", lr_scale=1.0)


# ----------------------------------------------------------------------------- EMA


class ModelEma:
    """Exponential moving average of a model's parameters (and a copy of its buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for average, current in zip(self.module.parameters(), model.parameters()):
            average.lerp_(current.detach(), 1.0 - self.decay)
        for average, current in zip(self.module.buffers(), model.buffers()):
            average.copy_(current)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank 0 of 1 unless launched by torchrun (or an equivalent launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; start a process group (nccl on GPU, gloo on CPU).

    device: "cpu", "cuda" or None (cuda when available). Each process uses cuda:LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda requested but no CUDA device is available")
    target = torch.device(f"cuda:{local_rank}") if kind.startswith("cuda") else torch.device("cpu")
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, target)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed)."""
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, keep_ratio: float, env: DistEnv, amp_dtype: torch.dtype | None = None, top_k=(1,)) -> dict:
    """Top-k accuracy (percent) of the inference forward at ``keep_ratio`` (1.0: the dense backbone)."""
    was_training, previous_keep = model.training, model.keep_ratio
    model.eval()
    model.keep_ratio = keep_ratio
    counts = torch.zeros(len(top_k) + 1, dtype=torch.float64, device=env.device)
    for images, labels in loader:
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model.forward_pruned(images)
        ranked = logits.topk(max(top_k), dim=1).indices
        hits = ranked == labels.unsqueeze(1)
        for position, k in enumerate(top_k):
            counts[position] += hits[:, :k].any(dim=1).sum()
        counts[-1] += labels.numel()
    all_reduce_sum(counts, env)
    model.keep_ratio = previous_keep
    model.train(was_training)
    total = max(float(counts[-1]), 1.0)
    return {f"top{k}": 100.0 * float(counts[i]) / total for i, k in enumerate(top_k)}


# ----------------------------------------------------------------------------- output


def prepare_output(folder: str | os.PathLike) -> Path:
    """Create the output folder and prove it is writable, so a run does not fail after its first epoch."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable ({exc.strerror or exc})") from None
    return folder


class JsonLinesLog:
    """One JSON object per line, appended (a resumed run continues the same file); main rank only."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, sort_keys=False) + "\n")


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_bar(iterable, total: int, description: str, enabled: bool):
    """tqdm on the main rank when stderr is a terminal; the bare iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)
