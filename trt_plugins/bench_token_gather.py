"""Time the TokenGather kernel against torch.topk + gather and a device-to-device copy of its output bytes.

    python -m trt_plugins.bench_token_gather [--iters 500] [--csv results.csv]

Each time is the median over --iters calls of one CUDA-event pair around a single call (so launch overhead
counts, as it does inside an engine). Targets: B=1, N=197, C=384 at most 10 us; B=256 within 2x of the copy.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys

from trt_plugins.token_gather_cuda import load_extension, token_gather

CASES = [  # (B, N, C, K): DeiT-S stages 1 and 3 (keep ratio 0.7), a large batch, a long sequence
    (1, 197, 384, 137), (1, 197, 384, 67), (16, 197, 384, 137), (256, 197, 384, 137), (256, 197, 384, 67),
    (8, 1025, 768, 512),
]


def median_us(fn, iters: int, warmup: int = 20) -> float:
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


def bench_case(shape, dtype, iters: int) -> dict:
    import torch

    batch, num_tokens, channels, k = shape
    tokens = torch.randn(batch, num_tokens, channels, device="cuda", dtype=dtype)
    scores = torch.randn(batch, num_tokens - 1, device="cuda")
    out = torch.empty(batch, k + 1, channels, device="cuda", dtype=dtype)
    indices = torch.empty(batch, k, device="cuda", dtype=torch.int32)
    copy_src = torch.empty_like(out)

    def topk_gather():
        top = torch.topk(scores, k, dim=1).indices + 1
        rows = torch.cat([torch.zeros(batch, 1, dtype=top.dtype, device="cuda"), top], dim=1)
        return torch.gather(tokens, 1, rows.unsqueeze(-1).expand(-1, -1, channels))

    kernel = median_us(lambda: token_gather(tokens, scores, k, True, out, indices), iters)
    return {
        "B": batch, "N": num_tokens, "C": channels, "K": k, "dtype": str(dtype).replace("torch.", ""),
        "kernel_us": kernel,
        "topk_gather_us": median_us(topk_gather, iters),
        "d2d_copy_us": median_us(lambda: out.copy_(copy_src), iters),
        "output_MB": out.numel() * out.element_size() / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TokenGather kernel benchmark (needs a CUDA device)")
    parser.add_argument("--iters", type=int, default=500, help="timed calls per measurement (default: 500)")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: PyTorch is required", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    load_extension()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    header = f"{'B':>4} {'N':>5} {'C':>4} {'K':>4} {'dtype':>7} {'kernel us':>10} {'topk+gather':>12} " \
             f"{'D2D copy':>9} {'kernel/copy':>11} {'out MB':>7}"
    print(header)
    rows = []
    for shape in CASES:
        for dtype in (torch.float32, torch.float16):
            row = bench_case(shape, dtype, args.iters)
            rows.append(row)
            print(f"{row['B']:>4} {row['N']:>5} {row['C']:>4} {row['K']:>4} {row['dtype']:>7} "
                  f"{row['kernel_us']:>10.2f} {row['topk_gather_us']:>12.2f} {row['d2d_copy_us']:>9.2f} "
                  f"{row['kernel_us'] / row['d2d_copy_us']:>11.2f} {row['output_MB']:>7.2f}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
