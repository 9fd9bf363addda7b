"""``python -m export.gpu_checks``: every check that needs a CUDA GPU, in order, for whoever has one.

  kernel-tests   pytest tests/test_trt_plugins_cuda.py: the TokenGather kernel against the reference op
  kernel-bench   python -m trt_plugins.bench_token_gather --check-targets: per call and inside a CUDA graph
  bench-pruning  python -m export.bench_pruning --device cuda: dense, keep ratios, ToMe r, timm dense, batches
                 1 8 64 256, eager and CUDA-graph replay (plus the reference code with --reference-*)
  train-amp      one epoch of compress.train on the demo model and data under torchrun, --device cuda (mixed
                 precision; one process per GPU, so DistributedDataParallel over NCCL with two GPUs or more)

Each check runs as its own process with a timeout; its output goes to OUT/<check>.log and its results (CSV files,
the training run) into OUT. One line per check as it ends (PASS, FAIL with why, or SKIP with why), then a summary
table, also written as OUT/summary.json with the machine's facts. About 5 minutes on an H200.

Without a CUDA device it says so and exits 2; --allow-cpu runs the same plan's CPU forms instead (the benchmark on
the demo architecture, training on a few demo images, the CUDA-only checks skipped), which tests this command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import torch

from compress.plumbing.cli import add_version_argument, exit_from_cli, parser_from_docstring, positive_int
from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write, prepare_output

EXIT_CHECK_FAILED = 1
REPO = Path(__file__).resolve().parents[1]
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class Check:
    """One check: the command it runs (from the repository root), its time limit, and how its result is judged."""

    name: str
    what: str
    command: tuple[str, ...]
    timeout_s: int
    outputs: tuple[str, ...] = ()  # files under OUT it must have written
    junit: str | None = None  # a pytest JUnit file under OUT: every test skipped is a SKIP, not a PASS
    skip_reason: str | None = None  # not run at all (set in the CPU plan for what needs CUDA)
    describe: Callable[[Path], str] | None = field(default=None, compare=False)  # OUT -> the PASS line's detail


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    detail: str
    log: str | None = None


# ----------------------------------------------------------------------------- reading what a check wrote


def junit_counts(path: Path) -> dict:
    """tests, failures, errors, skipped of a pytest JUnit file, and the first skip reason."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    first = next(root.iter("skipped"), None)
    counts["skip_reason"] = first.get("message", "") if first is not None else ""
    return counts


def csv_rows(name: str) -> Callable[[Path], str]:
    def describe(out: Path) -> str:
        with open(out / name) as handle:
            return f"{max(0, sum(1 for _ in handle) - 1)} rows in {name}"

    return describe


def last_training_epoch(out: Path) -> str:
    """The last epoch of OUT/train/log.jsonl; ValueError when its loss is not finite."""
    record = json.loads((out / "train" / "log.jsonl").read_text().strip().splitlines()[-1])
    if not math.isfinite(record["train_loss"]):
        raise ValueError(f"train_loss {record['train_loss']}")
    return f"epoch {record['epoch']}, {record['step']} steps, train_loss {record['train_loss']:.4f}, " \
           f"eval top-1 {record['eval_top1']:.2f}"


def kernel_tests_detail(out: Path) -> str:
    counts = junit_counts(out / "kernel_tests.xml")
    return f"{counts['tests'] - counts['skipped']} passed, {counts['skipped']} skipped"


# ----------------------------------------------------------------------------- the plan


def plan_checks(out: Path, cuda: bool, nproc: int = 1, reference_dynamicvit: Path | None = None,
                reference_tome: Path | None = None, python: str = sys.executable) -> list[Check]:
    """The checks in order. ``cuda`` False: their CPU forms (for testing this command), CUDA-only ones skipped."""
    references = []
    if reference_dynamicvit is not None:
        references += ["--reference-dynamicvit", str(reference_dynamicvit)]
    if reference_tome is not None:
        references += ["--reference-tome", str(reference_tome)]
    if cuda:
        bench_args = ["--device", "cuda", "--batch", "1", "8", "64", "256"]
        train_args = ["--device", "cuda"]
    else:  # small and quick: the point is the plumbing, not the figures
        bench_args = ["--device", "cpu", "--model", "demo-vit", "--keep", "0.7", "0.5", "--tome-r", "8", "--batch",
                      "1", "--repeats", "3", "--warmup", "1"]
        references = []  # the reference DynamicViT needs a 196-patch model, not the demo one
        train_args = ["--device", "cpu", "--limit-train", "128", "--limit-eval", "64", "--batch-size", "32",
                      "--threads", "1"]
    kernel_tests = Check(
        "kernel-tests", "TokenGather kernel vs the reference op (tests/test_trt_plugins_cuda.py)",
        (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_trt_plugins_cuda.py",
         f"--junitxml={out / 'kernel_tests.xml'}"),
        timeout_s=420, outputs=("kernel_tests.xml",), junit="kernel_tests.xml", describe=kernel_tests_detail)
    kernel_bench = Check(
        "kernel-bench", "TokenGather kernel timing, per call and in a CUDA graph, vs a copy",
        (python, "-m", "trt_plugins.bench_token_gather", "--check-targets", "--csv", str(out / "token_gather.csv")),
        timeout_s=180, outputs=("token_gather.csv",), describe=csv_rows("token_gather.csv"),
        skip_reason=None if cuda else "needs CUDA; it has no CPU form")
    bench_pruning = Check(
        "bench-pruning", f"DynamicViT / ToMe vs dense, {'CUDA eager and graph' if cuda else 'CPU form'}",
        (python, "-m", "export.bench_pruning", *bench_args, *references, "--csv", str(out / "bench_pruning.csv")),
        timeout_s=360, outputs=("bench_pruning.csv",), describe=csv_rows("bench_pruning.csv"))
    train = Check(
        "train-amp", f"one demo epoch under torchrun, {nproc} process(es), "
                     f"{'--device cuda, mixed precision' if cuda else '--device cpu (no mixed precision)'}",
        (python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "compress.train",
         "--model", "demo-vit", "--data", "demo-digits", "--epochs", "1", "--warmup-epochs", "0", *train_args,
         "--out", str(out / "train")),
        timeout_s=240, outputs=("train/model.pth", "train/log.jsonl"), describe=last_training_epoch)
    return [kernel_tests, kernel_bench, bench_pruning, train]


# ----------------------------------------------------------------------------- running and judging


def judge(check: Check, returncode: int | None, timed_out: bool, out: Path) -> tuple[str, str]:
    """(status, detail) of a check that ran: returncode None with timed_out when it was stopped."""
    if timed_out:
        return FAIL, f"timed out after {check.timeout_s} s"
    counts = junit_counts(out / check.junit) if check.junit and (out / check.junit).is_file() else None
    if returncode != 0:
        if counts is not None and counts["tests"]:
            return FAIL, f"{counts['failures']} failed, {counts['errors']} errors of {counts['tests']} tests"
        return FAIL, f"exit code {returncode}"
    missing = [name for name in check.outputs if not (out / name).is_file()]
    if missing:
        return FAIL, f"did not write {', '.join(missing)}"
    if counts is not None and counts["tests"] == counts["skipped"]:
        return SKIP, f"all {counts['tests']} tests skipped: {counts['skip_reason']}"
    if check.describe is None:
        return PASS, "exit code 0"
    try:
        return PASS, check.describe(out)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return FAIL, f"unreadable result: {type(exc).__name__}: {exc}"


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the check's own process group (torchrun's workers included), SIGKILL if it does not end."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_check(check: Check, out: Path) -> Result:
    """Run ``check`` from the repository root with its output in OUT/<name>.log; judge it."""
    if check.skip_reason:
        return Result(check.name, SKIP, 0.0, check.skip_reason)
    log = out / f"{check.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    start = time.monotonic()
    with open(log, "w") as handle:
        handle.write(f"$ {shlex.join(check.command)}\n")
        handle.flush()
        process = subprocess.Popen(check.command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group, so a timeout stops all of it
        try:
            returncode, timed_out = process.wait(timeout=check.timeout_s), False
        except subprocess.TimeoutExpired:
            stop_process_group(process)
            returncode, timed_out = None, True
        except KeyboardInterrupt:
            stop_process_group(process)
            raise
    status, detail = judge(check, returncode, timed_out, out)
    return Result(check.name, status, time.monotonic() - start, detail, str(log))


def format_summary(results: Sequence[Result]) -> str:
    """The summary table: check, status, seconds, detail; and a closing line."""
    width = max([len("check")] + [len(r.name) for r in results])
    lines = [f"{'check':<{width}}  status  {'seconds':>7}  detail"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.seconds:>7.1f}  {r.detail}" for r in results]
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return "\n".join(lines)


def machine_facts() -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "host": platform.node(), "date": datetime.now().isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return facts


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = add_version_argument(parser_from_docstring(
        "python -m export.gpu_checks", __doc__, (EXIT_CHECK_FAILED, "a check failed (see its line and OUT/<check>.log)")))
    names = [check.name for check in plan_checks(Path("OUT"), cuda=True)]
    parser.add_argument("--out", "-o", type=Path, default=None,
                        help="folder for every log and result (default: gpu_checks_<date>-<time>)")
    parser.add_argument("--only", nargs="+", choices=names, default=None, help="run only these checks (default: all)")
    parser.add_argument("--list", action="store_true", help="print the checks and their commands, run nothing")
    parser.add_argument("--nproc", type=positive_int, default=None,
                        help="training processes under torchrun (default: one per GPU)")
    parser.add_argument("--reference-dynamicvit", type=Path, metavar="CHECKOUT", default=None,
                        help="pass to the benchmark: a raoyongming/DynamicViT checkout (default: not timed)")
    parser.add_argument("--reference-tome", type=Path, metavar="CHECKOUT", default=None,
                        help="pass to the benchmark: a facebookresearch/ToMe checkout (default: not timed)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run the checks' CPU forms instead of refusing (tests this command)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    plan_cuda = cuda or not args.allow_cpu  # --list without a GPU shows the GPU plan
    if not cuda and not args.allow_cpu and not args.list:
        raise PipelineError("no CUDA device (torch.cuda.is_available() is False): these checks need a GPU "
                            "(--allow-cpu runs their CPU forms, to test this command)")
    for option, path in (("--reference-dynamicvit", args.reference_dynamicvit), ("--reference-tome", args.reference_tome)):
        if path is not None and not path.is_dir():
            raise PipelineError(f"{option} {path}: not a folder")
    out = (args.out or Path(f"gpu_checks_{datetime.now():%Y%m%d-%H%M%S}")).resolve()
    nproc = args.nproc or (max(1, torch.cuda.device_count()) if cuda else 1)
    references = [p.resolve() if p is not None else None for p in (args.reference_dynamicvit, args.reference_tome)]
    checks = [c for c in plan_checks(out, plan_cuda, nproc, *references) if args.only is None or c.name in args.only]
    if args.list:
        for check in checks:
            state = f"SKIP ({check.skip_reason})" if check.skip_reason else f"timeout {check.timeout_s} s"
            print(f"{check.name}: {check.what}; {state}\n  {shlex.join(check.command)}")
        return 0
    prepare_output(out)
    facts = machine_facts()
    print(f"{', '.join(facts.get('gpus', ['no GPU: CPU forms (--allow-cpu)']))}; torch {facts['torch']}, CUDA "
          f"{facts['cuda']}; results in {out}", flush=True)
    results = []
    for index, check in enumerate(checks, 1):
        print(f"[{index}/{len(checks)}] {check.name}: {check.what}", flush=True)
        result = run_check(check, out)
        results.append(result)
        print(f"  {result.status} {check.name} ({result.seconds:.1f} s): {result.detail}", flush=True)
    summary = format_summary(results)
    print("\n" + summary)
    atomic_write(out / "summary.json", lambda temporary: Path(temporary).write_text(json.dumps(
        {"machine": facts, "checks": [{**asdict(r), "command": shlex.join(c.command)} for r, c in zip(results, checks)]},
        indent=2) + "\n"))
    return EXIT_CHECK_FAILED if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    exit_from_cli(main)
