"""Calibration sets: a fixed, seeded sample of N images, preprocessed exactly as the model is evaluated.

Sources (``--calib-data``) are those ``compress.data.images`` reads: ``demo`` (here the demo dataset's *train* split;
the test split stays for measuring accuracy), a folder of images, or a ``.npy`` / ``.npz`` file.

``check_image_source(text)`` refuses a missing, empty or unreadable source cheaply, before any export work.
Preprocessed samples of ``demo`` and folders are cached as ``.npy`` files keyed by a hash of the source
listing, the preprocessing, N and the seed, so repeated builds skip decoding and resizing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm

from compress.data.images import (
    ImageSourceError,
    Preprocessing,
    check_image_source,
    check_image_sources,
    load_images,
    preprocessing_for,
    seeded_pick,
    seeded_sample,
)
from compress.models.checkpoint import atomic_write

__all__ = ["CalibrationSet", "ImageSourceError", "Preprocessing", "check_image_source", "check_image_sources",
           "load_calibration_data", "load_calibration_set", "preprocessing_for", "seeded_sample"]

DEFAULT_NUM_IMAGES = 256
DEFAULT_SEED = 0
CACHE_ENV = "VIT_PRUNE_DEPLOY_CACHE"
CACHE_FORMAT = 1  # bump when the cached content's meaning changes


@dataclass
class CalibrationSet:
    """Images [N, C, H, W] float32, optional labels [N] int64, and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    info: dict  # hash (sha256 of the images), size, source, seed, preprocessing, cache


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vit-prune-deploy") / "calibration"


def array_hash(images: np.ndarray) -> str:
    """Content hash of a calibration set (dtype, shape and bytes)."""
    digest = hashlib.sha256(f"{images.dtype}{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def cache_key(listing: list[str], preprocessing: Preprocessing, num_images: int, seed: int) -> str:
    """What a cached sample depends on, hashed: the source listing, preprocessing, N, seed, format."""
    recipe = {"format": CACHE_FORMAT, "timm": timm.__version__, "preprocessing": preprocessing.to_dict(),
              "num_images": num_images, "seed": seed}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for line in listing:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:24]


def read_cache(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a damaged cache file is rebuilt


def write_cache(path: Path, array: np.ndarray) -> bool:
    """Atomic write (temporary file + rename); False when the cache folder cannot be written."""
    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:  # a handle: np.save would append ".npy" to a bare name
            np.save(stream, array, allow_pickle=False)

    try:
        atomic_write(path, write)
        return True
    except OSError:
        return False


def cached(key: str, cache_dir: Path, build) -> tuple[np.ndarray, dict]:
    """``build()`` -> array, through the cache file ``cache_dir/key.npy`` (rebuilt when damaged)."""
    path = Path(cache_dir) / f"{key}.npy"
    array = read_cache(path)
    if array is not None:
        return array, {"used": True, "hit": True, "file": str(path)}
    array = build()
    return array, {"used": True, "hit": False, "file": str(path) if write_cache(path, array) else None}


def load_calibration_set(
    source: str | os.PathLike,
    preprocessing: Preprocessing,
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = DEFAULT_SEED,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    demo_split: str = "train",
) -> CalibrationSet:
    """A fixed seeded sample of ``num_images`` from ``source`` (``demo``, a folder, a .npy/.npz).

    ``cache_dir`` None means ``default_cache_dir()``; ``use_cache`` False neither reads nor writes it.
    """
    cache_root = (Path(cache_dir) if cache_dir else default_cache_dir()) if use_cache else None
    cache_info = {"used": False}

    def through_cache(listing: list[str], build) -> np.ndarray:
        nonlocal cache_info
        if cache_root is None:
            return build()
        images, cache_info = cached(cache_key(listing, preprocessing, num_images, seed), cache_root, build)
        return images

    sample = load_images(source, preprocessing, seeded_pick(num_images, seed), demo_split, through_cache)
    images, labels, name = sample.images, sample.labels, sample.name
    info = {"hash": array_hash(images), "size": int(len(images)), "source": name, "seed": seed,
            "requested": num_images, "preprocessing": preprocessing.to_dict(), "cache": cache_info}
    return CalibrationSet(images, labels, info)


def load_calibration_data(
    source: str | os.PathLike,
    model,
    metadata: dict | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = DEFAULT_SEED,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, dict]:
    """``--calib-data`` for ``model`` (a DynamicViT; ``metadata``: its checkpoint's, for the data spec).

    Returns (images [N, C, H, W] float32, info) where info has at least "hash" (sha256 of the images),
    "size" (N) and "source". Raises ``ImageSourceError`` (a PipelineError) with one clear line.
    """
    calibration = load_calibration_set(source, preprocessing_for(model, metadata), num_images, seed, cache_dir,
                                       use_cache)
    return calibration.images, calibration.info
