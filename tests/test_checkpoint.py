import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import create_dynamicvit
from compress.models.checkpoint import infer_config, load_dynamicvit, save_dynamicvit
from compress.plumbing.errors import CheckpointError
from conftest import run_in_process

REPO = Path(__file__).resolve().parents[1]


class NotATensor:  # a pickled class instance: loading must refuse it, never run it
    pass


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(1)
    return create_dynamicvit("dynamicvit_deit_tiny").state_dict()


def run_inspect(*args):
    return subprocess.run([sys.executable, "-m", "compress.describe", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_reference_format_loads_strictly_and_architecture_is_inferred(tmp_path, tiny_state):
    path = tmp_path / "dynamicvit_tiny_ref.pth"
    torch.save({"model": tiny_state}, path)
    loaded = load_dynamicvit(path, keep_ratio=0.7)
    assert loaded.model.config.backbone == "deit_tiny_patch16_224"
    assert loaded.model.config.pruning_locations == (3, 6, 9)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, tiny_state[key]), key
    assert loaded.notes == []


def test_project_format_round_trips_config_and_metadata(tmp_path):
    model = create_dynamicvit("vit_small_patch16_224", keep_ratio=0.5, img_size=64, depth=4, embed_dim=96,
                              num_heads=3, num_classes=10, pruning_locations=(1, 2, 3))
    save_dynamicvit(model, tmp_path / "ck.pth", epoch=3)
    loaded = load_dynamicvit(tmp_path / "ck.pth")
    assert loaded.model.config == model.config
    assert loaded.model.keep_ratio == 0.5 and loaded.metadata["epoch"] == 3
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_backbone_only_checkpoint_initialises_predictors_and_says_so(tmp_path, tiny_state):
    backbone = {k: v for k, v in tiny_state.items() if not k.startswith("score_predictor")}
    torch.save({"model": backbone}, tmp_path / "deit_tiny.pth")
    loaded = load_dynamicvit(tmp_path / "deit_tiny.pth")
    assert any("prediction modules newly initialised" in note for note in loaded.notes)
    assert any("no training keep ratio" in note for note in loaded.notes)
    assert torch.equal(loaded.model.state_dict()["blocks.5.attn.qkv.weight"], tiny_state["blocks.5.attn.qkv.weight"])


def test_safetensors_backbone_and_plain_state_dict(tmp_path, tiny_state):
    from safetensors.torch import save_file

    backbone = {k: v.contiguous() for k, v in tiny_state.items() if not k.startswith("score_predictor")}
    save_file(backbone, str(tmp_path / "model.safetensors"))
    assert load_dynamicvit(tmp_path / "model.safetensors").model.config.backbone == "deit_tiny_patch16_224"
    torch.save(tiny_state, tmp_path / "plain.pth")
    assert load_dynamicvit(tmp_path / "plain.pth").model.config.backbone == "deit_tiny_patch16_224"


def test_unregistered_width_is_built_generically_with_a_note():
    weights = create_dynamicvit("vit_small_patch16_224", embed_dim=128, num_heads=2, depth=6, img_size=32,
                                patch_size=8, num_classes=5).state_dict()
    config = infer_config(weights)
    assert config.backbone_kwargs["embed_dim"] == 128 and config.backbone_kwargs["depth"] == 6
    assert config.backbone_kwargs["img_size"] == 32 and config.pruning_locations == (1, 2, 3)


def test_wrong_architecture_lists_offending_keys(tmp_path, tiny_state):
    torch.save({"model": tiny_state}, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches: blocks\.0\.attn\.proj\.bias \(192,\) vs model \(384,\)"):
        load_dynamicvit(tmp_path / "tiny.pth", model_name="dynamicvit_deit_small")
    extra = dict(tiny_state, **{"dist_token": torch.zeros(1, 1, 192)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: dist_token"):
        load_dynamicvit(tmp_path / "extra.pth")
    partial = {k: v for k, v in tiny_state.items() if not k.startswith("blocks.2.mlp")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\.mlp\.fc1\.bias"):
        load_dynamicvit(tmp_path / "partial.pth")


def test_pickled_objects_are_refused(tmp_path, tiny_state):
    torch.save({"model": tiny_state, "payload": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="never runs pickled code"):
        load_dynamicvit(tmp_path / "evil.pth")


def test_cli_reports_a_good_checkpoint(tmp_path, tiny_state):
    torch.save({"model": tiny_state}, tmp_path / "ref.pth")
    result = run_inspect(tmp_path / "ref.pth", "--keep", "0.6")
    assert result.returncode == 0, result.stderr
    assert "[117, 70, 42]" in result.stdout and "5,899,582" in result.stdout


def test_cli_bad_checkpoints_fail_with_one_clear_line(tmp_path, tiny_state):
    good = tmp_path / "good.pth"
    torch.save({"model": tiny_state}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    assert_one_line_error(run_inspect(truncated), "corrupt or truncated")  # a real process: its exit code and stderr
    # The same command in process (what its __main__ runs, without the interpreter's 5 s of imports).
    assert_one_line_error(run_in_process("compress.describe", random_bytes), "not a PyTorch checkpoint")
    assert_one_line_error(run_in_process("compress.describe", tmp_path / "absent.pth"), "checkpoint not found")
    assert_one_line_error(run_in_process("compress.describe", good, "--model", "dynamicvit_deit_base"), "shape mismatches")
    assert_one_line_error(run_in_process("compress.describe", good, "--keep", "0.05"), "keeps no patch token")
