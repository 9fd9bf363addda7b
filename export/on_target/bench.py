"""``python -m export.bench``: latency of built artefacts, with a regression gate.

Artefacts: export folders (every ONNX and engine their manifest.json lists), single ``.onnx`` files,
TensorRT engines (``.engine``/``.plan``, through a lazy import), and checkpoints (``.pth``/``.pt``/
``.safetensors``, PyTorch eager for comparison). Each case (artefact x backend x batch x threads) gets
untimed warm-up runs, then timed runs: median, p90, p99 (ms). On ONNX Runtime and PyTorch the time is the
wall time of one call; on TensorRT it is the device time of one execution measured with CUDA events (what
trtexec reports as GPU compute time), and the end-to-end time with host copies is reported beside it. Cases
that cannot run here (a static graph at another batch, a batch outside an engine's profile, a missing
backend) are skipped with the reason. Results go to JSON and CSV together with the environment (CPU/GPU,
TensorRT, tool versions, load average, and on Jetson the power mode and clocks). An engine recorded in its
export folder's manifest for another TensorRT version or GPU is refused.

Gate: ``--baseline FILE`` fails (exit 1) naming every case whose median is more than ``--tolerance``
percent above the baseline's, and every baseline case this run could not compare (not measured, skipped,
no ratio): a gate that compared nothing never passes. On shared, noisy machines pass ``--reference
ARTEFACT``: every case is then compared as the ratio of its median to the reference artefact's median
measured in the same run (e.g. pruned / dense), which cancels most of the machine's load; a reference that
was not measured is an error. ``--save-baseline FILE`` writes such a file.

Exit codes: 0 measured (and the gate passed); 1 the gate failed; 2 a user error (bad artefact, option,
baseline file, unwritable output), reported before anything is measured.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import trt_plugins
from compress.plumbing.cli import add_version_argument, bounded, parser_from_docstring
from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write
from export.on_target.compare import cpu_session_options
from export.on_target.engine import engine_problem, read_manifest
from export.on_target.environment import (command_output, cuda_devices, load_average, target_facts, tensorrt_unavailable_reason,
                                          tool_versions)
from export.on_target.runtimes import TENSORRT, engine_runtime
from export.on_target.tensorrt_engine import TensorRTRunner
from trt_plugins.ort_token_gather import make_session

BACKENDS = ("ort-cpu", "ort-cuda", "trt", "pytorch-cpu", "pytorch-cuda")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
BASELINE_SCHEMA = 1
EXIT_REGRESSION = 1


class BenchError(PipelineError):
    """An artefact or option the benchmark cannot use."""


@dataclass(frozen=True)
class Artefact:
    label: str  # stable name: the key of baseline entries
    path: Path
    kind: str  # "onnx" | "engine" | "checkpoint"
    manifest: dict | None = None  # the export folder's manifest, when the artefact came from one


@dataclass
class CaseResult:
    artefact: str
    backend: str
    batch: int
    threads: int
    median_ms: float | None = None  # TensorRT: device time (CUDA events); else the wall time of one call
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    iterations: int = 0
    images_per_s: float | None = None
    ratio: float | None = None  # median / the reference artefact's median (same backend, batch, threads)
    end_to_end_median_ms: float | None = None  # TensorRT: with host-to-device and device-to-host copies
    skipped: str | None = None

    @property
    def key(self) -> str:
        return case_key(self.artefact, self.backend, self.batch, self.threads)

    def to_dict(self) -> dict:
        return {**asdict(self), "key": self.key}


def case_key(artefact: str, backend: str, batch: int, threads: int) -> str:
    return f"{artefact}|{backend}|b{batch}|t{threads}"


# ----------------------------------------------------------------------------- artefacts


def kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    return None


def parse_artefact_argument(text: str) -> tuple[str | None, Path]:
    """``LABEL=PATH`` or ``PATH``."""
    label, sep, path = text.partition("=")
    return (label, Path(path)) if sep and label and not Path(text).exists() else (None, Path(text))


def discover(text: str) -> list[Artefact]:
    """The artefacts one command-line argument names (a folder expands to its manifest's artefacts)."""
    label, path = parse_artefact_argument(text)
    if not path.exists():
        raise BenchError(f"artefact not found: {path}")
    if kind_of(path) == "engine" and (path.parent / "manifest.json").is_file():
        manifest = read_manifest(path.parent)  # an engine of an export folder: its build facts travel with it
        return [Artefact(label or f"{path.resolve().parent.name}/{path.name}", path, "engine", manifest)]
    if path.is_dir():
        manifest = read_manifest(path)
        prefix = label or path.resolve().name
        found = []
        for entry in manifest.get("artifacts", []):
            file = path / entry["path"]
            if kind_of(file) in ("onnx", "engine") and file.is_file():
                found.append(Artefact(f"{prefix}/{entry['path']}", file, kind_of(file), manifest))
        if not found:
            raise BenchError(f"{path / 'manifest.json'} lists no ONNX or engine file that exists")
        return found
    kind = kind_of(path)
    if kind is None:
        raise BenchError(f"{path}: not an export folder, .onnx, engine ({', '.join(ENGINE_SUFFIXES)}) or checkpoint")
    return [Artefact(label or f"{path.resolve().parent.name}/{path.name}", path, kind)]


def backends_for(kind: str, wanted: Sequence[str], available: dict[str, str | None]) -> list[tuple[str, str | None]]:
    """(backend, reason it cannot run or None) for an artefact kind among the wanted backends."""
    family = {"onnx": ("ort-cpu", "ort-cuda"), "engine": ("trt",), "checkpoint": ("pytorch-cpu", "pytorch-cuda")}[kind]
    return [(b, available.get(b)) for b in family if b in wanted]


def backend_availability() -> dict[str, str | None]:
    """Why each backend cannot run here (None: it can). Imports nothing heavy beyond onnxruntime."""
    torch_missing = None if importlib.util.find_spec("torch") else "torch is not installed"
    reasons: dict[str, str | None] = {"ort-cpu": None, "pytorch-cpu": torch_missing}
    try:
        import onnxruntime

        cuda_provider = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        reasons["ort-cpu"], cuda_provider = "onnxruntime is not installed", False
    gpu = bool(cuda_devices())
    reasons["ort-cuda"] = None if cuda_provider and gpu else (
        "no CUDA GPU is visible" if not gpu else "this onnxruntime has no CUDAExecutionProvider")
    reasons["pytorch-cuda"] = torch_missing or (None if gpu else "no CUDA GPU is visible")
    reasons["trt"] = tensorrt_unavailable_reason()  # the export stage's own check: one answer for both
    return reasons


# ----------------------------------------------------------------------------- runners


class BenchSkip(Exception):
    """A case that cannot run here (recorded with its reason, not an error)."""


class CallRunner:
    """A backend timed by the wall time of one call (ONNX Runtime, PyTorch)."""

    def __init__(self, run: Callable[[], object]):
        self.run = run

    def time(self, warmup: int, iterations: int) -> tuple[list[float], list[float] | None]:
        return time_runs(self.run, warmup, iterations), None

    def close(self) -> None:
        self.run = None  # drops the session or model with its buffers


class EngineRunner:
    """A TensorRT engine: device time by CUDA events, and end-to-end time with copies beside it."""

    def __init__(self, runner, feed: np.ndarray):
        self.runner, self.feed = runner, feed

    def time(self, warmup: int, iterations: int) -> tuple[list[float], list[float] | None]:
        return self.runner.measure(self.feed, warmup, iterations)

    def close(self) -> None:
        self.runner.close()


def onnx_input(model) -> tuple[int | None, tuple[int, ...]]:
    """(static batch or None, per-image shape) of input ``images``."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    return batch, tuple(d.dim_value for d in dims[1:])


def random_images(batch: int, shape: Sequence[int]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)


def ort_runner(path: Path, backend: str, batch: int, threads: int) -> Callable[[], object]:
    """One ONNX Runtime call on a seeded random batch (export.sweep times it too)."""
    import onnx
    import onnxruntime as ort  # imported per case: the timing of other backends should not pay for it

    model = onnx.load(str(path))
    fixed, shape = onnx_input(model)
    if fixed is not None and fixed != batch:
        raise BenchSkip(f"static batch {fixed}")
    options = cpu_session_options(threads)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
    if any(n.op_type == "TokenGather" for n in model.graph.node):
        if backend != "ort-cpu":
            raise BenchSkip("TokenGather graphs run on ONNX Runtime's CPU custom op only")
        session = make_session(model, session_options=options)
    else:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    feed = {session.get_inputs()[0].name: random_images(batch, shape)}
    return lambda: session.run(None, feed)


def engine_refusal(artefact: Artefact, here: dict) -> str | None:
    """Why an engine of an export folder must not run here: built by another TensorRT or for another GPU."""
    if artefact.kind != "engine" or artefact.manifest is None:
        return None  # a lone engine file: TensorRT itself refuses one it cannot run
    problem = engine_problem(artefact.manifest, artefact.path.name, here)
    return f"refusing {artefact.path}: {problem}" if problem else None


def tensorrt_runner(artefact: Artefact, batch: int) -> EngineRunner:
    """An engine ready to time at ``batch`` (TensorRT imported only here); skipped outside its profile."""
    if artefact.manifest is not None and artefact.manifest.get("gather") == "plugin":
        trt_plugins.load_plugin_library()
    with open(artefact.path, "rb") as engine_file:  # TensorRT or TensorRT-RTX: the engine's first bytes say
        chosen = engine_runtime(engine_file.read(16)) or TENSORRT
    runner = TensorRTRunner(artefact.path, chosen=chosen)
    low, _, high = runner.profile()
    if not low <= batch <= high:
        runner.close()
        raise BenchSkip(f"batch {batch} is outside the engine's profile {low}..{high}")
    shape = tuple(runner.engine.get_tensor_shape(runner.input_name))[1:]
    return EngineRunner(runner, random_images(batch, shape))


# (checkpoint, backend, batch, threads, keep ratio) -> one timed call: PyTorch eager timing of a checkpoint, which
# needs torch; the entry point ``python -m export.bench`` passes it, so that this package never imports torch.
CheckpointRunner = Callable[[Path, str, int, int, "float | None"], Callable[[], object]]


def make_runner(artefact: Artefact, backend: str, batch: int, threads: int, keep: float | None,
                checkpoint_runner: CheckpointRunner | None):
    if artefact.kind == "onnx":
        return CallRunner(ort_runner(artefact.path, backend, batch, threads))
    if artefact.kind == "engine":
        return tensorrt_runner(artefact, batch)
    if checkpoint_runner is None:
        raise BenchSkip("checkpoints are timed in PyTorch through python -m export.bench")
    return CallRunner(checkpoint_runner(artefact.path, backend, batch, threads, keep))


# ----------------------------------------------------------------------------- timing


def time_runs(run: Callable[[], object], warmup: int, iterations: int) -> list[float]:
    """Milliseconds of ``iterations`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def summarise(samples: Sequence[float]) -> dict:
    """Median, p90, p99, mean and min of latency samples (ms)."""
    values = np.asarray(samples, dtype=np.float64)
    return {"median_ms": float(np.median(values)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(values.mean()),
            "min_ms": float(values.min()), "iterations": int(len(values))}


def add_ratios(results: list[CaseResult], reference: str | None) -> list[str]:
    """Set each case's ratio to its median over the reference artefact's median in the same setting.

    Returns a note for every measured case without a ratio (the reference was not measured in its setting).
    """
    if reference is None:
        return []
    base = {(r.backend, r.batch, r.threads): r.median_ms for r in results if r.artefact == reference and r.median_ms}
    if not base:
        skipped = sorted({r.skipped for r in results if r.artefact == reference and r.skipped})
        raise BenchError(f"--reference {reference} was not measured in any case"
                         + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
                         + ": choose a reference that runs at these batch sizes and backends")
    notes = []
    for r in results:
        denominator = base.get((r.backend, r.batch, r.threads))
        if r.median_ms is not None and denominator:
            r.ratio = r.median_ms / denominator
        elif r.median_ms is not None:
            notes.append(f"no ratio for {r.key}: the reference was not measured at {r.backend}, batch {r.batch}, "
                         f"threads {r.threads}")
    return notes


# ----------------------------------------------------------------------------- the gate


def baseline_document(results: list[CaseResult], reference: str | None, environment: dict) -> dict:
    """The cases a later run can be gated against: measured ones (with a ratio, when there is a reference)."""
    cases = {r.key: {"median_ms": r.median_ms, "ratio": r.ratio} for r in results
             if r.median_ms is not None and (reference is None or r.ratio is not None)}
    return {"schema": BASELINE_SCHEMA, "reference": reference, "cases": cases, "environment": environment}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_baseline(path: Path) -> dict:
    """A baseline file, with every value checked: a gate must not compare against values it misreads."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read baseline {path}: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("cases"), dict):
        raise BenchError(f"{path} is not a baseline file (write one with --save-baseline)")
    if document.get("reference") is not None and not isinstance(document["reference"], str):
        raise BenchError(f"{path}: 'reference' must be an artefact label or null, not {document['reference']!r}")
    if not document["cases"]:
        raise BenchError(f"{path} holds no case: a gate against it would compare nothing")
    for key, entry in document["cases"].items():
        if not isinstance(entry, dict):
            raise BenchError(f"{path}: case {key!r} must be an object with median_ms and ratio, not {entry!r}")
        for field in ("median_ms", "ratio"):
            if entry.get(field) is not None and not is_number(entry[field]):
                raise BenchError(f"{path}: case {key!r} has {field} {entry[field]!r}; expected a positive number or null")
        if entry.get("median_ms") is None and entry.get("ratio") is None:
            raise BenchError(f"{path}: case {key!r} has neither median_ms nor ratio")
    return document


def find_regressions(results: list[CaseResult], baseline: dict, tolerance_pct: float,
                     reference: str | None) -> tuple[list[str], list[str], list[str]]:
    """(cases slower than the baseline by more than the tolerance, baseline cases not compared, notes).

    With ``reference`` the compared number is each case's ratio to the reference artefact (the baseline
    must hold ratios to the same reference); otherwise the absolute median. A baseline case this run did
    not measure, or measured without the compared number, is *not compared*: the gate fails on it.
    """
    if reference is not None and baseline.get("reference") != reference:
        raise BenchError(f"the baseline's ratios are relative to {baseline.get('reference')!r}, not {reference!r}: "
                         "save a baseline with the same --reference")
    metric = "ratio" if reference is not None else "median_ms"
    limit = 1.0 + tolerance_pct / 100.0
    slower, uncompared, notes = [], [], []
    measured = {r.key: r for r in results}
    for key, entry in sorted(baseline["cases"].items()):
        current = measured.get(key)
        if current is None:
            uncompared.append(f"NOT COMPARED {key}: not measured in this run")
            continue
        if getattr(current, metric) is None:
            why = f"skipped: {current.skipped}" if current.skipped else f"no {metric} in this run"
            uncompared.append(f"NOT COMPARED {key}: {why}")
            continue
        if entry.get(metric) is None:
            uncompared.append(f"NOT COMPARED {key}: the baseline has no {metric}")
            continue
        if metric == "ratio" and current.artefact == reference:
            continue
        now, before = getattr(current, metric), entry[metric]
        change = (now / before - 1.0) * 100.0
        if now > before * limit:
            unit = "x reference" if metric == "ratio" else "ms"
            slower.append(f"SLOWER {key}: {metric} {now:.3f} vs baseline {before:.3f} {unit} "
                          f"(+{change:.1f}% > {tolerance_pct:g}%)")
    for key in sorted(set(measured) - set(baseline["cases"])):
        if measured[key].median_ms is not None:
            notes.append(f"new case (not in the baseline): {key}")
    return slower, uncompared, notes


# ----------------------------------------------------------------------------- environment


def environment() -> dict:
    """The machine a run measured on: target facts (TensorRT, GPU, CPU, Jetson mode), tools, load."""
    facts = {"host": platform.node(), **target_facts(), "cpu_count": os.cpu_count(), "load_average": load_average(),
             "tools": tool_versions()}
    clocks = command_output("nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem",
                            "--format=csv,noheader")
    if clocks:
        facts["gpu_clocks"] = clocks
    return facts


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = parser_from_docstring(
        "python -m export.bench", __doc__,
        (EXIT_REGRESSION, "the gate failed: a case regressed, or a baseline case could not be compared"))
    parser.add_argument("artefacts", nargs="+", metavar="ARTEFACT",
                        help="export folder (with manifest.json), .onnx, engine (.engine/.plan) or checkpoint "
                             "(.pth/.pt/.safetensors); LABEL=PATH names it (default label: <folder>/<file>)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends to time (default: every one that can run each artefact here)")
    parser.add_argument("--batch-size", "-b", type=bounded(int, 1), nargs="+", default=[1],
                        help="batch sizes; static-batch graphs run only at their own (default: 1)")
    parser.add_argument("--threads", type=bounded(int, 0), nargs="+", default=[0],
                        help="CPU threads for ONNX Runtime and PyTorch, 0 = the framework's default (default: 0)")
    parser.add_argument("--warmup", type=bounded(int, 0), default=10, help="untimed runs before timing (default: 10)")
    parser.add_argument("--iterations", "-n", type=bounded(int, 1), default=100,
                        help="timed runs per case (default: 100)")
    parser.add_argument("--keep", type=float, default=None,
                        help="keep ratio for checkpoints timed in PyTorch (default: the checkpoint's)")
    parser.add_argument("--reference", default=None, metavar="ARTEFACT",
                        help="label or path of the artefact every case is divided by (adds ratios; the gate then "
                             "compares ratios) (default: none)")
    parser.add_argument("--baseline", type=Path, default=None, help="gate against this baseline file (default: no gate)")
    parser.add_argument("--tolerance", type=bounded(float, 0), default=10.0,
                        help="percent a case may be slower than the baseline (default: 10)")
    parser.add_argument("--save-baseline", type=Path, default=None,
                        help="write this run as a baseline file (default: not written)")
    parser.add_argument("--out", "-o", type=Path, default=Path("bench_results"),
                        help="folder for the results (default: bench_results)")
    parser.add_argument("--name", default=None,
                        help="file stem of the results, written as NAME.json and NAME.csv "
                             "(default: bench_<cpu count>cpu_ort<version>_<timestamp>)")
    return add_version_argument(parser)


def resolve_reference(reference: str | None, artefacts: list[Artefact]) -> tuple[str | None, list[Artefact]]:
    """The reference's label; a path not among the artefacts is added to them."""
    if reference is None:
        return None, artefacts
    for artefact in artefacts:
        if reference in (artefact.label, str(artefact.path)):
            return artefact.label, artefacts
    extra = discover(reference)
    if len(extra) != 1:
        raise BenchError(f"--reference {reference} must name one artefact, not {len(extra)} (name a file)")
    return extra[0].label, artefacts + extra


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write a probe file in it: an unwritable output is found before measuring."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BenchError(f"cannot write {what} to {folder}: {exc.strerror or exc}") from None


def progress(text: str) -> None:
    """One overwritten line on a terminal (the figures are in the table, printed once); nothing otherwise."""
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def run_cases(artefacts: list[Artefact], args, available: dict[str, str | None],
              checkpoint_runner: CheckpointRunner | None = None) -> list[CaseResult]:
    wanted = args.backends or BACKENDS
    plan = []
    for artefact in artefacts:
        for backend, reason in backends_for(artefact.kind, wanted, available):
            if reason and args.backends is None and backend not in ("ort-cpu", "pytorch-cpu", "trt"):
                continue  # auto mode: leave out GPU twins silently where there is no GPU
            thread_options = args.threads if backend in ("ort-cpu", "pytorch-cpu") else [0]
            plan += [(artefact, backend, reason, batch, threads) for batch in args.batch_size for threads in thread_options]
    results = []
    for number, (artefact, backend, reason, batch, threads) in enumerate(plan, start=1):
        result = CaseResult(artefact.label, backend, batch, threads)
        results.append(result)
        if reason:
            result.skipped = reason
            continue
        progress(f"[{number}/{len(plan)}] timing {result.key}")
        try:
            runner = make_runner(artefact, backend, batch, threads, args.keep, checkpoint_runner)
        except BenchSkip as skip:
            result.skipped = str(skip)
            continue
        except PipelineError:
            raise
        except Exception as exc:  # runtimes raise their own types for unloadable files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            raise BenchError(f"cannot run {artefact.path} on {backend}: {first}") from None
        try:
            samples, end_to_end = runner.time(args.warmup, args.iterations)
        finally:
            runner.close()
        for name, value in summarise(samples).items():
            setattr(result, name, value)
        result.images_per_s = batch * 1e3 / result.median_ms
        if end_to_end:
            result.end_to_end_median_ms = float(np.median(end_to_end))
    progress("")
    return results


def write_results(results: list[CaseResult], document: dict, out: Path, name: str) -> tuple[Path, Path]:
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    text = json.dumps(document, indent=2) + "\n"
    atomic_write(json_path, lambda temporary: Path(temporary).write_text(text))
    fields = list(results[0].to_dict()) if results else ["key"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(r.to_dict() for r in results)
    atomic_write(csv_path, lambda temporary: Path(temporary).write_text(table.getvalue()))
    return json_path, csv_path


def print_table(results: list[CaseResult], reference: str | None) -> None:
    width = max([len(r.artefact) for r in results] + [8])
    print(f"{'artefact':<{width}}  {'backend':<12} {'batch':>5} {'thr':>3} {'median ms':>10} {'p90 ms':>8} "
          f"{'p99 ms':>8} {'img/s':>8} {'e2e ms':>8}" + ("  ratio" if reference else ""))
    for r in results:
        if r.skipped:
            print(f"{r.artefact:<{width}}  {r.backend:<12} {r.batch:>5} {r.threads:>3}  skipped: {r.skipped}")
            continue
        ratio = f"  {r.ratio:.3f}" if reference and r.ratio is not None else ""
        end_to_end = f"{r.end_to_end_median_ms:>8.3f}" if r.end_to_end_median_ms is not None else f"{'-':>8}"
        print(f"{r.artefact:<{width}}  {r.backend:<12} {r.batch:>5} {r.threads:>3} {r.median_ms:>10.3f} "
              f"{r.p90_ms:>8.3f} {r.p99_ms:>8.3f} {r.images_per_s:>8.1f} {end_to_end}{ratio}")
    if any(r.end_to_end_median_ms is not None for r in results):
        print("trt: median/p90/p99 are device time (CUDA events); e2e adds the host copies")


def default_name() -> str:
    ort = tool_versions().get("onnxruntime-gpu") or tool_versions().get("onnxruntime") or "none"
    return f"bench_{os.cpu_count()}cpu_ort{ort}_{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: Sequence[str] | None = None, checkpoint_runner: CheckpointRunner | None = None) -> int:
    """The benchmark; ``checkpoint_runner`` times checkpoints in PyTorch (``export.bench.pytorch_runner``)."""
    args = build_parser().parse_args(argv)
    baseline = read_baseline(args.baseline) if args.baseline else None
    artefacts = [a for text in args.artefacts for a in discover(text)]
    reference, artefacts = resolve_reference(args.reference, artefacts)
    check_writable(args.out, "the results")
    if args.save_baseline:
        check_writable(args.save_baseline.parent, "the baseline")
    available = backend_availability()
    before = environment()
    if available.get("trt") is None:
        refusals = [line for a in artefacts if (line := engine_refusal(a, before))]
        if refusals:
            raise BenchError(refusals[0])
    results = run_cases(artefacts, args, available, checkpoint_runner)
    ratio_notes = add_ratios(results, reference)
    env = {**before, "load_average_after": load_average()}
    settings = {"warmup": args.warmup, "iterations": args.iterations, "reference": reference,
                "batch_sizes": args.batch_size, "threads": args.threads}
    document = {"environment": env, "settings": settings, "cases": [r.to_dict() for r in results]}
    print_table(results, reference)
    json_path, csv_path = write_results(results, document, args.out, args.name or default_name())
    print(f"results: {json_path} {csv_path} (load average {env['load_average']} -> {env['load_average_after']})")
    for line in ratio_notes:
        print(f"note: {line}")
    if args.save_baseline:
        saved = baseline_document(results, reference, env)
        text = json.dumps(saved, indent=2) + "\n"
        atomic_write(args.save_baseline, lambda temporary: Path(temporary).write_text(text))
        print(f"baseline written: {args.save_baseline} ({len(saved['cases'])} case(s))")
    if baseline is None:
        return 0
    slower, uncompared, notes = find_regressions(results, baseline, args.tolerance, reference)
    for line in notes:
        print(f"note: {line}")
    for line in slower + uncompared:
        print(line)
    if slower or uncompared:
        print(f"gate FAILED: {len(slower)} case(s) slower than {args.baseline} by more than {args.tolerance:g}%, "
              f"{len(uncompared)} baseline case(s) not compared")
        return EXIT_REGRESSION
    print(f"gate passed: {len(baseline['cases'])} case(s) compared, none slower than {args.baseline} by more than "
          f"{args.tolerance:g}%")
    return 0

