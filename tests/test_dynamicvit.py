import pytest
import torch
import torch.nn.functional as F

from compress import create_dynamicvit
from compress.models.complexity import analytic_macs
from conftest import assert_masked_forward_matches_pruned

PREDICTOR_KEYS = {
    f"score_predictor.{stage}.{layer}.{kind}"
    for stage in range(3)
    for layer in ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4")
    for kind in ("weight", "bias")
}
BACKBONE_TOP_KEYS = {"cls_token", "pos_embed", "patch_embed", "blocks", "norm", "head", "score_predictor"}


def test_deit_small_has_reference_keys_and_parameter_count():
    model = create_dynamicvit("dynamicvit_deit_small")
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 22_774_414
    assert sum(p.numel() for name, p in model.named_parameters() if name.startswith("score_predictor")) == 3 * 241_250
    assert {k for k in state if k.startswith("score_predictor")} == PREDICTOR_KEYS
    assert {k.split(".")[0] for k in state} == BACKBONE_TOP_KEYS
    assert "blocks.11.attn.qkv.weight" in state and "blocks.0.mlp.fc2.bias" in state
    assert list(model.buffers()) == []
    assert model.score_predictor[0].in_conv[0].eps == 1e-5 and model.norm.eps == 1e-6


def test_deit_base_parameter_count():
    assert sum(p.numel() for p in create_dynamicvit("dynamicvit_deit_base").parameters()) == 89_452_846


def test_analytic_macs_match_paper_for_deit_small():
    shape = create_dynamicvit("dynamicvit_deit_small").cost_shape()
    assert round(analytic_macs(shape, 1.0) / 1e9, 2) == 4.60
    assert round(analytic_macs(shape, 0.7) / 1e9, 2) == 2.98
    assert round(analytic_macs(shape, 0.6) / 1e9, 2) == 2.56


def test_pruned_forward_keeps_spec_counts_and_maps_indices_to_patch_grid(tiny_model):
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, kept = tiny_model.forward_pruned(images, return_indices=True)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert [k.shape[1] for k in kept] == [137, 96, 67]
    for earlier, later in zip(kept, kept[1:]):
        for row in range(2):  # later stages keep a subset of earlier positions
            assert set(later[row].tolist()) <= set(earlier[row].tolist())
    assert all(0 <= int(k.min()) and int(k.max()) < 196 for k in kept)


def test_masked_forward_driven_by_topk_equals_pruned_forward(tiny_model):
    """The training forward (attention masking) with inference's choices gives inference's logits."""
    assert_masked_forward_matches_pruned(tiny_model, torch.randn(3, 3, 224, 224))


def test_gradients_reach_every_prediction_module_through_gumbel():
    model = create_dynamicvit("dynamicvit_deit_tiny", keep_ratio=0.7).train()
    images, labels = torch.randn(2, 3, 224, 224), torch.tensor([1, 2])
    out = model(images)
    assert len(out.stage_decisions) == 3
    assert all(set(d.unique().tolist()) <= {0.0, 1.0} for d in out.stage_decisions)
    for earlier, later in zip(out.stage_decisions, out.stage_decisions[1:]):
        assert (later <= earlier).all()  # once dropped, never back
    F.cross_entropy(out.logits, labels).backward()  # classification loss only: the straight-through path
    for stage, predictor in enumerate(model.score_predictor):
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), stage
        assert predictor.out_conv[4].weight.grad.abs().sum() > 0, stage


def test_equal_scores_keep_the_lowest_positions(tiny_model):
    for predictor in tiny_model.score_predictor:  # every token gets the same keep log-probability
        torch.nn.init.zeros_(predictor.out_conv[4].weight)
        torch.nn.init.zeros_(predictor.out_conv[4].bias)
    with torch.no_grad():
        _, kept = tiny_model.forward_pruned(torch.randn(2, 3, 224, 224), return_indices=True)
    for positions, count in zip(kept, [137, 96, 67]):
        assert positions.tolist() == [list(range(count))] * 2


def test_keep_ratio_one_is_the_dense_backbone(tiny_model):
    images = torch.randn(2, 3, 224, 224)
    tiny_model.keep_ratio = 1.0
    with torch.no_grad():
        dense_logits, _ = tiny_model.forward_dense(images)
        torch.testing.assert_close(tiny_model(images), dense_logits, atol=0, rtol=0)


def test_any_timm_vit_with_cls_token_can_be_wrapped():
    model = create_dynamicvit("vit_small_patch16_224", keep_ratio=0.5, img_size=96, depth=8, num_classes=7).eval()
    assert model.config.pruning_locations == (2, 4, 6)
    assert model.stage_keep_counts() == [18, 9, 4]
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_backbone_without_cls_token_is_refused():
    with pytest.raises(ValueError, match="no CLS token"):
        create_dynamicvit("vit_small_patch16_224", class_token=False, global_pool="avg")
