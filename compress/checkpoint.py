"""Reading and writing DynamicViT checkpoints.

Accepted inputs:
- the reference format ``{"model": state_dict}`` (raoyongming/DynamicViT releases), loaded strictly;
- this project's format: the same plus ``"config"`` (a ``DynamicViTConfig`` dict) and training metadata;
- a plain state dict; a timm/DeiT backbone (``.pth`` or ``.safetensors``) without prediction modules,
  which are then newly initialised and reported as such.
Loading never unpickles arbitrary objects (``weights_only=True``).
"""
from __future__ import annotations

import math
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compress.dynamicvit import (
    REGISTERED_VARIANTS,
    DynamicViT,
    DynamicViTConfig,
    backbone_name_for,
    default_pruning_locations,
    dynamicvit_from_config,
)
from compress.errors import CheckpointError, PipelineError

PREDICTOR_PREFIX = "score_predictor."
# The reference's default keep ratio, used only when neither the checkpoint nor the caller names one.
FALLBACK_KEEP_RATIO = 0.7
# DeiT's rule (tiny 192/3, small 384/6, base 768/12): weights do not record the head count.
DEIT_HEAD_DIM = 64
_SHOW_KEYS = 5


@dataclass
class LoadedCheckpoint:
    """A model built from a checkpoint, with what the loader had to assume or initialise."""

    model: DynamicViT
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


def _shape(weights: dict[str, torch.Tensor], key: str, path: str) -> tuple[int, ...]:
    if key not in weights:
        raise CheckpointError(f"{path} is not a ViT checkpoint: key '{key}' is missing")
    return tuple(weights[key].shape)


def infer_config(weights: dict[str, torch.Tensor], source: str = "checkpoint") -> DynamicViTConfig:
    """The architecture a state dict describes, when its shapes determine it.

    Registered DeiT variants are recognised by width, depth and patch size; other widths are
    built as a generic timm ViT with the DeiT head rule (width / 64 heads), since weights do
    not record the head count.
    """
    embed_dim, in_chans, patch, _ = _shape(weights, "patch_embed.proj.weight", source)
    pos_tokens = _shape(weights, "pos_embed", source)[1]
    grid = math.isqrt(pos_tokens - 1)
    if grid * grid != pos_tokens - 1:
        raise CheckpointError(f"{source}: position embedding of {pos_tokens} tokens is not CLS + a square grid")
    depth = 1 + max((int(k.split(".")[1]) for k in weights if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source} is not a ViT checkpoint: it has no 'blocks.*' keys")
    num_stages = len({k.split(".")[1] for k in weights if k.startswith(PREDICTOR_PREFIX)})
    kwargs = {"img_size": grid * patch}
    kwargs["num_classes"] = _shape(weights, "head.weight", source)[0] if "head.weight" in weights else 0
    mlp_hidden = _shape(weights, "blocks.0.mlp.fc1.weight", source)[0]
    known = {
        (384 if name.endswith("small") else 192 if name.endswith("tiny") else 768): backbone
        for name, backbone in REGISTERED_VARIANTS.items()
    }
    backbone = known.get(embed_dim) if (depth, patch, in_chans, mlp_hidden) == (12, 16, 3, 4 * embed_dim) else None
    if backbone is None:
        backbone = "vit_base_patch16_224"
        kwargs.update(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=max(1, embed_dim // DEIT_HEAD_DIM),
            patch_size=patch,
            in_chans=in_chans,
            mlp_ratio=mlp_hidden / embed_dim,
            qkv_bias="blocks.0.attn.qkv.bias" in weights,
        )
    kwargs = {k: v for k, v in kwargs.items() if not (k == "img_size" and v == 224) and not (k == "num_classes" and v == 1000)}
    locations = default_pruning_locations(depth, num_stages or 3)
    return DynamicViTConfig(backbone, kwargs, locations, FALLBACK_KEEP_RATIO)


def _first(keys, limit: int = _SHOW_KEYS) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_weights_match(model: DynamicViT, weights: dict[str, torch.Tensor], source: str) -> bool:
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
            config = DynamicViTConfig(backbone_name_for(model_name), sizes, inferred.pruning_locations, FALLBACK_KEEP_RATIO)
        else:
            config = inferred
            if config.backbone == "vit_base_patch16_224":
                notes.append(
                    f"architecture read from weights; head count assumed width/{DEIT_HEAD_DIM} "
                    f"= {config.backbone_kwargs['num_heads']} (pass --model if that is wrong)"
                )
    if keep_ratio is not None:
        config = DynamicViTConfig(config.backbone, config.backbone_kwargs, config.pruning_locations, keep_ratio)
        keep_known = True
    try:
        model = dynamicvit_from_config(config)
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


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` on a file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp creates 0600; a saved file reads like any other
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def save_dynamicvit(model: DynamicViT, path: str | os.PathLike, **metadata) -> None:
    """Reference format (``{"model": state_dict}``) plus the config and any training metadata."""
    atomic_torch_save({"model": model.state_dict(), "config": model.config.to_dict(), **metadata}, path)
