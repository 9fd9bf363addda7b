"""Token Compensator (ToCom): run a token-reduced ViT at a compression degree it was not trained at.

Paper: "Token Compensator: Altering Inference Cost of Vision Transformer without Re-Tuning",
Jie et al., ECCV 2024, https://arxiv.org/abs/2408.06798 (reference code: JieShibo/ToCom, on ToMe).

The compression degree is of one of two kinds, recorded in every plugin (a plugin never applies to a model of
the other kind): DynamicViT's keep ratio rho (``keep_ratio``; grid 1.0, 0.9, ..., 0.3) or ToMe's r, the tokens
merged per block (``tome_r``; grid 0..16, as in the paper). A model trained at degree m and deployed at n gets
ToCom(m -> n): low-rank deltas on the query and value projections of every attention block,

    q += s * U_q diag(c) D_q x        v += s * U_v diag(c) D_v x        (k, proj, MLP untouched)

with D: [R, C] (down, no bias), U: [C, R] (up, no bias, zero-initialised) and the rank channels
split into one slice of ``rank_per_step`` channels per unit step of an ordered grid of degrees.
With mask(d) = ones on the slices of the steps from the grid's start up to d, the coefficients of
m -> n are c = mask(n) - mask(m), so ToCom(n->m) = -ToCom(m->n), ToCom(m->m) = 0 and
ToCom(a->b) + ToCom(b->c) = ToCom(a->c).

Layout of this module:
- pure functions: the grid, the coefficients, one layer's weight delta, the merged qkv weight;
- ``TokenCompensator``: the plugin's parameters (one ``ToComLayer`` per block) and its active transition;
- glue: ``attach`` adds the deltas at run time through forward hooks on ``block.attn.qkv`` (the
  model's state-dict keys stay the standard ones), ``merge_plugin`` folds them into the qkv weights;
- plugin files (this project's safetensors format, the reference code's layout) and merging a file into a
  model, what the export stage calls: ``compress.models.tocom_files``.

Shapes: x [batch, tokens, C]; timm's qkv weight [3C, C] has rows [q | k | v].
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.models.tome import ToMeViT
from compress.plumbing.cli import parse_number_list
from compress.plumbing.errors import PipelineError

log = logging.getLogger(__name__)

KEEP_RATIO = "keep_ratio"  # DynamicViT's keep ratio rho
TOME_R = "tome_r"  # ToMe's tokens merged per block
DEGREE_KINDS = (KEEP_RATIO, TOME_R)
DEFAULT_GRID: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
TOME_GRID: tuple[int, ...] = tuple(range(17))  # the reference's ToMe degrees r = 0..16
DEFAULT_GRIDS = {KEEP_RATIO: DEFAULT_GRID, TOME_R: TOME_GRID}
DEGREE_NAMES = {KEEP_RATIO: "keep ratio", TOME_R: "ToMe r"}
DEFAULT_RANK_PER_STEP = 4  # 7 steps on the default grid -> R = 28 (reference: 16 steps x 2 = 32)
TRAINING_SCALE = 0.1  # s during training (reference)
SCALE_CANDIDATES: tuple[float, ...] = (0.05, 0.08, 0.1, 0.12, 0.15)  # the reference's evaluation sweep
DEFAULT_DROPOUT = 0.1
GRID_DECIMALS = 6  # keep ratios are compared after rounding: 1 - 3 * 0.1 is 0.7 here


class ToComError(PipelineError):
    """Base of ToCom errors a user can cause and fix."""


class OffGridKeepRatio(ToComError, ValueError):
    """A keep ratio that is not on the plugin's grid of keep ratios."""


class PluginMismatch(ToComError):
    """A plugin trained for another architecture (width, depth, heads) than the model's."""


class PluginKindMismatch(PluginMismatch):
    """A plugin for one kind of degree (keep ratio, ToMe r) offered to a model of the other kind."""


# ----------------------------------------------------------------------------- pure functions


def normalise_grid(grid: Sequence[float], kind: str = KEEP_RATIO) -> tuple[float, ...]:
    """The grid as rounded floats (keep ratios in (0, 1]) or ints (ToMe r >= 0); at least two, strictly monotonic."""
    if kind not in DEGREE_KINDS:
        raise ToComError(f"unknown ToCom degree kind {kind!r}: one of {', '.join(DEGREE_KINDS)}")
    if kind == TOME_R:
        if any(float(value) != int(value) or value < 0 for value in grid):
            raise ToComError(f"a ToMe r grid holds non-negative integers, got {list(grid)}")
        values = tuple(int(value) for value in grid)
    else:
        values = tuple(round(float(value), GRID_DECIMALS) for value in grid)
        if any(not 0.0 < value <= 1.0 for value in values):
            raise ToComError(f"ToCom grid keep ratios must lie in (0, 1], got {list(values)}")
    if len(values) < 2:
        raise ToComError(f"a ToCom grid needs at least two degrees, got {list(values)}")
    steps = [b - a for a, b in zip(values, values[1:])]
    if not (all(step > 0 for step in steps) or all(step < 0 for step in steps)):
        raise ToComError(f"a ToCom grid must be strictly increasing or strictly decreasing, got {list(values)}")
    return values


def parse_grid(text: str, kind: str = KEEP_RATIO) -> tuple[float, ...]:
    """'1.0,0.9,0.8' or '0,4,8,16' (commas or spaces) -> a normalised grid of ``kind``."""
    try:
        return normalise_grid(parse_number_list(text), kind)
    except ValueError:
        raise ToComError(f"expected degrees like '1.0,0.9,0.8' (keep ratios) or '0,8,16' (ToMe r), got {text!r}") from None


def grid_index(grid: Sequence[float], keep: float, what: str = "keep ratio") -> int:
    """Position of ``keep`` on the grid; OffGridKeepRatio listing the grid otherwise."""
    wanted = round(float(keep), GRID_DECIMALS)
    for index, value in enumerate(grid):
        if value == wanted:
            return index
    raise OffGridKeepRatio(
        f"{what} {keep} is not on the ToCom plugin's grid {list(grid)}: use one of those degrees "
        "(or train a plugin whose --grid includes it)"
    )


def plugin_rank(grid: Sequence[float], rank_per_step: int) -> int:
    """R: one slice of ``rank_per_step`` channels per unit step between neighbouring grid entries."""
    return rank_per_step * (len(grid) - 1)


def step_mask(grid: Sequence[float], rank_per_step: int, keep: float) -> torch.Tensor:
    """mask(keep) [R] float32: ones on the slices of the steps from the grid's start up to ``keep``."""
    mask = torch.zeros(plugin_rank(grid, rank_per_step))
    mask[: grid_index(grid, keep) * rank_per_step] = 1.0
    return mask


def compensation_coefficients(grid: Sequence[float], rank_per_step: int, source_keep: float, target_keep: float) -> torch.Tensor:
    """c [R] of ToCom(source -> target) = mask(target) - mask(source): +1 or -1 on the slices between them, else 0."""
    return step_mask(grid, rank_per_step, target_keep) - step_mask(grid, rank_per_step, source_keep)


def low_rank_delta(down: torch.Tensor, up: torch.Tensor, coefficients: torch.Tensor, scale: float) -> torch.Tensor:
    """One projection's weight delta s * U diag(c) D: down [R, C_in], up [C_out, R], c [R] -> [C_out, C_in]."""
    return scale * (up * coefficients.to(up.dtype)) @ down


def merged_qkv_weight(qkv_weight: torch.Tensor, delta_q: torch.Tensor, delta_v: torch.Tensor) -> torch.Tensor:
    """A new qkv weight [3C, C] with the deltas [C, C] added to the q and v rows; the k rows are the same tensor values.

    The sum is formed in float64 and rounded once to the weight's dtype.
    """
    width = qkv_weight.shape[1]
    if qkv_weight.shape[0] != 3 * width or delta_q.shape != (width, width) or delta_v.shape != (width, width):
        raise ValueError(f"qkv weight {tuple(qkv_weight.shape)} and deltas {tuple(delta_q.shape)}, "
                         f"{tuple(delta_v.shape)} do not fit [3C, C] and [C, C]")
    merged = qkv_weight.detach().clone()
    rows_q, rows_v = slice(0, width), slice(2 * width, 3 * width)
    merged[rows_q] = (qkv_weight[rows_q].double() + delta_q.double()).to(qkv_weight.dtype)
    merged[rows_v] = (qkv_weight[rows_v].double() + delta_v.double()).to(qkv_weight.dtype)
    return merged


def draw_transition(grid: Sequence[float], generator: torch.Generator | None = None) -> tuple[float, float]:
    """A pair (m, n) of grid keep ratios with m != n, uniform over the len * (len - 1) ordered pairs."""
    first = int(torch.randint(len(grid), (1,), generator=generator))
    second = int(torch.randint(len(grid) - 1, (1,), generator=generator))
    second += second >= first
    return grid[first], grid[second]


# ----------------------------------------------------------------------------- the plugin


class ToComLayer(nn.Module):
    """The deltas of one attention block: q and v, each a down [R, C] / up [C, R] pair (no biases)."""

    def __init__(self, embed_dim: int, rank: int):
        super().__init__()
        self.q_down = nn.Parameter(torch.empty(rank, embed_dim))
        self.q_up = nn.Parameter(torch.zeros(embed_dim, rank))
        self.v_down = nn.Parameter(torch.empty(rank, embed_dim))
        self.v_up = nn.Parameter(torch.zeros(embed_dim, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LoRA's initialisation: down like nn.Linear, up zero, so a fresh plugin changes nothing.
        for down in (self.q_down, self.v_down):
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        for up in (self.q_up, self.v_up):
            nn.init.zeros_(up)

    def weight_deltas(self, coefficients: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta of W_q, delta of W_v), each [C, C]."""
        return (low_rank_delta(self.q_down, self.q_up, coefficients, scale),
                low_rank_delta(self.v_down, self.v_up, coefficients, scale))


@dataclass(frozen=True)
class PluginInfo:
    """What a plugin was trained for: the model's architecture and a fingerprint of its weights."""

    architecture: dict = field(default_factory=dict)  # backbone, backbone_kwargs, embed_dim, depth, num_heads, ...
    backbone_fingerprint: str = ""
    extra: dict = field(default_factory=dict)  # training recipe, scale selection, provenance


class TokenCompensator(nn.Module):
    """ToCom for a depth-``depth``, width-``embed_dim`` ViT on a grid of degrees of one ``kind``.

    A transition (m, n, s) is made active with ``activate`` or ``compensating``; while one is
    active, an ``attach``-ed model adds the deltas of ToCom(m -> n) to q and v. The plugin's own
    ``train()`` / ``eval()`` switches the dropout on the R channels (the model can stay in eval mode).
    """

    def __init__(self, embed_dim: int, depth: int, grid: Sequence[float] = DEFAULT_GRID,
                 rank_per_step: int = DEFAULT_RANK_PER_STEP, default_scale: float = TRAINING_SCALE,
                 dropout: float = DEFAULT_DROPOUT, info: PluginInfo | None = None, kind: str = KEEP_RATIO):
        super().__init__()
        if rank_per_step < 1:
            raise ToComError(f"rank per step must be at least 1, got {rank_per_step}")
        check_scale(default_scale)
        self.kind = kind
        self.grid = normalise_grid(grid, kind)
        self.rank_per_step = int(rank_per_step)
        self.rank = plugin_rank(self.grid, self.rank_per_step)
        self.embed_dim, self.depth = int(embed_dim), int(depth)
        self.default_scale = float(default_scale)
        self.info = info or PluginInfo()
        self.layers = nn.ModuleList(ToComLayer(self.embed_dim, self.rank) for _ in range(self.depth))
        self.dropout = nn.Dropout(dropout)
        self._coefficients: torch.Tensor | None = None
        self._scale = 0.0

    def coefficients(self, source_keep: float, target_keep: float) -> torch.Tensor:
        """c [R] of ToCom(source -> target) on this plugin's grid."""
        return compensation_coefficients(self.grid, self.rank_per_step, source_keep, target_keep)

    def index_of(self, keep: float, what: str = "keep ratio") -> int:
        return grid_index(self.grid, keep, what)

    # -- the active transition (run-time glue)

    def activate(self, source_keep: float, target_keep: float, scale: float | None = None) -> None:
        """Make ToCom(source -> target) at ``scale`` (default: the plugin's) the active transition."""
        scale = self.default_scale if scale is None else check_scale(scale)
        coefficients = self.coefficients(source_keep, target_keep)
        self._coefficients = coefficients if bool(coefficients.any()) and scale != 0.0 else None
        self._scale = float(scale)

    def deactivate(self) -> None:
        self._coefficients = None

    @contextlib.contextmanager
    def compensating(self, source_keep: float, target_keep: float, scale: float | None = None) -> Iterator["TokenCompensator"]:
        self.activate(source_keep, target_keep, scale)
        try:
            yield self
        finally:
            self.deactivate()

    @property
    def active(self) -> bool:
        return self._coefficients is not None

    def qkv_output_delta(self, block_index: int, x: torch.Tensor) -> torch.Tensor | None:
        """What the active transition adds to block ``block_index``'s qkv output: x [B, T, C] -> [B, T, 3C] (None: nothing)."""
        if self._coefficients is None:
            return None
        layer = self.layers[block_index]
        channel_scale = (self._coefficients * self._scale).to(device=x.device, dtype=x.dtype)
        delta_q = F.linear(self.dropout(F.linear(x, layer.q_down.to(x.dtype))) * channel_scale, layer.q_up.to(x.dtype))
        delta_v = F.linear(self.dropout(F.linear(x, layer.v_down.to(x.dtype))) * channel_scale, layer.v_up.to(x.dtype))
        return torch.cat([delta_q, torch.zeros_like(delta_q), delta_v], dim=-1)

    def weight_deltas(self, source_keep: float, target_keep: float, scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the (W_q, W_v) deltas [C, C] of ToCom(source -> target) at ``scale``."""
        coefficients = self.coefficients(source_keep, target_keep)
        return [layer.weight_deltas(coefficients, scale) for layer in self.layers]

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, width={self.embed_dim}, depth={self.depth}, grid={list(self.grid)}, "
                f"rank_per_step={self.rank_per_step}, "
                f"rank={self.rank}, default_scale={self.default_scale}")


def check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale):
        raise ToComError(f"ToCom scale must be a finite number, got {scale}")
    return scale


# ----------------------------------------------------------------------------- models: description, fingerprint, glue


def model_architecture(model: nn.Module) -> dict:
    """What a plugin must match (embed_dim, depth, num_heads) and what it describes besides (backbone, patches, stages)."""
    config = getattr(model, "config", None)
    return {
        "backbone": getattr(config, "backbone", type(model).__name__),
        "backbone_kwargs": dict(getattr(config, "backbone_kwargs", {}) or {}),
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "num_patches": int(model.patch_embed.num_patches),
        "pruning_locations": list(getattr(config, "pruning_locations", ())),
    }


STRUCTURAL_KEYS = ("embed_dim", "depth", "num_heads")
DESCRIPTIVE_KEYS = ("backbone", "backbone_kwargs", "num_patches", "pruning_locations")


def backbone_fingerprint(model: nn.Module) -> str:
    """sha256 of every block's qkv weight (float32, C order, block order): the weights ToCom is added to."""
    digest = hashlib.sha256()
    for block in model.blocks:
        weight = block.attn.qkv.weight.detach().to("cpu", torch.float32).contiguous()
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def degree_kind(model: nn.Module) -> str:
    """The kind of compression degree a model runs at: ToMe r for a ``ToMeViT``, else DynamicViT's keep ratio."""
    return TOME_R if isinstance(model, ToMeViT) else KEEP_RATIO


def plugin_for_model(model: nn.Module, grid: Sequence[float] | None = None, rank_per_step: int = DEFAULT_RANK_PER_STEP,
                     default_scale: float = TRAINING_SCALE, dropout: float = DEFAULT_DROPOUT, extra: dict | None = None
                     ) -> TokenCompensator:
    """A fresh plugin (up weights zero) for ``model``, recording its architecture, weight fingerprint and degree
    kind; ``grid`` defaults to the kind's (keep ratios 1.0..0.3, or ToMe r 0..16)."""
    kind = degree_kind(model)
    info = PluginInfo(model_architecture(model), backbone_fingerprint(model), dict(extra or {}))
    plugin = TokenCompensator(model.embed_dim, len(model.blocks), DEFAULT_GRIDS[kind] if grid is None else grid,
                              rank_per_step, default_scale, dropout, info, kind)
    return plugin.to(next(model.parameters()).device)


def check_plugin_matches(plugin: TokenCompensator, model: nn.Module, source: str = "ToCom plugin") -> list[str]:
    """PluginMismatch when the plugin cannot apply to ``model``; otherwise the warnings (may be empty).

    Width, depth and head count must match. A different backbone description (name, image size,
    classes, pruning locations) or different weights (fingerprint) only warn: ToCom is meant to transfer.
    """
    if plugin.kind != degree_kind(model):
        raise PluginKindMismatch(
            f"{source} compensates {DEGREE_NAMES[plugin.kind]} changes but the model is a "
            f"{'ToMe' if degree_kind(model) == TOME_R else 'DynamicViT'} model, whose degree is its "
            f"{DEGREE_NAMES[degree_kind(model)]}: a plugin only applies to the kind of degree it was trained for")
    have = model_architecture(model)
    want = {**plugin.info.architecture, "embed_dim": plugin.embed_dim, "depth": plugin.depth}
    wrong = [key for key in STRUCTURAL_KEYS if key in want and want[key] != have[key]]
    if wrong:
        def describe(arch: dict) -> str:
            return f"{arch.get('backbone', '?')} (" + ", ".join(f"{key} {arch.get(key, '?')}" for key in STRUCTURAL_KEYS) + ")"
        raise PluginMismatch(f"{source} was trained for {describe(want)} but the model is {describe(have)}: "
                             f"a ToCom plugin only applies to the width, depth and head count it was trained for")
    warnings = []
    differing = [key for key in DESCRIPTIVE_KEYS if key in want and want[key] != have[key]]
    if differing:
        details = "; ".join(f"{key} {want[key]!r} vs model {have[key]!r}" for key in differing)
        warnings.append(f"{source} was trained on a differently described backbone ({details}): the keep-ratio grid "
                        "may mean other token counts")
    fingerprint = backbone_fingerprint(model)
    if plugin.info.backbone_fingerprint and plugin.info.backbone_fingerprint != fingerprint:
        warnings.append(f"{source} was trained on other backbone weights (qkv fingerprint "
                        f"{plugin.info.backbone_fingerprint[:12]} vs model {fingerprint[:12]}): ToCom is meant to "
                        "transfer, but check the accuracy")
    return warnings


class AttachedToCom:
    """Forward hooks adding a plugin's active transition to every block's qkv output; ``remove()`` detaches."""

    def __init__(self, model: nn.Module, plugin: TokenCompensator):
        self.model, self.plugin = model, plugin
        self._handles = [block.attn.qkv.register_forward_hook(partial(_add_compensation, plugin, index))
                         for index, block in enumerate(model.blocks)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "AttachedToCom":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _add_compensation(plugin: TokenCompensator, block_index: int, module: nn.Module, inputs: tuple, output: torch.Tensor):
    delta = plugin.qkv_output_delta(block_index, inputs[0])
    return output if delta is None else output + delta


def attach(model: nn.Module, plugin: TokenCompensator, source: str = "ToCom plugin") -> AttachedToCom:
    """Run-time glue: after checking the plugin fits, hook it into ``model`` (both the training and
    the inference forward call ``attn.qkv``). Hooks leave the model's state-dict keys unchanged."""
    for warning in check_plugin_matches(plugin, model, source):
        log.warning(warning)
    return AttachedToCom(model, plugin)


@torch.no_grad()
def merge_plugin(model: nn.Module, plugin: TokenCompensator, source_keep: float, target_keep: float, scale: float) -> None:
    """Fold ToCom(source -> target) at ``scale`` into every block's qkv weight, in place.

    W_q += s U_q diag(c) D_q and W_v += s U_v diag(c) D_v; biases, k rows and every other
    parameter are left bit-identical. A zero transition (source == target, or s == 0) changes nothing.
    """
    coefficients = plugin.coefficients(source_keep, target_keep)
    if not bool(coefficients.any()) or scale == 0.0:
        return
    for block, layer in zip(model.blocks, plugin.layers):
        weight = block.attn.qkv.weight
        # Deltas and sums in float64: each merged weight is rounded once, to its own dtype.
        c = coefficients.to(weight.device, torch.float64)
        delta_q = low_rank_delta(layer.q_down.to(weight.device, torch.float64), layer.q_up.to(weight.device, torch.float64), c, scale)
        delta_v = low_rank_delta(layer.v_down.to(weight.device, torch.float64), layer.v_up.to(weight.device, torch.float64), c, scale)
        weight.copy_(merged_qkv_weight(weight, delta_q, delta_v))
