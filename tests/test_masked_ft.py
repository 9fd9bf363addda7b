"""Masked fine-tuning: random visible subsets, the visible-patch forward, and the command."""
import torch

from compress import create_dynamicvit

from compress.masked_ft import build_parser, main
from compress.models.checkpoint import load_dynamicvit
from compress.training import train
from compress.training.masking import forward_visible_patches, random_visible_patches, sample_mask_ratio, visible_patch_count

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def test_random_visible_patches_are_distinct_sorted_and_differ_per_image():
    indices = random_visible_patches(4, 64, 20)
    assert indices.shape == (4, 20)
    for row in indices:
        assert len(set(row.tolist())) == 20 and row.tolist() == sorted(row.tolist()) and int(row.max()) < 64
    assert not all(torch.equal(indices[0], row) for row in indices[1:])


def test_mask_ratio_and_visible_count():
    torch.manual_seed(0)
    ratios = [sample_mask_ratio(0.2, 0.6) for _ in range(200)]
    assert 0.2 <= min(ratios) and max(ratios) <= 0.6 and max(ratios) - min(ratios) > 0.3
    assert visible_patch_count(64, 0.0) == 64 and visible_patch_count(64, 0.75) == 16 and visible_patch_count(64, 0.999) == 1


def test_all_patches_visible_equals_dense_forward_and_subset_changes_logits():
    model = create_dynamicvit("vit_small_patch16_224", 1.0, None, **TINY).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = model.forward_dense(images)[0]
        full = forward_visible_patches(model, images, torch.arange(64).expand(2, 64))
        partial = forward_visible_patches(model, images, random_visible_patches(2, 64, 8))
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=0)
    assert not torch.allclose(partial, dense, atol=1e-3)


def test_masked_ft_command_writes_a_full_image_model(tmp_path):
    out = tmp_path / "mft"
    assert main(["--out", str(out), "--embed-dim", "32", "--depth", "4", "--num-heads", "2", "--epochs", "1",
                 "--batch-size", "32", "--limit-train", "64", "--limit-eval", "32", "--mask-ratio-min", "0.3",
                 "--mask-ratio-max", "0.7", "--device", "cpu"]) == 0
    loaded = load_dynamicvit(out / "model.pth")
    assert loaded.model.keep_ratio == 1.0
    assert loaded.metadata["training"]["mode"] == "masked"
    assert loaded.metadata["training"]["mask_ratio_max"] == 0.7


def test_masked_ft_options_are_the_training_options_without_pruning_plus_mask_ratios():
    masked = build_parser()
    dense_or_dynamicvit = train.build_parser()
    flags = {parser: {flag for action in parser._actions for flag in action.option_strings}
             for parser in (masked, dense_or_dynamicvit)}
    assert {"--mask-ratio-min", "--mask-ratio-max", "--init", "--epochs", "--lr"} <= flags[masked]
    assert not {"--keep", "--teacher", "--dense", "--ratio-weight"} & flags[masked]
    assert {"--keep", "--teacher", "--dense"} <= flags[dense_or_dynamicvit] and "--mask-ratio-max" not in flags[dense_or_dynamicvit]
    assert masked.prog == "python -m compress.masked_ft" and "arXiv 2310.17177" in masked.description
    config = train.config_from_args(masked.parse_args(["--mask-ratio-max", "0.5"]), mode="masked")
    assert config.mode == "masked" and config.mask_ratio_max == 0.5 and config.target_keep == 1.0
