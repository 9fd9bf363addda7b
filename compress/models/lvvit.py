"""LV-ViT backbones for DynamicViT (the second model family beside timm's ViT/DeiT).

Papers: "All Tokens Matter: Token Labeling for Training Better Vision Transformers", Jiang et al.,
NeurIPS 2021, https://arxiv.org/abs/2104.10858 (reference code: zihangJiang/TokenLabeling), and
"DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", Rao et al., NeurIPS 2021,
https://arxiv.org/abs/2106.02034, whose reference code (raoyongming/DynamicViT, ``LVViTDiffPruning``)
defines the checkpoints this module loads. timm has no LV-ViT, so the backbone is written here.

Modifications of LV-ViT relative to a timm ViT (each as in DynamicViT's LV-ViT checkpoints):
- patch embedding: a convolutional stem, conv 7x7 stride 2 -> BatchNorm -> ReLU, twice conv 3x3 -> BatchNorm
  -> ReLU (64 channels, no conv bias), then a (patch/2)x(patch/2) stride patch/2 projection to the width;
- attention without a qkv bias; every residual branch is divided by ``skip_lam`` (2);
- LayerNorm with PyTorch's default eps 1e-5 (DeiT uses 1e-6);
- the classifier reads every token (token labelling's auxiliary head):
  logits = head(CLS) + 0.5 * max over the patch tokens present of aux_head(token), after the final norm.
  At inference the max runs over the kept tokens only, so the logits depend on the kept set, not only on CLS.

DynamicViT's method itself (prediction modules, top-k selection, Gumbel decisions with attention masking)
comes from ``compress.models.dynamicvit.DynamicViTBase``; attention runs through the shared ``attention_forward``.
State-dict keys are the reference's, BatchNorm running statistics included, so released checkpoints load
strictly. Tensor shapes in docstrings are [batch, tokens, channels].
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_

from compress.models.complexity import VitShape
from compress.models.dynamicvit import (
    PREDICTOR_PREFIX,
    DynamicViTBase,
    attention_forward,
    default_pruning_locations,
    weights_arch,
)
from compress.models.registry import (
    DEFAULT_KEEP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    DynamicViTConfig,
    Family,
    ModelSpec,
    UnknownModel,
    register_family,
    register_variant,
    unknown_model,
    variants,
)

FAMILY = "lvvit"
STEM_KEY = "patch_embed.conv1.weight"  # only LV-ViT's convolutional stem has it
AUX_LOGIT_WEIGHT = 0.5  # token labelling's inference rule: head(CLS) + 0.5 * max aux_head(patch tokens)


@dataclass(frozen=True)
class LVViTArch:
    """The numbers of an LV-ViT (the builder's keyword arguments; the registry's ``backbone_kwargs`` override them)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 16
    num_heads: int = 6
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    skip_lam: float = 2.0
    stem_channels: int = 64
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


# The LV-ViT backbones of DynamicViT's model zoo (TokenLabeling's lvvit_s / lvvit_m).
LVVIT_BACKBONES = {
    "lvvit_s": LVViTArch(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0),
    "lvvit_m": LVViTArch(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0),
}
# TokenLabeling evaluates LV-ViT-S with a 0.9 centre crop and LV-ViT-M with the full image.
CROP_PCT = {"lvvit_s": 0.9, "lvvit_m": 1.0}


class ConvStem(nn.Module):
    """LV-ViT's patch embedding: images [B, 3, H, W] -> patch tokens [B, (H/p)(W/p), C].

    Three conv-BN-ReLU layers at half resolution, then a non-overlapping (p/2)x(p/2) projection, so each
    token covers a p x p patch. Keys ``conv1..3``, ``bn1..3``, ``proj`` (the reference's ``PatchEmbed4_2``).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, channels: int = 64):
        super().__init__()
        if patch_size % 2 or img_size % patch_size:
            raise UnknownModel(f"LV-ViT needs an even patch size dividing the image size, got {patch_size} and {img_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)

    def macs(self) -> int:
        """Multiply-accumulates of one image (convolutions only; BatchNorm folds into them)."""
        height, width = (size // 2 for size in self.img_size)
        per_pixel = sum(conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
                        for conv in (self.conv1, self.conv2, self.conv3))
        # The projection's (p/2)^2 kernel taps tile the half-resolution map once: one MAC per pixel and channel pair.
        return height * width * (per_pixel + self.proj.in_channels * self.proj.out_channels)


class LVViTAttention(nn.Module):
    """Multi-head self-attention, x [B, T, C] -> [B, T, C]; keys ``qkv`` ([3C, C], rows q | k | v) and ``proj``.

    Exposes what ``compress.models.dynamicvit.attention_forward`` reads (timm's ``Attention`` attribute names), and runs
    through it, so training's attention masking and the exported attention are DeiT's code.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise UnknownModel(f"LV-ViT width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
        return attention_forward(self, x, decision)


class LVViTBlock(nn.Module):
    """Pre-norm transformer block whose residual branches are divided by ``skip_lam``: x [B, T, C] -> [B, T, C]."""

    def __init__(self, arch: LVViTArch, drop_path: float = 0.0):
        super().__init__()
        self.skip_lam = arch.skip_lam
        self.norm1 = nn.LayerNorm(arch.embed_dim)
        self.attn = LVViTAttention(arch.embed_dim, arch.num_heads, arch.qkv_bias, arch.attn_drop_rate, arch.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(arch.embed_dim)
        self.mlp = Mlp(arch.embed_dim, arch.mlp_hidden, drop=arch.drop_rate)

    def forward(self, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
        """decision [B, T] (1 = kept, CLS included): attention masking for training; None: plain attention."""
        x = x + self.drop_path(self.attn(self.norm1(x), decision)) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


def token_label_logits(cls_logits: torch.Tensor, patch_logits: torch.Tensor,
                       patch_decision: torch.Tensor | None = None, aux_weight: float = AUX_LOGIT_WEIGHT) -> torch.Tensor:
    """head(CLS) + aux_weight * max over the kept patch tokens of aux_head(token).

    cls_logits [B, K]; patch_logits [B, N, K]; patch_decision [B, N] (1 = kept) or None when every token in
    the sequence is kept (inference, where dropped tokens are gone). In training the dropped tokens stay in
    the sequence and are left out of the max, so training scores what inference computes; a row with no kept
    patch token gets head(CLS) alone.
    """
    if patch_decision is None:
        return cls_logits + aux_weight * patch_logits.max(dim=1).values
    kept = patch_decision.unsqueeze(-1) > 0.5
    best = patch_logits.masked_fill(~kept, float("-inf")).max(dim=1).values
    return cls_logits + aux_weight * torch.where(kept.any(dim=1), best, torch.zeros_like(best))


class DynamicLVViT(DynamicViTBase):
    """DynamicViT over an LV-ViT backbone (the reference's ``LVViTDiffPruning``, same state-dict keys)."""

    def __init__(self, config: DynamicViTConfig, arch: LVViTArch):
        stem = ConvStem(arch.img_size, arch.patch_size, arch.in_chans, arch.embed_dim, arch.stem_channels)
        if not config.pruning_locations:  # built by backbone name: DynamicViT's spacing for the depth
            config = replace(config, pruning_locations=default_pruning_locations(arch.depth))
        super().__init__(config, arch.embed_dim, arch.depth, stem.num_patches)
        self.arch = arch
        self.num_classes = arch.num_classes
        # Parameters of the model itself come first in .parameters(): the export reads the graph's dtype there.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, stem.num_patches + 1, arch.embed_dim))
        self.patch_embed = stem
        self.pos_drop = nn.Dropout(arch.drop_rate)
        # Stochastic depth grows linearly over the blocks (plain floats: the model also builds on the meta device).
        rates = [arch.drop_path_rate * index / max(arch.depth - 1, 1) for index in range(arch.depth)]
        self.blocks = nn.ModuleList(LVViTBlock(arch, rate) for rate in rates)
        self.norm = nn.LayerNorm(arch.embed_dim)
        self.head = self._classifier()
        self.aux_head = self._classifier()
        self.pretrained_cfg = {"input_size": self.image_shape, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                               "interpolation": "bicubic", "crop_pct": CROP_PCT.get(config.backbone, 0.9)}
        self.data_config = DataConfig(self.image_shape, IMAGENET_MEAN, IMAGENET_STD, arch.num_classes)
        self._init_weights()

    def _classifier(self) -> nn.Module:
        return nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        """The reference's initialisation: truncated normal (std 0.02) for tokens and linear weights."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith(PREDICTOR_PREFIX):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.patch_embed.in_chans, *self.patch_embed.img_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> tokens [B, 1 + N, C] (CLS first, position embedding added)."""
        patches = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        return self.pos_drop(tokens)

    def run_block(self, block: nn.Module, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
        # LV-ViT's blocks always take the explicit attention path (MatMul/Softmax): nothing fused to switch off.
        return block(x, decision)

    def classify(self, tokens: torch.Tensor, patch_decision: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed tokens [B, T, C] -> logits [B, classes] from CLS and the kept patch tokens."""
        return token_label_logits(self.head(tokens[:, 0]), self.aux_head(tokens[:, 1:]), patch_decision)

    def cost_shape(self) -> VitShape:
        return VitShape(
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            mlp_hidden=self.arch.mlp_hidden,
            num_patches=self.num_patches,
            pruning_locations=tuple(self.config.pruning_locations),
            stem_macs=self.patch_embed.macs(),
            head_macs=self.embed_dim * self.num_classes,
            per_token_head_macs=self.embed_dim * self.num_classes,
        )


# --- the LV-ViT family in the registry -----------------------------------------------------------------------


def lvvit_arch(backbone: str, overrides: dict) -> LVViTArch:
    """The architecture of ``backbone`` (``lvvit_s``, ``lvvit_m``) with ``overrides`` (img_size, depth, ...)."""
    if backbone not in LVVIT_BACKBONES:
        raise unknown_model(backbone)
    known = {field.name for field in fields(LVViTArch)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UnknownModel(f"LV-ViT takes no argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(known))}")
    return replace(LVVIT_BACKBONES[backbone], **overrides)


def build_lvvit(config: DynamicViTConfig) -> DynamicLVViT:
    """Build a DynamicViT over the LV-ViT backbone the config names (random weights)."""
    return DynamicLVViT(config, lvvit_arch(config.backbone, config.backbone_kwargs))


def owns_lvvit(weights: dict) -> bool:
    return STEM_KEY in weights


def lvvit_weights_arch(weights: dict, source: str) -> dict:
    """The architecture numbers an LV-ViT state dict records (the head count is not among them)."""
    numbers = weights_arch(weights, source)  # read as a timm ViT's, whose patch is the projection's kernel
    stem_channels, in_chans = weights[STEM_KEY].shape[:2]
    patch_size = 2 * numbers["patch_size"]  # LV-ViT's projection runs at half resolution
    numbers.update(patch_size=patch_size, img_size=2 * numbers["img_size"], in_chans=in_chans,
                   stem_channels=stem_channels, qkv_bias="blocks.0.attn.qkv.bias" in weights,
                   num_classes=weights["head.weight"].shape[0] if "head.weight" in weights else 0)
    return numbers


MATCHED_NUMBERS = ("embed_dim", "depth", "patch_size", "mlp_hidden", "in_chans")
LVVIT_HEAD_DIM = 64  # LV-ViT-S 384/6 and LV-ViT-M 512/8: weights do not record the head count


def infer_lvvit_config(weights: dict, source: str = "checkpoint") -> DynamicViTConfig:
    """The config an LV-ViT state dict describes: a registered variant when its numbers match one, else the
    LV-ViT-S recipe at the recorded numbers with width / 64 heads."""
    arch = lvvit_weights_arch(weights, source)
    num_stages = len({k.split(".")[1] for k in weights if k.startswith(PREDICTOR_PREFIX)}) or 3
    locations = default_pruning_locations(arch["depth"], num_stages)
    sizes = {"img_size": arch["img_size"], "num_classes": arch["num_classes"]}
    for spec in variants(FAMILY):
        if all(spec.arch[k] == arch[k] for k in MATCHED_NUMBERS) and not arch["qkv_bias"] \
                and arch["stem_channels"] == LVViTArch.stem_channels:
            changed = {k: v for k, v in sizes.items() if getattr(LVVIT_BACKBONES[spec.backbone], k) != v}
            return spec.config(DEFAULT_KEEP_RATIO, locations, **changed)
    kwargs = {**sizes, "embed_dim": arch["embed_dim"], "depth": arch["depth"], "patch_size": arch["patch_size"],
              "in_chans": arch["in_chans"], "num_heads": max(1, arch["embed_dim"] // LVVIT_HEAD_DIM),
              "mlp_ratio": arch["mlp_hidden"] / arch["embed_dim"], "qkv_bias": arch["qkv_bias"],
              "stem_channels": arch["stem_channels"]}
    return DynamicViTConfig("lvvit_s", kwargs, locations, DEFAULT_KEEP_RATIO, FAMILY)


def _lvvit_spec(name: str, backbone: str, locations: tuple[int, ...], description: str) -> ModelSpec:
    base = LVVIT_BACKBONES[backbone]
    arch = {"embed_dim": base.embed_dim, "depth": base.depth, "num_heads": base.num_heads,
            "patch_size": base.patch_size, "mlp_hidden": base.mlp_hidden, "img_size": base.img_size,
            "in_chans": base.in_chans}
    return ModelSpec(name, FAMILY, backbone, arch, locations, description=description)


LVVIT_VARIANTS = (
    _lvvit_spec("dynamicvit_lvvit_s", "lvvit_s", (4, 8, 12), "LV-ViT-S (token labelling)"),
    _lvvit_spec("dynamicvit_lvvit_m", "lvvit_m", (5, 10, 15), "LV-ViT-M (token labelling)"),
)

register_family(Family(FAMILY, build_lvvit, owns_lvvit, infer_lvvit_config,
                       f"LV-ViT backbones ({', '.join(LVVIT_BACKBONES)})", lambda name: name in LVVIT_BACKBONES))
for _spec in LVVIT_VARIANTS:
    register_variant(_spec)

