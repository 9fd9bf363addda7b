"""The TensorRT boundary: every TensorRT and TensorRT-RTX call of the project; and the pure decisions around it.

Nothing else in the project calls either runtime (``export.on_target.runtimes`` is the one place their bindings
are imported, lazily), so export and every check on ONNX Runtime work without them. One build, one parse and one
runner serve both runtimes: their Python APIs have the same shape, and what differs (strong typing, timing
caches, the compute capabilities an RTX engine targets, plugin support) is data in ``runtimes.Runtime`` and in
the ``EnginePlan``. The decisions (which ONNX, which network and builder flags per runtime and version, the
trtexec command lines, whether an engine may run here, where the timing cache lives) are pure functions over
plain values, tested without either runtime.

Precision (TensorRT Developer Guide, "Strongly Typed Networks" and "Explicit Quantization", 10.x and 11.x; the
10.x -> 11.x migration guide): a strongly typed network takes every tensor's type from the ONNX graph, and
TensorRT 10.x supports it through ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (trtexec ``--stronglyTyped``);
TensorRT 11.x removed the weak-typing precision flags (FP16, INT8 builder flags, trtexec --fp16/--int8) and
builds every network strongly typed. So every engine here is built strongly typed, on both versions, from the
very graph that was validated: float16 from the mixed float16 ONNX (its float32 islands - LayerNorm, the
attention softmax, the prediction modules whose scores choose the tokens - stay float32), INT8 from the
explicit Q/DQ ONNX (the guide: "use explicit quantization with strong typing; precision-control build flags are
not required and should not be specified"). No precision builder flag is ever set.

TF32 is off for every engine: the builder config turns it on by default and ``build_serialized`` clears it. The
float32 engine is the bit-faithful deployment and the float32 islands of the mixed graphs exist to keep full
precision where token choice is decided; TF32 (10-bit mantissa) in their matrix products would undo both. The
float32 engine is therefore held to ``ENGINE_FLOAT32_MAX_ABS_ERROR`` (see export.on_target.compare).
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write
from export.on_target.environment import INSTALL_HINT, rtx_targets_gpu, tensorrt_major, tensorrt_unavailable_reason
from export.on_target.runtimes import (RTX_COMPUTE_CAPABILITIES, RTX_DEFAULT_TARGETS, TENSORRT, Runtime, engine_mismatch,
                                       require_bindings, runtime)

__all__ = ["INSTALL_HINT", "EnginePlan", "TensorRTError", "TensorRTRunner", "build_engine", "parse_onnx", "plan_engine",
           "portability_problem", "tensorrt_unavailable_reason", "timing_cache_path", "trtexec_commands"]

PRECISION_ROLES = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}  # the validated graph per precision
TRTEXEC_TENSORRT_VERSIONS = ("10.3", "11")
TRTEXEC_FILE = "trtexec.txt"  # JetPack 6 and the current desktop / JetPack 7 major


class TensorRTError(PipelineError):
    """An engine that cannot be built, loaded or run here."""


@dataclass(frozen=True)
class EnginePlan:
    """How one engine is built: from which graph, with which network flags and builder settings."""

    precision: str  # fp32 | fp16 | int8
    onnx_role: str  # the manifest role of the graph it is built from
    strongly_typed: bool
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names to set
    builder_flags: tuple[str, ...]  # BuilderFlag names to set (never a precision flag)
    tf32: bool
    runtime: str = "trt"  # runtimes.Runtime.key: "trt" | "rtx"
    compute_capabilities: tuple[str, ...] = ()  # RTX: the GPUs the engine targets ("8.6", ...; "12.0+" by default)

    def to_dict(self) -> dict:
        return asdict(self)


def version_tuple(version: str) -> tuple[int, int]:
    """(10, 3) for '10.3.0.30'; TensorRTError for anything that is not a version string."""
    try:
        major, minor = (int(part) for part in (str(version).split(".") + ["0"])[:2])
    except ValueError:
        raise TensorRTError(f"not a TensorRT version: {version!r}") from None
    return major, minor


def minimum_version_problem(manifest: dict, tensorrt_version: str) -> str | None:
    """Why this TensorRT is too old for the export's graph flavour (None: it is new enough).

    A method records the oldest TensorRT per flavour in ``manifest["method"]["min_tensorrt_version"]`` (ToMe's
    scatter flavour needs TensorRT's ScatterElements plugin, from 10.0).
    """
    flavour = manifest.get("gather", "native")
    minimum = (manifest.get("method") or {}).get("min_tensorrt_version", {}).get(flavour)
    if minimum is None or version_tuple(tensorrt_version) >= version_tuple(minimum):
        return None
    return f"the {flavour} graphs need TensorRT {minimum} or newer, this is {tensorrt_version}"


def flavour_refusal(manifest: dict, chosen: Runtime, has_plugin_nodes: bool = False) -> str | None:
    """Why ``chosen`` cannot take the export's graph flavour (None: it can), decided before any parser runs.

    A method records the runtimes that refuse a flavour in ``manifest["method"]["runtime_refusals"]``
    ({flavour: {runtime key: reason}}); a graph with plugin nodes is refused by a runtime without plugin support
    whatever the manifest says (TensorRT-RTX's parser would abort the whole process on it).
    """
    flavour = manifest.get("gather", "native")
    reason = ((manifest.get("method") or {}).get("runtime_refusals") or {}).get(flavour, {}).get(chosen.key)
    if reason is None and has_plugin_nodes and not chosen.supports_plugins:
        reason = f"{chosen.name} has no plugin layer and its ONNX parser aborts on a TokenGather node"
    if reason is None:
        return None
    return f"{chosen.name} cannot build the {flavour} flavour: {reason}"


def plan_engine(version: str, precision: str, gather: str = "native", default_flavour: str = "native",
                chosen: Runtime = TENSORRT, compute_capabilities: Sequence[str] = RTX_DEFAULT_TARGETS) -> EnginePlan:
    """The build decisions for a runtime and its version, a precision and a token-selection flavour (pure).

    TensorRT 10.x: STRONGLY_TYPED must be requested; 11.x and TensorRT-RTX: every network is strongly typed (the
    flag is redundant and not passed). float32 with the TokenGather plugin builds from the plugin graph; reduced
    precision uses the flavour the reduced graph was exported with. TensorRT-RTX has no plugin layer and its ONNX
    parser aborts the process on a plugin node, so plugin graphs are refused for it here, before any parser.
    """
    if precision not in PRECISION_ROLES:
        raise TensorRTError(f"unknown precision {precision!r} (one of {', '.join(PRECISION_ROLES)})")
    if chosen.key == "trt" and tensorrt_major(version) < 10:
        raise TensorRTError(f"TensorRT {version} is older than 10.0 (no IPluginV3, no strongly typed "
                            "ONNX parsing of this graph): use TensorRT 10.3 (JetPack 6) or newer")
    if not chosen.supports_plugins and gather == "plugin":
        raise TensorRTError(f"{chosen.name} cannot build the plugin flavour: it has no plugin layer and its ONNX "
                            "parser aborts on a TokenGather node; export with --gather native")
    # float32 builds from the graph of the flavour asked for (the default flavour's is "onnx"); reduced
    # precision graphs are exported in the asked flavour already.
    role = f"onnx_{gather}" if precision == "fp32" and gather != default_flavour else PRECISION_ROLES[precision]
    strongly_typed_flag = not chosen.always_strongly_typed and tensorrt_major(version) == 10
    return EnginePlan(precision=precision, onnx_role=role, strongly_typed=True,
                      network_flags=("STRONGLY_TYPED",) if strongly_typed_flag else (), builder_flags=(), tf32=False,
                      runtime=chosen.key,
                      compute_capabilities=tuple(compute_capabilities) if chosen.key == "rtx" else ())


def portability_problem(built: dict, here: dict) -> str | None:
    """Why an engine built with ``built`` facts must not run on a machine with ``here`` facts (None: it may).

    A TensorRT engine runs only with the TensorRT version and on the GPU model it was built for (TensorRT
    Developer Guide, on engine compatibility). A TensorRT-RTX engine (``built["runtime"]`` "TensorRT-RTX") runs
    with the TensorRT-RTX version that built it, on any GPU whose compute capability it targets
    (``built["compute_capabilities"]``). ``here`` holds "tensorrt", "tensorrt_rtx", "gpu" and "compute_capability"
    as ``export.on_target.environment.target_facts`` gives them.
    """
    problems = []
    if built.get("runtime") == "TensorRT-RTX":
        if built.get("tensorrt_rtx") != here.get("tensorrt_rtx"):
            problems.append(f"TensorRT-RTX {built.get('tensorrt_rtx')} (here: {here.get('tensorrt_rtx')})")
        targets = tuple(built.get("compute_capabilities") or RTX_DEFAULT_TARGETS)
        if not rtx_targets_gpu(here.get("compute_capability"), targets):
            problems.append(f"GPUs of compute capability {', '.join(targets)} (here: {here.get('gpu')}, "
                            f"{here.get('compute_capability')})")
        rebuild = "python -m export.engine EXPORT_DIR --backend rtx"
    else:
        if built.get("tensorrt") != here.get("tensorrt"):
            problems.append(f"TensorRT {built.get('tensorrt')} (here: {here.get('tensorrt')})")
        if built.get("compute_capability") != here.get("compute_capability") or built.get("gpu") != here.get("gpu"):
            problems.append(f"GPU {built.get('gpu')} with compute capability {built.get('compute_capability')} "
                            f"(here: {here.get('gpu')}, {here.get('compute_capability')})")
        rebuild = "python -m export.engine EXPORT_DIR"
    if not problems:
        return None
    return f"engine built for {' and '.join(problems)}; engines are not portable: rebuild it here with {rebuild}"


def timing_cache_path(folder: Path, facts: dict) -> Path:
    """A timing cache per TensorRT version and GPU: timings measured on one do not hold on another."""
    def slug(text) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-") or "unknown"

    return Path(folder) / (f".tensorrt_timing_{slug(facts.get('tensorrt'))}_{slug(facts.get('gpu'))}_"
                           f"sm{slug(facts.get('compute_capability'))}.cache")


def trtexec_commands(tensorrt_family: str, plan: EnginePlan, onnx_file: str, engine_file: str, input_name: str,
                     image_shape: Sequence[int], batch: dict, plugin_library: str | None = None) -> dict[str, str]:
    """The trtexec lines that build ``engine_file`` from ``onnx_file`` and time it, for "10.3" or "11" (pure).

    10.3 needs --stronglyTyped and, for timing comparable with export.engine's device time, --useCudaGraph
    --noDataTransfers --useSpinWait; 11.x is always strongly typed and times that way by default, so none of
    these is passed there (trtexec 11 marks them deprecated no-ops). --noTF32 matches the engines export.engine
    builds (trtexec enables TF32 by default on both). Every flag was checked against trtexec's option parser in
    TensorRT's open-source samples (samples/common/sampleOptions.cpp) at 10.3 GA and on 11.x. The plugin library is the
    self-registering build, loaded with --staticPlugins (with --setPluginsToSerialize a copy would travel
    inside the engine; here the target loads it instead).
    """
    major = tensorrt_major(tensorrt_family)
    shape = "x".join(str(d) for d in image_shape)
    profile = [f"--minShapes={input_name}:{batch['min']}x{shape}", f"--optShapes={input_name}:{batch['opt']}x{shape}",
               f"--maxShapes={input_name}:{batch['max']}x{shape}"] if batch.get("dynamic") else []
    common = [f"--staticPlugins={plugin_library}"] if plugin_library else []
    typing = ["--stronglyTyped"] if major == 10 and plan.strongly_typed else []
    tf32 = [] if plan.tf32 else ["--noTF32"]
    build = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}", *typing, *tf32, *profile, *common,
             "--skipInference"]
    timing_shape = [f"--shapes={input_name}:{batch['opt']}x{shape}"] if batch.get("dynamic") else []
    timing_flags = ["--useCudaGraph", "--noDataTransfers", "--useSpinWait"] if major == 10 else []
    timing = ["trtexec", f"--loadEngine={engine_file}", *timing_shape, *common, *timing_flags]
    return {"build": " ".join(build), "time": " ".join(timing)}


def trtexec_text(manifest: dict, plugin_library: str = "trt_plugins/build/token_gather/libtoken_gather_plugin.so") -> str:
    """trtexec.txt: for every precision of an export folder, build and timing lines for TensorRT 10.3 and 11.x."""
    lines = ["# trtexec command lines for this export folder, run from inside it (generated by export.build;",
             "# python -m export.engine does the same and also checks the engine against the golden data).", ""]
    files = {entry["role"]: entry["path"] for entry in manifest.get("artifacts", [])}
    plugin = plugin_library if manifest.get("gather") == "plugin" else None
    shape = manifest["input"]["shape"][1:]
    for family in TRTEXEC_TENSORRT_VERSIONS:
        lines.append(f"## TensorRT {family}{' (JetPack 6)' if family == '10.3' else ''}")
        for precision in manifest.get("precision", []):
            plan = plan_engine(family, precision, manifest.get("gather", "native"), manifest.get("default_flavour", "native"))
            if plan.onnx_role not in files:
                continue
            engine_file = f"model_{precision}.trt{family}.engine"
            commands = trtexec_commands(family, plan, files[plan.onnx_role], engine_file, manifest["input"]["name"],
                                        shape, manifest["batch"], plugin)
            lines += [f"# {precision}", commands["build"], commands["time"]]
        lines.append("")
    return "\n".join(lines)


def write_trtexec(folder: Path, manifest: dict) -> dict:
    """Write trtexec.txt (``trtexec_text``) into an export folder, atomically; returns its manifest entry."""
    text = trtexec_text(manifest)
    path = atomic_write(Path(folder) / TRTEXEC_FILE, lambda temporary: Path(temporary).write_text(text))
    return {"path": TRTEXEC_FILE, "role": "trtexec", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# ----------------------------------------------------------------------------- the runtimes themselves (lazy imports)


def _logger(bindings):
    """A logger that prints warnings and errors as TensorRT's default one does, and keeps the errors, so that a
    failed parse or build can name its cause in one line."""

    class RecordingLogger(bindings.ILogger):
        def __init__(self):
            bindings.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity <= bindings.ILogger.Severity.ERROR:
                self.errors.append(str(message))
            # The parser warns for every int64 output that its binding must be int64: the runner allocates each
            # output with the engine's own type, so that warning is always satisfied here and only hides others.
            if severity <= bindings.ILogger.Severity.WARNING and "Int64 binding" not in str(message):
                print(f"[{bindings.__name__}] {severity.name}: {message}", file=sys.stderr)

    return RecordingLogger()


@dataclass
class ParsedNetwork:
    """A network parsed from ONNX, with the objects that must outlive it (TensorRT keeps pointers to them)."""

    bindings: object
    logger: object
    builder: object
    network: object
    parser: object

    @property
    def num_layers(self) -> int:
        return int(self.network.num_layers)


def parse_onnx(chosen: Runtime, onnx_path: Path, network_flags: Sequence[str] = ()) -> ParsedNetwork:
    """Parse ``onnx_path`` with the runtime's ONNX parser; TensorRTError naming the parser's first error.

    Never give it a graph with a TokenGather node on TensorRT-RTX: its parser aborts the process (``plan_engine``
    refuses such graphs first).
    """
    bindings = require_bindings(chosen)
    logger = _logger(bindings)
    builder = bindings.Builder(logger)
    flags = 0
    for name in network_flags:
        flags |= 1 << int(getattr(bindings.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = bindings.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)] or ["no error recorded"]
        raise TensorRTError(f"{chosen.name}'s ONNX parser refused {Path(onnx_path).name}: {errors[0][:300]}")
    return ParsedNetwork(bindings, logger, builder, network, parser)


def build_serialized(parsed: ParsedNetwork, plan: EnginePlan, profiles: Sequence[dict[str, tuple]],
                     timing_cache: Path | None = None) -> bytes:
    """Build a parsed network as ``plan`` says; ``profiles``: [{input name: (min, opt, max)}, ...], shapes for an
    execution input and values for a shape-tensor input (one the network computes shapes from).

    TF32 is cleared (the default turns it on); an RTX plan sets its compute capabilities unless it targets the
    runtime's defaults; the timing cache is read and written only where the runtime takes one.
    """
    trt, builder = parsed.bindings, parsed.builder
    config = builder.create_builder_config()
    if not plan.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.compute_capabilities and tuple(plan.compute_capabilities) != RTX_DEFAULT_TARGETS:
        config.num_compute_capabilities = len(plan.compute_capabilities)
        for index, capability in enumerate(plan.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_COMPUTE_CAPABILITIES[capability]), index)
    shape_tensors = {parsed.network.get_input(i).name for i in range(parsed.network.num_inputs)
                     if parsed.network.get_input(i).is_shape_tensor}
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            (profile.set_shape_input if name in shape_tensors else profile.set_shape)(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None and runtime(plan.runtime).timing_cache:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(parsed.network, config)
    if serialized is None:
        cause = parsed.logger.errors[-1][:300] if parsed.logger.errors else "see its log above"
        raise TensorRTError(f"{runtime(plan.runtime).name}'s builder refused the network: {cause}")
    if cache is not None:
        data = bytes(config.get_timing_cache().serialize())
        atomic_write(timing_cache, lambda temporary: Path(temporary).write_bytes(data))
    return bytes(serialized)


def build_engine(plan: EnginePlan, onnx_path: Path, engine_path: Path, batch: dict, input_name: str,
                 image_shape: Sequence[int], timing_cache: Path | None) -> dict:
    """Build ``engine_path`` from ``onnx_path`` as ``plan`` says; returns the build facts for the manifest.

    The caller loads the plugin library first when the graph has TokenGather nodes (TensorRT only).
    """
    chosen = runtime(plan.runtime)
    shape = tuple(image_shape)
    started = time.perf_counter()
    parsed = parse_onnx(chosen, onnx_path, plan.network_flags)
    profile = {input_name: ((batch["min"], *shape), (batch["opt"], *shape), (batch["max"], *shape))}
    try:
        data = build_serialized(parsed, plan, [profile], timing_cache)
    except TensorRTError as exc:
        raise TensorRTError(f"{chosen.name} could not build an engine from {Path(onnx_path).name}: {exc}") from None
    atomic_write(engine_path, lambda temporary: Path(temporary).write_bytes(data))  # never half an engine
    facts = {"runtime": chosen.name, chosen.version_key: str(parsed.bindings.__version__), "built_from": Path(onnx_path).name, "plan": plan.to_dict(),
             "layers": parsed.num_layers, "bytes": len(data), "build_seconds": round(time.perf_counter() - started, 2)}
    if chosen.key == "rtx":
        facts["compute_capabilities"] = list(plan.compute_capabilities)
    return facts


class CudaEvents:
    """CUDA events on a stream, through the CUDA runtime library polygraphy already loaded (device time)."""

    def __init__(self):
        from polygraphy import cuda  # installed with the TensorRT extras; loads libcudart

        self.runtime = cuda.wrapper().handle
        self.start, self.end = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.runtime.cudaEventCreate(ctypes.byref(self.start)))
        self._check(self.runtime.cudaEventCreate(ctypes.byref(self.end)))

    @staticmethod
    def _check(status: int) -> None:
        if status != 0:
            raise TensorRTError(f"CUDA event call failed with cudaError {status}")

    def record(self, event: ctypes.c_void_p, stream: int) -> None:
        self._check(self.runtime.cudaEventRecord(event, ctypes.c_void_p(stream)))

    def elapsed_ms(self) -> float:
        milliseconds = ctypes.c_float()
        self._check(self.runtime.cudaEventSynchronize(self.end))
        self._check(self.runtime.cudaEventElapsedTime(ctypes.byref(milliseconds), self.start, self.end))
        return float(milliseconds.value)

    def close(self) -> None:
        for event in (self.start, self.end):
            if event.value:
                self.runtime.cudaEventDestroy(event)
                event.value = None


class TensorRTRunner:
    """One engine, ready to run: ``runner(images) -> [outputs in the order of output_names]``.

    Input and outputs live in device buffers that are reused while the batch stays the same; ``close()``
    (or ``with``) releases the context, the buffers and the stream.
    """

    def __init__(self, engine_path: Path, output_names: Sequence[str] | None = None, chosen: Runtime = TENSORRT):
        data = Path(engine_path).read_bytes()
        mismatch = engine_mismatch(data[:16], chosen)
        if mismatch:  # refused before the runtime sees it: its own error is a deserialization failure
            raise TensorRTError(f"refusing {engine_path}: {mismatch}")
        from polygraphy import cuda  # loads libcudart; independent of which runtime runs the engine

        trt = require_bindings(chosen)
        self.trt, self.cuda = trt, cuda
        self.logger = _logger(trt)  # held for the runtime's lifetime: TensorRT keeps only a pointer to it
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise TensorRTError(f"{chosen.name} could not load {engine_path} (built by another runtime or version, "
                                "for another GPU, or without the plugin library loaded)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        found = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_names = list(output_names) if output_names else found
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.device_input = cuda.DeviceArray(dtype=np.float32)
        self.device_outputs: dict[str, object] = {}
        self.host_outputs: dict[str, np.ndarray] = {}
        self.batch: int | None = None

    def profile(self) -> tuple[int, int, int]:
        """(MIN, OPT, MAX) batch of the engine's first optimisation profile."""
        low, opt, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return int(low[0]), int(opt[0]), int(high[0])

    def _prepare(self, shape: tuple[int, ...]) -> None:
        if self.batch == shape[0]:
            return
        low, _, high = self.profile()
        if not low <= shape[0] <= high:
            raise TensorRTError(f"batch {shape[0]} is outside the engine's profile {low}..{high}")
        if not self.context.set_input_shape(self.input_name, shape):
            raise TensorRTError(f"the engine does not accept input shape {shape}")
        self.device_input.resize(shape)
        self.context.set_tensor_address(self.input_name, self.device_input.ptr)
        for name in self.output_names:
            out_shape = tuple(self.context.get_tensor_shape(name))
            dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
            device = self.device_outputs.get(name) or self.cuda.DeviceArray(dtype=dtype)
            device.resize(out_shape)
            self.device_outputs[name] = device
            self.host_outputs[name] = np.empty(out_shape, dtype=dtype)
            self.context.set_tensor_address(name, device.ptr)
        self.batch = shape[0]

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise TensorRTError("TensorRT execution failed (see the TensorRT log above)")

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._prepare(images.shape)
        self.device_input.copy_from(images, self.stream)
        self._execute()
        for name in self.output_names:
            self.device_outputs[name].copy_to(self.host_outputs[name], self.stream)
        self.stream.synchronize()
        return [self.host_outputs[name].copy() for name in self.output_names]

    def measure(self, images: np.ndarray, warmup: int, iterations: int) -> tuple[list[float], list[float]]:
        """(device milliseconds by CUDA events around execution alone, end-to-end milliseconds with the
        host-to-device and device-to-host copies and synchronisation) for ``iterations`` runs after ``warmup``."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        for _ in range(warmup):
            self(images)
        events = CudaEvents()
        device, end_to_end = [], []
        try:
            for _ in range(iterations):
                events.record(events.start, self.stream.ptr)
                self._execute()
                events.record(events.end, self.stream.ptr)
                device.append(events.elapsed_ms())
            for _ in range(iterations):
                started = time.perf_counter()
                self(images)
                end_to_end.append((time.perf_counter() - started) * 1e3)
        finally:
            events.close()
        return device, end_to_end

    def close(self) -> None:
        for array in [self.device_input, *self.device_outputs.values()]:
            array.free()
        self.device_outputs.clear()
        self.stream.free()
        self.context = self.engine = self.runtime = None

    def __enter__(self) -> "TensorRTRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- probing a graph with a real parser (python -m export.on_target.tensorrt_support --against-parser)


def probe_graph(chosen: Runtime, onnx_path: Path, values: dict[str, np.ndarray], network_flags: Sequence[str] = (),
                dynamic_dims: tuple[int, int, int] = (1, 4, 8)) -> dict:
    """Parse ``onnx_path`` with the runtime's ONNX parser, then build it here; parse and build are reported apart.

    So that a refused build is the builder's and not the probe's, the network gets one optimization profile that
    covers every input the parser left dynamic: an input with a value in ``values`` gets that value's shape (min
    = opt = max), any other dynamic dimension ``dynamic_dims``; a shape-tensor input gets its value from
    ``values`` (ones where none is given). Returns {"parsed", "parse_error", "built", "build_error", "layers",
    "bytes", "seconds"}. A TokenGather node on TensorRT-RTX aborts the process: run this in a child process.
    """
    started = time.perf_counter()
    result = {"parsed": False, "parse_error": None, "built": None, "build_error": None, "layers": None, "bytes": None}
    try:
        parsed = parse_onnx(chosen, onnx_path, network_flags)
    except TensorRTError as exc:
        return {**result, "parse_error": str(exc), "seconds": round(time.perf_counter() - started, 3)}
    network = parsed.network
    profile = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        value = values.get(tensor.name)
        shape = tuple(tensor.shape)
        if tensor.is_shape_tensor:
            entries = int(np.prod(shape)) if -1 not in shape else (value.size if value is not None else 1)
            content = [int(v) for v in np.asarray(value).reshape(-1)] if value is not None else [1] * entries
            profile[tensor.name] = (content, content, content)
        elif -1 in shape:
            exact = tuple(np.shape(value)) if value is not None and np.ndim(value) == len(shape) else None
            profile[tensor.name] = ((exact,) * 3 if exact else
                                    tuple(tuple(d if d != -1 else pick for d in shape) for pick in dynamic_dims))
    plan = replace(plan_engine(str(parsed.bindings.__version__), "fp32", chosen=chosen), network_flags=tuple(network_flags))
    result.update(parsed=True, layers=parsed.num_layers)
    try:
        result.update(built=True, bytes=len(build_serialized(parsed, plan, [profile] if profile else [])))
    except TensorRTError:
        result.update(built=False, build_error=parsed.logger.errors[-1][:300] if parsed.logger.errors
                      else "no error recorded")
    return {**result, "seconds": round(time.perf_counter() - started, 3)}
