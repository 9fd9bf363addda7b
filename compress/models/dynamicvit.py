"""DynamicViT: token pruning with learned prediction modules, on timm ViT/DeiT backbones.

Paper: "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
Rao et al., NeurIPS 2021, https://arxiv.org/abs/2106.02034 (reference code: raoyongming/DynamicViT).

The model takes over the modules of a timm ``VisionTransformer`` (it does not fork timm's
blocks) and registers them under the reference implementation's names, so released
checkpoints load strictly. Tensor shapes in docstrings are [batch, tokens, channels].
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, NamedTuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from compress.models.complexity import VitShape
from compress.models.registry import (
    DEFAULT_KEEP_RATIO,
    DataConfig,
    DynamicViTConfig,
    Family,
    ModelSpec,
    UnknownModel,
    create_model,
    register_family,
    register_variant,
    unknown_model,
    variant,
    variants,
)
from compress.models.token_select import CLS_KEEP_SCORE, keep_counts, masked_attention_softmax, select_scored_tokens
from compress.plumbing.errors import CheckpointError

FAMILY = "deit"


def default_pruning_locations(depth: int, num_stages: int = 3) -> tuple[int, ...]:
    """Blocks before which the prediction modules run: depth 12 -> (3, 6, 9), 16 -> (4, 8, 12), 20 -> (5, 10, 15)."""
    step = depth // (num_stages + 1)
    if step < 1:
        raise ValueError(f"a depth-{depth} backbone is too shallow for {num_stages} pruning stages")
    return tuple(step * k for k in range(1, num_stages + 1))


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
            # A row whose tokens were all dropped (likely with few patches) gets a zero global feature, not 0/0 = NaN,
            # which would reach every parameter through the next backward pass.
            global_feature = (pooled * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1e-6)
        return self.out_conv(torch.cat([local, global_feature.expand_as(pooled)], dim=-1))

    def keep_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inference scores for top-k, with the fewest operations: tokens [B, 1 + N, C] (CLS first) -> [B, 1 + N, 1].

        Patch token i scores the margin l_keep - l_drop of the last linear layer's two outputs: the keep
        log-probability log_softmax(l)[0] = -softplus(l_drop - l_keep) is increasing in it, so both rank tokens
        alike and no log-softmax is computed. CLS scores +inf (always kept, first). The global half is averaged
        over the patch tokens (every patch token is still there at inference), and its share of ``out_conv.0``
        is computed once per image instead of being broadcast and concatenated to every token.
        """
        norm, linear, act = self.in_conv
        features = act(linear(norm(tokens)))  # CLS too: its features only feed its own (replaced) score
        half = features.shape[-1] // 2
        local, pooled = features[..., :half], features[:, 1:, half:].mean(dim=1, keepdim=True)
        first, act1, second, act2, last, _ = self.out_conv
        hidden = act1(local @ first.weight[:, :half].T + F.linear(pooled, first.weight[:, half:], first.bias))
        margin = act2(second(hidden)) @ (last.weight[0] - last.weight[1])[:, None]
        return margin + keep_score_offset(last.bias[0] - last.bias[1], tokens.shape[1])


def keep_score_offset(bias_margin: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens, 1]: +inf for CLS, the margin's bias for every patch token. Built from a constant and the
    parameters only, so the exported graph holds it as one folded constant (a single Add per stage)."""
    cls_first = torch.tensor([[CLS_KEEP_SCORE]] + [[0.0]] * (num_tokens - 1), dtype=bias_margin.dtype,
                             device=bias_margin.device)
    return cls_first + bias_margin


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


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, with no Cast node in the exported graph when it already is (``.float()`` always writes one)."""
    return x if x.dtype == torch.float32 else x.float()


def attention_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ``Attention``'s normed queries, keys and values: x [B, T, C] -> q, k, v [B, heads, T, head_dim]."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_output(attn: nn.Module, weights: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Attention weights [B, heads, T, T] applied to v [B, heads, T, head_dim], then the projection -> [B, T, C]."""
    out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    out = getattr(attn, "norm", nn.Identity())(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def attention_forward(attn: nn.Module, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``Attention`` as plain MatMul/Softmax: masked by ``decision`` [B, T] (training, float32) or plain.

    x: [B, T, C]. Used by the training forward (dropped tokens stay, attention masking) and by the
    export, which needs the attention as separate nodes in the pattern TensorRT fuses (timm's fused kernel
    exports otherwise).
    """
    q, k, v = attention_heads(attn, x)
    # The scale on Q before the first MatMul, then Softmax, then the second MatMul: the pattern TensorRT fuses
    # into one attention kernel. Under autocast (mixed-precision training) the softmax runs in float32.
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if decision is None:
        weights = logits.softmax(dim=-1)
    else:
        weights = masked_attention_softmax(logits, decision)
    return attention_output(attn, weights, v, x)


def block_forward(block: nn.Module, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``Block`` through ``attention_forward`` (with ``decision``: dropped tokens stay, masked)."""
    x = x + block.drop_path1(block.ls1(attention_forward(block.attn, block.norm1(x), decision)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class DynamicViTBase(nn.Module):
    """DynamicViT's method, independent of the backbone family.

    Modifications to a backbone (a family subclass provides the backbone's parts):
    - ``score_predictor``: one ``PredictionModule`` per stage, run before the blocks at ``pruning_locations``.
    - training (``forward_masked``): dropped tokens stay; hard Gumbel decisions, cumulative; attention masking.
    - inference (``forward_pruned``): top-k patch tokens per stage gathered behind CLS, plain attention;
      ``token_selector`` does the selection (the ONNX export passes its graph flavours).

    A family subclass sets ``blocks`` (a sequence of blocks), ``norm`` (the final norm), ``embed_dim``,
    ``num_classes`` and ``data_config`` (``embed_dim``, ``num_patches`` and the checks come from this
    ``__init__``), and implements:
    - ``embed(images [B, 3, H, W]) -> tokens [B, 1 + N, C]`` (CLS first, position embedding added);
    - ``run_block(block, x [B, T, C], decision [B, T] | None) -> [B, T, C]``: with a decision, attention
      masking (training); without, plain attention, through ``attention_forward`` when ``explicit_attention``
      is set (the export's MatMul/Softmax nodes) or the backbone's own fused path;
    - ``classify(tokens [B, T, C] final normed, patch_decision [B, T - 1] | None) -> logits [B, classes]``;
    - ``image_shape`` (C, H, W); ``cost_shape()`` for the analytic MACs.
    """

    def __init__(self, config: DynamicViTConfig, embed_dim: int, depth: int, num_patches: int):
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim
        self.num_patches = num_patches
        if not config.pruning_locations or any(not 0 < i < depth for i in config.pruning_locations):
            raise ValueError(f"pruning locations {config.pruning_locations} must lie in 1..{depth - 1}")
        if list(config.pruning_locations) != sorted(set(config.pruning_locations)):
            raise ValueError(f"pruning locations {config.pruning_locations} must be strictly increasing")
        self.score_predictor = nn.ModuleList(PredictionModule(embed_dim) for _ in config.pruning_locations)
        self.explicit_attention = False  # set by the export: attention as plain MatMul/Softmax nodes
        self.keep_ratio = config.keep_ratio
        # (tokens [B, T, C], keep_scores [B, T, 1], k) -> (CLS + k best tokens [B, 1 + k, C], their indices [B, 1 + k, 1])
        self.token_selector: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
        self.token_selector = select_scored_tokens

    @property
    def keep_ratio(self) -> float:
        """The keep ratio ``forward_pruned`` runs at when none is passed (the training keep ratio unless set)."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self.stage_keep_counts(value)  # validates
        self._keep_ratio = float(value)

    @property
    def num_stages(self) -> int:
        return len(self.config.pruning_locations)

    def stage_keep_counts(self, keep_ratio: float | None = None) -> list[int]:
        """Patch tokens kept after each stage; [] for keep ratio 1.0 (the dense model has no pruning stage)."""
        return keep_counts(self.keep_ratio if keep_ratio is None else keep_ratio, self.num_patches, self.num_stages)

    def forward_pruned(self, images: torch.Tensor, return_indices: bool = False, keep_ratio: float | None = None):
        """Inference: keep the top-k patch tokens at every stage (keep ratio 1.0: the dense backbone).

        Returns logits [B, classes]; with ``return_indices`` also the kept patch positions of
        every stage, [B, k_stage] int64, mapped back to the original patch grid (row-major).
        """
        tokens = self.embed(images)
        counts = self.stage_keep_counts(keep_ratio)
        stages = dict(zip(self.config.pruning_locations, zip(self.score_predictor, counts)))
        # Token positions on the original sequence (0 = CLS): bookkeeping for the debug outputs only.
        positions = torch.arange(1 + self.num_patches, device=tokens.device).expand(tokens.shape[0], -1)
        kept_positions = []
        for index, block in enumerate(self.blocks):
            if index in stages:
                predictor, count = stages[index]
                tokens, token_indices = self.token_selector(tokens, predictor.keep_scores(tokens), count)
                if return_indices:
                    positions = torch.gather(positions, 1, token_indices[..., 0])
                    kept_positions.append(positions[:, 1:] - 1)
            tokens = self.run_block(block, tokens)
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
            tokens = self.run_block(block, tokens, torch.cat([cls_keep, patch_decision], dim=1))
        tokens = self.norm(tokens)
        logits = self.classify(tokens, patch_decision)
        return MaskedForwardOutput(logits, tokens[:, 1:], patch_decision.detach(), stage_decisions)

    def forward_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpruned backbone (the distillation teacher): logits and final normed patch tokens."""
        tokens = self.embed(images)
        for block in self.blocks:
            tokens = self.run_block(block, tokens)
        tokens = self.norm(tokens)
        return self.classify(tokens), tokens[:, 1:]

    def forward(self, images: torch.Tensor):
        return self.forward_masked(images) if self.training else self.forward_pruned(images)


def check_backbone(backbone: nn.Module) -> None:
    """Refuse timm models that DynamicViT's CLS-token pruning cannot run on."""
    if not isinstance(backbone, VisionTransformer):
        raise UnknownModel(f"DynamicViT needs a ViT with a CLS token, got a {type(backbone).__name__}")
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
        raise UnknownModel("unsupported backbone for DynamicViT: " + "; ".join(problems))


class DynamicViT(DynamicViTBase):
    """DynamicViT over a timm ``VisionTransformer`` (the DeiT family).

    Takes over the backbone's modules under timm's (and the reference's) names, so the state-dict keys
    are the standard ones and released checkpoints load strictly.
    """

    def __init__(self, backbone: VisionTransformer, config: DynamicViTConfig):
        check_backbone(backbone)
        if not config.pruning_locations:  # a timm name without a spec: DeiT's spacing for its depth
            config = replace(config, pruning_locations=default_pruning_locations(len(backbone.blocks)))
        super().__init__(config, backbone.embed_dim, len(backbone.blocks), backbone.patch_embed.num_patches)
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        self.num_classes = backbone.num_classes
        for name in ADOPTED_BACKBONE_PARTS:
            setattr(self, name, getattr(backbone, name))
        mean, std = self.pretrained_cfg.get("mean"), self.pretrained_cfg.get("std")
        self.data_config = DataConfig(self.image_shape, *((tuple(mean), tuple(std)) if mean and std else ()),
                                      num_classes=self.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.patch_embed.proj.in_channels, *self.patch_embed.img_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> tokens [B, 1 + N, C] (CLS first, position embedding added)."""
        patches = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        return self.norm_pre(self.pos_drop(tokens))

    def run_block(self, block: nn.Module, x: torch.Tensor, decision: torch.Tensor | None = None) -> torch.Tensor:
        if decision is None and not self.explicit_attention:
            return block(x)
        return block_forward(block, x, decision)

    def classify(self, tokens: torch.Tensor, patch_decision: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed tokens [B, T, C] -> logits from the CLS token."""
        return self.head(self.head_drop(self.fc_norm(tokens[:, 0])))

    def cost_shape(self) -> VitShape:
        patch = self.patch_embed.proj
        return VitShape(
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            mlp_hidden=self.blocks[0].mlp.fc1.out_features,
            num_patches=self.num_patches,
            pruning_locations=tuple(self.config.pruning_locations),
            stem_macs=self.num_patches * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * self.embed_dim,
            head_macs=self.embed_dim * self.num_classes,
        )


# --- the DeiT family in the registry -------------------------------------------------------------------------


def _deit_spec(name: str, backbone: str, embed_dim: int, num_heads: int, description: str,
               overrides: dict | None = None) -> ModelSpec:
    arch = {"embed_dim": embed_dim, "depth": 12, "num_heads": num_heads, "patch_size": 16, "mlp_hidden": 4 * embed_dim,
            "img_size": 224, "in_chans": 3}
    return ModelSpec(name, FAMILY, backbone, arch, default_pruning_locations(12), overrides or {},
                     description=description)


DEIT_VARIANTS = (
    _deit_spec("dynamicvit_deit_tiny", "deit_tiny_patch16_224", 192, 3, "DeiT-Ti"),
    # DeiT-256 is DeiT-Ti's recipe at width 256 (the reference's model zoo): width and heads are overrides.
    _deit_spec("dynamicvit_deit_256", "deit_tiny_patch16_224", 256, 4, "DeiT-256",
               {"embed_dim": 256, "num_heads": 4}),
    _deit_spec("dynamicvit_deit_small", "deit_small_patch16_224", 384, 6, "DeiT-S"),
    _deit_spec("dynamicvit_deit_base", "deit_base_patch16_224", 768, 12, "DeiT-B"),
)
# The built-in demo architecture: a small ViT on 64x64 images, 8x8 patches (64 patch tokens), depth 6, width 64,
# prediction modules before blocks 1, 3, 5 (evenly spread, as 3/6/9 in depth 12); trained on scikit-learn's digits.
DEMO_VARIANT = ModelSpec(
    "demo-vit", FAMILY, "vit_small_patch16_224",
    {"embed_dim": 64, "depth": 6, "num_heads": 2, "patch_size": 8, "mlp_hidden": 256, "img_size": 64, "in_chans": 3},
    (1, 3, 5),
    {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 6, "num_heads": 2, "num_classes": 10},
    data=DataConfig((3, 64, 64), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 10),
    description="the demo ViT (64 px, digits)",
)
DEIT_HEAD_DIM = 64  # DeiT's rule (tiny 192/3, small 384/6, base 768/12): weights do not record the head count
PREDICTOR_PREFIX = "score_predictor."


def timm_backbone_name(name: str) -> str:
    """The timm backbone behind ``name`` (a registered variant or a timm model name)."""
    spec = variant(name)
    if spec is not None and spec.family == FAMILY:
        return spec.backbone
    if name not in timm.list_models():
        raise unknown_model(name)
    return name


def build_deit(config: DynamicViTConfig) -> DynamicViT:
    """Build a DynamicViT over the timm backbone the config names (random weights)."""
    try:
        backbone = timm.create_model(timm_backbone_name(config.backbone), pretrained=False, **config.backbone_kwargs)
    except (TypeError, AssertionError, RuntimeError) as exc:
        raise UnknownModel(f"cannot build {config.backbone} with {config.backbone_kwargs}: {exc}") from None
    if not isinstance(backbone, VisionTransformer):
        raise unknown_model(f"{config.backbone} (a {type(backbone).__name__}, not a ViT)")
    return DynamicViT(backbone, config)


def is_timm_model(name: str) -> bool:
    return name in timm.list_models()


def owns_deit(weights: dict) -> bool:
    return "patch_embed.proj.weight" in weights and "patch_embed.conv1.weight" not in weights


def _shape(weights: dict, key: str, source: str) -> tuple[int, ...]:
    if key not in weights:
        raise CheckpointError(f"{source} is not a ViT checkpoint: key '{key}' is missing")
    return tuple(weights[key].shape)


def weights_arch(weights: dict, source: str) -> dict:
    """The architecture numbers a timm-ViT state dict records (the head count is not among them)."""
    embed_dim, in_chans, patch, _ = _shape(weights, "patch_embed.proj.weight", source)
    pos_tokens = _shape(weights, "pos_embed", source)[1]
    grid = math.isqrt(pos_tokens - 1)
    if grid * grid != pos_tokens - 1:
        raise CheckpointError(f"{source}: position embedding of {pos_tokens} tokens is not CLS + a square grid")
    depth = 1 + max((int(k.split(".")[1]) for k in weights if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source} is not a ViT checkpoint: it has no 'blocks.*' keys")
    return {"embed_dim": embed_dim, "depth": depth, "patch_size": patch, "in_chans": in_chans,
            "mlp_hidden": _shape(weights, "blocks.0.mlp.fc1.weight", source)[0], "img_size": grid * patch}


def infer_deit_config(weights: dict, source: str = "checkpoint") -> DynamicViTConfig:
    """The config a timm-ViT state dict describes: a registered variant when its numbers match one, else a
    generic timm ViT with DeiT's head rule (width / 64 heads; reported by the loader)."""
    arch = weights_arch(weights, source)
    num_stages = len({k.split(".")[1] for k in weights if k.startswith(PREDICTOR_PREFIX)}) or 3
    num_classes = _shape(weights, "head.weight", source)[0] if "head.weight" in weights else 0
    qkv_bias = "blocks.0.attn.qkv.bias" in weights
    for spec in variants(FAMILY):
        if qkv_bias and all(spec.arch[k] == arch[k] for k in ("embed_dim", "depth", "patch_size", "mlp_hidden", "in_chans")):
            sizes = {k: v for k, v in (("img_size", arch["img_size"]), ("num_classes", num_classes))
                     if spec.backbone_kwargs.get(k, spec.arch.get(k, 1000)) != v}
            return spec.config(DEFAULT_KEEP_RATIO, default_pruning_locations(arch["depth"], num_stages), **sizes)
    kwargs = {
        "img_size": arch["img_size"], "num_classes": num_classes, "embed_dim": arch["embed_dim"], "depth": arch["depth"],
        "num_heads": max(1, arch["embed_dim"] // DEIT_HEAD_DIM), "patch_size": arch["patch_size"],
        "in_chans": arch["in_chans"], "mlp_ratio": arch["mlp_hidden"] / arch["embed_dim"], "qkv_bias": qkv_bias,
    }
    return DynamicViTConfig("vit_base_patch16_224", kwargs, default_pruning_locations(arch["depth"], num_stages),
                            DEFAULT_KEEP_RATIO, FAMILY)


register_family(Family(FAMILY, build_deit, owns_deit, infer_deit_config,
                       "timm ViT/DeiT models with a CLS token (any timm VisionTransformer name)", is_timm_model))
for _spec in (*DEIT_VARIANTS, DEMO_VARIANT):
    register_variant(_spec)


def create_dynamicvit(name: str = "dynamicvit_deit_small", keep_ratio: float | None = None,
                      pruning_locations: tuple[int, ...] | None = None, **backbone_kwargs) -> DynamicViTBase:
    """``compress.models.registry.create_model`` (kept under its first name: any registered variant or timm ViT name)."""
    return create_model(name, keep_ratio, pruning_locations, **backbone_kwargs)

