// The persistent decode step: every decoder layer of one sequence's one-token step (batch 1) in a
// single launch, instead of five to seven launches a layer. Each layer is five phases separated by
// grid barriers:
//   A. RMSNorm of the residual stream (each CTA its own copy, in shared memory), the q/k/v
//      projection with its bias and rotary, q to scratch, k and v into the paged caches;
//   B. attention of the token over its context: a unit per (KV head, 64 keys), partials to scratch;
//   C. the partials merged (each CTA all of them) and the o projection plus the residual add;
//   D. RMSNorm, the gate/up projection and the SiLU-gate product;
//   E. the down projection plus the residual add (the last layer's into `out`).
// Projections give each CTA a contiguous range of output rows (the rows of a rotary pair or of a
// gate/up pair together), and its warps stream those rows as 512-byte pieces (a lane's 16 bytes),
// eight in flight per warp; per-piece sums go to shared memory and each row is summed in a fixed
// order, so the step is deterministic. Between phases a CTA asks L2 for the weights of the phases
// ahead (bulk prefetch), so a barrier's wait overlaps their fetch; in B, CTAs without a unit
// prefetch the o and gate/up weights while HBM would idle.
//
// Launch: one CTA of DS_THREADS per SM (grid = SM count: every CTA resident, or the barriers
// would never open), dynamic shared memory laid out by the host (StepArgs' smem_* offsets),
// `barrier` zeroed before the launch. Arithmetic follows the per-op kernels (RMSNorm's sum rounded
// to T, rotary as rotate_pair, f32 softmax), with sums in other orders, so outputs are meant to
// agree with the per-op path to rounding, not bit for bit. Data written during the launch is read
// through L2 (ld.global.cg), never the non-coherent paths.
//
// Off by default in the engine: slower than the per-op kernels in CUDA graphs
// (engine/src/model/decode_step.rs, days/gpu-engine/README.md runs 42-48).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "loads.cuh"
#include "pdl.cuh"
#include "warp.cuh"

constexpr int DS_WARPS = 16;
constexpr int DS_THREADS = DS_WARPS * 32;
constexpr int DS_MAX_LAYERS = 48;
constexpr int DS_UNROLL = 8;      // 512-byte pieces in flight per warp
constexpr int DS_KEYS = 64;       // keys per attention unit
constexpr int DS_MAX_GROUP = 16;  // query heads per KV head
constexpr uint32_t DS_PREFETCH_PIECE = 16384;

// One decoder layer's weights (row-major [out, in]) and paged caches.
template <typename T>
struct LayerPtrs {
    const T* qkv_w;      // [(H + 2 KV) hd, hidden]
    const T* qkv_b;      // [(H + 2 KV) hd] or null
    const T* in_norm;    // [hidden]
    const T* o_w;        // [hidden, H hd]
    const T* post_norm;  // [hidden]
    const T* gate_up_w;  // [2 inter, hidden]
    const T* down_w;     // [hidden, inter]
    T* k_cache;          // [num_blocks, block_size, KV, hd]
    T* v_cache;
};

template <typename T>
struct StepArgs {
    const T* x;          // [hidden]: the token's embedding (layer 0's residual stream)
    T* out;              // [hidden]: the last layer's residual stream (before the final norm)
    T* resid;            // [2 hidden] scratch: the stream after attention, after the MLP
    T* q;                // [H hd] scratch
    T* act;              // [inter] scratch
    float* part;         // scratch: [KV, max_units, group, hd] accumulators, then [.., 2] max, sum
    uint32_t* barrier;   // [1], zero at launch
    const T* cos;        // [hd / 2]: the token's rotary row
    const T* sin;
    const int64_t* slot;           // [1]: the token's cache slot (< 0 or >= num_slots: not stored)
    const uint32_t* block_table;   // [max_blocks]
    const uint32_t* context_len;   // [1]: keys the token sees, itself included
    uint64_t* timing;    // null, or [1 + 10 layers]: CTA 0's clock at each phase's end and barrier
    int64_t num_slots;
    int hidden, inter, heads, kv_heads, head_dim, block_size, max_units, layers;
    float eps, scale;
    // Byte offsets into dynamic shared memory.
    int smem_part, smem_q, smem_s, smem_v, smem_w, smem_ml, pad0, pad1;
    LayerPtrs<T> layer[DS_MAX_LAYERS];
};

// ------------------------------------------------------------------------------ helpers

// Data another CTA wrote in this launch: through L2.
__device__ __forceinline__ uint4 load_l2(const void* p) {
    return __ldcg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ float load_l2f(const float* p) { return __ldcg(p); }
template <typename T>
__device__ __forceinline__ float load_l2t(const T* p) {
    const unsigned short b = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T t;
    memcpy(&t, &b, sizeof(b));
    return to_f32(t);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    T e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_f32<T>(f[i]);
    uint4 r;
    memcpy(&r, e, sizeof(r));
    return r;
}

// Rows [begin, end) of n rows for CTA b of p: contiguous, sizes differing by at most one.
__device__ __forceinline__ void cta_range(int n, int& begin, int& end) {
    begin = (int)((int64_t)n * blockIdx.x / gridDim.x);
    end = (int)((int64_t)n * (blockIdx.x + 1) / gridDim.x);
}

// Every CTA arrives, then waits until all have: writes before it are visible after it (the
// pattern of cooperative groups' grid sync). `epoch` counts the barriers passed in this launch.
__device__ __forceinline__ uint64_t now_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The grid barrier, split: arrive() once a CTA's writes of a phase are done, wait() where the next
// phase first reads another CTA's writes; in between a CTA may only read what no CTA writes in
// this launch (weights, older cache entries), so those loads fly during the wait. Every CTA
// arrives and waits in the same order: a release add to the count, then an acquire poll of it. With `timing`, CTA 0 stamps its clock at
// each arrive() and after each wait().
struct GridSync {
    uint32_t* counter;
    uint64_t* timing;
    uint32_t epoch;
    int at;

    __device__ __forceinline__ void mark() {
        if (timing != nullptr && blockIdx.x == 0 && threadIdx.x == 0) timing[at] = now_ns();
        ++at;
    }
    __device__ __forceinline__ void arrive() {
        __syncthreads();
        mark();
        epoch += gridDim.x;
        // Release at GPU scope, cumulative over the CTA's writes ordered before it by the CTA
        // barrier above (no full fence needed).
        if (threadIdx.x == 0)
            asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(counter), "r"(1u) : "memory");
    }
    __device__ __forceinline__ void wait() {
        if (threadIdx.x == 0) {
            uint32_t v;
            do {
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
            } while (v < epoch);
        }
        __syncthreads();
        mark();
    }
};

// Bulk L2 prefetch of [p, p + bytes) (16-byte aligned, a multiple of 16), spread over the CTA's
// threads in pieces of at most 16 KB.
__device__ __forceinline__ void cta_prefetch(const void* p, uint64_t bytes) {
    const uint64_t pieces = (bytes + DS_PREFETCH_PIECE - 1) / DS_PREFETCH_PIECE;
    for (uint64_t i = threadIdx.x; i < pieces; i += DS_THREADS) {
        const uint64_t off = i * DS_PREFETCH_PIECE;
        const uint64_t n = bytes - off < DS_PREFETCH_PIECE ? bytes - off : DS_PREFETCH_PIECE;
        prefetch_l2(static_cast<const char*>(p) + off, (uint32_t)n);
    }
}

// xs (k / 8 chunks of shared memory) = RMSNorm(x) * w, each element rounded to T; x has k
// elements (written in this launch, or the embedding).
template <typename T>
__device__ void norm_into(const T* x, const T* w, int k, float eps, uint4* xs, float* red) {
    const int chunks = k / 8;
    float ss = 0.f;
    for (int c = threadIdx.x; c < chunks; c += DS_THREADS) {
        const uint4 raw = load_l2(x + c * 8);
        float a[8];
        widen16<T>(raw, a);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(a[e], a[e], ss);
        xs[c] = raw;
    }
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < DS_WARPS; ++i) total += red[i];
    const float scale = rsqrtf(total / (float)k + eps);
    for (int c = threadIdx.x; c < chunks; c += DS_THREADS) {
        float a[8], nw[8];
        widen16<T>(xs[c], a);
        widen16<T>(__ldg(reinterpret_cast<const uint4*>(w) + c), nw);
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] = a[e] * scale * nw[e];
        xs[c] = pack8<T>(a);
    }
    __syncthreads();
}

// The CTA's projection rows: for local rows i in [0, nrows) (global row row_of(i) of w [*, k]),
// part[i * segs + s] summed over s is the dot product of that row with xs, a segment being 32
// 16-byte chunks (a lane's load each). Warp w takes a contiguous run of (row, segment) pieces,
// DS_UNROLL loads in flight; each lane accumulates a row's pieces and the warp reduces once per
// row it touches: the sum lands at the row's last piece of the run, zeros at the others, so the
// fixed assignment keeps every sum's order. The first loads are issued before `prologue()` runs
// (every thread calls it; it may write xs, e.g. the RMSNorm, and must end with a CTA barrier).
// Ends with a CTA barrier.
template <typename T, typename RowOf, typename Prologue>
__device__ void rows_dot(const T* __restrict__ w, int k, int nrows, RowOf row_of,
                         const uint4* __restrict__ xs, float* __restrict__ part,
                         Prologue prologue) {
    const int chunks = k / 8, segs = (chunks + 31) / 32, items = nrows * segs;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int per = (items + DS_WARPS - 1) / DS_WARPS;
    const int begin = min(items, warp * per), end = min(items, begin + per);
    auto load = [&](uint4 (&wv)[DS_UNROLL], int i0) {
#pragma unroll
        for (int u = 0; u < DS_UNROLL; ++u) {
            const int it = min(i0 + u, end - 1);
            const int r = it / segs, s = it - r * segs;
            const int c = min(s * 32 + lane, chunks - 1);
            wv[u] = load_stream(w + (int64_t)row_of(r) * k + (int64_t)c * 8);
        }
    };
    uint4 wv[DS_UNROLL];
    if (begin < end) load(wv, begin);
    prologue();
    float acc = 0.f;
    for (int i0 = begin; i0 < end; i0 += DS_UNROLL) {
        if (i0 != begin) load(wv, i0);
#pragma unroll
        for (int u = 0; u < DS_UNROLL; ++u) {
            const int it = i0 + u;
            if (it >= end) break;
            const int r = it / segs, s = it - r * segs;
            const int c = s * 32 + lane;
            if (c < chunks) {
                float wf[8], xf[8];
                widen16<T>(wv[u], wf);
                widen16<T>(xs[c], xf);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc = fmaf(xf[e], wf[e], acc);
            }
            // The row's last piece in this run: reduce; else leave a zero.
            if (s == segs - 1 || it == end - 1) {
                const float v = warp_sum(acc);
                acc = 0.f;
                if (lane == 0) part[it] = v;
            } else if (lane == 0) {
                part[it] = 0.f;
            }
        }
    }
    __syncthreads();
}

__device__ __forceinline__ float row_sum(const float* part, int i, int segs) {
    float s = 0.f;
    for (int j = 0; j < segs; ++j) s += part[i * segs + j];
    return s;
}

// ------------------------------------------------------------------------------ phases

// The rotary pair p of the q/k/v rows: head p / half, rows j and j + half of it.
__device__ __forceinline__ int64_t pair_row(int p, int r, int half, int hd) {
    const int head = p / half, j = p - head * half;
    return (int64_t)head * hd + j + r * half;
}

template <typename T>
__device__ void phase_qkv(const StepArgs<T>& a, const LayerPtrs<T>& L, const T* resid_in,
                          char* smem, GridSync& sync) {
    uint4* xs = reinterpret_cast<uint4*>(smem);
    float* part = reinterpret_cast<float*>(smem + a.smem_part);
    float* red = reinterpret_cast<float*>(smem + a.smem_ml);
    const int hd = a.head_dim, half = hd / 2;
    const int pairs = (a.heads + 2 * a.kv_heads) * half;
    int p0, p1;
    cta_range(pairs, p0, p1);
    const int np = p1 - p0;
    // Local row i: pair p0 + i % np, its first row (i < np) or second.
    rows_dot<T>(
        L.qkv_w, a.hidden, 2 * np,
        [&](int i) { return pair_row(p0 + (i % np), i / np, half, hd); }, xs, part,
        [&] {
            sync.wait();
            norm_into<T>(resid_in, L.in_norm, a.hidden, a.eps, xs, red);
        });
    const int segs = (a.hidden / 8 + 31) / 32;
    for (int q = threadIdx.x; q < np; q += DS_THREADS) {
        const int p = p0 + q;
        const int head = p / half, j = p - head * half;
        float x0 = round_to<T>(row_sum(part, q, segs));
        float x1 = round_to<T>(row_sum(part, np + q, segs));
        if (L.qkv_b != nullptr) {
            x0 = round_to<T>(x0 + to_f32(L.qkv_b[pair_row(p, 0, half, hd)]));
            x1 = round_to<T>(x1 + to_f32(L.qkv_b[pair_row(p, 1, half, hd)]));
        }
        if (head < a.heads + a.kv_heads) rotate_pair(x0, x1, to_f32(a.cos[j]), to_f32(a.sin[j]));
        T* d;
        if (head < a.heads) {
            d = a.q + (int64_t)head * hd;
        } else {
            const int64_t slot = *a.slot;
            if (slot < 0 || slot >= a.num_slots) continue;
            int kv = head - a.heads;
            T* cache = L.k_cache;
            if (kv >= a.kv_heads) {
                kv -= a.kv_heads;
                cache = L.v_cache;
            }
            d = cache + (slot * a.kv_heads + kv) * hd;
        }
        d[j] = from_f32<T>(x0);
        d[j + half] = from_f32<T>(x1);
    }
}

// Attention units: (KV head, 64 keys) each; returns whether this CTA had one. The unit's K and V
// rows go to shared memory (K rows padded by one 16-byte chunk, so that a warp reading 32 rows
// hits distinct banks); a thread per (query head, key) takes a score, a warp per head the softmax,
// threads per (key slice, head, 8 dims) the P V sums.
constexpr int DS_KV_LOADS = DS_KEYS * 32 / DS_THREADS;  // K/V chunks per thread at most (hd 256)

// Waits (sync) once its first unit's loads of older keys are issued, or at once without a unit.
template <typename T>
__device__ void phase_attention(const StepArgs<T>& a, const LayerPtrs<T>& L, int nkeys,
                                char* smem, GridSync& sync) {
    const int hd = a.head_dim, hc = hd / 8, g = a.heads / a.kv_heads, kst = hc + 1;
    const int units_per_head = (nkeys + DS_KEYS - 1) / DS_KEYS;
    const int units = a.kv_heads * units_per_head;
    float* qs = reinterpret_cast<float*>(smem + a.smem_q);   // [g, hd]
    float* ss = reinterpret_cast<float*>(smem + a.smem_s);   // [g, DS_KEYS]
    uint4* ks = reinterpret_cast<uint4*>(smem + a.smem_v);   // [DS_KEYS, hc + 1]
    uint4* vs = ks + DS_KEYS * kst;                           // [DS_KEYS, hc]
    float* red = reinterpret_cast<float*>(smem + a.smem_part);  // P V partial sums
    float* ml = reinterpret_cast<float*>(smem + a.smem_ml);  // [2, DS_MAX_GROUP]
    float* acc_out = a.part;
    float* ml_out = a.part + (int64_t)a.kv_heads * a.max_units * g * hd;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int bs = a.block_size;
    bool waited = false;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const int kvh = u / units_per_head, ch = u - kvh * units_per_head;
        const int j0 = ch * DS_KEYS, n = min(DS_KEYS, nkeys - j0);
        // K and V chunks, every load issued before any store; the step's own key (written in
        // the q/k/v phase) only after the wait.
        uint4 kr[DS_KV_LOADS], vr[DS_KV_LOADS];
        int64_t offs[DS_KV_LOADS];
#pragma unroll
        for (int r = 0; r < DS_KV_LOADS; ++r) {
            const int i = threadIdx.x + r * DS_THREADS;
            kr[r] = vr[r] = make_uint4(0, 0, 0, 0);
            offs[r] = -1;
            if (i < n * hc) {
                const int jj = i / hc, c = i - jj * hc, j = j0 + jj;
                const int64_t block = __ldg(a.block_table + j / bs);
                const int64_t off = ((block * bs + j % bs) * a.kv_heads + kvh) * hd + c * 8;
                if (j < nkeys - 1) {
                    kr[r] = load_l2(L.k_cache + off);
                    vr[r] = load_l2(L.v_cache + off);
                } else {
                    offs[r] = off;
                }
            }
        }
        if (!waited) {
            sync.wait();
            waited = true;
        }
#pragma unroll
        for (int r = 0; r < DS_KV_LOADS; ++r) {
            if (offs[r] >= 0) {
                kr[r] = load_l2(L.k_cache + offs[r]);
                vr[r] = load_l2(L.v_cache + offs[r]);
            }
        }
        for (int t = threadIdx.x; t < g * hd; t += DS_THREADS)
            qs[t] = load_l2t(a.q + (int64_t)kvh * g * hd + t);
#pragma unroll
        for (int r = 0; r < DS_KV_LOADS; ++r) {
            const int i = threadIdx.x + r * DS_THREADS;
            if (i < n * hc) {
                const int jj = i / hc, c = i - jj * hc;
                ks[jj * kst + c] = kr[r];
                vs[jj * hc + c] = vr[r];
            }
        }
        __syncthreads();
        for (int t = threadIdx.x; t < g * DS_KEYS; t += DS_THREADS) {
            const int h = t / DS_KEYS, jj = t - h * DS_KEYS;
            if (jj >= n) continue;
            const float* qh = qs + h * hd;
            float p = 0.f;
            for (int c = 0; c < hc; ++c) {
                float kf[8];
                widen16<T>(ks[jj * kst + c], kf);
#pragma unroll
                for (int e = 0; e < 8; ++e) p = fmaf(qh[c * 8 + e], kf[e], p);
            }
            ss[t] = p * a.scale;
        }
        __syncthreads();
        for (int h = warp; h < g; h += DS_WARPS) {
            const float s0 = lane < n ? ss[h * DS_KEYS + lane] : -INFINITY;
            const float s1 = lane + 32 < n ? ss[h * DS_KEYS + lane + 32] : -INFINITY;
            const float m = warp_max(fmaxf(s0, s1));
            const float e0 = lane < n ? expf(s0 - m) : 0.f;
            const float e1 = lane + 32 < n ? expf(s1 - m) : 0.f;
            const float l = warp_sum(e0 + e1);
            ss[h * DS_KEYS + lane] = e0;
            ss[h * DS_KEYS + lane + 32] = e1;
            if (lane == 0) {
                ml[h] = m;
                ml[DS_MAX_GROUP + h] = l;
            }
        }
        __syncthreads();
        // P V: thread (slice, head, 8 dims) over keys slice, slice + slices, ...
        const int cells = g * hc, slices = DS_THREADS / cells;
        const int t = threadIdx.x, slice = t / cells, cell = t - slice * cells;
        if (slice < slices) {
            const int h = cell / hc, c = cell - h * hc;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int jj = slice; jj < n; jj += slices) {
                const float p = ss[h * DS_KEYS + jj];
                float vf[8];
                widen16<T>(vs[jj * hc + c], vf);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] = fmaf(p, vf[e], acc[e]);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) red[(slice * cells + cell) * 8 + e] = acc[e];
        }
        __syncthreads();
        const int64_t base = (int64_t)(kvh * a.max_units + ch) * g;
        for (int o = threadIdx.x; o < g * hd; o += DS_THREADS) {
            const int h = o / hd, d = o - h * hd;
            const int cell = h * hc + d / 8, e = d % 8;
            float s = 0.f;
            for (int sl = 0; sl < slices; ++sl) s += red[(sl * cells + cell) * 8 + e];
            acc_out[base * hd + o] = s;
        }
        for (int h = threadIdx.x; h < g; h += DS_THREADS) {
            ml_out[(base + h) * 2] = ml[h];
            ml_out[(base + h) * 2 + 1] = ml[DS_MAX_GROUP + h];
        }
        __syncthreads();
    }
    if (!waited) sync.wait();
}

// Merges the attention partials into xs (H hd elements of T), then the o projection of the
// CTA's rows plus the residual: resid_out[r] = resid_in[r] + o[r].
template <typename T>
__device__ void phase_o(const StepArgs<T>& a, const LayerPtrs<T>& L, int nkeys,
                        const T* resid_in, T* resid_out, char* smem, GridSync& sync) {
    uint4* xs = reinterpret_cast<uint4*>(smem);
    float* part = reinterpret_cast<float*>(smem + a.smem_part);
    float* wts = reinterpret_cast<float*>(smem + a.smem_w);  // [H, units_per_head]
    const int hd = a.head_dim, g = a.heads / a.kv_heads, width = a.heads * hd;
    const int uph = (nkeys + DS_KEYS - 1) / DS_KEYS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float* acc_in = a.part;
    const float* ml_in = a.part + (int64_t)a.kv_heads * a.max_units * g * hd;
    // Row of (query head hq, unit ch) in the partials.
    auto row = [&](int hq, int ch) {
        const int kvh = hq / g, h = hq - kvh * g;
        return (int64_t)(kvh * a.max_units + ch) * g + h;
    };
    // The merge: each head's unit weights exp(m_u - M) / sum_u exp(m_u - M) l_u, then four dims
    // per thread with the units' loads unrolled. Run while the o projection's first loads fly.
    auto merge = [&] {
        sync.wait();
        for (int hq = warp; hq < a.heads; hq += DS_WARPS) {
            float m = -INFINITY;
            for (int ch = lane; ch < uph; ch += 32) m = fmaxf(m, load_l2f(ml_in + row(hq, ch) * 2));
            m = warp_max(m);
            float den = 0.f;
            for (int ch = lane; ch < uph; ch += 32) {
                const float2 v = __ldcg(reinterpret_cast<const float2*>(ml_in + row(hq, ch) * 2));
                const float w = expf(v.x - m);
                wts[hq * a.max_units + ch] = w;
                den += w * v.y;
            }
            den = warp_sum(den);
            for (int ch = lane; ch < uph; ch += 32) wts[hq * a.max_units + ch] /= den;
        }
        __syncthreads();
        T* xt = reinterpret_cast<T*>(xs);
        for (int o = threadIdx.x * 4; o < width; o += DS_THREADS * 4) {
            const int hq = o / hd, d = o - hq * hd;
            float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
            for (int ch = 0; ch < uph; ++ch) {
                const float w = wts[hq * a.max_units + ch];
                const float4 v = __ldcg(reinterpret_cast<const float4*>(acc_in + row(hq, ch) * hd + d));
                s.x = fmaf(w, v.x, s.x);
                s.y = fmaf(w, v.y, s.y);
                s.z = fmaf(w, v.z, s.z);
                s.w = fmaf(w, v.w, s.w);
            }
            xt[o] = from_f32<T>(s.x);
            xt[o + 1] = from_f32<T>(s.y);
            xt[o + 2] = from_f32<T>(s.z);
            xt[o + 3] = from_f32<T>(s.w);
        }
        __syncthreads();
    };
    int r0, r1;
    cta_range(a.hidden, r0, r1);
    rows_dot<T>(L.o_w, width, r1 - r0, [&](int i) { return (int64_t)r0 + i; }, xs, part, merge);
    const int segs = (width / 8 + 31) / 32;
    for (int i = threadIdx.x; i < r1 - r0; i += DS_THREADS) {
        const float o = round_to<T>(row_sum(part, i, segs));
        resid_out[r0 + i] = from_f32<T>(load_l2t(resid_in + r0 + i) + o);
    }
}

template <typename T>
__device__ void phase_gate_up(const StepArgs<T>& a, const LayerPtrs<T>& L, const T* resid,
                              char* smem, GridSync& sync) {
    uint4* xs = reinterpret_cast<uint4*>(smem);
    float* part = reinterpret_cast<float*>(smem + a.smem_part);
    float* red = reinterpret_cast<float*>(smem + a.smem_ml);
    int p0, p1;
    cta_range(a.inter, p0, p1);
    const int np = p1 - p0;
    // Local row i: gate row p0 + i (i < np), else up row inter + p0 + i - np.
    rows_dot<T>(
        L.gate_up_w, a.hidden, 2 * np,
        [&](int i) { return (int64_t)p0 + i + (i < np ? 0 : a.inter - np); }, xs, part,
        [&] {
            sync.wait();
            norm_into<T>(resid, L.post_norm, a.hidden, a.eps, xs, red);
        });
    const int segs = (a.hidden / 8 + 31) / 32;
    for (int q = threadIdx.x; q < np; q += DS_THREADS) {
        const float gv = round_to<T>(row_sum(part, q, segs));
        const float uv = round_to<T>(row_sum(part, np + q, segs));
        a.act[p0 + q] = from_f32<T>(gv / (1.f + expf(-gv)) * uv);
    }
}

template <typename T>
__device__ void phase_down(const StepArgs<T>& a, const LayerPtrs<T>& L, const T* resid_in,
                           T* resid_out, char* smem, GridSync& sync) {
    uint4* xs = reinterpret_cast<uint4*>(smem);
    float* part = reinterpret_cast<float*>(smem + a.smem_part);
    int r0, r1;
    cta_range(a.hidden, r0, r1);
    rows_dot<T>(L.down_w, a.inter, r1 - r0, [&](int i) { return (int64_t)r0 + i; }, xs, part, [&] {
        sync.wait();
        for (int c = threadIdx.x; c < a.inter / 8; c += DS_THREADS) xs[c] = load_l2(a.act + c * 8);
        __syncthreads();
    });
    const int segs = (a.inter / 8 + 31) / 32;
    for (int i = threadIdx.x; i < r1 - r0; i += DS_THREADS) {
        const float d = round_to<T>(row_sum(part, i, segs));
        resid_out[r0 + i] = from_f32<T>(load_l2t(resid_in + r0 + i) + d);
    }
}

// ------------------------------------------------------------------------------ prefetches

// The CTA's q/k/v rows of layer L (its rotary pairs' two rows each).
template <typename T>
__device__ void prefetch_qkv(const StepArgs<T>& a, const LayerPtrs<T>& L) {
    const int hd = a.head_dim, half = hd / 2;
    int p0, p1;
    cta_range((a.heads + 2 * a.kv_heads) * half, p0, p1);
    const uint32_t row_bytes = (uint32_t)a.hidden * sizeof(T);
    for (int i = threadIdx.x; i < 2 * (p1 - p0); i += DS_THREADS) {
        const T* row = L.qkv_w + pair_row(p0 + i / 2, i % 2, half, hd) * a.hidden;
        for (uint32_t off = 0; off < row_bytes; off += DS_PREFETCH_PIECE)
            prefetch_l2(reinterpret_cast<const char*>(row) + off,
                        min(DS_PREFETCH_PIECE, row_bytes - off));
    }
}

// The CTA's o rows and the first `gate_up_bytes` of its gate and of its up rows.
template <typename T>
__device__ void prefetch_o_gate_up(const StepArgs<T>& a, const LayerPtrs<T>& L,
                                   uint64_t gate_up_bytes) {
    const int width = a.heads * a.head_dim;
    int r0, r1;
    cta_range(a.hidden, r0, r1);
    cta_prefetch(L.o_w + (int64_t)r0 * width, (uint64_t)(r1 - r0) * width * sizeof(T));
    cta_range(a.inter, r0, r1);
    const uint64_t rows = (uint64_t)(r1 - r0) * a.hidden * sizeof(T);
    const uint64_t n = rows < gate_up_bytes ? rows : gate_up_bytes;
    cta_prefetch(L.gate_up_w + (int64_t)r0 * a.hidden, n);
    cta_prefetch(L.gate_up_w + ((int64_t)a.inter + r0) * a.hidden, n);
}

template <typename T>
__device__ void prefetch_down(const StepArgs<T>& a, const LayerPtrs<T>& L, uint64_t bytes) {
    int r0, r1;
    cta_range(a.hidden, r0, r1);
    const uint64_t rows = (uint64_t)(r1 - r0) * a.inter * sizeof(T);
    cta_prefetch(L.down_w + (int64_t)r0 * a.inter, rows < bytes ? rows : bytes);
}

// ------------------------------------------------------------------------------ the kernel

constexpr uint64_t DS_GATE_UP_AHEAD = 64 << 10;  // per CTA, of each of gate and up
constexpr uint64_t DS_DOWN_AHEAD = 96 << 10;     // per CTA

template <typename T>
__device__ void decode_step_impl(const StepArgs<T>& a) {
    extern __shared__ __align__(16) char smem[];
    prefetch_qkv(a, a.layer[0]);  // weights: before the wait for the kernel before (pdl.cuh)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    GridSync sync{a.barrier, a.timing, 0, 0};
    sync.arrive();
    const int nkeys = (int)*a.context_len;
    const int units = a.kv_heads * ((nkeys + DS_KEYS - 1) / DS_KEYS);
    T* r_mid = a.resid;             // after attention
    T* r_end = a.resid + a.hidden;  // after the MLP
    for (int l = 0; l < a.layers; ++l) {
        const LayerPtrs<T>& L = a.layer[l];
        const T* r_in = l == 0 ? a.x : r_end;
        phase_qkv(a, L, r_in, smem, sync);
        sync.arrive();
        const bool has_unit = (int)blockIdx.x < units;
        if (!has_unit) prefetch_o_gate_up(a, L, DS_GATE_UP_AHEAD);
        phase_attention(a, L, nkeys, smem, sync);
        sync.arrive();
        if (has_unit) prefetch_o_gate_up(a, L, DS_GATE_UP_AHEAD);
        phase_o(a, L, nkeys, r_in, r_mid, smem, sync);
        sync.arrive();
        phase_gate_up(a, L, r_mid, smem, sync);
        prefetch_down(a, L, DS_DOWN_AHEAD);
        sync.arrive();
        if (l + 1 < a.layers) prefetch_qkv(a, a.layer[l + 1]);
        phase_down(a, L, r_mid, l + 1 < a.layers ? r_end : a.out, smem, sync);
        sync.arrive();
    }
}

#define DECODE_STEP(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(DS_THREADS, 1)                                 \
        decode_step_##SUFFIX(const __grid_constant__ StepArgs<T> a) {                           \
        decode_step_impl<T>(a);                                                                 \
    }

DECODE_STEP(f16, __half)
DECODE_STEP(bf16, __nv_bfloat16)
