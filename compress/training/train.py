"""``python -m compress.train``: DynamicViT training (Rao et al., NeurIPS 2021), or plain training of the dense base.

DynamicViT (default): a frozen teacher (the unpruned backbone: ``--teacher``, else a copy of
``--init``) distils into the student while the prediction modules learn to keep a fraction
rho**k of the patch tokens at stage k. Loss and recipe as the reference's DeiT recipe:
CE + ratio + KL + token MSE; AdamW, warm-up + per-iteration cosine, EMA, gradient clipping;
cls_token/pos_embed frozen, backbone at 0.01x the rate and still for the first epochs.

``--dense``: supervised training of the full-image backbone (the base that DynamicViT and masked
fine-tuning start from). ``python -m compress.masked_ft`` runs the same loop with masked inputs.

Each mode is an objective for ``compress.training.loop.fit``. Runs under ``torchrun --nproc_per_node=N``
(DistributedDataParallel; gloo on CPU, nccl on GPU). Writes OUT/checkpoint.pth every epoch (resumable:
``--resume``), OUT/model.pth at the end (reference format + config + training metadata: what export
reads), OUT/log.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import Subset

from compress.data.datasets import DEMO_DATASET, build_datasets, build_loaders, build_mixup, steps_per_epoch
from compress.models import DEFAULT_KEEP_RATIO, DynamicViTConfig, config_for, list_models, model_from_config, variant
from compress.models.checkpoint import atomic_torch_save, load_dynamicvit, read_checkpoint_file
from compress.models.dynamicvit import DEMO_VARIANT, PREDICTOR_PREFIX, DynamicViTBase
from compress.plumbing.cli import HelpFormatter, add_version_argument, exit_codes_epilog, number_list_argument
from compress.plumbing.errors import CheckpointError, PipelineError
from compress.plumbing.files import prepare_output
from compress.training import loop
from compress.training.losses import LossWeights, dynamicvit_loss
from compress.training.masking import forward_randomly_masked

MODES = ("dynamicvit", "dense", "masked")
CHECKPOINT_NAME, MODEL_NAME, EMA_NAME, LOG_NAME = "checkpoint.pth", "model.pth", "model_ema.pth", "log.jsonl"
FROZEN_PARAMETERS = ("cls_token", "pos_embed")  # frozen in DynamicViT training (reference recipe)
RECIPE_LR, RECIPE_BATCH = 1e-3, 1024  # the DeiT recipe's rate, quoted for a global batch of 1024
# The run's identity (what is trained, on what, against which teacher) comes from the checkpoint on --resume;
# length, output and run-time options come from the command line.
RESUMED_OPTIONS = ("data", "init", "teacher", "keep_ratio", "mask_ratio_min", "mask_ratio_max", "seed")
PROGS = {False: "python -m compress.train", True: "python -m compress.masked_ft"}
DESCRIPTIONS = {
    False: "DynamicViT training (Rao et al., NeurIPS 2021), or plain training of the dense base.",
    True: "Masked fine-tuning of a full-image ViT before DynamicViT training (Shi & Wang, arXiv 2310.17177): "
          "random patches are removed from the sequence and the class is predicted from the rest.",
}


@dataclass
class TrainConfig(loop.OptimizerConfig):
    """Every option of a training run; stored in checkpoints (``training``) and resumed from."""

    mode: str = "dynamicvit"
    data: str = DEMO_DATASET
    out: str = "runs/train"
    model: str = DEMO_VARIANT.name
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    pruning_locations: tuple[int, ...] | None = None
    drop_path: float = 0.0
    keep_ratio: float = DEFAULT_KEEP_RATIO
    init: str | None = None
    teacher: str | None = None
    backbone_lr_scale: float = 0.01
    backbone_frozen_epochs: int = 5
    ema_decay: float = 0.9999
    clip_grad: float | None = 5.0
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    token_distill_weight: float = 0.5
    mask_ratio_min: float = 0.0
    mask_ratio_max: float = 0.75
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    seed: int = 0
    workers: int = 0
    device: str | None = None
    threads: int | None = None
    amp: bool = True
    resume: str | None = None
    stop_after: int | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    train_split: str = "train"
    eval_split: str = "val"

    @property
    def target_keep(self) -> float:
        """The keep ratio the model is trained and evaluated at (1.0: dense and masked training)."""
        return self.keep_ratio if self.mode == "dynamicvit" else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["pruning_locations"] is not None:
            data["pruning_locations"] = list(data["pruning_locations"])
        return data


@dataclass
class TrainResult:
    """What a finished run reports (main rank's view)."""

    out: Path
    model: DynamicViTBase
    epochs: int
    step: int
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- command line


_locations = number_list_argument(int, "2,4,6")  # block indices


def _clip(text: str) -> float | None:
    value = float(text)
    return None if value <= 0 else value


def build_parser(masked: bool = False) -> argparse.ArgumentParser:
    """The options of ``compress.train`` (or, with ``masked``, of ``compress.masked_ft``)."""
    defaults = TrainConfig(mode="masked" if masked else "dynamicvit")
    parser = argparse.ArgumentParser(prog=PROGS[masked], description=DESCRIPTIONS[masked],
                                     formatter_class=HelpFormatter, epilog=exit_codes_epilog())
    add_version_argument(parser)
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", default=defaults.data,
                    help=f"'{DEMO_DATASET}' (built-in scikit-learn digits on a 64x64 canvas) or an ImageNet-style folder "
                    "with train/ and val/ subfolders of class folders")
    io.add_argument("--train-split", default=defaults.train_split, help="image-folder subfolder to train on")
    io.add_argument("--eval-split", default=defaults.eval_split, help="image-folder subfolder to evaluate on")
    io.add_argument("--out", "-o", default=defaults.out, help="output folder: checkpoint.pth, model.pth, model_ema.pth, log.jsonl")
    io.add_argument("--resume", nargs="?", const="auto", default=None,
                    help="continue from OUT/checkpoint.pth (or the given checkpoint): same weights, optimizer, EMA, step "
                    "(default: start afresh)")
    io.add_argument("--stop-after", type=int, default=None,
                    help="stop once this many epochs are done (the schedule still spans --epochs); continue with --resume "
                    "(default: run to --epochs)")
    io.add_argument("--limit-train", type=int, default=None, help="use only the first N training images (smoke tests) (default: all)")
    io.add_argument("--limit-eval", type=int, default=None, help="evaluate on only the first N images (default: all)")
    io.add_argument("--workers", type=int, default=defaults.workers, help="data-loader worker processes")

    arch = parser.add_argument_group("model")
    arch.add_argument("--model", "-m", default=defaults.model,
                      help=f"a registered variant ({', '.join(list_models())}) or a timm ViT name; ignored with "
                      f"--init/--resume (the checkpoint decides) (default: {defaults.model}, {DEMO_VARIANT.description})")
    arch.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's, 64 for the demo)")
    arch.add_argument("--patch-size", type=int, default=None, help="override the model's patch size (default: the model's)")
    arch.add_argument("--embed-dim", type=int, default=None, help="override the model's width (default: the model's)")
    arch.add_argument("--depth", type=int, default=None, help="override the model's depth (default: the model's)")
    arch.add_argument("--num-heads", type=int, default=None, help="override the model's head count (default: the model's)")
    arch.add_argument("--pruning-locations", type=_locations, default=None,
                      help="blocks before which the prediction modules run, e.g. 3,6,9 (default: the variant's, 1,3,5 "
                      "for demo-vit; depth/4, depth/2, 3depth/4 for a timm name or a changed --depth)")
    arch.add_argument("--drop-path", type=float, default=defaults.drop_path, help="stochastic depth rate")
    arch.add_argument("--init", default=None, help="start from this checkpoint (dense base, masked-fine-tuned base, "
                      "timm/DeiT weights or a DynamicViT) (default: random weights)")
    if not masked:
        arch.add_argument("--dense", action="store_true",
                          help="train the dense full-image backbone (no pruning, no teacher) (default: DynamicViT)")
        arch.add_argument("--keep", "-k", dest="keep_ratio", type=float, default=defaults.keep_ratio,
                          help="base keep ratio rho: stage k keeps int(N * rho**k) patch tokens")
        arch.add_argument("--teacher", default=None, help="frozen teacher checkpoint (default: the --init weights)")

    opt = parser.add_argument_group("optimisation")
    loop.add_optimizer_arguments(opt, defaults, f"{RECIPE_LR:g} x global batch / {RECIPE_BATCH}")
    opt.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="per-step EMA decay of the weights (0: off)")
    opt.add_argument("--clip-grad", type=_clip, default=defaults.clip_grad, help="gradient-norm clipping (0: off)")
    opt.add_argument("--mixup", type=float, default=defaults.mixup, help="mixup alpha (0: off)")
    opt.add_argument("--cutmix", type=float, default=defaults.cutmix, help="cutmix alpha (0: off)")
    opt.add_argument("--smoothing", type=float, default=defaults.smoothing, help="label smoothing")
    if masked:
        opt.add_argument("--mask-ratio-min", type=float, default=defaults.mask_ratio_min,
                         help="each batch masks a fraction of patches drawn uniformly from [min, max]")
        opt.add_argument("--mask-ratio-max", type=float, default=defaults.mask_ratio_max,
                         help="upper end of the mask ratio (0: no masking, plain dense training)")
    else:
        opt.add_argument("--backbone-lr-scale", type=float, default=defaults.backbone_lr_scale,
                         help="backbone rate relative to the predictors' (DynamicViT only)")
        opt.add_argument("--backbone-frozen-epochs", type=int, default=defaults.backbone_frozen_epochs,
                         help="epochs during which the backbone does not move (DynamicViT only)")
        opt.add_argument("--ratio-weight", type=float, default=defaults.ratio_weight, help="weight of the keep-ratio loss")
        opt.add_argument("--distill-weight", type=float, default=defaults.distill_weight, help="weight of KL(teacher || student)")
        opt.add_argument("--token-distill-weight", type=float, default=defaults.token_distill_weight,
                         help="weight of the MSE between final kept tokens and the teacher's")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=defaults.seed, help="random seed (rank r uses seed + r for noise)")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads per process (default: PyTorch's choice; use 1 on a machine other jobs share)")
    run.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision (default: bf16, else fp16, on GPU; none on CPU)")
    return parser


def config_from_args(args: argparse.Namespace, mode: str | None = None) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values["mode"] = mode or ("dense" if getattr(args, "dense", False) else "dynamicvit")
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- models


def new_model_config(cfg: TrainConfig, num_classes: int, image_size: int | None) -> DynamicViTConfig:
    """The registry's config for ``--model`` with the size overrides. A ``--depth`` that changes a registered
    variant's depth leaves the variant's pruning locations behind: the family then spaces them for the new depth."""
    overrides = {"img_size": cfg.img_size or image_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
                 "depth": cfg.depth, "num_heads": cfg.num_heads, "num_classes": num_classes,
                 "drop_path_rate": cfg.drop_path or None}
    config = config_for(cfg.model, cfg.target_keep, cfg.pruning_locations,
                        **{k: v for k, v in overrides.items() if v is not None})
    spec = variant(cfg.model)
    if cfg.pruning_locations is None and spec is not None and cfg.depth not in (None, spec.arch.get("depth")):
        config = replace(config, pruning_locations=())
    return config


def build_model(cfg: TrainConfig, num_classes: int, image_size: int | None) -> tuple[DynamicViTBase, str]:
    """The student, from --init or from a name; returns (model, where its weights came from)."""
    if cfg.init:
        loaded = load_dynamicvit(cfg.init)
        model = loaded.model
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
        if model.num_classes != num_classes:
            raise CheckpointError(f"--init {cfg.init} has a {model.num_classes}-class head but the data has {num_classes} classes")
        source = cfg.init
    else:
        config = new_model_config(cfg, num_classes, image_size)
        try:
            model = model_from_config(config)
        except (TypeError, ValueError, AssertionError) as exc:
            if isinstance(exc, PipelineError):
                raise
            raise PipelineError(f"cannot build {cfg.model} with {config.backbone_kwargs}: {exc}") from None
        source = "random initialisation"
    model.config = replace(model.config, keep_ratio=cfg.target_keep)
    model.keep_ratio = cfg.target_keep
    return model, source


def model_image_size(model: DynamicViTBase) -> int:
    return int(model.image_shape[1])


def load_resume_state(path: str | Path) -> tuple[DynamicViTBase, dict]:
    """Model and the training state stored beside it (optimizer, EMA, step, RNG) in a checkpoint.pth."""
    weights, rest = read_checkpoint_file(path)
    if not isinstance(rest.get("config"), dict) or "optimizer" not in rest or "step" not in rest:
        raise CheckpointError(f"{path} is not a resumable training checkpoint (no config/optimizer/step)")
    model = model_from_config(DynamicViTConfig.from_dict(rest["config"]))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match its config ({str(exc).splitlines()[0]})") from None
    return model, rest


def build_teacher(cfg: TrainConfig, student: DynamicViTBase, env: loop.DistEnv, stored: dict | None = None) -> DynamicViTBase:
    """The unpruned, frozen teacher: --teacher, else the --init weights, else (no file to reload on
    resume) the student's starting weights, which checkpoints then carry as ``teacher``."""
    if cfg.teacher:
        teacher = load_dynamicvit(cfg.teacher).model
    elif cfg.init:
        teacher = load_dynamicvit(cfg.init).model
    elif stored is not None:
        teacher = copy.deepcopy(student)
        teacher.load_state_dict(stored)
    else:
        if env.is_main:
            print("note: no --init or --teacher: the teacher is the randomly initialised student", file=sys.stderr)
        teacher = copy.deepcopy(student)
    if teacher.num_classes != student.num_classes or teacher.num_patches != student.num_patches:
        raise CheckpointError("the teacher must have the student's class count and patch grid")
    teacher.eval().to(env.device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------- parameter groups


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
    return loop.weight_decay_groups(predictors, weight_decay, name="predictors", lr_scale=1.0) + \
        loop.weight_decay_groups(backbone, weight_decay, name="backbone", lr_scale=backbone_lr_scale,
                                     frozen_epochs=backbone_frozen_epochs)


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
    return loop.weight_decay_groups(named, weight_decay, name="backbone", lr_scale=1.0)


# ----------------------------------------------------------------------------- objectives


class ForwardModule(nn.Module):
    """``forward(model, images)`` as a module holding ``model``, so DistributedDataParallel can wrap the one
    forward a mode trains through (the model's parameters, registered under ``model``)."""

    def __init__(self, model: DynamicViTBase, forward: Callable):
        super().__init__()
        self.model, self.forward_fn = model, forward

    def forward(self, images: torch.Tensor):
        return self.forward_fn(self.model, images)


def training_forward(model: DynamicViTBase, images: torch.Tensor):
    """DynamicViT's training forward: hard Gumbel decisions, attention masking (a ``MaskedForwardOutput``)."""
    return model.forward_masked(images)


def dense_logits(model: DynamicViTBase, images: torch.Tensor) -> torch.Tensor:
    return model.forward_dense(images)[0]


def keep_fraction_terms(stage_decisions: Sequence[torch.Tensor]) -> dict[str, float]:
    """The fraction of patch tokens each stage keeps in training, as ``keep_fraction_<stage>`` (from 1)."""
    return {f"keep_fraction_{stage}": float(d.detach().mean()) for stage, d in enumerate(stage_decisions, 1)}


class DynamicViTDistillation:
    """DynamicViT's loss (CE + keep ratio + KL + token MSE) against the frozen teacher's dense forward; also
    logs the fraction each stage keeps. Terms: cls, ratio, kl, token_mse, keep_fraction_<stage>."""

    divergence_hint = ("lower --lr or --keep's distance from 1, raise --clip-grad strength, or --resume from the "
                       "last checkpoint")

    def __init__(self, student: nn.Module, teacher: DynamicViTBase, keep_ratio: float, weights: LossWeights,
                 classification_loss: Callable = F.cross_entropy):
        self.student, self.teacher, self.keep_ratio = student, teacher, keep_ratio
        self.weights, self.classification_loss = weights, classification_loss

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        output = self.student(images)
        with torch.no_grad():
            teacher_logits, teacher_tokens = self.teacher.forward_dense(images)
        loss, terms = dynamicvit_loss(output, teacher_logits, teacher_tokens, labels, self.keep_ratio, self.weights,
                                      self.classification_loss)
        return loss, {**terms, **keep_fraction_terms(output.stage_decisions)}


class Classification:
    """The classification loss of a forward's logits (dense or masked training). Terms: cls."""

    divergence_hint = "lower --lr, raise --clip-grad strength, or --resume from the last checkpoint"

    def __init__(self, logits: nn.Module, classification_loss: Callable = F.cross_entropy):
        self.logits, self.classification_loss = logits, classification_loss

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.classification_loss(self.logits(images).float(), labels)
        return loss, {"cls": float(loss.detach())}


class WithMixup:
    """Mixup/CutMix on every batch before ``objective`` (labels become soft targets)."""

    def __init__(self, objective: loop.Objective, mixup: Callable):
        self.objective, self.mixup = objective, mixup
        self.divergence_hint = objective.divergence_hint

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        # Under fit's autocast: Mixup's element-wise blends and one-hot targets are not autocast operations.
        return self.objective(*self.mixup(images, labels))


def classification_loss_fn(smoothing: float, mixup_enabled: bool) -> Callable:
    if mixup_enabled:
        return SoftTargetCrossEntropy()  # mixup's targets already carry the smoothing
    if smoothing > 0:
        return partial(F.cross_entropy, label_smoothing=smoothing)
    return F.cross_entropy


def build_objective(cfg: TrainConfig, model: DynamicViTBase, teacher: DynamicViTBase | None, num_classes: int,
                    env: loop.DistEnv) -> loop.Objective:
    """The mode's objective; the forward it trains through is wrapped for DistributedDataParallel under torchrun."""
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, num_classes)
    classification_loss = classification_loss_fn(cfg.smoothing, mixup is not None)
    if cfg.mode == "dynamicvit":
        student = loop.wrap_distributed(ForwardModule(model, training_forward), env)
        weights = LossWeights(cfg.ratio_weight, cfg.distill_weight, cfg.token_distill_weight)
        objective = DynamicViTDistillation(student, teacher, cfg.keep_ratio, weights, classification_loss)
    else:
        forward = dense_logits if cfg.mode == "dense" else partial(
            forward_randomly_masked, mask_ratio_min=cfg.mask_ratio_min, mask_ratio_max=cfg.mask_ratio_max)
        objective = Classification(loop.wrap_distributed(ForwardModule(model, forward), env), classification_loss)
    return objective if mixup is None else WithMixup(objective, mixup)


# ----------------------------------------------------------------------------- a run


def _validate(cfg: TrainConfig) -> None:
    if cfg.mode not in MODES:
        raise PipelineError(f"unknown mode {cfg.mode!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise PipelineError("--epochs and --batch-size must be at least 1")
    if not 0.0 < cfg.keep_ratio <= 1.0:
        raise PipelineError(f"--keep must be in (0, 1], got {cfg.keep_ratio}")
    if not 0.0 <= cfg.mask_ratio_min <= cfg.mask_ratio_max < 1.0:
        raise PipelineError(f"mask ratios must satisfy 0 <= min <= max < 1, got [{cfg.mask_ratio_min}, {cfg.mask_ratio_max}]")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise PipelineError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    for option in ("init", "teacher"):
        path = getattr(cfg, option)
        if path and not Path(path).is_file():
            raise CheckpointError(f"--{option} checkpoint not found: {path}")


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; every rank calls this, the main rank writes files."""
    _validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = loop.init_distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        loop.shutdown_distributed()


def _resume(cfg: TrainConfig) -> tuple[DynamicViTBase, dict, str]:
    """The model and training state of --resume; the run's identity options are taken from the checkpoint."""
    path = Path(cfg.out) / CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume)
    model, state = load_resume_state(path)
    stored = state.get("training", {})
    if stored.get("mode", cfg.mode) != cfg.mode:
        raise PipelineError(f"{path} was a '{stored.get('mode')}' run, not '{cfg.mode}'")
    for name in RESUMED_OPTIONS:
        if name in stored:
            setattr(cfg, name, stored[name])
    return model, state, str(path)


def _datasets(cfg: TrainConfig, image_size: int | None = None):
    train_set, eval_set, spec = build_datasets(cfg.data, image_size, cfg.train_split, cfg.eval_split)
    if cfg.limit_train:
        train_set = Subset(train_set, range(min(cfg.limit_train, len(train_set))))
    if cfg.limit_eval:
        eval_set = Subset(eval_set, range(min(cfg.limit_eval, len(eval_set))))
    return train_set, eval_set, spec


@dataclass
class TrainingState:
    """What a resumable checkpoint carries besides the run's metadata, and how ``--resume`` puts it back.

    teacher: kept only when no file holds it (a random student's starting weights: no --init, no --teacher).
    """

    model: DynamicViTBase
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: loop.ModelEma | None = None
    teacher: DynamicViTBase | None = None

    def checkpoint(self, metadata: dict, history: list[dict], env: loop.DistEnv) -> dict:
        """The contents of checkpoint.pth after the epoch ``history[-1]`` records."""
        record = history[-1]
        cuda_rng = {"cuda": torch.cuda.get_rng_state()} if env.device.type == "cuda" else {}
        state = {"model": self.model.state_dict(), "config": self.model.config.to_dict(), **metadata,
                 "epoch": record["epoch"], "step": record["step"], "metrics": record, "history": history,
                 "optimizer": self.optimizer.state_dict(), "rng": {"torch": torch.get_rng_state(), **cuda_rng}}
        if self.ema is not None:
            state["model_ema"] = self.ema.state_dict()
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def restore(self, state: dict, env: loop.DistEnv, seed: int) -> tuple[int, int, list[dict]]:
        """Load a checkpoint's optimizer, EMA, loss scaler and random state; returns (epoch, step, history).

        The main rank continues its saved random state; the others (theirs is not saved) reseed from the step.
        """
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and "model_ema" in state:
            self.ema.load_state_dict(state["model_ema"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        epoch, step = int(state["epoch"]), int(state["step"])
        rng = state.get("rng", {})
        if env.is_main and "torch" in rng:
            torch.set_rng_state(rng["torch"])
            if env.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            torch.manual_seed(seed + 7919 * env.rank + step)
        return epoch, step, list(state.get("history", []))


def epoch_record(cfg: TrainConfig, summary: loop.EpochSummary, metrics: dict, num_stages: int) -> dict:
    """The log line of an epoch: its mean loss terms and the evaluation at the target keep ratio."""
    means = summary.means
    record = {"epoch": summary.epoch, "step": summary.step, "lr": summary.lr,
              "train_loss": means["loss"], "train_cls": means["cls"],
              "eval_keep_ratio": cfg.target_keep, "eval_top1": metrics["top1"], "eval_top5": metrics["top5"]}
    if cfg.mode == "dynamicvit":
        record.update(train_ratio=means["ratio"], train_kl=means["kl"], train_token_mse=means["token_mse"],
                      train_keep_fraction=[round(means[f"keep_fraction_{k}"], 4) for k in range(1, num_stages + 1)])
    return record


def _student_and_data(cfg: TrainConfig, env: loop.DistEnv):
    """(student, where its weights came from, the --resume state or None, train set, eval set, DataSpec): the
    student built (or resumed) under the run's seed, on the device, with datasets at its image size."""
    resume_state = None
    if cfg.resume:
        model, resume_state, source = _resume(cfg)
    torch.manual_seed(cfg.seed)
    train_set, eval_set, spec = _datasets(cfg, cfg.img_size)
    if resume_state is None:
        model, source = build_model(cfg, spec.num_classes, spec.image_size)
    if model_image_size(model) != spec.image_size:
        if cfg.data != DEMO_DATASET or cfg.img_size is not None:
            raise PipelineError(f"the model takes {model_image_size(model)}-pixel images but --img-size/data gives {spec.image_size}")
        train_set, eval_set, spec = _datasets(cfg, model_image_size(model))
    return model.to(env.device), source, resume_state, train_set, eval_set, spec


def _train(cfg: TrainConfig, env: loop.DistEnv) -> TrainResult:
    out = prepare_output(cfg.out) if env.is_main else Path(cfg.out)
    loop.barrier(env)
    model, source, resume_state, train_set, eval_set, spec = _student_and_data(cfg, env)
    torch.manual_seed(cfg.seed + env.rank)

    teacher = None
    if cfg.mode == "dynamicvit":
        groups = dynamicvit_param_groups(model, cfg.weight_decay, cfg.backbone_lr_scale, cfg.backbone_frozen_epochs)
        teacher = build_teacher(cfg, model, env, resume_state.get("teacher") if resume_state else None)
    else:
        groups = backbone_param_groups(model, cfg.weight_decay)
    global_batch = cfg.batch_size * env.world_size
    base_lr = cfg.peak_lr(global_batch, RECIPE_LR, RECIPE_BATCH)
    amp = loop.amp_dtype(cfg.amp, env.device)
    state = TrainingState(model, cfg.adamw(groups, base_lr), loop.grad_scaler(amp),
                          loop.ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
                          teacher if not (cfg.init or cfg.teacher) else None)
    objective = build_objective(cfg, model, teacher, spec.num_classes, env)
    train_loader, eval_loader = build_loaders(train_set, eval_set, cfg.batch_size, cfg.workers, cfg.seed, env.rank, env.world_size)
    per_epoch = steps_per_epoch(len(train_set), cfg.batch_size, env.world_size)

    start_epoch, step, history = 0, 0, []
    if resume_state is not None:
        start_epoch, step, history = state.restore(resume_state, env, cfg.seed)
        if env.is_main:
            print(f"resumed from {source}: epoch {start_epoch}, step {step}", file=sys.stderr)
    log = loop.JsonLinesLog(out / LOG_NAME, enabled=env.is_main)
    metadata = {
        "training": {**cfg.to_dict(), "lr_resolved": base_lr, "world_size": env.world_size, "init_source": source},
        "data": asdict(spec),
    }
    if env.is_main:
        counts = model.stage_keep_counts() if cfg.mode == "dynamicvit" else "all"
        print(f"{cfg.mode}: {model.config.backbone} {model.config.backbone_kwargs} | {len(train_set)} train / "
              f"{len(eval_set)} eval images | {per_epoch} steps/epoch x {cfg.epochs} | global batch {global_batch} | "
              f"lr {base_lr:.3g} | keep {cfg.target_keep} -> tokens {counts} | from {source}", file=sys.stderr)

    model.train()
    ema = state.ema
    for summary in loop.fit(objective, state.optimizer, train_loader, cfg.schedule(base_lr, per_epoch), env,
                            start_epoch=start_epoch, start_step=step, amp=amp, scaler=state.scaler, model=model,
                            clip_grad=cfg.clip_grad, ema=ema):
        step = summary.step
        metrics = loop.evaluate(model, eval_loader, cfg.target_keep, env, amp, top_k=(1, 5))
        record = epoch_record(cfg, summary, metrics, model.num_stages)
        if ema is not None:
            record["eval_top1_ema"] = loop.evaluate(ema.module, eval_loader, cfg.target_keep, env, amp)["top1"]
        record["seconds"] = round(time.time() - summary.started, 2)
        history.append(record)
        log.write(record)
        if env.is_main:
            _print_epoch(record, cfg, ema is not None)
            atomic_torch_save(state.checkpoint(metadata, history, env), out / CHECKPOINT_NAME)
        loop.barrier(env)
        if cfg.stop_after is not None and cfg.stop_after <= summary.epoch < cfg.epochs:
            if env.is_main:
                print(f"stopped after epoch {summary.epoch} of {cfg.epochs}: continue with --resume", file=sys.stderr)
            return TrainResult(out, model, summary.epoch, step, record, history)

    final = history[-1] if history else {}
    if env.is_main:
        _save_model(out, model, ema, {**metadata, "epoch": cfg.epochs, "step": step, "metrics": final}, cfg.ema_decay)
    loop.barrier(env)
    return TrainResult(out, model, cfg.epochs, step, final, history)


def _save_model(out: Path, model: DynamicViTBase, ema: loop.ModelEma | None, metadata: dict, ema_decay: float) -> None:
    """OUT/model.pth (reference format + config + metadata) and, with an EMA, OUT/model_ema.pth."""
    atomic_torch_save({"model": model.state_dict(), "config": model.config.to_dict(), **metadata}, out / MODEL_NAME)
    if ema is not None:
        atomic_torch_save({"model": ema.state_dict(), "config": model.config.to_dict(), **metadata, "ema_decay": ema_decay},
                          out / EMA_NAME)


def _print_epoch(record: dict, cfg: TrainConfig, with_ema: bool) -> None:
    ema_text = f" (EMA {record['eval_top1_ema']:.2f})" if with_ema else ""
    keep_text = f" keep {record['train_keep_fraction']}" if cfg.mode == "dynamicvit" else ""
    print(f"epoch {record['epoch']}/{cfg.epochs} step {record['step']} loss {record['train_loss']:.4f}{keep_text} "
          f"eval@{record['eval_keep_ratio']} top1 {record['eval_top1']:.2f}{ema_text} [{record['seconds']:.1f}s]",
          file=sys.stderr)


def print_checkpoint_location(result: TrainResult, epochs: int) -> None:
    """The run's last line says where its weights went (main rank only: every torchrun rank returns here)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.epochs >= epochs:
        print(f"checkpoint written to {result.out / MODEL_NAME}")
    else:
        print(f"stopped after epoch {result.epochs}: resumable checkpoint written to {result.out / CHECKPOINT_NAME}")


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    print_checkpoint_location(train(config), config.epochs)
    return 0
