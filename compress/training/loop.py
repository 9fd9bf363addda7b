"""One training loop, ``fit(objective, ...)``, and the plumbing every training command shares.

A training method is an *objective*: ``objective(images, labels) -> (loss, terms)``, the loss to minimise and
its named parts as floats for the log. DynamicViT distillation, dense and masked training (``compress.train``)
and the Token Compensator (``compress.tocom_train``) are objectives; ``fit`` runs the epochs for all of them:
the per-iteration learning rate (linear warm-up, then cosine), mixed precision, gradient clipping, an EMA of
the weights, and the per-batch mean of every named term over all ranks.

Also here: the optimiser options every command shares (``OptimizerConfig``), parameter groups without weight
decay for biases and norms, the parameter EMA, the distributed environment (torchrun / DistributedDataParallel),
top-k evaluation of the inference forward, and the JSON-lines log.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from compress.plumbing.errors import PipelineError

BATCH_COUNT = "batches"  # the name under which fit counts batches beside the objective's terms


class TrainingDiverged(PipelineError):
    """A loss that stopped being finite."""


# ----------------------------------------------------------------------------- options and schedule


def scheduled_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int, warmup_lr: float = 1e-6) -> float:
    """Per-iteration learning rate: linear warm-up from ``warmup_lr`` to ``base_lr``, then cosine to ``min_lr``.

    ``step`` counts optimizer steps from 0; past ``total_steps`` the rate stays at ``min_lr``.
    """
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every step of a run of ``epochs`` epochs (``scheduled_lr``)."""

    base_lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    total_steps: int
    epochs: int

    def lr(self, step: int) -> float:
        return scheduled_lr(step, self.base_lr, self.min_lr, self.warmup_steps, self.total_steps, self.warmup_lr)


@dataclass
class OptimizerConfig:
    """AdamW, linear warm-up then per-iteration cosine: the options every training command shares.

    ``lr`` None: the recipe's rate scaled linearly to the global batch (``peak_lr``).
    """

    epochs: int = 30
    warmup_epochs: float = 5.0
    batch_size: int = 64
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05

    def peak_lr(self, global_batch: int, recipe_lr: float, recipe_batch: int) -> float:
        """``lr``, else the linear scaling rule: ``recipe_lr`` is quoted for a global batch of ``recipe_batch``."""
        return self.lr if self.lr is not None else recipe_lr * global_batch / recipe_batch

    def schedule(self, base_lr: float, steps_per_epoch: int) -> Schedule:
        return Schedule(base_lr, self.min_lr, self.warmup_lr, int(round(self.warmup_epochs * steps_per_epoch)),
                        steps_per_epoch * self.epochs, self.epochs)

    def adamw(self, groups: list[dict], base_lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=base_lr, weight_decay=self.weight_decay)


def add_optimizer_arguments(group, defaults: OptimizerConfig, lr_default: str) -> None:
    """The ``OptimizerConfig`` flags, on an argparse parser or argument group; ``lr_default`` says how --lr is derived."""
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    group.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs, help="linear warm-up length")
    group.add_argument("--batch-size", "-b", type=int, default=defaults.batch_size, help="images per process and step")
    group.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {lr_default})")
    group.add_argument("--min-lr", type=float, default=defaults.min_lr, help="final rate of the cosine schedule")
    group.add_argument("--warmup-lr", type=float, default=defaults.warmup_lr, help="rate at the first step")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")


def apply_lr(optimizer: torch.optim.Optimizer, lr: float, epoch: int) -> None:
    """Set each group's rate: lr * its ``lr_scale``, or 0 while ``epoch < frozen_epochs``.

    Freezing by a zero rate (AdamW's decoupled decay is lr-scaled, so nothing moves) keeps
    the set of parameters with gradients fixed, which DistributedDataParallel requires.
    """
    for group in optimizer.param_groups:
        frozen = epoch < group.get("frozen_epochs", 0)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)


def _no_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases and norm weights (1-D) are not decayed, as in timm and DeiT."""
    return parameter.ndim <= 1 or name.endswith(".bias")


def weight_decay_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float, **extra) -> list[dict]:
    """Optimizer groups of (name, parameter) pairs: decayed ones, then biases and norm weights at decay 0;
    ``extra`` (name, lr_scale, frozen_epochs, ...) goes into both."""
    decay = [p for n, p in named if not _no_weight_decay(n, p)]
    no_decay = [p for n, p in named if _no_weight_decay(n, p)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


# ----------------------------------------------------------------------------- mixed precision


def amp_dtype(enabled: bool, device: torch.device) -> torch.dtype | None:
    """The autocast type: bfloat16 where the GPU has it, else float16; None (float32) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op context for None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, needed by float16 only (bfloat16 has float32's range)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


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


def all_reduce_named(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Sum named numbers over ranks, matched by name (every rank must hold the same names)."""
    names = sorted(values)
    summed = all_reduce_sum(torch.tensor([values[name] for name in names], dtype=torch.float64, device=env.device), env)
    return dict(zip(names, summed.tolist()))


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def wrap_distributed(module: nn.Module, env: DistEnv) -> nn.Module:
    """``module`` in DistributedDataParallel when running under torchrun, else ``module`` itself."""
    if not env.distributed:
        return module
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


# ----------------------------------------------------------------------------- the loop


class Objective(Protocol):
    """A training method: the loss of one batch (on the run's device) and its named parts, for the log."""

    divergence_hint: str  # what to try when the loss stops being finite: ends that error message

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass(frozen=True)
class EpochSummary:
    """What ``fit`` reports after an epoch.

    epoch: epochs done (1-based); step: optimizer steps done; lr: the rate of the epoch's last step; means:
    "loss" and every term the objective named, each averaged over the epoch's batches on all ranks; started:
    ``time.time()`` at the epoch's start (durations then include what the caller does between epochs).
    """

    epoch: int
    step: int
    lr: float
    means: dict[str, float]
    started: float


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clipped: nn.Module | None = None, clip_grad: float | None = None) -> None:
    """Backward through the loss scaler, clip ``clipped``'s gradient norm to ``clip_grad`` (when given), step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(clipped.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


def _accumulate(sums: dict[str, float], values: dict[str, float]) -> None:
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + value


def fit(objective: Objective, optimizer: torch.optim.Optimizer, loader, schedule: Schedule, env: DistEnv, *,
        start_epoch: int = 0, start_step: int = 0, amp: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None, model: nn.Module | None = None, clip_grad: float | None = None,
        ema: ModelEma | None = None) -> Iterator[EpochSummary]:
    """Train ``objective`` from ``start_epoch`` to ``schedule.epochs``, yielding an ``EpochSummary`` after each epoch.

    A step: the scheduled rate (``apply_lr``), the batch moved to ``env.device``, ``objective(images, labels)``
    under autocast to ``amp``, a finite-loss check (``TrainingDiverged``), backward through ``scaler``, the
    gradient norm of ``model`` clipped to ``clip_grad`` (when given), the optimizer step, ``ema.update(model)``.
    ``loader.sampler`` must have ``set_epoch`` (the shuffle then depends only on the seed and the epoch, so a
    resumed run reads the same batches). The caller evaluates, logs and saves between epochs; leaving the
    loop early ends the run.
    """
    scaler = scaler if scaler is not None else grad_scaler(None)
    step = start_step
    for epoch in range(start_epoch, schedule.epochs):
        started = time.time()
        loader.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        lr = schedule.base_lr
        for images, labels in progress_bar(loader, len(loader), f"epoch {epoch + 1}/{schedule.epochs}", env.is_main):
            lr = schedule.lr(step)
            apply_lr(optimizer, lr, epoch)
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            with autocast(env.device, amp):
                loss, terms = objective(images, labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {float(loss.detach())} at step {step} (epoch {epoch + 1}): "
                                       f"{objective.divergence_hint}")
            optimizer_step(loss, optimizer, scaler, model, clip_grad)
            if ema is not None:
                ema.update(model)
            step += 1
            _accumulate(sums, {"loss": float(loss.detach()), **terms, BATCH_COUNT: 1.0})
        totals = all_reduce_named(sums, env)
        batches = max(totals.pop(BATCH_COUNT, 0.0), 1.0)
        yield EpochSummary(epoch + 1, step, lr, {name: total / batches for name, total in totals.items()}, started)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, keep_ratio: float, env: DistEnv, amp: torch.dtype | None = None,
             top_k: Iterable[int] = (1,)) -> dict:
    """Top-k accuracy (percent) of the inference forward at ``keep_ratio`` (1.0: the dense backbone), all ranks."""
    top_k = tuple(top_k)
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(top_k) + 1, dtype=torch.float64, device=env.device)
    for images, labels in loader:
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        with autocast(env.device, amp):
            logits = model.forward_pruned(images, keep_ratio=keep_ratio)
        ranked = logits.topk(max(top_k), dim=1).indices
        hits = ranked == labels.unsqueeze(1)
        for position, k in enumerate(top_k):
            counts[position] += hits[:, :k].any(dim=1).sum()
        counts[-1] += labels.numel()
    all_reduce_sum(counts, env)
    model.train(was_training)
    total = max(float(counts[-1]), 1.0)
    return {f"top{k}": 100.0 * float(counts[i]) / total for i, k in enumerate(top_k)}


# ----------------------------------------------------------------------------- log


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
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)
