"""The export stage as a Python API: ``export_model(ExportRequest(...)) -> ExportResult``.

``python -m export.build`` parses its flags into an ``ExportRequest`` and calls ``export_model``; so can any
Python code (the keep-ratio sweep, tests, a notebook). One run:

1. ``ExportRequest.check()``: every option and combination, before any work (keep ratio, opset, batch
   profile, options that would do nothing, data sources, the plugin library, TensorRT when required);
2. ``request.method.prepare``: the method (``export.methods``: DynamicViT, ToMe, or any other that keeps the
   contract) loads its subject (the checkpoint, else the demo model, else seeded random weights, labelled as
   such), resolves its degree and merges a ToCom plugin into a copy of the weights when asked (the caller's
   model is never modified);
3. for each graph (float32 native, plugin flavour, float16, INT8): the method's deploy copy -> ONNX -> its
   debug twin validated on ONNX Runtime against float32 PyTorch -> the shipped graph checked against the twin;
4. golden data (validation inputs + PyTorch outputs) for re-checking on the target; an engine where TensorRT is;
5. everything is written into a staging folder beside ``out`` and swapped in, in one rename, only when all of it
   passed; the whole run holds ``out``'s lock, so a second writer is refused (``compress.plumbing.folder_transaction``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx
import torch

from calibration.data import load_calibration_data
from calibration.int8 import quantize_for_export, transplant_qdq
from compress.data.images import check_image_sources
from compress.plumbing.cli import package_version
from compress.plumbing.errors import PipelineError
from compress.plumbing.folder_transaction import folder_transaction
from export.errors import ExportError, ValidationFailed
from export.methods import DEFAULT_METHOD, ExportContract, MethodOptions
from export.onnx_export import MIN_OPSET
from export.publishing import EXPORT_OWNER, MANIFEST_NAME, carry_over_user_files, previous_manifest
from export.subject import VALIDATION_SEED, ExportSubject
from export.on_target.compare import (FLOAT32_MAX_ABS_ERROR, RANDOM_INPUTS, REDUCED_PRECISION_MIN_TOP1_AGREEMENT, Comparison)
from export.on_target.engine import build_and_check, has_token_gather, with_engines
from export.on_target.environment import build_unavailable_reason, target_facts, tool_versions
from export.on_target.golden import debug_file_name, debug_role, sha256_of, write_golden
from export.on_target.runtimes import RTX_DEFAULT_TARGETS, RUNTIMES, TENSORRT, TENSORRT_RTX, Runtime, runtime_version
from export.on_target.tensorrt_engine import probe_graph, write_trtexec
from export.on_target.tensorrt_support import check_graphs, manifest_entry, support_table, target_tables
from export.validate import shipped_vs_debug, validate_graph


MANIFEST_SCHEMA = 2
VALIDATION_IMAGES = 64  # real images drawn from --val-data (or the calibration data) for the agreement gate
BACKENDS = ("auto", *RUNTIMES, "ort")


@dataclass(frozen=True)
class ExportRequest:
    """What to export and how; every field has the CLI's default. See ``python -m export.build --help``."""

    checkpoint: Path | None = None
    model: str | None = None
    # The method and its options (degree, graph flavour): DynamicViTOptions(keep, gather) by default, ToMeOptions(r,
    # r_train, flavour) for token merging, or any method that keeps export.methods' contract.
    method: MethodOptions = DEFAULT_METHOD
    tocom: Path | None = None
    tocom_scale: float | None = None
    fp16: bool = False
    int8: bool = False
    calib_data: str | None = None
    val_data: str | None = None
    batch_size: int = 1
    dynamic_batch: tuple[int, int, int] | None = None
    opset: int = MIN_OPSET
    backend: str = "auto"
    out: Path | None = None
    # TensorRT versions the graphs must parse on ("10.3", "11" or "both"); export.build adds the installed one.
    tensorrt_versions: str = "both"
    # The GPUs TensorRT-RTX engines target (compute capabilities; the runtime's default set unless asked).
    compute_capabilities: tuple[str, ...] = RTX_DEFAULT_TARGETS

    @property
    def batch_profile(self) -> tuple[int, int, int]:
        return self.dynamic_batch or (self.batch_size,) * 3

    @property
    def precisions(self) -> list[str]:
        return ["fp32"] + ["fp16"] * self.fp16 + ["int8"] * self.int8

    def check(self) -> None:
        """Refuse every bad or idle option before any work (one clear line each)."""
        if self.opset < MIN_OPSET:
            raise ExportError(f"--opset {self.opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
        if self.batch_size < 1:
            raise ExportError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dynamic_batch is not None and not 1 <= self.dynamic_batch[0] <= self.dynamic_batch[1] <= self.dynamic_batch[2]:
            raise ExportError(f"--dynamic-batch needs 1 <= MIN <= OPT <= MAX, got {self.dynamic_batch}")
        if self.backend not in BACKENDS:
            raise ExportError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        try:
            target_tables(self.tensorrt_versions)
        except PipelineError as exc:
            raise ExportError(f"--trt-version: {exc}") from None
        if self.tocom_scale is not None and self.tocom is None:
            raise ExportError("--tocom-scale does nothing without --tocom (a ToCom plugin to merge)")
        if self.tocom_scale is not None and not 0.0 < self.tocom_scale <= 10.0:
            raise ExportError(f"--tocom-scale must be in (0, 10], got {self.tocom_scale}")
        if self.tocom is not None and not Path(self.tocom).is_file():
            raise ExportError(f"--tocom plugin not found: {self.tocom}")
        if self.int8 and self.calib_data is None:
            raise ExportError("--int8 needs --calib-data (an image folder, a .npy/.npz file, or 'demo')")
        if self.calib_data is not None and not self.int8:
            raise ExportError("--calib-data does nothing without --int8")
        check_image_sources({"--calib-data": self.calib_data, "--val-data": self.val_data})
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ExportError(f"checkpoint not found: {self.checkpoint}")
        if self.compute_capabilities != RTX_DEFAULT_TARGETS and self.backend not in ("rtx", "auto"):
            raise ExportError("--compute-capabilities chooses the GPUs of TensorRT-RTX engines: it needs --backend rtx")
        if self.backend in RUNTIMES:
            chosen = RUNTIMES[self.backend]
            reason = build_unavailable_reason(chosen) or runtime_refusal(self.method, chosen)
            if reason:
                raise ExportError(f"--backend {self.backend}: {reason}; "
                                  f"{'nothing was written' if self.backend == 'rtx' else chosen.install_hint}")
        chosen, _ = engine_runtime(self)
        self.method.check(self, engines_here=chosen is TENSORRT)


def runtime_refusal(method: MethodOptions, chosen: Runtime) -> str | None:
    """Why ``chosen`` cannot build the method's graph flavour (None: it can). A method names the runtimes that
    refuse a flavour in ``runtime_refusals``; a method that names none refuses none."""
    reason = getattr(method, "runtime_refusals", {}).get(method.flavour, {}).get(chosen.key)
    return f"{chosen.name} cannot build the {method.flavour} flavour: {reason}" if reason else None


def engine_runtime(request: ExportRequest) -> tuple[Runtime | None, str | None]:
    """(the runtime that builds this export's engines, None) or (None, why no engine is built).

    ``auto``: TensorRT where it and a GPU are present; else TensorRT-RTX where it is installed and can build the
    graph flavour (its engines are built on the CPU and checked where an RTX-class GPU is); else no engine.
    """
    if request.backend == "ort":
        return None, "--backend ort"
    if request.backend in RUNTIMES:
        return RUNTIMES[request.backend], None
    reasons = []
    for chosen in (TENSORRT, TENSORRT_RTX):
        reason = build_unavailable_reason(chosen) or runtime_refusal(request.method, chosen)
        if reason is None:
            return chosen, None
        reasons.append(reason)
    return None, "; ".join(reasons)


# --- validation inputs ------------------------------------------------------------------------------------------


def validation_inputs(subject: ExportSubject, request: ExportRequest) -> tuple[dict[str, torch.Tensor], dict]:
    """Seeded random images plus every real image set available; and what the manifest says about them.

    Real images: the demo test split (demo model), ``--val-data``, else the calibration images of ``--int8``.
    Reduced-precision graphs are judged by top-1 agreement on real images only.
    """
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    opt = request.batch_profile[1]
    inputs = {RANDOM_INPUTS: torch.randn(max(opt, 2), *subject.model.image_shape, generator=generator)}
    inputs.update(subject.real_images)
    sources = {name: "shipped with the model" for name in subject.real_images}
    real_source = request.val_data or request.calib_data
    if real_source is not None:
        images, info = load_calibration_data(real_source, subject.model, subject.metadata, VALIDATION_IMAGES)
        name = "val-data" if request.val_data else "calib-data"
        inputs[name] = torch.from_numpy(images)
        sources[name] = f"{info['source']} ({info['size']} images, sha256 {info['hash'][:12]})"
    return inputs, {"random": f"{len(inputs[RANDOM_INPUTS])} seeded random images (reported, not judged)",
                    **sources}


# --- one graph: export, validate, check the shipped graph against its debug twin ----------------------------------


@dataclass
class GraphResult:
    """One validated ONNX graph, ready to be written."""

    path: str
    role: str
    precision: str
    flavour: str
    proto: onnx.ModelProto
    debug: onnx.ModelProto  # the same graph with the method's decisions as extra outputs (validated, shipped too)
    comparisons: list[Comparison]
    shipped_vs_debug_max_abs: float
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def validation_entry(self) -> dict:
        return {"comparisons": [c.to_dict() for c in self.comparisons],
                "shipped_vs_debug_max_abs": self.shipped_vs_debug_max_abs, **self.extra}


def criteria(precision: str) -> tuple[float | None, float | None]:
    """(max abs error on the logits, min top-1 agreement on real images) a graph of this precision must meet."""
    if precision == "fp32":
        return FLOAT32_MAX_ABS_ERROR, None
    return None, REDUCED_PRECISION_MIN_TOP1_AGREEMENT


def check_graph(graph: onnx.ModelProto, debug: onnx.ModelProto, reference: Callable, inputs: dict,
                precision: str, role: str, path: str, flavour: str, batch_sizes: list[int | None]) -> GraphResult:
    """Validate ``debug`` against PyTorch; then the shipped ``graph`` must compute what its twin computes."""
    tolerance, agreement = criteria(precision)
    comparisons = validate_graph(debug, reference, inputs, tolerance, agreement, batch_sizes)
    twin_error = shipped_vs_debug(graph, debug, inputs)
    result = GraphResult(path, role, precision, flavour, graph, debug, comparisons, twin_error)
    failed = [c for c in comparisons if not c.passed]
    if failed:
        c = failed[0]
        raise ValidationFailed(
            f"validation of the {role} graph failed on {c.inputs} images (batch {c.batch}): max abs error "
            f"{c.max_abs_error:.3g} (limit {tolerance}), top-1 agreement {c.top1_agreement:.3f} (minimum {agreement}), "
            f"kept token sets identical: {c.kept_sets_identical}, finite: {c.finite}; nothing was written")
    if precision == "fp32" and twin_error > FLOAT32_MAX_ABS_ERROR:
        raise ValidationFailed(f"the shipped {role} graph disagrees with its validated debug twin ({twin_error:.3g})")
    return result


# --- the export ----------------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """``manifest.json``: what was exported, from what, how it was validated, with which tools, on which machine.

    Artefacts are ``{path, role, sha256, ...}`` with roles ``onnx``, ``onnx_plugin``, ``onnx_fp16``, ``onnx_int8``,
    their ``<role>_debug`` twins, ``golden``, ``trtexec`` and ``engine``; the target-side stage
    (``python -m export.engine``) adds ``engines`` and ``target``.
    """

    tool: dict
    artifacts: list[dict]
    model: dict
    method: dict
    keep_ratio: float
    tokens: dict
    macs: int
    tocom: dict | None
    precision: list[str]
    gather: str  # the graph flavour asked for (DynamicViT: native | plugin; ToMe: onehot | scatter)
    default_flavour: str
    input: dict
    batch: dict
    opset: int
    validation_inputs: dict
    validation: dict
    tools: dict
    device: dict
    engine: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)
    tensorrt_support: dict = field(default_factory=dict)  # export.on_target.tensorrt_support's verdict per TensorRT version
    real_parser: dict = field(default_factory=dict)  # TensorRT-RTX's parser and CPU build per graph, where installed
    target: dict | None = None
    build_seconds: float | None = None
    schema_version: int = MANIFEST_SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    untouched: list[str]  # files in out this tool did not write, left alone
    degree_text: str = ""  # the method's degree in words ("at keep 0.6 (patch tokens 64 -> [38, 23, 14])")
    decisions: str = "decisions"  # what the debug twins' extra outputs are ("kept tokens", "merges")


Progress = Callable[[str], None]


def default_out(request: ExportRequest, label: str, method: ExportContract) -> Path:
    precision = "int8" if request.int8 else "fp16" if request.fp16 else "fp32"
    return Path("exports") / f"{label}_{method.degree_tag}_{precision}"


def input_shape(request: ExportRequest, image_shape: tuple[int, int, int]) -> list:
    """The ONNX input's shape as the graph declares it: a number for a static batch, "batch" for a dynamic one."""
    return ["batch" if request.dynamic_batch else request.batch_size, *image_shape]


def export_graphs(method: ExportContract, model: torch.nn.Module, request: ExportRequest, inputs: dict, calibration_images,
                  calibration_info: dict | None, progress: Progress) -> list[GraphResult]:
    """Every graph the request asks for, validated (raises ExportError on the first that fails)."""
    low, opt, high = request.batch_profile
    dynamic = request.dynamic_batch is not None
    batch_sizes = sorted({low, opt, high}) if dynamic else [opt]
    reference = method.reference(model)

    def onnx_of(flavour: str, precision: str, with_debug: bool) -> onnx.ModelProto:
        return method.export_onnx(method.deploy_copy(model, precision), flavour, opt, dynamic, request.opset, with_debug)

    def exported(flavour: str, precision: str, role: str, path: str) -> GraphResult:
        graph, debug = onnx_of(flavour, precision, False), onnx_of(flavour, precision, True)
        return check_graph(graph, debug, reference, inputs, precision, role, path, flavour, batch_sizes)

    base, chosen = method.flavours[0], request.method.flavour
    results = []
    progress(f"exporting and validating the float32 ONNX ({method.name}, {base} flavour)")
    results.append(exported(base, "fp32", "onnx", "model.onnx"))
    if chosen != base:
        progress(f"exporting and validating the {chosen}-flavour float32 ONNX")
        results.append(exported(chosen, "fp32", f"onnx_{chosen}", f"model_{chosen}.onnx"))
    if request.fp16:
        progress(f"exporting and validating the mixed float16 ONNX ({chosen} flavour)")
        results.append(exported(chosen, "fp16", "onnx_fp16", f"model_{chosen}_fp16.onnx"))
    if request.int8:
        progress("calibrating and validating the INT8 ONNX (explicit Q/DQ)")
        # Ranges are calibrated on the float32 graph; the Q/DQ go onto the mixed float16 graph, so a strongly
        # typed engine runs what is not quantised (softmax, norms, adds) in float16, not float32.
        quantized, report = quantize_for_export(onnx_of(base, "fp32", False), calibration_images, method="auto",
                                                calibration_info=calibration_info, float_scopes=method.float_scopes)
        graph = transplant_qdq(quantized, onnx_of(chosen, "fp16", False))
        debug = transplant_qdq(quantized, onnx_of(chosen, "fp16", True))
        result = check_graph(graph, debug, reference, inputs, "int8", "onnx_int8", f"model_{chosen}_int8.onnx",
                             chosen, batch_sizes)
        result.extra["int8"] = report
        results.append(result)
    return results


def write_graph(result: GraphResult, folder: Path) -> list[dict]:
    """The shipped graph and its debug twin (which the target re-checks against the golden data)."""
    entries = []
    for proto, path, role in ((result.proto, result.path, result.role),
                              (result.debug, debug_file_name(result.path), debug_role(result.role))):
        (folder / path).write_bytes(proto.SerializeToString())
        entries.append({"path": path, "role": role, "precision": result.precision, "flavour": result.flavour,
                        "sha256": sha256_of(folder / path)})
    return entries


def golden_entry(folder: Path, inputs: dict[str, torch.Tensor], reference: Callable) -> dict:
    """Write the validation inputs and float32 PyTorch's outputs for them (the target's ground truth)."""
    arrays = {name: images.numpy() for name, images in inputs.items()}
    return write_golden(folder, arrays, {name: reference(images) for name, images in inputs.items()})


def export_model(request: ExportRequest, progress: Progress = lambda text: None) -> ExportResult:
    """Export, validate and publish; see the module docstring. Raises PipelineError (one line) on user errors."""
    started = time.perf_counter()
    request.check()
    progress("loading the model")
    subject, method, tocom = request.method.prepare(request)
    out = Path(request.out) if request.out is not None else default_out(request, subject.label, method)
    with folder_transaction(out, owner=EXPORT_OWNER) as staging:  # one writer; old or new folder, never a mix
        previous = previous_manifest(out)
        inputs, input_sources = validation_inputs(subject, request)
        calibration_images, calibration_info = (None, None)
        if request.int8:
            calibration_images, calibration_info = load_calibration_data(request.calib_data, subject.model,
                                                                         subject.metadata)
        graphs = export_graphs(method, subject.model, request, inputs, calibration_images, calibration_info, progress)
        artifacts = [entry for g in graphs for entry in write_graph(g, staging)]
        artifacts.append(golden_entry(staging, inputs, method.reference(subject.model)))
        manifest = build_manifest(request, subject, method, tocom, graphs, artifacts, input_sources)
        manifest.artifacts.append(write_trtexec(staging, manifest.to_dict()))
        manifest = tensorrt_support_step(request, staging, manifest, progress)
        manifest = engine_step(request, staging, manifest, progress)
        manifest = real_parser_step(request, staging, manifest, progress)  # after: reuses its TensorRT-RTX builds
        manifest.build_seconds = round(time.perf_counter() - started, 2)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        untouched = carry_over_user_files(out, staging, previous)
    return ExportResult(out, manifest, untouched, method.degree_text(subject.model), method.decisions)


def tensorrt_support_step(request: ExportRequest, staging: Path, manifest: Manifest, progress: Progress) -> Manifest:
    """Every graph (shipped and debug twin) against the ONNX parser support of TensorRT 10.3 and 11.x, recorded in the
    manifest per version. A problem on a targeted version fails the export, naming graph, node, operator and
    reason; one on another version only is recorded (and the summary warns). Targets: ``tensorrt_versions``, plus
    the installed TensorRT when engines are built here."""
    targets = list(target_tables(request.tensorrt_versions))
    chosen, _ = engine_runtime(request)
    if chosen is not None:  # the runtime that builds engines here is a target too
        targets = list(dict.fromkeys([*targets, support_table(runtime_version(chosen))]))
    progress(f"checking every graph against the ONNX parser support of TensorRT (targets: {', '.join(targets)})")
    results = check_graphs([staging / a["path"] for a in manifest.artifacts if a["role"].startswith("onnx")])
    refused = [(graph, table, problem) for graph, per in results.items() for table, problems in per.items()
               if table in targets for problem in problems]
    if refused:
        graph, table, problem = refused[0]
        more = f" (and {len(refused) - 1} more problem(s))" if len(refused) > 1 else ""
        raise ValidationFailed(f"{graph} would not parse on TensorRT {table}: {problem}{more}; nothing was written")
    return replace(manifest, tensorrt_support=manifest_entry(results, targets))


def real_parser_step(request: ExportRequest, staging: Path, manifest: Manifest, progress: Progress) -> Manifest:
    """Where TensorRT-RTX is installed, whatever the target: every graph through its real ONNX parser and its
    CPU-only builder (in memory), the verdict per graph in the manifest beside the table check. Graphs with
    TokenGather nodes are not handed to it (its parser aborts the process on them): they are recorded as refused.
    A graph the engine step already built a TensorRT-RTX engine from is not built again: that build is its verdict."""
    version = runtime_version(TENSORRT_RTX)
    if version is None:
        return replace(manifest, real_parser={"runtime": TENSORRT_RTX.name, "ran": False,
                                              "reason": f"{TENSORRT_RTX.name} is not installed"})
    graphs = [a["path"] for a in manifest.artifacts if a["role"].startswith("onnx")]
    verdicts = {facts["built_from"]: {"parsed": True, "parse_error": None, "built": True, "build_error": None,
                                      "layers": facts["layers"], "bytes": facts["bytes"],
                                      "seconds": facts["build_seconds"], "engine": facts["path"]}
                for facts in manifest.engines.values() if facts.get("runtime") == TENSORRT_RTX.name}
    progress(f"parsing and building every graph with {TENSORRT_RTX.name} {version} on the CPU "
             f"({len(graphs) - len(verdicts)} graphs; {len(verdicts)} built as engines already)")
    dynamic_batch = tuple(manifest.batch[k] for k in ("min", "opt", "max"))
    for graph in graphs:
        if graph in verdicts:
            continue
        if has_token_gather(staging / graph):
            verdicts[graph] = {"parsed": False, "built": False, "parse_error": "not parsed: a TokenGather node aborts "
                               f"the {TENSORRT_RTX.name} parser (no plugin layer)"}
        else:
            verdicts[graph] = probe_graph(TENSORRT_RTX, staging / graph, {}, dynamic_dims=dynamic_batch)
    verdicts = {graph: verdicts[graph] for graph in graphs}  # in the manifest's order
    return replace(manifest, real_parser={"runtime": TENSORRT_RTX.name, "version": version, "ran": True,
                                          "all_built": all(v["built"] for v in verdicts.values()), "graphs": verdicts})


def engine_step(request: ExportRequest, staging: Path, manifest: Manifest, progress: Progress) -> Manifest:
    """Engines where a runtime can build them (``engine_runtime``): the target-side stage's own code, on the staging
    folder (built; checked against the golden data and timed where they can run); an engine that disagrees fails
    the export."""
    chosen, reason = engine_runtime(request)
    if chosen is None:
        progress(f"no engine built: {reason} (ONNX Runtime artefacts only)")
        return replace(manifest, engine={"built": False, "reason": reason})
    progress(f"building the {chosen.name} engines (checked and timed where they can run)")
    engines = build_and_check(staging, manifest.to_dict(), chosen=chosen,
                              compute_capabilities=request.compute_capabilities)
    failed = [key for key, facts in engines.items() if facts["passed"] is False]
    if failed:
        raise ValidationFailed(f"the {', '.join(failed)} {chosen.name} engine disagreed with the golden data (figures: "
                               f"python -m export.engine on the ONNX artefacts); nothing was written")
    return replace(Manifest.from_dict(with_engines(manifest.to_dict(), engines, target_facts())),
                   engine={"built": True, "runtime": chosen.name})


def tokens_entry(description: dict, patches: int) -> dict:
    """Token counts of the export: kept per pruning stage (DynamicViT) or per block (ToMe)."""
    keys = ("kept_per_stage", "stages_before_blocks", "tokens_per_block", "merges_per_block")
    return {"patches": patches, **{key: description[key] for key in keys if key in description}}


def build_manifest(request: ExportRequest, subject: ExportSubject, method: ExportContract, tocom: dict | None,
                   graphs: list[GraphResult], artifacts: list[dict], input_sources: dict) -> Manifest:
    model = subject.model
    low, opt, high = request.batch_profile
    return Manifest(
        tool={"name": "vit-prune-deploy", "version": package_version()},
        artifacts=artifacts,
        model={
            "label": subject.label,
            "source": subject.source,
            "random_weights": subject.random_weights,
            "architecture": model.config.to_dict(),
            "rho_train": subject.rho_train,
            "loader_notes": subject.notes,
        },
        method=method.describe(model),
        keep_ratio=method.keep_ratio,
        tokens=tokens_entry(method.describe(model), model.num_patches),
        macs=method.macs(model),
        tocom=tocom,
        precision=request.precisions,
        gather=request.method.flavour,
        default_flavour=method.flavours[0],
        input={"name": "images", "shape": input_shape(request, model.image_shape), "dtype": "float32"},
        batch={"dynamic": request.dynamic_batch is not None, "min": low, "opt": opt, "max": high},
        opset=request.opset,
        validation_inputs=input_sources,
        validation={g.role: g.validation_entry() for g in graphs},
        tools=tool_versions(),
        device=target_facts(),
    )
