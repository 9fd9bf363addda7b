"""Image sources a user names on the command line, read at a model's own input size.

A source is one of:
- ``demo``: the built-in demo dataset (a split of it), placed without randomness;
- a folder of images (searched recursively; ``root/<class>/<image>`` gives labels by sorted class folder),
  preprocessed with the model's eval transform (timm ``resolve_data_config`` + ``create_transform``);
- a ``.npy`` / ``.npz`` file: float arrays [N, C, H, W] are taken as already preprocessed; uint8 arrays
  [N, H, W, C] or [N, C, H, W] are scaled to [0, 1] and normalised with the model's mean/std (no resizing).

Calibration (``calibration.data``) adds a cache on top; the kept-token pictures (``compress.visualize``) read
these directly.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config

from compress.data.datasets import DEMO_DATASET, DEMO_MEAN, DEMO_STD, demo_dataset
from compress.plumbing.errors import PipelineError

DEMO_SOURCE = "demo"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ARRAY_SUFFIXES = (".npy", ".npz")
ARRAY_ENTRY_NAMES = ("images", "calib_data", "data")  # entry names of an .npz, in order of preference
SOURCE_HINT = f"pass a folder of images, a .npy/.npz file, or '{DEMO_SOURCE}'"


# cache(listing, build) -> images: see load_images
CacheHook = Callable[[list[str], Callable[[], np.ndarray]], np.ndarray]
# pick(number of images the source holds) -> the indices to load
Pick = Callable[[int], np.ndarray]


class ImageSourceError(PipelineError):
    """An image source that is missing, empty, unreadable, or does not fit the model."""


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
class ImageSample:
    """Images [N, C, H, W] float32, optional labels [N] int64, and a name for where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    name: str


def preprocessing_for(model, metadata: dict | None = None) -> Preprocessing:
    """The eval preprocessing of ``model`` (a DynamicViT): the checkpoint's recorded data spec when it has
    one (this project's training writes ``data``: image_size, mean, std), else the backbone's timm
    pretrained config; the input size is always the model's own."""
    channels, height, width = model.image_shape  # every family's (LV-ViT's stem projection is not the first conv)
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


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_image_folder(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by relative path: a stable listing."""
    files = [p for p in root.rglob("*") if is_image_file(p)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def folder_labels(root: Path, files: list[Path]) -> np.ndarray | None:
    """Class indices by sorted first-level folder (ImageFolder's rule), or None for a flat folder."""
    parts = [p.relative_to(root).parts for p in files]
    if not parts or any(len(part) < 2 for part in parts):
        return None
    classes = sorted({part[0] for part in parts})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[part[0]] for part in parts], dtype=np.int64)


def eval_transform(preprocessing: Preprocessing):
    """timm's eval transform (resize, center crop, to tensor, normalise) for ``preprocessing``."""
    return create_transform(preprocessing.input_size, is_training=False, interpolation=preprocessing.interpolation,
                            mean=preprocessing.mean, std=preprocessing.std, crop_pct=preprocessing.crop_pct,
                            crop_mode=preprocessing.crop_mode)


def preprocess_files(files: list[Path], preprocessing: Preprocessing) -> np.ndarray:
    """Image files -> model inputs [N, C, H, W] float32 (RGB, or grayscale for a 1-channel model)."""
    transform = eval_transform(preprocessing)
    mode = "RGB" if preprocessing.input_size[0] == 3 else "L"
    images = np.empty((len(files), *preprocessing.input_size), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                images[i] = transform(image.convert(mode)).numpy()
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageSourceError(f"cannot read image {path}: {exc}") from None
    return images


def demo_images(split: str, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The demo dataset's ``split`` at its fixed placement: (images [N, 3, H, W], labels [N])."""
    if tuple(preprocessing.mean) != tuple(DEMO_MEAN) or tuple(preprocessing.std) != tuple(DEMO_STD):
        raise ImageSourceError(
            f"image source '{DEMO_SOURCE}' is normalised with mean {DEMO_MEAN} / std {DEMO_STD}, but this model "
            f"expects mean {preprocessing.mean} / std {preprocessing.std}: it was not trained on the demo dataset "
            f"(pass a folder or a .npy/.npz of images like its training data)")
    dataset = demo_dataset(split, image_size=preprocessing.input_size[-1], random_placement=False)
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))]).astype(np.float32)
    return images, dataset.labels.numpy().astype(np.int64)


def demo_labels(split: str, preprocessing: Preprocessing) -> np.ndarray:
    """The demo split's labels alone (cheap: no images are drawn)."""
    return demo_dataset(split, image_size=preprocessing.input_size[-1]).labels.numpy().astype(np.int64)


def demo_source_name(split: str) -> str:
    return f"{DEMO_DATASET}:{split}"


def normalise_uint8(array: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    channels = preprocessing.input_size[0]
    if array.shape[-1] == channels and array.shape[1] != channels:
        array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(preprocessing.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((array.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def npz_image_entry(names: list[str], path: Path) -> str:
    """Which entry of an .npz holds the images: a known name, else the first entry that is not 'labels'."""
    image_names = [n for n in ARRAY_ENTRY_NAMES if n in names] or [n for n in names if n != "labels"]
    if not image_names:
        raise ImageSourceError(f"{path} holds no image array (expected an 'images' entry)")
    return image_names[0]


def no_images_error(root: Path) -> ImageSourceError:
    return ImageSourceError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")


def read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and labels, from an .npz ``labels`` entry) from a .npy or .npz file."""
    try:
        content = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ImageSourceError(f"cannot read image array {path}: {exc}") from None
    if isinstance(content, np.ndarray):
        return content, None
    with content:
        labels = content["labels"].astype(np.int64) if "labels" in content.files else None
        return content[npz_image_entry(list(content.files), path)], labels


def array_file_images(path: Path, preprocessing: Preprocessing, pick: Pick) -> ImageSample:
    """The picked images of a .npy/.npz file, checked against the model's input."""
    array, labels = read_array_file(path)
    expected = tuple(preprocessing.input_size)
    if array.ndim != 4:
        raise ImageSourceError(f"{path}: expected images [N, C, H, W], got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        array = normalise_uint8(array, preprocessing)
    elif not np.issubdtype(array.dtype, np.floating):
        raise ImageSourceError(f"{path}: images must be float (preprocessed) or uint8 (raw), not {array.dtype}")
    if tuple(array.shape[1:]) != expected:
        raise ImageSourceError(f"{path}: images of shape {tuple(array.shape[1:])} do not fit the model's "
                               f"input {expected} (resize them first, or pass a folder of image files)")
    if labels is not None and len(labels) != len(array):
        raise ImageSourceError(f"{path}: {len(labels)} labels for {len(array)} images")
    chosen = picked(pick, len(array), path)
    images = np.ascontiguousarray(array[chosen], dtype=np.float32)
    return ImageSample(images, None if labels is None else labels[chosen], str(path))


def existing_source(text: str | os.PathLike) -> Path:
    """The path a non-demo source names: an existing folder or .npy/.npz file, else one clear error."""
    path = Path(text)
    if not path.exists():
        raise ImageSourceError(f"image source not found: {path} ({SOURCE_HINT})")
    if not path.is_dir() and path.suffix.lower() not in ARRAY_SUFFIXES:
        raise ImageSourceError(f"image source {path} is neither a folder nor a .npy/.npz file ({SOURCE_HINT})")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ImageSourceError(f"image source {path} is not readable (permissions)")
    return path


def first_image_file(root: Path) -> Path | None:
    """The first image file met under ``root`` (no full listing: a cheap emptiness check)."""
    return next((p for p in root.rglob("*") if is_image_file(p)), None)


def read_npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of a .npy stream, without reading the data."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)
    return shape, dtype


def check_array_header(path: Path) -> None:
    """A .npy/.npz that opens and holds a 4-d float or uint8 image array; reads headers, not the data."""
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as stream:
                shape, dtype = read_npy_header(stream)
        else:
            with zipfile.ZipFile(path) as archive:
                names = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
                with archive.open(npz_image_entry(names, path) + ".npy") as stream:
                    shape, dtype = read_npy_header(stream)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ImageSourceError(f"cannot read image array {path}: {exc}") from None
    if len(shape) != 4 or shape[0] == 0:
        raise ImageSourceError(f"{path}: expected images [N, C, H, W] with N >= 1, got an array of shape {shape}")
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise ImageSourceError(f"{path}: images must be float (preprocessed) or uint8 (raw), not {dtype}")


def check_image_source(text: str | os.PathLike) -> None:
    """Raise ImageSourceError (a PipelineError, one line) unless ``text`` names a usable image source.

    Cheap enough to run before any export work: it reads a folder only up to its first image (and opens that
    one), and a .npy/.npz only up to its array header. Whether the images fit a model's input is checked when
    they are loaded for that model.
    """
    if str(text) == DEMO_SOURCE:
        return
    path = existing_source(text)
    if path.is_dir():
        first = first_image_file(path)
        if first is None:
            raise no_images_error(path)
        try:
            with Image.open(first) as image:
                image.verify()
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageSourceError(f"cannot read image {first}: {exc}") from None
    else:
        check_array_header(path)


def listing_lines(root: Path, files: list[Path]) -> list[str]:
    """One line per file: relative path, size and modification time (what a cache of the folder depends on)."""
    lines = []
    for path in files:
        stat = path.stat()
        lines.append(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return lines


def seeded_pick(num_images: int, seed: int) -> Pick:
    """Pick a fixed seeded sample of ``num_images`` (all of them when fewer exist)."""
    if num_images < 1:
        raise ImageSourceError(f"an image sample needs at least 1 image, got {num_images}")
    return lambda count: seeded_sample(count, num_images, seed)


def range_pick(first: int, num_images: int) -> Pick:
    """Pick images ``first`` .. ``first + num_images - 1`` in the source's order (a folder's sorted listing)."""
    return lambda count: np.arange(first, min(first + num_images, count))


def picked(pick: Pick, count: int, source: str | os.PathLike) -> np.ndarray:
    chosen = pick(count)
    if len(chosen) == 0:
        raise ImageSourceError(f"no image selected from {source}: it holds {count}")
    return chosen


def no_cache(listing: list[str], build: Callable[[], np.ndarray]) -> np.ndarray:
    return build()


def check_image_sources(sources: dict[str, str | os.PathLike | None]) -> None:
    """``check_image_source`` for every source given (None: not given), the error prefixed with its name
    (a command-line flag: ``--calib-data: image folder ... holds no images``)."""
    for name, source in sources.items():
        if source is not None:
            try:
                check_image_source(source)
            except ImageSourceError as exc:
                raise ImageSourceError(f"{name}: {exc}") from None


def load_images(source: str | os.PathLike, preprocessing: Preprocessing, pick: Pick, demo_split: str = "test",
                cache: CacheHook = no_cache) -> ImageSample:
    """The images ``pick`` chooses (``seeded_pick``, ``range_pick``) from ``source`` (``demo``, a folder, a
    .npy/.npz), at ``preprocessing``.

    ``cache(listing, build)`` returns ``build()``'s images [N, C, H, W], possibly from a store keyed by
    ``listing`` (lines that change whenever the source does); arrays from .npy/.npz files are not cached.
    """
    if str(source) == DEMO_SOURCE:
        labels = demo_labels(demo_split, preprocessing)
        chosen = picked(pick, len(labels), demo_source_name(demo_split))
        images = cache([demo_source_name(demo_split)], lambda: demo_images(demo_split, preprocessing)[0][chosen])
        return ImageSample(images, labels[chosen], demo_source_name(demo_split))
    path = existing_source(source)
    if not path.is_dir():
        return array_file_images(path, preprocessing, pick)
    files = list_image_folder(path)
    if not files:
        raise no_images_error(path)
    chosen = picked(pick, len(files), path)
    images = cache([str(path.resolve()), *listing_lines(path, files)],
                   lambda: preprocess_files([files[i] for i in chosen], preprocessing))
    labels = folder_labels(path, files)
    return ImageSample(images, None if labels is None else labels[chosen], str(path))
