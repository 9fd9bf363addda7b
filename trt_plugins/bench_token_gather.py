"""``python -m trt_plugins.bench_token_gather``: time the TokenGather kernel against torch.topk + gather and a device-to-device copy of its output bytes (needs a CUDA device).

Every op is timed two ways, each the median over --iters measurements:
- per call: one CUDA-event pair around a single call, so launch overhead counts (as for one op of an eager run);
- graph: --graph-calls calls captured in one CUDA graph, one event pair around its replay, divided by the number of
  calls, so launch overhead is out (as inside a TensorRT engine timed with CUDA graphs).
The copy moves the kernel's output bytes once (the least any gather can cost); kernel/copy is the kernel's time over
the copy's, per call and graph. The kernel is the plugin's own source compiled as a PyTorch extension (the first
run compiles it, about a minute).

Targets (graph figures): B=1, N=197, C=384 at most 10 us; B=256 and the long sequence (N=1025) within 2x the copy.
--check-targets exits 1 when one is missed.
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Callable, Sequence

from compress.plumbing.cli import add_version_argument, exit_from_cli, parser_from_docstring, positive_int
from compress.plumbing.errors import PipelineError
from trt_plugins.token_gather_cuda import load_extension, token_gather

EXIT_TARGET_MISSED = 1
CASES = [  # (B, N, C, K): DeiT-S stages 1 and 3 (keep ratio 0.7), a large batch, a long sequence
    (1, 197, 384, 137), (1, 197, 384, 67), (16, 197, 384, 137), (256, 197, 384, 137), (256, 197, 384, 67),
    (8, 1025, 768, 512),
]
SMALL_CASE_MAX_US = 10.0
MAX_KERNEL_PER_COPY = 2.0
COLUMNS = ["B", "N", "C", "K", "dtype", "kernel_us", "kernel_graph_us", "topk_gather_us", "topk_gather_graph_us",
           "d2d_copy_us", "d2d_copy_graph_us", "kernel_per_copy", "kernel_per_copy_graph", "output_MB"]


def median_us(fn: Callable[[], object], iters: int, warmup: int = 20) -> float:
    """Median microseconds of one call, one CUDA-event pair around each (launch overhead included)."""
    import torch

    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0)
    return statistics.median(times)


def capture_cuda_graph(fn: Callable[[], object], calls: int = 1, warmup: int = 20):
    """``calls`` calls of ``fn`` captured in one CUDA graph: (the graph, the outputs of the captured calls).

    Warm-up runs go on a side stream before the capture, as capture requires (lazy initialisation and workspace
    allocation must not happen while capturing). The outputs hold the captured memory: keep them with the graph.
    """
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [fn() for _ in range(calls)]
    return graph, outputs


def graph_median_us(fn: Callable[[], object], iters: int, calls: int, warmup: int = 20) -> float:
    """Median microseconds per call of ``calls`` calls captured in one CUDA graph, one event pair per replay
    (replays run on the current stream with no launch per call)."""
    graph, outputs = capture_cuda_graph(fn, calls, warmup)
    graph.replay()  # the first replay uploads the graph
    return median_us(graph.replay, iters, warmup=2) / calls


def ratio_columns(row: dict) -> dict:
    """kernel / copy, per call and graph."""
    return {"kernel_per_copy": row["kernel_us"] / row["d2d_copy_us"],
            "kernel_per_copy_graph": row["kernel_graph_us"] / row["d2d_copy_graph_us"]}


def bench_case(shape: tuple[int, int, int, int], dtype, iters: int, graph_calls: int) -> dict:
    import torch

    batch, num_tokens, channels, k = shape
    tokens = torch.randn(batch, num_tokens, channels, device="cuda", dtype=dtype)
    scores = torch.randn(batch, num_tokens - 1, device="cuda")
    out = torch.empty(batch, k + 1, channels, device="cuda", dtype=dtype)
    indices = torch.empty(batch, k, device="cuda", dtype=torch.int32)
    copy_src = torch.empty_like(out)

    def kernel():
        token_gather(tokens, scores, k, True, out, indices)

    def topk_gather():
        top = torch.topk(scores, k, dim=1).indices + 1
        rows = torch.cat([torch.zeros(batch, 1, dtype=top.dtype, device="cuda"), top], dim=1)
        return torch.gather(tokens, 1, rows.unsqueeze(-1).expand(-1, -1, channels))

    def copy():
        out.copy_(copy_src)

    row = {"B": batch, "N": num_tokens, "C": channels, "K": k, "dtype": str(dtype).replace("torch.", "")}
    for name, fn in (("kernel", kernel), ("topk_gather", topk_gather), ("d2d_copy", copy)):
        row[f"{name}_us"] = median_us(fn, iters)
        row[f"{name}_graph_us"] = graph_median_us(fn, max(1, iters // graph_calls), graph_calls)
    row.update(ratio_columns(row))
    row["output_MB"] = out.numel() * out.element_size() / 1e6
    return row


def target_checks(rows: Sequence[dict]) -> list[tuple[str, bool]]:
    """(what was checked with its figure, met) for every row a target applies to."""
    checks = []
    for row in rows:
        case = f"B={row['B']} N={row['N']} C={row['C']} K={row['K']} {row['dtype']}"
        if (row["B"], row["N"], row["C"]) == (1, 197, 384):
            checks.append((f"{case}: kernel {row['kernel_graph_us']:.2f} us per call in a graph "
                           f"(target <= {SMALL_CASE_MAX_US:g})", row["kernel_graph_us"] <= SMALL_CASE_MAX_US))
        if row["B"] == 256 or row["N"] > 1000:
            ratio = row["kernel_per_copy_graph"]
            checks.append((f"{case}: kernel/copy {ratio:.2f} in a graph (target <= {MAX_KERNEL_PER_COPY:g})",
                           ratio <= MAX_KERNEL_PER_COPY))
    return checks


def format_row(row: dict) -> str:
    return (f"{row['B']:>4} {row['N']:>5} {row['C']:>4} {row['K']:>4} {row['dtype']:>7} "
            f"{row['kernel_us']:>9.2f} {row['kernel_graph_us']:>9.2f} {row['topk_gather_us']:>9.2f} "
            f"{row['topk_gather_graph_us']:>9.2f} {row['d2d_copy_us']:>9.2f} {row['d2d_copy_graph_us']:>9.2f} "
            f"{row['kernel_per_copy']:>8.2f} {row['kernel_per_copy_graph']:>8.2f} {row['output_MB']:>7.2f}")


HEADER = (f"{'':>28} {'kernel us':>19} {'topk+gather us':>19} {'D2D copy us':>19} {'kernel/copy':>17}\n"
          f"{'B':>4} {'N':>5} {'C':>4} {'K':>4} {'dtype':>7} " + " ".join(f"{'call':>9} {'graph':>9}" for _ in range(3))
          + f" {'call':>8} {'graph':>8} {'out MB':>7}")


def build_parser() -> argparse.ArgumentParser:
    parser = add_version_argument(parser_from_docstring(
        "python -m trt_plugins.bench_token_gather", __doc__,
        (EXIT_TARGET_MISSED, "with --check-targets: a target was missed (named in the output)")))
    parser.add_argument("--iters", type=positive_int, default=500,
                        help="timed calls per op for the per-call figure; graph replays are iters / graph-calls "
                             "(default: 500)")
    parser.add_argument("--graph-calls", type=positive_int, default=20,
                        help="calls captured in one CUDA graph (default: 20)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file (default: none)")
    parser.add_argument("--check-targets", action="store_true", help="exit 1 when a target is missed (default: off)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch
    except ImportError:
        raise PipelineError("PyTorch is required (the kernel runs through a PyTorch extension)") from None
    if not torch.cuda.is_available():
        raise PipelineError("no CUDA device (torch.cuda.is_available() is False)")
    load_extension()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; medians of "
          f"{args.iters} calls (call) and of {max(1, args.iters // args.graph_calls)} replays of {args.graph_calls} "
          "captured calls (graph)")
    print(HEADER)
    rows = []
    for shape in CASES:
        for dtype in (torch.float32, torch.float16):
            row = bench_case(shape, dtype, args.iters, args.graph_calls)
            rows.append(row)
            print(format_row(row), flush=True)
    checks = target_checks(rows)
    for text, met in checks:
        print(f"{'met' if met else 'MISSED'}: {text}")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"written {args.csv}")
    return EXIT_TARGET_MISSED if args.check_targets and not all(met for _, met in checks) else 0


if __name__ == "__main__":
    exit_from_cli(main)
