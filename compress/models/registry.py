"""The model registry: one ``ModelSpec`` per variant, one ``Family`` per kind of backbone.

In timm's manner, a command line takes a model *name*; ``create_model(name)`` looks up the variant's spec and
dispatches to its family's builder. A family (the timm ViT/DeiT one in ``compress.models.dynamicvit``, LV-ViT in
``compress.models.lvvit``) registers itself and its variants when its module is imported; ``compress.models`` imports
every family, so use ``compress.models.create_model`` rather than this module's functions directly.

Checkpoints are matched to an architecture by the numbers a spec records (width, depth, patch size, MLP width,
image size), never by name suffixes: ``Family.infer_config`` reads those numbers from a state dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from compress.plumbing.errors import PipelineError

# The keep ratio rho a DynamicViT is built and trained at when nobody names one: the reference's default.
DEFAULT_KEEP_RATIO = 0.7
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModel(PipelineError, ValueError):
    """A model name that is neither a registered variant nor a model its family can build."""


@dataclass(frozen=True)
class DataConfig:
    """What the model expects of its input images (it travels with the model, as timm's pretrained configs do)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000


@dataclass(frozen=True)
class DynamicViTConfig:
    """Everything needed to rebuild a model; travels inside checkpoints (``to_dict`` / ``from_dict``).

    family: the backbone family (``deit`` for timm ViT/DeiT, ``lvvit``); backbone: the name the family builds from
    (a timm model name for ``deit``); backbone_kwargs: overrides of that backbone's arguments (img_size,
    num_classes, embed_dim, ...); pruning_locations: blocks before which the prediction modules run;
    keep_ratio: the base ratio rho the model was trained at (stage k keeps int(num_patches * rho**k) patch tokens).
    """

    backbone: str = "deit_small_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)
    pruning_locations: tuple[int, ...] = (3, 6, 9)
    keep_ratio: float = DEFAULT_KEEP_RATIO
    family: str = "deit"

    def to_dict(self) -> dict:
        return {**asdict(self), "pruning_locations": list(self.pruning_locations)}

    @classmethod
    def from_dict(cls, data: dict) -> "DynamicViTConfig":
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        if "pruning_locations" in known:
            known["pruning_locations"] = tuple(int(i) for i in known["pruning_locations"])
        return cls(**known)

    def with_keep_ratio(self, keep_ratio: float) -> "DynamicViTConfig":
        return replace(self, keep_ratio=float(keep_ratio))


@dataclass(frozen=True)
class ModelSpec:
    """One registered variant: ``dynamicvit_deit_small`` -> family ``deit``, backbone ``deit_small_patch16_224``.

    arch: the numbers that identify the architecture in a state dict (embed_dim, depth, patch_size, mlp_hidden,
    img_size, ...), compared by the checkpoint loader; backbone_kwargs: builder arguments beyond what the backbone
    name already fixes (empty for timm's DeiT names; the whole architecture for the demo ViT).
    """

    name: str
    family: str
    backbone: str
    arch: dict
    pruning_locations: tuple[int, ...]
    backbone_kwargs: dict = field(default_factory=dict)
    default_keep: float = DEFAULT_KEEP_RATIO
    data: DataConfig = DataConfig()
    description: str = ""

    def config(self, keep_ratio: float | None = None, pruning_locations=None, **overrides) -> DynamicViTConfig:
        """The config of this variant; overrides (img_size, num_classes, drop_path_rate, ...) go to the builder."""
        locations = tuple(pruning_locations) if pruning_locations else self.pruning_locations
        keep = self.default_keep if keep_ratio is None else float(keep_ratio)
        return DynamicViTConfig(self.backbone, {**self.backbone_kwargs, **overrides}, locations, keep, self.family)


@dataclass(frozen=True)
class Family:
    """A kind of backbone DynamicViT runs on.

    build(config) -> model; owns(weights) -> True when a state dict belongs to this family (by its keys);
    infer_config(weights, source) -> the config those weights describe (CheckpointError when they describe
    none this family can build); builds_name(name) -> True for names outside the registry that the family can
    still build (timm model names for ``deit``); supported: a short description for error messages.
    """

    name: str
    build: Callable
    owns: Callable[[dict], bool]
    infer_config: Callable[[dict, str], DynamicViTConfig]
    supported: str
    builds_name: Callable[[str], bool] = lambda name: False


_FAMILIES: dict[str, Family] = {}
_VARIANTS: dict[str, ModelSpec] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def register_variant(spec: ModelSpec) -> ModelSpec:
    if spec.family not in _FAMILIES:
        raise ValueError(f"variant {spec.name}: family {spec.family!r} is not registered")
    _VARIANTS[spec.name] = spec
    return spec


def family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownModel(f"unknown model family {name!r}: one of {sorted(_FAMILIES)}") from None


def families() -> list[Family]:
    return list(_FAMILIES.values())


def variant(name: str) -> ModelSpec | None:
    return _VARIANTS.get(name)


def variants(family_name: str | None = None) -> list[ModelSpec]:
    return [s for s in _VARIANTS.values() if family_name is None or s.family == family_name]


def supported_models() -> str:
    """One line naming what can be built: for error messages."""
    return "; ".join(f"{f.name}: {f.supported}" for f in _FAMILIES.values()) + \
        f". Registered variants: {', '.join(sorted(_VARIANTS))}"


def config_for(name: str, keep_ratio: float | None = None, pruning_locations=None, **overrides) -> DynamicViTConfig:
    """The config ``create_model`` builds: a registered variant's, or a family's for a name it builds."""
    spec = variant(name)
    if spec is not None:
        return spec.config(keep_ratio, pruning_locations, **overrides)
    for candidate in _FAMILIES.values():
        if candidate.builds_name(name):
            keep = DEFAULT_KEEP_RATIO if keep_ratio is None else float(keep_ratio)
            # No locations: the family chooses them for the backbone's depth.
            return DynamicViTConfig(name, dict(overrides), tuple(pruning_locations or ()), keep, candidate.name)
    raise unknown_model(name)


def model_from_config(config: DynamicViTConfig):
    """Rebuild the model a config (from a checkpoint) describes, with random weights."""
    return family(config.family).build(config)


def create_model(name: str, keep_ratio: float | None = None, pruning_locations=None, **overrides):
    """Build a registered variant, or a model its family builds by name, with random weights.

    keep_ratio: the training keep ratio (default: the variant's); overrides go to the family's builder
    (img_size, num_classes, drop_path_rate, embed_dim, ...).
    """
    return model_from_config(config_for(name, keep_ratio, pruning_locations, **overrides))


def unknown_model(name: str) -> UnknownModel:
    return UnknownModel(f"unknown or unsupported model {name!r}. Supported: {supported_models()}")
