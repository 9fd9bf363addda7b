"""DynamicViT: token pruning with learned prediction modules, on timm ViT/DeiT backbones.

Paper: "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
Rao et al., NeurIPS 2021, https://arxiv.org/abs/2106.02034 (reference code: raoyongming/DynamicViT).

The model takes over the modules of a timm ``VisionTransformer`` (it does not fork timm's
blocks) and registers them under the reference implementation's names, so released
checkpoints load strictly. Tensor shapes in docstrings are [batch, tokens, channels].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from compress.errors import PipelineError
from compress.token_select import keep_counts, masked_attention_softmax, select_tokens

# timm backbone of each registered variant; any timm ViT with a CLS token can be wrapped too.
REGISTERED_VARIANTS: dict[str, str] = {
    "dynamicvit_deit_tiny": "deit_tiny_patch16_224",
    "dynamicvit_deit_small": "deit_small_patch16_224",
    "dynamicvit_deit_base": "deit_base_patch16_224",
}


class UnknownModel(PipelineError, ValueError):
    """A model name that is neither a registered variant nor a timm model."""


def default_pruning_locations(depth: int, num_stages: int = 3) -> tuple[int, ...]:
    """Blocks before which the prediction modules run: depth 12 -> (3, 6, 9), 16 -> (4, 8, 12), 20 -> (5, 10, 15)."""
    step = depth // (num_stages + 1)
    if step < 1:
        raise ValueError(f"a depth-{depth} backbone is too shallow for {num_stages} pruning stages")
    return tuple(step * k for k in range(1, num_stages + 1))


@dataclass(frozen=True)
class DynamicViTConfig:
    """Everything needed to rebuild a DynamicViT; travels inside checkpoints.

    backbone: a timm model name; backbone_kwargs: overrides passed to ``timm.create_model``
    (img_size, num_classes, embed_dim, ...); keep_ratio: the base ratio rho (stage k keeps
    int(num_patches * rho**k) patch tokens); 1.0 runs the dense backbone without predictors.
    """

    backbone: str = "deit_small_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)
    pruning_locations: tuple[int, ...] = (3, 6, 9)
    keep_ratio: float = 0.7

    def to_dict(self) -> dict:
        return {**asdict(self), "pruning_locations": list(self.pruning_locations)}

    @classmethod
    def from_dict(cls, data: dict) -> "DynamicViTConfig":
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        if "pruning_locations" in known:
            known["pruning_locations"] = tuple(int(i) for i in known["pruning_locations"])
        return cls(**known)


# The timm VisionTransformer parts DynamicViT runs (parameter-free ones included), under timm's names.
ADOPTED_BACKBONE_PARTS = (
    "cls_token", "pos_embed", "patch_embed", "pos_drop", "norm_pre", "blocks", "norm", "fc_norm", "head_drop", "head",
)


class PredictionModule(nn.Module):
    """Scores patch tokens for keeping (reference name ``PredictorLG``; keys ``in_conv.*``, ``out_conv.*``).

    Local half of the features per token, global half averaged over the tokens still kept,
    then an MLP to log-probabilities [batch, tokens, 2] where channel 0 is KEEP.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim, eps=1e-5), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, patch_tokens: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
        """patch_tokens: [B, N, C]; decision: [B, N] (1 = still kept) or None when every token is kept."""
        features = self.in_conv(patch_tokens)
        local, pooled = features.chunk(2, dim=-1)
        if decision is None:
            global_feature = pooled.mean(dim=1, keepdim=True)
        else:
            weights = decision.unsqueeze(-1).to(pooled.dtype)
            global_feature = (pooled * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local, global_feature.expand_as(pooled)], dim=-1))


class MaskedForwardOutput(NamedTuple):
    """Training forward result, in the reference's tuple order."""

    logits: torch.Tensor  # [B, classes]
    patch_tokens: torch.Tensor  # [B, N, C] final normed patch tokens
    last_decision: torch.Tensor  # [B, N] detached
    stage_decisions: list[torch.Tensor]  # per stage [B, N], cumulative


# decide(keep_log_probs [B, N, 2], previous_decision [B, N], stage) -> hard decision [B, N]
DecisionFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def gumbel_keep_decision(log_probs: torch.Tensor, previous_decision: torch.Tensor, stage: int) -> torch.Tensor:
    """Hard straight-through Gumbel-softmax sample (tau 1) of KEEP; once dropped, never back."""
    return F.gumbel_softmax(log_probs, hard=True)[..., 0] * previous_decision


def attention_forward(attn: nn.Module, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``Attention`` with the softmax in float32: masked by ``decision`` [B, T] (training) or plain.

    x: [B, T, C]. Used by the training forward (dropped tokens stay, attention masking) and by the
    export, where a float16 graph must still normalise attention in float32.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if decision is None:
        weights = logits.float().softmax(dim=-1).to(logits.dtype)
    else:
        weights = masked_attention_softmax(logits, decision)
    out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(batch, tokens, -1)
    out = getattr(attn, "norm", nn.Identity())(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def block_forward(block: nn.Module, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``Block`` through ``attention_forward`` (with ``decision``: dropped tokens stay, masked)."""
    x = x + block.drop_path1(block.ls1(attention_forward(block.attn, block.norm1(x), decision)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def check_backbone(backbone: nn.Module) -> None:
    """Refuse timm models that DynamicViT's CLS-token pruning cannot run on."""
    if not isinstance(backbone, VisionTransformer):
        raise ValueError(f"DynamicViT needs a timm VisionTransformer, got {type(backbone).__name__}")
    problems = []
    if backbone.cls_token is None:
        problems.append("it has no CLS token")
    if getattr(backbone, "reg_token", None) is not None:
        problems.append("it has register tokens")
    if getattr(backbone, "no_embed_class", False):
        problems.append("its position embedding excludes the CLS token")
    if getattr(backbone, "dynamic_img_size", False):
        problems.append("it uses dynamic image size")
    if getattr(backbone, "attn_pool", None) is not None or backbone.global_pool != "token":
        problems.append("it does not classify from the CLS token")
    if problems:
        raise ValueError("unsupported backbone for DynamicViT: " + "; ".join(problems))


class DynamicViT(nn.Module):
    """DynamicViT over a timm VisionTransformer.

    Modifications to the backbone:
    - ``score_predictor``: one ``PredictionModule`` per stage, run before the blocks at ``pruning_locations``.
    - training (``forward_masked``): dropped tokens stay; hard Gumbel decisions, cumulative; attention masking.
    - inference (``forward_pruned``): top-k patch tokens per stage gathered behind CLS, plain attention;
      ``token_selector`` does the selection and is swapped by the ONNX export for its graph flavours.
    """

    def __init__(self, backbone: VisionTransformer, config: DynamicViTConfig):
        super().__init__()
        check_backbone(backbone)
        self.config = config
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        self.num_classes = backbone.num_classes
        self.embed_dim = backbone.embed_dim
        # Same attribute names as timm and the reference: the state-dict keys stay the standard ones.
        for name in ADOPTED_BACKBONE_PARTS:
            setattr(self, name, getattr(backbone, name))
        depth = len(self.blocks)
        if not config.pruning_locations or any(not 0 < i < depth for i in config.pruning_locations):
            raise ValueError(f"pruning locations {config.pruning_locations} must lie in 1..{depth - 1}")
        if list(config.pruning_locations) != sorted(set(config.pruning_locations)):
            raise ValueError(f"pruning locations {config.pruning_locations} must be strictly increasing")
        self.score_predictor = nn.ModuleList(PredictionModule(self.embed_dim) for _ in config.pruning_locations)
        self.keep_ratio = config.keep_ratio
        self.token_selector: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
        self.token_selector = select_tokens

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def keep_ratio(self) -> float:
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        keep_counts(value, self.num_patches, len(self.config.pruning_locations))  # validates
        self._keep_ratio = float(value)

    def stage_keep_counts(self) -> list[int]:
        """Patch tokens kept after each stage at the current keep ratio (all of them when dense)."""
        return keep_counts(self.keep_ratio, self.num_patches, len(self.config.pruning_locations))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> tokens [B, 1 + N, C] (CLS first, position embedding added)."""
        patches = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        return self.norm_pre(self.pos_drop(tokens))

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normed tokens [B, T, C] -> logits from the CLS token."""
        return self.head(self.head_drop(self.fc_norm(tokens[:, 0])))

    def forward_pruned(self, images: torch.Tensor, return_indices: bool = False):
        """Inference: keep the top-k patch tokens at every stage (keep ratio 1.0: the dense backbone).

        Returns logits [B, classes]; with ``return_indices`` also the kept patch positions of
        every stage, [B, k_stage] int64, mapped back to the original patch grid (row-major).
        """
        tokens = self.embed(images)
        dense = self.keep_ratio >= 1.0
        counts = iter(self.stage_keep_counts())
        stages = dict(zip(self.config.pruning_locations, self.score_predictor))
        positions = torch.arange(self.num_patches, device=tokens.device).expand(tokens.shape[0], -1)
        kept_positions = []
        for index, block in enumerate(self.blocks):
            if index in stages and not dense:
                keep_scores = stages[index](tokens[:, 1:])[..., 0]
                tokens, patch_indices = self.token_selector(tokens, keep_scores, next(counts))
                if return_indices:
                    positions = torch.gather(positions, 1, patch_indices.long())
                    kept_positions.append(positions)
            tokens = block(tokens)
        logits = self.classify(self.norm(tokens))
        return (logits, kept_positions) if return_indices else logits

    def forward_masked(self, images: torch.Tensor, decide: DecisionFn = gumbel_keep_decision) -> MaskedForwardOutput:
        """Training: all tokens stay; each stage's hard decision masks attention in the blocks after it."""
        tokens = self.embed(images)
        batch = tokens.shape[0]
        patch_decision = tokens.new_ones(batch, self.num_patches)
        cls_keep = tokens.new_ones(batch, 1)
        stages = dict(zip(self.config.pruning_locations, self.score_predictor))
        stage_decisions = []
        for index, block in enumerate(self.blocks):
            if index in stages:
                log_probs = stages[index](tokens[:, 1:], patch_decision)
                patch_decision = decide(log_probs, patch_decision, len(stage_decisions))
                stage_decisions.append(patch_decision)
            tokens = block_forward(block, tokens, torch.cat([cls_keep, patch_decision], dim=1))
        tokens = self.norm(tokens)
        return MaskedForwardOutput(self.classify(tokens), tokens[:, 1:], patch_decision.detach(), stage_decisions)

    def forward_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpruned backbone (the distillation teacher): logits and final normed patch tokens."""
        tokens = self.embed(images)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return self.classify(tokens), tokens[:, 1:]

    def forward(self, images: torch.Tensor):
        return self.forward_masked(images) if self.training else self.forward_pruned(images)


def backbone_name_for(name: str) -> str:
    """The timm backbone behind a registered variant name, or ``name`` itself when it is a timm model."""
    backbone_name = REGISTERED_VARIANTS.get(name, name)
    if backbone_name not in timm.list_models():
        raise UnknownModel(f"unknown model {name!r}: use one of {sorted(REGISTERED_VARIANTS)} or a timm ViT name")
    return backbone_name


def create_dynamicvit(
    name: str = "dynamicvit_deit_small",
    keep_ratio: float = 0.7,
    pruning_locations: tuple[int, ...] | None = None,
    **backbone_kwargs,
) -> DynamicViT:
    """Build a DynamicViT by registered variant name or by any timm ViT name (randomly initialised).

    backbone_kwargs go to ``timm.create_model`` (img_size, num_classes, drop_path_rate, embed_dim, ...).
    """
    backbone_name = backbone_name_for(name)
    backbone = timm.create_model(backbone_name, pretrained=False, **backbone_kwargs)
    locations = tuple(pruning_locations) if pruning_locations else default_pruning_locations(len(backbone.blocks))
    config = DynamicViTConfig(backbone_name, dict(backbone_kwargs), locations, keep_ratio)
    return DynamicViT(backbone, config)


def dynamicvit_from_config(config: DynamicViTConfig) -> DynamicViT:
    """Rebuild the model a checkpoint's config describes (weights are loaded separately)."""
    backbone = timm.create_model(backbone_name_for(config.backbone), pretrained=False, **config.backbone_kwargs)
    return DynamicViT(backbone, config)
