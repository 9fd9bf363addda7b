"""ToCom for ToMe: reference-layout plugin files (JieShibo/ToCom), their conversion, merging for (r_src -> r_tgt)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tome import TINY, images_from_bytes, seeded_tome

from compress import create_dynamicvit

from compress.models import tocom, tocom_files, tome

from compress.plumbing.cli import run_cli
from compress.tocom_import import main as import_main
from export.on_target.compare import onnxruntime_session, session_runner
from export.tome_export import ToMeExport

TOCOM_GOLDEN = Path(__file__).parent / "data" / "tome_tocom_reference.npz"
TOCOM_SEED = 1515
TOCOM_RANK = 32  # the reference's default: 16 grid steps x tocom_dim 2
TOCOM_SCALE = 0.1
TOCOM_PAIRS = ((0, 8), (8, 0), (4, 13), (13, 4), (16, 3), (3, 16))  # (r the model was trained at, r it runs at)


def reference_layout_tocom(seed: int, depth: int, width: int, rank: int) -> dict[str, torch.Tensor]:
    """A synthetic, non-zero plugin in the reference's layout, rebuilt from ``seed``.

    Rule: numpy ``Generator(PCG64(seed))``; for block i = 0..depth-1, for q then v: ``adapter_down.weight``
    [rank, width] = standard_normal * 0.05, then ``adapter_up.weight`` [width, rank] = standard_normal * 0.5
    (float32 draws).
    """
    generator = np.random.Generator(np.random.PCG64(seed))
    weights = {}
    for block in range(depth):
        for projection in ("q", "v"):
            prefix = f"blocks.{block}.attn.{projection}_tocom."
            down = generator.standard_normal((rank, width), dtype=np.float32) * np.float32(0.05)
            up = generator.standard_normal((width, rank), dtype=np.float32) * np.float32(0.5)
            weights[prefix + "adapter_down.weight"] = torch.from_numpy(down)
            weights[prefix + "adapter_up.weight"] = torch.from_numpy(up)
    return weights


def save_reference_file(path, weights, prefix="module."):
    """As the reference saves it: ``{'model': ...}``, here with DistributedDataParallel's prefix."""
    torch.save({"model": {prefix + key: value for key, value in weights.items()}}, path)
    return path


def reference_mask(rank: int, r: int) -> torch.Tensor:
    """The reference's mask of degree r: ones on the LAST rank / 16 * r channels."""
    ones = rank // 16 * r
    return torch.cat([torch.zeros(rank - ones), torch.ones(ones)])


class ReferenceRuntimeDelta:
    """The reference's run-time ToCom written from its formula, as forward hooks on every block's qkv:
    q += s * up_q(down_q(x) * (mask(r_tgt) - mask(r_src))), the same for v (k untouched)."""

    def __init__(self, model, weights, r_src, r_tgt, scale):
        self.handles = []
        for index, block in enumerate(model.blocks):
            prefix = f"blocks.{index}.attn."
            adapters = {p: (weights[prefix + f"{p}_tocom.adapter_down.weight"], weights[prefix + f"{p}_tocom.adapter_up.weight"])
                        for p in "qv"}

            def hook(module, inputs, output, adapters=adapters):
                x = inputs[0]
                rank = adapters["q"][0].shape[0]
                c = reference_mask(rank, r_tgt) - reference_mask(rank, r_src)
                q = scale * ((x @ adapters["q"][0].T) * c) @ adapters["q"][1].T
                v = scale * ((x @ adapters["v"][0].T) * c) @ adapters["v"][1].T
                return output + torch.cat([q, torch.zeros_like(q), v], dim=-1)

            self.handles.append(block.attn.qkv.register_forward_hook(hook))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def tiny_tome(r=0, **overrides):
    torch.manual_seed(3)
    return tome.create_tome("vit_small_patch16_224", r, **{**TINY, **overrides})


# ----------------------------------------------------------------------------- the mapping


def test_channel_mapping_turns_reference_masks_into_project_masks():
    for rank in (16, 32, 64):
        order = tocom_files.reference_to_project_channels(rank)
        assert sorted(order.tolist()) == list(range(rank))
        for r in tocom.TOME_GRID:
            project = tocom.step_mask(tocom.TOME_GRID, rank // 16, r)
            assert torch.equal(reference_mask(rank, r)[order], project)


@pytest.mark.parametrize("r_src,r_tgt", [(0, 8), (8, 0), (4, 13), (13, 4), (16, 3), (5, 5)])
def test_merged_reference_file_equals_the_reference_runtime_delta(tmp_path, r_src, r_tgt):
    """Merged for (r_src -> r_tgt) into the weights == the reference's formula added at run time, both directions."""
    weights = reference_layout_tocom(TOCOM_SEED, 4, 32, TOCOM_RANK)
    path = save_reference_file(tmp_path / "ref.pth", weights)
    model = tiny_tome(r_tgt)
    images = torch.randn(3, 3, 64, 64)
    runtime = ReferenceRuntimeDelta(model, weights, r_src, r_tgt, TOCOM_SCALE)
    with torch.no_grad():
        expected = model(images)
    runtime.remove()
    with torch.no_grad():
        plain = model(images)
    entry = tocom_files.merge_tome_plugin_file(model, path, r_src, scale=TOCOM_SCALE)
    with torch.no_grad():
        merged = model(images)
    assert entry["r_train"] == r_src and entry["r"] == r_tgt and entry["plugin_layout"] == "reference"
    assert (merged - expected).abs().max() <= 1e-5
    if r_src != r_tgt:
        assert (plain - expected).abs().max() > 1e-2  # the delta is visible: the comparison can fail


def test_merged_reference_file_through_onnx(tmp_path):
    weights = reference_layout_tocom(TOCOM_SEED, 4, 32, TOCOM_RANK)
    path = save_reference_file(tmp_path / "ref.pth", weights, prefix="")
    model = tiny_tome(12)
    images = torch.randn(2, 3, 64, 64)
    runtime = ReferenceRuntimeDelta(model, weights, 2, 12, 0.15)
    with torch.no_grad():
        expected = model(images).numpy()
    runtime.remove()
    tocom_files.merge_tome_plugin_file(model, path, 2, 12, scale=0.15)
    method = ToMeExport(12)
    proto = method.export_onnx(method.deploy_copy(model, "fp32"), "onehot", 2, False, 17, False)
    logits = session_runner(onnxruntime_session(proto))(images.numpy())[0]
    assert np.abs(logits - expected).max() <= 1e-4


def test_import_cli_writes_a_plugin_that_merges_identically(tmp_path, capsys):
    weights = reference_layout_tocom(TOCOM_SEED, 4, 32, TOCOM_RANK)
    reference = save_reference_file(tmp_path / "ref.pth", weights)
    out = tmp_path / "plugin.safetensors"
    assert run_cli(import_main, [str(reference), "-o", str(out), "--scale", "0.12"]) == 0
    plugin, _ = tocom_files.load_plugin(out)
    assert plugin.kind == tocom.TOME_R and plugin.grid == tocom.TOME_GRID and plugin.rank == 32
    assert plugin.default_scale == 0.12 and plugin.info.extra["layout"] == "reference"
    direct, converted = tiny_tome(8), tiny_tome(8)
    tocom_files.merge_tome_plugin_file(direct, reference, 3, scale=0.12)
    entry = tocom_files.merge_tome_plugin_file(converted, out, 3)
    assert entry["scale"] == 0.12
    for a, b in zip(direct.state_dict().values(), converted.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input


def run_import(tmp_path, reference, capsys):
    out = tmp_path / "out.safetensors"
    code = run_cli(import_main, [str(reference), "-o", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("error: ")
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))  # nothing written, no leftovers
    return error[0]


def test_bad_reference_files_give_one_error_and_write_nothing(tmp_path, capsys):
    weights = reference_layout_tocom(TOCOM_SEED, 2, 32, TOCOM_RANK)
    missing = dict(weights)
    del missing["blocks.1.attn.v_tocom.adapter_up.weight"]
    assert "missing key blocks.1.attn.v_tocom.adapter_up.weight" in run_import(
        tmp_path, save_reference_file(tmp_path / "missing.pth", missing), capsys)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 50)
    assert "cannot read" in run_import(tmp_path, garbage, capsys)
    complete = save_reference_file(tmp_path / "complete.pth", weights).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(complete[: len(complete) // 2])
    assert "cannot read" in run_import(tmp_path, truncated, capsys)
    odd_rank = reference_layout_tocom(TOCOM_SEED, 2, 32, 24)
    assert "multiple of 16" in run_import(tmp_path, save_reference_file(tmp_path / "odd.pth", odd_rank), capsys)
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "none.pth")
    assert "no ToCom adapters" in run_import(tmp_path, tmp_path / "none.pth", capsys)
    assert "not found" in run_import(tmp_path, tmp_path / "absent.pth", capsys)


def test_merge_refuses_wrong_kind_width_depth_and_r(tmp_path):
    path = save_reference_file(tmp_path / "ref.pth", reference_layout_tocom(TOCOM_SEED, 4, 32, TOCOM_RANK))
    dynamicvit = create_dynamicvit("vit_small_patch16_224", 0.7, None, **TINY).eval()
    with pytest.raises(tocom.PluginKindMismatch, match="ToMe r"):
        tocom_files.merge_plugin_file(dynamicvit, path, 0.5)
    keep_plugin = tocom.plugin_for_model(dynamicvit)
    keep_path = tocom_files.save_plugin(keep_plugin, tmp_path / "keep.safetensors")
    with pytest.raises(tocom.PluginKindMismatch, match="keep ratio"):
        tocom_files.merge_tome_plugin_file(tiny_tome(8), keep_path, 0)
    with pytest.raises(tocom.PluginMismatch, match="embed_dim 32"):
        tocom_files.merge_tome_plugin_file(tiny_tome(8, embed_dim=48, num_heads=3), path, 0)
    with pytest.raises(tocom.PluginMismatch, match="depth 4"):
        tocom_files.merge_tome_plugin_file(tiny_tome(8, depth=5), path, 0)
    with pytest.raises(tome.ToMeError, match="at most 8"):  # 17 tokens merge at most 8 per block
        tocom_files.merge_tome_plugin_file(tiny_tome(0, img_size=32), path, 12, 0)
    with pytest.raises(tocom.OffGridKeepRatio, match="training ToMe r 20"):
        tocom_files.merge_tome_plugin_file(tiny_tome(8), path, 20)
    untouched = tiny_tome(8)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(tocom.ToComError):
        tocom_files.merge_tome_plugin_file(untouched, path, 17)
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())  # a refused merge changes nothing


# ----------------------------------------------------------------------------- parity with the reference ToCom code


@pytest.mark.slow
def test_parity_with_the_reference_tocom_on_deit_b(tmp_path):
    """The reference ToCom code (JieShibo/ToCom, run-time adapters on ToMe with proportional attention) ran once on
    the seeded DeiT-B of test_tome and the seeded reference-layout file (see docs/tocom.md); merging the same file
    for (r_src -> r_tgt) must give its logits within 1e-4 for every pair, in both directions."""
    golden = np.load(TOCOM_GOLDEN)
    images = images_from_bytes(np.load(Path(__file__).parent / "data" / "tome_reference.npz")["images_uint8"])
    path = save_reference_file(tmp_path / "ref.pth", reference_layout_tocom(TOCOM_SEED, 12, 768, TOCOM_RANK))
    base = seeded_tome("deit_base_patch16_224", 0)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    for r_src, r_tgt in TOCOM_PAIRS:
        base.load_state_dict(original)
        base.r_schedule = r_tgt
        tocom_files.merge_tome_plugin_file(base, path, r_src, scale=TOCOM_SCALE)
        with torch.no_grad():
            logits = base(images).numpy()
        error = np.abs(logits - golden[f"r{r_src}_to_r{r_tgt}/logits"]).max()
        assert error <= 1e-4, f"{r_src} -> {r_tgt}: {error:.3g}"
