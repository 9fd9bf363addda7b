import math

import pytest
import torch

from compress.models.token_select import (
    gather_kept_tokens,
    keep_counts,
    masked_attention_softmax,
    select_tokens,
    top_k_decision,
    top_k_patch_indices,
)
from compress.plumbing.errors import InvalidKeepRatio

SPEC_TABLE = {
    0.9: [176, 158, 142],
    0.8: [156, 125, 100],
    0.7: [137, 96, 67],
    0.6: [117, 70, 42],
    0.5: [98, 49, 24],
    0.4: [78, 31, 12],
    0.3: [58, 17, 5],
}


@pytest.mark.parametrize("rho", sorted(SPEC_TABLE))
def test_keep_counts_match_spec_table(rho):
    assert keep_counts(rho, 196) == SPEC_TABLE[rho]


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.01, math.nan, 0.05])
def test_keep_counts_reject_ratios_that_keep_nothing_or_are_out_of_range(rho):
    with pytest.raises(InvalidKeepRatio):
        keep_counts(rho, 196)


def test_ties_select_lower_index_first():
    scores = torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.5, 0.2]])
    assert top_k_patch_indices(scores, 4).tolist() == [[1, 3, 0, 2]]
    assert top_k_patch_indices(torch.zeros(2, 9), 3).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_select_tokens_keeps_cls_first_then_best_patches_in_descending_order():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.9, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept, indices = select_tokens(tokens, scores, 3)
    assert indices.tolist() == [[1, 3, 2], [0, 1, 2]]
    assert torch.equal(kept[0], tokens[0, [0, 2, 4, 3]])
    assert torch.equal(kept[1], tokens[1, [0, 1, 2, 3]])
    assert torch.equal(gather_kept_tokens(tokens, indices), kept)


def test_top_k_decision_never_brings_back_dropped_tokens():
    scores = torch.tensor([[9.0, 1.0, 8.0, 2.0, 3.0]])
    previous = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    assert top_k_decision(scores, previous, 2).tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0]]


def test_masked_softmax_with_all_kept_is_plain_softmax():
    logits = torch.randn(2, 3, 7, 7)
    weights = masked_attention_softmax(logits, torch.ones(2, 7))
    torch.testing.assert_close(weights, logits.softmax(-1), atol=1e-6, rtol=0)


def test_masked_softmax_gives_dropped_keys_only_the_eps_share():
    logits = torch.randn(1, 2, 5, 5)
    decision = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    weights = masked_attention_softmax(logits, decision)
    kept = [0, 1, 3]
    reference = logits[..., kept].softmax(-1)
    # Rows of kept queries: dropped keys get eps/N over (sum + eps), i.e. about 2e-7 here.
    for query in kept:
        assert weights[0, :, query, [2, 4]].max() < 1e-6
        torch.testing.assert_close(weights[0, :, query, kept], reference[0, :, query], atol=1e-6, rtol=0)
    # A dropped query still attends to itself (G_ii = 1), so its row is finite and sums to 1.
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5), atol=1e-6, rtol=0)
    assert weights[0, :, 2, 2].min() > 0.0
