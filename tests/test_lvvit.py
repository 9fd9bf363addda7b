"""LV-ViT DynamicViT (and DeiT-256) against golden outputs of the reference implementation.

``tests/data/lvvit_golden.npz`` was produced once by running raoyongming/DynamicViT's own model classes
(``LVViTDiffPruning`` as its infer.py builds ``lvvit-s`` / ``lvvit-m``, ``VisionTransformerDiffPruning`` as it
builds ``deit-256``) in eval mode on the two stored images, with weights from ``seeded_state_dict`` below (seeds
1401, 1402, 1403) loaded strictly; docs/models.md says how. It holds the images (uint8), the reference's state-dict
keys and sizes, parameter counts, and at keep 0.5 and 0.7 its logits and kept patch positions per stage.
"""
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calibration.int8 import quantize_for_export, transplant_qdq
from compress.models import UnknownModel, config_for, create_model, model_from_config
from compress.models import tocom
from compress.models.checkpoint import load_dynamicvit
from compress.models.complexity import analytic_macs
from compress.models.dynamicvit import gumbel_keep_decision
from compress.models.lvvit import DynamicLVViT, token_label_logits
from compress.plumbing.errors import CheckpointError
from compress.training.losses import dynamicvit_loss
from conftest import assert_masked_forward_matches_pruned
from export.deploy import deploy_copy
from export.onnx_export import export_onnx
from export.validate import onnxruntime_session, pytorch_reference

GOLDEN = np.load(Path(__file__).parent / "data" / "lvvit_golden.npz")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# golden name -> (registered variant, weight seed)
REFERENCE_MODELS = {"lvvit_s": ("dynamicvit_lvvit_s", 1401), "lvvit_m": ("dynamicvit_lvvit_m", 1402),
                    "deit_256": ("dynamicvit_deit_256", 1403)}
KEEP_RATIOS = (0.5, 0.7)
TINY = {"img_size": 64, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10}


def seeded_state_dict(template: dict, seed: int) -> dict:
    """Deterministic random weights for the keys of ``template``, drawn in sorted key order from one generator.

    Matrices and convolutions N(0, 1/fan_in) (fan_in = size of one output row); 1-D ``*weight`` (norm scales)
    1 + 0.2 N; other 1-D tensors (biases) 0.05 N; BatchNorm running means 0.2 N and variances 0.5 + |N|;
    integer buffers (num_batches_tracked) zero. Only keys and shapes of ``template`` are read (meta tensors do).
    The reference models got exactly these weights.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key in sorted(template):
        like = template[key]
        if not like.is_floating_point():
            weights[key] = torch.zeros(like.shape, dtype=like.dtype)
            continue
        noise = torch.randn(like.shape, generator=generator)
        if key.endswith("running_var"):
            value = 0.5 + noise.abs()
        elif key.endswith("running_mean"):
            value = 0.2 * noise
        elif like.dim() == 1 and key.endswith("weight"):
            value = 1.0 + 0.2 * noise
        elif like.dim() == 1:
            value = 0.05 * noise
        else:
            value = noise / math.sqrt(like[0].numel())
        weights[key] = value
    return weights


def meta_model(variant: str, **overrides):
    """A registered variant without memory or initialisation cost: for keys, shapes and counts only."""
    if variant.startswith("dynamicvit_deit"):  # timm's builder computes on real tensors
        return create_model(variant, **overrides)
    with torch.device("meta"):
        return create_model(variant, **overrides)


def golden_images() -> torch.Tensor:
    return (torch.from_numpy(GOLDEN["images"]).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD


def reference_checkpoint(name: str, path: Path) -> Path:
    """The seeded weights of ``name`` saved the way the reference saves checkpoints: {"model": state_dict}."""
    variant, seed = REFERENCE_MODELS[name]
    torch.save({"model": seeded_state_dict(meta_model(variant).state_dict(), seed)}, path)
    return path


def assert_matches_golden(name: str, keep: float, logits: np.ndarray, kept: list) -> None:
    tag = f"{name}/keep{keep}"
    np.testing.assert_allclose(logits, GOLDEN[f"{tag}/logits"], atol=1e-4, rtol=0, err_msg=tag)
    for stage, positions in enumerate(kept, 1):  # same tokens in the same (descending-score) order
        np.testing.assert_array_equal(np.asarray(positions), GOLDEN[f"{tag}/kept_stage{stage}"], err_msg=tag)


def tiny_lvvit(keep_ratio: float = 0.7, **overrides) -> DynamicLVViT:
    return create_model("dynamicvit_lvvit_s", keep_ratio, (1, 2, 3), **{**TINY, **overrides}).eval()


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_state_dict_keys_sizes_and_parameter_count_are_the_references(name):
    model = meta_model(REFERENCE_MODELS[name][0])
    state = model.state_dict()
    assert sorted(state) == GOLDEN[f"{name}/keys"].tolist()
    assert [state[k].numel() for k in sorted(state)] == GOLDEN[f"{name}/numel"].tolist()
    assert sum(p.numel() for p in model.parameters()) == int(GOLDEN[f"{name}/param_count"])


def test_lvvit_variants_are_the_model_zoo_architectures():
    small, medium = meta_model("dynamicvit_lvvit_s"), meta_model("dynamicvit_lvvit_m")
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (384, 16, 6)
    assert (medium.embed_dim, len(medium.blocks), medium.blocks[0].attn.num_heads) == (512, 20, 8)
    assert small.config.pruning_locations == (4, 8, 12) and medium.config.pruning_locations == (5, 10, 15)
    assert small.blocks[0].mlp.fc1.out_features == 1152 and small.blocks[0].skip_lam == 2.0
    assert small.blocks[0].attn.qkv.bias is None and small.norm.eps == 1e-5
    assert small.stage_keep_counts(0.7) == [137, 96, 67] and small.image_shape == (3, 224, 224)
    # by backbone name: DynamicViT's spacing for the depth
    assert meta_model("lvvit_m", depth=8, embed_dim=64, num_heads=1).config.pruning_locations == (2, 4, 6)


def test_bad_lvvit_arguments_are_pipeline_errors():
    with pytest.raises(UnknownModel, match="takes no argument"):
        create_model("dynamicvit_lvvit_s", qkv_norm=True)
    with pytest.raises(UnknownModel, match="even patch size"):
        create_model("dynamicvit_lvvit_s", img_size=100)


# ----------------------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("name", ["lvvit_s", pytest.param("lvvit_m", marks=pytest.mark.slow), "deit_256"])
def test_reference_checkpoint_loads_by_its_keys_and_matches_reference_outputs(name, tmp_path):
    """Reference format, no model name: the architecture is read from the weights; logits within 1e-4 of the
    reference's eval output and the same kept tokens in the same order (measured: LV-ViT bit-identical,
    DeiT-256 2.6e-6)."""
    loaded = load_dynamicvit(reference_checkpoint(name, tmp_path / f"{name}.pth"))
    model = loaded.model.eval()
    assert model.config == config_for(REFERENCE_MODELS[name][0])  # recognised as the registered variant
    bn = getattr(model.patch_embed, "bn2", None)
    if bn is not None:  # BatchNorm running statistics travel with the checkpoint
        assert bn.running_var.min() >= 0.5 and bn.running_mean.abs().max() > 0
    images = golden_images()
    for keep in KEEP_RATIOS:
        with torch.no_grad():
            logits, kept = model.forward_pruned(images, return_indices=True, keep_ratio=keep)
        assert_matches_golden(name, keep, logits.numpy(), [k.numpy() for k in kept])


def test_wrong_lvvit_checkpoint_gets_the_loaders_clear_error(tmp_path):
    weights = seeded_state_dict(tiny_lvvit().state_dict(), 0)
    broken = dict(weights)
    del broken["blocks.1.attn.proj.bias"]
    broken["aux_head.weight"] = torch.zeros(7, 64)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="does not match lvvit_s DynamicViT: missing keys: blocks.1.attn.proj.bias"):
        load_dynamicvit(tmp_path / "broken.pth")
    torch.save({"model": {k: v for k, v in weights.items() if not k.startswith("blocks.")}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="it has no 'blocks"):
        load_dynamicvit(tmp_path / "empty.pth")


def test_small_lvvit_checkpoint_round_trips_with_inferred_architecture(tmp_path):
    model = tiny_lvvit(patch_size=8, embed_dim=128)
    model.load_state_dict(seeded_state_dict(model.state_dict(), 5))
    torch.save({"model": model.state_dict()}, tmp_path / "tiny.pth")
    loaded = load_dynamicvit(tmp_path / "tiny.pth").model.eval()
    assert loaded.config.backbone_kwargs["num_heads"] == 2  # width 128 / head width 64
    assert loaded.config.pruning_locations == (1, 2, 3) and loaded.image_shape == (3, 64, 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_pruned(images), model.forward_pruned(images), atol=0, rtol=0)


def test_backbone_only_lvvit_weights_load_with_new_prediction_modules(tmp_path):
    model = tiny_lvvit(patch_size=8)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("score_predictor.")}
    torch.save(backbone, tmp_path / "backbone.pth")
    loaded = load_dynamicvit(tmp_path / "backbone.pth")
    assert any("prediction modules newly initialised" in note for note in loaded.notes)
    assert torch.equal(loaded.model.patch_embed.bn1.running_var, model.patch_embed.bn1.running_var)


# ----------------------------------------------------------------------------- the method on LV-ViT


def test_aux_head_max_runs_over_kept_patch_tokens_only():
    cls_logits = torch.tensor([[1.0, 0.0]])
    patch_logits = torch.tensor([[[4.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    assert token_label_logits(cls_logits, patch_logits).tolist() == [[3.0, 1.0]]
    assert token_label_logits(cls_logits, patch_logits, torch.tensor([[0.0, 1.0, 1.0]])).tolist() == [[1.5, 1.0]]
    assert token_label_logits(cls_logits, patch_logits, torch.zeros(1, 3)).tolist() == [[1.0, 0.0]]


def test_masked_forward_driven_by_topk_equals_pruned_forward():
    """Training's forward (dropped tokens stay; attention masking; aux max over kept tokens) with inference's
    choices gives inference's logits."""
    assert_masked_forward_matches_pruned(tiny_lvvit(img_size=96), torch.randn(3, 3, 96, 96))


def test_training_forward_sends_gradients_to_every_prediction_module_and_the_stem():
    model = tiny_lvvit().train()
    out = model(torch.randn(4, 3, 64, 64))
    assert len(out.stage_decisions) == 3 and out.patch_tokens.shape == (4, 16, 64)
    (out.logits.logsumexp(-1).sum() + sum(d.sum() for d in out.stage_decisions)).backward()
    for predictor in model.score_predictor:
        assert predictor.in_conv[1].weight.grad.abs().sum() > 0
    assert model.patch_embed.conv1.weight.grad.abs().sum() > 0 and model.aux_head.weight.grad.abs().sum() > 0


def test_a_row_with_every_token_dropped_stays_finite_in_training():
    model = tiny_lvvit().train()

    def drop_all_of_row_0(log_probs, previous, stage):  # training's Gumbel decisions; row 0 loses every token first
        decision = gumbel_keep_decision(log_probs, previous, stage)
        return decision * torch.tensor([[0.0], [1.0]]) if stage == 0 else decision

    out = model.forward_masked(torch.randn(2, 3, 64, 64), decide=drop_all_of_row_0)
    out.logits.sum().backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_distillation_steps_with_the_project_loss_reduce_it_on_lvvit():
    """compress.train's loss (cross-entropy, keep ratio, logit KL, token MSE) from a frozen dense teacher:
    thirty AdamW steps on one fixed batch lower it (first five steps' mean against the last five's)."""
    torch.manual_seed(0)
    student = tiny_lvvit(stem_channels=16).train()  # a narrow stem: its convolutions dominate the step time
    teacher = tiny_lvvit(stem_channels=16).eval()
    teacher.load_state_dict(student.state_dict())
    images, labels = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    with torch.no_grad():
        teacher_logits, teacher_tokens = teacher.forward_dense(images)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        total, _ = dynamicvit_loss(student(images), teacher_logits, teacher_tokens, labels, 0.7)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses  # measured: 2.52 -> 1.83


def test_analytic_macs_include_the_stem_and_the_aux_head():
    small, medium = meta_model("dynamicvit_lvvit_s").cost_shape(), meta_model("dynamicvit_lvvit_m").cost_shape()
    # conv1 7x7 3->64, conv2/conv3 3x3 64->64 at 112x112, proj 8x8 s8 64->384 on the 14x14 grid
    assert small.stem_macs == 112 * 112 * (3 * 64 * 49 + 2 * 64 * 64 * 9) + 196 * 64 * 384 * 64
    gmacs = {(shape_name, keep): round(analytic_macs(shape, keep) / 1e9, 2)
             for shape_name, shape in (("s", small), ("m", medium)) for keep in (1.0, 0.7, 0.5)}
    # the reference's own counter (fvcore over its models at HEAD, norms left out) gives 4.650 / 3.790 / 8.593 G
    assert gmacs[("s", 1.0)] == 6.55 and gmacs[("s", 0.7)] == 4.65 and gmacs[("s", 0.5)] == 3.79
    assert gmacs[("m", 1.0)] == 12.68 and gmacs[("m", 0.7)] == 8.59
    # its model-zoo table: LV-ViT-S/0.5 3.7 G, /0.7 4.6 G, LV-ViT-M/0.7 8.5 G (docs/models.md explains the gap)
    for ours, table in ((gmacs[("s", 0.5)], 3.7), (gmacs[("s", 0.7)], 4.6), (gmacs[("m", 0.7)], 8.5)):
        assert abs(ours / table - 1) < 0.03


def test_tocom_merge_equals_runtime_hooks_on_lvvit_without_qkv_bias():
    model = tiny_lvvit()
    assert model.blocks[0].attn.qkv.bias is None
    plugin = tocom.plugin_for_model(model)
    with torch.no_grad():
        for layer in plugin.layers:
            for up in (layer.q_up, layer.v_up):
                up.normal_(0.0, 0.5)
    plugin.eval()
    images = torch.randn(3, 3, 64, 64)
    with tocom.attach(model, plugin), plugin.compensating(0.7, 0.5, 0.1), torch.no_grad():
        hooked, hooked_kept = model.forward_pruned(images, return_indices=True, keep_ratio=0.5)
    with torch.no_grad():
        plain = model.forward_pruned(images, keep_ratio=0.5)
    tocom.merge_plugin(model, plugin, 0.7, 0.5, 0.1)
    with torch.no_grad():
        merged, merged_kept = model.forward_pruned(images, return_indices=True, keep_ratio=0.5)
    assert (hooked - plain).abs().max() > 1e-3  # the plugin changes the outputs ...
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=0)  # ... and merging changes them the same way
    assert all(torch.equal(a, b) for a, b in zip(merged_kept, hooked_kept))


# ----------------------------------------------------------------------------- export


def run_graph(proto, images: torch.Tensor) -> list[np.ndarray]:
    return onnxruntime_session(proto).run(None, {"images": images.numpy()})


@pytest.mark.parametrize("keep", (*KEEP_RATIOS, 1.0))
def test_small_lvvit_exports_in_both_gather_flavours_and_matches_pytorch(keep):
    model = tiny_lvvit(img_size=96)
    model.load_state_dict(seeded_state_dict(model.state_dict(), 9))  # non-trivial BatchNorm statistics
    model.keep_ratio = keep
    images = torch.randn(2, 3, 96, 96)
    logits, kept = pytorch_reference(model, images)
    outputs = {flavour: run_graph(export_onnx(deploy_copy(model, keep), flavour, batch_size=2, with_indices=True), images)
               for flavour in ("native", "plugin")}
    np.testing.assert_allclose(outputs["native"][0], logits, atol=1e-4, rtol=0)
    assert len(outputs["native"]) == 1 + len(model.stage_keep_counts(keep))  # keep 1.0: the dense model
    for got, want in zip(outputs["native"][1:], kept):
        np.testing.assert_array_equal(got, want)
    for a, b in zip(outputs["native"], outputs["plugin"]):  # the plugin op computes exactly the native selection
        np.testing.assert_array_equal(a, b)


def conv_weights(proto: onnx.ModelProto) -> list[np.ndarray]:
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [arrays[node.input[1]].astype(np.float32) for node in proto.graph.node if node.op_type == "Conv"]


def test_small_lvvit_fp16_graph_keeps_batchnorm_in_float32_and_stays_close():
    model = tiny_lvvit(img_size=96)
    model.load_state_dict(seeded_state_dict(model.state_dict(), 9))
    proto = export_onnx(deploy_copy(model, 0.7, "fp16"), "native", batch_size=2)
    float32_proto = export_onnx(deploy_copy(model, 0.7), "native", batch_size=2)
    scales = [node.input[1] for node in proto.graph.node if node.op_type == "BatchNormalization"]
    kinds = {t.name: t.data_type for t in proto.graph.initializer}
    assert len(scales) == 3 and all(kinds[name] == onnx.TensorProto.FLOAT for name in scales)
    # Neither graph folds BatchNorm into the convolutions, so both carry the same convolution weights: INT8
    # calibrates on the float32 graph and moves its quantised weights onto the float16 one.
    assert sum(node.op_type == "BatchNormalization" for node in float32_proto.graph.node) == 3
    for half, full in zip(conv_weights(proto), conv_weights(float32_proto), strict=True):
        np.testing.assert_allclose(half, full, rtol=1e-3, atol=1e-6)
    images = torch.randn(2, 3, 96, 96)
    logits, _ = pytorch_reference(model, images)
    assert np.abs(run_graph(proto, images)[0] - logits).max() < 2e-2


def test_int8_on_the_float16_graph_agrees_with_pytorch_when_batchnorm_is_far_from_identity():
    """Calibrated on the float32 graph, Q/DQ moved onto the float16 one (what export.build --int8 ships).
    Measured: max abs 0.046, top-1 8/8; with BatchNorm folded into the float32 graph's convolutions the
    moved weights met a second BatchNorm: 0.29, top-1 0/8."""
    model = tiny_lvvit(patch_size=8)
    with torch.no_grad():
        for bn in (model.patch_embed.bn1, model.patch_embed.bn2, model.patch_embed.bn3):
            bn.running_var.uniform_(0.001, 0.01)
            bn.running_mean.normal_(0.0, 0.05)
            bn.weight.uniform_(0.5, 2.0)
    calibration, images = torch.randn(16, 3, 64, 64), torch.randn(8, 3, 64, 64)
    quantized, _ = quantize_for_export(export_onnx(deploy_copy(model, 0.7), "native", batch_size=8),
                                       calibration.numpy(), method="ort")
    int8 = transplant_qdq(quantized, export_onnx(deploy_copy(model, 0.7, "fp16"), "native", batch_size=8))
    logits, _ = pytorch_reference(model, images)
    got = run_graph(int8, images)[0]
    assert np.abs(got - logits).max() < 0.15 and (got.argmax(1) == logits.argmax(1)).mean() >= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lvvit_s", "lvvit_m", "deit_256"])
def test_full_size_onnx_matches_reference_outputs(name, tmp_path):
    """The exported graph (ONNX Runtime, native gather) of the reference-format checkpoint against the
    reference's eval output: logits within 1e-4, identical kept tokens, at keep 0.5 and 0.7."""
    model = load_dynamicvit(reference_checkpoint(name, tmp_path / f"{name}.pth")).model
    images = golden_images()
    for keep in KEEP_RATIOS:
        outputs = run_graph(export_onnx(deploy_copy(model, keep), "native", batch_size=2, with_indices=True), images)
        assert_matches_golden(name, keep, outputs[0], outputs[1:])


def test_model_from_config_rebuilds_an_lvvit():
    model = tiny_lvvit(keep_ratio=0.6)
    rebuilt = model_from_config(model.config)
    assert isinstance(rebuilt, DynamicLVViT) and rebuilt.keep_ratio == 0.6
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
