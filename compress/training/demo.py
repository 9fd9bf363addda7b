"""``python -m compress.demo``: the built-in demo model, trained from scratch in one command.

On the demo dataset (scikit-learn digits on a 64x64 canvas, 64 patch tokens) it trains
1. a full-image base ViT (``demo-vit``: width 64, depth 6, prediction modules before blocks 1, 3, 5),
2. its masked-fine-tuned version (random patches removed from the sequence),
3. DynamicViT at each ``--keeps`` ratio from each of the two; each DynamicViT's frozen teacher is
   the model it starts from (the recipe's "unpruned original backbone"),
then writes OUT/results.json and ships the better DynamicViT at ``--ship-keep`` (by test accuracy)
to ``compress/demo_models/dynamicvit_demo.pth``, the export stage's default model.

``python -m compress.seed_grid`` trains the same runs at several seeds and reports their means with 95 % intervals.

Other stages import the shipped checkpoint's path from ``compress.models.checkpoint.demo_checkpoint_path`` and the
data from ``compress.data.datasets.demo_dataset``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from compress.data.datasets import demo_dataset
from compress.models.checkpoint import atomic_torch_save, demo_checkpoint_path, read_checkpoint_file
from compress.plumbing.cli import HelpFormatter, add_version_argument, exit_codes_epilog
from compress.plumbing.errors import PipelineError
from compress.training.train import MODEL_NAME, TrainConfig, train

DESCRIPTION = "The built-in demo model, trained from scratch in one command: base, masked fine-tuning, DynamicViT."


@dataclass(frozen=True)
class DemoRecipe:
    """The training recipe of the shipped model: every value is a flag of ``compress.demo`` (and of
    ``compress.seed_grid``, which trains the same runs at several seeds). The ``*_run`` methods give each run's
    ``TrainConfig`` options, less the output folder, the init, the seed and the run-time options."""

    base_epochs: int = 40
    base_lr: float = 2e-3
    masked_epochs: int = 10
    masked_lr: float = 1e-3
    mask_ratio_min: float = 0.0
    mask_ratio_max: float = 0.75
    dynamicvit_epochs: int = 12
    dynamicvit_lr: float = 1e-3
    dynamicvit_batch_size: int = 32
    backbone_lr_scale: float = 0.1
    backbone_frozen_epochs: int = 1
    ema_decay: float = 0.99
    batch_size: int = 64
    warmup_epochs: float = 2.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DemoRecipe":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def _shared(self) -> dict:
        return dict(batch_size=self.batch_size, ema_decay=self.ema_decay, warmup_epochs=self.warmup_epochs)

    def base_run(self) -> dict:
        """The full-image base: plain supervised training from random weights."""
        return dict(mode="dense", epochs=self.base_epochs, lr=self.base_lr, **self._shared())

    def finetune_run(self, masked: bool = True) -> dict:
        """Masked fine-tuning of the base, or (``masked`` False) the control: the same epochs with no patch removed."""
        low, high = (self.mask_ratio_min, self.mask_ratio_max) if masked else (0.0, 0.0)
        return dict(mode="masked", epochs=self.masked_epochs, lr=self.masked_lr, mask_ratio_min=low, mask_ratio_max=high,
                    **self._shared())

    def dynamicvit_run(self, keep: float) -> dict:
        """DynamicViT at ``keep`` (its teacher is the model it starts from)."""
        return dict(mode="dynamicvit", keep_ratio=keep, epochs=self.dynamicvit_epochs, lr=self.dynamicvit_lr,
                    backbone_lr_scale=self.backbone_lr_scale, backbone_frozen_epochs=self.backbone_frozen_epochs,
                    **{**self._shared(), "batch_size": self.dynamicvit_batch_size})


DEMO_RECIPE = DemoRecipe()
# The shipped model's choices besides its training recipe (each also a flag of this command).
DEFAULTS = dict(keeps="0.7", ship_keep=0.7, seed=0)


def demo_loader(split: str = "test", batch_size: int = 64):
    """A DataLoader over the demo dataset's fixed split (no shuffling): calibration and validation images."""
    return DataLoader(demo_dataset(split, random_placement=False), batch_size=batch_size, shuffle=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress.demo", description=DESCRIPTION,
                                     formatter_class=HelpFormatter, epilog=exit_codes_epilog())
    add_version_argument(parser)
    add = parser.add_argument
    add("--out", "-o", default="runs/demo", help="folder of every run (base/, masked/, dynamicvit_<init>_<keep>/)")
    add_recipe_arguments(parser)
    add("--keeps", default=DEFAULTS["keeps"], help="comma-separated keep ratios to train DynamicViT at (e.g. 0.9,0.7,0.5,0.3)")
    add("--ship-keep", type=float, default=DEFAULTS["ship_keep"], help="keep ratio of the shipped model (must be in --keeps)")
    add("--ship", default=str(demo_checkpoint_path()), help="where the chosen DynamicViT is written ('' : nowhere)")
    add("--control", action="store_true",
        help="also fine-tune the base for --masked-epochs WITHOUT masking and train DynamicViT from it: "
        "separates the effect of masking from that of the extra epochs (default: off)")
    add("--reuse", action="store_true", help="skip a run whose OUT/<run>/model.pth already exists (e.g. to add keep ratios)")
    add("--seed", type=int, default=DEFAULTS["seed"], help="seed of every run")
    add("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice; 1 on a machine other jobs share)")
    return parser


def add_recipe_arguments(parser) -> None:
    """The ``DemoRecipe`` flags with the shipped model's values as defaults, on a parser or an argument group."""
    recipe, add = DEMO_RECIPE, parser.add_argument
    add("--base-epochs", type=int, default=recipe.base_epochs, help="epochs of the full-image base")
    add("--base-lr", type=float, default=recipe.base_lr, help="peak rate of the base")
    add("--masked-epochs", type=int, default=recipe.masked_epochs, help="epochs of masked fine-tuning")
    add("--masked-lr", type=float, default=recipe.masked_lr, help="peak rate of masked fine-tuning")
    add("--mask-ratio-min", type=float, default=recipe.mask_ratio_min, help="mask ratio drawn per batch from [min, max]")
    add("--mask-ratio-max", type=float, default=recipe.mask_ratio_max, help="upper end of the mask ratio")
    add("--dynamicvit-epochs", type=int, default=recipe.dynamicvit_epochs, help="epochs of each DynamicViT run")
    add("--dynamicvit-lr", type=float, default=recipe.dynamicvit_lr, help="predictors' peak rate")
    add("--dynamicvit-batch-size", type=int, default=recipe.dynamicvit_batch_size, help="images per DynamicViT step")
    add("--backbone-lr-scale", type=float, default=recipe.backbone_lr_scale, help="backbone rate / predictors' rate")
    add("--backbone-frozen-epochs", type=int, default=recipe.backbone_frozen_epochs, help="epochs the backbone is still")
    add("--ema-decay", type=float, default=recipe.ema_decay, help="per-step EMA decay (0: off)")
    add("--batch-size", type=int, default=recipe.batch_size, help="images per step of the base and masked runs")
    add("--warmup-epochs", type=float, default=recipe.warmup_epochs, help="warm-up of every run")


def _run(name: str, out: Path, reuse: bool, **options) -> dict:
    """Train one stage (or reuse it); returns its final metrics and duration."""
    folder = out / name
    if reuse and (folder / MODEL_NAME).is_file():
        _, rest = read_checkpoint_file(folder / MODEL_NAME)
        print(f"[demo] {name}: reusing {folder / MODEL_NAME}", file=sys.stderr)
        return {"top1": rest["metrics"]["eval_top1"], "seconds": None, "model": str(folder / MODEL_NAME), "reused": True}
    print(f"[demo] {name}: training", file=sys.stderr)
    started = time.time()
    result = train(TrainConfig(out=str(folder), **options))
    return {"top1": result.metrics["eval_top1"], "top1_ema": result.metrics.get("eval_top1_ema"),
            "seconds": round(time.time() - started, 1), "model": str(folder / MODEL_NAME)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    if args.ship and args.ship_keep not in keeps:
        raise PipelineError(f"--ship-keep {args.ship_keep} is not one of --keeps {keeps}")
    out = Path(args.out)
    recipe = DemoRecipe.from_args(args)
    common = dict(seed=args.seed, device=args.device, threads=args.threads)
    started = time.time()
    results = {"recipe": vars(args), "runs": {}}
    runs = results["runs"]
    runs["base"] = _run("base", out, args.reuse, **recipe.base_run(), **common)
    runs["masked"] = _run("masked", out, args.reuse, init=runs["base"]["model"], **recipe.finetune_run(masked=True),
                          **common)
    inits = ("base", "masked")
    if args.control:
        runs["finetuned"] = _run("finetuned", out, args.reuse, init=runs["base"]["model"],
                                 **recipe.finetune_run(masked=False), **common)
        inits += ("finetuned",)
    for keep in keeps:
        for init in inits:
            name = f"dynamicvit_{init}_{keep}"
            runs[name] = _run(name, out, args.reuse, init=runs[init]["model"], **recipe.dynamicvit_run(keep), **common)
    results["seconds"] = round(time.time() - started, 1)
    print(f"[demo] base top1 {runs['base']['top1']:.2f}  masked top1 {runs['masked']['top1']:.2f}", file=sys.stderr)
    for keep in keeps:
        base, masked = runs[f"dynamicvit_base_{keep}"]["top1"], runs[f"dynamicvit_masked_{keep}"]["top1"]
        control = f"  from unmasked fine-tuned {runs[f'dynamicvit_finetuned_{keep}']['top1']:.2f}" if args.control else ""
        print(f"[demo] DynamicViT keep {keep}: from base {base:.2f}  from masked {masked:.2f}{control}", file=sys.stderr)
    if args.ship:
        base_run, masked_run = runs[f"dynamicvit_base_{args.ship_keep}"], runs[f"dynamicvit_masked_{args.ship_keep}"]
        chosen = "masked" if masked_run["top1"] > base_run["top1"] else "base"
        results["shipped"] = {"init": chosen, "keep_ratio": args.ship_keep, "path": args.ship}
        ship(Path(runs[f"dynamicvit_{chosen}_{args.ship_keep}"]["model"]), Path(args.ship), chosen, argv)
        print(f"[demo] shipped DynamicViT from the {chosen} init -> {args.ship}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"[demo] done in {results['seconds']:.0f} s; results in {out / 'results.json'}", file=sys.stderr)
    return 0


def ship(source: Path, target: Path, init: str, argv: Sequence[str] | None) -> None:
    """Copy a trained DynamicViT with its config and metadata (no optimizer state) to ``target``."""
    weights, rest = read_checkpoint_file(source)
    keep = ("config", "data", "training", "metrics", "epoch", "step")
    command = "python -m compress.demo " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_torch_save({"model": weights, **{k: rest[k] for k in keep if k in rest},
                       "demo": {"init": init, "command": command.strip(), "torch": str(torch.__version__)}}, target)
