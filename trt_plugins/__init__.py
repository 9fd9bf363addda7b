"""TensorRT plugins for deploying token-pruning ViTs, and the pieces that test them without TensorRT.

One op so far, TokenGather (CLS token + the K best-scoring patch tokens; see token_gather/README.md):
  token_gather/           CUDA kernel, TensorRT IPluginV3 plugin, CMake build
  build.py                ``python -m trt_plugins.build``: configure and build the plugin libraries
  ort_token_gather.py     ONNX Runtime (CPU) implementation through onnxruntime-extensions
  token_gather_cuda.py    the same .cu kernel as a PyTorch extension (GPU tests, benchmark)

The names below are the contract between the exported ONNX node, the ONNX parser and the C++ creator;
token_gather/tokenGatherConstants.h holds the same values for C++ (a test checks they agree).
TensorRT is imported lazily and torch never: everything here except load_plugin_library works without them
(find_plugin_library is the file check export stages run before any work).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import NamedTuple

from compress.plumbing.errors import PipelineError

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

_loaded: dict[str, object] = {}


class PluginNotBuiltError(PipelineError, FileNotFoundError):
    """The plugin library has not been built (run ``python -m trt_plugins.build``)."""


class PluginLoadError(PipelineError):
    """The plugin library exists but TensorRT or the dynamic loader cannot load it."""


class PluginLibrary(NamedTuple):
    """A built plugin library and how it registers its creator ("static" or "dynamic", see LIBRARY_NAMES)."""

    path: Path
    registration: str


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


def find_plugin_library(build_dir: str | os.PathLike | None = None) -> PluginLibrary:
    """The plugin library to load: the self-registering build when it exists, else the getCreators build.

    Checks files only (no TensorRT, no loading), so export stages can call it before any work. Looks in
    ``build_dir`` (default: trt_plugins/build, where ``python -m trt_plugins.build`` puts it); without
    ``build_dir``, ``$TOKEN_GATHER_PLUGIN_LIBRARY`` names the one self-registering build to use.
    Raises PluginNotBuiltError, a PipelineError naming the build command, when none exists.
    """
    explicit = build_dir is None and bool(os.environ.get(LIBRARY_ENV))  # the user's path, and only it
    registrations = ["static"] if explicit else list(LIBRARY_NAMES)
    candidates = [PluginLibrary(library_path(registration, build_dir), registration) for registration in registrations]
    for library in candidates:
        if library.path.is_file():
            return library
    build_command = "python -m trt_plugins.build" + (f" --build-dir {build_dir}" if build_dir is not None else "")
    looked = " or ".join(str(library.path) for library in candidates)
    raise PluginNotBuiltError(f"the TokenGather plugin library is not built (no {looked}); "
                              f"build it with `{build_command}`")


def load_plugin_library(build_dir: str | os.PathLike | None = None) -> object:
    """Load the plugin library (``find_plugin_library``'s choice) into this process, once, and return its handle.

    The self-registering build is opened with ctypes (RTLD_GLOBAL), after importing tensorrt when it is
    installed so the library binds to the libnvinfer the Python bindings use; the getCreators build goes
    through ``tensorrt.get_plugin_registry().load_library``. Raises PluginNotBuiltError when no build exists
    and PluginLoadError when one exists but cannot be loaded (built for another TensorRT or CUDA).
    """
    library = find_plugin_library(build_dir)
    key = str(library.path.resolve())
    if key in _loaded:
        return _loaded[key]
    rebuild = "rebuild it against this TensorRT with `python -m trt_plugins.build`"
    try:
        import tensorrt  # first, so the library binds to the libnvinfer the Python bindings loaded
    except ImportError:
        tensorrt = None
    if library.registration == "static":
        try:
            handle = ctypes.CDLL(str(library.path), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise PluginLoadError(f"cannot load the TokenGather plugin library {library.path}: {error}; "
                                  f"{rebuild}") from None
    else:
        if tensorrt is None:
            raise PluginLoadError(f"{library.path} registers through TensorRT's plugin registry, and TensorRT's "
                                  "Python bindings are not installed")
        handle = tensorrt.get_plugin_registry().load_library(str(library.path))
        if handle is None:
            raise PluginLoadError(f"TensorRT could not load the TokenGather plugin library {library.path}; {rebuild}")
    _loaded[key] = handle
    return handle
