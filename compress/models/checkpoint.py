"""Reading and writing DynamicViT checkpoints.

Accepted inputs:
- the reference format ``{"model": state_dict}`` (raoyongming/DynamicViT releases), loaded strictly;
- this project's format: the same plus ``"config"`` (a ``DynamicViTConfig`` dict) and training metadata;
- a plain state dict; a timm/DeiT backbone (``.pth`` or ``.safetensors``) without prediction modules,
  which are then newly initialised and reported as such.
Loading never unpickles arbitrary objects (``weights_only=True``).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.models import (DEFAULT_KEEP_RATIO, DynamicViTConfig, config_for, families, model_from_config,
                             supported_models, variants)
from compress.models.dynamicvit import DEIT_HEAD_DIM, PREDICTOR_PREFIX, DynamicViTBase
from compress.plumbing.errors import CheckpointError, PipelineError
from compress.plumbing.files import atomic_write

_SHOW_KEYS = 5
DEMO_MODELS_DIR = Path(__file__).resolve().parents[1] / "demo_models"  # compress/demo_models
DEMO_CHECKPOINT_NAME = "dynamicvit_demo.pth"


@dataclass
class LoadedCheckpoint:
    """A model built from a checkpoint, with what the loader had to assume or initialise."""

    model: DynamicViTBase
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # everything in the file besides weights and config
    keep_ratio_known: bool = True


def read_checkpoint_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and the rest of the file's top-level entries; CheckpointError for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), {}
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint, or it holds objects other than "
            "tensors and plain containers (refused: loading never runs pickled code)"
        ) from None
    except Exception as exc:  # torch/zip/safetensors raise many types for a corrupt or truncated file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or truncated file ({reason})") from None
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        weights, rest = content["model"], {k: v for k, v in content.items() if k != "model"}
    elif isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        weights, rest = content["state_dict"], {k: v for k, v in content.items() if k != "state_dict"}
    else:
        weights, rest = content, {}
    if not isinstance(weights, dict) or not weights or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, or one under 'model')")
    return weights, rest


def infer_config(weights: dict[str, torch.Tensor], source: str = "checkpoint") -> DynamicViTConfig:
    """The architecture a state dict describes: the family that owns its keys reads the numbers."""
    for candidate in families():
        if candidate.owns(weights):
            return candidate.infer_config(weights, source)
    raise CheckpointError(f"{source} is not a checkpoint of a supported model ({_first(weights)} ...). "
                          f"Supported: {supported_models()}")


def _first(keys, limit: int = _SHOW_KEYS) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def head_count_assumed(config: DynamicViTConfig) -> bool:
    """True when the weights matched no registered variant, so the head count (which weights do not record) was
    assumed by the family's rule rather than taken from a variant."""
    heads = config.backbone_kwargs.get("num_heads")
    return heads is not None and not any(
        spec.backbone_kwargs.get("num_heads") == heads and spec.backbone_kwargs.get("embed_dim") ==
        config.backbone_kwargs.get("embed_dim") for spec in variants(config.family))


def check_weights_match(model: DynamicViTBase, weights: dict[str, torch.Tensor], source: str) -> bool:
    """Raise CheckpointError naming the first offending keys; return True when only predictors are missing."""
    expected = model.state_dict()
    missing = set(expected) - set(weights)
    unexpected = set(weights) - set(expected)
    mismatched = [
        f"{k} {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    predictors_only = bool(missing) and all(k.startswith(PREDICTOR_PREFIX) for k in missing)
    problems = []
    if missing and not predictors_only:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched[:_SHOW_KEYS])}")
    if problems:
        raise CheckpointError(f"{source} does not match {model.config.backbone} DynamicViT: " + " | ".join(problems))
    return predictors_only


def load_dynamicvit(
    path: str | os.PathLike,
    model_name: str | None = None,
    keep_ratio: float | None = None,
) -> LoadedCheckpoint:
    """Build the DynamicViT a checkpoint holds and load its weights strictly.

    model_name overrides the architecture (a registered variant or timm ViT name) when the
    checkpoint carries no config; keep_ratio overrides the checkpoint's training keep ratio.
    """
    weights, rest = read_checkpoint_file(path)
    source = str(path)
    notes = []
    stored = rest.pop("config", None)
    if isinstance(stored, dict) and not model_name:
        config = DynamicViTConfig.from_dict(stored)
        keep_known = True
    else:
        inferred = infer_config(weights, source)
        keep_known = False
        if model_name:
            # The name fixes the architecture; only image size and class count come from the weights.
            sizes = {k: v for k, v in inferred.backbone_kwargs.items() if k in ("img_size", "num_classes")}
            config = config_for(model_name, DEFAULT_KEEP_RATIO, inferred.pruning_locations, **sizes)
        else:
            config = inferred
            if head_count_assumed(config):
                notes.append(
                    f"architecture read from weights; head count assumed width/{DEIT_HEAD_DIM} "
                    f"= {config.backbone_kwargs['num_heads']} (pass --model if that is wrong)"
                )
    if keep_ratio is not None:
        config = config.with_keep_ratio(keep_ratio)
        keep_known = True
    try:
        model = model_from_config(config)
    except PipelineError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{source}: cannot build {config.backbone} from its config ({exc})")
    if check_weights_match(model, weights, source):
        model.load_state_dict(weights, strict=False)
        notes.append("backbone-only checkpoint: prediction modules newly initialised (train them before use)")
    else:
        model.load_state_dict(weights, strict=True)
    if not keep_known:
        notes.append(f"checkpoint records no training keep ratio; using {model.keep_ratio} (pass --keep to choose)")
    return LoadedCheckpoint(model, notes, rest, keep_known)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def save_dynamicvit(model: DynamicViTBase, path: str | os.PathLike, **metadata) -> None:
    """Reference format (``{"model": state_dict}``) plus the config and any training metadata."""
    atomic_torch_save({"model": model.state_dict(), "config": model.config.to_dict(), **metadata}, path)


def demo_checkpoint_path() -> Path:
    """The shipped DynamicViT demo checkpoint (reference format + config + training metadata), trained by
    ``python -m compress.demo``: the export stage's default model."""
    return DEMO_MODELS_DIR / DEMO_CHECKPOINT_NAME
