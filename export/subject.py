"""What an export exports: the model, where it came from, and the real images that come with it.

Every method loads its subject through these (a checkpoint; else the shipped demo model, with its test images;
else a named architecture with seeded random weights, labelled as such), and never modifies the model it was
given: ``with_model`` is how a ToCom merge gets a copy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from compress.data.datasets import demo_dataset
from compress.models import create_model
from compress.models.checkpoint import demo_checkpoint_path, load_dynamicvit

VALIDATION_SEED = 0
DEMO_TEST_IMAGES = 32


@dataclass
class ExportSubject:
    """What is exported and where it came from (the model itself is never modified by the export)."""

    model: nn.Module  # a DynamicViTBase, a ToMeViT, or any model of a method's own
    label: str
    source: str
    random_weights: bool
    notes: list[str]
    rho_train: float | None  # the keep ratio the model was trained at, when known (ToCom needs it)
    real_images: dict[str, torch.Tensor] = field(default_factory=dict)  # named real image sets
    metadata: dict = field(default_factory=dict)  # the checkpoint's entries besides weights (its data spec)


def subject_from_checkpoint(path: Path, label: str, model_name: str | None = None,
                            real_images: dict | None = None) -> ExportSubject:
    loaded = load_dynamicvit(path, model_name=model_name)
    rho_train = loaded.model.keep_ratio if loaded.keep_ratio_known else None
    return ExportSubject(loaded.model, label, str(path), False, loaded.notes, rho_train, real_images or {},
                         loaded.metadata)


def demo_subject(num_images: int = DEMO_TEST_IMAGES) -> ExportSubject:
    """The shipped demo checkpoint, with the first images of its test split as real validation images."""
    test = demo_dataset("test", random_placement=False)
    images = torch.stack([test[i][0] for i in range(min(num_images, len(test)))])
    return subject_from_checkpoint(Path(demo_checkpoint_path()), "demo", None, {"demo-test": images})


def seeded_random_weights() -> None:
    """Seed torch before building a model with random weights: the same weights on every run, so re-exports are
    byte-identical."""
    torch.manual_seed(VALIDATION_SEED)


def random_subject(model_name: str) -> ExportSubject:
    seeded_random_weights()
    model = create_model(model_name)
    return ExportSubject(model, f"{model_name}-random", f"{model_name} (random weights)", True, [], None)


def load_subject(checkpoint: Path | None, model_name: str | None) -> ExportSubject:
    """The checkpoint; else the demo model (unless a model is named); else that model with seeded random weights."""
    if checkpoint is not None:
        return subject_from_checkpoint(Path(checkpoint), Path(checkpoint).stem, model_name)
    if model_name is None:
        return demo_subject()
    return random_subject(model_name)


def with_model_copy(subject: ExportSubject) -> ExportSubject:
    """The subject with a deep copy of its model: what a ToCom merge modifies, so the caller's model never is."""
    return replace(subject, model=copy.deepcopy(subject.model))
