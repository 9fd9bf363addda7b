"""The shipped demo checkpoint, the demo dataset API the export stage uses, and the kept-token figure."""
import pytest
import torch

from compress.models.checkpoint import demo_checkpoint_path
from compress.models.checkpoint import load_dynamicvit
from compress.training.demo import demo_dataset, demo_loader
from compress.training.loop import DistEnv, evaluate
from compress.visualize import dim_dropped, kept_patch_masks


def test_shipped_demo_checkpoint_loads_strictly_and_reproduces_its_recorded_accuracy():
    path = demo_checkpoint_path()
    assert path.is_file() and path.stat().st_size < 10 * 2**20
    loaded = load_dynamicvit(path)
    model = loaded.model
    assert loaded.notes == [] and model.keep_ratio == 0.7
    assert model.num_patches == 64 and model.stage_keep_counts() == [44, 31, 21]
    meta = loaded.metadata
    assert meta["data"]["dataset"] == "demo-digits" and meta["data"]["num_classes"] == 10
    assert meta["demo"]["command"].startswith("python -m compress.demo")
    accuracy = evaluate(model, demo_loader("test", batch_size=128), 0.7, DistEnv())["top1"]
    assert accuracy == pytest.approx(meta["metrics"]["eval_top1"], abs=0.6)  # float summation order only


def test_demo_dataset_is_the_fixed_test_split():
    data = demo_dataset("test")
    assert len(data) == 359 and torch.equal(data[0][0], demo_dataset("test")[0][0])


def test_kept_patch_masks_and_dimming():
    kept = [torch.tensor([[0, 1, 2, 3]]), torch.tensor([[3, 1]])]
    masks = kept_patch_masks(kept, 16)
    assert masks.shape == (2, 1, 16) and masks[0, 0, :4].all() and int(masks[0].sum()) == 4
    assert masks[1, 0].nonzero().flatten().tolist() == [1, 3]
    image = torch.ones(8, 8, 3)
    dimmed = dim_dropped(image, masks[1, 0], patch=(2, 2), factor=0.25)
    assert float(dimmed[0, 2, 0]) == 1.0 and float(dimmed[0, 0, 0]) == 0.25  # patch 1 kept, patch 0 dropped


def test_visualize_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from compress.visualize import main

    out = tmp_path / "kept.png"
    assert main(["--images", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
