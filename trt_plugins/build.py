"""Build the TensorRT plugin libraries with CMake (`python -m trt_plugins.build --help`).

A thin layer over CMake (trt_plugins/CMakeLists.txt) that checks the tools first, so a missing cmake, nvcc
or TensorRT header is one ``error:`` line and exit code 2 instead of a CMake backtrace; a configure or compile
step that fails exits 1 after CMake's own output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from compress.plumbing.cli import HelpFormatter, add_version_argument, exit_codes_epilog, exit_from_cli, positive_int
from compress.plumbing.errors import PipelineError
from trt_plugins import DEFAULT_BUILD_DIR, LIBRARY_NAMES, SOURCE_DIR

DEFAULT_CUDA_ARCHS = "75;80;86;87;89;90"  # Turing .. Hopper, Jetson Orin = 87; same default as CMakeLists.txt
HEADER_DIRS = (  # where packages put NvInfer.h when no --tensorrt-root is given (same list as CMake)
    "/usr/include/x86_64-linux-gnu",
    "/usr/include/aarch64-linux-gnu",
    "/usr/local/TensorRT/include",
    "/usr/include",
)


EXIT_BUILD_FAILED = 1


class BuildError(PipelineError):
    """A missing tool or an unusable option; the message is the one line shown to the user."""


class BuildStepFailed(RuntimeError):
    """CMake's configure or build step failed (its own output says why)."""


def find_nvcc() -> str | None:
    """nvcc from $CUDACXX, PATH or the default toolkit location."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def find_tensorrt_header(tensorrt_root: str | None) -> Path | None:
    """The directory holding NvInfer.h: under tensorrt_root (or $TensorRT_ROOT) if given, else the standard dirs."""
    root = tensorrt_root or os.environ.get("TensorRT_ROOT")
    candidates = [Path(root) / "include", Path(root)] if root else [Path(d) for d in HEADER_DIRS]
    return next((d for d in candidates if (d / "NvInfer.h").is_file()), None)


def normalise_archs(archs: str) -> str:
    """'80,87' or '80;87' -> '80;87' (CMake list)."""
    parts = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not parts:
        raise BuildError("--cuda-archs is empty")
    return ";".join(parts)


def run_step(label: str, command: list[str]) -> None:
    """Run one CMake step, streaming its output; raise BuildError naming the step on failure."""
    print(f"-- {label}: {' '.join(command)}", flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise BuildStepFailed(f"{label} failed (exit code {result.returncode}); see the CMake output above")


def build(tensorrt_root: str | None, cuda_archs: str, build_dir: Path, jobs: int | None = None,
          build_type: str = "Release") -> list[Path]:
    """Configure and build; return the paths of the libraries that were built."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("cmake not found on PATH (install CMake >= 3.18, e.g. `pip install cmake`)")
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (install the CUDA toolkit, or set CUDACXX / PATH to its nvcc)")
    header_dir = find_tensorrt_header(tensorrt_root)
    if header_dir is None:
        where = tensorrt_root or os.environ.get("TensorRT_ROOT") or ", ".join(HEADER_DIRS)
        raise BuildError(f"TensorRT header NvInfer.h not found in {where}; pass --tensorrt-root DIR")

    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={build_type}",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={normalise_archs(cuda_archs)}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    # CMake's own search covers the standard dirs; a root is only passed when the user gave one.
    if tensorrt_root or os.environ.get("TensorRT_ROOT"):
        configure.append(f"-DTensorRT_ROOT={tensorrt_root or os.environ['TensorRT_ROOT']}")
    print(f"-- TensorRT headers: {header_dir}; nvcc: {nvcc}; build dir: {build_dir}", flush=True)
    run_step("[1/2] configure", configure)
    run_step("[2/2] build", [cmake, "--build", str(build_dir)] + (["-j", str(jobs)] if jobs else []))
    built = [build_dir / "token_gather" / name for name in LIBRARY_NAMES.values()]
    return [path for path in built if path.is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trt_plugins.build", formatter_class=HelpFormatter,
        description="Configure and build the TokenGather TensorRT plugin libraries (both registration builds) "
                    "with CMake.",
        epilog=exit_codes_epilog((EXIT_BUILD_FAILED, "CMake's configure or build step failed (its output above)")))
    parser.add_argument("--tensorrt-root", metavar="DIR",
                        help="TensorRT install root with include/NvInfer.h (default: $TensorRT_ROOT, then the "
                             "system include dirs)")
    parser.add_argument("--cuda-archs", metavar="LIST", default=DEFAULT_CUDA_ARCHS,
                        help=f"CUDA architectures, ';' or ',' separated (default: {DEFAULT_CUDA_ARCHS})")
    parser.add_argument("--build-dir", metavar="DIR", type=Path, default=DEFAULT_BUILD_DIR,
                        help=f"CMake build directory (default: {DEFAULT_BUILD_DIR})")
    parser.add_argument("-j", "--jobs", type=positive_int, help="parallel build jobs (default: CMake's)")
    parser.add_argument("--build-type", default="Release", help="CMake build type (default: Release)")
    args = add_version_argument(parser).parse_args(argv)
    try:
        libraries = build(args.tensorrt_root, args.cuda_archs, args.build_dir.resolve(), args.jobs, args.build_type)
    except BuildStepFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    for library in libraries:
        print(f"built {library}")
    return 0


if __name__ == "__main__":
    exit_from_cli(main)
