"""The TokenGather CUDA kernel (token_gather/tokenGatherKernel.cu) as a PyTorch extension.

No TensorRT involved: this compiles the plugin's own kernel source with a tiny binding, so GPU tests and
bench_token_gather.py exercise exactly the code the plugin launches. Needs a CUDA build of PyTorch, nvcc
and ninja; the first call compiles (about a minute), later calls reuse the build directory.
"""
from __future__ import annotations

from pathlib import Path

from trt_plugins import DEFAULT_BUILD_DIR, KERNEL_SOURCE

_BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include "tokenGatherKernel.h"

using token_gather::ElementType;

static ElementType elementType(torch::Tensor const& t, char const* what)
{
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kFloat16, what,
        " must be float32 or float16");
    return t.scalar_type() == torch::kFloat16 ? ElementType::kFLOAT16 : ElementType::kFLOAT32;
}

// Writes into out [B, 1+K, C] and, when it has elements, indices [B, K] int32. One kernel launch.
void token_gather_into(torch::Tensor tokens, torch::Tensor scores, int64_t k, torch::Tensor out,
    torch::Tensor indices)
{
    TORCH_CHECK(tokens.is_cuda() && scores.is_cuda() && out.is_cuda(), "tensors must be on the GPU");
    TORCH_CHECK(tokens.dim() == 3 && scores.dim() == 2, "tokens [B, N, C] and scores [B, N-1] expected");
    TORCH_CHECK(tokens.is_contiguous() && scores.is_contiguous() && out.is_contiguous(), "contiguous tensors");
    TORCH_CHECK(out.scalar_type() == tokens.scalar_type(), "out must have the type of tokens");
    token_gather::TokenGatherParams p;
    p.tokens = tokens.data_ptr();
    p.scores = scores.data_ptr();
    p.output = out.data_ptr();
    p.tokenType = elementType(tokens, "tokens");
    p.scoreType = elementType(scores, "scores");
    p.batch = static_cast<int32_t>(tokens.size(0));
    p.numTokens = static_cast<int32_t>(tokens.size(1));
    p.channels = static_cast<int32_t>(tokens.size(2));
    p.keep = static_cast<int32_t>(k);
    TORCH_CHECK(scores.size(0) == p.batch && scores.size(1) == p.numTokens - 1, "scores must be [B, N-1]");
    TORCH_CHECK(out.size(0) == p.batch && out.size(1) == k + 1 && out.size(2) == p.channels, "out must be [B, 1+K, C]");
    if (indices.numel() > 0)
    {
        TORCH_CHECK(indices.is_cuda() && indices.is_contiguous() && indices.scalar_type() == torch::kInt32
            && indices.size(0) == p.batch && indices.size(1) == k, "indices must be [B, K] int32 on the GPU");
        p.indices = indices.data_ptr<int32_t>();
    }
    char const* reason = token_gather::tokenGatherInvalidReason(p);
    TORCH_CHECK(reason == nullptr, reason == nullptr ? "" : reason);
    cudaError_t status = token_gather::launchTokenGather(p, c10::cuda::getCurrentCUDAStream(tokens.device().index()));
    TORCH_CHECK(status == cudaSuccess, "launchTokenGather: ", cudaGetErrorString(status));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("token_gather_into", &token_gather_into, "TokenGather kernel (writes into out and indices)");
}
"""

_module = None


def cuda_toolkit_root() -> Path | None:
    """The CUDA toolkit root; torch guesses it wrongly when nvcc is a symlink outside the toolkit."""
    import os
    import shutil

    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(os.path.realpath(nvcc)).parent.parent) if nvcc else None]
    return next((Path(r) for r in roots if r and (Path(r) / "include" / "cuda_runtime_api.h").is_file()), None)


def load_extension(build_dir: str | Path | None = None, verbose: bool = False):
    """Compile (once) and import the extension; returns the module with ``token_gather_into``."""
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load

        directory = Path(build_dir) if build_dir is not None else DEFAULT_BUILD_DIR / "torch_extension"
        directory.mkdir(parents=True, exist_ok=True)
        binding = directory / "token_gather_binding.cpp"
        if not binding.exists() or binding.read_text() != _BINDING:
            binding.write_text(_BINDING)
        root = cuda_toolkit_root()
        includes = [str(root / "include")] if root else []
        libs = [f"-L{root / d}" for d in ("lib64", "lib") if root and (root / d).is_dir()]
        _module = load(name="token_gather_cuda", sources=[str(binding), str(KERNEL_SOURCE)],
                       extra_include_paths=[str(KERNEL_SOURCE.parent), *includes], extra_cuda_cflags=["-O3"],
                       extra_ldflags=libs,
                       build_directory=str(directory), verbose=verbose)
    return _module


def token_gather(tokens, scores, k: int, with_indices: bool = False, out=None, indices=None):
    """Run the kernel: tokens [B, N, C], scores [B, N-1] (CUDA tensors) -> kept [B, 1+K, C] (, int32 [B, K]).

    out / indices may be given (e.g. pre-filled with sentinels) to check that every element is written.
    """
    import torch

    module = load_extension()
    tokens, scores = tokens.contiguous(), scores.contiguous()
    batch, _, channels = tokens.shape
    if out is None:
        out = torch.empty(batch, k + 1, channels, dtype=tokens.dtype, device=tokens.device)
    if with_indices and indices is None:
        indices = torch.empty(batch, k, dtype=torch.int32, device=tokens.device)
    buffer = indices if with_indices else torch.empty(0, dtype=torch.int32, device=tokens.device)
    module.token_gather_into(tokens, scores, k, out, buffer)
    return (out, indices) if with_indices else out
