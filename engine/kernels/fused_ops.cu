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

#include "convert.cuh"
#include "pdl.cuh"

// V consecutive elements <-> f32: one 16-byte access per 8 16-bit elements (two for f32) when
// V = 8 (the host checks sizes and alignment), element by element when V = 1.
template <int V, typename T>
__device__ __forceinline__ void load_v(const T* __restrict__ p, float* f) {
    if constexpr (V == 8 && sizeof(T) == 2) {
        const uint4 r = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = to_f32(e[k]);
    } else if constexpr (V == 8) {
        const float4 a = reinterpret_cast<const float4*>(p)[0];
        const float4 b = reinterpret_cast<const float4*>(p)[1];
        f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
        f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) f[k] = to_f32(p[k]);
    }
}

template <int V, typename T>
__device__ __forceinline__ void store_v(T* __restrict__ p, const float* f) {
    if constexpr (V == 8 && sizeof(T) == 2) {
        uint4 r;
        T* e = reinterpret_cast<T*>(&r);
#pragma unroll
        for (int k = 0; k < 8; ++k) e[k] = from_f32<T>(f[k]);
        *reinterpret_cast<uint4*>(p) = r;
    } else if constexpr (V == 8) {
        reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] = from_f32<T>(f[k]);
    }
}

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

// Every thread owns chunks of 8 consecutive elements (16-byte accesses when V = 8, element by
// element with a bounds check when V = 1) and sums their squares in the same order either way,
// so the result does not depend on which kernel the host picked (that choice follows alignment).
template <typename T, int V>
__device__ void add_rms_norm_impl(const T* __restrict__ x, const T* __restrict__ residual,
                                  const T* __restrict__ weight, T* __restrict__ normed,
                                  T* __restrict__ sum, int hidden, float eps) {
    pdl_enter();
    const int64_t row = (int64_t)blockIdx.x * hidden;
    float ss = 0.f;
    for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
        float a[8], b[8];
        if constexpr (V == 8) {
            load_v<8>(x + row + c, a);
            load_v<8>(residual + row + c, b);
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                a[k] = c + k < hidden ? to_f32(x[row + c + k]) : 0.f;
                b[k] = c + k < hidden ? to_f32(residual[row + c + k]) : 0.f;
            }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            a[k] = round_to<T>(a[k] + b[k]);
            ss = fmaf(a[k], a[k], ss);
        }
        if constexpr (V == 8) {
            store_v<8>(sum + row + c, a);
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (c + k < hidden) sum[row + c + k] = from_f32<T>(a[k]);
        }
    }
    const float scale = rsqrtf(block_sum(ss) / (float)hidden + eps);
    // Each thread reads back only the elements it wrote itself.
    for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
        if constexpr (V == 8) {
            float a[8], w[8];
            load_v<8>(sum + row + c, a);
            load_v<8>(weight + c, w);
#pragma unroll
            for (int k = 0; k < 8; ++k) a[k] = a[k] * scale * w[k];
            store_v<8>(normed + row + c, a);
        } else {
            for (int k = 0; k < 8 && c + k < hidden; ++k)
                normed[row + c + k] =
                    from_f32<T>(to_f32(sum[row + c + k]) * scale * to_f32(weight[c + k]));
        }
    }
}

template <typename T, int V>
__device__ void silu_mul_impl(const T* __restrict__ gate_up, T* __restrict__ out, int64_t n,
                              int64_t inter) {
    pdl_enter();
    // Rows over grid.y, columns over grid.x: no per-element division.
    for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
        const T* gu = gate_up + t * 2 * inter;
        T* o = out + t * inter;
        for (int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; c < inter;
             c += (int64_t)gridDim.x * blockDim.x * V) {
            float g[V], u[V];
            load_v<V>(gu + c, g);
            load_v<V>(gu + inter + c, u);
#pragma unroll
            for (int k = 0; k < V; ++k) g[k] = g[k] / (1.f + expf(-g[k])) * u[k];
            store_v<V>(o + c, g);
        }
    }
}

// A work item is V consecutive rotary pairs (i .. i + V, each with its partner i + hd/2) of one
// head; V = 8 needs hd/2 to be a multiple of 8.
template <typename T, int V>
__device__ void qkv_rope_cache_impl(const T* __restrict__ qkv, const T* __restrict__ bias,
                                    const T* __restrict__ cos, const T* __restrict__ sin,
                                    const int64_t* __restrict__ slot_mapping,
                                    T* __restrict__ q_out, T* __restrict__ key_cache,
                                    T* __restrict__ value_cache, int num_heads, int num_kv_heads,
                                    int head_dim, int64_t num_slots) {
    pdl_enter();
    const int64_t t = blockIdx.x;
    const int half = head_dim / 2;
    const int per_head = half / V;
    const int heads = num_heads + 2 * num_kv_heads;
    const int items = heads * per_head;
    const int64_t slot = slot_mapping[t];
    const bool cached = slot >= 0 && slot < num_slots;
    const T* src = qkv + t * heads * head_dim;
    for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < items; p += gridDim.y * blockDim.x) {
        const int head = p / per_head, i = (p - head * per_head) * V;
        const int c1 = head * head_dim + i, c2 = c1 + half;
        float a[V], b[V];
        load_v<V>(src + c1, a);
        load_v<V>(src + c2, b);
        if (bias != nullptr) {
            float ba[V], bb[V];
            load_v<V>(bias + c1, ba);
            load_v<V>(bias + c2, bb);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                a[k] = round_to<T>(a[k] + ba[k]);
                b[k] = round_to<T>(b[k] + bb[k]);
            }
        }
        if (head < num_heads + num_kv_heads) {
            float c[V], s[V];
            load_v<V>(cos + t * half + i, c);
            load_v<V>(sin + t * half + i, s);
#pragma unroll
            for (int k = 0; k < V; ++k) rotate_pair(a[k], b[k], c[k], s[k]);
        }
        T* d;
        if (head < num_heads) {
            d = q_out + t * num_heads * head_dim + head * head_dim;
        } else if (cached) {
            int kv = head - num_heads;
            T* cache = key_cache;
            if (kv >= num_kv_heads) {
                kv -= num_kv_heads;
                cache = value_cache;
            }
            d = cache + (slot * num_kv_heads + kv) * head_dim;
        } else {
            continue;
        }
        store_v<V>(d + i, a);
        store_v<V>(d + i + half, b);
    }
}

#define FUSED_OPS(SUFFIX, T, V, TAG)                                                            \
    extern "C" __global__ void add_rms_norm_##SUFFIX##TAG(const T* x, const T* residual,        \
                                                          const T* weight, T* normed, T* sum,   \
                                                          int hidden, float eps) {              \
        add_rms_norm_impl<T, V>(x, residual, weight, normed, sum, hidden, eps);                 \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX##TAG(const T* gate_up, T* out, int64_t n,      \
                                                      int64_t inter) {                          \
        silu_mul_impl<T, V>(gate_up, out, n, inter);                                            \
    }                                                                                           \
    extern "C" __global__ void qkv_rope_cache_##SUFFIX##TAG(                                    \
        const T* qkv, const T* bias, const T* cos, const T* sin, const int64_t* slot_mapping,   \
        T* q_out, T* key_cache, T* value_cache, int num_heads, int num_kv_heads, int head_dim,  \
        int64_t num_slots) {                                                                    \
        qkv_rope_cache_impl<T, V>(qkv, bias, cos, sin, slot_mapping, q_out, key_cache,          \
                                  value_cache, num_heads, num_kv_heads, head_dim, num_slots);   \
    }

// `_v8`: 8 elements per access (sizes multiples of 8, 16-byte aligned rows); plain: any size.
FUSED_OPS(f32, float, 1, )
FUSED_OPS(f16, __half, 1, )
FUSED_OPS(bf16, __nv_bfloat16, 1, )
FUSED_OPS(f32, float, 8, _v8)
FUSED_OPS(f16, __half, 8, _v8)
FUSED_OPS(bf16, __nv_bfloat16, 8, _v8)
