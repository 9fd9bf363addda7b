"""``python -m trt_plugins.bench_token_gather``: its targets, table and bad input here; the run itself where CUDA is."""
from __future__ import annotations

import csv

import pytest
import torch

from test_cli_errors import assert_user_error, run, run_in_process
from trt_plugins import bench_token_gather as bench
from trt_plugins.build import find_nvcc


def row(batch, num_tokens, channels, k, kernel_graph_us, copy_graph_us, kernel_us=20.0, copy_us=15.0):
    figures = {"B": batch, "N": num_tokens, "C": channels, "K": k, "dtype": "float16", "kernel_us": kernel_us,
               "kernel_graph_us": kernel_graph_us, "topk_gather_us": 30.0, "topk_gather_graph_us": 25.0,
               "d2d_copy_us": copy_us, "d2d_copy_graph_us": copy_graph_us, "output_MB": 1.0}
    return {**figures, **bench.ratio_columns(figures)}


def test_targets_are_judged_on_the_graph_figures():
    rows = [row(1, 197, 384, 137, kernel_graph_us=4.0, copy_graph_us=2.0, kernel_us=16.0),  # 16 us per call: fine
            row(16, 197, 384, 137, kernel_graph_us=30.0, copy_graph_us=1.0),  # no target at B = 16
            row(256, 197, 384, 137, kernel_graph_us=50.0, copy_graph_us=30.0),
            row(8, 1025, 768, 512, kernel_graph_us=62.0, copy_graph_us=12.0)]
    checks = bench.target_checks(rows)
    assert [met for _, met in checks] == [True, True, False]
    assert "B=8 N=1025" in checks[2][0] and "kernel/copy 5.17" in checks[2][0]
    assert rows[3]["kernel_per_copy_graph"] == pytest.approx(62 / 12)


def test_rows_line_up_under_the_header():
    groups, names = bench.HEADER.splitlines()
    line = bench.format_row(row(1, 197, 384, 137, 4.0, 2.0))
    assert len(names) == len(line) and len(groups) == len(names) - len(" " + "out MB".rjust(7))
    assert set(bench.COLUMNS) == set(row(1, 197, 384, 137, 4.0, 2.0))


def test_the_long_sequence_case_is_benchmarked():
    assert (8, 1025, 768, 512) in bench.CASES and (1, 197, 384, 137) in bench.CASES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_is_one_error_line_and_exit_2():
    assert_user_error(run("trt_plugins.bench_token_gather", "--iters", "5"), "no CUDA device")


def test_bounds_and_help():
    result = run_in_process("trt_plugins.bench_token_gather", "--graph-calls", "0")
    assert result.returncode == 2 and "--graph-calls" in result.stderr
    help_text = bench.build_parser().format_help()
    assert "--check-targets" in help_text and "exit codes:" in help_text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found: the benchmark compiles the kernel")
def test_a_short_run_writes_every_case(tmp_path):
    out = tmp_path / "token_gather.csv"
    result = run_in_process("trt_plugins.bench_token_gather", "--iters", "20", "--graph-calls", "4", "--csv", out)
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(bench.CASES) and list(rows[0]) == bench.COLUMNS
    assert all(float(r["kernel_graph_us"]) > 0 and float(r["d2d_copy_graph_us"]) > 0 for r in rows)
