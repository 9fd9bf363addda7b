"""``python -m export.gpu_checks``: its plan, how a check is run and judged, the summary, and bad input. Everything
here runs without a GPU: the checks themselves are real processes (small Python commands, and the command's own CPU
forms with --allow-cpu); what needs CUDA is what the command is for, on a machine that has it."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from export import gpu_checks
from test_cli_errors import assert_user_error, run, run_in_process

PYTHON = sys.executable


def python_check(name: str, code: str, timeout_s: int = 60, **fields) -> gpu_checks.Check:
    return gpu_checks.Check(name, name, (PYTHON, "-c", code), timeout_s, **fields)


# ----------------------------------------------------------------------------- the plan


def test_the_gpu_plan_runs_every_check_in_order_with_a_timeout(tmp_path):
    checks = gpu_checks.plan_checks(tmp_path, cuda=True, nproc=2, reference_tome=Path("/refs/ToMe"))
    assert [c.name for c in checks] == ["kernel-tests", "kernel-bench", "bench-pruning", "train-amp"]
    assert all(c.timeout_s > 0 and c.skip_reason is None for c in checks)
    assert sum(c.timeout_s for c in checks) <= 20 * 60
    tests, kernel_bench, pruning, train = (list(c.command) for c in checks)
    assert tests[1:3] == ["-m", "pytest"] and "tests/test_trt_plugins_cuda.py" in tests
    assert f"--junitxml={tmp_path / 'kernel_tests.xml'}" in tests
    assert kernel_bench[1:3] == ["-m", "trt_plugins.bench_token_gather"] and "--check-targets" in kernel_bench
    assert pruning[pruning.index("--device") + 1] == "cuda"
    assert pruning[pruning.index("--batch") + 1:pruning.index("--batch") + 5] == ["1", "8", "64", "256"]
    assert pruning[pruning.index("--reference-tome") + 1] == "/refs/ToMe" and "--reference-dynamicvit" not in pruning
    assert pruning[-2:] == ["--csv", str(tmp_path / "bench_pruning.csv")]
    assert train[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in train
    assert train[train.index("-m", 3) + 1] == "compress.train" and train[train.index("--device") + 1] == "cuda"
    assert train[train.index("--epochs") + 1] == "1" and "--no-amp" not in train  # mixed precision: the default on GPU
    assert all(str(tmp_path) in " ".join(c.command) for c in checks)  # every result lands in OUT


def test_the_cpu_plan_skips_what_needs_cuda_and_shrinks_the_rest(tmp_path):
    checks = {c.name: c for c in gpu_checks.plan_checks(tmp_path, cuda=False, reference_tome=Path("/refs/ToMe"))}
    assert checks["kernel-bench"].skip_reason and checks["kernel-tests"].skip_reason is None  # its tests skip alone
    pruning = list(checks["bench-pruning"].command)
    assert pruning[pruning.index("--device") + 1] == "cpu" and "demo-vit" in pruning and "--reference-tome" not in pruning
    assert "--limit-train" in checks["train-amp"].command


def test_list_prints_the_gpu_plan_even_without_a_gpu(tmp_path):
    result = run_in_process("export.gpu_checks", "--list", "--out", tmp_path / "x", "--only", "bench-pruning")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("bench-pruning:") and "--device cuda --batch 1 8 64 256" in result.stdout
    assert not (tmp_path / "x").exists()  # nothing run, nothing written


# ----------------------------------------------------------------------------- running and judging


def test_a_check_that_succeeds_and_writes_its_output_passes(tmp_path):
    code = f"import pathlib; pathlib.Path({str(tmp_path / 'r.csv')!r}).write_text('a\\n1\\n2\\n'); print('hello')"
    result = gpu_checks.run_check(python_check("ok", code, outputs=("r.csv",), describe=gpu_checks.csv_rows("r.csv")),
                                  tmp_path)
    assert (result.status, result.detail) == ("PASS", "2 rows in r.csv")
    log = Path(result.log).read_text()
    assert log.startswith("$ ") and "hello" in log


@pytest.mark.parametrize("code, outputs, detail", [
    ("import sys; sys.exit(3)", (), "exit code 3"),
    ("pass", ("missing.csv",), "did not write missing.csv"),
])
def test_a_failing_exit_or_a_missing_result_fails(tmp_path, code, outputs, detail):
    result = gpu_checks.run_check(python_check("bad", code, outputs=outputs), tmp_path)
    assert (result.status, result.detail) == ("FAIL", detail)


def test_a_check_past_its_time_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    start = time.monotonic()
    result = gpu_checks.run_check(python_check("slow", code, timeout_s=3), tmp_path)
    assert (result.status, result.detail) == ("FAIL", "timed out after 3 s") and time.monotonic() - start < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the child was in the check's process group: it got the signal too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} still running")


def write_junit(path: Path, tests: int, failures: int, skipped: int) -> None:
    cases = "".join('<testcase name="t"><skipped message="no CUDA device"/></testcase>' for _ in range(skipped))
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" '
                    f'errors="0" skipped="{skipped}">{cases}</testsuite></testsuites>')


@pytest.mark.parametrize("returncode, tests, failures, skipped, expected", [
    (0, 117, 0, 0, ("PASS", "117 passed, 0 skipped")),
    (0, 117, 0, 117, ("SKIP", "all 117 tests skipped: no CUDA device")),
    (1, 117, 2, 0, ("FAIL", "2 failed, 0 errors of 117 tests")),
])
def test_kernel_tests_are_judged_from_their_junit_file(tmp_path, returncode, tests, failures, skipped, expected):
    write_junit(tmp_path / "kernel_tests.xml", tests, failures, skipped)
    check = next(c for c in gpu_checks.plan_checks(tmp_path, cuda=True) if c.name == "kernel-tests")
    assert gpu_checks.judge(check, returncode, False, tmp_path) == expected


def test_training_is_judged_by_its_last_epoch(tmp_path):
    check = next(c for c in gpu_checks.plan_checks(tmp_path, cuda=True) if c.name == "train-amp")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "model.pth").write_bytes(b"x")
    record = {"epoch": 1, "step": 22, "train_loss": 2.25, "eval_top1": 31.5}
    (tmp_path / "train" / "log.jsonl").write_text(json.dumps(record) + "\n")
    assert gpu_checks.judge(check, 0, False, tmp_path) == (
        "PASS", "epoch 1, 22 steps, train_loss 2.2500, eval top-1 31.50")
    (tmp_path / "train" / "log.jsonl").write_text(json.dumps({**record, "train_loss": float("nan")}) + "\n")
    assert gpu_checks.judge(check, 0, False, tmp_path)[0] == "FAIL"
    assert gpu_checks.judge(check, None, True, tmp_path) == ("FAIL", f"timed out after {check.timeout_s} s")


def test_the_summary_has_one_line_per_check_and_the_counts():
    results = [gpu_checks.Result("kernel-tests", "PASS", 81.24, "117 passed, 0 skipped"),
               gpu_checks.Result("kernel-bench", "FAIL", 12.0, "exit code 1"),
               gpu_checks.Result("train-amp", "SKIP", 0.0, "needs CUDA")]
    lines = gpu_checks.format_summary(results).splitlines()
    assert lines[0].split() == ["check", "status", "seconds", "detail"]
    assert lines[1].split()[:3] == ["kernel-tests", "PASS", "81.2"] and lines[2].endswith("exit code 1")
    column = lines[0].index("status")
    assert [line[column:column + 4] for line in lines[1:4]] == ["PASS", "FAIL", "SKIP"]  # the column lines up
    assert lines[-1] == "1 passed, 1 failed, 1 skipped"


# ----------------------------------------------------------------------------- the command


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    assert_user_error(run("export.gpu_checks", "--out", tmp_path / "x"), "no CUDA device", "--allow-cpu")
    assert not (tmp_path / "x").exists()


def test_a_reference_that_is_not_a_folder_is_refused(tmp_path):
    result = run_in_process("export.gpu_checks", "--allow-cpu", "--reference-tome", tmp_path / "nothing",
                            "--out", tmp_path / "x")
    assert_user_error(result, "--reference-tome", "not a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU forms run only without CUDA")
def test_allow_cpu_runs_the_plan_and_writes_the_summary(tmp_path):
    out = tmp_path / "checks"
    result = run("export.gpu_checks", "--allow-cpu", "--only", "kernel-tests", "kernel-bench", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIP kernel-tests" in result.stdout and "all " in result.stdout and "no CUDA device" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "0 passed, 0 failed, 2 skipped"
    summary = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in summary["checks"]] == ["kernel-tests", "kernel-bench"]
    assert summary["machine"]["torch"] == torch.__version__ and (out / "kernel-tests.log").is_file()


def test_every_check_name_is_an_only_choice():
    help_text = gpu_checks.build_parser().format_help()
    for name in ("kernel-tests", "kernel-bench", "bench-pruning", "train-amp"):
        assert name in help_text
    assert "exit codes:" in help_text and "  1 " in help_text
