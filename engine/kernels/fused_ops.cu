// Fused decoder-layer ops: each replaces a chain of candle ops by one launch (decode at batch 1 is
// launch-bound). Math in f32, one rounding to the storage dtype T per output element. All tensors
// are contiguous and row-major; the host (engine/src/model/fused_cuda.rs) checks shapes and dtypes.
//
// add_rms_norm_<T>:   sum = x + residual (rounded to T, as candle's add), normed = rms_norm(sum) * w
//                     with the mean of squares in f32 and eps inside the sqrt. One CTA per row.
// silu_mul_<T>:       out[t, i] = silu(gu[t, i]) * gu[t, inter + i], gu = [gate | up] [n, 2*inter];
//                     grid (column blocks, rows).
// qkv_rope_cache_<T>: qkv [n, (H + 2*KV) * hd] (+ bias [(H + 2*KV) * hd], rounded to T like candle's
//                     broadcast_add) -> rotary ("rotate_half", cos/sin [n, hd/2]) on q and k;
//                     q -> q_out [n, H, hd]; k, v -> caches [num_blocks, block_size, KV, hd] at
//                     slot_mapping[t] (int64; < 0 or >= num_slots = skip, as reshape_and_cache).
//                     Grid (n, chunks of (head, pair) work items); a thread owns elements i, i + hd/2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Value after a round trip through T (what candle's elementwise op in T would store).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// Sum over the CTA (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    v = lane < warps ? partial[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ void add_rms_norm_impl(const T* __restrict__ x, const T* __restrict__ residual,
                                  const T* __restrict__ weight, T* __restrict__ normed,
                                  T* __restrict__ sum, int hidden, float eps) {
    const int64_t row = (int64_t)blockIdx.x * hidden;
    float ss = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        const T s = from_f32<T>(to_f32(x[row + c]) + to_f32(residual[row + c]));
        sum[row + c] = s;
        const float f = to_f32(s);
        ss += f * f;
    }
    const float scale = rsqrtf(block_sum(ss) / (float)hidden + eps);
    // Each thread reads back only the elements it wrote itself.
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        normed[row + c] = from_f32<T>(to_f32(sum[row + c]) * scale * to_f32(weight[c]));
    }
}

template <typename T>
__device__ void silu_mul_impl(const T* __restrict__ gate_up, T* __restrict__ out, int64_t n,
                              int64_t inter) {
    // Rows over grid.y, columns over grid.x: no per-element division.
    for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
        const T* gu = gate_up + t * 2 * inter;
        T* o = out + t * inter;
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < inter;
             c += (int64_t)gridDim.x * blockDim.x) {
            const float g = to_f32(gu[c]);
            const float u = to_f32(gu[inter + c]);
            o[c] = from_f32<T>(g / (1.f + expf(-g)) * u);
        }
    }
}

template <typename T>
__device__ void qkv_rope_cache_impl(const T* __restrict__ qkv, const T* __restrict__ bias,
                                    const T* __restrict__ cos, const T* __restrict__ sin,
                                    const int64_t* __restrict__ slot_mapping,
                                    T* __restrict__ q_out, T* __restrict__ key_cache,
                                    T* __restrict__ value_cache, int num_heads, int num_kv_heads,
                                    int head_dim, int64_t num_slots) {
    const int64_t t = blockIdx.x;
    const int half = head_dim / 2;
    const int heads = num_heads + 2 * num_kv_heads;
    const int items = heads * half;
    const int64_t slot = slot_mapping[t];
    const bool cached = slot >= 0 && slot < num_slots;
    const T* src = qkv + t * heads * head_dim;
    for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < items; p += gridDim.y * blockDim.x) {
        const int head = p / half, i = p - head * half;
        const int c1 = head * head_dim + i, c2 = c1 + half;
        float a = to_f32(src[c1]), b = to_f32(src[c2]);
        if (bias != nullptr) {
            a = round_to<T>(a + to_f32(bias[c1]));
            b = round_to<T>(b + to_f32(bias[c2]));
        }
        if (head < num_heads + num_kv_heads) {
            const float c = to_f32(cos[t * half + i]), s = to_f32(sin[t * half + i]);
            const float r1 = a * c - b * s, r2 = a * s + b * c;
            a = r1;
            b = r2;
        }
        if (head < num_heads) {
            T* d = q_out + t * num_heads * head_dim;
            d[c1] = from_f32<T>(a);
            d[c2] = from_f32<T>(b);
        } else if (cached) {
            int kv = head - num_heads;
            T* cache = key_cache;
            if (kv >= num_kv_heads) {
                kv -= num_kv_heads;
                cache = value_cache;
            }
            T* d = cache + (slot * num_kv_heads + kv) * head_dim;
            d[i] = from_f32<T>(a);
            d[i + half] = from_f32<T>(b);
        }
    }
}

#define FUSED_OPS(SUFFIX, T)                                                                    \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T* x, const T* residual,             \
                                                     const T* weight, T* normed, T* sum,        \
                                                     int hidden, float eps) {                   \
        add_rms_norm_impl<T>(x, residual, weight, normed, sum, hidden, eps);                    \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gate_up, T* out, int64_t n,           \
                                                 int64_t inter) {                               \
        silu_mul_impl<T>(gate_up, out, n, inter);                                               \
    }                                                                                           \
    extern "C" __global__ void qkv_rope_cache_##SUFFIX(                                         \
        const T* qkv, const T* bias, const T* cos, const T* sin, const int64_t* slot_mapping,   \
        T* q_out, T* key_cache, T* value_cache, int num_heads, int num_kv_heads, int head_dim,  \
        int64_t num_slots) {                                                                    \
        qkv_rope_cache_impl<T>(qkv, bias, cos, sin, slot_mapping, q_out, key_cache,             \
                               value_cache, num_heads, num_kv_heads, head_dim, num_slots);      \
    }

FUSED_OPS(f32, float)
FUSED_OPS(f16, __half)
FUSED_OPS(bf16, __nv_bfloat16)
