"""``python -m calibration.sweep``: choose a keep ratio for a latency budget.

For one checkpoint it exports the model at every keep ratio of a grid (with ``--tocom``, also with the ToCom
plugin merged for rho_train -> keep), measures top-1 accuracy on an evaluation set with ONNX Runtime and
latency on the chosen backend, prints the table, saves a plot of accuracy against latency with the Pareto
front marked, and with ``--latency-budget`` picks the most accurate keep ratio within the budget.
Without labels (random images) accuracy is replaced by top-1 agreement with the dense model.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from compress.cli import run_cli
from compress.errors import PipelineError

DEFAULT_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
RANDOM_EVAL_IMAGES = 64


class SweepError(PipelineError):
    """A sweep option that cannot be honoured."""


@dataclass
class SweepRow:
    keep: float
    variant: str  # "plain" or "tocom"
    tokens: list[int]  # patch tokens kept after each stage ([] when dense)
    macs_g: float
    accuracy: float | None  # percent; None when not measured (e.g. ToCom off its grid)
    latency_ms: float | None  # median
    latency_p90_ms: float | None
    pareto: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- pure functions


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points: True where no other point is at least as fast and as accurate and
    strictly better in one of the two."""
    flags = []
    for i, (latency, accuracy) in enumerate(points):
        dominated = any(
            other_latency <= latency and other_accuracy >= accuracy
            and (other_latency < latency or other_accuracy > accuracy)
            for j, (other_latency, other_accuracy) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def mark_pareto(rows: list[SweepRow]) -> None:
    measured = [r for r in rows if r.accuracy is not None and r.latency_ms is not None]
    for row, flag in zip(measured, pareto_flags([(r.latency_ms, r.accuracy) for r in measured])):
        row.pareto = flag


def choose_keep(rows: list[SweepRow], budget_ms: float, min_accuracy: float | None = None) -> tuple[SweepRow | None, str]:
    """The most accurate row within the latency budget (ties: the faster, then the higher keep), and why."""
    measured = [r for r in rows if r.accuracy is not None and r.latency_ms is not None]
    within = [r for r in measured if r.latency_ms <= budget_ms]
    if not within:
        fastest = min(measured, key=lambda r: r.latency_ms, default=None)
        detail = f"; the fastest is keep {fastest.keep:g} at {fastest.latency_ms:.2f} ms" if fastest else ""
        return None, f"no keep ratio meets the {budget_ms:g} ms budget{detail}"
    best = max(within, key=lambda r: (r.accuracy, -r.latency_ms, r.keep))
    if min_accuracy is not None and best.accuracy < min_accuracy:
        return None, (f"within {budget_ms:g} ms the best is keep {best.keep:g} ({label(best)}) at {best.accuracy:.2f}%, "
                      f"below --min-accuracy {min_accuracy:g}%")
    reason = (f"keep {best.keep:g} ({label(best)}): {best.accuracy:.2f}% at {best.latency_ms:.2f} ms, the most "
              f"accurate of the {len(within)} setting(s) within {budget_ms:g} ms")
    over = [r for r in measured if r.latency_ms > budget_ms and r.accuracy > best.accuracy]
    if over:
        nearest = min(over, key=lambda r: r.latency_ms)
        reason += (f"; keep {nearest.keep:g} ({label(nearest)}) would give {nearest.accuracy:.2f}% but needs "
                   f"{nearest.latency_ms:.2f} ms")
    if min_accuracy is not None:
        reason += f"; meets --min-accuracy {min_accuracy:g}%"
    return best, reason


def label(row: SweepRow) -> str:
    return "with ToCom" if row.variant == "tocom" else "no ToCom"


def format_table(rows: list[SweepRow], metric: str) -> str:
    lines = [f"{'keep':>5} {'variant':<7} {'tokens/stage':<16} {'GMACs':>7} {metric:>10} {'median ms':>10} "
             f"{'p90 ms':>8}  pareto"]
    for r in rows:
        accuracy = f"{r.accuracy:>10.2f}" if r.accuracy is not None else f"{'-':>10}"
        latency = f"{r.latency_ms:>10.3f} {r.latency_p90_ms:>8.3f}" if r.latency_ms is not None else f"{'-':>10} {'-':>8}"
        tokens = "/".join(map(str, r.tokens)) or "dense"
        lines.append(f"{r.keep:>5g} {r.variant:<7} {tokens:<16} {r.macs_g:>7.3f} {accuracy} {latency}  "
                     f"{'*' if r.pareto else ''}{('  ' + r.note) if r.note else ''}")
    return "\n".join(lines)


PLOT_INSTALL_HINT = "no plot: matplotlib is not installed (pip install matplotlib)"


def plot_sweep(rows: list[SweepRow], path: Path, metric: str, title: str, budget_ms: float | None = None,
               chosen: SweepRow | None = None) -> Path | None:
    """Accuracy against latency, one series per variant, the Pareto front drawn and the choice circled.

    Returns the PNG's path, or None when matplotlib is not installed (the table and JSON are still written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for variant, marker in (("plain", "o"), ("tocom", "s")):
        series = [r for r in rows if r.variant == variant and r.accuracy is not None and r.latency_ms is not None]
        if not series:
            continue
        axes.scatter([r.latency_ms for r in series], [r.accuracy for r in series], marker=marker, label=label(series[0]))
        for r in series:
            axes.annotate(f"{r.keep:g}", (r.latency_ms, r.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.latency_ms)
    if front:
        axes.plot([r.latency_ms for r in front], [r.accuracy for r in front], "k--", linewidth=1, label="Pareto front")
    if budget_ms is not None:
        axes.axvline(budget_ms, color="red", linewidth=1, label=f"budget {budget_ms:g} ms")
    if chosen is not None:
        axes.scatter([chosen.latency_ms], [chosen.accuracy], s=200, facecolors="none", edgecolors="red",
                     label=f"chosen: keep {chosen.keep:g}")
    axes.set_xlabel("median latency (ms)")
    axes.set_ylabel(metric)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------- glue


def load_model(checkpoint: Path | None, model_name: str | None):
    """(model, label, checkpoint metadata, is the demo model)."""
    from compress.checkpoint import load_dynamicvit

    if checkpoint is not None:
        loaded = load_dynamicvit(checkpoint, model_name=model_name)
        return loaded.model, checkpoint.stem, loaded.metadata, False
    try:
        from compress.demo import demo_checkpoint_path

        demo = Path(demo_checkpoint_path())
    except ImportError:
        demo = None
    if demo is not None and demo.is_file() and model_name is None:
        loaded = load_dynamicvit(demo)
        return loaded.model, "demo", loaded.metadata, True
    import torch

    from compress.dynamicvit import create_dynamicvit

    torch.manual_seed(0)
    name = model_name or "dynamicvit_deit_small"
    return create_dynamicvit(name, keep_ratio=0.7), f"{name}-random", {}, False


def evaluation_set(source: str | None, model, metadata: dict, is_demo: bool, num_images: int, seed: int):
    """(images, labels or None, description)."""
    from calibration.data import load_calibration_set, preprocessing_for

    if source is None and is_demo:
        source = "demo"
    if source is None:
        generator = np.random.default_rng(seed)
        channels, (height, width) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
        count = num_images or RANDOM_EVAL_IMAGES
        return generator.standard_normal((count, channels, height, width)).astype(np.float32), None, f"{count} random images"
    evaluation = load_calibration_set(source, preprocessing_for(model, metadata), num_images or 10**9, seed,
                                      demo_split="test")
    name = "demo test split" if source == "demo" else evaluation.info["source"]
    return evaluation.images, evaluation.labels, f"{name} ({len(evaluation.images)} images)"


def merge_tocom_or_fail(model, plugin: Path, keep: float, scale: float | None) -> tuple[object | None, str]:
    """(a copy of ``model`` with ToCom(rho_train -> keep) merged, "") or (None, why not)."""
    try:
        from compress.tocom import merge_plugin_file
    except ImportError:
        raise SweepError("--tocom needs compress.tocom.merge_plugin_file, which is not in this checkout") from None
    from compress.tocom import OffGridKeepRatio

    merged = copy.deepcopy(model)
    try:
        merge_plugin_file(merged, plugin, target_keep=keep, scale=scale)
    except OffGridKeepRatio as exc:
        return None, f"ToCom: {exc}"
    return merged, ""


def export_graph(model, keep: float, precision: str, calibration: np.ndarray | None, batch_size: int, backend: str):
    """The timed graph; INT8 on ONNX Runtime's CPU provider quantises product outputs too (its integer kernels
    need them), on CUDA the TensorRT placement is kept."""
    from export.deploy import deploy_copy
    from export.onnx_export import export_onnx

    graph = export_onnx(deploy_copy(model, keep), "native", batch_size=batch_size)
    if precision == "int8":
        from calibration.int8 import Int8Options, quantize_for_export

        graph, _ = quantize_for_export(graph, calibration, "ort", Int8Options(quantize_outputs=backend == "ort-cpu"))
    return graph


def measure_latency(graph, backend: str, batch_size: int, threads: int, warmup: int, iterations: int) -> dict:
    import tempfile

    import onnx

    from export.bench import ort_runner, summarise, time_runs

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.onnx"
        onnx.save(graph, str(path))
        run = ort_runner(path, backend, batch_size, threads)
    return summarise(time_runs(run, warmup, iterations))


def sweep(model, keeps: Sequence[float], images: np.ndarray, labels: np.ndarray | None, args,
          calibration: np.ndarray | None) -> list[SweepRow]:
    from calibration.evaluate import onnx_logits, top1_accuracy, top1_agreement
    from compress.complexity import analytic_macs, vit_shape
    from compress.token_select import keep_counts

    shape = vit_shape(model)
    stages = len(model.config.pruning_locations)
    rows, dense_logits = [], None
    variants = ["plain"] + (["tocom"] if args.tocom else [])
    for keep in keeps:
        tokens = [] if keep >= 1.0 else keep_counts(keep, model.num_patches, stages)
        latency = None
        for variant in variants:
            source, note = (model, "") if variant == "plain" else merge_tocom_or_fail(model, args.tocom, keep, args.tocom_scale)
            row = SweepRow(keep, variant, tokens, analytic_macs(shape, keep) / 1e9, None, None, None, note=note)
            rows.append(row)
            if source is None:
                continue
            graph = export_graph(source, keep, args.precision, calibration, args.batch_size, args.backend)
            logits = onnx_logits(graph, images)
            if dense_logits is None and keep >= 1.0 and variant == "plain":
                dense_logits = logits
            if labels is not None:
                row.accuracy = top1_accuracy(logits, labels)
            elif dense_logits is not None:
                row.accuracy = top1_agreement(logits, dense_logits)
            if latency is None:  # ToCom is merged into the weights: the same graph cost
                latency = measure_latency(graph, args.backend, args.batch_size, args.threads, args.warmup, args.iterations)
            row.latency_ms, row.latency_p90_ms = latency["median_ms"], latency["p90_ms"]
            print(f"  keep {keep:g} {variant}: {row.accuracy if row.accuracy is not None else float('nan'):.2f} "
                  f"at {row.latency_ms:.3f} ms", file=sys.stderr, flush=True)
    mark_pareto(rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m calibration.sweep", 
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", "-c", type=Path, default=None,
                        help="DynamicViT checkpoint (None: the shipped demo model, else a random dynamicvit_deit_small)")
    parser.add_argument("--model", "-m", default=None, help="architecture when the checkpoint does not record it")
    parser.add_argument("--keeps", type=float, nargs="+", default=list(DEFAULT_KEEPS), help="keep ratios to measure")
    parser.add_argument("--tocom", type=Path, default=None, help="ToCom plugin: also measure each keep with it merged")
    parser.add_argument("--tocom-scale", type=float, default=None, help="ToCom scale s (None: the plugin's default)")
    parser.add_argument("--eval-data", default=None,
                        help="'demo' (test split), an image folder (root/<class>/...) or .npz with 'images' and "
                             "'labels' (None: demo for the demo model, else random images and agreement with dense)")
    parser.add_argument("--eval-images", type=int, default=0, help="evaluate on a seeded sample of N images (0: all)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="graph precision; int8 quantises each keep with ONNX Runtime's Q/DQ (on ort-cpu with "
                             "the products' outputs quantised too, so its integer kernels run)")
    parser.add_argument("--calib-data", default="demo", help="calibration data for --precision int8")
    parser.add_argument("--calib-images", type=int, default=256, help="calibration images for --precision int8")
    parser.add_argument("--backend", choices=("ort-cpu", "ort-cuda"), default="ort-cpu", help="latency backend")
    parser.add_argument("--batch-size", "-b", type=int, default=1, help="batch size of the timed graph")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per keep ratio")
    parser.add_argument("--iterations", "-n", type=int, default=50, help="timed runs per keep ratio")
    parser.add_argument("--latency-budget", type=float, default=None, metavar="MS",
                        help="pick the most accurate keep ratio whose median latency is within MS")
    parser.add_argument("--min-accuracy", type=float, default=None, metavar="PCT",
                        help="with --latency-budget: fail unless the pick reaches PCT percent")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation and calibration samples")
    parser.add_argument("--out", "-o", type=Path, default=Path("sweeps"),
                        help="folder for <label>_sweep.json and <label>_sweep.png")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.keeps or any(not 0.0 < k <= 1.0 for k in args.keeps):
        raise SweepError(f"--keeps must lie in (0, 1], got {args.keeps}")
    if args.min_accuracy is not None and args.latency_budget is None:
        raise SweepError("--min-accuracy needs --latency-budget")
    if args.tocom is not None and not args.tocom.is_file():
        raise SweepError(f"ToCom plugin not found: {args.tocom}")
    model, name, metadata, is_demo = load_model(args.checkpoint, args.model)
    keeps = sorted(set(args.keeps), reverse=True)
    if keeps[0] < 1.0 and args.eval_data is None and not is_demo:
        keeps = [1.0, *keeps]  # agreement with dense needs the dense model
    images, labels, described = evaluation_set(args.eval_data, model, metadata, is_demo, args.eval_images, args.seed)
    calibration = None
    if args.precision == "int8":
        from calibration.data import load_calibration_data

        calibration, _ = load_calibration_data(args.calib_data, model, metadata, args.calib_images, args.seed)
    metric = "top-1 %" if labels is not None else "agree %"
    rows = sweep(model, keeps, images, labels, args, calibration)
    title = (f"{name} ({args.precision}, {args.backend}, batch {args.batch_size}): {metric} on {described}")
    print(f"\n{title}")
    print(format_table(rows, metric))
    chosen, reason = (None, "") if args.latency_budget is None else choose_keep(rows, args.latency_budget, args.min_accuracy)
    from export.bench import environment

    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_sweep(rows, args.out / f"{name}_sweep.png", metric, title, args.latency_budget, chosen)
    record = {"model": name, "evaluation": described, "metric": metric, "precision": args.precision,
              "backend": args.backend, "batch_size": args.batch_size, "rows": [r.to_dict() for r in rows],
              "budget_ms": args.latency_budget, "min_accuracy": args.min_accuracy,
              "chosen": chosen.to_dict() if chosen else None, "reason": reason, "environment": environment()}
    (args.out / f"{name}_sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"plot: {plot or PLOT_INSTALL_HINT}\ntable: {args.out / f'{name}_sweep.json'}")
    if args.latency_budget is None:
        return 0
    print(("chosen: " if chosen else "no choice: ") + reason)
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
