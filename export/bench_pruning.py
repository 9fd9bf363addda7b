"""``python -m export.bench_pruning``: how much faster pruning makes a DynamicViT on this machine's CPU.

For each keep ratio it times PyTorch eager inference and the exported ONNX on ONNX Runtime (CPU),
batch sizes as given, against the dense model (keep 1.0) measured in the same run, and prints the
latency ratios next to the analytic MACs ratio. All cases of one batch size run round-robin, and each
ratio is the median over rounds of (case / dense in the same round), which cancels the slow phases of a
shared machine; writes a CSV. Weights are
random (latency does not depend on them; the token counts are fixed by the keep ratio).
"""
from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import onnxruntime as ort
import torch

from compress.cli import (
    add_version_argument,
    exit_from_cli,
    keep_ratio_argument,
    non_negative_int,
    parser_from_docstring,
    positive_int,
)
from compress.complexity import analytic_macs
from compress.dynamicvit import create_dynamicvit
from compress.files import atomic_write, prepare_output
from export.deploy import deploy_copy
from export.onnx_export import export_onnx


def interleaved_times(runners: dict, warmup: int, repeats: int) -> dict[object, list[float]]:
    """Milliseconds per run of every runner, taken round-robin so that a slow phase of a shared machine
    hits every case alike (ratios within one round are what the comparison uses)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {key: [] for key in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


def ratio_to_dense(times: list[float], dense: list[float]) -> float:
    """Median over rounds of (this case / dense in the same round)."""
    return statistics.median(t / d for t, d in zip(times, dense))


def run_eager(model, images: torch.Tensor) -> None:
    with torch.inference_mode():
        model.forward_pruned(images)


def build_parser() -> argparse.ArgumentParser:
    parser = add_version_argument(parser_from_docstring("python -m export.bench_pruning", __doc__))
    parser.add_argument("--model", default="dynamicvit_deit_small", help="architecture (default: dynamicvit_deit_small)")
    parser.add_argument("--keep", type=keep_ratio_argument, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5],
                        help="keep ratios in (0, 1] to compare with dense (default: 0.9 0.8 0.7 0.6 0.5)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--repeats", type=positive_int, default=20,
                        help="timed runs per case; the median is kept (default: 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed runs first (default: 3)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="threads for both frameworks, 0 = all cores (default: 0)")
    parser.add_argument("--frameworks", nargs="+", choices=("pytorch", "onnxruntime"), default=["pytorch", "onnxruntime"],
                        help="what to time (default: both)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="results file (default: bench_pruning_<model>_<cpu count>cpu_torch<version>.csv)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.csv or Path(f"bench_pruning_{args.model}_{torch.get_num_threads()}cpu_torch{torch.__version__.split('+')[0]}.csv")
    prepare_output(path.parent)  # an unwritable results file is refused before the timing, not after it
    torch.manual_seed(0)
    model = create_dynamicvit(args.model, keep_ratio=0.7).eval()
    shape = model.cost_shape()
    rows = []
    keeps = [1.0, *args.keep]
    for batch in args.batch:
        images = torch.randn(batch, 3, *model.patch_embed.img_size)
        runners = {}
        for keep in keeps:
            if "pytorch" in args.frameworks:
                # Eager: the model as users run it (timm's fused attention), one copy per keep ratio.
                eager = copy.deepcopy(model)
                eager.keep_ratio = keep
                runners["pytorch", keep] = partial(run_eager, eager, images)
            if "onnxruntime" in args.frameworks:
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                graph = export_onnx(deploy_copy(model, keep), batch_size=batch)
                session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
                runners["onnxruntime", keep] = partial(session.run, None, {"images": images.numpy()})
        print(f"  timing batch {batch}: {len(runners)} cases x {args.repeats} interleaved rounds", file=sys.stderr, flush=True)
        times = interleaved_times(runners, args.warmup, args.repeats)
        for keep in keeps:
            row = {"batch": batch, "keep": keep, "macs_g": analytic_macs(shape, keep) / 1e9}
            row["macs_ratio"] = row["macs_g"] / (analytic_macs(shape, 1.0) / 1e9)
            for framework in args.frameworks:
                row[f"{framework}_ms"] = statistics.median(times[framework, keep])
                row[f"{framework}_ratio"] = ratio_to_dense(times[framework, keep], times[framework, 1.0])
            rows.append(row)
    print(f"\n{args.model} on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}; {args.repeats} interleaved rounds, "
          "ms = median, ratio = median of per-round ratios to dense")
    header = ["batch", "keep", "macs_g", "macs_ratio"] + [f"{f}_{s}" for f in args.frameworks for s in ("ms", "ratio")]
    print("  ".join(f"{h:>16}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]:>16.3f}" if isinstance(row[h], float) else f"{row[h]:>16}" for h in header))

    def write_csv(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows({h: row[h] for h in header} for row in rows)

    atomic_write(path, write_csv)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
