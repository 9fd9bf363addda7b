"""The TensorRT boundary: every TensorRT call of the export stage, imported lazily.

Nothing else in the project imports tensorrt, so export works (ONNX + ONNX Runtime) without it.
Precision by version (SPEC section 4): TensorRT >= 11 has no weak-typing precision flags, so a float16
engine is built strongly typed from the mixed-precision ONNX; TensorRT 10.x builds it from the float32
ONNX with the builder's FP16 flag.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.errors import PipelineError

INSTALL_HINT = (
    "install TensorRT's Python bindings (pip install -e '.[trt]' on a desktop GPU machine; on Jetson use "
    "JetPack's python3-libnvinfer) and run on a machine with an NVIDIA GPU"
)


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else why not (in words a user can act on)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        pass
    return None


@dataclass(frozen=True)
class EnginePlan:
    onnx_path: Path  # which ONNX the engine is built from
    strongly_typed: bool
    fp16_flag: bool
    tensorrt_version: str


def plan_engine(onnx_fp32: Path, onnx_fp16: Path | None, fp16: bool) -> EnginePlan:
    """Choose the ONNX and the typing mode for this TensorRT version."""
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    if fp16 and major >= 11:
        if onnx_fp16 is None:
            raise PipelineError("TensorRT >= 11 needs the float16 ONNX for --fp16 (it has no FP16 builder flag)")
        return EnginePlan(onnx_fp16, True, False, trt.__version__)
    return EnginePlan(onnx_fp32, major >= 11, fp16, trt.__version__)


def build_engine(
    plan: EnginePlan,
    engine_path: Path,
    batch_profile: tuple[int, int, int],
    image_shape: tuple[int, int, int],
    timing_cache: Path,
    plugin: bool,
) -> dict:
    """Build and save an engine through polygraphy's loaders; returns facts for the manifest."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    if plugin:
        import trt_plugins

        trt_plugins.load_plugin_library()
    low, opt, high = batch_profile
    profile = Profile().add("images", min=(low, *image_shape), opt=(opt, *image_shape), max=(high, *image_shape))
    network = NetworkFromOnnxPath(str(plan.onnx_path), strongly_typed=plan.strongly_typed or None)
    config = CreateConfig(
        fp16=plan.fp16_flag or None,
        profiles=[profile],
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
    )
    try:
        SaveEngine(EngineFromNetwork(network, config, save_timing_cache=str(timing_cache)), str(engine_path))()
    except Exception as exc:  # TensorRT reports build failures as generic exceptions
        raise PipelineError(f"TensorRT engine build failed: {exc}") from None
    return {
        "tensorrt": trt.__version__,
        "built_from": plan.onnx_path.name,
        "strongly_typed": plan.strongly_typed,
        "fp16_builder_flag": plan.fp16_flag,
    }
