"""``python -m export.bench``: latency of built artefacts, with a regression gate.

Artefacts: export folders (every ONNX and engine their manifest.json lists), single ``.onnx`` files,
TensorRT engines (``.engine``/``.plan``, through a lazy import), and checkpoints (``.pth``/``.pt``/
``.safetensors``, PyTorch eager for comparison). Each case (artefact x backend x batch x threads) gets
untimed warm-up runs, then timed runs: median, p90, p99 (ms). Results go to JSON and CSV together with the
environment (CPU/GPU, tool versions, load average, and on Jetson the power mode and clocks).

Gate: ``--baseline FILE`` fails (exit 1) naming every case whose median is more than ``--tolerance``
percent above the baseline's. On shared, noisy machines pass ``--reference ARTEFACT``: every case is then
compared as the ratio of its median to the reference artefact's median measured in the same run (e.g.
pruned / dense), which cancels most of the machine's load. ``--save-baseline FILE`` writes such a file.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from compress.cli import run_cli
from compress.errors import PipelineError
from export.tensorrt_engine import tensorrt_unavailable_reason

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


@dataclass
class CaseResult:
    artefact: str
    backend: str
    batch: int
    threads: int
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    iterations: int = 0
    images_per_s: float | None = None
    ratio: float | None = None  # median / the reference artefact's median (same backend, batch, threads)
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
    if path.is_dir():
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise BenchError(f"{path} is a folder without manifest.json (not an export.build output)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"cannot read {manifest_path}: {exc}") from None
        prefix = label or path.resolve().name
        found = []
        for entry in manifest.get("artifacts", []):
            file = path / entry["path"]
            if kind_of(file) in ("onnx", "engine") and file.is_file():
                found.append(Artefact(f"{prefix}/{entry['path']}", file, kind_of(file)))
        if not found:
            raise BenchError(f"{manifest_path} lists no ONNX or engine file that exists")
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
    """Why each backend cannot run here (None: it can). Imports nothing heavy beyond onnxruntime/torch."""
    reasons: dict[str, str | None] = {"ort-cpu": None, "pytorch-cpu": None}
    try:
        import onnxruntime

        cuda_provider = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        reasons["ort-cpu"], cuda_provider = "onnxruntime is not installed", False
    gpu = cuda_visible()
    reasons["ort-cuda"] = None if cuda_provider and gpu else (
        "no CUDA GPU is visible" if not gpu else "this onnxruntime has no CUDAExecutionProvider")
    reasons["pytorch-cuda"] = None if gpu else "no CUDA GPU is visible"
    reasons["trt"] = tensorrt_unavailable_reason()  # the export stage's own check: one answer for both
    return reasons


def cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# ----------------------------------------------------------------------------- runners


def onnx_input(model) -> tuple[int | None, tuple[int, ...]]:
    """(static batch or None, per-image shape) of input ``images``."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    return batch, tuple(d.dim_value for d in dims[1:])


def ort_runner(path: Path, backend: str, batch: int, threads: int) -> Callable[[], object]:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    fixed, shape = onnx_input(model)
    if fixed is not None and fixed != batch:
        raise BenchSkip(f"static batch {fixed}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
    if any(n.op_type == "TokenGather" for n in model.graph.node):
        if backend != "ort-cpu":
            raise BenchSkip("TokenGather graphs run on ONNX Runtime's CPU custom op only")
        from trt_plugins.ort_token_gather import make_session

        session = make_session(model, session_options=options)
    else:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    feed = {"images": np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)}
    return lambda: session.run(None, feed)


def tensorrt_runner(path: Path, batch: int) -> Callable[[], object]:
    """Engine inference through polygraphy (TensorRT imported only here)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    if path.suffix == ".engine" and (path.parent / "manifest.json").is_file():
        manifest = json.loads((path.parent / "manifest.json").read_text())
        if manifest.get("gather") == "plugin":
            import trt_plugins

            trt_plugins.load_plugin_library()
    runner = TrtRunner(EngineFromBytes(BytesFromPath(str(path))))
    runner.activate()
    shape = runner.get_input_metadata()["images"].shape
    feed = {"images": np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)}
    return lambda: runner.infer(feed)


def pytorch_runner(path: Path, backend: str, batch: int, threads: int, keep: float | None) -> Callable[[], object]:
    import torch

    from compress.checkpoint import load_dynamicvit

    if threads:
        torch.set_num_threads(threads)
    model = load_dynamicvit(path, keep_ratio=keep).model.eval()
    device = torch.device("cuda" if backend == "pytorch-cuda" else "cpu")
    model.to(device)
    images = torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, device=device)

    def run():
        with torch.inference_mode():
            model.forward_pruned(images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


class BenchSkip(Exception):
    """A case that cannot run here (recorded with its reason, not an error)."""


def make_runner(artefact: Artefact, backend: str, batch: int, threads: int, keep: float | None):
    if artefact.kind == "onnx":
        return ort_runner(artefact.path, backend, batch, threads)
    if artefact.kind == "engine":
        return tensorrt_runner(artefact.path, batch)
    return pytorch_runner(artefact.path, backend, batch, threads, keep)


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


def add_ratios(results: list[CaseResult], reference: str | None) -> None:
    """Set each case's ratio to its median over the reference artefact's median in the same setting."""
    if reference is None:
        return
    base = {(r.backend, r.batch, r.threads): r.median_ms for r in results if r.artefact == reference and r.median_ms}
    for r in results:
        denominator = base.get((r.backend, r.batch, r.threads))
        if r.median_ms is not None and denominator:
            r.ratio = r.median_ms / denominator


# ----------------------------------------------------------------------------- the gate


def baseline_document(results: list[CaseResult], reference: str | None, environment: dict) -> dict:
    cases = {r.key: {"median_ms": r.median_ms, "ratio": r.ratio} for r in results if r.median_ms is not None}
    return {"schema": BASELINE_SCHEMA, "reference": reference, "cases": cases, "environment": environment}


def read_baseline(path: Path) -> dict:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read baseline {path}: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("cases"), dict):
        raise BenchError(f"{path} is not a baseline file (write one with --save-baseline)")
    return document


def find_regressions(results: list[CaseResult], baseline: dict, tolerance_pct: float,
                     reference: str | None) -> tuple[list[str], list[str]]:
    """(lines naming every case slower than the baseline by more than the tolerance, notes).

    With ``reference`` the compared number is each case's ratio to the reference artefact (the baseline
    must hold ratios to the same reference); otherwise the absolute median.
    """
    if reference is not None and baseline.get("reference") != reference:
        raise BenchError(f"the baseline's ratios are relative to {baseline.get('reference')!r}, not {reference!r}: "
                         "save a baseline with the same --reference")
    metric = "ratio" if reference is not None else "median_ms"
    limit = 1.0 + tolerance_pct / 100.0
    slower, notes = [], []
    measured = {r.key: r for r in results}
    for key, entry in sorted(baseline["cases"].items()):
        current = measured.get(key)
        if current is None or getattr(current, metric) is None:
            notes.append(f"not measured this run: {key}")
            continue
        if entry.get(metric) is None:
            notes.append(f"baseline has no {metric} for {key}")
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
    return slower, notes


# ----------------------------------------------------------------------------- environment


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def command_output(*command: str) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or done.stderr).strip() or None if done.returncode == 0 else None


def cpu_model() -> str:
    text = read_text("/proc/cpuinfo") or ""
    match = re.search(r"^(model name|Hardware|Model)\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(2).strip() if match else (platform.processor() or platform.machine())


def jetson_facts() -> dict | None:
    """Power mode and clocks on Jetson (nvpmodel, jetson_clocks, sysfs); None elsewhere."""
    release = read_text("/etc/nv_tegra_release")
    if release is None and not Path("/sys/devices/soc0/family").exists():
        return None
    facts = {"l4t_release": release, "nvpmodel": command_output("nvpmodel", "-q"),
             "jetson_clocks": command_output("jetson_clocks", "--show")}
    frequencies = {}
    for path in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        frequencies[path.parts[-3]] = read_text(str(path))
    for path in sorted(Path("/sys/class/devfreq").glob("*/cur_freq")):
        frequencies[f"devfreq:{path.parent.name}"] = read_text(str(path))
    facts["frequencies_hz"] = frequencies
    return facts


def tool_versions() -> dict:
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in ("numpy", "onnx", "onnxruntime-gpu", "onnxruntime", "torch", "tensorrt", "polygraphy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def environment() -> dict:
    facts = {"host": platform.node(), "system": f"{platform.system()} {platform.release()}",
             "machine": platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
             "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
             "tools": tool_versions()}
    gpu = command_output("nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem", "--format=csv,noheader")
    if gpu:
        facts["gpu"] = gpu
    jetson = jetson_facts()
    if jetson:
        facts["jetson"] = jetson
    return facts


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.bench", 
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("artefacts", nargs="+", metavar="ARTEFACT",
                        help="export folder (with manifest.json), .onnx, engine (.engine/.plan) or checkpoint "
                             "(.pth/.pt/.safetensors); LABEL=PATH names it (default label: <folder>/<file>)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends to time (default: every one that can run each artefact here)")
    parser.add_argument("--batch-size", "-b", type=int, nargs="+", default=[1],
                        help="batch sizes; static-batch graphs run only at their own (default: 1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="CPU threads for ONNX Runtime and PyTorch, 0 = the framework's default (default: 0)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before timing (default: 10)")
    parser.add_argument("--iterations", "-n", type=int, default=100, help="timed runs per case (default: 100)")
    parser.add_argument("--keep", type=float, default=None,
                        help="keep ratio for checkpoints timed in PyTorch (default: the checkpoint's)")
    parser.add_argument("--reference", default=None, metavar="ARTEFACT",
                        help="label or path of the artefact every case is divided by (adds ratios; the gate then "
                             "compares ratios) (default: none)")
    parser.add_argument("--baseline", type=Path, default=None, help="gate against this baseline file (default: no gate)")
    parser.add_argument("--tolerance", type=float, default=10.0,
                        help="percent a case may be slower than the baseline (default: 10)")
    parser.add_argument("--save-baseline", type=Path, default=None,
                        help="write this run as a baseline file (default: not written)")
    parser.add_argument("--out", "-o", type=Path, default=Path("bench_results"),
                        help="folder for the results (default: bench_results)")
    parser.add_argument("--name", default=None,
                        help="file stem of the results, written as NAME.json and NAME.csv "
                             "(default: bench_<cpu count>cpu_ort<version>_<timestamp>)")
    return parser


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


def run_cases(artefacts: list[Artefact], args, available: dict[str, str | None]) -> list[CaseResult]:
    wanted = args.backends or BACKENDS
    results = []
    for artefact in artefacts:
        for backend, reason in backends_for(artefact.kind, wanted, available):
            if reason and args.backends is None and backend not in ("ort-cpu", "pytorch-cpu", "trt"):
                continue  # auto mode: leave out GPU twins silently where there is no GPU
            thread_options = args.threads if backend in ("ort-cpu", "pytorch-cpu") else [0]
            for batch in args.batch_size:
                for threads in thread_options:
                    result = CaseResult(artefact.label, backend, batch, threads)
                    results.append(result)
                    if reason:
                        result.skipped = reason
                        continue
                    try:
                        run = make_runner(artefact, backend, batch, threads, args.keep)
                    except BenchSkip as skip:
                        result.skipped = str(skip)
                        continue
                    except PipelineError:
                        raise
                    except Exception as exc:  # runtimes raise their own types for unloadable files
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
                        raise BenchError(f"cannot run {artefact.path} on {backend}: {first}") from None
                    stats = summarise(time_runs(run, args.warmup, args.iterations))
                    for name, value in stats.items():
                        setattr(result, name, value)
                    result.images_per_s = batch * 1e3 / stats["median_ms"]
                    print(f"  {result.key}: median {stats['median_ms']:.2f} ms, p90 {stats['p90_ms']:.2f}, "
                          f"p99 {stats['p99_ms']:.2f}", file=sys.stderr, flush=True)
    return results


def write_results(results: list[CaseResult], document: dict, out: Path, name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    fields = list(results[0].to_dict()) if results else ["key"]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r.to_dict() for r in results)
    return json_path, csv_path


def print_table(results: list[CaseResult], reference: str | None) -> None:
    width = max([len(r.artefact) for r in results] + [8])
    print(f"{'artefact':<{width}}  {'backend':<12} {'batch':>5} {'thr':>3} {'median ms':>10} {'p90 ms':>8} "
          f"{'p99 ms':>8} {'img/s':>8}" + ("  ratio" if reference else ""))
    for r in results:
        if r.skipped:
            print(f"{r.artefact:<{width}}  {r.backend:<12} {r.batch:>5} {r.threads:>3}  skipped: {r.skipped}")
            continue
        ratio = f"  {r.ratio:.3f}" if reference and r.ratio is not None else ""
        print(f"{r.artefact:<{width}}  {r.backend:<12} {r.batch:>5} {r.threads:>3} {r.median_ms:>10.3f} "
              f"{r.p90_ms:>8.3f} {r.p99_ms:>8.3f} {r.images_per_s:>8.1f}{ratio}")


def default_name() -> str:
    import importlib.metadata

    try:
        ort = importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        ort = "none"
    return f"bench_{os.cpu_count()}cpu_ort{ort}_{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.tolerance < 0 or min(args.batch_size) < 1:
        raise BenchError("--iterations and --batch-size must be >= 1, --warmup and --tolerance >= 0")
    baseline = read_baseline(args.baseline) if args.baseline else None
    artefacts = [a for text in args.artefacts for a in discover(text)]
    reference, artefacts = resolve_reference(args.reference, artefacts)
    before = environment()
    results = run_cases(artefacts, args, backend_availability())
    add_ratios(results, reference)
    env = {**before, "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    settings = {"warmup": args.warmup, "iterations": args.iterations, "reference": reference,
                "batch_sizes": args.batch_size, "threads": args.threads}
    document = {"environment": env, "settings": settings, "cases": [r.to_dict() for r in results]}
    print_table(results, reference)
    json_path, csv_path = write_results(results, document, args.out, args.name or default_name())
    print(f"results: {json_path} {csv_path} (load average {env['load_average']} -> {env['load_average_after']})")
    if args.save_baseline:
        args.save_baseline.parent.mkdir(parents=True, exist_ok=True)
        args.save_baseline.write_text(json.dumps(baseline_document(results, reference, env), indent=2) + "\n")
        print(f"baseline written: {args.save_baseline}")
    if baseline is None:
        return 0
    slower, notes = find_regressions(results, baseline, args.tolerance, reference)
    for line in notes:
        print(f"note: {line}")
    for line in slower:
        print(line)
    if slower:
        print(f"gate FAILED: {len(slower)} case(s) slower than {args.baseline} by more than {args.tolerance:g}%")
        return EXIT_REGRESSION
    print(f"gate passed: no case slower than {args.baseline} by more than {args.tolerance:g}%")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
