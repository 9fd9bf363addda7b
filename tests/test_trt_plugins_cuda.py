"""The TokenGather CUDA kernel (the plugin's own .cu, through a PyTorch extension) against the reference."""
from __future__ import annotations

import json

import pytest
import torch

from compress.models.token_select import select_tokens
from trt_plugins import SPEC_PATH
from trt_plugins.build import find_nvcc

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found: the test compiles the kernel"),
]

SENTINEL_INDEX = -7
# (B, N, C, K): DeiT-S stages at B = 1 and a large batch, large N, K = 1 and K = N - 1, odd C (2-byte copy).
# The kernel ranks by counting up to 512 patches and by a bitonic sort (padded to a power of two) from 513 to
# 4096, by counting again above: shapes on both sides of each switch, K = N - 1 (padding must never be kept), the
# benchmark's long sequence (8, 1025, 768, 512) and the largest sort (4096 patches, all kept).
SHAPES = [(1, 197, 384, 137), (1, 197, 384, 98), (64, 197, 384, 48), (3, 1025, 64, 1), (2, 1025, 8, 1024),
          (5, 50, 3, 20), (1, 2, 1, 1),
          (1, 513, 8, 512), (2, 514, 16, 300), (3, 700, 3, 699), (8, 1025, 768, 512), (1, 4097, 4, 4096),
          (2, 4098, 4, 64)]


@pytest.fixture(scope="module")
def kernel():
    from trt_plugins import token_gather_cuda

    token_gather_cuda.load_extension()
    return token_gather_cuda


def make_inputs(shape, tokens_dtype, scores_dtype, ties, seed=0):
    batch, num_tokens, channels, _ = shape
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, num_tokens, channels, generator=generator).to(tokens_dtype)
    scores = torch.randn(batch, num_tokens - 1, generator=generator)
    if ties:
        scores = torch.round(scores * 2) / 2
    return tokens, scores.to(scores_dtype)


def run_poisoned(kernel, tokens, scores, k, with_indices=True):
    """Run on the GPU with outputs pre-filled with NaN / a sentinel, so unwritten elements show."""
    device_tokens, device_scores = tokens.cuda(), scores.cuda()
    out = torch.full((tokens.shape[0], k + 1, tokens.shape[2]), float("nan"), dtype=tokens.dtype, device="cuda")
    indices = torch.full((tokens.shape[0], k), SENTINEL_INDEX, dtype=torch.int32, device="cuda")
    result = kernel.token_gather(device_tokens, device_scores, k, with_indices=with_indices, out=out,
                                 indices=indices if with_indices else None)
    torch.cuda.synchronize()
    return (result[0].cpu(), result[1].cpu()) if with_indices else (result.cpu(), indices.cpu())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_N{}_C{}_K{}".format(*s))
@pytest.mark.parametrize("tokens_dtype", [torch.float32, torch.float16], ids=["tok32", "tok16"])
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float16], ids=["sc32", "sc16"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_kernel_matches_reference(kernel, shape, tokens_dtype, scores_dtype, ties):
    tokens, scores = make_inputs(shape, tokens_dtype, scores_dtype, ties)
    k = shape[3]
    expected_kept, expected_indices = select_tokens(tokens, scores, k)
    kept, indices = run_poisoned(kernel, tokens, scores, k)
    assert torch.equal(indices.long(), expected_indices)
    assert torch.equal(kept, expected_kept)


@pytest.mark.parametrize("num_tokens", [197, 1025, 4097], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float16], ids=["sc32", "sc16"])
def test_kernel_on_long_rows_of_ties(kernel, num_tokens, scores_dtype):
    """Every score equal (the order is the index order), and three values with NaNs and infinities among them."""
    generator = torch.Generator().manual_seed(num_tokens)
    tokens = torch.randn(2, num_tokens, 8, generator=generator)
    choices = torch.tensor([0.5, float("nan"), -0.0, 0.0, float("inf"), float("-inf"), -1.0])
    mixed = choices[torch.randint(len(choices), (num_tokens - 1,), generator=generator)]
    scores = torch.stack([torch.full((num_tokens - 1,), 0.25), mixed]).to(scores_dtype)
    for k in (1, (num_tokens - 1) // 2, num_tokens - 1):
        kept, indices = run_poisoned(kernel, tokens, scores, k)
        expected_kept, expected_indices = select_tokens(tokens, scores, k)
        assert torch.equal(indices.long(), expected_indices), k
        assert torch.equal(kept, expected_kept), k


def test_kernel_without_indices_leaves_the_buffer_alone(kernel):
    tokens, scores = make_inputs((4, 197, 384, 98), torch.float16, torch.float32, ties=True)
    kept, untouched = run_poisoned(kernel, tokens, scores, 98, with_indices=False)
    assert torch.equal(kept, select_tokens(tokens, scores, 98)[0])
    assert bool((untouched == SENTINEL_INDEX).all())


def test_kernel_nan_signed_zero_and_infinities(kernel):
    scores = torch.tensor([[0.0, float("nan"), -0.0, float("inf"), 1.0, float("nan"), float("-inf"), 0.0]])
    tokens = torch.arange(2 * 9 * 4, dtype=torch.float32).reshape(2, 9, 4)
    scores = torch.cat([scores, scores.flip(1)])
    for k in (1, 2, 5, 8):
        kept, indices = run_poisoned(kernel, tokens, scores, k)
        expected_kept, expected_indices = select_tokens(tokens, scores, k)
        assert torch.equal(indices.long(), expected_indices), k
        assert torch.equal(kept, expected_kept), k


@pytest.mark.parametrize("offset_elements", [1, 2, 4])
def test_kernel_with_misaligned_pointers(kernel, offset_elements):
    """Float16 base pointers 2, 4 and 8 bytes off the 16-byte grid force the narrower copy paths."""
    batch, num_tokens, channels, k = 3, 197, 384, 98
    tokens, scores = make_inputs((batch, num_tokens, channels, k), torch.float16, torch.float32, ties=False)
    storage = torch.empty(tokens.numel() + offset_elements, dtype=tokens.dtype, device="cuda")
    shifted = storage[offset_elements:].view(batch, num_tokens, channels)
    shifted.copy_(tokens.cuda())
    out_storage = torch.full((batch * (k + 1) * channels + offset_elements,), float("nan"), dtype=tokens.dtype,
                             device="cuda")
    out = out_storage[offset_elements:].view(batch, k + 1, channels)
    kernel.token_gather(shifted, scores.cuda(), k, out=out)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), select_tokens(tokens, scores, k)[0])


def test_kernel_golden_cases(kernel):
    for case in json.loads(SPEC_PATH.read_text())["golden"]:
        tokens = torch.tensor(case["tokens"], dtype=torch.float16)
        scores = torch.tensor([[float(v) for v in row] for row in case["scores"]], dtype=torch.float32)
        kept, indices = run_poisoned(kernel, tokens, scores, case["K"])
        assert indices.tolist() == case["expected_indices"], case["name"]
        assert torch.equal(kept, torch.tensor(case["expected_kept"], dtype=torch.float16)), case["name"]


def test_kernel_rejects_k_out_of_range(kernel):
    tokens, scores = make_inputs((1, 9, 4, 8), torch.float32, torch.float32, ties=False)
    with pytest.raises(RuntimeError, match="K <= N - 1"):
        kernel.token_gather(tokens.cuda(), scores.cuda(), 9)
