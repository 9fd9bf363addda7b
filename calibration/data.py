"""Calibration sets: a fixed, seeded sample of N images, preprocessed exactly as the model is evaluated.

Sources (``--calib-data``):
- ``demo``: the built-in demo dataset's *train* split (the test split stays for measuring accuracy);
- a folder of images (searched recursively; ``root/<class>/<image>`` gives labels by sorted class folder),
  preprocessed with the model's eval transform (timm ``resolve_data_config`` + ``create_transform``);
- a ``.npy`` / ``.npz`` file: float arrays [N, C, H, W] are taken as already preprocessed; uint8 arrays
  [N, H, W, C] or [N, C, H, W] are scaled to [0, 1] and normalised with the model's mean/std (no resizing).

Preprocessed samples of ``demo`` and folders are cached as ``.npy`` files keyed by a hash of the source
listing, the preprocessing, N and the seed, so repeated builds skip decoding and resizing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compress.checkpoint import atomic_write
from compress.errors import PipelineError

DEMO_SOURCE = "demo"
DEFAULT_NUM_IMAGES = 256
DEFAULT_SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CACHE_ENV = "VIT_PRUNE_DEPLOY_CACHE"
CACHE_FORMAT = 1  # bump when the cached content's meaning changes


class CalibrationDataError(PipelineError):
    """Calibration data that is missing, unreadable, or does not fit the model."""


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs [C, H, W] float32 (timm eval transform fields)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class CalibrationSet:
    """Images [N, C, H, W] float32, optional labels [N] int64, and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    info: dict  # hash (sha256 of the images), size, source, seed, preprocessing, cache


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vit-prune-deploy") / "calibration"


def preprocessing_for(model, metadata: dict | None = None) -> Preprocessing:
    """The eval preprocessing of ``model`` (a DynamicViT): the checkpoint's recorded data spec when it has
    one (this project's training writes ``data``: image_size, mean, std), else the backbone's timm
    pretrained config; the input size is always the model's own."""
    from timm.data import resolve_data_config

    channels = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    config = resolve_data_config({"input_size": (channels, height, width)}, pretrained_cfg=dict(model.pretrained_cfg))
    data = (metadata or {}).get("data") or {}
    mean = tuple(float(v) for v in data.get("mean", config["mean"]))
    std = tuple(float(v) for v in data.get("std", config["std"]))
    return Preprocessing((channels, height, width), mean, std, str(config.get("interpolation", "bicubic")),
                         float(config.get("crop_pct", 0.875)), str(config.get("crop_mode", "center")))


def seeded_sample(count: int, num_images: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random sample of ``min(num_images, count)`` out of ``count`` items."""
    if num_images >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=num_images, replace=False))


def array_hash(images: np.ndarray) -> str:
    """Content hash of a calibration set (dtype, shape and bytes)."""
    digest = hashlib.sha256(f"{images.dtype}{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def cache_key(listing: list[str], preprocessing: Preprocessing, num_images: int, seed: int) -> str:
    """What a cached sample depends on, hashed: the source listing, preprocessing, N, seed, format."""
    import timm

    recipe = {"format": CACHE_FORMAT, "timm": timm.__version__, "preprocessing": preprocessing.to_dict(),
              "num_images": num_images, "seed": seed}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for line in listing:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:24]


def list_image_folder(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by relative path: a stable listing."""
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def folder_labels(root: Path, files: list[Path]) -> np.ndarray | None:
    """Class indices by sorted first-level folder (ImageFolder's rule), or None for a flat folder."""
    parts = [p.relative_to(root).parts for p in files]
    if not parts or any(len(part) < 2 for part in parts):
        return None
    classes = sorted({part[0] for part in parts})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[part[0]] for part in parts], dtype=np.int64)


def listing_lines(root: Path, files: list[Path]) -> list[str]:
    """One line per file: relative path, size and modification time (changes invalidate the cache)."""
    lines = []
    for path in files:
        stat = path.stat()
        lines.append(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return lines


def eval_transform(preprocessing: Preprocessing):
    """timm's eval transform (resize, center crop, to tensor, normalise) for ``preprocessing``."""
    from timm.data import create_transform

    return create_transform(preprocessing.input_size, is_training=False, interpolation=preprocessing.interpolation,
                            mean=preprocessing.mean, std=preprocessing.std, crop_pct=preprocessing.crop_pct,
                            crop_mode=preprocessing.crop_mode)


def preprocess_files(files: list[Path], preprocessing: Preprocessing) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    transform = eval_transform(preprocessing)
    channels = preprocessing.input_size[0]
    mode = "RGB" if channels == 3 else "L"
    images = np.empty((len(files), *preprocessing.input_size), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                images[i] = transform(image.convert(mode)).numpy()
        except (OSError, UnidentifiedImageError) as exc:
            raise CalibrationDataError(f"cannot read calibration image {path}: {exc}") from None
    return images


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


def cached(key: str, cache_dir: Path | None, build) -> tuple[np.ndarray, dict]:
    """``build()`` -> array, through the cache (``cache_dir`` None: no cache)."""
    if cache_dir is None:
        return build(), {"used": False}
    path = Path(cache_dir) / f"{key}.npy"
    array = read_cache(path)
    if array is not None:
        return array, {"used": True, "hit": True, "file": str(path)}
    array = build()
    return array, {"used": True, "hit": False, "file": str(path) if write_cache(path, array) else None}


def demo_images(split: str, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The demo dataset's ``split`` at its fixed placement: (images [N, 3, H, W], labels [N])."""
    from compress.data import DEMO_MEAN, DEMO_STD, demo_dataset

    if tuple(preprocessing.mean) != tuple(DEMO_MEAN) or tuple(preprocessing.std) != tuple(DEMO_STD):
        raise CalibrationDataError(
            f"calibration data 'demo' is normalised with mean {DEMO_MEAN} / std {DEMO_STD}, but this model expects "
            f"mean {preprocessing.mean} / std {preprocessing.std}: it was not trained on the demo dataset")
    dataset = demo_dataset(split, image_size=preprocessing.input_size[-1], random_placement=False)
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))]).astype(np.float32)
    return images, dataset.labels.numpy().astype(np.int64)


def from_demo(preprocessing: Preprocessing, num_images: int, seed: int, cache_dir: Path | None, split: str):
    images_all, labels_all = None, None

    def build():
        nonlocal images_all, labels_all
        images_all, labels_all = demo_images(split, preprocessing)
        return images_all[seeded_sample(len(images_all), num_images, seed)]

    from compress.data import DEMO_DATASET

    key = cache_key([f"{DEMO_DATASET}:{split}"], preprocessing, num_images, seed)
    images, cache = cached(key, cache_dir, build)
    if labels_all is None:  # labels are cheap: recompute rather than cache a second file
        from compress.data import demo_dataset

        labels_all = demo_dataset(split, image_size=preprocessing.input_size[-1]).labels.numpy().astype(np.int64)
    labels = labels_all[seeded_sample(len(labels_all), num_images, seed)]
    return images, labels, f"{DEMO_DATASET}:{split}", cache


def from_folder(root: Path, preprocessing: Preprocessing, num_images: int, seed: int, cache_dir: Path | None):
    files = list_image_folder(root)
    if not files:
        raise CalibrationDataError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    chosen = [files[i] for i in seeded_sample(len(files), num_images, seed)]
    key = cache_key([str(root.resolve()), *listing_lines(root, files)], preprocessing, num_images, seed)
    images, cache = cached(key, cache_dir, lambda: preprocess_files(chosen, preprocessing))
    labels = folder_labels(root, files)
    if labels is not None:
        labels = labels[seeded_sample(len(files), num_images, seed)]
    return images, labels, str(root), cache


def normalise_uint8(array: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    channels = preprocessing.input_size[0]
    if array.shape[-1] == channels and array.shape[1] != channels:
        array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(preprocessing.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((array.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and labels, from an .npz ``labels`` entry) from a .npy or .npz file."""
    try:
        content = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"cannot read calibration array {path}: {exc}") from None
    if isinstance(content, np.ndarray):
        return content, None
    with content:
        names = list(content.files)
        image_names = [n for n in ("images", "calib_data", "data") if n in names] or [n for n in names if n != "labels"]
        if len(image_names) < 1:
            raise CalibrationDataError(f"{path} holds no image array (expected an 'images' entry)")
        labels = content["labels"].astype(np.int64) if "labels" in names else None
        return content[image_names[0]], labels


def from_array_file(path: Path, preprocessing: Preprocessing, num_images: int, seed: int):
    array, labels = read_array_file(path)
    expected = tuple(preprocessing.input_size)
    if array.ndim != 4:
        raise CalibrationDataError(f"{path}: expected images [N, C, H, W], got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        array = normalise_uint8(array, preprocessing)
    elif not np.issubdtype(array.dtype, np.floating):
        raise CalibrationDataError(f"{path}: images must be float (preprocessed) or uint8 (raw), not {array.dtype}")
    if tuple(array.shape[1:]) != expected:
        raise CalibrationDataError(f"{path}: images of shape {tuple(array.shape[1:])} do not fit the model's "
                                   f"input {expected} (resize them first, or pass a folder of image files)")
    if labels is not None and len(labels) != len(array):
        raise CalibrationDataError(f"{path}: {len(labels)} labels for {len(array)} images")
    chosen = seeded_sample(len(array), num_images, seed)
    images = np.ascontiguousarray(array[chosen], dtype=np.float32)
    return images, None if labels is None else labels[chosen], str(path), {"used": False}


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
    if num_images < 1:
        raise CalibrationDataError(f"the calibration set needs at least 1 image, got {num_images}")
    cache = (Path(cache_dir) if cache_dir else default_cache_dir()) if use_cache else None
    text = str(source)
    if text == DEMO_SOURCE:
        images, labels, name, cache_info = from_demo(preprocessing, num_images, seed, cache, demo_split)
    else:
        path = Path(text)
        if not path.exists():
            raise CalibrationDataError(f"calibration data not found: {path} (pass a folder of images, a .npy/.npz "
                                       f"file, or '{DEMO_SOURCE}')")
        if path.is_dir():
            images, labels, name, cache_info = from_folder(path, preprocessing, num_images, seed, cache)
        elif path.suffix.lower() in (".npy", ".npz"):
            images, labels, name, cache_info = from_array_file(path, preprocessing, num_images, seed)
        else:
            raise CalibrationDataError(f"calibration data {path} is neither a folder nor a .npy/.npz file")
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
    "size" (N) and "source". Raises ``CalibrationDataError`` (a PipelineError) with one clear line.
    """
    calibration = load_calibration_set(source, preprocessing_for(model, metadata), num_images, seed, cache_dir,
                                       use_cache)
    return calibration.images, calibration.info
