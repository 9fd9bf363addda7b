"""Golden data: the validation inputs of an export and the PyTorch outputs for them, travelling with the folder.

``golden.npz`` holds, per named input set ("random" for the seeded random images, else a real image set):
``<set>/images`` float32 [N, C, H, W], ``<set>/logits`` float32 [N, classes] and ``<set>/kept_stage<k>`` int64
[N, k_s] (kept patch positions of stage k on the original grid). The manifest lists the file (role "golden")
with its sha256, so a copied folder can be re-checked on the target - ONNX graphs on ONNX Runtime, engines on
TensorRT - with no torch: a changed or truncated file is refused, never compared.

Each shipped graph is checked through its *debug twin* (the same graph with the kept positions as extra
outputs), listed in the manifest with role ``<role>_debug`` and file ``<stem>.debug.onnx``.
"""
from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.plumbing.errors import PipelineError
from compress.plumbing.files import atomic_write
from export.on_target.compare import RANDOM_INPUTS

GOLDEN_FILE = "golden.npz"
GOLDEN_ROLE = "golden"
SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
KEPT_KEY = re.compile(r"^kept_stage(\d+)$")


class GoldenDataError(PipelineError):
    """Golden data or a listed artefact that is missing, corrupt, or not what the manifest recorded."""


@dataclass
class GoldenSet:
    images: np.ndarray  # float32 [N, C, H, W]
    logits: np.ndarray  # float32 [N, classes]
    kept: list[np.ndarray]  # per stage, int64 [N, k_s]

    @property
    def reference(self) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.logits, self.kept


def debug_role(role: str) -> str:
    """The manifest role of a graph's debug twin (the graph plus its kept-position outputs)."""
    return f"{role}_debug"


def debug_file_name(file_name: str) -> str:
    """model_native_fp16.onnx -> model_native_fp16.debug.onnx"""
    return f"{Path(file_name).stem}.debug{Path(file_name).suffix}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_path(folder: Path, entry: dict) -> Path:
    """The file a manifest artefact entry names, after checking it exists and its sha256 is the recorded one."""
    path = Path(folder) / entry["path"]
    if not path.is_file():
        raise GoldenDataError(f"{path} is listed in the manifest but missing")
    if entry.get("sha256") and sha256_of(path) != entry["sha256"]:
        raise GoldenDataError(f"{path} differs from the file the manifest recorded (sha256 mismatch): it was "
                              "changed or truncated after export; copy the export folder again")
    return path


def golden_arrays(input_sets: dict[str, np.ndarray], references: dict[str, tuple[np.ndarray, list[np.ndarray]]]) -> dict:
    """The flat ``<set>/<name>`` arrays of golden.npz (pure; checks names and shapes)."""
    if set(input_sets) != set(references):
        raise GoldenDataError(f"input sets {sorted(input_sets)} and references {sorted(references)} differ")
    arrays = {}
    for name, images in input_sets.items():
        if not SET_NAME.match(name):
            raise GoldenDataError(f"input set name {name!r}: use letters, digits, '_', '-' and '.' only")
        logits, kept = references[name]
        if len(logits) != len(images) or any(len(k) != len(images) for k in kept):
            raise GoldenDataError(f"input set {name!r}: {len(images)} images but outputs for a different count")
        arrays[f"{name}/images"] = np.ascontiguousarray(images, dtype=np.float32)
        arrays[f"{name}/logits"] = np.ascontiguousarray(logits, dtype=np.float32)
        for stage, positions in enumerate(kept, start=1):
            arrays[f"{name}/kept_stage{stage}"] = np.ascontiguousarray(positions, dtype=np.int64)
    return arrays


def write_golden(folder: Path, input_sets: dict[str, np.ndarray],
                 references: dict[str, tuple[np.ndarray, list[np.ndarray]]]) -> dict:
    """Write golden.npz into ``folder`` (atomically); returns its manifest artefact entry (role "golden").

    ``references[name]`` = (logits, [kept positions per stage]) of the float32 PyTorch model for
    ``input_sets[name]``. The file is byte-identical for identical inputs (numpy's zip entries carry no time).
    """
    arrays = golden_arrays(input_sets, references)
    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:  # a file object: given a name, numpy would append ".npz" to it
            np.savez(handle, **arrays)

    path = atomic_write(Path(folder) / GOLDEN_FILE, write)
    sets = {name: {"images": int(len(images)), "judged": name != RANDOM_INPUTS} for name, images in input_sets.items()}
    return {"path": GOLDEN_FILE, "role": GOLDEN_ROLE, "sha256": sha256_of(path), "sets": sets}


def load_golden(folder: Path, manifest: dict) -> dict[str, GoldenSet]:
    """The golden sets of an export folder, after checking the file against the manifest's sha256."""
    entries = [e for e in manifest.get("artifacts", []) if e.get("role") == GOLDEN_ROLE]
    if not entries:
        raise GoldenDataError(f"{Path(folder) / 'manifest.json'} lists no golden data (role 'golden'): re-export "
                              "the folder with this version of python -m export.build")
    path = verified_path(folder, entries[0])
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise GoldenDataError(f"cannot read golden data {path}: {exc}") from None
    return golden_sets(arrays, str(path))


def golden_sets(arrays: dict[str, np.ndarray], source: str) -> dict[str, GoldenSet]:
    """Group flat ``<set>/<name>`` arrays into GoldenSets; every set needs images, logits and the same stages."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        name, _, field = key.partition("/")
        grouped.setdefault(name, {})[field] = array
    sets = {}
    for name, fields in grouped.items():
        stages = sorted(int(m.group(1)) for f in fields if (m := KEPT_KEY.match(f)))
        if "images" not in fields or "logits" not in fields or stages != list(range(1, len(stages) + 1)):
            raise GoldenDataError(f"{source}: input set {name!r} lacks images, logits or a kept_stage array")
        sets[name] = GoldenSet(fields["images"].astype(np.float32), fields["logits"].astype(np.float32),
                               [fields[f"kept_stage{k}"] for k in stages])
    if not sets:
        raise GoldenDataError(f"{source} holds no input set")
    return sets

