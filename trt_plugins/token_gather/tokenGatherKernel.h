/*
 * TokenGather CUDA kernel: keep the CLS token and the K best-scoring patch tokens.
 *
 * Usable without TensorRT (the plugin, the PyTorch test extension and the benchmark all call
 * launchTokenGather), so this header only needs the CUDA runtime API.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace token_gather
{

//! Element types the kernel reads. Tokens and scores choose theirs independently.
enum class ElementType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

//! One TokenGather call. All pointers are device pointers; tensors are dense, row-major.
struct TokenGatherParams
{
    void const* tokens{nullptr};  //!< [batch, numTokens, channels], tokenType
    void const* scores{nullptr};  //!< [batch, numTokens - 1], scoreType (keep log-probabilities of patch tokens)
    void* output{nullptr};        //!< [batch, 1 + keep, channels], tokenType
    int32_t* indices{nullptr};    //!< [batch, keep] int32 patch indices, or nullptr to skip
    ElementType tokenType{ElementType::kFLOAT32};
    ElementType scoreType{ElementType::kFLOAT32};
    int32_t batch{0};
    int32_t numTokens{0};          //!< N, CLS included
    int32_t channels{0};           //!< C
    int32_t keep{0};               //!< K, 1 <= K <= N - 1
};

//! Dynamic shared memory one block needs: the ranking keys (4 bytes per patch token when ranking by counting, 8
//! per element of the power-of-two sort for 513 to 4096 patches) and a source index per kept slot. At most 48 KiB
//! whenever N - 1 + K <= 12288.
size_t tokenGatherSharedBytes(int32_t numTokens, int32_t keep) noexcept;

//! Largest dynamic shared memory the launch uses without opting in to more (the portable 48 KiB).
constexpr size_t kTokenGatherMaxSharedBytes = 48 * 1024;

//! Human-readable reason why params cannot run, or nullptr when they are valid.
char const* tokenGatherInvalidReason(TokenGatherParams const& params) noexcept;

//! Enqueue exactly one kernel launch on stream (none when batch == 0).
//! Returns cudaErrorInvalidValue for invalid params (see tokenGatherInvalidReason), else the launch status.
cudaError_t launchTokenGather(TokenGatherParams const& params, cudaStream_t stream) noexcept;

} // namespace token_gather
