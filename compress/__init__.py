"""compress: token-reduction models and their checkpoints, training, masked fine-tuning and ToCom.

The names below are imported on first use, so that the torch-free parts of the project (``compress.plumbing.errors``,
``compress.plumbing.cli``, used by the target-side ``export.engine`` and ``export.bench`` on a Jetson without torch) can be
imported without pulling in torch and timm.
"""
from __future__ import annotations

import importlib

_LAZY_NAMES = {
    "DynamicViT": "compress.models.dynamicvit",
    "DynamicViTBase": "compress.models.dynamicvit",
    "DynamicViTConfig": "compress.models.registry",
    "create_dynamicvit": "compress.models.dynamicvit",
    "create_model": "compress.models",
    "list_models": "compress.models",
    "model_from_config": "compress.models",
    "TIE_RULE": "compress.models.token_select",
    "keep_counts": "compress.models.token_select",
    "select_tokens": "compress.models.token_select",
}

__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    globals()[name] = value
    return value
