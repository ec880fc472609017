// Greedy sampling on the device: the index of each f32 logits row's largest value, with the rules
// of the host's sampling::argmax: the lowest index wins ties, NaN never wins, and a row with no
// value above -inf gives 0. Only the token ids then go back to the host.
//
// One CTA per row. Each thread scans its elements in rising index order, keeping a value only when
// it is strictly larger (so its lowest index of a tie stays, and neither NaN nor -inf is ever
// kept), 16 bytes per load and four loads in flight when the rows are 16-byte aligned; then the
// threads' bests merge, the larger value or on a tie the lower index winning.
#include <math.h>
#include <stdint.h>

#include "pdl.cuh"

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr uint32_t kNone = 0xffffffffu;

__device__ __forceinline__ void keep(float& best, uint32_t& at, float v, uint32_t i) {
    if (v > best) {
        best = v;
        at = i;
    }
}

__device__ __forceinline__ void keep4(float& best, uint32_t& at, float4 x, uint32_t i) {
    keep(best, at, x.x, i);
    keep(best, at, x.y, i + 1);
    keep(best, at, x.z, i + 2);
    keep(best, at, x.w, i + 3);
}

// The better of two threads' bests (neither value is NaN: none is ever kept).
__device__ __forceinline__ void merge(float& best, uint32_t& at, float v, uint32_t i) {
    if (v > best || (v == best && i < at)) {
        best = v;
        at = i;
    }
}

}  // namespace

// logits [rows, vocab] f32, row-major; out [rows] u32. Grid (rows), block kThreads. vec4 != 0:
// the rows are 16-byte aligned (logits is, and vocab % 4 == 0).
extern "C" __global__ void __launch_bounds__(kThreads)
    argmax_rows_f32(const float* __restrict__ logits, long long vocab, int vec4,
                    uint32_t* __restrict__ out) {
    pdl_enter();
    const float* row = logits + (long long)blockIdx.x * vocab;
    float best = -INFINITY;
    uint32_t at = kNone;
    if (vec4) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
        const long long n4 = vocab / 4;
        long long j = threadIdx.x;
        for (; j + (long long)(kUnroll - 1) * kThreads < n4; j += (long long)kUnroll * kThreads) {
            float4 x[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) x[u] = row4[j + (long long)u * kThreads];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                keep4(best, at, x[u], (uint32_t)((j + (long long)u * kThreads) * 4));
        }
        for (; j < n4; j += kThreads) keep4(best, at, row4[j], (uint32_t)(j * 4));
    } else {
        for (long long j = threadIdx.x; j < vocab; j += kThreads) keep(best, at, row[j], (uint32_t)j);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_down_sync(0xffffffffu, best, o);
        const uint32_t i = __shfl_down_sync(0xffffffffu, at, o);
        merge(best, at, v, i);
    }
    __shared__ float warp_best[kWarps];
    __shared__ uint32_t warp_at[kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        warp_best[warp] = best;
        warp_at[warp] = at;
    }
    __syncthreads();
    if (warp != 0) return;
    best = warp_best[lane];
    at = warp_at[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_down_sync(0xffffffffu, best, o);
        const uint32_t i = __shfl_down_sync(0xffffffffu, at, o);
        merge(best, at, v, i);
    }
    if (lane == 0) out[blockIdx.x] = at == kNone ? 0u : at;
}
