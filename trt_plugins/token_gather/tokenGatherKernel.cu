/*
 * TokenGather CUDA kernel (see tokenGatherKernel.h and README.md).
 *
 * Design: one launch; grid = (batch, row chunks). Every block ranks its batch row's patch scores in shared
 * memory, then copies a contiguous chunk of the output rows. Two ways to rank, chosen per launch by N:
 *
 * - Counting (N - 1 <= kCountingMaxPatches, and above kSortMaxPatches):
 *
 *     rank_i = #{ j : s_j > s_i  or  (s_j == s_i and j < i) }
 *
 *   is exactly the position of patch i in a stable descending sort, i.e. the project's tie rule (descending
 *   score, equal scores: lower index first). Patch i goes to output slot 1 + rank_i when rank_i < K. It costs
 *   O(N^2 / threads) compare-adds per block, all on broadcast shared-memory reads and with no synchronisation
 *   inside the loop: well under a microsecond at N ~ 200.
 *
 * - Sorting (kCountingMaxPatches < N - 1 <= kSortMaxPatches): a bitonic sort of 64-bit keys in shared memory,
 *   O(N log^2 N / threads) with one barrier per step. The key of patch i is (score key << 32) | (0xFFFFFFFF - i):
 *   keys are unique, and descending key order is descending score with the lower index first among equal
 *   scores, the same order as counting. The sort is padded to a power of two with key 0, below every real key
 *   (the smallest score key is that of -inf, 0x007FFFFF), so padding never reaches the first K slots. At
 *   N = 1025 counting repeated in every row chunk made the op 5x a copy of its output; sorting keeps the ranking
 *   cost per block a few microseconds.
 *
 * Scores are compared as unsigned 32-bit keys whose order is the float order with -0 == +0 and every NaN
 * above +inf, which is what torch.sort(descending=True) does (the reference, compress/token_select.py):
 * a NaN score is kept first, NaNs among themselves by index. Integer keys make equality exact and the
 * result deterministic; float16 scores are widened to float32 first (exact, order preserving).
 *
 * The copy does not care about the element type: a row is rowBytes bytes moved with the widest access
 * (16, 8, 4 or 2 bytes) that divides the row size and the alignment of both base pointers, so float32 and
 * float16 tokens share one code path. For small batches the output rows of one batch entry are split over
 * several blocks (each re-ranks its row) so that B = 1 still uses many SMs; for large batches one block per
 * row already fills the GPU and the op runs at copy bandwidth.
 */
#include "tokenGatherKernel.h"

#include <cuda_fp16.h>

namespace token_gather
{
namespace
{

constexpr int32_t kCopyUnroll = 4;             // loads in flight per thread before their stores
constexpr int32_t kMinBytesPerBlock = 8 * 1024; // below this, splitting a row costs more than it gains
// Ranking by counting up to this many patches (ViTs at 224 px: 196), by sorting above it, up to kSortMaxPatches
// (a 4096-key sort plus K slot indices fill the 48 KiB of shared memory exactly); counting again beyond that.
constexpr int32_t kCountingMaxPatches = 512;
constexpr int32_t kSortMaxPatches = 4096;

bool ranksBySorting(int32_t numPatches)
{
    return numPatches > kCountingMaxPatches && numPatches <= kSortMaxPatches;
}

// Smallest power of two >= n (n >= 1).
int32_t sortSize(int32_t n)
{
    int32_t size = 1;
    while (size < n)
    {
        size <<= 1;
    }
    return size;
}

__device__ __forceinline__ float scoreToFloat(float s)
{
    return s;
}

__device__ __forceinline__ float scoreToFloat(__half s)
{
    return __half2float(s);
}

// Unsigned key whose order is the score order: -0 == +0, every NaN above +inf.
__device__ __forceinline__ uint32_t orderedKey(float s)
{
    if (s != s)
    {
        return 0xFFFFFFFFu;
    }
    uint32_t const bits = __float_as_uint(s == 0.0f ? 0.0f : s);
    // Negative floats order backwards as integers: flip all their bits; positive ones go above them.
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// slotSource[r] = patch index of output slot 1 + r, for r < keep, by counting (see the file comment).
template <typename ScoreT>
__device__ void rankByCounting(ScoreT const* rowScores, int32_t numPatches, int32_t keep, uint32_t* keys,
    int32_t* slotSource)
{
    for (int32_t i = threadIdx.x; i < numPatches; i += blockDim.x)
    {
        keys[i] = orderedKey(scoreToFloat(rowScores[i]));
    }
    __syncthreads();

    for (int32_t i = threadIdx.x; i < numPatches; i += blockDim.x)
    {
        uint32_t const key = keys[i];
        int32_t rank = 0;
        // Lower indices win ties (>=), higher indices only with a strictly larger key (>).
#pragma unroll 4
        for (int32_t j = 0; j < i; ++j)
        {
            rank += keys[j] >= key;
        }
#pragma unroll 4
        for (int32_t j = i + 1; j < numPatches; ++j)
        {
            rank += keys[j] > key;
        }
        if (rank < keep)
        {
            slotSource[rank] = i;
        }
    }
}

// The same slotSource by a descending bitonic sort of sortLength (a power of two >= numPatches) unique keys.
template <typename ScoreT>
__device__ void rankBySorting(ScoreT const* rowScores, int32_t numPatches, int32_t sortLength, int32_t keep,
    unsigned long long* keys, int32_t* slotSource)
{
    for (int32_t i = threadIdx.x; i < sortLength; i += blockDim.x)
    {
        keys[i] = i < numPatches ? (static_cast<unsigned long long>(orderedKey(scoreToFloat(rowScores[i]))) << 32)
                | static_cast<unsigned long long>(0xFFFFFFFFu - static_cast<uint32_t>(i))
                                 : 0ull;
    }
    __syncthreads();

    int32_t const pairs = sortLength / 2;
    for (int32_t size = 2; size <= sortLength; size <<= 1)
    {
        for (int32_t stride = size / 2; stride > 0; stride >>= 1)
        {
            for (int32_t t = threadIdx.x; t < pairs; t += blockDim.x)
            {
                // Pair t compares elements lo and lo + stride, lo = t with a zero bit inserted at stride's place.
                int32_t const lo = 2 * t - (t & (stride - 1));
                int32_t const hi = lo + stride;
                // Runs of length size alternate direction; the last merge (size == sortLength) is descending.
                bool const descending = (lo & size) == 0;
                unsigned long long const a = keys[lo];
                unsigned long long const b = keys[hi];
                if ((a < b) == descending)
                {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    }

    for (int32_t r = threadIdx.x; r < keep; r += blockDim.x)
    {
        slotSource[r] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(keys[r]));
    }
}

template <typename ScoreT, typename VecT>
__global__ void tokenGatherKernel(VecT const* __restrict__ tokens, ScoreT const* __restrict__ scores,
    VecT* __restrict__ output, int32_t* __restrict__ indices, int32_t numTokens, int32_t keep, int32_t rowVecs,
    int32_t rowsPerBlock, int32_t sortLength)
{
    // Layout: the ranking keys (4 bytes per patch when counting, 8 per sorted element when sorting), then the
    // slot sources; both key sizes keep the int32 array after them aligned.
    extern __shared__ __align__(16) unsigned char shared[];
    int32_t const numPatches = numTokens - 1;
    int32_t const b = blockIdx.x;
    ScoreT const* rowScores = scores + static_cast<size_t>(b) * numPatches;
    int32_t* slotSource;
    if (sortLength > 0)
    {
        slotSource = reinterpret_cast<int32_t*>(shared + static_cast<size_t>(sortLength) * sizeof(unsigned long long));
        rankBySorting(rowScores, numPatches, sortLength, keep, reinterpret_cast<unsigned long long*>(shared),
            slotSource);
    }
    else
    {
        slotSource = reinterpret_cast<int32_t*>(shared + static_cast<size_t>(numPatches) * sizeof(uint32_t));
        rankByCounting(rowScores, numPatches, keep, reinterpret_cast<uint32_t*>(shared), slotSource);
    }
    __syncthreads();

    if (indices != nullptr && blockIdx.y == 0)
    {
        int32_t* rowIndices = indices + static_cast<size_t>(b) * keep;
        for (int32_t r = threadIdx.x; r < keep; r += blockDim.x)
        {
            rowIndices[r] = slotSource[r];
        }
    }

    // Output row r (0 = CLS) of this block's chunk comes from token row 0 or 1 + slotSource[r - 1].
    int32_t const firstRow = blockIdx.y * rowsPerBlock;
    int32_t const numRows = min(rowsPerBlock, keep + 1 - firstRow);
    if (numRows <= 0)
    {
        return;
    }
    VecT const* src = tokens + static_cast<size_t>(b) * numTokens * rowVecs;
    VecT* dst = output + (static_cast<size_t>(b) * (keep + 1) + firstRow) * rowVecs;
    int32_t const total = numRows * rowVecs;
    int32_t const stride = blockDim.x * kCopyUnroll;
    for (int32_t base = threadIdx.x; base < total; base += stride)
    {
        VecT values[kCopyUnroll];
#pragma unroll
        for (int32_t u = 0; u < kCopyUnroll; ++u)
        {
            int32_t const t = base + u * blockDim.x;
            if (t < total)
            {
                int32_t const r = t / rowVecs;
                int32_t const c = t - r * rowVecs;
                int32_t const outRow = firstRow + r;
                int32_t const srcRow = outRow == 0 ? 0 : slotSource[outRow - 1] + 1;
                values[u] = src[static_cast<size_t>(srcRow) * rowVecs + c];
            }
        }
#pragma unroll
        for (int32_t u = 0; u < kCopyUnroll; ++u)
        {
            int32_t const t = base + u * blockDim.x;
            if (t < total)
            {
                dst[t] = values[u];
            }
        }
    }
}

size_t elementBytes(ElementType type)
{
    return type == ElementType::kFLOAT16 ? 2 : 4;
}

bool isAligned(void const* ptr, size_t bytes)
{
    return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

struct LaunchShape
{
    dim3 grid;
    dim3 block;
    size_t sharedBytes;
    int32_t rowsPerBlock;
    int32_t sortLength; // 0: rank by counting
};

LaunchShape chooseLaunchShape(TokenGatherParams const& p, size_t rowBytes)
{
    int32_t device = 0;
    int32_t smCount = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&smCount, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || smCount < 1)
    {
        smCount = 1; // still correct, only less parallel for small batches
    }
    int64_t const rowsOut = static_cast<int64_t>(p.keep) + 1;
    int64_t const minRowsPerBlock = (kMinBytesPerBlock + static_cast<int64_t>(rowBytes) - 1) / rowBytes;
    int64_t const maxChunks = (rowsOut + minRowsPerBlock - 1) / minRowsPerBlock;
    int64_t const wantedChunks = (2 * static_cast<int64_t>(smCount) + p.batch - 1) / p.batch;
    int64_t chunks = wantedChunks < maxChunks ? wantedChunks : maxChunks;
    chunks = chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks);
    int64_t const rowsPerBlock = (rowsOut + chunks - 1) / chunks;
    chunks = (rowsOut + rowsPerBlock - 1) / rowsPerBlock;

    LaunchShape shape;
    shape.grid = dim3(static_cast<uint32_t>(p.batch), static_cast<uint32_t>(chunks), 1);
    shape.block = dim3(p.numTokens - 1 > 256 ? 512 : 256, 1, 1);
    shape.sharedBytes = tokenGatherSharedBytes(p.numTokens, p.keep);
    shape.rowsPerBlock = static_cast<int32_t>(rowsPerBlock);
    shape.sortLength = ranksBySorting(p.numTokens - 1) ? sortSize(p.numTokens - 1) : 0;
    return shape;
}

template <typename ScoreT, typename VecT>
cudaError_t launchTyped(TokenGatherParams const& p, size_t rowBytes, cudaStream_t stream)
{
    LaunchShape const shape = chooseLaunchShape(p, rowBytes);
    int32_t const rowVecs = static_cast<int32_t>(rowBytes / sizeof(VecT));
    tokenGatherKernel<ScoreT, VecT><<<shape.grid, shape.block, shape.sharedBytes, stream>>>(
        static_cast<VecT const*>(p.tokens), static_cast<ScoreT const*>(p.scores), static_cast<VecT*>(p.output),
        p.indices, p.numTokens, p.keep, rowVecs, shape.rowsPerBlock, shape.sortLength);
    return cudaGetLastError();
}

template <typename ScoreT>
cudaError_t launchForScore(TokenGatherParams const& p, cudaStream_t stream)
{
    size_t const rowBytes = static_cast<size_t>(p.channels) * elementBytes(p.tokenType);
    auto fits = [&](size_t width) {
        return rowBytes % width == 0 && isAligned(p.tokens, width) && isAligned(p.output, width);
    };
    if (fits(16))
    {
        return launchTyped<ScoreT, uint4>(p, rowBytes, stream);
    }
    if (fits(8))
    {
        return launchTyped<ScoreT, uint2>(p, rowBytes, stream);
    }
    if (fits(4))
    {
        return launchTyped<ScoreT, uint32_t>(p, rowBytes, stream);
    }
    if (fits(2))
    {
        return launchTyped<ScoreT, uint16_t>(p, rowBytes, stream);
    }
    return cudaErrorMisalignedAddress;
}

} // namespace

size_t tokenGatherSharedBytes(int32_t numTokens, int32_t keep) noexcept
{
    int32_t const numPatches = numTokens > 1 ? numTokens - 1 : 0;
    size_t const slots = static_cast<size_t>(keep > 0 ? keep : 0) * sizeof(int32_t);
    if (ranksBySorting(numPatches))
    {
        return static_cast<size_t>(sortSize(numPatches)) * sizeof(unsigned long long) + slots;
    }
    return static_cast<size_t>(numPatches) * sizeof(uint32_t) + slots;
}

char const* tokenGatherInvalidReason(TokenGatherParams const& p) noexcept
{
    if (p.batch < 0 || p.numTokens < 2 || p.channels < 1)
    {
        return "TokenGather needs batch >= 0, N >= 2 tokens and C >= 1 channels";
    }
    if (p.keep < 1 || p.keep > p.numTokens - 1)
    {
        return "TokenGather needs 1 <= K <= N - 1";
    }
    if (tokenGatherSharedBytes(p.numTokens, p.keep) > kTokenGatherMaxSharedBytes)
    {
        return "TokenGather needs (N - 1 + K) * 4 bytes of shared memory, at most 48 KiB (N - 1 + K <= 12288)";
    }
    if (static_cast<int64_t>(p.numTokens) * p.channels * static_cast<int64_t>(elementBytes(p.tokenType))
        > INT32_MAX)
    {
        return "TokenGather needs N * C * element size < 2^31 bytes per batch entry";
    }
    if (p.batch > 0 && (p.tokens == nullptr || p.scores == nullptr || p.output == nullptr))
    {
        return "TokenGather got a null tokens, scores or output pointer";
    }
    return nullptr;
}

cudaError_t launchTokenGather(TokenGatherParams const& params, cudaStream_t stream) noexcept
{
    if (tokenGatherInvalidReason(params) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (params.batch == 0)
    {
        return cudaSuccess;
    }
    return params.scoreType == ElementType::kFLOAT16 ? launchForScore<__half>(params, stream)
                                                     : launchForScore<float>(params, stream);
}

} // namespace token_gather
