"""``python -m export.sweep``: choose a keep ratio for a latency budget.

For one checkpoint it exports the model at every keep ratio of a grid (with ``--tocom``, also with the ToCom
plugin merged for rho_train -> keep), measures top-1 accuracy on an evaluation set with ONNX Runtime and
latency on the chosen backend, prints the table, saves a plot of accuracy against latency with the Pareto
front marked, and with ``--latency-budget`` picks the most accurate keep ratio within the budget and prints the
``python -m export.build`` command that exports it. Without labels (random images) accuracy is replaced by
top-1 agreement with the dense model. Accuracy and agreement are fractions in [0, 1].
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from matplotlib.figure import Figure

from calibration.data import (
    DEFAULT_NUM_IMAGES,
    check_image_sources,
    load_calibration_data,
    load_calibration_set,
    preprocessing_for,
)
from calibration.int8 import Int8Options, quantize_for_export
from compress.data.images import DEMO_SOURCE
from compress.models.tocom import OffGridKeepRatio
from compress.plumbing.cli import (
    add_version_argument,
    exit_from_cli,
    fraction_argument,
    keep_ratio_argument,
    non_negative_int,
    parser_from_docstring,
    positive_float,
    positive_int,
)
from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write, prepare_output
from export.evaluate import onnx_logits, top1_accuracy, top1_agreement
from export.methods import DynamicViTExport, with_tocom
from export.onnx_export import MIN_OPSET
from export.subject import ExportSubject, load_subject
from export.on_target.bench import environment, ort_runner, summarise, time_runs

DEFAULT_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
RANDOM_EVAL_IMAGES = 64
EXIT_NO_CHOICE = 1


class SweepError(PipelineError):
    """A sweep option that cannot be honoured."""


@dataclass
class SweepRow:
    keep: float
    variant: str  # "plain" or "tocom"
    tokens: list[int]  # patch tokens kept after each stage ([] when dense)
    macs_g: float
    accuracy: float | None  # fraction in [0, 1] (top-1, or agreement with dense); None when not measured
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


def measured(rows: list[SweepRow]) -> list[SweepRow]:
    return [r for r in rows if r.accuracy is not None and r.latency_ms is not None]


def mark_pareto(rows: list[SweepRow]) -> None:
    done = measured(rows)
    for row, flag in zip(done, pareto_flags([(r.latency_ms, r.accuracy) for r in done])):
        row.pareto = flag


def choose_keep(rows: list[SweepRow], budget_ms: float, min_accuracy: float | None = None) -> tuple[SweepRow | None, str]:
    """The most accurate row within the latency budget (ties: the faster, then the higher keep), and why."""
    done = measured(rows)
    within = [r for r in done if r.latency_ms <= budget_ms]
    if not within:
        fastest = min(done, key=lambda r: r.latency_ms, default=None)
        detail = f"; the fastest is keep {fastest.keep:g} at {fastest.latency_ms:.2f} ms" if fastest else ""
        return None, f"no keep ratio meets the {budget_ms:g} ms budget{detail}"
    best = max(within, key=lambda r: (r.accuracy, -r.latency_ms, r.keep))
    if min_accuracy is not None and best.accuracy < min_accuracy:
        return None, (f"within {budget_ms:g} ms the best is keep {best.keep:g} ({label(best)}) at {best.accuracy:.3f}, "
                      f"below --min-accuracy {min_accuracy:g}")
    reason = (f"keep {best.keep:g} ({label(best)}): {best.accuracy:.3f} at {best.latency_ms:.2f} ms, the most "
              f"accurate of the {len(within)} setting(s) within {budget_ms:g} ms")
    over = [r for r in done if r.latency_ms > budget_ms and r.accuracy > best.accuracy]
    if over:
        nearest = min(over, key=lambda r: r.latency_ms)
        reason += (f"; keep {nearest.keep:g} ({label(nearest)}) would give {nearest.accuracy:.3f} but needs "
                   f"{nearest.latency_ms:.2f} ms")
    if min_accuracy is not None:
        reason += f"; meets --min-accuracy {min_accuracy:g}"
    return best, reason


def label(row: SweepRow) -> str:
    return "with ToCom" if row.variant == "tocom" else "no ToCom"


def format_table(rows: list[SweepRow], metric: str) -> str:
    lines = [f"{'keep':>5} {'variant':<7} {'tokens/stage':<16} {'GMACs':>7} {metric:>10} {'median ms':>10} "
             f"{'p90 ms':>8}  pareto"]
    for r in rows:
        accuracy = f"{r.accuracy:>10.3f}" if r.accuracy is not None else f"{'-':>10}"
        latency = f"{r.latency_ms:>10.3f} {r.latency_p90_ms:>8.3f}" if r.latency_ms is not None else f"{'-':>10} {'-':>8}"
        tokens = "/".join(map(str, r.tokens)) or "dense"
        lines.append(f"{r.keep:>5g} {r.variant:<7} {tokens:<16} {r.macs_g:>7.3f} {accuracy} {latency}  "
                     f"{'*' if r.pareto else ''}{('  ' + r.note) if r.note else ''}")
    return "\n".join(lines)


def export_command(chosen: SweepRow, args: argparse.Namespace) -> str:
    """The ``python -m export.build`` line that exports the chosen setting (what the sweep measured)."""
    command = ["python", "-m", "export.build"]
    if args.checkpoint is not None:
        command += ["--checkpoint", str(args.checkpoint)]
    if args.model is not None:
        command += ["--model", args.model]
    command += ["--keep", f"{chosen.keep:g}"]
    if chosen.variant == "tocom":
        command += ["--tocom", str(args.tocom)]
        if args.tocom_scale is not None:
            command += ["--tocom-scale", f"{args.tocom_scale:g}"]
    if args.precision == "int8":
        command += ["--int8", "--calib-data", str(args.calib_data)]
    if args.batch_size != 1:
        command += ["--batch-size", str(args.batch_size)]
    return shlex.join(command)


def sweep_figure(rows: list[SweepRow], metric: str, title: str, budget_ms: float | None = None,
                 chosen: SweepRow | None = None) -> Figure:
    """Accuracy against latency, one series per variant, the Pareto front drawn and the choice circled."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for variant, marker in (("plain", "o"), ("tocom", "s")):
        series = [r for r in measured(rows) if r.variant == variant]
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
    return figure


# ----------------------------------------------------------------------------- glue


def evaluation_set(source: str | None, subject: ExportSubject, num_images: int, seed: int):
    """(images, labels or None, description); no source: the demo test split for the demo model, else random."""
    model = subject.model
    if source is None and subject.label == "demo":
        source = DEMO_SOURCE
    if source is None:
        generator = np.random.default_rng(seed)
        channels, height, width = model.image_shape
        count = num_images or RANDOM_EVAL_IMAGES
        return generator.standard_normal((count, channels, height, width)).astype(np.float32), None, f"{count} random images"
    evaluation = load_calibration_set(source, preprocessing_for(model, subject.metadata), num_images or 10**9, seed,
                                      demo_split="test")
    name = "demo test split" if source == DEMO_SOURCE else evaluation.info["source"]
    return evaluation.images, evaluation.labels, f"{name} ({len(evaluation.images)} images)"


def export_graph(subject: ExportSubject, keep: float, precision: str, calibration: np.ndarray | None,
                 batch_size: int, backend: str) -> onnx.ModelProto:
    """The timed graph; INT8 on ONNX Runtime's CPU provider quantises product outputs too (its integer kernels
    need them), on CUDA the TensorRT placement is kept."""
    method = DynamicViTExport(keep)
    graph = method.export_onnx(method.deploy_copy(subject.model, "fp32"), "native", batch_size, False, MIN_OPSET,
                               with_debug=False)
    if precision == "int8":
        options = Int8Options(quantize_outputs=backend == "ort-cpu")
        graph, _ = quantize_for_export(graph, calibration, "ort", options, float_scopes=method.float_scopes)
    return graph


def measure_latency(graph: onnx.ModelProto, backend: str, batch_size: int, threads: int, warmup: int,
                    iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.onnx"
        onnx.save(graph, str(path))
        run = ort_runner(path, backend, batch_size, threads)
    return summarise(time_runs(run, warmup, iterations))


def variant_subject(subject: ExportSubject, variant: str, args: argparse.Namespace, keep: float):
    """(the subject to export for this variant, "") or (None, why it is not measured)."""
    if variant == "plain":
        return subject, ""
    try:
        return with_tocom(subject, args.tocom, keep, args.tocom_scale)[0], ""
    except OffGridKeepRatio as exc:
        return None, f"ToCom: {exc}"


def sweep(subject: ExportSubject, keeps: Sequence[float], images: np.ndarray, labels: np.ndarray | None,
          args: argparse.Namespace, calibration: np.ndarray | None) -> list[SweepRow]:
    rows, dense_logits = [], None
    variants = ["plain"] + (["tocom"] if args.tocom else [])
    for step, keep in enumerate(keeps, 1):
        # progress only: the figures are printed once, in the table
        print(f"[{step}/{len(keeps)}] keep {keep:g}: export, evaluate, time", file=sys.stderr, flush=True)
        method = DynamicViTExport(keep)
        tokens, macs_g = method.describe(subject.model)["kept_per_stage"], method.macs(subject.model) / 1e9
        latency = None
        for variant in variants:
            source, note = variant_subject(subject, variant, args, keep)
            row = SweepRow(keep, variant, tokens, macs_g, None, None, None, note=note)
            rows.append(row)
            if source is None:
                continue
            graph = export_graph(source, keep, args.precision, calibration, args.batch_size, args.backend)
            logits = onnx_logits(graph, images)
            if dense_logits is None and not tokens and variant == "plain":  # no pruning stage: the dense model
                dense_logits = logits
            if labels is not None:
                row.accuracy = top1_accuracy(logits, labels)
            elif dense_logits is not None:
                row.accuracy = top1_agreement(logits, dense_logits)
            if latency is None:  # ToCom is merged into the weights: the same graph cost
                latency = measure_latency(graph, args.backend, args.batch_size, args.threads, args.warmup, args.iterations)
            row.latency_ms, row.latency_p90_ms = latency["median_ms"], latency["p90_ms"]
    mark_pareto(rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = parser_from_docstring("python -m export.sweep", __doc__,
                                   (EXIT_NO_CHOICE, "no choice: no keep ratio meets --latency-budget (and --min-accuracy)"))
    add_version_argument(parser)
    parser.add_argument("--checkpoint", "-c", type=Path, default=None,
                        help="DynamicViT checkpoint (default: the shipped demo model; with --model, that architecture "
                             "with random weights)")
    parser.add_argument("--model", "-m", default=None, help="architecture when the checkpoint does not record it")
    parser.add_argument("--keeps", type=keep_ratio_argument, nargs="+", default=list(DEFAULT_KEEPS),
                        help="keep ratios to measure, each in (0, 1]")
    parser.add_argument("--tocom", type=Path, default=None, help="ToCom plugin: also measure each keep with it merged")
    parser.add_argument("--tocom-scale", type=positive_float, default=None,
                        help="ToCom scale s, with --tocom (default: the plugin's own)")
    parser.add_argument("--eval-data", default=None,
                        help="'demo' (test split), an image folder (root/<class>/...) or .npz with 'images' and "
                             "'labels' (default: demo for the demo model, else random images and agreement with dense)")
    parser.add_argument("--eval-images", type=non_negative_int, default=0,
                        help="evaluate on a seeded sample of N images (0: all)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="graph precision; int8 quantises each keep with ONNX Runtime's Q/DQ (on ort-cpu with "
                             "the products' outputs quantised too, so its integer kernels run)")
    parser.add_argument("--calib-data", default=None,
                        help=f"calibration data, with --precision int8 (default: {DEMO_SOURCE})")
    parser.add_argument("--calib-images", type=positive_int, default=None,
                        help=f"calibration images, with --precision int8 (default: {DEFAULT_NUM_IMAGES})")
    parser.add_argument("--backend", choices=("ort-cpu", "ort-cuda"), default="ort-cpu", help="latency backend")
    parser.add_argument("--batch-size", "-b", type=positive_int, default=1, help="batch size of the timed graph")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed runs per keep ratio")
    parser.add_argument("--iterations", "-n", type=positive_int, default=50, help="timed runs per keep ratio")
    parser.add_argument("--latency-budget", type=positive_float, default=None, metavar="MS",
                        help="pick the most accurate keep ratio whose median latency is within MS")
    parser.add_argument("--min-accuracy", type=fraction_argument, default=None, metavar="FRACTION",
                        help="with --latency-budget: no choice unless the pick reaches this top-1 (or agreement) "
                             "fraction in [0, 1]")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the evaluation and calibration samples")
    parser.add_argument("--out", "-o", type=Path, default=Path("sweeps"),
                        help="folder for <label>_sweep.json and <label>_sweep.png")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every user error that can be seen before the work: options that would do nothing, unusable inputs, an
    output folder that cannot be written."""
    if args.min_accuracy is not None and args.latency_budget is None:
        raise SweepError("--min-accuracy needs --latency-budget")
    if args.tocom_scale is not None and args.tocom is None:
        raise SweepError("--tocom-scale needs --tocom")
    if args.precision != "int8" and (args.calib_data is not None or args.calib_images is not None):
        raise SweepError("--calib-data and --calib-images need --precision int8")
    if args.tocom is not None and not args.tocom.is_file():
        raise SweepError(f"ToCom plugin not found: {args.tocom}")
    check_image_sources({"--eval-data": args.eval_data, "--calib-data": args.calib_data})
    prepare_output(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    subject = load_subject(args.checkpoint, args.model)
    keeps = sorted(set(args.keeps), reverse=True)
    if keeps[0] < 1.0 and args.eval_data is None and subject.label != "demo":
        keeps = [1.0, *keeps]  # agreement with dense needs the dense model
    images, labels, described = evaluation_set(args.eval_data, subject, args.eval_images, args.seed)
    calibration = None
    if args.precision == "int8":
        args.calib_data = args.calib_data or DEMO_SOURCE
        calibration, _ = load_calibration_data(args.calib_data, subject.model, subject.metadata,
                                               args.calib_images or DEFAULT_NUM_IMAGES, args.seed)
    metric = "top-1" if labels is not None else "agreement"
    rows = sweep(subject, keeps, images, labels, args, calibration)
    title = f"{subject.label} ({args.precision}, {args.backend}, batch {args.batch_size}): {metric} on {described}"
    print(f"\n{title}")
    print(format_table(rows, metric))
    chosen, reason = (None, "") if args.latency_budget is None else choose_keep(rows, args.latency_budget, args.min_accuracy)
    record = {"model": subject.label, "evaluation": described, "metric": metric, "metric_unit": "fraction",
              "precision": args.precision, "backend": args.backend, "batch_size": args.batch_size,
              "rows": [r.to_dict() for r in rows], "budget_ms": args.latency_budget, "min_accuracy": args.min_accuracy,
              "chosen": chosen.to_dict() if chosen else None, "reason": reason,
              "export_command": export_command(chosen, args) if chosen else None, "environment": environment()}
    figure = sweep_figure(rows, metric, title, args.latency_budget, chosen)
    plot = atomic_write(args.out / f"{subject.label}_sweep.png", lambda path: figure.savefig(path, format="png", dpi=120))
    table = atomic_write(args.out / f"{subject.label}_sweep.json",
                         lambda path: Path(path).write_text(json.dumps(record, indent=2) + "\n"))
    print(f"plot: {plot}\ntable: {table}")
    if args.latency_budget is None:
        return 0
    if chosen is None:
        print(f"no choice: {reason}")
        return EXIT_NO_CHOICE
    print(f"chosen: {reason}\nexport it: {record['export_command']}")
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
