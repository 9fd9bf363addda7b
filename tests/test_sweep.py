"""export.sweep: Pareto front, keep-ratio choice, and the table + plot on a small model (or the demo model)."""
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from compress import create_dynamicvit
from compress.models.checkpoint import save_dynamicvit
from compress.models.tocom import plugin_for_model
from compress.models.tocom_files import save_plugin
from compress.plumbing.cli import run_cli
from export import sweep
from export.sweep import SweepRow, choose_keep, pareto_flags

DEMO_LIKE = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10,
                 pruning_locations=(1, 3, 5))
DEMO_DATA_SPEC = {"dataset": "demo-digits", "image_size": 64, "num_classes": 10, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Preprocessed evaluation samples go to a temporary cache, not the user's."""
    monkeypatch.setenv("VIT_PRUNE_DEPLOY_CACHE", str(tmp_path / "cache"))


def row(keep, accuracy, latency, variant="plain"):
    return SweepRow(keep, variant, [], 0.0, accuracy, latency, latency)


def test_pareto_front_keeps_only_undominated_points():
    points = [(10.0, 80.0), (8.0, 79.0), (9.0, 78.0), (5.0, 70.0), (5.0, 70.0), (12.0, 80.0)]
    # (9, 78) is beaten by (8, 79); (12, 80) by (10, 80); equal twins do not dominate each other
    assert pareto_flags(points) == [True, True, False, True, True, False]


def test_choice_is_the_most_accurate_within_the_budget_and_says_why():
    rows = [row(1.0, 0.800, 10.0), row(0.8, 0.795, 8.0), row(0.7, 0.795, 7.0), row(0.5, 0.700, 5.0)]
    chosen, reason = choose_keep(rows, 8.5)
    assert chosen.keep == 0.7  # as accurate as 0.8 and faster
    assert "within 8.5 ms" in reason and "keep 1 (no ToCom) would give 0.800 but needs 10.00 ms" in reason
    assert choose_keep(rows, 4.0)[0] is None and "fastest is keep 0.5" in choose_keep(rows, 4.0)[1]
    chosen, reason = choose_keep(rows, 8.5, min_accuracy=0.9)
    assert chosen is None and "below --min-accuracy 0.9" in reason
    with_tocom = rows + [row(0.5, 0.750, 5.0, "tocom")]
    assert choose_keep(with_tocom, 6.0)[0].variant == "tocom"


def run_sweep(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(sweep.main, [str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The shipped demo model when present, else a small demo-shaped DynamicViT (random weights)."""
    try:
        from compress.models.checkpoint import demo_checkpoint_path

        if Path(demo_checkpoint_path()).is_file():
            return Path(demo_checkpoint_path())
    except ImportError:
        pass
    torch.manual_seed(0)
    model = create_dynamicvit("vit_small_patch16_224", keep_ratio=0.7, **DEMO_LIKE)
    path = tmp_path_factory.mktemp("sweep") / "small.pth"
    save_dynamicvit(model, path, data=DEMO_DATA_SPEC)
    return path


def test_sweep_prints_the_table_saves_the_plot_picks_within_budget_and_says_how_to_export(tmp_path, small_checkpoint):
    code, out, err = run_sweep("-c", small_checkpoint, "--eval-data", "demo", "--eval-images", "100",
                               "--keeps", "1.0", "0.7", "0.5", "-n", "10", "--warmup", "2",
                               "--latency-budget", "10000", "--out", tmp_path)
    assert code == 0, err
    print(out)
    assert " top-1 " in out and "44/31/21" in out and "chosen: keep" in out
    record = json.loads((tmp_path / f"{small_checkpoint.stem}_sweep.json").read_text())
    assert [r["keep"] for r in record["rows"]] == [1.0, 0.7, 0.5]
    assert record["metric_unit"] == "fraction"
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["latency_ms"] > 0 for r in record["rows"])
    assert any(r["pareto"] for r in record["rows"]) and record["chosen"]["pareto"]
    keep = record["chosen"]["keep"]
    expected = f"python -m export.build --checkpoint {small_checkpoint} --keep {keep:g}"
    assert record["export_command"] == expected and f"export it: {expected}" in out
    png = (tmp_path / f"{small_checkpoint.stem}_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_sweep_with_tocom_measures_both_variants(tmp_path, small_checkpoint):
    from compress.models.checkpoint import load_dynamicvit

    model = load_dynamicvit(small_checkpoint).model
    plugin = plugin_for_model(model)
    torch.manual_seed(1)
    for parameter in plugin.parameters():  # a non-zero compensation (fresh plugins start at zero)
        torch.nn.init.normal_(parameter, std=0.02)
    save_plugin(plugin, tmp_path / "tocom.safetensors")
    code, out, err = run_sweep("-c", small_checkpoint, "--tocom", tmp_path / "tocom.safetensors", "--eval-data", "demo",
                               "--eval-images", "60", "--keeps", "0.7", "0.5", "-n", "5", "--warmup", "1",
                               "--out", tmp_path)
    assert code == 0, err
    rows = json.loads((tmp_path / f"{small_checkpoint.stem}_sweep.json").read_text())["rows"]
    assert [(r["keep"], r["variant"]) for r in rows] == [(0.7, "plain"), (0.7, "tocom"), (0.5, "plain"), (0.5, "tocom")]
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # ToCom(rho_train -> rho_train) is zero
    assert rows[2]["latency_ms"] == rows[3]["latency_ms"]  # merged into the weights: one graph cost


def test_int8_sweep_runs_on_calibrated_graphs(tmp_path, small_checkpoint):
    code, out, err = run_sweep("-c", small_checkpoint, "--precision", "int8", "--calib-data", "demo", "--calib-images",
                               "16", "--eval-data", "demo", "--eval-images", "40", "--keeps", "0.7", "-n", "3",
                               "--warmup", "1", "--out", tmp_path)
    assert code == 0, err
    assert "(int8, ort-cpu, batch 1)" in out and "44/31/21" in out


def test_sweep_errors_are_one_line(tmp_path, small_checkpoint):
    code, _, err = run_sweep("-c", small_checkpoint, "--tocom", tmp_path / "none.safetensors", "--out", tmp_path)
    assert code == 2 and "ToCom plugin not found" in err
    code, _, err = run_sweep("-c", small_checkpoint, "--min-accuracy", "0.5", "--out", tmp_path)
    assert code == 2 and "--min-accuracy needs --latency-budget" in err
    code, _, err = run_sweep("-c", small_checkpoint, "--tocom-scale", "0.1", "--out", tmp_path)
    assert code == 2 and "--tocom-scale needs --tocom" in err
    code, _, err = run_sweep("-c", small_checkpoint, "--calib-data", "demo", "--out", tmp_path)
    assert code == 2 and "--calib-data and --calib-images need --precision int8" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_sweep("-c", small_checkpoint, "--eval-data", tmp_path / "empty", "--out", tmp_path)
    assert code == 2 and err.startswith("error: --eval-data: image folder") and "holds no images" in err
    assert not list(tmp_path.glob("*_sweep.*"))


def test_budget_nobody_meets_exits_one(tmp_path, small_checkpoint):
    code, out, _ = run_sweep("-c", small_checkpoint, "--eval-data", "demo", "--eval-images", "20", "--keeps", "0.5",
                             "-n", "3", "--warmup", "1", "--latency-budget", "0.000001", "--out", tmp_path)
    assert code == 1 and "no choice: no keep ratio meets the 1e-06 ms budget" in out
