// Skinny matmul for decode: y[M, N] = x[M, K] . W[N, K]^T with M = 1..8 rows, W row-major (the
// layout of a Linear weight), x, W and y of one dtype T (f32, f16, bf16), f32 accumulation, one
// rounding to T per output element. Bound by the read of W, which every output row shares.
//
// gemv_<T>_m<M>_v: one CTA of WARPS warps owns ROWS consecutive rows of W; its threads stride
//                  over K in 16-byte chunks (8 16-bit or 4 f32 elements), issue every W load of an
//                  unrolled step before using any (streamed past L1), take x chunks through the
//                  read-only cache (x is tiny and read by every CTA), reduce over the warp with
//                  shuffles and over the CTA through shared memory. Needs K a multiple of the
//                  chunk and 16-byte aligned x and W (the host checks).
// gemv_<T>_m<M>:   the same work split element by element: any K, any alignment.
// Grid: ceil(N / ROWS) CTAs; rows past N re-read row N - 1 and store nothing. Each output's sum
// runs in an order that depends on its row of W only, not on M.
// gemv_<T>_m1_w*:  one row of x, a warp per row of W; variants with the residual add + RMSNorm
//                  before the projection (_norm) and the SiLU-gate or rotary + KV-cache write
//                  after it fused in (below, at WARP_ROW_CTAS).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "loads.cuh"
#include "pdl.cuh"

// GEMV_EARLY_LOADS (KERNEL_DEFINES, a bit mask): the first step of weight loads is issued before
// pdl_enter(), while the kernel before may still run (weights are no kernel's output), in the
// warp-per-row kernels without an epilogue (1: the o projection, after the decode attention's few
// CTAs), with the rotary one (2: q/k/v) and the SiLU one (4: gate/up), and in the CTA-per-rows
// kernels (8: down). Default 1. Qwen2.5-1.5B batch-1 steps on the H200 (CUDA graphs with
// programmatic edges, days/gpu-engine/run67, run68, run71; each against the default build of the
// call): 1 1.192 / 1.193 ms against 1.211 / 1.209 for 0; 3 1.206 / 1.225 against 1.217 / 1.209;
// 9 1.205 / 1.203 against 1.215 / 1.200; 5 1.306 / 1.296 against 1.194 / 1.212 (the gate/up
// projection's early loads cost 0.1 ms); 15 1.335 / 1.336 against 1.221 / 1.207.
#ifndef GEMV_EARLY_LOADS
#define GEMV_EARLY_LOADS 1
#endif

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;

// Rows of W per CTA: more at larger M, where x (read M times per W chunk) costs L1 bandwidth.
template <int M>
__host__ __device__ constexpr int rows_per_cta() { return M >= 4 ? 4 : 2; }
// Chunks per thread and row kept in flight per step.
template <int M>
__host__ __device__ constexpr int unroll() { return M <= 2 ? 4 : 2; }
// CTAs per SM promised to the compiler: it bounds the registers (128 at 4), and with a bound
// the compiler issues a step's loads together instead of interleaving them with the math to
// save registers (which serialises the memory latency).
template <int M>
__host__ __device__ constexpr int min_ctas() { return M >= 5 ? 3 : 4; }


// A 16-byte chunk of T as f32 (element 0 in the low bits of word 0).
template <typename T>
struct Chunk {
    static constexpr int E = 16 / sizeof(T);
};

__device__ __forceinline__ void unpack(const uint4& r, float (&f)[8], __nv_bfloat16) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void unpack(const uint4& r, float (&f)[8], __half) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __half2 h;
        memcpy(&h, &w[i], sizeof(h));
        const float2 v = __half22float2(h);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__device__ __forceinline__ void unpack(const uint4& r, float (&f)[4], float) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
}

// Row r of W, rows past the last one clamped to it (read, never stored).
__device__ __forceinline__ int64_t last_row(int64_t r, int n) {
    return r < n ? r : (int64_t)n - 1;
}

// Only matrices up to this size prefetch rows into L2 before pdl_enter() (q/k/v and o at the
// Qwen2.5-1.5B shape): for larger ones the first rows are a small part of the stream, and the
// prefetch would compete for L2 with the kernel still running. A judgement, not a measurement:
// in graphs (run27) the bound made no difference.
constexpr int64_t PREFETCH_MAX_BYTES = 8 << 20;
__device__ __forceinline__ bool prefetch_pays(int64_t weight_bytes) {
    return weight_bytes <= PREFETCH_MAX_BYTES;
}

// Sums acc over the CTA and stores y[m, row0 + r] (threads 0 .. M * R - 1, one output each).
template <typename T, int M, int R>
__device__ __forceinline__ void reduce_store(float (&acc)[M][R], T* __restrict__ y, int n,
                                             int64_t row0) {
    __shared__ float part[WARPS][M * R];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float v = acc[m][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) part[warp][m * R + r] = v;
        }
    __syncthreads();
    const int i = threadIdx.x;
    if (i < M * R) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += part[w][i];
        const int m = i / R;
        const int64_t row = row0 + i % R;
        if (row < n) y[(int64_t)m * n + row] = from_f32<T>(s);
    }
}

// R rows per CTA and U chunks per thread and row in flight per step (the defaults for M, or
// those of a variant: gemv_<T>_m1_v9 below). A thread's chunks are t, t + THREADS, ... in that
// order whatever U, so the sums are the same bits.
template <typename T, int M, int R = rows_per_cta<M>(), int U = unroll<M>()>
__device__ void gemv_v_impl(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                            int n, int k) {
    constexpr int E = Chunk<T>::E;
    const int chunks = k / E;
    const int64_t row0 = (int64_t)blockIdx.x * R;
    const uint4* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
        wr[r] = reinterpret_cast<const uint4*>(w + last_row(row0 + r, n) * k);
    // The CTA's rows of W into L2 while the kernel before may still run (pdl.cuh).
    if (threadIdx.x < R && prefetch_pays((int64_t)n * k * (int64_t)sizeof(T)))
        prefetch_l2(w + last_row(row0 + threadIdx.x, n) * k, (uint32_t)(k * sizeof(T)));
    // One step of the thread's loads from chunk c0: U chunks a row. Every load of a step is
    // issued before any is used; chunks past the end (last step only) load the last chunk again
    // and count as zeros, without a branch that would let the compiler sink the loads behind it.
    auto load_step = [&](uint4 (&wt)[U][R], int c0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = min(c0 + u * THREADS, chunks - 1);
#pragma unroll
            for (int r = 0; r < R; ++r) wt[u][r] = load_stream(wr[r] + c);
        }
    };
    uint4 wt[U][R];
    constexpr bool early = GEMV_EARLY_LOADS & 8;
    // The first step's weights on their way before the wait for the kernel before.
    if (early) load_step(wt, threadIdx.x);
    pdl_enter();
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

    for (int c0 = threadIdx.x; c0 < chunks; c0 += THREADS * U) {
        if (!early || c0 != (int)threadIdx.x) load_step(wt, c0);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool valid = c0 + u * THREADS < chunks;
            const int c = min(c0 + u * THREADS, chunks - 1);
            const uint4 zero = make_uint4(0, 0, 0, 0);
            float xf[M][E];
#pragma unroll
            for (int m = 0; m < M; ++m)
                unpack(valid ? __ldg(xr + (int64_t)m * chunks + c) : zero, xf[m], T());
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float wf[E];
                unpack(valid ? wt[u][r] : zero, wf, T());
#pragma unroll
                for (int m = 0; m < M; ++m)
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[m][r] = fmaf(xf[m][e], wf[e], acc[m][r]);
            }
        }
    }
    reduce_store<T, M, R>(acc, y, n, row0);
}

template <typename T, int M>
__device__ void gemv_impl(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                          int n, int k) {
    constexpr int R = rows_per_cta<M>();
    pdl_enter();
    const int64_t row0 = (int64_t)blockIdx.x * R;
    const T* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wr[r] = w + last_row(row0 + r, n) * k;
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

    for (int c = threadIdx.x; c < k; c += THREADS) {
        float wf[R];
#pragma unroll
        for (int r = 0; r < R; ++r) wf[r] = to_f32(wr[r][c]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float xv = to_f32(x[(int64_t)m * k + c]);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[m][r] = fmaf(xv, wf[r], acc[m][r]);
        }
    }
    reduce_store<T, M, R>(acc, y, n, row0);
}

// One row of x, warp-per-row variant (gemv_<T>_m1_w<WR>u<U>): each warp owns WR rows of W at a
// time and walks them with its lanes over K in 16-byte chunks, all WR x U loads of a step in
// flight; a warp shuffle reduces; no CTA barrier and no shared memory.
// Warps take row groups grid-stride: the host sizes the grid so that every warp gets the same
// number of groups (no tail wave). WR = 2 for many rows; WR = 1 with deeper unrolling for few
// rows (more warps, more bytes in flight). The host sends it rows of at most 256 chunks (one or
// two steps per lane); longer rows go to the CTA-per-rows kernel, which was faster there. Needs
// the same alignment as the _v kernels. CTAs per SM promised to the compiler (and assumed by the
// host): 64 registers per thread.
//
// Two epilogues take a warp's two rows as a pair, each sum run in the same order as in the plain
// kernel and rounded to T as it would store it, so each is bit for bit the plain kernel followed
// by the fused_ops.cu kernel it replaces:
// gemv_<T>_m1_w2u4_silu: over the MLP's fused [gate | up] weight [2n, K], rows g and n + g;
//                  stores y[g] = silu(gate) * up (silu_mul).
// gemv_<T>_m1_w2u8_rope: over the fused [q | k | v] weight [(H + 2 KV) hd, K] of one token, rows
//                  i and i + hd/2 of a head (n = (H + 2 KV) hd/2 pairs); adds the bias, rotates
//                  q and k heads, stores q into q_out [H, hd] and k, v into the paged caches at
//                  the token's slot (qkv_rope_cache). 4 CTAs per SM (128 registers: 16 loads in
//                  flight per lane).
// and the residual add + RMSNorm before them folded in (NORM, below):
// gemv_<T>_m1_w2u{4,6}_silu_norm, gemv_<T>_m1_w2u8_rope_norm: x is the layer output h; the
//                  projection is of add_rms_norm(h, residual, norm_w)'s normed row within
//                  rounding, and CTA 0 also stores sum_out = h + residual (the next residual).
constexpr int WARP_ROW_CTAS = 8;
constexpr int ROPE_CTAS = 4;
// gemv_<T>_m1_w2u6_silu: the SiLU-pair kernel with six chunks per lane and row in flight, so that
// a pair of rows of up to 192 chunks (Qwen2.5-1.5B's 1,536 bf16 elements) is one dependent step
// of loads instead of two (w2u4: four chunks, then two); 6 CTAs per SM for its registers. Each
// lane sums the same chunks in the same order as w2u4: the same bits.
constexpr int SILU_ONE_STEP_CTAS = 6;

enum Epilogue { PLAIN, SILU, ROPE };

// What the rotary epilogue needs beside y (= q_out).
template <typename T>
struct RopeArgs {
    const T* bias;              // [(H + 2 KV) hd] or null
    const T* cos;               // [hd / 2]: the token's row
    const T* sin;
    const int64_t* slot;        // [1]; < 0 or >= num_slots: k and v are not stored
    T* key_cache;               // [num_blocks, block_size, KV, hd]
    T* value_cache;
    int num_heads, num_kv_heads, head_dim;
    int64_t num_slots;
};

// What the folded RMSNorm needs beside x (= the layer output h it adds to the residual).
template <typename T>
struct NormArgs {
    const T* residual;  // [k]
    const T* weight;    // [k]: the norm's weight
    T* sum_out;         // [k]: h + residual, the next residual (a buffer of its own)
    float eps;
};

// A 16-byte chunk of T from its elements as f32, each rounded to T (unpack's inverse).
__device__ __forceinline__ uint4 pack(const float (&f)[4], float) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
}

template <typename T>
__device__ __forceinline__ uint32_t bits16(float v) {
    const T t = from_f32<T>(v);
    uint16_t b;
    memcpy(&b, &t, sizeof(b));
    return b;
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[8], T) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bits16<T>(f[2 * i]) | bits16<T>(f[2 * i + 1]) << 16;
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// NORM: x is the layer output h, and the row the GEMV multiplies is rms_norm(a) * weight for
// a = h + residual (rounded to T, as add_rms_norm rounds it), folded into the projection: every
// warp reads all of a with its lanes anyway, so it sums a * a beside the dot products and scales
// each dot product once at the end, dot(a * weight, w) * rsqrtf(sum(a * a) / k + eps), instead of
// rounding a normed row to T first (add_rms_norm's normed[i] = round(a[i] * scale * weight[i])).
// Not the same bits as add_rms_norm then the projection, within T's rounding of the normed row.
// No barrier and nothing before the first weight loads but, in warp 0 of CTA 0, storing
// na.sum_out = a (the next residual; a buffer of its own, as other warps still read residual).
template <typename T, int WR, int U, Epilogue EPI, bool NORM>
__device__ void gemv_w_impl(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                            int n, int k, const RopeArgs<T> ra, const NormArgs<T> na) {
    static_assert(EPI == PLAIN || WR == 2, "an epilogue takes a pair of rows");
    constexpr int E = Chunk<T>::E;
    constexpr int STEP = EPI == PLAIN ? WR : 1;  // row groups are outputs (plain) or pairs
    const int chunks = k / E;
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * WARPS;
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    // The fold's residual, norm weight and sum (NORM only).
    const uint4* rr = reinterpret_cast<const uint4*>(na.residual);
    const uint4* gr = reinterpret_cast<const uint4*>(na.weight);
    uint4* sr = reinterpret_cast<uint4*>(na.sum_out);
    const int half = EPI == ROPE ? ra.head_dim / 2 : 1;
    // Row r of the group starting at row0: row0 + r (plain), gate/up row0 and n + row0, or
    // rotary pair j and j + hd/2 of head row0 / (hd/2).
    auto group_row = [&](int64_t row0, int r) -> int64_t {
        const int64_t head = EPI == ROPE ? row0 / half : 0;
        const int64_t j = row0 - head * half;
        return EPI == PLAIN  ? last_row(row0 + r, n)
               : EPI == SILU ? row0 + (int64_t)r * n
                             : head * ra.head_dim + j + r * half;
    };
    const int64_t first = ((int64_t)blockIdx.x * WARPS + threadIdx.x / 32) * STEP;
    // The warp's first group of rows into L2 while the kernel before may still run (pdl.cuh).
    const int64_t w_rows = EPI == PLAIN ? n : 2 * (int64_t)n;
    if (first < n && lane < WR && prefetch_pays(w_rows * k * (int64_t)sizeof(T)))
        prefetch_l2(w + group_row(first, lane) * k, (uint32_t)(k * sizeof(T)));
    // One step of a lane's loads of rows wr from chunk c0: U chunks a row (as gemv_v_impl's).
    auto load_step = [&](uint4 (&wt)[U][WR], const uint4* const (&wr)[WR], int c0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = min(c0 + u * 32, chunks - 1);
#pragma unroll
            for (int r = 0; r < WR; ++r) wt[u][r] = load_stream(wr[r] + c);
        }
    };
    uint4 wt[U][WR];
    constexpr bool early = GEMV_EARLY_LOADS & (EPI == PLAIN ? 1 : EPI == ROPE ? 2 : 4);
    // The first step of the warp's first row group before the wait for the kernel before.
    if (early && first < n) {
        const uint4* wr[WR];
#pragma unroll
        for (int r = 0; r < WR; ++r)
            wr[r] = reinterpret_cast<const uint4*>(w + group_row(first, r) * k);
        load_step(wt, wr, lane);
    }
    pdl_enter();
    if constexpr (NORM) {
        // The sum a = round(h + residual), the next residual: stored by warp 0 of CTA 0.
        if (blockIdx.x == 0 && threadIdx.x < 32) {
            for (int c = lane; c < chunks; c += 32) {
                float a[E], b[E];
                unpack(__ldg(xr + c), a, T());
                unpack(__ldg(rr + c), b, T());
#pragma unroll
                for (int e = 0; e < E; ++e) a[e] = round_to<T>(a[e] + b[e]);
                sr[c] = pack(a, T());
            }
        }
    }
    for (int64_t row0 = first; row0 < n; row0 += warps * STEP) {
        const int64_t head = EPI == ROPE ? row0 / half : 0;
        const int64_t j = row0 - head * half;
        int64_t rows[WR];
#pragma unroll
        for (int r = 0; r < WR; ++r) rows[r] = group_row(row0, r);
        const uint4* wr[WR];
#pragma unroll
        for (int r = 0; r < WR; ++r) wr[r] = reinterpret_cast<const uint4*>(w + rows[r] * k);
        float acc[WR];
#pragma unroll
        for (int r = 0; r < WR; ++r) acc[r] = 0.f;
        [[maybe_unused]] float ss = 0.f;
        for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
            if (!early || row0 != first || c0 != lane) load_step(wt, wr, c0);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const bool valid = c0 + u * 32 < chunks;
                const uint4 zero = make_uint4(0, 0, 0, 0);
                const int c = min(c0 + u * 32, chunks - 1);
                float xf[E];
                unpack(valid ? __ldg(xr + c) : zero, xf, T());
                if constexpr (NORM) {
                    // xf is h: a = round(h + residual); x = a * weight, and a * a summed.
                    float rf[E], gf[E];
                    unpack(valid ? __ldg(rr + c) : zero, rf, T());
                    unpack(valid ? __ldg(gr + c) : zero, gf, T());
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        xf[e] = round_to<T>(xf[e] + rf[e]);
                        ss = fmaf(xf[e], xf[e], ss);
                    }
#pragma unroll
                    for (int e = 0; e < E; ++e) xf[e] *= gf[e];
                }
#pragma unroll
                for (int r = 0; r < WR; ++r) {
                    float wf[E];
                    unpack(valid ? wt[u][r] : zero, wf, T());
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[r] = fmaf(xf[e], wf[e], acc[r]);
                }
            }
        }
        float v[WR];
#pragma unroll
        for (int r = 0; r < WR; ++r) {
            v[r] = acc[r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v[r] += __shfl_xor_sync(0xffffffffu, v[r], o);
        }
        if constexpr (NORM) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            const float scale = rsqrtf(ss / (float)k + na.eps);
#pragma unroll
            for (int r = 0; r < WR; ++r) v[r] *= scale;
        }
        if (lane != 0) continue;
        if constexpr (EPI == PLAIN) {
#pragma unroll
            for (int r = 0; r < WR; ++r)
                if (row0 + r < n) y[row0 + r] = from_f32<T>(v[r]);
        } else if constexpr (EPI == SILU) {
            const float g = round_to<T>(v[0]), u = round_to<T>(v[1]);
            y[row0] = from_f32<T>(g / (1.f + expf(-g)) * u);
        } else {
            float a = round_to<T>(v[0]), b = round_to<T>(v[1]);
            if (ra.bias != nullptr) {
                a = round_to<T>(a + to_f32(ra.bias[rows[0]]));
                b = round_to<T>(b + to_f32(ra.bias[rows[1]]));
            }
            if (head < ra.num_heads + ra.num_kv_heads)
                rotate_pair(a, b, to_f32(ra.cos[j]), to_f32(ra.sin[j]));
            T* d;
            if (head < ra.num_heads) {
                d = y + head * ra.head_dim;
            } else {
                const int64_t slot = *ra.slot;
                if (slot < 0 || slot >= ra.num_slots) continue;
                int64_t kv = head - ra.num_heads;
                T* cache = ra.key_cache;
                if (kv >= ra.num_kv_heads) {
                    kv -= ra.num_kv_heads;
                    cache = ra.value_cache;
                }
                d = cache + (slot * ra.num_kv_heads + kv) * ra.head_dim;
            }
            d[j] = from_f32<T>(a);
            d[j + half] = from_f32<T>(b);
        }
    }
}

#define GEMV_W(SUFFIX, T, WR, U)                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS, WARP_ROW_CTAS)                        \
        gemv_##SUFFIX##_m1_w##WR##u##U(const T* x, const T* w, T* y, int n, int k) {            \
        gemv_w_impl<T, WR, U, PLAIN, false>(x, w, y, n, k, RopeArgs<T>{}, NormArgs<T>{});       \
    }

// gemv_<T>_m1_w2u<U>_silu_norm: the SiLU-pair kernel with the RMSNorm folded in.
#define GEMV_SILU_NORM(SUFFIX, T, U, CTAS)                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, CTAS)                                 \
        gemv_##SUFFIX##_m1_w2u##U##_silu_norm(const T* h, const T* w, T* y, int n, int k,       \
                                              const T* residual, const T* norm_w, T* sum_out,   \
                                              float eps) {                                      \
        const NormArgs<T> na{residual, norm_w, sum_out, eps};                                   \
        gemv_w_impl<T, 2, U, SILU, true>(h, w, y, n, k, RopeArgs<T>{}, na);                     \
    }

// y [1, n] = silu(x W[:n]^T) * (x W[n:]^T) for W [2n, k]; _norm: x = rms_norm(h + residual) *
// norm_w folded in, and sum_out = h + residual.
#define GEMV_SILU(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS, WARP_ROW_CTAS)                        \
        gemv_##SUFFIX##_m1_w2u4_silu(const T* x, const T* w, T* y, int n, int k) {              \
        gemv_w_impl<T, 2, 4, SILU, false>(x, w, y, n, k, RopeArgs<T>{}, NormArgs<T>{});         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS, SILU_ONE_STEP_CTAS)                   \
        gemv_##SUFFIX##_m1_w2u6_silu(const T* x, const T* w, T* y, int n, int k) {              \
        gemv_w_impl<T, 2, 6, SILU, false>(x, w, y, n, k, RopeArgs<T>{}, NormArgs<T>{});         \
    }                                                                                           \
    GEMV_SILU_NORM(SUFFIX, T, 4, WARP_ROW_CTAS)                                                 \
    GEMV_SILU_NORM(SUFFIX, T, 6, SILU_ONE_STEP_CTAS)

// q_out [H, hd] (y) and the caches from one token's x [1, k] and W [(H + 2 KV) hd, k]; n pairs.
// _norm: x = rms_norm(h + residual) * norm_w folded in, and sum_out = h + residual.
#define ROPE_PARAMS(T)                                                                          \
    const T* bias, const T* cos, const T* sin, const int64_t* slot, T* key_cache,               \
        T* value_cache, int num_heads, int num_kv_heads, int head_dim, int64_t num_slots
#define ROPE_ARGS(T)                                                                            \
    RopeArgs<T>{bias,        cos,       sin,          slot,     key_cache,                      \
                value_cache, num_heads, num_kv_heads, head_dim, num_slots}
#define GEMV_ROPE(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS, ROPE_CTAS) gemv_##SUFFIX##_m1_w2u8_rope( \
        const T* x, const T* w, T* q_out, int n, int k, ROPE_PARAMS(T)) {                       \
        gemv_w_impl<T, 2, 8, ROPE, false>(x, w, q_out, n, k, ROPE_ARGS(T), NormArgs<T>{});      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS, ROPE_CTAS)                            \
        gemv_##SUFFIX##_m1_w2u8_rope_norm(const T* h, const T* w, T* q_out, int n, int k,       \
                                          ROPE_PARAMS(T), const T* residual, const T* norm_w,   \
                                          T* sum_out, float eps) {                              \
        const NormArgs<T> na{residual, norm_w, sum_out, eps};                                   \
        gemv_w_impl<T, 2, 8, ROPE, true>(h, w, q_out, n, k, ROPE_ARGS(T), na);                  \
    }

#define GEMV_M(SUFFIX, T, M)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS, min_ctas<M>())                                       \
        gemv_##SUFFIX##_m##M##_v(const T* x, const T* w, T* y, int n, int k) {                  \
        gemv_v_impl<T, M>(x, w, y, n, k);                                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS, min_ctas<M>())                                       \
        gemv_##SUFFIX##_m##M(const T* x, const T* w, T* y, int n, int k) {                      \
        gemv_impl<T, M>(x, w, y, n, k);                                                         \
    }

// One row, nine chunks per thread and row in flight: a row of up to 1,152 chunks (Qwen2.5-1.5B's
// down projection: 8,960 bf16 elements, 1,120 chunks) in one dependent step of loads instead of
// three (gemv_<T>_m1_v: four chunks per step). Same bits as gemv_<T>_m1_v.
#define GEMV_M1_DEEP(SUFFIX, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, min_ctas<1>())                        \
        gemv_##SUFFIX##_m1_v9(const T* x, const T* w, T* y, int n, int k) {                     \
        gemv_v_impl<T, 1, rows_per_cta<1>(), 9>(x, w, y, n, k);                                 \
    }

#define GEMV(SUFFIX, T)   \
    GEMV_M1_DEEP(SUFFIX, T) \
    GEMV_W(SUFFIX, T, 2, 4) \
    GEMV_SILU(SUFFIX, T)    \
    GEMV_ROPE(SUFFIX, T)    \
    GEMV_W(SUFFIX, T, 1, 8) \
    GEMV_M(SUFFIX, T, 1)  \
    GEMV_M(SUFFIX, T, 2)  \
    GEMV_M(SUFFIX, T, 3)  \
    GEMV_M(SUFFIX, T, 4)  \
    GEMV_M(SUFFIX, T, 5)  \
    GEMV_M(SUFFIX, T, 6)  \
    GEMV_M(SUFFIX, T, 7)  \
    GEMV_M(SUFFIX, T, 8)

GEMV(f32, float)
GEMV(f16, __half)
GEMV(bf16, __nv_bfloat16)
