"""Token Compensator plugin files: this project's format, the reference code's layout, and merging a file.

- This project's format: safetensors, tensors ``blocks.{i}.{q,v}.{down,up}`` (float32) and metadata (format name
  and version, degree kind, grid, rank per step, default scale, architecture, backbone fingerprint).
- The reference code's layout (JieShibo/ToCom, https://github.com/JieShibo/ToCom): ``torch.save``d
  ``{'model': {blocks.i.attn.q_tocom.adapter_down.weight, ...}}``; it loads directly (``load_reference_plugin``).
  The reference's mask of degree r has ones on the LAST R/16 * r rank channels, this project's on the first
  slices: loading reverses the order of the slices.
- ``merge_plugin_file`` / ``merge_tome_plugin_file``: read a file of either layout, check it fits the model and
  both degrees, fold ToCom(m -> n) into the qkv weights (``compress.models.tocom.merge_plugin``) and return the
  manifest entry: what the export stage calls.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from compress.models.checkpoint import atomic_write
from compress.models.tocom import (DEFAULT_DROPOUT, DEGREE_NAMES, KEEP_RATIO, TOME_GRID, TOME_R, TRAINING_SCALE,
                                   PluginInfo, ToComError, TokenCompensator, check_plugin_matches, check_scale,
                                   merge_plugin, normalise_grid)
from compress.models.tome import ToMeViT, check_schedule_merges, strip_prefix

log = logging.getLogger(__name__)

FORMAT_NAME = "tocom-plugin"
FORMAT_VERSION = 1
REFERENCE_STEPS = 16  # the reference splits its R rank channels into 16 slices, one per unit step of r
_HEADER_LIMIT = 100 * 1024 * 1024


class PluginFileError(ToComError):
    """A plugin file that is missing, unreadable, or not a ToCom plugin."""


def _tensor_names(index: int) -> dict[str, str]:
    return {attribute: f"blocks.{index}.{attribute.replace('_', '.')}" for attribute in ("q_down", "q_up", "v_down", "v_up")}


def plugin_metadata(plugin: TokenCompensator) -> dict[str, str]:
    """The safetensors metadata of a plugin file (every value a string; structured ones JSON)."""
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "degree_kind": plugin.kind,
        "grid": json.dumps(list(plugin.grid)),
        "rank_per_step": str(plugin.rank_per_step),
        "rank": str(plugin.rank),
        "default_scale": repr(plugin.default_scale),
        "dropout": repr(plugin.dropout.p),
        "architecture": json.dumps({**plugin.info.architecture, "embed_dim": plugin.embed_dim, "depth": plugin.depth},
                                   sort_keys=True),
        "backbone_fingerprint": plugin.info.backbone_fingerprint,
        "fingerprint_method": "sha256 of every blocks.i.attn.qkv.weight as float32 bytes, block order",
        "extra": json.dumps(plugin.info.extra, sort_keys=True, default=str),
    }


def save_plugin(plugin: TokenCompensator, path: str | os.PathLike) -> Path:
    """Write ``plugin`` as safetensors with its metadata, atomically (temporary file beside ``path``, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for index, layer in enumerate(plugin.layers):
        for attribute, name in _tensor_names(index).items():
            tensors[name] = getattr(layer, attribute).detach().to("cpu", torch.float32).contiguous()
    return atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=plugin_metadata(plugin)))


def _read_header_metadata(data: bytes, source: str) -> dict:
    """The ``__metadata__`` of a safetensors file: 8-byte little-endian header length, then a JSON header."""
    if len(data) < 8:
        raise PluginFileError(f"cannot read ToCom plugin {source}: file too short to be safetensors")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, _HEADER_LIMIT):
        raise PluginFileError(f"cannot read ToCom plugin {source}: not a safetensors file, or truncated")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PluginFileError(f"cannot read ToCom plugin {source}: corrupt safetensors header") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def load_plugin(path: str | os.PathLike) -> tuple[TokenCompensator, str]:
    """A plugin file -> (plugin in eval mode, sha256 of the file's bytes); PluginFileError with one clear reason."""
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise PluginFileError(f"ToCom plugin not found: {path}")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    metadata = _read_header_metadata(data, source)
    if metadata.get("format") != FORMAT_NAME:
        raise PluginFileError(f"{source} is not a ToCom plugin (its safetensors metadata has no format '{FORMAT_NAME}')")
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise PluginFileError(f"{source} is ToCom plugin format {metadata['format_version']}; this version reads "
                              f"up to {FORMAT_VERSION}")
    try:
        tensors = load_safetensors(data)
        kind = metadata.get("degree_kind", KEEP_RATIO)  # files written before ToMe support hold keep ratios
        grid = normalise_grid(json.loads(metadata["grid"]), kind)
        rank_per_step = int(metadata["rank_per_step"])
        architecture = json.loads(metadata["architecture"])
        embed_dim, depth = int(architecture["embed_dim"]), int(architecture["depth"])
        info = PluginInfo(architecture, metadata.get("backbone_fingerprint", ""), json.loads(metadata.get("extra", "{}")))
        plugin = TokenCompensator(embed_dim, depth, grid, rank_per_step, float(metadata["default_scale"]),
                                  float(metadata.get("dropout", DEFAULT_DROPOUT)), info, kind)
    except ToComError as exc:
        raise PluginFileError(f"corrupt ToCom plugin {source}: {exc}") from None
    except Exception as exc:  # safetensors / json / missing keys raise many types for a damaged file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise PluginFileError(f"cannot read ToCom plugin {source}: corrupt or truncated file ({reason})") from None
    expected = {name for index in range(depth) for name in _tensor_names(index).values()}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise PluginFileError(f"corrupt ToCom plugin {source}: tensors do not match its metadata "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for index, layer in enumerate(plugin.layers):
            for attribute, name in _tensor_names(index).items():
                parameter = getattr(layer, attribute)
                if tensors[name].shape != parameter.shape:
                    raise PluginFileError(f"corrupt ToCom plugin {source}: {name} is {tuple(tensors[name].shape)}, "
                                          f"metadata says {tuple(parameter.shape)}")
                parameter.copy_(tensors[name])
    return plugin.eval(), sha256


def _merge_checked(model: nn.Module, plugin: TokenCompensator, sha256: str, plugin_path, source_degree: float,
                   target_degree: float, scale: float | None) -> tuple[float, list[str]]:
    """Check ``plugin`` fits ``model`` and both degrees are on its grid, then merge; (scale used, warnings)."""
    source = f"ToCom plugin {plugin_path}"
    warnings = check_plugin_matches(plugin, model, source)
    name = DEGREE_NAMES[plugin.kind]
    plugin.index_of(source_degree, f"the model's training {name}")
    plugin.index_of(target_degree, f"the deploy {name}")
    scale = plugin.default_scale if scale is None else check_scale(scale)
    merge_plugin(model, plugin.to(next(model.parameters()).device), source_degree, target_degree, scale)
    for warning in warnings:
        log.warning(warning)
    return scale, warnings


def merge_plugin_file(model: nn.Module, plugin_path: str | os.PathLike, target_keep: float, scale: float | None = None) -> dict:
    """Merge ToCom(model.config.keep_ratio -> target_keep) from a plugin file into a DynamicViT's qkv weights, in place.

    The export stage's entry point. Checks the plugin fits the model (PluginKindMismatch for a ToMe plugin,
    PluginMismatch for another width/depth/head count; warnings for other backbone weights or description),
    checks both keep ratios are on the plugin's grid (OffGridKeepRatio), and returns the manifest entry
    {"plugin_sha256", "rho_train", "keep", "scale", "grid", "warnings"}. scale None: the plugin's default.
    """
    plugin, sha256 = read_plugin_file(plugin_path)
    rho_train = float(model.config.keep_ratio)
    scale, warnings = _merge_checked(model, plugin, sha256, plugin_path, rho_train, target_keep, scale)
    return {"plugin_sha256": sha256, "rho_train": rho_train, "keep": float(target_keep), "scale": scale,
            "grid": list(plugin.grid), "warnings": warnings}


def merge_tome_plugin_file(model: ToMeViT, plugin_path: str | os.PathLike, source_r: int, target_r: int | None = None,
                           scale: float | None = None) -> dict:
    """Merge ToCom(source_r -> target_r) from a plugin file (this project's, or a reference-layout ``.pth``) into a
    ToMe model's qkv weights, in place; ``target_r`` None: the model's r (its schedule must be one constant r).

    Refuses (one ToComError each): a keep-ratio plugin, another width or depth, an r off the plugin's grid, an r
    the model's token count cannot merge. Returns the manifest entry {"plugin_sha256", "plugin_layout",
    "r_train", "r", "scale", "grid", "warnings"}; scale None: the plugin's default (reference files: 0.1).
    """
    if target_r is None:
        if len(set(model.r_schedule)) != 1:
            raise ToComError(f"the model runs a per-block r schedule {list(model.r_schedule)}: ToCom compensates "
                             "one constant r, pass target_r")
        target_r = model.r_schedule[0]
    plugin, sha256 = read_plugin_file(plugin_path)
    for r in (source_r, target_r):
        check_schedule_merges(model.num_patches + 1, (int(r),))
    scale, warnings = _merge_checked(model, plugin, sha256, plugin_path, int(source_r), int(target_r), scale)
    return {"plugin_sha256": sha256, "plugin_layout": plugin.info.extra.get("layout", "vit-prune-deploy"),
            "r_train": int(source_r), "r": int(target_r), "scale": scale, "grid": list(plugin.grid),
            "warnings": warnings}


# ----------------------------------------------------------------------------- reference-layout files (JieShibo/ToCom)


REFERENCE_KEY = re.compile(r"blocks\.(\d+)\.attn\.([qv])_tocom\.adapter_(down|up)\.weight")


def reference_to_project_channels(rank: int, steps: int = REFERENCE_STEPS) -> torch.Tensor:
    """Index [R]: project rank channel i is the reference's channel ``index[i]``.

    The reference's mask of degree r has ones on its LAST R/steps * r channels, so the step r-1 -> r owns its
    channels [R - r p, R - (r - 1) p), p = R / steps; this project's mask has ones on the FIRST r slices, so step
    r-1 -> r owns [(r - 1) p, r p). Slices are reversed, channels within a slice keep their order.
    """
    per_step = rank // steps
    return torch.cat([torch.arange(rank - (step + 1) * per_step, rank - step * per_step) for step in range(steps)])


def load_reference_plugin(path: str | os.PathLike) -> tuple[TokenCompensator, str]:
    """A reference-layout ToCom file -> (plugin of kind ToMe r on grid 0..16, sha256 of the file's bytes).

    The file is ``torch.save``d ``{'model': {blocks.{i}.attn.{q,v}_tocom.adapter_{down,up}.weight}}`` (keys may
    carry ``module.``; other keys are ignored); down [R, C], up [C, R], R a multiple of 16; no metadata, so the
    default scale is the reference's training scale 0.1. Loaded on the CPU, tensors only (``weights_only``).
    """
    path = Path(path)
    if not path.is_file():
        raise PluginFileError(f"ToCom plugin not found: {path}")
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PluginFileError(f"cannot read ToCom plugin {path}: not a file saved by torch.save, or it holds objects "
                              "other than tensors and plain containers (refused: loading never runs pickled code)") from None
    except Exception as exc:  # zip / torch raise many types for a damaged file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise PluginFileError(f"cannot read ToCom plugin {path}: corrupt or truncated file ({reason})") from None
    weights = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(weights, dict):
        raise PluginFileError(f"{path} holds no state dict (expected {{'model': {{...}}}} with ToCom adapters)")
    weights = strip_prefix({key: value for key, value in weights.items() if isinstance(key, str)})
    found = {}
    for key, value in weights.items():
        match = REFERENCE_KEY.fullmatch(key)
        if match and isinstance(value, torch.Tensor):
            found[(int(match[1]), match[2], match[3])] = value
    if not found:
        raise PluginFileError(f"{path} holds no ToCom adapters (keys like blocks.0.attn.q_tocom.adapter_down.weight)")
    depth = 1 + max(block for block, _, _ in found)
    expected = [(block, projection, part) for block in range(depth) for projection in "qv" for part in ("down", "up")]
    missing = [f"blocks.{b}.attn.{p}_tocom.adapter_{d}.weight" for b, p, d in expected if (b, p, d) not in found]
    if missing:
        raise PluginFileError(f"corrupt ToCom plugin {path}: missing key {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    rank, width = found[(0, "q", "down")].shape if found[(0, "q", "down")].dim() == 2 else (0, 0)
    for (block, projection, part), tensor in found.items():
        shape = (rank, width) if part == "down" else (width, rank)
        if tuple(tensor.shape) != shape:
            raise PluginFileError(f"corrupt ToCom plugin {path}: blocks.{block}.attn.{projection}_tocom.adapter_{part}"
                                  f".weight is {tuple(tensor.shape)}, expected {shape}")
    if rank == 0 or rank % REFERENCE_STEPS:
        raise PluginFileError(f"ToCom plugin {path}: rank {rank} is not a positive multiple of {REFERENCE_STEPS}")
    info = PluginInfo({"embed_dim": width, "depth": depth}, "",
                      {"layout": "reference", "source_sha256": sha256, "source": path.name,
                       "channel_order": "reference slices reversed (its masks count from the last channel)"})
    plugin = TokenCompensator(width, depth, TOME_GRID, rank // REFERENCE_STEPS, TRAINING_SCALE, DEFAULT_DROPOUT, info, TOME_R)
    order = reference_to_project_channels(rank)
    with torch.no_grad():
        for block, layer in enumerate(plugin.layers):
            for projection in "qv":
                getattr(layer, f"{projection}_down").copy_(found[(block, projection, "down")].float()[order])
                getattr(layer, f"{projection}_up").copy_(found[(block, projection, "up")].float()[:, order])
    return plugin.eval(), sha256


def read_plugin_file(path: str | os.PathLike) -> tuple[TokenCompensator, str]:
    """This project's safetensors plugin or a reference-layout ``torch.save`` file (zip), told apart by content."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        return load_reference_plugin(path)
    return load_plugin(path)
