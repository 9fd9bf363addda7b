"""Training and evaluation data: an ImageNet-style image folder, or the built-in digits demo.

The demo dataset is scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the
library, no download), each upscaled and placed on a larger dark canvas so that most patch
tokens are background: the situation token pruning is meant for, small enough to train on
two CPU cores in minutes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from compress.plumbing.errors import PipelineError

DEMO_DATASET = "demo-digits"
DEMO_IMAGE_SIZE = 64
DEMO_DIGIT_SIZE = 32  # 8x8 digits upscaled 4x: at most 5x5 of the 64 8x8 patches carry ink
DEMO_NUM_CLASSES = 10
DEMO_TEST_FRACTION = 0.2
DEMO_SPLIT_SEED = 0
DEMO_NOISE_STD = 0.05  # faint fixed background texture, so background tokens are not all identical
# Images are in [0, 1] before normalisation; mean/std 0.5 maps them to [-1, 1].
DEMO_MEAN = (0.5, 0.5, 0.5)
DEMO_STD = (0.5, 0.5, 0.5)


class DataError(PipelineError):
    """A data folder or dataset option the pipeline cannot use."""


def demo_split_indices(num_images: int, test_fraction: float = DEMO_TEST_FRACTION, seed: int = DEMO_SPLIT_SEED):
    """Fixed seeded permutation split: (train indices, test indices), disjoint, covering every image."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    num_test = int(round(num_images * test_fraction))
    return order[num_test:].sort().values, order[:num_test].sort().values


def place_on_canvas(digit: torch.Tensor, top: int, left: int, canvas_size: int) -> torch.Tensor:
    """digit [S, S] -> canvas [canvas_size, canvas_size] with the digit's top-left corner at (top, left)."""
    size = digit.shape[-1]
    canvas = digit.new_zeros(canvas_size, canvas_size)
    canvas[top : top + size, left : left + size] = digit
    return canvas


class DemoDigits(Dataset):
    """scikit-learn's digits on a dark canvas, 3 channels, normalised to [-1, 1].

    split: "train" (1,438 images) or "test" (359 images), a fixed seeded split.
    Every image has a fixed seeded position and background texture; with ``random_placement``
    (the training default) the digit is moved to a fresh random position each time it is read
    (drawn from torch's global generator, so a seeded run is reproducible).
    Items are (image [3, H, W] float32, label int).
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = DEMO_IMAGE_SIZE,
        digit_size: int = DEMO_DIGIT_SIZE,
        random_placement: bool | None = None,
        seed: int = DEMO_SPLIT_SEED,
    ):
        if split not in ("train", "test"):
            raise DataError(f"demo dataset split must be 'train' or 'test', got {split!r}")
        if digit_size > image_size:
            raise DataError(f"digit size {digit_size} does not fit on a {image_size}-pixel canvas")
        from sklearn.datasets import load_digits

        digits = load_digits()
        train_idx, test_idx = demo_split_indices(len(digits.images), seed=seed)
        chosen = train_idx if split == "train" else test_idx
        small = torch.as_tensor(digits.images, dtype=torch.float32)[chosen] / 16.0  # [M, 8, 8] in [0, 1]
        self.digits = F.interpolate(small[:, None], size=(digit_size, digit_size), mode="bilinear", align_corners=False)
        self.digits = self.digits[:, 0].clamp(0.0, 1.0)
        self.labels = torch.as_tensor(digits.target, dtype=torch.long)[chosen]
        self.split, self.image_size, self.digit_size = split, image_size, digit_size
        self.random_placement = (split == "train") if random_placement is None else random_placement
        # Distinct seeds per split: the fixed positions and textures of test images never repeat train's.
        generator = torch.Generator().manual_seed(seed * 1000 + (1 if split == "train" else 2))
        span = image_size - digit_size + 1
        self.positions = torch.randint(0, span, (len(chosen), 2), generator=generator)
        self.noise = DEMO_NOISE_STD * torch.randn(len(chosen), image_size, image_size, generator=generator).abs()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.random_placement:
            top, left = torch.randint(0, self.image_size - self.digit_size + 1, (2,)).tolist()
        else:
            top, left = self.positions[index].tolist()
        canvas = place_on_canvas(self.digits[index], top, left, self.image_size)
        canvas = torch.maximum(canvas, self.noise[index])
        image = (canvas - 0.5) / 0.5
        return image.unsqueeze(0).expand(3, -1, -1).contiguous(), int(self.labels[index])


def demo_dataset(split: str = "test", **kwargs) -> DemoDigits:
    """The demo dataset (fixed placement for "test"); what the export stage validates on."""
    return DemoDigits(split, **kwargs)


def image_folder_dataset(root: str | Path, split: str, image_size: int, train: bool, **transform_kwargs):
    """An ImageNet-style folder (``root/<split>/<class>/*.jpg``) with timm's train or eval transform."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    folder = Path(root) / split
    if not Path(root).is_dir():
        raise DataError(f"data folder not found: {root}")
    if not folder.is_dir():
        raise DataError(f"data folder {root} has no '{split}' subfolder (expected {root}/{split}/<class>/<images>)")
    transform = create_transform(image_size, is_training=train, **transform_kwargs)
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {folder}: {exc}") from None


@dataclass(frozen=True)
class DataSpec:
    """What the model must match: image size, class count, normalisation; travels in checkpoints."""

    dataset: str
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_datasets(data: str, image_size: int | None = None, train_split: str = "train", eval_split: str = "val"):
    """(train dataset, eval dataset, DataSpec) for ``data`` = "demo-digits" or an image-folder path."""
    if data == DEMO_DATASET:
        size = image_size or DEMO_IMAGE_SIZE
        spec = DataSpec(DEMO_DATASET, size, DEMO_NUM_CLASSES, DEMO_MEAN, DEMO_STD)
        return DemoDigits("train", size), DemoDigits("test", size), spec
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    size = image_size or 224
    train = image_folder_dataset(data, train_split, size, train=True)
    evaluation = image_folder_dataset(data, eval_split, size, train=False)
    if train.classes != evaluation.classes:
        raise DataError(f"{data}: '{train_split}' and '{eval_split}' have different class folders")
    spec = DataSpec(str(data), size, len(train.classes), tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    return train, evaluation, spec


class ShardSampler(Sampler):
    """Every index exactly once across ranks (rank r reads r, r + world, ...): exact distributed evaluation."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(train_set, eval_set, batch_size: int, workers: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1):
    """Train loader (shuffled, DistributedSampler under DDP, incomplete last batch dropped) and eval loader.

    ``batch_size`` is per process. The train sampler is always a DistributedSampler (world size 1
    when not distributed) so that its shuffle depends only on (seed, epoch): a resumed run
    reads the same batches as an uninterrupted one. Call ``train_loader.sampler.set_epoch(epoch)``.
    """
    from torch.utils.data.distributed import DistributedSampler

    if len(train_set) < batch_size * world_size:
        raise DataError(f"{len(train_set)} training images are fewer than one global batch ({batch_size} x {world_size})")
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    train_loader = DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    eval_loader = DataLoader(
        eval_set, batch_size=batch_size, sampler=ShardSampler(len(eval_set), rank, world_size), num_workers=workers
    )
    return train_loader, eval_loader


def steps_per_epoch(train_size: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch with DistributedSampler(drop_last) and a drop_last loader."""
    return (train_size // world_size) // batch_size


def build_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """timm's Mixup/CutMix (None when both alphas are 0); it turns labels into soft targets."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)

