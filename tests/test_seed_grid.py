"""The seed grid (``python -m compress.seed_grid``, issue 27): the interval and pairing arithmetic on numbers worked
out by hand, the plan of cells, bad input, and a real grid on a tiny configuration that is killed, restarted and does
not retrain its finished cells."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compress.training import seed_statistics as stats
from compress.training.demo import DEMO_RECIPE
from compress.training.seed_grid import (
    CELL_OUTPUT,
    CELL_RESULT,
    CELL_STARTED,
    GridSpec,
    critical_path_seconds,
    format_duration,
    plan_cells,
    remaining_seconds,
    run_cell,
    scaled_epochs,
    scaled_recipe,
)
from compress.training.train import CHECKPOINT_NAME, LOG_NAME, TrainConfig, train
from conftest import run_in_process

REPO = Path(__file__).resolve().parents[1]
VERDICTS = {stats.HELPS, stats.HURTS, stats.NO_EFFECT}


# ----------------------------------------------------------------------------- statistics, by hand


def test_mean_and_sample_standard_deviation():
    assert stats.mean([1, 2, 3, 4, 5]) == 3.0
    assert stats.sample_std([1, 2, 3, 4, 5]) == pytest.approx(math.sqrt(2.5))  # squares 4+1+0+1+4 over n - 1 = 4
    assert stats.sample_std([7.0]) is None


def test_t_distribution_closed_forms_and_table_quantiles():
    # df 1 is the Cauchy distribution: P(|T| <= 1) = 2 atan(1) / pi = 1/2; df 2: t / sqrt(2 + t^2).
    assert stats.t_central_probability(1.0, 1) == pytest.approx(0.5)
    assert stats.t_central_probability(1.0, 2) == pytest.approx(1 / math.sqrt(3))
    # Two-sided 95 % points of Student's t (any printed table).
    for df, quantile in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert stats.t_quantile(0.95, df) == pytest.approx(quantile, abs=1e-4)


def test_t_interval_of_one_to_five():
    # mean 3, sd sqrt(2.5), standard error sqrt(2.5 / 5) = 0.70711, t(0.975, 4) = 2.77645: 3 -/+ 1.96324
    low, high = stats.t_interval([1, 2, 3, 4, 5])
    assert (low, high) == pytest.approx((1.03676, 4.96324), abs=1e-5)
    assert stats.t_interval([3.0]) is None
    assert stats.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_bootstrap_interval_of_two_values_is_their_range_and_repeats_exactly():
    # Means of two draws from {0, 1}: 0 (p 1/4), 0.5 (1/2), 1 (1/4); the 2.5 % and 97.5 % quantiles are 0 and 1.
    assert stats.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    values = [81.0, 82.5, 80.2, 83.1, 81.7]
    first = stats.bootstrap_interval(values)
    assert first == stats.bootstrap_interval(values)  # the fixed bootstrap seed
    t_low, t_high = stats.t_interval(values)
    assert t_low < first[0] < stats.mean(values) < first[1] < t_high  # narrower than t at five seeds (the docstring)
    assert stats.bootstrap_interval([5.0, 5.0, 5.0]) == (5.0, 5.0)
    assert stats.summarise(values, "bootstrap")["interval"] == list(first)
    with pytest.raises(ValueError, match="interval method"):
        stats.interval(values, "jackknife")


def test_a_paired_difference_excludes_zero_where_the_unpaired_arms_overlap():
    masked = {0: 80.0, 1: 82.0, 2: 81.0, 3: 83.0, 4: 79.0, 9: 50.0}  # seed 9: no partner, left out
    base = {0: 78.0, 1: 80.5, 2: 79.0, 3: 81.5, 4: 77.5}
    # differences 2, 1.5, 2, 1.5, 1.5: mean 1.7, sd sqrt(0.075) = 0.27386, half width 2.77645 * 0.27386 / sqrt(5) = 0.34004
    comparison = stats.compare(masked, base)
    assert comparison["differences"] == {0: 2.0, 1: 1.5, 2: 2.0, 3: 1.5, 4: 1.5}
    assert comparison["n"] == 5 and comparison["mean"] == pytest.approx(1.7)
    assert comparison["std"] == pytest.approx(math.sqrt(0.075))
    assert comparison["interval"] == pytest.approx([1.35996, 2.04004], abs=1e-5)
    assert comparison["verdict"] == "helps"
    # Unpaired, the arms' intervals overlap ([79.04, 82.96] and [77.21, 81.39]): what the seed does to both arms
    # is what pairing removes.
    assert stats.t_interval([masked[s] for s in base])[0] < stats.t_interval(list(base.values()))[1]


def test_a_paired_difference_that_contains_zero_or_lies_below_it():
    around_zero = stats.compare({0: 81.0, 1: 79.0, 2: 80.5, 3: 79.5, 4: 80.0}, {s: 80.0 for s in range(5)})
    assert around_zero["mean"] == pytest.approx(0.0) and around_zero["verdict"] == "no measurable effect"
    assert around_zero["interval"][0] < 0 < around_zero["interval"][1]
    below = stats.compare({0: 60.0, 1: 61.0, 2: 59.0}, {0: 62.0, 1: 62.5, 2: 61.5})  # -2, -1.5, -2.5
    assert below["interval"][1] < 0 and below["verdict"] == "hurts"
    assert stats.compare({0: 1.0}, {0: 0.0})["verdict"] == stats.NO_INTERVAL  # one seed: no interval, no verdict
    assert stats.compare({0: 1.0}, {1: 0.0})["n"] == 0


def test_verdict_words():
    assert stats.verdict((0.1, 2.0)) == "helps"
    assert stats.verdict((-2.0, -0.1)) == "hurts"
    assert stats.verdict((-0.5, 0.5)) == "no measurable effect"
    assert stats.verdict((0.0, 1.0)) == "no measurable effect"  # an end at 0 is not above 0
    assert stats.verdict(None) == stats.NO_INTERVAL


# ----------------------------------------------------------------------------- the plan


def test_scaled_epochs_shorten_every_arm_the_same_way():
    assert [scaled_epochs(n, 0.5) for n in (40, 12, 10, 1, 0)] == [20, 6, 5, 1, 0]
    assert scaled_epochs(10, 0.05) == 1 and scaled_epochs(12, 0.25) == 3 and scaled_epochs(30, 0.75) == 23  # 22.5 up
    half = scaled_recipe(DEMO_RECIPE, 0.5)
    assert (half.base_epochs, half.masked_epochs, half.dynamicvit_epochs, half.warmup_epochs) == (20, 5, 6, 1.0)
    assert half.base_lr == DEMO_RECIPE.base_lr and half.backbone_frozen_epochs == 1


def test_the_plan_shares_one_base_per_seed_and_orders_cells_after_what_they_need():
    spec = GridSpec(seeds=(0, 3), keeps=(0.7, 0.5), control=True, tocom=True, tome_tocom=True, epochs_scale=0.5)
    cells = plan_cells(spec)
    names = [cell.name for cell in cells]
    assert len(cells) == len(set(names)) == 2 * (3 + 2 * 3 + 2)  # base, masked, control; 2 keeps x 3 inits; 2 ToCom
    position = {name: i for i, name in enumerate(names)}
    for cell in cells:
        assert all(position[need] < position[cell.name] for need in cell.needs)
        assert cell.options["seed"] == cell.seed and cell.name.startswith(f"seed_{cell.seed}/")
    by_name = {cell.name: cell for cell in cells}
    assert by_name["seed_3/dynamicvit_finetuned_0.5"].needs == ("seed_3/finetuned",)
    assert by_name["seed_3/finetuned"].options["mask_ratio_max"] == 0.0
    assert by_name["seed_3/masked"].options["mask_ratio_max"] == 0.75
    assert by_name["seed_0/tocom_tome"].needs == by_name["seed_0/tocom_keep"].needs == ("seed_0/dynamicvit_masked_0.7",)
    assert by_name["seed_0/tocom_tome"].options["eval_keeps"] == [4, 8, 12, 16]
    assert by_name["seed_0/base"].options["epochs"] == 20 and by_name["seed_0/tocom_keep"].options["epochs"] == 15
    # The base of a seed holds up every other cell of it: it has the longest path and starts first.
    path = critical_path_seconds(cells)
    assert max(path, key=path.get) in ("seed_0/base", "seed_3/base")


def test_remaining_time_is_calibrated_by_the_finished_cells_and_spread_over_the_workers():
    assert remaining_seconds(100.0, 0.0, 0.0, 2) == 50.0  # nothing finished yet: the expectation itself
    assert remaining_seconds(100.0, 50.0, 100.0, 2) == 100.0  # cells took twice as long as expected
    assert [format_duration(s) for s in (37, 252, 3900)] == ["37 s", "4 min 12 s", "1 h 05 min"]


# ----------------------------------------------------------------------------- bad input


def _last_line(result) -> str:
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("args, fragment", [
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "0,1,1"], "distinct integers >= 0"),
    (["--seeds", ""], "--seeds"),
    (["--keeps", "0.7,1.5"], "keep ratios in (0, 1]"),
    (["--keeps", "0"], "--keeps"),
    (["--tocom", "--keeps", "0.5", "--tocom-keep", "0.7"], "--tocom-keep 0.7 is not one of --keeps 0.5"),
    (["--tocom", "--keeps", "0.75", "--tocom-keep", "0.75"], "not on the ToCom plugin's grid"),
    (["--tome-rs", "17"], "--tome-rs"),
    (["--epochs-scale", "0"], "--epochs-scale"),
    (["--jobs", "0"], "--jobs"),
    (["--tocom", "--limit-train", "64"], "--limit-train 64 is fewer than one batch"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args, fragment):
    result = run_in_process("compress.seed_grid", "--out", tmp_path / "grid", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: " in _last_line(result) and fragment in _last_line(result), result.stderr
    assert not (tmp_path / "grid" / "seed_0").exists()


def test_an_unwritable_output_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_in_process("compress.seed_grid", "--out", blocker / "grid")
    assert result.returncode == 2 and "not writable" in _last_line(result)


def test_help_gives_every_flag_its_default():
    result = run_in_process("compress.seed_grid", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for default in ("(default: 0,1,2,3,4)", "(default: 0.9,0.7,0.5,0.3)", "(default: 1.0)", "(default: t)",
                    "(default: 40)", "(default: runs/seed_grid)", "(default: 1)", "(default: 4,8,12,16)"):
        assert default in text, default
    assert "rerun the same command to resume" in text  # the exit-code table names code 1
    version = run_in_process("compress.seed_grid", "--version")
    assert version.returncode == 0 and version.stdout.startswith("python -m compress.seed_grid ")


# ----------------------------------------------------------------------------- resuming


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_an_unfinished_training_cell_resumes_from_its_epoch_checkpoint(tmp_path, one_thread):
    spec = GridSpec(seeds=(0,), keeps=(0.7,), recipe=replace(DEMO_RECIPE, base_epochs=2, warmup_epochs=0.2),
                    limit_train=64, limit_eval=32)
    base = plan_cells(spec)[0]
    folder = tmp_path / base.name
    # What a run killed after its first epoch leaves behind: checkpoint.pth and one log line.
    train(TrainConfig(out=str(folder), stop_after=1, device="cpu", threads=1, **base.options))
    assert (folder / CHECKPOINT_NAME).is_file() and not (folder / CELL_RESULT).exists()
    record = run_cell(base, str(tmp_path), "cpu")
    assert record["resumed"] is True
    assert [line["epoch"] for line in map(json.loads, (folder / LOG_NAME).read_text().splitlines())] == [1, 2]
    assert "resumed from" in (folder / CELL_OUTPUT).read_text()
    assert json.loads((folder / CELL_RESULT).read_text())["top1"] == record["top1"]
    assert not (folder / CHECKPOINT_NAME).exists()  # a finished cell keeps its model, not its optimizer state


def _grid_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compress.seed_grid", "--seeds", "0,1", "--keeps", "0.7", "--tocom",
            "--epochs-scale", "0.05", "--limit-train", "96", "--limit-eval", "16", "--jobs", "2", "--out", str(out),
            *extra]


def _kill_a_worker_once_a_cell_has_finished(out: Path, process: subprocess.Popen) -> None:
    """SIGKILL one worker process (the pid a started.json records; a running cell's when there is one) as soon as
    the first cell.json appears."""
    deadline = time.time() + 240
    while not list(out.glob(f"seed_*/*/{CELL_RESULT}")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    started = sorted(out.glob(f"seed_*/*/{CELL_STARTED}"), key=lambda p: (p.parent / CELL_RESULT).exists())
    os.kill(json.loads(started[0].read_text())["pid"], signal.SIGKILL)


def test_a_killed_grid_restarts_without_retraining_its_finished_cells(tmp_path):
    out = tmp_path / "grid"
    first = subprocess.Popen(_grid_command(out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_a_worker_once_a_cell_has_finished(out, first)
    _, log = first.communicate(timeout=240)
    assert first.returncode == 1, log[-3000:]
    assert "a worker process died" in log and "rerun the same command" in log
    finished = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.glob(f"seed_*/*/{CELL_RESULT}")}
    assert 1 <= len(finished) < 10  # 2 seeds x (base, masked, 2 DynamicViT, ToCom): some but not all finished
    interrupted = [f"{p.parent.parent.name}/{p.parent.name}" for p in out.glob(f"seed_*/*/{CELL_STARTED}")
                   if not (p.parent / CELL_RESULT).exists()]
    assert interrupted  # the killed worker's cell (and the other worker's, stopped with it)

    # Another recipe in the same folder is refused before any work.
    refused = run_in_process("compress.seed_grid", *_grid_command(out, "--epochs-scale", "0.1")[3:])
    assert refused.returncode == 2 and "was started with other options (epochs" in _last_line(refused)

    second = subprocess.run(_grid_command(out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    for path, (mtime, content) in finished.items():
        name = f"{path.parent.parent.name}/{path.parent.name}"
        assert f"skipping finished cell {name} " in second.stderr
        assert f"started {name} " not in second.stderr and f"resuming {name} " not in second.stderr
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content  # never retrained, never rewritten
    for name in interrupted:  # started again, or resumed from its epoch checkpoint
        assert f"started {name} " in second.stderr or f"resuming {name} " in second.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["cells_finished"] == results["cells_planned"] == 10
    assert sorted(results["cells"]) == sorted(f"seed_{s}/{run}" for s in (0, 1) for run in (
        "base", "masked", "dynamicvit_base_0.7", "dynamicvit_masked_0.7", "tocom_keep"))
    arms = {(row["arm"], row["degree"]): row for row in results["arms"]}
    assert arms[("dynamicvit_masked", 0.7)]["n"] == 2 and len(arms[("dynamicvit_masked", 0.7)]["interval"]) == 2
    assert arms[("tocom_merged", 0.3)]["values"].keys() == {"0", "1"}
    claims = {(row["claim"], row["measured"], row["degree"]): row for row in results["comparisons"]}
    masked_vs_base = claims[("masked_vs_base", "dynamicvit_masked", 0.7)]
    cells = results["cells"]
    assert masked_vs_base["differences"]["1"] == pytest.approx(
        cells["seed_1/dynamicvit_masked_0.7"]["top1"] - cells["seed_1/dynamicvit_base_0.7"]["top1"])
    assert {row["verdict"] for row in results["comparisons"]} <= VERDICTS
    assert {degree for claim, _, degree in claims if claim == "tocom_keep"} == {1.0, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3}
    assert (out / "accuracy_vs_keep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
