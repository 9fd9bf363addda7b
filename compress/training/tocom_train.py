"""``python -m compress.tocom_train``: train a Token Compensator (ToCom) plugin for a trained DynamicViT or ToMe model.

The model stays frozen. Each step draws a pair (m, n), m != n, uniformly from the grid of degrees
(DynamicViT: keep ratios; with ``--tome``: ToMe r, tokens merged per block, grid 0..16); the teacher
is the model run at degree m (no gradient), the student the model run at degree n plus ToCom(m -> n)
at the training scale; the loss is KL(teacher || student) on the logits (T = 1, batchmean). Both run
the inference forward (top-k token selection, or ToMe's merging): the way the model is deployed. AdamW (weight decay 0.05), lr 1e-3 per
512 images (scaled to the global batch), warm-up then per-iteration cosine.

Afterwards the scale s is chosen on a held-out slice of the TRAINING split (never the eval split):
for each candidate s, the mean top-1 over the deploy keep ratios (every grid keep ratio but the
model's training one) with ToCom(rho_train -> keep); ties go to the lower mean KL to the model at
rho_train (ToMe: r_train and r in place of the keep ratios). The chosen s becomes the plugin's default scale. Finally the eval split is measured at
each deploy keep ratio without ToCom and with it merged into the weights (what export does).

Runs under ``torchrun --nproc_per_node=N`` (DistributedDataParallel; gloo on CPU, nccl on GPU).
Writes PLUGIN (default OUT/tocom.safetensors), OUT/log.jsonl and OUT/results.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from compress.models import tocom, tocom_files


from compress.data.datasets import DEMO_DATASET, DemoDigits, ShardSampler, build_datasets, build_loaders, image_folder_dataset, steps_per_epoch
from compress.models.checkpoint import demo_checkpoint_path
from compress.models.checkpoint import load_dynamicvit
from compress.models.dynamicvit import DynamicViT
from compress.models.tome import ToMeViT, check_schedule_merges, load_tome
from compress.plumbing.cli import (
    HelpFormatter,
    add_version_argument,
    exit_codes_epilog,
    non_negative_int,
    number_list_argument,
)
from compress.plumbing.errors import PipelineError
from compress.plumbing.files import prepare_output
from compress.training import loop
from compress.training.losses import logit_distillation_loss

LOG_NAME, RESULTS_NAME, PLUGIN_NAME = "log.jsonl", "results.json", "tocom.safetensors"
LR_PER_512 = 1e-3  # the reference recipe's rate, quoted per 512 images


@dataclass
class ToComTrainConfig(loop.OptimizerConfig):
    """Every option of a ToCom training run (stored in the plugin's metadata and OUT/results.json)."""

    checkpoint: str | None = None  # None: the shipped demo DynamicViT
    model: str | None = None
    train_keep: float | None = None
    tome: bool = False  # a ToMe r plugin for the checkpoint's backbone run with token merging
    train_r: int = 0  # ToMe: the r the model was trained (fine-tuned) at
    data: str = DEMO_DATASET
    train_split: str = "train"
    eval_split: str = "val"
    out: str = "runs/tocom"
    plugin: str | None = None
    grid: tuple[float, ...] | None = None  # None: the kind's grid (keep ratios 1.0..0.3, or ToMe r 0..16)
    rank_per_step: int = tocom.DEFAULT_RANK_PER_STEP
    train_scale: float = tocom.TRAINING_SCALE
    scales: tuple[float, ...] = tocom.SCALE_CANDIDATES
    dropout: float = tocom.DEFAULT_DROPOUT
    holdout_fraction: float = 0.2
    select_by: str = "top1"
    eval_keeps: tuple[float, ...] | None = None  # None: every grid keep ratio but the training one
    final_eval: bool = True
    epochs: int = 10  # the reference recipe's length (the other optimiser defaults are shared)
    warmup_epochs: float = 1.0
    seed: int = 0
    workers: int = 0
    device: str | None = None
    amp: bool = True
    limit_train: int | None = None
    limit_eval: int | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class ToComTrainResult:
    plugin_path: Path
    plugin: tocom.TokenCompensator
    model: DynamicViT | ToMeViT
    steps: int
    scale: float
    history: list[dict] = field(default_factory=list)
    selection: list[dict] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- command line


_floats = number_list_argument(float, "0.05,0.1")


def _grid_text(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def build_parser() -> argparse.ArgumentParser:
    d = ToComTrainConfig()
    parser = argparse.ArgumentParser(prog="python -m compress.tocom_train", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter, epilog=exit_codes_epilog())
    add_version_argument(parser)
    io = parser.add_argument_group("model, data and output")
    io.add_argument("--checkpoint", "-c", default=None,
                    help="trained DynamicViT checkpoint (default: the shipped demo model, compress/demo_models/dynamicvit_demo.pth)")
    io.add_argument("--model", "-m", default=None, help="architecture, only when the checkpoint does not record it (default: read from the checkpoint)")
    io.add_argument("--train-keep", type=float, default=None,
                    help="the keep ratio the DynamicViT was trained at (default: read from the checkpoint)")
    io.add_argument("--tome", action="store_true",
                    help="train a ToMe r plugin: the checkpoint's ViT backbone runs with token merging, the degree "
                    "is r (tokens merged per block) (default: a DynamicViT keep-ratio plugin)")
    io.add_argument("--train-r", type=non_negative_int, default=d.train_r,
                    help="with --tome: the r the model was trained (fine-tuned) at")
    io.add_argument("--data", default=d.data, help=f"'{DEMO_DATASET}' (built-in digits) or an ImageNet-style folder")
    io.add_argument("--train-split", default=d.train_split, help="image-folder subfolder to train on (and hold out from)")
    io.add_argument("--eval-split", default=d.eval_split, help="image-folder subfolder measured at the end (demo: its test split)")
    io.add_argument("--out", "-o", default=d.out, help="output folder: log.jsonl, results.json (and the plugin)")
    io.add_argument("--plugin", default=None, help=f"where the plugin is written (default: OUT/{PLUGIN_NAME})")
    io.add_argument("--limit-train", type=int, default=None, help="use only the first N training images, smoke tests (default: all)")
    io.add_argument("--limit-eval", type=int, default=None, help="measure on only the first N eval images (default: all)")
    io.add_argument("--workers", type=int, default=d.workers, help="data-loader worker processes")

    plug = parser.add_argument_group("plugin")
    plug.add_argument("--grid", type=_floats, default=None,
                      help="ordered degrees the plugin covers, keep ratios or (--tome) values of r; the model's "
                      f"training degree must be one of them (default: {_grid_text(tocom.DEFAULT_GRID)}, with --tome "
                      f"{_grid_text(tocom.TOME_GRID)})")
    plug.add_argument("--rank-per-step", type=int, default=d.rank_per_step,
                      help="rank channels per unit step of the grid (R = this x (grid entries - 1))")
    plug.add_argument("--train-scale", type=float, default=d.train_scale, help="scale s during training")
    plug.add_argument("--scales", type=_floats, default=_grid_text(d.scales),
                      help="candidate scales tried on the held-out slice; the best becomes the plugin's default")
    plug.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the R rank channels in training")
    plug.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction,
                      help="fraction of the training split held out (not trained on) to choose the scale")
    plug.add_argument("--select-by", choices=("top1", "kl"), default=d.select_by,
                      help="held-out criterion for the scale: mean top-1 over the deploy keep ratios (ties: lower KL), "
                      "or mean KL to the model at its training keep ratio (ties: higher top-1)")
    plug.add_argument("--eval-keeps", type=_floats, default=None,
                      help="deploy degrees (keep ratios, or r with --tome) to measure (default: every grid degree "
                      "but the training one)")
    plug.add_argument("--no-final-eval", dest="final_eval", action="store_false",
                      help="skip the eval-split measurement, e.g. while choosing a recipe on the held-out slice "
                      "(default: measure)")

    opt = parser.add_argument_group("optimisation")
    loop.add_optimizer_arguments(opt, d, f"{LR_PER_512:g} x global batch / 512")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=d.seed, help="seed of the plugin's initialisation, the pairs and the data order")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    run.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on GPU (bf16, else fp16) (default: mixed precision on GPU, float32 on CPU)")
    return parser


def config_from_args(args: argparse.Namespace) -> ToComTrainConfig:
    values = {k: v for k, v in vars(args).items() if k in ToComTrainConfig.__dataclass_fields__}
    return ToComTrainConfig(**values)


# ----------------------------------------------------------------------------- pieces


def _validate(cfg: ToComTrainConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise PipelineError("--epochs and --batch-size must be at least 1")
    if not 0.0 <= cfg.dropout < 1.0:
        raise PipelineError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 < cfg.holdout_fraction < 1.0:
        raise PipelineError(f"--holdout-fraction must be in (0, 1), got {cfg.holdout_fraction}")
    if cfg.train_scale == 0.0:
        raise PipelineError("--train-scale must not be 0 (the plugin would receive no gradient)")
    if not cfg.scales:
        raise PipelineError("--scales needs at least one candidate")
    for scale in (cfg.train_scale, *cfg.scales):
        tocom.check_scale(scale)


def load_frozen_model(cfg: ToComTrainConfig, env: loop.DistEnv) -> tuple[DynamicViT | ToMeViT, str]:
    """The DynamicViT (or, with ``tome``, the checkpoint's backbone as a ToMe model at ``train_r``), every
    parameter frozen, in eval mode (the inference forward), on the run's device."""
    path = cfg.checkpoint
    if path is None:
        path = str(demo_checkpoint_path())
        if not Path(path).is_file():
            raise PipelineError(f"no --checkpoint given and the demo model {path} does not exist yet "
                                "(train one with python -m compress.demo, or pass --checkpoint)")
    if cfg.tome:
        model, notes = load_tome(path, cfg.train_r, cfg.model)
    else:
        loaded = load_dynamicvit(path, model_name=cfg.model, keep_ratio=cfg.train_keep)
        if not loaded.keep_ratio_known:
            raise PipelineError(f"{path} does not record the keep ratio it was trained at: pass --train-keep")
        model, notes = loaded.model, loaded.notes
    if env.is_main:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    model = model.to(env.device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, str(path)


def holdout_split(num_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(indices trained on, indices held out to choose the scale): a seeded permutation, disjoint."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(10_007 + seed)).tolist()
    held = max(1, int(round(num_images * fraction)))
    return sorted(order[held:]), sorted(order[:held])


def holdout_dataset(cfg: ToComTrainConfig, image_size: int):
    """The training split without augmentation (fixed digit placement / eval transform): what the scale is chosen on."""
    if cfg.data == DEMO_DATASET:
        return DemoDigits("train", image_size, random_placement=False)
    return image_folder_dataset(cfg.data, cfg.train_split, image_size, train=False)


def set_degree(model: DynamicViT | ToMeViT, degree: float) -> None:
    """Run ``model`` at ``degree`` from now on: a DynamicViT's keep ratio or a ToMe model's r."""
    if isinstance(model, ToMeViT):
        model.r_schedule = int(degree)
    else:
        model.keep_ratio = degree


def training_degree(model: DynamicViT | ToMeViT) -> float:
    """The degree the model was trained at: its keep ratio, or its (constant) ToMe r."""
    return model.r_schedule[0] if isinstance(model, ToMeViT) else float(model.config.keep_ratio)


def inference(model: DynamicViT | ToMeViT, images: torch.Tensor) -> torch.Tensor:
    """The deployed forward: top-k token selection (DynamicViT) or token merging (ToMe)."""
    return model(images) if isinstance(model, ToMeViT) else model.forward_pruned(images)


def merge_plugin_file(model: DynamicViT | ToMeViT, plugin_path: Path, source: float, target: float) -> dict:
    """Fold ToCom(source -> target) from the saved plugin into ``model`` (in place), as the export does."""
    if isinstance(model, ToMeViT):
        return tocom_files.merge_tome_plugin_file(model, plugin_path, int(source), int(target))
    return tocom_files.merge_plugin_file(model, plugin_path, target)


class StudentForward(nn.Module):
    """The model (frozen) plus the plugin (trained), as one module so DistributedDataParallel sees the plugin."""

    def __init__(self, model: DynamicViT, plugin: tocom.TokenCompensator):
        super().__init__()
        self.model, self.plugin = model, plugin

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return inference(self.model, images)


class PluginDistillation:
    """ToCom's objective: each step draws a transition (m, n), m != n, from the grid (the same on every rank, so one
    per global batch) and distils the model at m into the model at n plus ToCom(m -> n). The loss is the KL."""

    divergence_hint = "lower --lr"

    def __init__(self, model: DynamicViT | ToMeViT, plugin: tocom.TokenCompensator, student: nn.Module,
                 grid: Sequence[float], pairs: torch.Generator, scale: float):
        self.model, self.plugin, self.student = model, plugin, student
        self.grid, self.pairs, self.scale = grid, pairs, scale

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        source, target = tocom.draw_transition(self.grid, self.pairs)
        return distillation_step(self.model, self.plugin, self.student, images, source, target, self.scale), {}


def distillation_step(model: DynamicViT | ToMeViT, plugin: tocom.TokenCompensator, student: nn.Module,
                      images: torch.Tensor, source_keep: float, target_keep: float, scale: float) -> torch.Tensor:
    """KL(model at ``source_keep`` || model at ``target_keep`` + ToCom(source -> target)); the loss to minimise.
    (The degrees are keep ratios, or ToMe r.)"""
    plugin.deactivate()
    set_degree(model, source_keep)
    with torch.no_grad():
        teacher_logits = inference(model, images)
    set_degree(model, target_keep)
    with plugin.compensating(source_keep, target_keep, scale):
        student_logits = student(images)
    return logit_distillation_loss(student_logits, teacher_logits)


@torch.no_grad()
def measure(model: DynamicViT | ToMeViT, plugin: tocom.TokenCompensator | None, loader, source_keep: float, target_keep: float,
            scale: float, env: loop.DistEnv, amp_dtype: torch.dtype | None = None) -> dict:
    """Top-1 (percent) at ``target_keep`` with ToCom(source -> target) at ``scale`` (no plugin / s = 0: none),
    and the mean KL to the model at ``source_keep``, over every image of ``loader`` (all ranks)."""
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # correct, KL sum, images
    for images, labels in loader:
        images, labels = images.to(env.device), labels.to(env.device)
        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if plugin is not None:
                plugin.deactivate()
            set_degree(model, source_keep)
            reference = inference(model, images)
            set_degree(model, target_keep)
            if plugin is not None and scale != 0.0:
                with plugin.compensating(source_keep, target_keep, scale):
                    logits = inference(model, images)
            else:
                logits = inference(model, images)
        sums[0] += (logits.argmax(dim=1) == labels).sum()
        sums[1] += logit_distillation_loss(logits, reference) * labels.numel()
        sums[2] += labels.numel()
    loop.all_reduce_sum(sums, env)
    total = max(float(sums[2]), 1.0)
    return {"top1": 100.0 * float(sums[0]) / total, "kl": float(sums[1]) / total}


def top1_at(model: DynamicViT | ToMeViT, loader, degree: float, env: loop.DistEnv, amp_dtype: torch.dtype | None) -> float:
    """Top-1 (percent) of the deployed forward at ``degree``; the model's degree is restored afterwards."""
    if not isinstance(model, ToMeViT):
        return loop.evaluate(model, loader, degree, env, amp_dtype)["top1"]
    previous = model.r_schedule
    top1 = measure(model, None, loader, degree, degree, 0.0, env, amp_dtype)["top1"]
    model.r_schedule = previous
    return top1


def choose_scale(rows: list[dict], candidates: Sequence[float], select_by: str = "top1") -> float:
    """The candidate with the best mean over deploy keep ratios of held-out ``select_by`` ("top1": highest,
    ties to the lower mean KL; "kl": lowest, ties to the higher top-1); remaining ties to the smaller s."""
    def summary(scale: float) -> tuple[float, float, float]:
        chosen = [row for row in rows if row["scale"] == scale]
        top1 = sum(r["top1"] for r in chosen) / len(chosen)
        kl = sum(r["kl"] for r in chosen) / len(chosen)
        return (-top1, kl, scale) if select_by == "top1" else (kl, -top1, scale)

    if select_by not in ("top1", "kl"):
        raise PipelineError(f"--select-by must be 'top1' or 'kl', got {select_by!r}")
    return min(candidates, key=summary)


# ----------------------------------------------------------------------------- the run


def train(cfg: ToComTrainConfig, argv: Sequence[str] | None = None) -> ToComTrainResult:
    """Train, choose the scale, save, measure; every rank calls this, the main rank writes files."""
    _validate(cfg)
    env = loop.init_distributed(cfg.device)
    try:
        return _train(cfg, env, argv)
    finally:
        loop.shutdown_distributed()


def _train(cfg: ToComTrainConfig, env: loop.DistEnv, argv: Sequence[str] | None) -> ToComTrainResult:
    out = prepare_output(cfg.out) if env.is_main else Path(cfg.out)
    plugin_path = Path(cfg.plugin) if cfg.plugin else out / PLUGIN_NAME
    if env.is_main and cfg.plugin:
        prepare_output(plugin_path.parent)
    loop.barrier(env)
    model, checkpoint = load_frozen_model(cfg, env)
    rho_train = training_degree(model)
    kind = tocom.degree_kind(model)
    grid = tocom.normalise_grid(tocom.DEFAULT_GRIDS[kind] if cfg.grid is None else cfg.grid, kind)
    tocom.grid_index(grid, rho_train, f"the model's training {tocom.DEGREE_NAMES[kind]}")
    eval_keeps = cfg.eval_keeps if cfg.eval_keeps is not None else tuple(k for k in grid if k != round(rho_train, 6))
    for keep in eval_keeps:
        tocom.grid_index(grid, keep, "--eval-keeps entry")
    if kind == tocom.TOME_R:
        for r in grid:  # every r the training draws must be one the model's token count can merge
            check_schedule_merges(model.num_patches + 1, (int(r),))

    image_size = int(model.patch_embed.img_size[0])
    train_full, eval_set, spec = build_datasets(cfg.data, image_size, cfg.train_split, cfg.eval_split)
    if spec.num_classes != model.num_classes:
        raise PipelineError(f"the model has {model.num_classes} classes but {cfg.data} has {spec.num_classes}")
    num_train = min(cfg.limit_train or len(train_full), len(train_full))
    train_indices, held_indices = holdout_split(num_train, cfg.holdout_fraction, cfg.seed)
    train_set = Subset(train_full, train_indices)
    held_set = Subset(holdout_dataset(cfg, image_size), held_indices)
    if cfg.limit_eval:
        eval_set = Subset(eval_set, range(min(cfg.limit_eval, len(eval_set))))
    train_loader, eval_loader = build_loaders(train_set, eval_set, cfg.batch_size, cfg.workers, cfg.seed, env.rank, env.world_size)
    held_loader = DataLoader(held_set, batch_size=cfg.batch_size, sampler=ShardSampler(len(held_set), env.rank, env.world_size),
                             num_workers=cfg.workers)

    torch.manual_seed(cfg.seed)  # the same plugin initialisation on every rank
    recipe = {**cfg.to_dict(), "checkpoint": checkpoint, "rho_train": rho_train, "degree_kind": kind,
              "world_size": env.world_size,
              "command": "python -m compress.tocom_train " + " ".join(argv) if argv is not None else "(Python API)"}
    plugin = tocom.plugin_for_model(model, grid, cfg.rank_per_step, cfg.train_scale, cfg.dropout, extra={"training": recipe})
    for warning in tocom.check_plugin_matches(plugin, model):
        print(f"warning: {warning}", file=sys.stderr)
    attached = tocom.attach(model, plugin)
    student = loop.wrap_distributed(StudentForward(model, plugin), env)

    global_batch = cfg.batch_size * env.world_size
    base_lr = cfg.peak_lr(global_batch, LR_PER_512, 512)
    optimizer = cfg.adamw([{"params": list(plugin.parameters()), "weight_decay": cfg.weight_decay}], base_lr)
    per_epoch = steps_per_epoch(len(train_set), cfg.batch_size, env.world_size)
    amp_dtype = loop.amp_dtype(cfg.amp, env.device)
    pairs = torch.Generator().manual_seed(cfg.seed)  # same pair on every rank: one transition per global batch
    objective = PluginDistillation(model, plugin, student, grid, pairs, cfg.train_scale)
    log = loop.JsonLinesLog(out / LOG_NAME, enabled=env.is_main)
    if env.is_main:
        print(f"tocom: {model.config.backbone} width {model.embed_dim} depth {len(model.blocks)} trained at "
              f"{tocom.DEGREE_NAMES[kind]} {rho_train} "
              f"| grid {list(grid)} rank {plugin.rank} | {len(train_set)} train / {len(held_set)} held-out / "
              f"{len(eval_set)} eval images | {per_epoch} steps/epoch x {cfg.epochs} | global batch {global_batch} | "
              f"lr {base_lr:.3g}", file=sys.stderr)

    history, step = [], 0
    plugin.train()
    for summary in loop.fit(objective, optimizer, train_loader, cfg.schedule(base_lr, per_epoch), env,
                            amp=amp_dtype, scaler=loop.grad_scaler(amp_dtype)):
        step = summary.step
        record = {"epoch": summary.epoch, "step": step, "lr": summary.lr, "train_kl": summary.means["loss"],
                  "seconds": round(time.time() - summary.started, 2)}
        history.append(record)
        log.write(record)
        if env.is_main:
            print(f"epoch {summary.epoch}/{cfg.epochs} step {step} KL {record['train_kl']:.5f} [{record['seconds']:.1f}s]",
                  file=sys.stderr)
    plugin.eval()
    set_degree(model, rho_train)

    # Choose s on the held-out slice of the training split: the eval split plays no part.
    selection = []
    for keep in eval_keeps:
        for scale in (0.0, *cfg.scales):
            row = measure(model, plugin, held_loader, rho_train, keep, scale, env, amp_dtype)
            selection.append({"keep": keep, "scale": scale, **row})
    scale = choose_scale(selection, cfg.scales, cfg.select_by)
    log.write({"selection": selection, "chosen_scale": scale})
    plugin.default_scale = scale
    plugin.info.extra["scale_selection"] = {
        "rule": f"best mean {cfg.select_by} over the deploy keep ratios on a held-out slice of the training split "
                "(top1: ties to the lower mean KL to the model at its training keep ratio; kl: ties to the higher "
                "top-1; then the smaller s)",
        "held_out_images": len(held_set), "chosen": scale, "rows": selection,
    }
    attached.remove()
    if env.is_main:
        tocom_files.save_plugin(plugin, plugin_path)
    loop.barrier(env)

    # The eval split: without ToCom, and with the saved plugin merged into a copy of the weights (export's path).
    evaluation = []
    for keep in eval_keeps if cfg.final_eval else ():
        plain = top1_at(model, eval_loader, keep, env, amp_dtype)
        merged_model = copy.deepcopy(model)
        entry = merge_plugin_file(merged_model, plugin_path, rho_train, keep)
        merged = top1_at(merged_model, eval_loader, keep, env, amp_dtype)
        evaluation.append({"keep": keep, "top1_without_tocom": plain, "top1_tocom_merged": merged, "scale": entry["scale"]})
    # For the record only (the scale was fixed above): the eval split at every candidate scale, run-time plugin.
    every_scale = []
    with tocom.attach(model, plugin):
        for keep in eval_keeps if cfg.final_eval else ():
            for candidate in cfg.scales:
                every_scale.append({"keep": keep, "scale": candidate,
                                    **measure(model, plugin, eval_loader, rho_train, keep, candidate, env, amp_dtype)})
    reference_top1 = top1_at(model, eval_loader, rho_train, env, amp_dtype) if cfg.final_eval else None
    if env.is_main:
        results = {"recipe": recipe, "plugin": str(plugin_path), "rho_train": rho_train, "chosen_scale": scale,
                   "eval_top1_at_rho_train": reference_top1, "history": history, "selection": selection,
                   "evaluation": evaluation, "evaluation_every_scale_not_used_for_choice": every_scale}
        (out / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
        print(_report(rho_train, reference_top1, scale, selection, evaluation, cfg.scales), file=sys.stderr)
        print(f"plugin written to {plugin_path}", file=sys.stderr)
    return ToComTrainResult(plugin_path, plugin, model, step, scale, history, selection, evaluation)


def _report(rho_train: float, reference_top1: float, scale: float, selection: list[dict], evaluation: list[dict],
            candidates: Sequence[float]) -> str:
    lines = ["held-out slice of the training split, top-1 % (mean KL to the model at its training keep ratio):",
             "  keep  " + "  ".join(f"s={s:<14g}" for s in (0.0, *candidates))]
    for keep in sorted({row["keep"] for row in selection}, reverse=True):
        cells = [next(r for r in selection if r["keep"] == keep and r["scale"] == s) for s in (0.0, *candidates)]
        lines.append(f"  {keep:<5g} " + "  ".join(f"{c['top1']:6.2f} ({c['kl']:.4f})" for c in cells))
    lines.append(f"chosen scale s = {scale:g}")
    if reference_top1 is None:
        return "\n".join(lines + ["eval split not measured (--no-final-eval)"])
    lines.append(f"eval split, top-1 %: model at its training keep ratio {rho_train:g}: {reference_top1:.2f}")
    lines.append("  keep   without ToCom   ToCom merged   difference")
    for row in evaluation:
        difference = row["top1_tocom_merged"] - row["top1_without_tocom"]
        lines.append(f"  {row['keep']:<5g}  {row['top1_without_tocom']:13.2f}  {row['top1_tocom_merged']:13.2f}  {difference:+10.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    train(config_from_args(args), argv)
    return 0
