"""``python -m export.engine EXPORT_DIR``: the target-side stage - check, build, validate and time engines.

Copy an export folder (written by ``python -m export.build``) to the target, then:

  --backend ort  re-check every ONNX graph of the folder against its golden data on ONNX Runtime (CPU)
  --backend trt  build a TensorRT engine per precision on this machine, check it against the golden data,
                 time it, and add each passing engine, its figures and this machine's facts to the manifest
  --backend rtx  the same with TensorRT for RTX, whose builder needs no GPU: the engines are built anywhere, and
                 checked and timed where an RTX-class GPU they target is present (else listed as unchecked)
  --lint         only check every ONNX graph of the folder against what the ONNX parser of TensorRT 10.3 and
                 11.x supports (export.on_target.tensorrt_support; needs neither TensorRT nor a GPU): one line per graph
                 and version; the same check runs before any engine build, for the installed TensorRT

Both check with the comparison and the criteria export.build used: float32 - max abs error on the logits
within the tolerance and identical kept token sets; float16 / INT8 - finite logits and top-1 agreement with
the float32 PyTorch model of at least the export's minimum on real images (random images are reported, not
judged); at each batch size of the profile (MIN, OPT, MAX), the golden images split to fit.

Needs numpy, onnx, onnxruntime and (for trt) TensorRT's Python bindings and polygraphy, (for rtx) TensorRT-RTX's
bindings (and polygraphy where an engine runs): no torch, no timm
(--lint: onnx and numpy only).
Exit codes: 0 every graph or engine agrees (--lint: every graph is supported); 1 one disagrees (it is reported
and not published) or a graph would not parse on the TensorRT checked; 2 a user error (missing folder or manifest,
changed or corrupt files, TensorRT or the plugin library missing, another process writing the folder).

Building or re-checking engines writes the folder as one transaction (compress.plumbing.folder_transaction): one
writer at a time (a second one is refused), and a reader sees the old folder or the updated one, never a mix.
--lint and --backend ort only read it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

import trt_plugins
from compress.plumbing.cli import add_version_argument, bounded, parser_from_docstring
from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write
from compress.plumbing.folder_transaction import folder_transaction, recovered
from export.on_target.compare import (ENGINE_FLOAT32_MAX_ABS_ERROR, FLOAT32_MAX_ABS_ERROR, RANDOM_INPUTS,
                                      REDUCED_PRECISION_MIN_TOP1_AGREEMENT, Comparison, Runner, compare, onnxruntime_session,
                                      run_batched, session_runner)
from export.on_target.environment import (build_unavailable_reason, run_unavailable_reason, target_facts,
                                          tensorrt_unavailable_reason)
from export.on_target.runtimes import (RTX_DEFAULT_TARGETS, RUNTIMES, TENSORRT, Runtime, add_compute_capabilities_argument,
                                       runtime_named, runtime_version)
from export.on_target.golden import GoldenSet, debug_role, load_golden, sha256_of, verified_path
from export.on_target.tensorrt_engine import (TensorRTError, TensorRTRunner, build_engine, flavour_refusal,
                                              minimum_version_problem, plan_engine, portability_problem, timing_cache_path)
from export.on_target.tensorrt_support import (SUPPORT_TABLES, Problem, check_graphs, report_lines, support_table,
                                               target_tables)

EXIT_DISAGREES = 1
ENGINE_OWNER = "python -m export.engine"  # in the folder's lock file: a refused writer names it
# Graphs of folders written before artefact entries recorded their precision.
ROLE_PRECISION = {"onnx": "fp32", "onnx_plugin": "fp32", "onnx_fp16": "fp16", "onnx_int8": "int8"}


def graph_precisions(manifest: dict) -> dict[str, str]:
    """role -> precision of every shipped ONNX graph (not the debug twins) the manifest lists."""
    return {e["role"]: e.get("precision") or ROLE_PRECISION[e["role"]] for e in manifest.get("artifacts", [])
            if e["role"].startswith("onnx") and not e["role"].endswith("_debug")
            and (e.get("precision") or e["role"] in ROLE_PRECISION)}
ENGINE_ROLE = "engine"


class ExportFolderError(PipelineError):
    """An export folder that is missing, incomplete or unreadable."""


class UnsupportedGraph(PipelineError):
    """A graph the ONNX parser of the TensorRT in use would refuse (found without TensorRT, before its parser)."""

    def __init__(self, message: str, lines: Sequence[str] = ()):
        super().__init__(message)
        self.lines = list(lines)


# ----------------------------------------------------------------------------- the folder


def read_manifest(folder: Path) -> dict:
    folder = recovered(folder)  # a two-rename swap killed between its renames left no folder: put the old one back
    if not folder.exists():
        raise ExportFolderError(f"export folder not found: {folder}")
    if not folder.is_dir():
        raise ExportFolderError(f"{folder} is not a folder (give the export folder that holds manifest.json)")
    path = folder / "manifest.json"
    if not path.is_file():
        raise ExportFolderError(f"{folder} has no manifest.json (not a python -m export.build output)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportFolderError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise ExportFolderError(f"{path} is not an export manifest (no list of artifacts)")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Replace manifest.json in one rename: a reader sees the old manifest or the new one, never half.

    Never in place: a staging folder shares its files with the live folder by hard links (folder_transaction).
    """
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(Path(folder) / "manifest.json", lambda temporary: Path(temporary).write_text(text))


def batch_sizes(manifest: dict) -> list[int]:
    """The distinct batch sizes of the export's profile, MIN to MAX."""
    batch = manifest["batch"]
    return sorted({int(batch["min"]), int(batch["opt"]), int(batch["max"])})


def checked_graphs(folder: Path, manifest: dict) -> dict[str, Path]:
    """role -> the debug twin to run, for every ONNX graph of the folder; every listed file's sha256 verified."""
    entries = {e["role"]: e for e in manifest["artifacts"]}
    for entry in manifest["artifacts"]:
        if entry["role"] != ENGINE_ROLE:  # engines are checked against their own manifest facts
            verified_path(folder, entry)
    graphs = {}
    for role in graph_precisions(manifest):
        if role not in entries:
            continue
        twin = entries.get(debug_role(role))
        if twin is None:
            raise ExportFolderError(f"{entries[role]['path']} has no debug twin (role {debug_role(role)}) in the "
                                    "manifest: re-export the folder with this version of python -m export.build")
        graphs[role] = Path(folder) / twin["path"]
    if not graphs:
        raise ExportFolderError(f"{Path(folder) / 'manifest.json'} lists no ONNX graph")
    return graphs


def criteria(manifest: dict, role: str, set_name: str, engine: bool = False) -> tuple[float | None, float | None]:
    """(max abs tolerance, minimum top-1 agreement) that ``role`` met for ``set_name`` at export.

    Read from the manifest's validation figures (the very criteria export.build applied); the defaults of
    export.on_target.compare where they are absent. A float32 engine gets the engine tolerance (TF32 off, GPU order).
    """
    precision = graph_precisions(manifest)[role]
    recorded = [c for c in manifest.get("validation", {}).get(role, {}).get("comparisons", [])
                if c.get("inputs") == set_name]
    if recorded:
        tolerance, agreement = recorded[0].get("max_abs_tolerance"), recorded[0].get("min_top1_agreement")
    elif precision == "fp32":
        tolerance, agreement = FLOAT32_MAX_ABS_ERROR, None
    else:
        tolerance, agreement = None, None if set_name == RANDOM_INPUTS else REDUCED_PRECISION_MIN_TOP1_AGREEMENT
    if engine and tolerance is not None:
        tolerance = max(tolerance, ENGINE_FLOAT32_MAX_ABS_ERROR)
    return tolerance, agreement


def check_runner(run: Runner, golden: dict[str, GoldenSet], sizes: Sequence[int], manifest: dict, role: str,
                 engine: bool = False) -> list[Comparison]:
    """Compare ``run`` with the golden outputs of every set, at every batch size."""
    results = []
    for name, data in golden.items():
        tolerance, agreement = criteria(manifest, role, name, engine)
        for batch in sizes:
            outputs = run_batched(run, data.images, batch)
            results.append(compare(data.reference, outputs, name, tolerance, agreement, batch))
    return results


def check_onnx(folder: Path, manifest: dict, golden: dict[str, GoldenSet]) -> dict[str, list[Comparison]]:
    """Every ONNX graph of the folder (through its debug twin) on ONNX Runtime against the golden data."""
    results = {}
    for role, twin in checked_graphs(folder, manifest).items():
        run = session_runner(onnxruntime_session(onnx.load(str(twin))))
        results[role] = check_runner(run, golden, batch_sizes(manifest), manifest, role)
    return results


def has_token_gather(path: Path) -> bool:
    return any(node.op_type == "TokenGather" for node in onnx.load(str(path), load_external_data=False).graph.node)


# ----------------------------------------------------------------------------- TensorRT parser support (lint)


def onnx_artifacts(folder: Path, manifest: dict) -> list[Path]:
    """Every ONNX graph the manifest lists (shipped graphs and debug twins), each file's sha256 verified."""
    paths = [verified_path(folder, entry) for entry in manifest["artifacts"] if entry["role"].startswith("onnx")]
    if not paths:
        raise ExportFolderError(f"{Path(folder) / 'manifest.json'} lists no ONNX graph")
    return paths


def lint_folder(folder: Path, manifest: dict, versions: str | Sequence[str] = SUPPORT_TABLES
                ) -> dict[str, dict[str, list[Problem]]]:
    """{graph: {support table: problems}} for every ONNX graph of an export folder (no TensorRT needed)."""
    return check_graphs(onnx_artifacts(folder, manifest), target_tables(versions))


def require_supported(graphs: Sequence[Path], tensorrt_version: str) -> None:
    """Raise UnsupportedGraph, naming node, operator and reason, when a graph would not parse on this TensorRT."""
    results = check_graphs(graphs, [tensorrt_version])
    problems = [(graph, p) for graph, per in results.items() for found in per.values() for p in found]
    if problems:
        graph, first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnsupportedGraph(f"{graph} would not parse on TensorRT {tensorrt_version} (checked against the "
                               f"{support_table(tensorrt_version)} support table): {first}{more}; no engine was built "
                               "(python -m export.engine EXPORT_DIR --lint lists every problem; --no-lint skips the "
                               "check)", report_lines(results))


# ----------------------------------------------------------------------------- engines


def summarise_ms(samples: Sequence[float]) -> dict:
    values = np.asarray(samples, dtype=np.float64)
    return {"median": round(float(np.median(values)), 4), "p90": round(float(np.percentile(values, 90)), 4),
            "p99": round(float(np.percentile(values, 99)), 4), "runs": int(len(values))}


def prepare_runtime(graphs: dict[str, Path], manifest: dict, chosen: Runtime) -> str:
    """Before any engine work: the runtime's refusals of the folder's graph flavour, the plugin library when a graph
    needs it (one clear line when it is not built), then the runtime (and for TensorRT a GPU); loads the library.
    Returns the runtime's version."""
    plugin = any(has_token_gather(path) for path in graphs.values())
    refusal = flavour_refusal(manifest, chosen, plugin)
    if refusal:
        raise TensorRTError(refusal)
    if plugin:
        trt_plugins.find_plugin_library()
    reason = build_unavailable_reason(chosen)
    if reason:
        raise TensorRTError(f"cannot build engines here: {reason}; {chosen.install_hint}")
    if plugin:
        trt_plugins.load_plugin_library()
    return runtime_version(chosen)


def check_and_time(engine_path: Path, twin: Path, golden: dict[str, GoldenSet], manifest: dict, role: str,
                   warmup: int, iterations: int, chosen: Runtime = TENSORRT) -> dict:
    """An engine against the golden data at every batch size of the profile, and, when it agrees, its device
    and end-to-end times per batch size: {"passed", "comparisons", "timing"}."""
    output_names = [o.name for o in onnx.load(str(twin), load_external_data=False).graph.output]
    sizes = batch_sizes(manifest)
    with TensorRTRunner(engine_path, output_names, chosen) as runner:
        comparisons = check_runner(runner, golden, sizes, manifest, role, engine=True)
        passed = all(c.passed for c in comparisons)
        timing = {}
        if passed:
            images = next(iter(golden.values())).images
            for batch in sizes:
                device, end_to_end = runner.measure(images[np.arange(batch) % len(images)], warmup, iterations)
                timing[str(batch)] = {"device_ms": summarise_ms(device), "end_to_end_ms": summarise_ms(end_to_end)}
    return {"passed": passed, "comparisons": [c.to_dict() for c in comparisons], "timing": timing}


def build_and_check(export_dir: Path, manifest: dict, golden: dict[str, GoldenSet] | None = None,
                    warmup: int = 10, iterations: int = 50, timing_cache_dir: Path | None = None,
                    lint: bool = True, chosen: Runtime = TENSORRT,
                    compute_capabilities: Sequence[str] = RTX_DEFAULT_TARGETS) -> dict:
    """Build an engine per precision of ``manifest`` into ``export_dir`` with ``chosen``, check and time it where it
    can run; the "engines" entry.

    Each engine is built from the debug twin of the validated graph of its precision (so the engine that is
    checked, kept positions included, is the engine that is published) and named ``chosen.engine_file(precision)``.
    Returns ``{manifest key: facts}``: ``passed`` True (agreed with the golden data), False (disagreed: its file
    has been deleted) or None (built, but this machine cannot run it: a TensorRT-RTX engine built on a CPU, or for
    GPUs other than this one; ``unchecked`` says why). Raises PipelineError when the runtime (for TensorRT a GPU) or
    the plugin library is missing or the runtime cannot take the graph flavour, and UnsupportedGraph (before the
    parser sees it) when ``lint`` finds a graph this runtime would refuse.
    """
    folder = Path(export_dir)
    graphs = checked_graphs(folder, manifest)
    version = prepare_runtime(graphs, manifest, chosen)
    here = target_facts()
    too_old = minimum_version_problem(manifest, version) if chosen is TENSORRT else None
    if too_old:
        raise TensorRTError(too_old)
    if lint:
        require_supported(list(graphs.values()), version if chosen is TENSORRT else chosen.key)
    cannot_run = run_unavailable_reason(chosen, tuple(compute_capabilities))  # the targets matter for RTX only
    if cannot_run is None and golden is None:
        golden = load_golden(folder, manifest)
    cache = timing_cache_path(timing_cache_dir or folder.parent, here)
    engines = {}
    for precision in manifest.get("precision", ["fp32"]):
        plan = plan_engine(version, precision, manifest.get("gather", "native"),
                           manifest.get("default_flavour", "native"), chosen, compute_capabilities)
        if plan.onnx_role not in graphs:
            continue
        engine_path = folder / chosen.engine_file(precision)
        facts = build_engine(plan, graphs[plan.onnx_role], engine_path, manifest["batch"], manifest["input"]["name"],
                             manifest["input"]["shape"][1:], cache)
        if cannot_run is None:
            checked = check_and_time(engine_path, graphs[plan.onnx_role], golden, manifest, plan.onnx_role, warmup,
                                     iterations, chosen)
        else:
            checked = {"passed": None, "unchecked": cannot_run, "comparisons": [], "timing": {}}
        if checked["passed"] is False:
            engine_path.unlink(missing_ok=True)
        engines[chosen.manifest_key(precision)] = {
            **facts, "path": engine_path.name, "precision": precision, "onnx_role": plan.onnx_role,
            "sha256": sha256_of(engine_path) if checked["passed"] is not False else None,
            "gpu": here["gpu"], "compute_capability": here["compute_capability"], **checked}
    return engines


def recheck_engines(export_dir: Path, manifest: dict, golden: dict[str, GoldenSet], warmup: int = 10,
                    iterations: int = 50, chosen: Runtime = TENSORRT) -> dict:
    """Check and time the engines of ``chosen`` the manifest already lists, without building; the updated entries.

    An engine built by another version of the runtime or for another GPU is refused (one clear line) before
    the runtime is touched; a changed engine file is refused by its sha256.
    """
    folder = Path(export_dir)
    listed = {key: facts for key, facts in (manifest.get("engines") or {}).items()
              if runtime_named(facts.get("runtime")) is chosen}
    if not listed:
        raise ExportFolderError(f"{folder / 'manifest.json'} lists no {chosen.name} engine to check: build them with "
                                f"python -m export.engine {folder} --backend {chosen.key}")
    here = target_facts()
    for facts in listed.values():
        problem = portability_problem(facts, here)
        if problem:
            raise TensorRTError(f"refusing {folder / facts['path']}: {problem}")
    graphs = checked_graphs(folder, manifest)
    version = prepare_runtime(graphs, manifest, chosen)
    engines = {}
    for key, facts in listed.items():
        engine_path = verified_path(folder, facts)
        precision = facts.get("precision", key)
        role = facts.get("onnx_role") or plan_engine(version, precision, manifest.get("gather", "native"),
                                                     manifest.get("default_flavour", "native"), chosen).onnx_role
        engines[key] = {**facts, **check_and_time(engine_path, graphs[role], golden, manifest, role, warmup,
                                                  iterations, chosen)}
    return engines


def with_engines(manifest: dict, engines: dict, here: dict) -> dict:
    """The manifest with the published engines listed (role "engine") and described, and this target's facts.

    Published: every engine that agreed with the golden data, and every engine this machine could not run
    (``passed`` None: a TensorRT-RTX engine built on a CPU). An engine that disagreed is no longer listed,
    whether it was just built or re-checked (pure).
    """
    published = {key: facts for key, facts in engines.items() if facts["passed"] is not False}
    kept = [e for e in manifest["artifacts"] if e["role"] != ENGINE_ROLE or e["path"] not in
            {f["path"] for f in engines.values()}]
    artifacts = kept + [{"path": f["path"], "role": ENGINE_ROLE, "sha256": f["sha256"],
                         "precision": f.get("precision", key), "runtime": runtime_named(f.get("runtime")).name}
                        for key, f in published.items()]
    earlier = {key: f for key, f in (manifest.get("engines") or {}).items() if key not in engines}
    return {**manifest, "artifacts": artifacts, "engines": {**earlier, **published}, "target": here}


def engine_problem(manifest: dict, engine_file: str, here: dict) -> str | None:
    """Why the engine ``engine_file`` of this manifest must not run here (None: it may)."""
    for facts in manifest.get("engines", {}).values():
        if facts.get("path") == engine_file:
            return portability_problem(facts, here)
    return f"{engine_file} is not described in the manifest's engines (no TensorRT version or GPU recorded)"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    default_backend = "trt" if tensorrt_unavailable_reason() is None else "ort"
    parser = parser_from_docstring(
        "python -m export.engine", __doc__,
        (EXIT_DISAGREES, "a graph or engine disagrees with the golden data (an engine is then not published)"))
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="an export folder with manifest.json")
    parser.add_argument("--backend", choices=(*RUNTIMES, "ort"), default=default_backend,
                        help="trt: build, check and time TensorRT engines on this GPU; rtx: build TensorRT-RTX engines "
                             "(on any machine, GPU or not), and check and time them where an RTX-class GPU they target "
                             "is present; ort: check the ONNX graphs on ONNX Runtime (default: trt where TensorRT and a "
                             f"GPU are present, else ort; here: {default_backend})")
    add_compute_capabilities_argument(parser, "with rtx: ")
    parser.add_argument("--no-build", action="store_true",
                        help="with trt or rtx: check and time the engines of that runtime the manifest already lists "
                             "instead of building; an engine built by another version or for another GPU is refused "
                             "(default: off)")
    parser.add_argument("--warmup", type=bounded(int, 0), default=10, help="untimed engine runs before timing (default: 10)")
    parser.add_argument("--iterations", "-n", type=bounded(int, 1), default=50,
                        help="timed engine runs per batch size (default: 50)")
    parser.add_argument("--lint", action="store_true",
                        help="only check every ONNX graph of the folder against the ONNX parser support of TensorRT "
                             "(no TensorRT needed): one line per graph and version, exit 1 when one is not supported "
                             "(default: off)")
    parser.add_argument("--trt-version", choices=(*SUPPORT_TABLES, "both"), default="both",
                        help="with --lint: the TensorRT version(s) to check against (10.3: every 10.x, JetPack 6; "
                             "11: every 11.x; rtx: TensorRT-RTX 1.x; both: 10.3 and 11)")
    parser.add_argument("--no-lint", action="store_true",
                        help="with trt or rtx: build without the parser-support check first (default: check the "
                             "graphs against the runtime's table and stop before its parser when one is not supported)")
    parser.add_argument("--timing-cache-dir", type=Path, default=None,
                        help="folder of the TensorRT timing caches, one per TensorRT version and GPU "
                             "(default: the export folder's parent)")
    return add_version_argument(parser)


def print_comparisons(label: str, comparisons: Sequence[Comparison]) -> None:
    for c in comparisons:
        judged = "judged" if c.max_abs_tolerance is not None or c.min_top1_agreement is not None else "reported"
        overlap = "/".join(f"{o:.3f}" for o in c.kept_overlap) or "-"
        print(f"  {label:<18} {c.inputs:<10} b{c.batch:<3} {c.max_abs_error:>11.2e} {c.top1_agreement:>6.3f} "
              f"{overlap:<20} {'ok' if c.passed else 'FAILED':<6} ({judged})")


def print_header() -> None:
    print(f"  {'graph / engine':<18} {'inputs':<10} {'batch':<4} {'max abs err':>11} {'top-1':>6} "
          f"{'kept overlap/stage':<20} verdict")


def print_lint(folder: Path, results: dict[str, dict[str, list[Problem]]]) -> int:
    tables = sorted({t for per in results.values() for t in per}, key=SUPPORT_TABLES.index)
    print(f"{folder}: ONNX graphs against the ONNX parser support of TensorRT {' and '.join(tables)}")
    for line in report_lines(results):
        print(f"  {line}")
    failing = sorted({f"{graph} on TensorRT {table}" for graph, per in results.items() for table, found in per.items()
                      if found})
    if failing:
        print(f"FAILED: {len(failing)} graph/version pair(s) would not parse: {', '.join(failing)}")
        return EXIT_DISAGREES
    print(f"PASSED: {len(results)} graph(s) supported by TensorRT {' and '.join(tables)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = args.export_dir
    manifest = read_manifest(folder)
    if args.lint:
        return print_lint(folder, lint_folder(folder, manifest, args.trt_version))
    if args.no_lint and args.backend == "ort":
        raise ExportFolderError("--no-lint skips the check before an engine build: it needs --backend trt or rtx")
    if args.compute_capabilities != RTX_DEFAULT_TARGETS and args.backend != "rtx":
        raise ExportFolderError("--compute-capabilities chooses the GPUs of TensorRT-RTX engines: it needs --backend rtx")
    if not isinstance(manifest.get("batch"), dict) or not isinstance(manifest.get("input"), dict):
        raise ExportFolderError(f"{folder / 'manifest.json'} has no batch profile or input description")
    golden = load_golden(folder, manifest)
    if args.no_build and args.backend == "ort":
        raise ExportFolderError("--no-build checks engines: it needs --backend trt or rtx")
    if args.backend == "ort":
        results = check_onnx(folder, manifest, golden)
        print(f"{folder}: ONNX graphs against golden data on ONNX Runtime (CPU), batch sizes {batch_sizes(manifest)}")
        print_header()
        for role, comparisons in results.items():
            print_comparisons(role, comparisons)
        failed = [role for role, comparisons in results.items() if not all(c.passed for c in comparisons)]
        if failed:
            print(f"FAILED: {', '.join(failed)} disagree with the golden data")
            return EXIT_DISAGREES
        print(f"PASSED: {len(results)} graph(s) agree with the golden data")
        return 0

    chosen = RUNTIMES[args.backend]
    try:
        # Engines and manifest are written into a hard-linked copy of the folder, swapped in once all is written.
        with folder_transaction(folder, owner=ENGINE_OWNER, from_current=True) as staging:
            manifest = read_manifest(staging)  # as it is under the lock: another writer may have finished since
            golden = load_golden(staging, manifest)
            if args.no_build:
                engines = recheck_engines(staging, manifest, golden, args.warmup, args.iterations, chosen)
            else:
                engines = build_and_check(staging, manifest, golden, args.warmup, args.iterations,
                                          args.timing_cache_dir, lint=not args.no_lint, chosen=chosen,
                                          compute_capabilities=args.compute_capabilities)
            here = target_facts()
            write_manifest(staging, with_engines(manifest, engines, here))
    except UnsupportedGraph as exc:  # nothing built: the staging folder is dropped, the folder unchanged
        print("\n".join(f"  {line}" for line in exc.lines))
        print(f"FAILED: {exc}")
        return EXIT_DISAGREES
    return print_engines(folder, engines, chosen, here)


def print_engines(folder: Path, engines: dict, chosen: Runtime, here: dict) -> int:
    """A row per engine and batch, timings, and one verdict line; the exit code."""
    gpu = f"{here['gpu']} (compute capability {here['compute_capability']})" if here["gpu"] else "no GPU"
    print(f"{folder}: {chosen.name} {here[chosen.version_key]}, {gpu}")
    print_header()
    for key, facts in engines.items():
        print_comparisons(f"{key} engine", [Comparison(**{k: v for k, v in c.items() if k != "passed"})
                                            for c in facts["comparisons"]])
        for batch, timing in facts["timing"].items():
            print(f"  {key} engine b{batch}: device {timing['device_ms']['median']:.3f} ms (CUDA events), "
                  f"end to end {timing['end_to_end_ms']['median']:.3f} ms (with copies)")
        if facts["passed"] is None:
            print(f"  {key} engine: {facts['path']}, {facts['layers']} layers, {facts['bytes'] / 1e6:.1f} MB, built in "
                  f"{facts['build_seconds']:.1f} s; not checked here: {facts['unchecked']}")
    failed = [key for key, facts in engines.items() if facts["passed"] is False]
    if failed:
        print(f"FAILED: {', '.join(failed)} engine(s) disagree with the golden data and were not published")
        return EXIT_DISAGREES
    unchecked = [key for key, facts in engines.items() if facts["passed"] is None]
    if unchecked:
        print(f"BUILT: {len(unchecked)} {chosen.name} engine(s) listed in {folder / 'manifest.json'}, not checked "
              f"against the golden data here; on a GPU they target: python -m export.engine {folder} "
              f"--backend {chosen.key} --no-build")
        return 0
    print(f"PASSED: {len(engines)} engine(s) agree with the golden data; manifest updated: {folder / 'manifest.json'}")
    return 0
