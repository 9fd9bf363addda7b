"""ToCom: the mask arithmetic, merging, the plugin file, and its training command (tiny models, CPU)."""
import copy
import itertools
import json

import pytest
import torch

from compress import create_dynamicvit

from compress.models import tocom, tocom_files

from compress.models.checkpoint import save_dynamicvit
from compress.plumbing.cli import run_cli
from compress.plumbing.errors import PipelineError
from conftest import demo_batch

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
GRID = tocom.DEFAULT_GRID
PAIRS = list(itertools.product(GRID, GRID))


def tiny_model(keep_ratio=0.7, **overrides):
    return create_dynamicvit("vit_small_patch16_224", keep_ratio, None, **{**TINY, **overrides}).eval()


def randomised_plugin(model, std=0.5, **kwargs):
    """A plugin whose up weights are random and non-zero (a fresh one would change nothing)."""
    plugin = tocom.plugin_for_model(model, **kwargs)
    with torch.no_grad():
        for layer in plugin.layers:
            for up in (layer.q_up, layer.v_up):
                up.normal_(0.0, std)
    return plugin.eval()


# ----------------------------------------------------------------------------- coefficients


def test_coefficients_are_step_slices_with_sign_of_direction():
    c = tocom.compensation_coefficients(GRID, 2, 0.7, 0.5)  # two steps further along the grid
    assert c.shape == (14,)
    assert c.tolist() == [0.0] * 6 + [1.0] * 4 + [0.0] * 4
    assert tocom.compensation_coefficients(GRID, 2, 0.5, 0.7).tolist() == [0.0] * 6 + [-1.0] * 4 + [0.0] * 4
    assert tocom.plugin_rank(GRID, tocom.DEFAULT_RANK_PER_STEP) == 28


@pytest.mark.parametrize("m,n", PAIRS)
def test_antisymmetry_and_zero_on_the_diagonal(m, n):
    forward = tocom.compensation_coefficients(GRID, 3, m, n)
    assert torch.equal(forward, -tocom.compensation_coefficients(GRID, 3, n, m))
    if m == n:
        assert not forward.any()


def test_chain_rule_holds_exactly_on_coefficients_for_every_triple():
    for a, b, c in itertools.product(GRID, repeat=3):
        ab, bc = tocom.compensation_coefficients(GRID, 2, a, b), tocom.compensation_coefficients(GRID, 2, b, c)
        assert torch.equal(ab + bc, tocom.compensation_coefficients(GRID, 2, a, c)), (a, b, c)


def _dyadic_layer(embed_dim=16, rank=14):
    """Weights that are small multiples of 1/8: every product and sum below is exact in float32."""
    layer = tocom.ToComLayer(embed_dim, rank)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randint(-8, 9, parameter.shape).float() / 8)
    return layer


def test_chain_rule_and_antisymmetry_hold_exactly_on_merged_weight_deltas():
    layer = _dyadic_layer()
    scale = 0.125  # a power of two: scaling is exact too
    def deltas(m, n):
        return layer.weight_deltas(tocom.compensation_coefficients(GRID, 2, m, n), scale)
    for a, b, c in [(1.0, 0.7, 0.3), (0.7, 0.3, 0.9), (0.5, 0.5, 0.8), (0.3, 1.0, 0.6), (0.9, 0.4, 0.4)]:
        (ab_q, ab_v), (bc_q, bc_v), (ac_q, ac_v) = deltas(a, b), deltas(b, c), deltas(a, c)
        assert torch.equal(ab_q + bc_q, ac_q) and torch.equal(ab_v + bc_v, ac_v), (a, b, c)
        ba_q, ba_v = deltas(b, a)
        assert torch.equal(ba_q, -ab_q) and torch.equal(ba_v, -ab_v)
    zero_q, zero_v = deltas(0.6, 0.6)
    assert not zero_q.any() and not zero_v.any()


def test_chain_rule_on_merged_models_with_random_weights_float64():
    model = tiny_model().double()
    plugin = randomised_plugin(model).double()
    original = copy.deepcopy(model)

    def merged_qkv(m, n):
        target = copy.deepcopy(original)
        tocom.merge_plugin(target, plugin, m, n, 0.1)
        return [block.attn.qkv.weight - base.attn.qkv.weight for block, base in zip(target.blocks, original.blocks)]

    for ab, bc, ac in zip(merged_qkv(0.9, 0.6), merged_qkv(0.6, 0.4), merged_qkv(0.9, 0.4)):
        torch.testing.assert_close(ab + bc, ac, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- run time and merge


@pytest.mark.parametrize("source,target", [(0.7, 0.5), (0.7, 0.9), (0.7, 1.0), (0.3, 0.8)])
def test_merged_model_equals_run_time_plugin(source, target):
    model = tiny_model(keep_ratio=source)
    plugin = randomised_plugin(model)
    images = torch.randn(6, 3, 64, 64)
    model.keep_ratio = target
    with tocom.attach(model, plugin), plugin.compensating(source, target, 0.1), torch.no_grad():
        run_time = model.forward_pruned(images)
        run_time_masked = model.forward_masked(images, decide=_top_k_decisions(model)).logits
    merged = copy.deepcopy(model)
    tocom.merge_plugin(merged, plugin, source, target, 0.1)
    with torch.no_grad():
        plain = model.forward_pruned(images)  # hooks removed: the model is unchanged
        merged_logits = merged.forward_pruned(images)
        merged_masked = merged.forward_masked(images, decide=_top_k_decisions(merged)).logits
    assert (run_time - plain).abs().max() > 1e-3  # the plugin does something
    torch.testing.assert_close(merged_logits, run_time, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_masked, run_time_masked, rtol=0, atol=1e-5)


def _top_k_decisions(model):
    """Drive the training forward with inference's top-k choices (deterministic), at the model's keep ratio."""
    from compress.models.token_select import top_k_decision

    counts = model.stage_keep_counts() if model.keep_ratio < 1.0 else [model.num_patches] * 3
    return lambda log_probs, previous, stage: top_k_decision(log_probs[..., 0], previous, counts[stage])


def test_merge_changes_only_q_and_v_rows_of_qkv_weights():
    model = tiny_model()
    plugin = randomised_plugin(model)
    before = copy.deepcopy(model.state_dict())
    tocom.merge_plugin(model, plugin, 0.7, 0.4, 0.12)
    after = model.state_dict()
    width = model.embed_dim
    for name, value in before.items():
        if name.endswith("attn.qkv.weight"):
            assert torch.equal(after[name][width : 2 * width], value[width : 2 * width]), f"{name}: k rows changed"
            assert not torch.equal(after[name][:width], value[:width]), f"{name}: q rows unchanged"
            assert not torch.equal(after[name][2 * width :], value[2 * width :]), f"{name}: v rows unchanged"
        else:
            assert torch.equal(after[name], value), f"{name} changed"


def test_same_keep_or_zero_scale_changes_nothing():
    model = tiny_model()
    plugin = randomised_plugin(model)
    before = copy.deepcopy(model.state_dict())
    tocom.merge_plugin(model, plugin, 0.7, 0.7, 0.1)
    tocom.merge_plugin(model, plugin, 0.7, 0.4, 0.0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_fresh_plugin_is_identity_and_hooks_keep_state_dict_keys():
    model = tiny_model()
    keys = list(model.state_dict())
    plugin = tocom.plugin_for_model(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.forward_pruned(images)
        with tocom.attach(model, plugin), plugin.compensating(0.7, 0.3):
            assert list(model.state_dict()) == keys
            assert torch.equal(model.forward_pruned(images), plain)  # up weights start at zero


# ----------------------------------------------------------------------------- file format and errors


def test_plugin_file_round_trip_and_metadata(tmp_path):
    model = tiny_model()
    plugin = randomised_plugin(model, grid=(1.0, 0.8, 0.6, 0.4), rank_per_step=3, default_scale=0.08)
    path = tocom_files.save_plugin(plugin, tmp_path / "p.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed
    loaded, sha256 = tocom_files.load_plugin(path)
    assert (loaded.grid, loaded.rank_per_step, loaded.rank, loaded.default_scale) == ((1.0, 0.8, 0.6, 0.4), 3, 9, 0.08)
    for mine, theirs in zip(plugin.parameters(), loaded.parameters()):
        assert torch.equal(mine, theirs)
    assert loaded.info.backbone_fingerprint == tocom.backbone_fingerprint(model)
    assert loaded.info.architecture["embed_dim"] == 32 and loaded.info.architecture["depth"] == 4
    import hashlib
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_plugin_file_returns_manifest_entry_and_matches_in_memory_merge(tmp_path):
    model = tiny_model()
    plugin = randomised_plugin(model, default_scale=0.12)
    path = tocom_files.save_plugin(plugin, tmp_path / "p.safetensors")
    expected = copy.deepcopy(model)
    tocom.merge_plugin(expected, plugin, 0.7, 0.5, 0.12)
    model.keep_ratio = 0.5  # export sets the deploy keep ratio; the config keeps the training one
    entry = tocom_files.merge_plugin_file(model, path, 0.5)
    assert entry["rho_train"] == 0.7 and entry["keep"] == 0.5 and entry["scale"] == 0.12
    assert entry["grid"] == list(GRID) and entry["warnings"] == [] and len(entry["plugin_sha256"]) == 64
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert tocom_files.merge_plugin_file(copy.deepcopy(expected), path, 0.5, scale=0.05)["scale"] == 0.05


@pytest.mark.parametrize("overrides,words", [({"embed_dim": 48, "num_heads": 3}, "embed_dim 32"),
                                             ({"depth": 6}, "depth 4"),
                                             ({"num_heads": 4}, "num_heads 2")])
def test_plugin_for_another_architecture_fails_clearly(tmp_path, overrides, words):
    path = tocom_files.save_plugin(randomised_plugin(tiny_model()), tmp_path / "p.safetensors")
    other = tiny_model(**overrides)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(tocom.PluginMismatch, match="trained for") as caught:
        tocom_files.merge_plugin_file(other, path, 0.5)
    assert words in str(caught.value) and isinstance(caught.value, PipelineError)
    for name, value in other.state_dict().items():
        assert torch.equal(value, before[name]), name  # nothing merged


def test_plugin_on_other_weights_of_same_architecture_warns_and_merges(tmp_path, caplog):
    path = tocom_files.save_plugin(randomised_plugin(tiny_model()), tmp_path / "p.safetensors")
    other = tiny_model()  # same architecture, different random weights
    before = other.blocks[0].attn.qkv.weight.clone()
    with caplog.at_level("WARNING", logger="compress.models.tocom"):
        entry = tocom_files.merge_plugin_file(other, path, 0.5)
    assert len(entry["warnings"]) == 1 and "other backbone weights" in entry["warnings"][0]
    assert "other backbone weights" in caplog.text
    assert not torch.equal(other.blocks[0].attn.qkv.weight, before)


@pytest.mark.parametrize("keep", [0.65, 0.35, 0.95])
def test_off_grid_keep_fails_listing_the_grid(tmp_path, keep):
    path = tocom_files.save_plugin(randomised_plugin(tiny_model()), tmp_path / "p.safetensors")
    with pytest.raises(tocom.OffGridKeepRatio) as caught:
        tocom_files.merge_plugin_file(tiny_model(), path, keep)
    assert str(keep) in str(caught.value) and "[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]" in str(caught.value)


def test_training_keep_ratio_off_grid_fails(tmp_path):
    path = tocom_files.save_plugin(randomised_plugin(tiny_model(), grid=(1.0, 0.8, 0.6)), tmp_path / "p.safetensors")
    with pytest.raises(tocom.OffGridKeepRatio, match="training keep ratio 0.7"):
        tocom_files.merge_plugin_file(tiny_model(keep_ratio=0.7), path, 0.6)


def test_missing_and_corrupt_files_fail_clearly(tmp_path):
    model = tiny_model()
    with pytest.raises(tocom_files.PluginFileError, match="not found"):
        tocom_files.merge_plugin_file(model, tmp_path / "absent.safetensors", 0.5)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file at all" * 10)
    with pytest.raises(tocom_files.PluginFileError, match="cannot read"):
        tocom_files.merge_plugin_file(model, garbage, 0.5)
    good = tocom_files.save_plugin(randomised_plugin(model), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(tocom_files.PluginFileError, match="corrupt or truncated"):
        tocom_files.merge_plugin_file(model, truncated, 0.5)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(tocom_files.PluginFileError, match="not a ToCom plugin"):
        tocom_files.merge_plugin_file(model, other, 0.5)


def test_bad_grids_are_refused():
    for grid in ([0.7], [1.0, 0.8, 0.9], [1.2, 0.8], [0.8, 0.8]):
        with pytest.raises(tocom.ToComError):
            tocom.normalise_grid(grid)
    assert tocom.parse_grid("0.3, 0.5 0.7") == (0.3, 0.5, 0.7)  # increasing grids are fine too


def test_transitions_are_uniform_over_ordered_pairs_without_the_diagonal():
    generator = torch.Generator().manual_seed(0)
    grid = (1.0, 0.7, 0.4)
    counts = {}
    for _ in range(3000):
        pair = tocom.draw_transition(grid, generator)
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) == {(m, n) for m in grid for n in grid if m != n}
    assert min(counts.values()) > 400  # 500 expected each


# ----------------------------------------------------------------------------- training


def _teacher_checkpoint(tmp_path):
    """A tiny DynamicViT whose logits are far from uniform, so keep ratios disagree measurably."""
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    path = tmp_path / "dvit.pth"
    save_dynamicvit(model, path)
    return model, path


def distillation_losses(model, plugin, source, target, steps=12):
    """The KL of ``steps`` AdamW steps (lr 3e-3) of ``plugin`` on 16 demo images, teacher at ``source``."""
    from compress.training.tocom_train import StudentForward, distillation_step

    images, _ = demo_batch(16)
    student = StudentForward(model, plugin)
    optimizer = torch.optim.AdamW(plugin.parameters(), lr=3e-3, weight_decay=0.05)
    losses = []
    with tocom.attach(model, plugin):
        for _ in range(steps):
            loss = distillation_step(model, plugin, student, images, source, target, 0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


def test_a_few_training_steps_reduce_the_kl():
    model = tiny_model()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    plugin = tocom.plugin_for_model(model, dropout=0.0)
    losses = distillation_losses(model, plugin, 0.7, 0.4)
    assert losses[0] > 1e-3
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is None for p in model.parameters())  # the backbone stays frozen


def test_training_command_writes_plugin_and_results(tmp_path):
    from compress.training.tocom_train import main

    model, checkpoint = _teacher_checkpoint(tmp_path)
    out = tmp_path / "run"
    argv = ["-c", str(checkpoint), "--out", str(out), "--epochs", "2", "--limit-train", "160", "--limit-eval", "48",
            "--batch-size", "32", "--lr", "3e-3", "--device", "cpu", "--eval-keeps", "0.9,0.5", "--scales", "0.05,0.1"]
    assert run_cli(main, argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["rho_train"] == 0.7 and results["chosen_scale"] in (0.05, 0.1)
    assert [row["keep"] for row in results["evaluation"]] == [0.9, 0.5]
    assert {(row["keep"], row["scale"]) for row in results["selection"]} == {
        (k, s) for k in (0.9, 0.5) for s in (0.0, 0.05, 0.1)}
    assert results["history"][-1]["step"] == 8  # 128 training images (32 held out) / 32
    plugin, _ = tocom_files.load_plugin(out / "tocom.safetensors")
    assert plugin.default_scale == results["chosen_scale"]
    assert plugin.info.backbone_fingerprint == tocom.backbone_fingerprint(model)
    assert plugin.info.extra["training"]["command"].startswith("python -m compress.tocom_train -c")
    assert any(float(layer.q_up.detach().abs().max()) > 0 for layer in plugin.layers)  # it trained


def test_training_command_refuses_off_grid_training_keep(tmp_path, capsys):
    from compress.training.tocom_train import main

    _, checkpoint = _teacher_checkpoint(tmp_path)
    argv = ["-c", str(checkpoint), "--out", str(tmp_path / "run"), "--grid", "1.0,0.8,0.6", "--device", "cpu"]
    assert run_cli(main, argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "training keep ratio 0.7" in error[0] and "[1.0, 0.8, 0.6]" in error[0]


def test_every_flag_documents_its_default():
    from compress.training.tocom_train import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest not in ("help", "version"):  # --help and --version take no value
            assert "(default" in formatter._get_help_string(action), action.dest


# ----------------------------------------------------------------------------- ToMe r plugins


def test_tome_distillation_steps_reduce_the_kl():
    from compress.models.tome import ToMeViT

    model = ToMeViT(tiny_model(), 0).eval()
    with torch.no_grad():  # random weights attend almost uniformly, and then merging hardly changes the CLS token
        model.head.weight.mul_(30.0)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20.0)
            block.mlp.fc1.weight.mul_(10.5)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    plugin = tocom.plugin_for_model(model, dropout=0.0)
    assert plugin.kind == tocom.TOME_R and plugin.grid == tocom.TOME_GRID
    losses = distillation_losses(model, plugin, 0, 16)  # teacher at r 0, student at r 16
    assert model.r_schedule == (16,) * 4
    assert losses[0] > 1e-3
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is None for p in model.parameters())


def test_training_command_trains_a_tome_plugin(tmp_path):
    from compress.training.tocom_train import main

    model, checkpoint = _teacher_checkpoint(tmp_path)
    out = tmp_path / "run"
    argv = ["-c", str(checkpoint), "--tome", "--train-r", "0", "--grid", "0,8,16", "--out", str(out), "--epochs", "1",
            "--limit-train", "80", "--limit-eval", "32", "--batch-size", "32", "--lr", "3e-3", "--device", "cpu",
            "--scales", "0.1"]
    assert run_cli(main, argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["degree_kind"] == tocom.TOME_R and results["rho_train"] == 0
    assert [row["keep"] for row in results["evaluation"]] == [8, 16]
    plugin, _ = tocom_files.load_plugin(out / "tocom.safetensors")
    assert plugin.kind == tocom.TOME_R and plugin.grid == (0, 8, 16)
    assert any(float(layer.q_up.detach().abs().max()) > 0 for layer in plugin.layers)
    with pytest.raises(tocom.PluginKindMismatch):
        tocom_files.merge_plugin_file(model, out / "tocom.safetensors", 0.5)


def test_plugin_files_without_a_kind_are_keep_ratio_plugins(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tocom_files.save_plugin(randomised_plugin(tiny_model()), tmp_path / "p.safetensors")
    metadata = tocom_files._read_header_metadata(path.read_bytes(), str(path))
    assert metadata["degree_kind"] == tocom.KEEP_RATIO
    del metadata["degree_kind"]  # as written before ToMe plugins existed
    save_file(load_file(path), path, metadata=metadata)
    assert tocom_files.load_plugin(path)[0].kind == tocom.KEEP_RATIO
