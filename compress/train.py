"""``python -m compress.train``: DynamicViT training (Rao et al., NeurIPS 2021), or plain training of the dense base.

DynamicViT (default): a frozen teacher (the unpruned backbone: ``--teacher``, else a copy of
``--init``) distils into the student while the prediction modules learn to keep a fraction
rho**k of the patch tokens at stage k. Loss and recipe as the reference's DeiT recipe:
CE + ratio + KL + token MSE; AdamW, warm-up + per-iteration cosine, EMA, gradient clipping;
cls_token/pos_embed frozen, backbone at 0.01x the rate and still for the first epochs.

``--dense``: supervised training of the full-image backbone (the base that DynamicViT and
masked fine-tuning start from). ``python -m compress.masked_ft`` uses the same loop with masked inputs.

Runs under ``torchrun --nproc_per_node=N`` (DistributedDataParallel; gloo on CPU, nccl on GPU).
Writes OUT/checkpoint.pth every epoch (resumable: ``--resume``), OUT/model.pth at the end
(reference format + config + training metadata: what export reads), OUT/log.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset

from compress import engine
from compress.checkpoint import atomic_torch_save, load_dynamicvit, read_checkpoint_file
from compress.cli import HelpFormatter, add_version_argument, exit_codes_epilog, number_list_argument
from compress.data import DEMO_DATASET, build_datasets, build_loaders, build_mixup, steps_per_epoch
from compress.dynamicvit import DynamicViT, DynamicViTConfig, create_dynamicvit, dynamicvit_from_config
from compress.errors import CheckpointError, PipelineError
from compress.losses import LossWeights, dynamicvit_loss
from compress.masked_ft import forward_randomly_masked

# The built-in demo architecture: a small ViT on 64x64 images, 8x8 patches (64 patch tokens),
# depth 6, width 64; prediction modules before blocks 1, 3, 5 (evenly spread, as 3/6/9 in depth 12).
DEMO_MODEL = "demo-vit"
DEMO_BACKBONE = "vit_small_patch16_224"
DEMO_BACKBONE_KWARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 6, "num_heads": 2}
DEMO_PRUNING_LOCATIONS = (1, 3, 5)

MODES = ("dynamicvit", "dense", "masked")
CHECKPOINT_NAME, MODEL_NAME, EMA_NAME, LOG_NAME = "checkpoint.pth", "model.pth", "model_ema.pth", "log.jsonl"


@dataclass
class TrainConfig:
    """Every option of a training run; stored in checkpoints (``training``) and resumed from."""

    mode: str = "dynamicvit"
    data: str = DEMO_DATASET
    out: str = "runs/train"
    model: str = DEMO_MODEL
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    pruning_locations: tuple[int, ...] | None = None
    drop_path: float = 0.0
    keep_ratio: float = 0.7
    init: str | None = None
    teacher: str | None = None
    epochs: int = 30
    warmup_epochs: float = 5.0
    batch_size: int = 64
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
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

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["pruning_locations"] is not None:
            data["pruning_locations"] = list(data["pruning_locations"])
        return data


@dataclass
class TrainResult:
    """What a finished run reports (main rank's view)."""

    out: Path
    model: DynamicViT
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
    prog = "python -m compress.masked_ft" if masked else "python -m compress.train"
    doc = (sys.modules["compress.masked_ft"].__doc__ if masked else __doc__) or ""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=exit_codes_epilog()
    )
    add_version_argument(parser)
    add = parser.add_argument
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
                      help=f"'{DEMO_MODEL}' ({DEMO_BACKBONE} with {DEMO_BACKBONE_KWARGS}), a registered DynamicViT "
                      "variant or a timm ViT name; ignored with --init/--resume (the checkpoint decides)")
    arch.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's, 64 for the demo)")
    arch.add_argument("--patch-size", type=int, default=None, help="override the model's patch size (default: the model's)")
    arch.add_argument("--embed-dim", type=int, default=None, help="override the model's width (default: the model's)")
    arch.add_argument("--depth", type=int, default=None, help="override the model's depth (default: the model's)")
    arch.add_argument("--num-heads", type=int, default=None, help="override the model's head count (default: the model's)")
    arch.add_argument("--pruning-locations", type=_locations, default=None,
                      help="blocks before which the prediction modules run, e.g. 3,6,9 (default: 1,3,5 for demo-vit, "
                      "else depth/4, depth/2, 3depth/4)")
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
    opt.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    opt.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs, help="linear warm-up length")
    opt.add_argument("--batch-size", "-b", type=int, default=defaults.batch_size, help="images per process and step")
    opt.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 x global batch / 1024)")
    opt.add_argument("--min-lr", type=float, default=defaults.min_lr, help="final rate of the cosine schedule")
    opt.add_argument("--warmup-lr", type=float, default=defaults.warmup_lr, help="rate at the first step")
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
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
    del add
    return parser


def config_from_args(args: argparse.Namespace, mode: str | None = None) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values["mode"] = mode or ("dense" if getattr(args, "dense", False) else "dynamicvit")
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- model building


def build_model(cfg: TrainConfig, num_classes: int, image_size: int | None) -> tuple[DynamicViT, str]:
    """The student, from --init or from a name; returns (model, where its weights came from)."""
    keep = cfg.keep_ratio if cfg.mode == "dynamicvit" else 1.0
    if cfg.init:
        loaded = load_dynamicvit(cfg.init)
        model = loaded.model
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
        head = model.num_classes
        if head != num_classes:
            raise CheckpointError(f"--init {cfg.init} has a {head}-class head but the data has {num_classes} classes")
        source = cfg.init
    else:
        kwargs = dict(DEMO_BACKBONE_KWARGS) if cfg.model == DEMO_MODEL else {}
        name = DEMO_BACKBONE if cfg.model == DEMO_MODEL else cfg.model
        overrides = {"img_size": cfg.img_size or image_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
                     "depth": cfg.depth, "num_heads": cfg.num_heads}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        kwargs["num_classes"] = num_classes
        if cfg.drop_path:
            kwargs["drop_path_rate"] = cfg.drop_path
        locations = cfg.pruning_locations
        if locations is None and cfg.model == DEMO_MODEL and kwargs["depth"] == DEMO_BACKBONE_KWARGS["depth"]:
            locations = DEMO_PRUNING_LOCATIONS
        try:
            model = create_dynamicvit(name, keep, locations, **kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            if isinstance(exc, PipelineError):
                raise
            raise PipelineError(f"cannot build {name} with {kwargs}: {exc}") from None
        source = "random initialisation"
    model.config = replace(model.config, keep_ratio=keep)
    model.keep_ratio = keep
    return model, source


def model_image_size(model: DynamicViT) -> int:
    return int(model.patch_embed.img_size[0])


def load_resume_state(path: str | Path) -> tuple[DynamicViT, dict]:
    """Model and the training state stored beside it (optimizer, EMA, step, RNG) in a checkpoint.pth."""
    weights, rest = read_checkpoint_file(path)
    if not isinstance(rest.get("config"), dict) or "optimizer" not in rest or "step" not in rest:
        raise CheckpointError(f"{path} is not a resumable training checkpoint (no config/optimizer/step)")
    model = dynamicvit_from_config(DynamicViTConfig.from_dict(rest["config"]))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match its config ({str(exc).splitlines()[0]})") from None
    return model, rest


def build_teacher(cfg: TrainConfig, student: DynamicViT, env: engine.DistEnv, stored: dict | None = None) -> DynamicViT:
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


class TrainForward(nn.Module):
    """The training forward of each mode, as one module so DistributedDataParallel can wrap it."""

    def __init__(self, model: DynamicViT, mode: str, mask_ratio_min: float = 0.0, mask_ratio_max: float = 0.0):
        super().__init__()
        self.model, self.mode = model, mode
        self.mask_ratio_min, self.mask_ratio_max = mask_ratio_min, mask_ratio_max

    def forward(self, images: torch.Tensor):
        if self.mode == "dynamicvit":
            return self.model.forward_masked(images)
        if self.mode == "masked":
            return forward_randomly_masked(self.model, images, self.mask_ratio_min, self.mask_ratio_max)
        return self.model.forward_dense(images)[0]


def classification_loss_fn(cfg: TrainConfig, mixup_enabled: bool):
    if mixup_enabled:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=cfg.smoothing)
    return F.cross_entropy


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; every rank calls this, the main rank writes files."""
    _validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = engine.init_distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        engine.shutdown_distributed()


def _train(cfg: TrainConfig, env: engine.DistEnv) -> TrainResult:
    out = engine.prepare_output(cfg.out) if env.is_main else Path(cfg.out)
    engine.barrier(env)
    resume_state = None
    if cfg.resume:
        resume_path = Path(cfg.out) / CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume)
        model, resume_state = load_resume_state(resume_path)
        stored = resume_state.get("training", {})
        if stored.get("mode", cfg.mode) != cfg.mode:
            raise PipelineError(f"{resume_path} was a '{stored.get('mode')}' run, not '{cfg.mode}'")
        # The run's identity (what is trained, on what, against which teacher) comes from the checkpoint;
        # length, output and run-time options come from the command line.
        for name in ("data", "init", "teacher", "keep_ratio", "mask_ratio_min", "mask_ratio_max", "seed"):
            if name in stored:
                setattr(cfg, name, stored[name])
        source = str(resume_path)

    torch.manual_seed(cfg.seed)
    train_set, eval_set, spec = build_datasets(cfg.data, cfg.img_size, cfg.train_split, cfg.eval_split)
    if cfg.limit_train:
        train_set = Subset(train_set, range(min(cfg.limit_train, len(train_set))))
    if cfg.limit_eval:
        eval_set = Subset(eval_set, range(min(cfg.limit_eval, len(eval_set))))
    if resume_state is None:
        model, source = build_model(cfg, spec.num_classes, spec.image_size)
    if model_image_size(model) != spec.image_size:
        if cfg.data == DEMO_DATASET and cfg.img_size is None:
            train_set, eval_set, spec = build_datasets(cfg.data, model_image_size(model))
        else:
            raise PipelineError(f"the model takes {model_image_size(model)}-pixel images but --img-size/data gives {spec.image_size}")
    model.to(env.device)
    torch.manual_seed(cfg.seed + env.rank)

    if cfg.mode == "dynamicvit":
        groups = engine.dynamicvit_param_groups(model, cfg.weight_decay, cfg.backbone_lr_scale, cfg.backbone_frozen_epochs)
        teacher = build_teacher(cfg, model, env, resume_state.get("teacher") if resume_state else None)
    else:
        groups = engine.backbone_param_groups(model, cfg.weight_decay)
        teacher = None
    global_batch = cfg.batch_size * env.world_size
    base_lr = cfg.lr if cfg.lr is not None else engine.scaled_lr(1e-3, global_batch)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, weight_decay=cfg.weight_decay)
    ema = engine.ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    amp_dtype = _amp_dtype(cfg, env.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    forward = TrainForward(model, cfg.mode, cfg.mask_ratio_min, cfg.mask_ratio_max)
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)
    train_loader, eval_loader = build_loaders(train_set, eval_set, cfg.batch_size, cfg.workers, cfg.seed, env.rank, env.world_size)
    per_epoch = steps_per_epoch(len(train_set), cfg.batch_size, env.world_size)
    total_steps = per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * per_epoch))
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, spec.num_classes)
    classification_loss = classification_loss_fn(cfg, mixup is not None)
    weights = LossWeights(cfg.ratio_weight, cfg.distill_weight, cfg.token_distill_weight)
    eval_keep = cfg.keep_ratio if cfg.mode == "dynamicvit" else 1.0

    start_epoch, step, history = 0, 0, []
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if ema is not None and "model_ema" in resume_state:
            ema.load_state_dict(resume_state["model_ema"])
        if "scaler" in resume_state and scaler.is_enabled():
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
        history = list(resume_state.get("history", []))
        rng = resume_state.get("rng", {})
        if env.is_main and "torch" in rng:
            torch.set_rng_state(rng["torch"])
            if env.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            torch.manual_seed(cfg.seed + 7919 * env.rank + step)
        if env.is_main:
            print(f"resumed from {source}: epoch {start_epoch}, step {step}", file=sys.stderr)

    log = engine.JsonLinesLog(out / LOG_NAME, enabled=env.is_main)
    metadata = {
        "training": {**cfg.to_dict(), "lr_resolved": base_lr, "world_size": env.world_size, "init_source": source},
        "data": asdict(spec),
    }
    if env.is_main:
        counts = model.stage_keep_counts() if cfg.mode == "dynamicvit" else "all"
        print(f"{cfg.mode}: {model.config.backbone} {model.config.backbone_kwargs} | {len(train_set)} train / "
              f"{len(eval_set)} eval images | {per_epoch} steps/epoch x {cfg.epochs} | global batch {global_batch} | "
              f"lr {base_lr:.3g} | keep {eval_keep} -> tokens {counts} | from {source}", file=sys.stderr)

    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        train_loader.sampler.set_epoch(epoch)
        sums = torch.zeros(6, dtype=torch.float64)  # loss, cls, ratio, kl, token_mse, batches
        keep_sums = torch.zeros(len(model.config.pruning_locations), dtype=torch.float64)
        lr = base_lr
        batches = engine.progress_bar(train_loader, len(train_loader), f"epoch {epoch + 1}/{cfg.epochs}", env.is_main)
        for images, labels in batches:
            lr = engine.scheduled_lr(step, base_lr, cfg.min_lr, warmup_steps, total_steps, cfg.warmup_lr)
            engine.apply_lr(optimizer, lr, epoch)
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = forward(images)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits, teacher_tokens = teacher.forward_dense(images)
                    loss, terms = dynamicvit_loss(output, teacher_logits, teacher_tokens, labels, cfg.keep_ratio,
                                                  weights, classification_loss)
                    keep_sums += torch.tensor([float(d.detach().mean()) for d in output.stage_decisions], dtype=torch.float64)
                else:
                    loss = classification_loss(output.float(), labels)
                    terms = {"cls": float(loss.detach())}
            if not torch.isfinite(loss):
                raise PipelineError(f"loss became {float(loss)} at step {step} (epoch {epoch + 1}): lower --lr or "
                                    f"--keep's distance from 1, raise --clip-grad strength, or --resume from the last checkpoint")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            step += 1
            sums += torch.tensor([float(loss.detach()), terms.get("cls", 0.0), terms.get("ratio", 0.0),
                                  terms.get("kl", 0.0), terms.get("token_mse", 0.0), 1.0], dtype=torch.float64)
        reduced = engine.all_reduce_sum(torch.cat([sums, keep_sums]).to(env.device), env).cpu()
        sums, keep_sums = reduced[:6], reduced[6:]
        batches_seen = max(float(sums[5]), 1.0)
        metrics = engine.evaluate(model, eval_loader, eval_keep, env, amp_dtype, top_k=(1, 5))
        record = {
            "epoch": epoch + 1, "step": step, "lr": lr,
            "train_loss": float(sums[0]) / batches_seen, "train_cls": float(sums[1]) / batches_seen,
            "eval_keep_ratio": eval_keep, "eval_top1": metrics["top1"], "eval_top5": metrics["top5"],
        }
        if cfg.mode == "dynamicvit":
            record.update(train_ratio=float(sums[2]) / batches_seen, train_kl=float(sums[3]) / batches_seen,
                          train_token_mse=float(sums[4]) / batches_seen,
                          train_keep_fraction=[round(float(v) / batches_seen, 4) for v in keep_sums])
        if ema is not None:
            record["eval_top1_ema"] = engine.evaluate(ema.module, eval_loader, eval_keep, env, amp_dtype)["top1"]
        record["seconds"] = round(time.time() - started, 2)
        history.append(record)
        log.write(record)
        if env.is_main:
            ema_text = f" (EMA {record['eval_top1_ema']:.2f})" if ema is not None else ""
            keep_text = f" keep {record['train_keep_fraction']}" if cfg.mode == "dynamicvit" else ""
            print(f"epoch {epoch + 1}/{cfg.epochs} step {step} loss {record['train_loss']:.4f}{keep_text} "
                  f"eval@{eval_keep} top1 {metrics['top1']:.2f}{ema_text} [{record['seconds']:.1f}s]", file=sys.stderr)
            state = {
                "model": model.state_dict(), "config": model.config.to_dict(), **metadata,
                "epoch": epoch + 1, "step": step, "metrics": record, "history": history,
                "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if env.device.type == "cuda" else {})},
            }
            if ema is not None:
                state["model_ema"] = ema.state_dict()
            if teacher is not None and not (cfg.init or cfg.teacher):
                state["teacher"] = teacher.state_dict()
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            atomic_torch_save(state, out / CHECKPOINT_NAME)
        engine.barrier(env)
        if cfg.stop_after is not None and epoch + 1 >= cfg.stop_after and epoch + 1 < cfg.epochs:
            if env.is_main:
                print(f"stopped after epoch {epoch + 1} of {cfg.epochs}: continue with --resume", file=sys.stderr)
            return TrainResult(out, model, epoch + 1, step, history[-1], history)

    final = history[-1] if history else {}
    if env.is_main:
        summary = {**metadata, "epoch": cfg.epochs, "step": step, "metrics": final}
        atomic_torch_save({"model": model.state_dict(), "config": model.config.to_dict(), **summary}, out / MODEL_NAME)
        if ema is not None:
            atomic_torch_save({"model": ema.state_dict(), "config": model.config.to_dict(), **summary, "ema_decay": cfg.ema_decay},
                              out / EMA_NAME)
    engine.barrier(env)
    return TrainResult(out, model, cfg.epochs, step, final, history)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    print_checkpoint_location(train(config), config.epochs)
    return 0


def print_checkpoint_location(result: TrainResult, epochs: int) -> None:
    """The run's last line says where its weights went (main rank only: every torchrun rank returns here)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.epochs >= epochs:
        print(f"checkpoint written to {result.out / MODEL_NAME}")
    else:
        print(f"stopped after epoch {result.epochs}: resumable checkpoint written to {result.out / CHECKPOINT_NAME}")


if __name__ == "__main__":
    from compress.cli import run_cli

    raise SystemExit(run_cli(main))
