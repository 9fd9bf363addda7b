"""The TokenGather kernel's two ranking methods, emulated on the CPU step for step, against the reference.

The kernel (trt_plugins/token_gather/tokenGatherKernel.cu) ranks a row's patch scores by counting or by a bitonic
sort of 64-bit keys. Without a GPU neither runs here (tests/test_trt_plugins_cuda.py runs the kernel itself where
a device exists); these tests hold the arithmetic the kernel uses to the project's tie rule: the score key, the
(key, index) packing, the padding to a power of two, the pair index and direction of every sort step, and the
shared-memory budget of the method chosen for each N. The emulation copies the kernel's formulas, so a change to
one must be made to the other.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from compress.models.token_select import select_tokens
from trt_plugins import KERNEL_SOURCE

KERNEL_TEXT = KERNEL_SOURCE.read_text()
COUNTING_MAX = int(re.search(r"kCountingMaxPatches = (\d+);", KERNEL_TEXT).group(1))
SORT_MAX = int(re.search(r"kSortMaxPatches = (\d+);", KERNEL_TEXT).group(1))
MAX_SHARED_BYTES = 48 * 1024  # kTokenGatherMaxSharedBytes


def ordered_keys(scores: np.ndarray) -> np.ndarray:
    """orderedKey: float32 -> uint32 in score order, -0 == +0, every NaN above +inf."""
    scores = scores.astype(np.float32)
    bits = np.where(scores == 0, np.float32(0), scores).view(np.uint32)
    keys = np.where(bits & 0x80000000, ~bits, bits | 0x80000000).astype(np.uint32)
    return np.where(np.isnan(scores), np.uint32(0xFFFFFFFF), keys)


def sort_length(num_patches: int) -> int:
    return 1 << (num_patches - 1).bit_length()


def slots_by_sorting(scores: np.ndarray, keep: int) -> np.ndarray:
    """rankBySorting: the slot sources after the bitonic network; every step's pairs are disjoint, so one
    vectorised update per step is what the block's threads do in parallel."""
    n = scores.shape[0]
    length = sort_length(n)
    keys = np.zeros(length, dtype=np.uint64)
    keys[:n] = (ordered_keys(scores).astype(np.uint64) << np.uint64(32)) | (
        np.uint64(0xFFFFFFFF) - np.arange(n, dtype=np.uint64))
    t = np.arange(length // 2)
    size = 2
    while size <= length:
        stride = size // 2
        while stride > 0:
            lo = 2 * t - (t & (stride - 1))
            hi = lo + stride
            assert np.array_equal(np.sort(np.concatenate([lo, hi])), np.arange(length))  # each element once
            descending = (lo & size) == 0
            a, b = keys[lo].copy(), keys[hi].copy()
            swap = (a < b) == descending
            keys[lo], keys[hi] = np.where(swap, b, a), np.where(swap, a, b)
            stride //= 2
        size *= 2
    assert np.all(keys[:n - 1] > keys[1:n]) and not keys[n:].any()  # unique real keys descending, then the padding
    return (np.uint64(0xFFFFFFFF) - (keys[:keep] & np.uint64(0xFFFFFFFF))).astype(np.int64)


def slots_by_counting(scores: np.ndarray, keep: int) -> np.ndarray:
    """rankByCounting: rank_i = #{j < i: key_j >= key_i} + #{j > i: key_j > key_i}."""
    keys = ordered_keys(scores).astype(np.int64)
    lower = np.tril(np.ones((len(keys), len(keys)), dtype=bool), -1)  # [i, j]: j < i
    rank = ((keys[None, :] >= keys[:, None]) & lower).sum(1) + ((keys[None, :] > keys[:, None]) & lower.T).sum(1)
    slots = np.full(keep, -1)
    for i, r in enumerate(rank):
        if r < keep:
            slots[r] = i
    return slots


def shared_bytes(num_tokens: int, keep: int) -> int:
    """tokenGatherSharedBytes."""
    patches = num_tokens - 1
    if COUNTING_MAX < patches <= SORT_MAX:
        return sort_length(patches) * 8 + keep * 4
    return (patches + keep) * 4


def score_rows(num_patches: int, seed: int) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    special = np.array([0.5, np.nan, -0.0, 0.0, np.inf, -np.inf, -1.0], dtype=np.float32)
    return {
        "random": generator.standard_normal(num_patches).astype(np.float32),
        "ties": (np.round(generator.standard_normal(num_patches) * 2) / 2).astype(np.float32),
        "all equal": np.full(num_patches, 0.25, dtype=np.float32),
        "nan inf signed zero": special[generator.integers(0, len(special), num_patches)],
        "float16": generator.standard_normal(num_patches).astype(np.float16).astype(np.float32),
    }


def expected_slots(scores: np.ndarray, keep: int) -> np.ndarray:
    tokens = torch.zeros(1, len(scores) + 1, 1)
    return select_tokens(tokens, torch.from_numpy(scores)[None], keep)[1][0].numpy()


def test_the_method_switches_are_where_the_budget_allows():
    assert COUNTING_MAX == 512 and SORT_MAX == 4096
    # The largest sort with every patch kept fills the 48 KiB exactly; the limits users see are unchanged:
    # valid iff (N - 1 + K) * 4 <= 48 KiB, because every sort-path shape fits.
    assert shared_bytes(SORT_MAX + 1, SORT_MAX) == MAX_SHARED_BYTES
    for patches in (COUNTING_MAX + 1, 1000, 1024, 1025, 2049, SORT_MAX):
        assert shared_bytes(patches + 1, patches) <= MAX_SHARED_BYTES
    assert shared_bytes(12288 - 100 + 1, 100) == MAX_SHARED_BYTES  # counting above SORT_MAX: N - 1 + K <= 12288
    assert shared_bytes(12288 - 100 + 1, 101) > MAX_SHARED_BYTES


@pytest.mark.parametrize("num_patches", [COUNTING_MAX + 1, 600, 1024, 1025], ids=lambda n: f"patches{n}")
def test_the_sort_network_follows_the_tie_rule(num_patches):
    for name, scores in score_rows(num_patches, num_patches).items():
        for keep in (1, 7, num_patches // 2, num_patches):
            assert np.array_equal(slots_by_sorting(scores, keep), expected_slots(scores, keep)), (name, keep)


def test_the_largest_sort_keeps_every_patch_in_order():
    scores = score_rows(SORT_MAX, 3)["ties"]
    assert np.array_equal(slots_by_sorting(scores, SORT_MAX), expected_slots(scores, SORT_MAX))


@pytest.mark.parametrize("num_patches", [1, 2, 196, COUNTING_MAX], ids=lambda n: f"patches{n}")
def test_counting_follows_the_tie_rule(num_patches):
    for name, scores in score_rows(num_patches, num_patches).items():
        for keep in sorted({1, max(1, num_patches // 2), num_patches}):
            assert np.array_equal(slots_by_counting(scores, keep), expected_slots(scores, keep)), (name, keep)


def test_score_keys_order_like_floats():
    values = np.array([-np.inf, -1e30, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 1e30, np.inf, np.nan], dtype=np.float32)
    keys = ordered_keys(values)
    assert np.all(keys[:4] < keys[1:5]) and keys[4] == keys[5] and np.all(keys[5:-1] < keys[6:])
    assert keys[0] == 0x007FFFFF  # the smallest key, above the sort's padding (0)


def test_the_emulated_formulas_are_the_kernels():
    """A guard against the emulation and the kernel drifting apart: the lines it copies are still there."""
    code = " ".join(KERNEL_TEXT.split())
    for line in ("int32_t const lo = 2 * t - (t & (stride - 1));", "int32_t const hi = lo + stride;",
                 "bool const descending = (lo & size) == 0;", "if ((a < b) == descending)",
                 "<< 32) | static_cast<unsigned long long>(0xFFFFFFFFu - static_cast<uint32_t>(i)) : 0ull;",
                 "slotSource[r] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(keys[r]));",
                 "rank += keys[j] >= key;", "rank += keys[j] > key;", "return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);"):
        assert line in code, line
