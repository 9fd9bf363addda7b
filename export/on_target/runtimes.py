"""The two TensorRT runtimes engines are built with, and the one place their Python bindings are imported.

- **TensorRT** (``tensorrt``): the desktop and Jetson runtime. Building needs the GPU the engine will run on;
  an engine runs only with the same TensorRT version on the same GPU model.
- **TensorRT for RTX** (``tensorrt_rtx_bindings``, wheels ``tensorrt-rtx-cu13-libs`` and
  ``tensorrt-rtx-cu13-bindings``): the same Python API shape, but its builder and ONNX parser run on a machine
  without a GPU (NVIDIA TensorRT-RTX documentation, "CPU-Only AOT and TensorRT-RTX Engines"). Its engines run on
  RTX-class GPUs of compute capability 8.0, 8.6, 8.9 and 12.0 or later by default, 7.5 only when asked for at
  build time; not on Jetson Orin (8.7), not on Hopper (9.0). Every network it parses is strongly typed.

A ``Runtime`` holds what differs between the two as data; the build, parse and run code is shared
(``export.on_target.tensorrt_engine``). Nothing else in the project imports either binding.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from compress.plumbing.errors import PipelineError

# TensorRT-RTX's ComputeCapability members and the compute capability each names.
RTX_COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}
# What an RTX engine targets when no compute capability is set (TensorRT-RTX documentation, "Compute Capability").
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0+")


@dataclass(frozen=True)
class Runtime:
    """One TensorRT runtime, as data: its import name, how it is named, installed and tagged in files."""

    key: str  # the --backend value: "trt" | "rtx"
    module: str  # the Python import name of its bindings
    name: str  # in messages and manifests
    version_key: str  # the key of its version in target_facts() and in an engine's manifest entry
    install_hint: str
    engine_suffix: str  # model_<precision><suffix>: both kinds of engine can sit in one export folder
    builds_without_gpu: bool  # CPU-only ahead-of-time build
    always_strongly_typed: bool  # the parser makes every network strongly typed; no flag to pass
    timing_cache: bool  # TensorRT-RTX's AOT build looks for a GPU when given a timing cache (its release notes)
    supports_plugins: bool  # TensorRT-RTX: no plugin layer, and its ONNX parser aborts on a plugin node
    # The first bytes of its serialized engines: TensorRT plans begin with b"ftrt" (torch-tensorrt tells them apart
    # by the same bytes); TensorRT-RTX 1.7 engines with b"vtrt" (read from the engines this project builds).
    engine_magic: bytes

    def manifest_key(self, precision: str) -> str:
        """The key of an engine in the manifest's ``engines``: the precision, tagged for RTX engines."""
        return precision if self.key == "trt" else f"{precision}.{self.key}"

    def engine_file(self, precision: str) -> str:
        return f"model_{precision}{self.engine_suffix}"


TENSORRT = Runtime(
    key="trt", module="tensorrt", name="TensorRT", version_key="tensorrt",
    install_hint=("install TensorRT's Python bindings (pip install -e '.[trt]' on a desktop GPU machine; on Jetson use "
                  "JetPack's python3-libnvinfer) and run on a machine with an NVIDIA GPU"),
    engine_suffix=".engine", builds_without_gpu=False, always_strongly_typed=False, timing_cache=True,
    supports_plugins=True, engine_magic=b"ftrt")
TENSORRT_RTX = Runtime(
    key="rtx", module="tensorrt_rtx_bindings", name="TensorRT-RTX", version_key="tensorrt_rtx",
    install_hint="install TensorRT for RTX: pip install -e '.[rtx]' (no GPU needed to build engines)",
    engine_suffix=".rtx.engine", builds_without_gpu=True, always_strongly_typed=True, timing_cache=False,
    supports_plugins=False, engine_magic=b"vtrt")
RUNTIMES = {runtime.key: runtime for runtime in (TENSORRT, TENSORRT_RTX)}


class RuntimeMissing(PipelineError):
    """A TensorRT runtime that is not installed here."""


def engine_runtime(header: bytes) -> Runtime | None:
    """Which runtime wrote a serialized engine, from its first bytes (None: neither's)."""
    return next((chosen for chosen in RUNTIMES.values() if header.startswith(chosen.engine_magic)), None)


def engine_mismatch(header: bytes, chosen: Runtime) -> str | None:
    """Why ``chosen`` must not be given this engine: it was written by the other runtime (None: it may)."""
    writer = engine_runtime(header)
    if writer is None or writer is chosen:
        return None
    return (f"it is a {writer.name} engine, not a {chosen.name} one (run it with {writer.name}: "
            f"python -m export.engine EXPORT_DIR --backend {writer.key} --no-build)")


def runtime_named(name: str | None) -> Runtime:
    """The runtime an engine's manifest entry names (entries written before TensorRT-RTX name none: TensorRT)."""
    return next((chosen for chosen in RUNTIMES.values() if chosen.name == name), TENSORRT)


def runtime(key: str) -> Runtime:
    try:
        return RUNTIMES[key]
    except KeyError:
        raise PipelineError(f"unknown TensorRT runtime {key!r} (one of {', '.join(RUNTIMES)})") from None


def import_bindings(chosen: Runtime) -> ModuleType | None:
    """The runtime's Python bindings, or None when they are not installed. The only import of either."""
    try:
        if chosen.key == "rtx":
            import tensorrt_rtx_bindings as bindings  # optional: the [rtx] extra
        else:
            import tensorrt as bindings  # optional: the [trt] extra, or JetPack's bindings
    except ImportError:
        return None
    return bindings


def require_bindings(chosen: Runtime) -> ModuleType:
    """The runtime's bindings; one clear line when they are missing."""
    bindings = import_bindings(chosen)
    if bindings is None:
        raise RuntimeMissing(f"{chosen.name} is not installed; {chosen.install_hint}")
    return bindings


def runtime_version(chosen: Runtime) -> str | None:
    bindings = import_bindings(chosen)
    return None if bindings is None else str(bindings.__version__)


def rtx_targets_gpu(compute_capability: str | None, targets: tuple[str, ...] = RTX_DEFAULT_TARGETS) -> bool:
    """Whether an RTX engine built for ``targets`` runs on a GPU of ``compute_capability`` ("8.6"; pure)."""
    if compute_capability is None:
        return False
    major, minor = (int(part) for part in compute_capability.split(".")[:2])
    for target in targets:
        open_ended = target.endswith("+")
        t_major, t_minor = (int(part) for part in target.rstrip("+").split(".")[:2])
        if (major, minor) == (t_major, t_minor) or (open_ended and (major, minor) >= (t_major, t_minor)):
            return True
    return False


def parse_compute_capabilities(text: str) -> tuple[str, ...]:
    """``"default"`` or a comma list such as ``"7.5,8.6"`` -> the compute capabilities an RTX engine targets."""
    if text.strip() == "default":
        return RTX_DEFAULT_TARGETS
    values = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [value for value in values if value not in RTX_COMPUTE_CAPABILITIES]
    if not values or unknown:
        raise PipelineError(f"compute capabilities must be 'default' or a comma list of "
                            f"{', '.join(RTX_COMPUTE_CAPABILITIES)}; got {text!r}")
    return values


def add_compute_capabilities_argument(parser, prefix: str = "") -> None:
    """``--compute-capabilities``: the GPUs TensorRT-RTX engines target (export.build and export.engine alike)."""
    parser.add_argument("--compute-capabilities", type=parse_compute_capabilities, default="default", metavar="LIST",
                        help=f"{prefix}the GPUs TensorRT-RTX engines target: 'default' (8.0, 8.6, 8.9, 12.0 and "
                             f"later) or a comma list of {', '.join(RTX_COMPUTE_CAPABILITIES)} (default: default)")
