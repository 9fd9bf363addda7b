"""compress: DynamicViT models and checkpoints, their training, masked fine-tuning and ToCom."""
from compress.dynamicvit import (
    REGISTERED_VARIANTS,
    DynamicViT,
    DynamicViTConfig,
    create_dynamicvit,
    dynamicvit_from_config,
)
from compress.token_select import TIE_RULE, keep_counts, select_tokens

__all__ = [
    "REGISTERED_VARIANTS",
    "TIE_RULE",
    "DynamicViT",
    "DynamicViTConfig",
    "create_dynamicvit",
    "dynamicvit_from_config",
    "keep_counts",
    "select_tokens",
]
