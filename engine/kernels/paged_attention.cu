// Paged attention over a block table: one kernel for decode, prefill and chunked prefill, with GQA.
//
// Layouts (all contiguous, element offsets already applied by the host):
//   q, out        [num_tokens, num_heads, D]
//   key/value     [num_blocks, block_size, num_kv_heads, D]
//   block_tables  u32 [num_seqs, max_blocks_per_seq]
//   context_lens  u32 [num_seqs]   tokens of context after this step (cached + new)
//   query_start   u32 [num_seqs + 1] prefix sums of query lengths
// Token j (0-based in its sequence's chunk) of sequence s attends to keys 0 ..= ctx - qlen + j.
//
// Work split: a CTA takes up to QT query tokens of one sequence times GH query heads of one kv head
// (R = QT*GH <= 16 rows sharing every K/V tile load), and one of grid.z context partitions (each
// sequence's context split evenly, in whole key tiles, so one launch shape serves any lengths).
// Keys are read 32 at a time into shared memory as f32; scores, the online softmax
// (running max m, sum l) and the output accumulate in f32. With one partition the CTA writes `out`;
// with several it writes (m, l, acc) partials that paged_attention_combine merges.
// Sequences with a query length >= qlen_hi are skipped (flash_prefill.cu takes them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "pdl.cuh"
#include "paged_common.cuh"

#define KT 32        // keys per shared-memory tile
#define MAX_ROWS 16  // query rows (token x head) per CTA
#define THREADS 128

__device__ __forceinline__ uint4 load16(const void* src) {
    return __ldg(reinterpret_cast<const uint4*>(src));
}

template <typename T, int D, bool COMBINE>
__device__ void paged_attention_impl(
    T* __restrict__ out, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_acc, const T* __restrict__ q, const T* __restrict__ key_cache,
    const T* __restrict__ value_cache, const uint32_t* __restrict__ block_tables,
    const uint32_t* __restrict__ context_lens, const uint32_t* __restrict__ query_start,
    unsigned int* __restrict__ counters, int num_seqs, int num_heads, int num_kv_heads,
    int block_size, int max_blocks_per_seq, int qt, int gh, int qlen_hi, float scale) {
    static_assert(D % 4 == 0 && D <= 256, "head_dim");
    constexpr int VEC = 16 / sizeof(T);         // elements per 16-byte load
    constexpr int ACC = MAX_ROWS * D / THREADS;  // output elements owned per thread
    __shared__ __align__(16) float ks[KT][D + 4];
    __shared__ __align__(16) float vs[KT][D];
    __shared__ __align__(16) float qs[MAX_ROWS][D];
    __shared__ float ps[MAX_ROWS][KT];
    __shared__ float row_m[MAX_ROWS], row_l[MAX_ROWS], row_alpha[MAX_ROWS];
    __shared__ int row_limit[MAX_ROWS];  // last key index the row may see; -1 = row unused

    int seq, q_begin;
    if (!locate_tile(query_start, num_seqs, qt, blockIdx.x, 0, qlen_hi, false, &seq,
                     &q_begin)) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = num_heads / num_kv_heads;
    const int head_groups = (group + gh - 1) / gh;
    const int kv_head = blockIdx.y / head_groups;
    const int head0 = kv_head * group + (blockIdx.y % head_groups) * gh;
    const int heads_here = min(gh, kv_head * group + group - head0);
    const int qstart = (int)query_start[seq];
    const int qlen = (int)query_start[seq + 1] - qstart;
    const int ctx = (int)context_lens[seq];
    const int tokens_here = min(qt, qlen - q_begin);
    const int rows = tokens_here * heads_here;
    const int partition = max(KT, ((ctx + (int)gridDim.z - 1) / (int)gridDim.z + KT - 1) / KT * KT);
    const int key_begin = blockIdx.z * partition;
    const int last_key = min(ctx - qlen + q_begin + tokens_here - 1, ctx - 1);
    const int key_end = min(key_begin + partition, last_key + 1);
    const uint32_t* table = block_tables + (size_t)seq * max_blocks_per_seq;
    const int num_splits = gridDim.z;

    // Query rows (row = token * heads_here + head), pre-scaled, into shared memory. Every load of
    // a thread is issued before the first is used (here and for the K/V tiles): one memory round
    // trip, not one per 16-byte chunk, which is what a short decode step waits on.
    constexpr int Q_CHUNKS = MAX_ROWS * (D / VEC), Q_PER_THREAD = (Q_CHUNKS + THREADS - 1) / THREADS;
    uint4 qraw[Q_PER_THREAD];
#pragma unroll
    for (int j = 0; j < Q_PER_THREAD; ++j) {
        const int i = tid + j * THREADS, r = i / (D / VEC), c = (i % (D / VEC)) * VEC;
        if (i < Q_CHUNKS && r < rows) {
            const int token = qstart + q_begin + r / heads_here, head = head0 + r % heads_here;
            qraw[j] = load16(q + ((size_t)token * num_heads + head) * D + c);
        }
    }
#pragma unroll
    for (int j = 0; j < Q_PER_THREAD; ++j) {
        const int i = tid + j * THREADS, r = i / (D / VEC), c = (i % (D / VEC)) * VEC;
        if (i < Q_CHUNKS && r < rows) {
            widen16<T>(qraw[j], &qs[r][c]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) qs[r][c + e] *= scale;
        }
    }
    if (tid < MAX_ROWS) {
        row_m[tid] = -INFINITY;
        row_l[tid] = 0.f;
        row_limit[tid] = tid < rows ? ctx - qlen + q_begin + tid / heads_here : -1;
    }
    float acc[ACC];
#pragma unroll
    for (int a = 0; a < ACC; ++a) acc[a] = 0.f;
    __syncthreads();

    for (int t0 = key_begin; t0 < key_end; t0 += KT) {
        // K/V tile: KT keys x D, 16-byte loads (all in flight together), widened to f32; keys
        // past key_end are zeros.
        constexpr int TILE_CHUNKS = KT * (D / VEC);
        constexpr int PER_THREAD = (TILE_CHUNKS + THREADS - 1) / THREADS;
        uint4 kraw[PER_THREAD], vraw[PER_THREAD];
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = tid + j * THREADS, k = i / (D / VEC), c = (i % (D / VEC)) * VEC;
            const int key = t0 + k;
            kraw[j] = vraw[j] = make_uint4(0, 0, 0, 0);
            if (i < TILE_CHUNKS && key < key_end) {
                const size_t slot = (size_t)table[key / block_size] * block_size + key % block_size;
                const size_t off = (slot * num_kv_heads + kv_head) * D + c;
                kraw[j] = load16(key_cache + off);
                vraw[j] = load16(value_cache + off);
            }
        }
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = tid + j * THREADS, k = i / (D / VEC), c = (i % (D / VEC)) * VEC;
            if (i < TILE_CHUNKS) {
                widen16<T>(kraw[j], &ks[k][c]);
                widen16<T>(vraw[j], &vs[k][c]);
            }
        }
        __syncthreads();

        // Scores: lane = key, warp w takes rows w, w+4, w+8, w+12.
        {
            float s[MAX_ROWS / 4];
#pragma unroll
            for (int j = 0; j < MAX_ROWS / 4; ++j) s[j] = 0.f;
#pragma unroll 4
            for (int c = 0; c < D; c += 4) {
                const float4 kv = *reinterpret_cast<const float4*>(&ks[lane][c]);
#pragma unroll
                for (int j = 0; j < MAX_ROWS / 4; ++j) {
                    const int r = warp + 4 * j;
                    if (r < rows) {
                        const float4 qv = *reinterpret_cast<const float4*>(&qs[r][c]);
                        s[j] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                    }
                }
            }
            // Online softmax per row, one warp per row.
#pragma unroll
            for (int j = 0; j < MAX_ROWS / 4; ++j) {
                const int r = warp + 4 * j;
                if (r >= rows) continue;
                const int key = t0 + lane;
                const bool valid = key < key_end && key <= row_limit[r];
                const float score = valid ? s[j] : -INFINITY;
                float mx = score;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
                const float m_old = row_m[r];
                const float m_new = fmaxf(m_old, mx);
                const float p = valid ? __expf(score - m_new) : 0.f;
                float sum = p;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
                ps[r][lane] = p;
                __syncwarp();
                if (lane == 0) {
                    const float alpha = m_new == -INFINITY ? 1.f : __expf(m_old - m_new);
                    row_alpha[r] = alpha;
                    row_m[r] = m_new;
                    row_l[r] = row_l[r] * alpha + sum;
                }
            }
        }
        __syncthreads();

        // P.V: thread owns elements e = tid + THREADS*a of the [rows, D] output.
#pragma unroll
        for (int a = 0; a < ACC; ++a) {
            const int e = tid + THREADS * a, r = e / D, d = e % D;
            if (r < rows) {
                float v = acc[a] * row_alpha[r];
#pragma unroll 8
                for (int k = 0; k < KT; ++k) v += ps[r][k] * vs[k][d];
                acc[a] = v;
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int a = 0; a < ACC; ++a) {
        const int e = tid + THREADS * a, r = e / D, d = e % D;
        if (r >= rows) continue;
        const int token = qstart + q_begin + r / heads_here, head = head0 + r % heads_here;
        const size_t row = (size_t)token * num_heads + head;
        if (num_splits == 1) {
            const float l = row_l[r];
            out[row * D + d] = from_f32<T>(l > 0.f ? acc[a] / l : 0.f);
        } else {
            const size_t pr = row * num_splits + blockIdx.z;
            part_acc[pr * D + d] = acc[a];
            if (d == 0) {
                part_m[pr] = row_m[r];
                part_l[pr] = row_l[r];
            }
        }
    }
    if (!COMBINE || num_splits == 1) return;  // one partition, or a combine launch follows
    // The last of the group's partitions to finish merges them (counters[group] counts finished
    // partitions; that CTA sets it back to 0 for the next launch).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const unsigned int group = blockIdx.y * gridDim.x + blockIdx.x;
        last = atomicAdd(counters + group, 1u) == (unsigned int)num_splits - 1;
        if (last) counters[group] = 0u;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The merge of paged_attention_combine with the same arithmetic in the same order (same
    // bits), its loads spread over the CTA: the rows' partial maxima and sums staged in shared
    // memory (ks, vs; the host sends at most KT partitions), one thread per row for (m, l) and the
    // weights (into ps), then every output element accumulating its partitions in order, 4
    // partitions' loads in flight per element.
    const int ns = num_splits;
    auto out_row = [&](int r) {
        return (size_t)(qstart + q_begin + r / heads_here) * num_heads + head0 + r % heads_here;
    };
    for (int i = tid; i < rows * ns; i += THREADS) {
        const int r = i / ns, z = i % ns;
        const size_t pr = out_row(r) * ns + z;
        ks[r][z] = __ldcg(part_m + pr);
        vs[r][z] = __ldcg(part_l + pr);
    }
    __syncthreads();
    if (tid < rows) {
        const int r = tid;
        float m = -INFINITY;
        for (int z = 0; z < ns; ++z) m = fmaxf(m, ks[r][z]);
        float l = 0.f;
        for (int z = 0; z < ns; ++z) {
            const float w = m != -INFINITY ? __expf(ks[r][z] - m) : 0.f;
            ps[r][z] = w;
            l += w * vs[r][z];
        }
        row_l[r] = l;
    }
    __syncthreads();
    float v[ACC];
#pragma unroll
    for (int a = 0; a < ACC; ++a) v[a] = 0.f;
    for (int z0 = 0; z0 < ns; z0 += 4) {
        float pa[4][ACC];
#pragma unroll
        for (int zz = 0; zz < 4; ++zz)
#pragma unroll
            for (int a = 0; a < ACC; ++a) {
                const int e = tid + THREADS * a, r = e / D, d = e % D, z = z0 + zz;
                pa[zz][a] = r < rows && z < ns
                                ? __ldcg(part_acc + (out_row(r) * ns + z) * D + d)
                                : 0.f;
            }
#pragma unroll
        for (int zz = 0; zz < 4; ++zz)
#pragma unroll
            for (int a = 0; a < ACC; ++a) {
                const int e = tid + THREADS * a, r = e / D;
                if (r < rows && z0 + zz < ns) v[a] += ps[r][z0 + zz] * pa[zz][a];
            }
    }
#pragma unroll
    for (int a = 0; a < ACC; ++a) {
        const int e = tid + THREADS * a, r = e / D, d = e % D;
        if (r >= rows) continue;
        const float l = row_l[r];
        out[out_row(r) * D + d] = from_f32<T>(l > 0.f ? v[a] / l : 0.f);
    }
}

// Merges the per-partition partials: grid (num_tokens * num_heads), D threads.
template <typename T, int D>
__device__ void paged_attention_combine_impl(T* __restrict__ out, const float* __restrict__ part_m,
                                             const float* __restrict__ part_l,
                                             const float* __restrict__ part_acc, int num_splits) {
    const size_t row = blockIdx.x;
    const int d = threadIdx.x;
    if (d >= D) return;
    // Unrolled so that 8 partitions' loads are in flight at once: the loop is latency-bound
    // (one L2 round trip per partition otherwise, ~20 us per layer at 32 partitions).
    float m = -INFINITY;
#pragma unroll 8
    for (int z = 0; z < num_splits; ++z) m = fmaxf(m, part_m[row * num_splits + z]);
    float l = 0.f, v = 0.f;
    if (m != -INFINITY) {
#pragma unroll 8
        for (int z = 0; z < num_splits; ++z) {
            const size_t pr = row * num_splits + z;
            const float w = __expf(part_m[pr] - m);  // exp(-inf) = 0 for empty partitions
            l += w * part_l[pr];
            v += w * part_acc[pr * D + d];
        }
    }
    out[row * D + d] = from_f32<T>(l > 0.f ? v / l : 0.f);
}

// paged_attention_<T>_d<D>: writes partials for paged_attention_combine when split;
// paged_attention_<T>_d<D>_combine: the last partition of each CTA group merges them itself
// (counters: one zeroed u32 per (grid.x, grid.y) group, left zeroed).
#define PAGED_ATTENTION(SUFFIX, T, D)                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_attention_##SUFFIX##_d##D(      \
        T* out, float* part_m, float* part_l, float* part_acc, const T* q, const T* key_cache,  \
        const T* value_cache, const uint32_t* block_tables, const uint32_t* context_lens,       \
        const uint32_t* query_start, int num_seqs, int num_heads, int num_kv_heads,              \
        int block_size, int max_blocks_per_seq, int qt, int gh, int qlen_hi, float scale) {       \
        pdl_enter();                                                                             \
        paged_attention_impl<T, D, false>(out, part_m, part_l, part_acc, q, key_cache,           \
                                          value_cache, block_tables, context_lens, query_start,  \
                                          nullptr, num_seqs, num_heads, num_kv_heads,            \
                                          block_size, max_blocks_per_seq, qt, gh, qlen_hi,       \
                                          scale);                                                \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_attention_##SUFFIX##_d##D##_combine( \
        T* out, float* part_m, float* part_l, float* part_acc, const T* q, const T* key_cache,  \
        const T* value_cache, const uint32_t* block_tables, const uint32_t* context_lens,       \
        const uint32_t* query_start, unsigned int* counters, int num_seqs, int num_heads,        \
        int num_kv_heads, int block_size, int max_blocks_per_seq, int qt, int gh, int qlen_hi,    \
        float scale) {                                                                           \
        pdl_enter();                                                                             \
        paged_attention_impl<T, D, true>(out, part_m, part_l, part_acc, q, key_cache,            \
                                         value_cache, block_tables, context_lens, query_start,   \
                                         counters, num_seqs, num_heads, num_kv_heads,            \
                                         block_size, max_blocks_per_seq, qt, gh, qlen_hi,        \
                                         scale);                                                 \
    }                                                                                            \
    extern "C" __global__ void paged_attention_combine_##SUFFIX##_d##D(                          \
        T* out, const float* part_m, const float* part_l, const float* part_acc,                 \
        int num_splits) {                                                                        \
        pdl_enter();                                                                             \
        paged_attention_combine_impl<T, D>(out, part_m, part_l, part_acc, num_splits);           \
    }

#define PAGED_ATTENTION_ALL_D(SUFFIX, T) \
    PAGED_ATTENTION(SUFFIX, T, 64)       \
    PAGED_ATTENTION(SUFFIX, T, 80)       \
    PAGED_ATTENTION(SUFFIX, T, 96)       \
    PAGED_ATTENTION(SUFFIX, T, 128)

PAGED_ATTENTION_ALL_D(f32, float)
PAGED_ATTENTION_ALL_D(f16, __half)
PAGED_ATTENTION_ALL_D(bf16, __nv_bfloat16)
