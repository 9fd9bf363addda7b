"""Training: loss terms, schedule, the loop, parameter groups, models from the registry, a few real steps, resume,
error messages."""
import copy
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from compress import create_dynamicvit
from compress.data.datasets import build_loaders
from compress.models import model_from_config, variant
from compress.models.checkpoint import load_dynamicvit
from compress.plumbing.cli import run_cli
from compress.training.loop import (
    DistEnv,
    OptimizerConfig,
    TrainingDiverged,
    apply_lr,
    fit,
    read_json_lines,
    scheduled_lr,
)
from compress.training.losses import (
    LossWeights,
    dynamicvit_loss,
    keep_ratio_loss,
    logit_distillation_loss,
    stage_targets,
    token_distillation_loss,
)
from compress.training.tocom_train import ToComTrainConfig
from compress.training.train import TrainConfig, dynamicvit_param_groups, main, new_model_config, train
from conftest import demo_batch

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TINY_FLAGS = ["--embed-dim", "32", "--depth", "4", "--num-heads", "2"]


def tiny_model(keep_ratio=0.7):
    return create_dynamicvit("vit_small_patch16_224", keep_ratio, None, **TINY)


def tiny_config(tmp_path, **overrides):
    values = dict(out=str(tmp_path / "run"), embed_dim=32, depth=4, num_heads=2, epochs=2, batch_size=32,
                  limit_train=128, limit_eval=64, lr=1e-3, warmup_epochs=0.5, backbone_frozen_epochs=1,
                  ema_decay=0.9, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- loss terms


def test_keep_ratio_loss_is_mean_over_stages_of_squared_gap_to_rho_power_k():
    assert stage_targets(0.7, 3) == pytest.approx([0.7, 0.49, 0.343])
    decisions = [torch.ones(2, 64), torch.zeros(2, 64), torch.cat([torch.ones(2, 32), torch.zeros(2, 32)], 1)]
    expected = ((1 - 0.7) ** 2 + (0 - 0.49) ** 2 + (0.5 - 0.343) ** 2) / 3
    assert float(keep_ratio_loss(decisions, 0.7)) == pytest.approx(expected, rel=1e-6)


def test_logit_distillation_is_zero_for_equal_logits_and_matches_kl_definition():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    assert float(logit_distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum() / 4
    assert float(logit_distillation_loss(student, teacher)) == pytest.approx(float(expected), rel=1e-5)


def test_token_distillation_counts_only_kept_tokens():
    student, teacher = torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)
    student[0, 3] = 10.0  # a dropped token: must not count
    student[0, 0] = 1.0
    keep = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert float(token_distillation_loss(student, teacher, keep)) == pytest.approx(2 * 1.0 / (2 * 2))
    assert float(token_distillation_loss(student, teacher, torch.zeros(1, 4))) == 0.0


def test_full_loss_is_weighted_sum_of_terms():
    model = tiny_model().train()
    images, labels = demo_batch(8)
    out = model.forward_masked(images)
    with torch.no_grad():
        t_logits, t_tokens = copy.deepcopy(model).eval().forward_dense(images)
    total, terms = dynamicvit_loss(out, t_logits, t_tokens, labels, 0.7, LossWeights(2.0, 0.5, 0.5))
    expected = terms["cls"] + 2.0 * terms["ratio"] + 0.5 * terms["kl"] + 0.5 * terms["token_mse"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- schedule and groups


def test_warmup_then_cosine_per_iteration():
    lrs = [scheduled_lr(s, 1e-3, 1e-6, 10, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5, rel=1e-6) and lrs[100] == pytest.approx(1e-6)


def test_recipe_parameter_groups():
    model = tiny_model()
    groups = dynamicvit_param_groups(model, 0.05, 0.01, 2)
    assert not model.cls_token.requires_grad and not model.pos_embed.requires_grad
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(model.cls_token) not in grouped and id(model.pos_embed) not in grouped
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    apply_lr(optimizer, 1e-3, epoch=1)
    by_name = {(g["name"], g["weight_decay"]): g["lr"] for g in optimizer.param_groups}
    assert by_name[("predictors", 0.05)] == 1e-3 and by_name[("backbone", 0.05)] == 0.0
    apply_lr(optimizer, 1e-3, epoch=2)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["backbone"] == pytest.approx(1e-5)
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if all(p.ndim <= 1 for p in g["params"]))


# ----------------------------------------------------------------------------- the loop


class LinearRegression:
    """A real objective on seeded data: the squared error of a linear model, with two named terms to check
    how ``fit`` averages them (it records every loss it returns)."""

    divergence_hint = "lower the rate"

    def __init__(self, model: torch.nn.Module):
        self.model, self.losses = model, []

    def __call__(self, inputs, targets):
        loss = (self.model(inputs).squeeze(1) - targets).pow(2).mean()
        self.losses.append(float(loss.detach()))
        return loss, {"half": self.losses[-1] / 2, "one": 1.0}


def regression_run(epochs=3, lr=0.3):
    """(objective, optimizer, loader, schedule) of a linear fit: 64 seeded points, 8 batches of 8 per epoch."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    loader, _ = build_loaders(TensorDataset(inputs, targets), TensorDataset(inputs, targets), batch_size=8)
    model = torch.nn.Linear(4, 1)
    config = OptimizerConfig(epochs=epochs, warmup_epochs=0.5, lr=lr, weight_decay=0.0)
    schedule = config.schedule(config.peak_lr(8, 1e-3, 1024), len(loader))
    return LinearRegression(model), config.adamw([{"params": list(model.parameters())}], schedule.base_lr), loader, schedule


def test_fit_yields_per_batch_means_of_the_named_terms_every_epoch_and_learns():
    objective, optimizer, loader, schedule = regression_run()
    summaries = list(fit(objective, optimizer, loader, schedule, DistEnv()))
    assert [(s.epoch, s.step) for s in summaries] == [(1, 8), (2, 16), (3, 24)]
    for epoch, summary in enumerate(summaries):
        losses = objective.losses[8 * epoch:8 * (epoch + 1)]
        assert set(summary.means) == {"loss", "half", "one"} and summary.means["one"] == 1.0
        assert summary.means["loss"] == pytest.approx(sum(losses) / 8, rel=1e-12)
        assert summary.means["half"] == pytest.approx(summary.means["loss"] / 2, rel=1e-12)
    assert summaries[-1].lr == pytest.approx(schedule.lr(23)) and optimizer.param_groups[0]["lr"] == summaries[-1].lr
    assert summaries[-1].means["loss"] < 0.1 * summaries[0].means["loss"], [s.means["loss"] for s in summaries]


def test_fit_stops_when_the_caller_leaves_and_continues_from_a_step():
    objective, optimizer, loader, schedule = regression_run()
    for summary in fit(objective, optimizer, loader, schedule, DistEnv()):
        break
    assert summary.epoch == 1 and len(objective.losses) == 8
    rest = list(fit(objective, optimizer, loader, schedule, DistEnv(), start_epoch=1, start_step=8))
    assert [(s.epoch, s.step) for s in rest] == [(2, 16), (3, 24)] and len(objective.losses) == 24


def test_fit_refuses_a_loss_that_is_not_finite():
    _, optimizer, loader, schedule = regression_run()

    class Diverging:
        divergence_hint = "lower the rate"

        def __call__(self, inputs, targets):
            return optimizer.param_groups[0]["params"][0].sum() * float("nan"), {}

    with pytest.raises(TrainingDiverged, match=r"^loss became nan at step 0 \(epoch 1\): lower the rate$"):
        next(fit(Diverging(), optimizer, loader, schedule, DistEnv()))


def test_one_optimiser_config_scales_the_rate_and_builds_the_schedule():
    config = OptimizerConfig(epochs=3, warmup_epochs=0.5)
    assert config.peak_lr(256, 1e-3, 1024) == pytest.approx(2.5e-4) and OptimizerConfig(lr=0.1).peak_lr(256, 1e-3, 1024) == 0.1
    schedule = config.schedule(1e-3, steps_per_epoch=6)
    assert (schedule.warmup_steps, schedule.total_steps, schedule.epochs) == (3, 18, 3)
    assert schedule.lr(3) == pytest.approx(1e-3) and schedule.lr(18) == pytest.approx(1e-6)
    assert isinstance(TrainConfig(), OptimizerConfig) and isinstance(ToComTrainConfig(), OptimizerConfig)
    assert (TrainConfig().epochs, TrainConfig().warmup_epochs) == (30, 5.0)  # the DynamicViT recipe
    assert (ToComTrainConfig().epochs, ToComTrainConfig().warmup_epochs) == (10, 1.0)  # the ToCom recipe


# ----------------------------------------------------------------------------- models from the registry


def test_models_come_from_the_registry_and_a_changed_depth_gets_the_family_spacing():
    demo = new_model_config(TrainConfig(), num_classes=10, image_size=64)
    assert demo.pruning_locations == variant("demo-vit").pruning_locations == (1, 3, 5)
    assert demo.backbone_kwargs["embed_dim"] == 64 and demo.keep_ratio == TrainConfig().keep_ratio
    deeper = model_from_config(new_model_config(TrainConfig(depth=8), 10, 64))
    assert len(deeper.blocks) == 8 and deeper.config.pruning_locations == (2, 4, 6)
    assert new_model_config(TrainConfig(depth=8, pruning_locations=(1, 2, 3)), 10, 64).pruning_locations == (1, 2, 3)
    assert new_model_config(TrainConfig(mode="dense"), 10, 64).keep_ratio == 1.0


# ----------------------------------------------------------------------------- real steps


def test_a_few_steps_on_demo_data_reduce_the_loss():
    torch.manual_seed(0)
    model = tiny_model().train()
    teacher = copy.deepcopy(model).eval()
    images, labels = demo_batch(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    losses = []
    for _ in range(30):
        out = model.forward_masked(images)
        with torch.no_grad():
            t_logits, t_tokens = teacher.forward_dense(images)
        loss, _ = dynamicvit_loss(out, t_logits, t_tokens, labels, 0.7)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_ratio_loss_drives_stage_keep_fractions_toward_rho_powers():
    torch.manual_seed(0)
    model = tiny_model(keep_ratio=0.8).train()
    images, _ = demo_batch(64)
    targets = stage_targets(0.8, 3)  # 0.8, 0.64, 0.512; untrained predictors keep ~0.5, 0.25, 0.125
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if n.startswith("score_predictor")], lr=1e-2)

    def stage_means():
        with torch.no_grad():
            return [float(d.mean()) for d in model.forward_masked(images).stage_decisions]

    before = stage_means()
    for _ in range(40):
        loss = keep_ratio_loss(model.forward_masked(images).stage_decisions, 0.8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = [sum(v) / 3 for v in zip(*(stage_means() for _ in range(3)))]
    for b, a, t in zip(before, after, targets):
        assert abs(a - t) < 0.5 * abs(b - t), (before, after, targets)
        assert abs(a - t) < 0.08, (after, targets)


def test_cli_run_writes_reference_format_checkpoint_with_training_metadata(tmp_path):
    result = train(tiny_config(tmp_path, epochs=1))
    loaded = load_dynamicvit(result.out / "model.pth")
    assert loaded.notes == [] and loaded.model.keep_ratio == 0.7
    assert loaded.model.config.pruning_locations == (1, 2, 3)
    meta = loaded.metadata
    assert meta["data"]["dataset"] == "demo-digits" and meta["data"]["image_size"] == 64
    assert meta["data"]["num_classes"] == 10 and meta["step"] == 4 and meta["epoch"] == 1
    assert meta["training"]["mode"] == "dynamicvit" and "optimizer" not in meta
    record = read_json_lines(result.out / "log.jsonl")[0]
    assert {"train_loss", "eval_top1", "eval_top1_ema", "train_keep_fraction"} <= set(record)
    assert (result.out / "model_ema.pth").is_file() and (result.out / "checkpoint.pth").is_file()


def test_resume_continues_from_saved_step_with_identical_state(tmp_path):
    straight = train(tiny_config(tmp_path / "a", epochs=2))
    interrupted = train(tiny_config(tmp_path / "b", epochs=2, stop_after=1))
    assert interrupted.step == 4 and not (tmp_path / "b" / "run" / "model.pth").exists()
    resumed = train(tiny_config(tmp_path / "b", epochs=2, resume="auto"))
    assert straight.step == resumed.step == 8
    reference = straight.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    a = torch.load(tmp_path / "a" / "run" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoint.pth", weights_only=True)
    for name, value in a["model_ema"].items():
        assert torch.equal(value, b["model_ema"][name]), name
    assert [r["step"] for r in read_json_lines(tmp_path / "b" / "run" / "log.jsonl")] == [4, 8]
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


# ----------------------------------------------------------------------------- user errors


def _one_error_line(capsys, argv):
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_data_folder_is_one_line_error(tmp_path, capsys):
    line = _one_error_line(capsys, ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert "data folder not found" in line


def test_bad_init_checkpoint_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    line = _one_error_line(capsys, ["--init", str(bad), "--out", str(tmp_path / "o")])
    assert "bad.pth" in line
    assert "not found" in _one_error_line(capsys, ["--init", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")])


def test_unwritable_output_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    line = _one_error_line(capsys, ["--out", str(blocker / "run"), *TINY_FLAGS])
    assert "not writable" in line


def test_resume_without_checkpoint_is_one_line_error(tmp_path, capsys):
    line = _one_error_line(capsys, ["--out", str(tmp_path / "empty"), "--resume", *TINY_FLAGS])
    assert "checkpoint" in line
