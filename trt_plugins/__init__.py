"""TensorRT plugins for deploying token-pruning ViTs, and the pieces that test them without TensorRT.

One op so far, TokenGather (CLS token + the K best-scoring patch tokens; see token_gather/README.md):
  token_gather/           CUDA kernel, TensorRT IPluginV3 plugin, CMake build
  build.py                ``python -m trt_plugins.build``: configure and build the plugin libraries
  ort_token_gather.py     ONNX Runtime (CPU) implementation through onnxruntime-extensions
  token_gather_cuda.py    the same .cu kernel as a PyTorch extension (GPU tests, benchmark)

The names below are the contract between the exported ONNX node, the ONNX parser and the C++ creator;
token_gather/tokenGatherConstants.h holds the same values for C++ (a test checks they agree).
TensorRT is imported lazily: everything here except load_plugin_library works without it.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

PLUGIN_NAME = "TokenGather"          # ONNX op_type and TensorRT creator name
PLUGIN_VERSION = "1"                 # ONNX attribute plugin_version
PLUGIN_NAMESPACE = ""                # ONNX attribute plugin_namespace
ONNX_DOMAIN = "trt.plugins"          # domain of the exported TokenGather nodes
ATTR_KEEP = "K"                      # INT, patch tokens kept (TensorRT field kINT32)
ATTR_WITH_INDICES = "with_indices"   # INT 0/1 (default 0): adds output 1, the kept patch indices

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR                       # CMake source dir (trt_plugins/CMakeLists.txt)
DEFAULT_BUILD_DIR = PACKAGE_DIR / "build"
KERNEL_SOURCE = PACKAGE_DIR / "token_gather" / "tokenGatherKernel.cu"
SPEC_PATH = PACKAGE_DIR / "token_gather" / "token_gather_spec.json"  # shapes, attributes, golden cases

# Two builds of the same plugin, one per TensorRT loading route; never load both into one process.
LIBRARY_NAMES = {
    "static": "libtoken_gather_plugin.so",           # registers on load: ctypes.CDLL, trtexec --staticPlugins
    "dynamic": "libtoken_gather_plugin_dynamic.so",  # IPluginRegistry.load_library, trtexec --dynamicPlugins
}
LIBRARY_ENV = "TOKEN_GATHER_PLUGIN_LIBRARY"  # overrides the path of the "static" library

_loaded: dict[str, ctypes.CDLL] = {}


class PluginNotBuiltError(FileNotFoundError):
    """The plugin library has not been built (run ``python -m trt_plugins.build``)."""


def library_path(registration: str = "static", build_dir: str | os.PathLike | None = None) -> Path:
    """Path of the built plugin library (it may not exist yet).

    registration: "static" (REGISTER_TENSORRT_PLUGIN, for ctypes.CDLL) or "dynamic" (getCreators, for
    IPluginRegistry.load_library). ``$TOKEN_GATHER_PLUGIN_LIBRARY`` overrides the static one.
    """
    if registration not in LIBRARY_NAMES:
        raise ValueError(f"registration must be one of {sorted(LIBRARY_NAMES)}, got {registration!r}")
    if registration == "static" and build_dir is None and os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV])
    root = Path(build_dir) if build_dir is not None else DEFAULT_BUILD_DIR
    return root / "token_gather" / LIBRARY_NAMES[registration]


def load_plugin_library(build_dir: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load the self-registering plugin library into this process (once) and return its handle.

    Imports tensorrt first when it is installed, so the libnvinfer the library needs is the one the
    Python bindings use. Raises PluginNotBuiltError with the build command when the library is missing.
    """
    path = library_path("static", build_dir)
    key = str(path.resolve()) if path.exists() else str(path)
    if key in _loaded:
        return _loaded[key]
    if not path.is_file():
        raise PluginNotBuiltError(
            f"TokenGather plugin library not found at {path}; build it with `python -m trt_plugins.build`"
            + (f" --build-dir {build_dir}" if build_dir is not None else "")
        )
    try:
        import tensorrt  # noqa: F401  (loads libnvinfer with the bindings' own search path)
    except ImportError:
        pass
    _loaded[key] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return _loaded[key]
