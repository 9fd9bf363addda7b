"""Token Merging (ToMe) on timm ViT/DeiT models: fixed-count token merging between attention and MLP.

Paper: "Token Merging: Your ViT But Faster", Bolya et al., ICLR 2023, https://arxiv.org/abs/2210.09461.

Per block, after the attention and before the MLP, ``r_l = min(r, (t - 1) // 2)`` of the block's t tokens are
merged away (bipartite soft matching):

- metric: the attention keys averaged over heads, [B, t, head_dim], L2-normalised;
- split: A = even positions (CLS is A[0] and never merges), B = odd positions; cosine scores A . B^T, ranked
  through the distances of the unit vectors, 2 - 2 cos (``cosine_distances``: float32 keeps their order);
- each A token's best B match; the r_l A tokens with the highest best score merge into their matches;
- merge by size-weighted average: sum of x * size and of size per group, then divide; sizes add up;
- output order: the kept A tokens in their original order (CLS first), then every B token in order;
- proportional attention: log(size) is added to the attention logits of every key.

Tie rule (every backend follows it):
- best B match of an A token: among equal distances the LOWER B index (the first minimum: ``torch.min`` over a
  dimension returns the first minimal index; ONNX ArgMin with select_last_index 0);
- which A tokens merge: ascending best distance (descending best score), a stable order: among equal distances
  the LOWER A index ranks first (eager ``torch.sort(stable=True)``; exported, one ONNX TopK, whose specification
  puts the lower index first among equal values);
- the kept A tokens: ascending A index (the reference sorts them when there is a class token).

The method is a set of pure tensor functions (counts, matching, merge); ``ToMeViT`` is the thin glue that runs
them on the parts of a timm ``VisionTransformer``. No data-dependent control flow; the two sorts run as
``torch.sort`` in eager PyTorch and are traced as ``torch.topk`` while exporting (``torch.topk`` promises no tie
order, so it never decides an eager result). Exported per merging block: ReduceMin + ArgMin, two TopK, one
GatherElements for the matching; GatherND (batch_dims 1) for the rows, and a one-hot MatMul or one
ScatterElements (reduction "add") for the merge.
Shapes: [batch, tokens, channels].
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from compress.models.checkpoint import infer_config, read_checkpoint_file
from compress.models.complexity import block_macs
from compress.models.dynamicvit import (ADOPTED_BACKBONE_PARTS, DEIT_HEAD_DIM, FAMILY, PREDICTOR_PREFIX, DynamicViT,
                                 as_float32, attention_heads, attention_output, build_deit, check_backbone)
from compress.models.registry import DynamicViTConfig, UnknownModel, config_for
from compress.plumbing.errors import CheckpointError, PipelineError

TIE_RULE = ("best match: lower B index among equal scores; merged A tokens: descending best score, "
            "lower A index first among equal scores (stable; ONNX TopK rule); kept A tokens in ascending index order")
MERGE_FLAVOURS = ("onehot", "scatter")
REFERENCE_PREFIX = "module."  # DistributedDataParallel's prefix on saved keys


class ToMeError(PipelineError, ValueError):
    """A merge schedule the model cannot run (negative r, wrong length, more than the token count allows)."""


# ----------------------------------------------------------------------------- counts


def parse_r_schedule(r: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """r per block: an int (the same r in every block) or one int per block; each >= 0."""
    schedule = (r,) * depth if isinstance(r, int) else tuple(r)
    if len(schedule) != depth:
        raise ToMeError(f"a ToMe schedule needs one r per block ({depth}), got {len(schedule)}: {list(schedule)}")
    if any(isinstance(value, bool) or int(value) != value or value < 0 for value in schedule):
        raise ToMeError(f"ToMe r must be non-negative integers, got {list(schedule)}")
    return tuple(int(value) for value in schedule)


def merges_in_block(tokens: int, r: int) -> int:
    """r_l = min(r, (t - 1) // 2): at most half of the tokens besides CLS can merge (A minus CLS vs B)."""
    return max(0, min(r, (tokens - 1) // 2))


def token_counts(num_tokens: int, schedule: Sequence[int]) -> list[int]:
    """Tokens entering each block, then the tokens after the last: depth + 1 counts (CLS included).

    DeiT at 224 (197 tokens), r 16 in all 12 blocks: 197, 181, 165, ..., 37, 21, 11.
    """
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - merges_in_block(counts[-1], r))
    return counts


def check_schedule_merges(num_tokens: int, schedule: Sequence[int]) -> None:
    """ToMeError when an r exceeds what a sequence of ``num_tokens`` tokens can merge at all, (num_tokens - 1) // 2.

    Later blocks cap r to their own token count as the method defines (DeiT at r 16 merges 10 in its last block);
    an r that not even the first block can merge is a mistake, not a schedule.
    """
    most = (num_tokens - 1) // 2
    if any(r > most for r in schedule):
        raise ToMeError(f"r {max(schedule)} is more than a sequence of {num_tokens} tokens can merge per block "
                        f"(at most {most})")


# ----------------------------------------------------------------------------- pure functions


def exporting() -> bool:
    """True while ``torch.onnx.export`` traces the model: the sorts below are then written as ONNX TopK."""
    return torch.onnx.is_in_onnx_export()


def ascending_order(values: torch.Tensor) -> torch.Tensor:
    """values [B, n] -> indices [B, n] int64 of a stable ascending sort (equal values: the lower index first).

    Eager PyTorch: ``torch.sort(stable=True)``. Exported: one ONNX TopK (k = n, largest 0, sorted 1), whose
    specification breaks ties toward the lower index. ``torch.topk`` promises no tie order (CPU and CUDA differ),
    so it is only traced, never run for a result.
    """
    if exporting():
        return torch.topk(values, int(values.shape[1]), dim=1, largest=False, sorted=True).indices
    return torch.sort(values, dim=1, stable=True).indices


def ascending(index: torch.Tensor) -> torch.Tensor:
    """index [B, k] int64, distinct per row -> the same values in ascending order (exported: TopK values)."""
    if exporting():
        return torch.topk(index, int(index.shape[1]), dim=1, largest=False, sorted=True).values
    return torch.sort(index, dim=1).values


class Matching(NamedTuple):
    """The decisions of one bipartite soft matching of t tokens (A: even positions, B: odd positions).

    kept_a [B, nA - r]: A indices kept, ascending (CLS = A index 0 first); merged_a [B, r]: A indices merged, in
    rank order; merged_into [B, r]: the B index each merged A token goes into.
    """

    kept_a: torch.Tensor
    merged_a: torch.Tensor
    merged_into: torch.Tensor


def cosine_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unit vectors a [B, n, c], b [B, m, c] -> |a_i - b_j|^2 [B, n, m] = 2 - 2 cos(a_i, b_j).

    The same order as the cosine scores A . B^T (reversed), but formed from the differences: cosine scores of
    similar tokens crowd just below 1, where float32 resolves only 6e-8 and two backends' rounding reorders them;
    their distances keep full relative precision (e.g. 0.99987465 vs 0.99987453 as scores, 0.015832 vs 0.015843
    as distances, on the demo digits).
    """
    difference = a[:, :, None, :] - b[:, None, :, :]
    return (difference * difference).sum(-1)


# Added to the CLS token's closest distance: more than any distance of unit vectors (at most 4), so CLS sorts after
# every candidate and is never merged (the reference sets its cosine scores to -inf; a finite value suits engines).
CLS_PROTECTION = 8.0


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Matching:
    """metric [B, t, c] -> the r merges of ToMe's bipartite matching, CLS (token 0) protected.

    Scores in float32 (a float16 graph must decide what float32 PyTorch decides). r must be
    ``merges_in_block(t, r)`` already. Operators: the distances, ReduceMin + ArgMin for every A token's best B,
    one sort (TopK) of all A tokens by that distance, a sort of the nA - r kept indices, and one gather.
    """
    metric = as_float32(metric)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    closest, best_b = cosine_distances(a, b).min(dim=-1)  # [B, nA]; first minimum: the lower B index among ties
    protection = (torch.arange(int(a.shape[1]), device=metric.device) == 0) * CLS_PROTECTION  # made on the device
    order = ascending_order(closest + protection)  # the highest cosine score first; CLS last
    merged_a, rest = order.split([r, int(a.shape[1]) - r], dim=1)
    return Matching(ascending(rest), merged_a, torch.gather(best_b, 1, merged_a))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], index [B, k] -> x[b, index[b, i]] as [B, k, C]. Exported: Unsqueeze + GatherND (batch_dims 1)."""
    return RowGather.apply(x, index) if exporting() else gather_rows_eager(x, index)


def gather_rows_eager(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index[..., None].expand(*index.shape, x.shape[-1]))


class RowGather(torch.autograd.Function):
    """``gather_rows`` while exporting (no backward: eager PyTorch, training included, runs ``torch.gather``).
    ONNX: GatherND with batch_dims 1 on the index [B, k, 1] copies whole rows; GatherElements would need the index
    expanded to [B, k, C] first, which the exporter writes as an Expand behind four shape nodes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return gather_rows_eager(x, index)

    @staticmethod
    def symbolic(g, x, index):
        rows = g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([-1])))
        return g.op("GatherND", x, rows, batch_dims_i=1)


def add_rows_onehot(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """target [B, N, C] with rows [B, k, C] added at index [B, k] (repeats add up): a one-hot MatMul, no scatter."""
    one_hot = torch.arange(int(target.shape[1]), device=index.device)[:, None] == index[:, None, :]  # [B, N, k]
    return target + one_hot.to(rows.dtype) @ rows


def add_rows_scatter(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Same as ``add_rows_onehot`` with a scatter-add. Exported: Unsqueeze, Expand, ScatterElements (reduction
    "add", opset >= 16)."""
    if exporting():
        return RowScatterAdd.apply(target, index, rows, int(rows.shape[-1]))
    return add_rows_scatter_eager(target, index, rows)


def add_rows_scatter_eager(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return target.scatter_add(1, index[..., None].expand(*index.shape, rows.shape[-1]), rows)


class RowScatterAdd(torch.autograd.Function):
    """``add_rows_scatter`` while exporting. ONNX: the index [B, k, 1] expanded to the constant shape [1, 1, C]
    (broadcasting leaves the batch free; the exporter's own expand adds four shape nodes), then ScatterElements."""

    @staticmethod
    def forward(ctx, target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, channels: int) -> torch.Tensor:
        return add_rows_scatter_eager(target, index, rows)

    @staticmethod
    def symbolic(g, target, index, rows, channels: int):
        rows_index = g.op("Expand", g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([-1]))),
                          g.op("Constant", value_t=torch.tensor([1, 1, channels])))
        return g.op("ScatterElements", target, rows_index, rows, axis_i=1, reduction_s="add")


ROW_ADDERS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "onehot": add_rows_onehot, "scatter": add_rows_scatter,
}


def merge_weighted_average(x: torch.Tensor, size: torch.Tensor | None, matching: Matching, flavour: str = "scatter"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, t, C], size [B, t, 1] or None (all ones) -> merged x [B, t - r, C] in x's dtype and sizes
    [B, t - r, 1] float32.

    Each group's x is sum(x * size) / sum(size), formed in float32 (so a float16 graph averages in float32).
    """
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
        weighted = torch.cat([as_float32(x), size], dim=-1)  # x * 1 is x
    else:
        weighted = torch.cat([as_float32(x) * size, size], dim=-1)  # the sizes ride along as one more channel
    a, b = weighted[:, ::2], weighted[:, 1::2]
    b = ROW_ADDERS[flavour](b, matching.merged_into, gather_rows(a, matching.merged_a))
    merged = torch.cat([gather_rows(a, matching.kept_a), b], dim=1)
    sums, sizes = merged.split([int(x.shape[-1]), 1], dim=-1)
    averaged = sums / sizes
    return (averaged if x.dtype == torch.float32 else averaged.to(x.dtype)), sizes


def merge_decisions(matching: Matching, tokens: int) -> torch.Tensor:
    """The merges as one int64 [B, r] code per merged token, in rank order: source * tokens + destination, with
    both as positions in the block's sequence (A index i is position 2i, B index j is 2j + 1); unique per row."""
    return (2 * matching.merged_a) * tokens + (2 * matching.merged_into + 1)


def attention_with_keys(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ``Attention`` with proportional attention: x [B, t, C], size [B, t, 1] or None (all ones) ->
    (output [B, t, C], keys averaged over heads [B, t, head_dim]). The attention is the pattern TensorRT fuses
    (scale on Q, MatMul, additive mask, Softmax, MatMul) in the graph's precision; the log(size) mask is at most
    log(197) ~ 5.3, exact enough in float16."""
    q, k, v = attention_heads(attn, x)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log().to(logits.dtype)[:, None, None, :, 0]
    weights = logits.softmax(dim=-1)
    return attention_output(attn, weights, v, x), k.mean(dim=1)


# ----------------------------------------------------------------------------- the model


class TokenMerge(nn.Module):
    """One block's merge as a module (no parameters), so exported graphs name its nodes ``/token_merge/...``:
    INT8 quantisation leaves that scope in floating point (its scores decide which tokens merge)."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int, flavour: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, t, C], size [B, t, 1] or None (all ones), metric [B, t, c] -> x [B, t - r, C], size, codes [B, r]."""
        matching = bipartite_soft_matching(metric, r)
        merged, size = merge_weighted_average(x, size, matching, flavour)
        return merged, size, merge_decisions(matching, x.shape[1])


class ToMeViT(nn.Module):
    """ToMe over a timm ``VisionTransformer`` (or a DynamicViT, which holds the same parts): stateless.

    Modifications to the backbone (its modules are taken over under timm's names, so the state-dict keys are
    the standard ones and DeiT checkpoints load strictly):
    - attention with proportional attention and the mean key over heads as the merge metric;
    - ``r_schedule[l]`` merges after block l's attention (``merge_flavour`` chooses the row-adding op);
    - classification from the CLS token, which is never merged and stays first.
    """

    def __init__(self, backbone: nn.Module, r: int | Sequence[int] = 0, config: DynamicViTConfig | None = None):
        super().__init__()
        if isinstance(backbone, VisionTransformer):
            check_backbone(backbone)
        for name in ADOPTED_BACKBONE_PARTS:
            setattr(self, name, getattr(backbone, name))
        self.config = config or getattr(backbone, "config", None)
        self.embed_dim = int(backbone.embed_dim)
        self.num_classes = int(backbone.num_classes)
        self.num_patches = int(self.patch_embed.num_patches)
        self.data_config = getattr(backbone, "data_config", None)
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})  # image preprocessing reads it
        self.merge_flavour = "scatter"
        self.token_merge = TokenMerge()
        self.r_schedule = parse_r_schedule(r, len(self.blocks))

    @property
    def r_schedule(self) -> tuple[int, ...]:
        return self._r_schedule

    @r_schedule.setter
    def r_schedule(self, r: int | Sequence[int]) -> None:
        schedule = parse_r_schedule(r, len(self.blocks))
        check_schedule_merges(self.num_patches + 1, schedule)
        self._r_schedule = schedule

    # The same parts as the DeiT family's DynamicViT, embedded the same way: images [B, 3, H, W] -> [B, 1 + N, C].
    image_shape = DynamicViT.image_shape
    embed = DynamicViT.embed

    def token_counts(self, schedule: Sequence[int] | None = None) -> list[int]:
        """Tokens entering each block, then after the last (CLS included), at ``schedule`` (default: the model's)."""
        return token_counts(self.num_patches + 1, self.r_schedule if schedule is None else schedule)

    def forward_with_decisions(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """logits [B, classes] and, per block that merges, ``merge_decisions`` [B, r_l] int64."""
        x, size, decisions = self.embed(images), None, []
        for block, r in zip(self.blocks, self.r_schedule):
            attended, metric = attention_with_keys(block.attn, block.norm1(x), size)
            x = x + block.drop_path1(block.ls1(attended))
            r = merges_in_block(x.shape[1], r)
            if r > 0:
                x, size, codes = self.token_merge(x, size, metric, r, self.merge_flavour)
                decisions.append(codes)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        x = self.norm(x)
        return self.head(self.head_drop(self.fc_norm(x[:, 0]))), decisions

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_decisions(images)[0]

    def macs(self, schedule: Sequence[int] | None = None) -> int:
        """Analytic multiply-accumulates of one image at ``schedule`` (default: the model's; see ``tome_macs``)."""
        patch = self.patch_embed.proj
        stem = self.num_patches * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * self.embed_dim
        return tome_macs(self.token_counts(schedule), self.embed_dim, self.blocks[0].mlp.fc1.out_features,
                         self.blocks[0].attn.head_dim, stem, self.embed_dim * self.num_classes)


def tome_macs(counts: Sequence[int], embed_dim: int, mlp_hidden: int, head_dim: int, stem_macs: int, head_macs: int) -> int:
    """Matrix-product MACs of a ToMe ViT: block l's attention runs on counts[l] tokens, its MLP on counts[l + 1]
    (the merge sits between them), plus the matching scores (A minus CLS) x B x head_dim where a block merges.

    counts: ``token_counts`` (depth + 1 entries). Norms, softmax, gathers and the merge's additions are left out.
    """
    total = stem_macs + head_macs
    for before, after in zip(counts, counts[1:]):
        attention = block_macs(before, embed_dim, 0)
        mlp = block_macs(after, embed_dim, mlp_hidden) - block_macs(after, embed_dim, 0)
        scores = ((before + 1) // 2 - 1) * (before // 2) * head_dim if after < before else 0
        total += attention + mlp + scores
    return total


# ----------------------------------------------------------------------------- building from weights


def strip_prefix(weights: dict[str, torch.Tensor], prefix: str = REFERENCE_PREFIX) -> dict[str, torch.Tensor]:
    """Keys without a leading ``prefix`` when every key has it (weights saved from DistributedDataParallel)."""
    if weights and all(key.startswith(prefix) for key in weights):
        return {key[len(prefix):]: value for key, value in weights.items()}
    return weights


def build_tome(config: DynamicViTConfig, r: int | Sequence[int] = 0) -> ToMeViT:
    """A ToMe model with random weights on the timm ViT/DeiT backbone ``config`` describes."""
    if config.family != FAMILY:
        raise UnknownModel(f"ToMe runs on timm ViT/DeiT backbones, not on the {config.family!r} family")
    backbone = build_deit(replace(config, pruning_locations=(), keep_ratio=1.0))  # its prediction modules go unused
    return ToMeViT(backbone, r, replace(backbone.config, pruning_locations=()))


def tome_from_weights(weights: dict[str, torch.Tensor], r: int | Sequence[int] = 0, model_name: str | None = None,
                      config: DynamicViTConfig | None = None, source: str = "checkpoint") -> tuple[ToMeViT, list[str]]:
    """A ToMe model from a timm ViT/DeiT state dict (a DynamicViT's prediction modules are ignored), and notes.

    The architecture: ``config`` (a checkpoint's stored config), else ``model_name`` (a registered variant or a
    timm ViT name; image size and class count from the weights), else read from the weights.
    """
    weights = strip_prefix(dict(weights))
    notes = []
    predictors = [key for key in weights if key.startswith(PREDICTOR_PREFIX)]
    if predictors:
        notes.append(f"{source}: {len(predictors)} DynamicViT prediction-module tensors ignored (ToMe uses the backbone)")
        weights = {key: value for key, value in weights.items() if not key.startswith(PREDICTOR_PREFIX)}
    if config is None:
        inferred = infer_config(weights, source)
        if model_name:
            sizes = {k: v for k, v in inferred.backbone_kwargs.items() if k in ("img_size", "num_classes")}
            config = config_for(model_name, None, None, **sizes)
        else:
            config = inferred
            if "num_heads" in config.backbone_kwargs:
                notes.append(f"architecture read from weights; head count assumed width/{DEIT_HEAD_DIM} = "
                             f"{config.backbone_kwargs['num_heads']} (pass --model if that is wrong)")
    model = build_tome(config, r)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{source} does not match {config.backbone}: {reason}") from None
    return model, notes


def load_tome(path: str | os.PathLike, r: int | Sequence[int] = 0, model_name: str | None = None) -> tuple[ToMeViT, list[str]]:
    """A ToMe model (eval mode) from a checkpoint file: a timm/DeiT state dict, ``{'model': ...}`` (DeiT releases,
    ``module.`` prefix allowed), or this project's DynamicViT format (its stored config; predictors ignored)."""
    weights, rest = read_checkpoint_file(path)
    stored = rest.get("config")
    config = DynamicViTConfig.from_dict(stored) if isinstance(stored, dict) and not model_name else None
    model, notes = tome_from_weights(weights, r, model_name, config, str(path))
    return model.eval(), notes


def create_tome(model_name: str, r: int | Sequence[int] = 0, **overrides) -> ToMeViT:
    """A ToMe model with random weights: a registered variant or a timm ViT name (``--model`` without weights)."""
    return build_tome(config_for(model_name, None, None, **overrides), r).eval()
