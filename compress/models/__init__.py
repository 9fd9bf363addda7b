"""Every model family, registered: import model construction from here.

``create_model(name)`` builds any registered variant (``list_models()``) or any model a family builds by name
(timm ViT names); ``model_from_config`` rebuilds what a checkpoint's config describes.
"""
from __future__ import annotations

# Importing a family module registers it and its variants.
import compress.models.dynamicvit  # noqa: F401  (DeiT / timm ViT family)
import compress.models.lvvit  # noqa: F401  (LV-ViT family)
from compress.models.registry import (
    DEFAULT_KEEP_RATIO,
    DynamicViTConfig,
    ModelSpec,
    UnknownModel,
    config_for,
    create_model,
    families,
    model_from_config,
    supported_models,
    variant,
    variants,
)


def list_models(family_name: str | None = None) -> list[str]:
    """Registered variant names (of one family, or all)."""
    return sorted(spec.name for spec in variants(family_name))


__all__ = ["DEFAULT_KEEP_RATIO", "DynamicViTConfig", "ModelSpec", "UnknownModel", "config_for", "create_model",
           "families", "list_models", "model_from_config", "supported_models", "variant", "variants"]
