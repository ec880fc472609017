// Decode attention over the paged KV cache: every sequence of the step has one query token.
//
// Same layouts and contract as paged_attention.cu:
//   q, out        [num_tokens, num_heads, D]
//   key/value     [num_blocks, block_size, num_kv_heads, D]
//   block_tables  u32 [num_seqs, max_blocks_per_seq]
//   context_lens  u32 [num_seqs]
//   query_start   u32 [num_seqs + 1]
// The query token of sequence s (token query_start[s]) sees keys 0 ..= ctx - qlen; a sequence
// without a query token is skipped (the host sends steps with longer queries elsewhere).
//
// Work split (split-KV "flash decoding"): grid (num_seqs, num_kv_heads * head_tiles, splits). A CTA
// takes one sequence, one KV head and up to G of its query heads (G >= the GQA group in practice,
// so each K/V element is read once per step), and one of `splits` context partitions (each
// sequence's visible keys split evenly, in 32-key chunks). Its 4 warps walk the partition in
// 32-key chunks, chunk c to warp c % 4, with no block-wide barrier in the key loop:
//   - scores: the chunk's 32 K rows are staged through padded, warp-private shared memory with
//     coalesced 16-byte loads; lane i then dots key i with the G query rows (f32, pre-scaled by
//     scale * log2 e, in shared memory) -> one score per (lane = key, head);
//   - online softmax per head in f32 (running max m uniform over the warp, per-lane partial sums);
//   - P V: lanes own 16-byte slices of a V row (D / VEC lanes per row, 32 / (D / VEC) keys per
//     step), V read coalesced straight from global memory (L2-prefetched at chunk start), p
//     broadcast by shuffle, f32 accumulators acc[head][VEC].
// The warps' (m, l, acc) merge through shared memory at the end; the CTA then writes `out` (one
// partition) or (m, l, acc) partials, which paged_decode_combine merges. Empty partitions (short
// contexts) exit at once and write nothing; the combine reads only the partitions a context uses.
//
// paged_decode_<T>_d<D>_g<G>_cluster (sm_90): the partitions of one (sequence, head tile) are one
// thread-block cluster (cluster dims (1, 1, splits), splits <= 16). Each CTA leaves its (m, l, acc)
// in shared memory; after a cluster barrier every CTA merges a slice of the output elements,
// reading the partitions through distributed shared memory with the combine kernel's arithmetic
// in its order (same bits), and a second barrier keeps the shared memory alive until all have
// read it. No partials in global memory, no combine launch. Empty partitions take part (m = -inf).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "paged_common.cuh"
#include "pdl.cuh"
#include "warp.cuh"

#define DEC_WARPS 4
#define DEC_THREADS (32 * DEC_WARPS)
#define DEC_CHUNK 32      // keys per warp step, one per lane
static_assert(DEC_CHUNK == DECODE_PARTITION_KEYS, "partitions are whole chunks");
#define DEC_STAGE 16      // 16-byte vectors of a K row staged per round (256 bytes)
#define DEC_PV_UNROLL 8   // V loads in flight per lane

template <typename T, int D, int G, bool CLUSTER>
__device__ void paged_decode_impl(T* __restrict__ out, float* __restrict__ part_m,
                                  float* __restrict__ part_l, float* __restrict__ part_acc,
                                  const T* __restrict__ q, const T* __restrict__ key_cache,
                                  const T* __restrict__ value_cache,
                                  const uint32_t* __restrict__ block_tables,
                                  const uint32_t* __restrict__ context_lens,
                                  const uint32_t* __restrict__ query_start, int num_heads,
                                  int num_kv_heads, int block_size, int max_blocks_per_seq,
                                  float scale_log2) {
    constexpr int VEC = 16 / sizeof(T);     // elements per 16-byte vector
    constexpr int ROW_VECS = D / VEC;       // 16-byte vectors per K/V row
    constexpr int ROW_BYTES = D * (int)sizeof(T);
    constexpr int KPS = 32 / ROW_VECS;      // V rows per P V step (lanes beyond KPS*ROW_VECS idle)
    constexpr int STEPS = (DEC_CHUNK + KPS - 1) / KPS;
    constexpr int UNROLL = STEPS < DEC_PV_UNROLL ? STEPS : DEC_PV_UNROLL;
    static_assert(D % VEC == 0 && ROW_VECS <= 32 && G >= 1 && G <= 8, "head_dim / group tile");
    // Warp-private staging rows (padded by 16 bytes: conflict-free row reads), later reused for
    // the warp's accumulators [KPS][G][D] f32 at the merge.
    constexpr int STAGE_ROW = DEC_STAGE + 1;  // uint4 per staged row
    static_assert(KPS * G * D * 4 <= DEC_CHUNK * STAGE_ROW * 16, "merge buffer");
    __shared__ uint4 kst[DEC_WARPS][DEC_CHUNK][STAGE_ROW];
    __shared__ __align__(16) float qs[G][D];
    __shared__ float wm[DEC_WARPS][G], wl[DEC_WARPS][G];
    // The CTA's merged partition for its cluster: m [G], l [G], acc [G][D].
    __shared__ float cpart[CLUSTER ? G * (D + 2) : 1];

    const int seq = blockIdx.x;
    int qstart, nkeys;
    if (!decode_query(query_start, context_lens, seq, qstart, nkeys)) return;
    const int splits = gridDim.z;
    const int partition = decode_partition(nkeys, splits);
    const int key_begin = blockIdx.z * partition;
    // An empty partition: the combine does not read it (a cluster's CTA stays for the barriers).
    if (!CLUSTER && key_begin >= nkeys) return;
    const int key_end = min(key_begin + partition, nkeys);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = num_heads / num_kv_heads;
    const int head_tiles = (group + G - 1) / G;
    const int kv_head = blockIdx.y / head_tiles;
    const int tile = blockIdx.y % head_tiles;
    const int head0 = kv_head * group + tile * G;
    const int gh = min(G, group - tile * G);  // heads of this CTA
    const uint32_t* table = block_tables + (size_t)seq * max_blocks_per_seq;

    // Query rows, pre-scaled (log2 domain), into shared memory.
    for (int i = tid; i < G * ROW_VECS; i += DEC_THREADS) {
        const int h = i / ROW_VECS, c = (i % ROW_VECS) * VEC;
        float v[VEC];
        if (h < gh) {
            const size_t qrow = (size_t)qstart * num_heads + head0 + h;
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(q + qrow * D + c));
            widen16<T>(raw, v);
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) qs[h][c + e] = v[e] * scale_log2;
    }
    __syncthreads();

    float m[G], l[G], acc[G][VEC];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[h][e] = 0.f;
    }
    const int sub = lane / ROW_VECS, col = lane % ROW_VECS;  // P V role of this lane
    uint4(*my_stage)[STAGE_ROW] = kst[warp];

    // Cache row (slot * num_kv_heads + kv_head) of key `key`, or 0 past the partition.
    auto cache_row = [&](int key) -> uint32_t {
        if (key >= key_end) return 0u;
        const uint32_t slot = table[key / block_size] * (uint32_t)block_size + key % block_size;
        return slot * (uint32_t)num_kv_heads + kv_head;
    };

    int chunk = key_begin + warp * DEC_CHUNK;
    uint32_t row = chunk < key_end ? cache_row(chunk + lane) : 0u;
    for (; chunk < key_end; chunk += DEC_WARPS * DEC_CHUNK) {
        const int nvalid = min(DEC_CHUNK, key_end - chunk);  // >= 1
        const bool valid = lane < nvalid;
        // This chunk's V rows, and the next chunk's K and V rows, into L2 meanwhile.
        if (valid) prefetch_l2(value_cache + (size_t)row * D, ROW_BYTES);
        const int next = chunk + DEC_WARPS * DEC_CHUNK;
        const uint32_t next_row = next < key_end ? cache_row(next + lane) : 0u;
        if (next + lane < key_end) {
            prefetch_l2(key_cache + (size_t)next_row * D, ROW_BYTES);
            prefetch_l2(value_cache + (size_t)next_row * D, ROW_BYTES);
        }

        // ---- scores: lane = key
        float s[G];
#pragma unroll
        for (int h = 0; h < G; ++h) s[h] = 0.f;
#pragma unroll
        for (int v0 = 0; v0 < ROW_VECS; v0 += DEC_STAGE) {
            constexpr int NV_FULL = ROW_VECS < DEC_STAGE ? ROW_VECS : DEC_STAGE;
            const int nv = min(NV_FULL, ROW_VECS - v0);  // constant after unrolling
            __syncwarp();
            uint4 raw[NV_FULL];
#pragma unroll
            for (int it = 0; it < NV_FULL; ++it) {
                if (it < nv) {
                    const int i = lane + 32 * it;
                    const int r = i / nv, c = i % nv;
                    const uint32_t src = __shfl_sync(0xffffffffu, row, r);
                    if (r < nvalid)
                        raw[it] = __ldg(reinterpret_cast<const uint4*>(
                            key_cache + (size_t)src * D + (v0 + c) * VEC));
                    else
                        raw[it] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
#pragma unroll
            for (int it = 0; it < NV_FULL; ++it) {
                if (it < nv) {
                    const int i = lane + 32 * it;
                    my_stage[i / nv][i % nv] = raw[it];
                }
            }
            __syncwarp();
#pragma unroll 4
            for (int j = 0; j < nv; ++j) {
                float kf[VEC];
                widen16<T>(my_stage[lane][j], kf);
#pragma unroll
                for (int h = 0; h < G; ++h) {
                    if (h < gh) {
                        const float4* qv =
                            reinterpret_cast<const float4*>(&qs[h][(v0 + j) * VEC]);
#pragma unroll
                        for (int t = 0; t < VEC / 4; ++t) {
                            const float4 x = qv[t];
                            s[h] = fmaf(x.x, kf[4 * t], s[h]);
                            s[h] = fmaf(x.y, kf[4 * t + 1], s[h]);
                            s[h] = fmaf(x.z, kf[4 * t + 2], s[h]);
                            s[h] = fmaf(x.w, kf[4 * t + 3], s[h]);
                        }
                    }
                }
            }
        }

        // ---- online softmax per head (lane 0's key is always valid: the chunk max is finite)
        float p[G];
#pragma unroll
        for (int h = 0; h < G; ++h) {
            if (h < gh) {
                const float x = valid ? s[h] : -INFINITY;
                const float m_new = fmaxf(m[h], warp_max(x));
                const float alpha = exp2f(m[h] - m_new);  // 0 on the first chunk (m = -inf)
                p[h] = valid ? exp2f(x - m_new) : 0.f;
                l[h] = l[h] * alpha + p[h];
                m[h] = m_new;
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[h][e] *= alpha;
            } else {
                p[h] = 0.f;
            }
        }

        // ---- P V: lane (sub, col) takes key step * KPS + sub, 16-byte slice col of its V row
        for (int st0 = 0; st0 < STEPS; st0 += UNROLL) {
            if (st0 * KPS >= nvalid) break;
            uint4 vr[UNROLL];
            int kk[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int k = (st0 + u) * KPS + sub;
                kk[u] = min(k, DEC_CHUNK - 1);
                const uint32_t src = __shfl_sync(0xffffffffu, row, kk[u]);
                if (sub < KPS && k < nvalid && st0 + u < STEPS)
                    vr[u] = __ldg(reinterpret_cast<const uint4*>(value_cache + (size_t)src * D +
                                                                col * VEC));
                else
                    vr[u] = make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float vf[VEC];
                widen16<T>(vr[u], vf);
#pragma unroll
                for (int h = 0; h < G; ++h) {
                    if (h < gh) {
                        // p of an invalid key is 0 and its V slice is 0.
                        const float ph = __shfl_sync(0xffffffffu, p[h], kk[u]);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[h][e] = fmaf(ph, vf[e], acc[h][e]);
                    }
                }
            }
        }
        row = next_row;
    }

    // ---- merge the warps: (m, l) per warp and head, acc per warp, sub and head in shared memory
    __syncwarp();
    float* buf = reinterpret_cast<float*>(&kst[warp][0][0]);  // [KPS][G][D]
#pragma unroll
    for (int h = 0; h < G; ++h) {
        const float lw = warp_sum(l[h]);
        if (lane == 0) {
            wm[warp][h] = m[h];
            wl[warp][h] = lw;
        }
        if (sub < KPS) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) buf[(sub * G + h) * D + col * VEC + e] = acc[h][e];
        }
    }
    __syncthreads();

    const size_t token = (size_t)qstart;
    for (int i = tid; i < gh * D; i += DEC_THREADS) {
        const int h = i / D, d = i % D;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, wm[w][h]);
        float lsum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float mw = wm[w][h];
            if (mw == -INFINITY) continue;  // a warp without keys
            const float wt = exp2f(mw - mx);
            lsum += wt * wl[w][h];
            const float* bw = reinterpret_cast<const float*>(&kst[w][0][0]);
            float aw = 0.f;
#pragma unroll
            for (int sb = 0; sb < KPS; ++sb) aw += bw[(sb * G + h) * D + d];
            a += wt * aw;
        }
        const size_t orow = token * num_heads + head0 + h;
        if (CLUSTER) {
            cpart[2 * G + h * D + d] = a;
            if (d == 0) {
                cpart[h] = mx;
                cpart[G + h] = lsum;
            }
        } else if (splits == 1) {
            out[orow * D + d] = from_f32<T>(lsum > 0.f ? a / lsum : 0.f);
        } else {
            const size_t pr = orow * splits + blockIdx.z;
            part_acc[pr * D + d] = a;
            if (d == 0) {
                part_m[pr] = mx;
                part_l[pr] = lsum;
            }
        }
    }
    if constexpr (CLUSTER) {
        cluster_merge<T, D, G, DEC_THREADS>(cpart, out + (token * num_heads + head0) * D, gh,
                                            (nkeys + partition - 1) / partition, splits);
    }
}

// Merges the partitions of each (sequence, head): grid (num_seqs, num_heads), D threads. Reads
// only the partitions the sequence's context uses (the others were never written).
template <typename T, int D>
__device__ void paged_decode_combine_impl(T* __restrict__ out, const float* __restrict__ part_m,
                                          const float* __restrict__ part_l,
                                          const float* __restrict__ part_acc,
                                          const uint32_t* __restrict__ context_lens,
                                          const uint32_t* __restrict__ query_start, int num_heads,
                                          int num_splits) {
    const int seq = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
    int qstart, nkeys;
    if (!decode_query(query_start, context_lens, seq, qstart, nkeys) || d >= D) return;
    const int partition = decode_partition(nkeys, num_splits);
    const int used = (nkeys + partition - 1) / partition;
    const size_t row = (size_t)qstart * num_heads + head;
    const float* pm = part_m + row * num_splits;
    const float* pl = part_l + row * num_splits;
    // Unrolled: 8 partitions' loads in flight at once (latency-bound otherwise).
    float mx = -INFINITY;
#pragma unroll 8
    for (int z = 0; z < used; ++z) mx = fmaxf(mx, pm[z]);
    float lsum = 0.f, a = 0.f;
#pragma unroll 8
    for (int z = 0; z < used; ++z) {
        const float wt = exp2f(pm[z] - mx);
        lsum += wt * pl[z];
        a += wt * part_acc[(row * num_splits + z) * D + d];
    }
    out[row * D + d] = from_f32<T>(lsum > 0.f ? a / lsum : 0.f);
}

// warm0..2 (pointer, bytes; null for none): ranges of weights the kernels after this one read,
// fetched into L2 while this one runs (warm_l2).
#define PAGED_DECODE_V(NAME, T, D, G, CLUSTER)                                                   \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) NAME(                              \
        T* out, float* part_m, float* part_l, float* part_acc, const T* q, const T* key_cache,   \
        const T* value_cache, const uint32_t* block_tables, const uint32_t* context_lens,        \
        const uint32_t* query_start, int num_heads, int num_kv_heads, int block_size,            \
        int max_blocks_per_seq, float scale_log2, const void* warm0,                             \
        unsigned long long warm0_bytes, const void* warm1, unsigned long long warm1_bytes,       \
        const void* warm2, unsigned long long warm2_bytes) {                                     \
        warm_l2(warm0, warm0_bytes);                                                             \
        warm_l2(warm1, warm1_bytes);                                                             \
        warm_l2(warm2, warm2_bytes);                                                             \
        pdl_enter();                                                                             \
        paged_decode_impl<T, D, G, CLUSTER>(out, part_m, part_l, part_acc, q, key_cache,         \
                                            value_cache, block_tables, context_lens,             \
                                            query_start, num_heads, num_kv_heads, block_size,    \
                                            max_blocks_per_seq, scale_log2);                     \
    }

#define PAGED_DECODE_G(SUFFIX, T, D, G)                                                          \
    PAGED_DECODE_V(paged_decode_##SUFFIX##_d##D##_g##G, T, D, G, false)                          \
    PAGED_DECODE_V(paged_decode_##SUFFIX##_d##D##_g##G##_cluster, T, D, G, true)

#define PAGED_DECODE(SUFFIX, T, D)                                                               \
    PAGED_DECODE_G(SUFFIX, T, D, 1)                                                              \
    PAGED_DECODE_G(SUFFIX, T, D, 4)                                                              \
    PAGED_DECODE_G(SUFFIX, T, D, 8)                                                              \
    extern "C" __global__ void paged_decode_combine_##SUFFIX##_d##D(                             \
        T* out, const float* part_m, const float* part_l, const float* part_acc,                 \
        const uint32_t* context_lens, const uint32_t* query_start, int num_heads,                \
        int num_splits) {                                                                        \
        pdl_enter();                                                                            \
        paged_decode_combine_impl<T, D>(out, part_m, part_l, part_acc, context_lens,            \
                                        query_start, num_heads, num_splits);                     \
    }

#define PAGED_DECODE_ALL_D(SUFFIX, T) \
    PAGED_DECODE(SUFFIX, T, 64)       \
    PAGED_DECODE(SUFFIX, T, 80)       \
    PAGED_DECODE(SUFFIX, T, 96)       \
    PAGED_DECODE(SUFFIX, T, 128)

PAGED_DECODE_ALL_D(f32, float)
PAGED_DECODE_ALL_D(f16, __half)
PAGED_DECODE_ALL_D(bf16, __nv_bfloat16)
