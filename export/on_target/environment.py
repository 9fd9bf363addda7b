"""Facts about this machine and its tools, for manifests and benchmark results. Needs no torch.

The GPU is asked through CUDA's driver API (``libcuda``, present wherever an NVIDIA driver is, Jetson
included) rather than through a deep-learning framework: a Jetson may carry a CPU-only torch wheel, or none.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

from export.on_target.runtimes import RTX_DEFAULT_TARGETS, TENSORRT, TENSORRT_RTX, Runtime, rtx_targets_gpu, runtime_version

INSTALL_HINT = TENSORRT.install_hint
# Distributions reported in manifests and benchmark results, when installed (none of them is imported).
REPORTED_DISTRIBUTIONS = ("numpy", "onnx", "onnxruntime-gpu", "onnxruntime", "onnxruntime-extensions", "polygraphy",
                          "nvidia-modelopt", "torch", "timm")
# CUdevice_attribute values of the CUDA driver API (cuda.h): stable since CUDA 6.5.
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


def tool_versions() -> dict:
    """Python and every reported distribution that is installed (read from its metadata, nothing imported),
    plus TensorRT's version when its bindings import (JetPack installs them without pip metadata)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in REPORTED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["tensorrt"] = tensorrt_version()
    versions["tensorrt_rtx"] = runtime_version(TENSORRT_RTX)
    return versions


def tensorrt_version() -> str | None:
    """The installed TensorRT's version (None when its bindings do not import)."""
    return runtime_version(TENSORRT)


def tensorrt_major(version: str) -> int:
    """10 for '10.3.0.30'; one clear error for anything that is not a version string."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"not a TensorRT version: {version!r}") from None


def cuda_driver():
    """The CUDA driver library, initialised; None without an NVIDIA driver."""
    try:
        cuda = ctypes.CDLL("nvcuda.dll" if platform.system() == "Windows" else "libcuda.so.1")
    except OSError:
        return None
    return cuda if cuda.cuInit(0) == 0 else None


def cuda_devices() -> list[dict]:
    """Name and compute capability of every CUDA device, through the driver API; [] without driver or GPU."""
    cuda = cuda_driver()
    if cuda is None:
        return []
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    devices = []
    for ordinal in range(count.value):
        device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        name = ctypes.create_string_buffer(256)
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            continue
        cuda.cuDeviceGetName(name, len(name), device)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
        devices.append({"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"})
    return devices


def cuda_driver_version() -> str | None:
    cuda = cuda_driver()
    version = ctypes.c_int(0)
    if cuda is None or cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def tensorrt_unavailable_reason() -> str | None:
    """None when a TensorRT engine can be built (and run) here, else why not (in words a user can act on)."""
    return build_unavailable_reason(TENSORRT)


def build_unavailable_reason(chosen: Runtime) -> str | None:
    """None when ``chosen`` can build an engine here, else why not. TensorRT builds on the GPU it targets;
    TensorRT-RTX builds on the CPU alone."""
    if runtime_version(chosen) is None:
        return f"{chosen.name} is not installed"
    if not chosen.builds_without_gpu and not cuda_devices():
        return "no CUDA GPU is visible"
    return None


def run_unavailable_reason(chosen: Runtime, targets: tuple[str, ...] = RTX_DEFAULT_TARGETS) -> str | None:
    """None when an engine of ``chosen`` (for RTX: built for ``targets``) can run here, else why not."""
    if runtime_version(chosen) is None:
        return f"{chosen.name} is not installed"
    devices = cuda_devices()
    if not devices:
        return "no CUDA GPU is visible"
    capability = devices[0]["compute_capability"]
    if chosen is TENSORRT_RTX and not rtx_targets_gpu(capability, tuple(targets)):
        return (f"the GPU ({devices[0]['name']}, compute capability {capability}) is not one the RTX engines target "
                f"({', '.join(targets)})")
    return None


def read_text(path: str | os.PathLike) -> str | None:
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
        frequencies[path.parts[-3]] = read_text(path)
    for path in sorted(Path("/sys/class/devfreq").glob("*/cur_freq")):
        frequencies[f"devfreq:{path.parent.name}"] = read_text(path)
    facts["frequencies_hz"] = frequencies
    return facts


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages, rounded to two decimals (None where the system has none)."""
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def target_facts() -> dict:
    """What an engine is tied to and what its timings depend on: TensorRT, GPU, driver, CPU, Jetson mode."""
    devices = cuda_devices()
    facts = {"tensorrt": tensorrt_version(), "tensorrt_rtx": runtime_version(TENSORRT_RTX), "gpu": devices[0]["name"] if devices else None,
             "compute_capability": devices[0]["compute_capability"] if devices else None,
             "cuda_driver": cuda_driver_version(), "cpu": cpu_model(), "machine": platform.machine(),
             "system": f"{platform.system()} {platform.release()}"}
    jetson = jetson_facts()
    if jetson:
        facts["jetson"] = jetson
    return facts
