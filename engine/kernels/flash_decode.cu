// Tensor-core decode attention for grouped-query heads (bf16/f16): every sequence of the step has
// one query token, and the query heads that share a KV head are the rows of one m16 tile.
//
// Same layouts and contract as paged_decode.cu (and the same partials, merged by its
// paged_decode_combine kernel): grid (num_seqs, num_kv_heads, splits), 128 threads, dynamic
// shared memory Dec<D>::kSmemBytes. A CTA takes one sequence, one KV head with all
// `group` (<= 16) of its query heads as rows 0 .. group-1 of a 16-row Q tile (rows past the
// group are zeros, computed and dropped), and one context partition (decode_partition). It walks
// the partition in tiles of BN = 64 keys gathered through the block table by cp.async, two
// stages, like flash_prefill.cu; warp w takes keys 16 w .. 16 w + 15 of each tile:
//  - S = Q K^T (16 x 16 per warp and tile) and O += P V (16 x D) on mma.sync m16n8k16, operands
//    by ldmatrix, f32 accumulation, online softmax per warp in the log2 domain, P rounded to the
//    input type for P V (as flash_prefill.cu);
//  - at the end the four warps' (m, l, O) merge through shared memory, and the CTA stores `out`
//    (one partition) or (m, l, acc) partials in paged_decode.cu's layout.
// flash_decode_<type>_d<D>_cluster (sm_90): the partitions of one (sequence, KV head) are one
// thread-block cluster (cluster dims (1, 1, splits), splits <= 16), merged as
// paged_decode_<...>_cluster merges them: each CTA leaves its (m, l, acc) in shared memory, and
// after a cluster barrier every CTA merges a slice of the group's output elements through
// distributed shared memory with paged_decode_combine's arithmetic in its order (the same bits
// as the partials and the combine launch). Empty partitions take part in the barriers and are
// not read.
// early_kv (nonzero): the first two key tiles are copied before pdl_enter() (under programmatic
// dependent launch, while the q/k/v kernel before still runs), all but the row of this step's key
// (nkeys - 1, written by that kernel), which follows the wait with the query.
// Each K/V element of the partition is read once per step (all of the group's heads use it), and
// the score and P V arithmetic runs on tensor cores rather than in f32 FMAs per head.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "mma.cuh"
#include "paged_common.cuh"
#include "pdl.cuh"

namespace flash_decode {

using namespace flash;

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int BN = 64;             // keys per tile
constexpr int KW = BN / WARPS;     // keys per warp and tile: one k16 step of P V
static_assert(KW == 16, "a warp's keys are one 16-key step");

template <int D>
struct Dec {
    static constexpr int S = D + kPad;  // shared-memory row stride in elements
    static constexpr int CH = D / 8;    // 16-byte chunks per row
    static constexpr int DN = D / 8;    // 8-column n-tiles of O
    static constexpr int DK = D / 16;   // k-steps of Q K^T
    // The Q tile (16 rows), stages 0 and 1 of [K tile; V tile], and the block numbers and
    // in-block offsets of the keys of two tiles. The merge reuses the stages.
    static constexpr int kSmemBytes = (16 + 4 * BN) * S * 2 + 2 * 2 * BN * 4;
    static constexpr int kMergeBytes = WARPS * 16 * (D + 2) * 4;
    static_assert(kMergeBytes <= 4 * BN * S * 2, "merge buffer within the stages");
    static_assert(D % 16 == 0 && D <= 128, "head_dim");
};

template <typename T, int D, bool CLUSTER>
__device__ __forceinline__ void flash_decode_impl(
    T* __restrict__ out, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_acc, const T* __restrict__ q, const T* __restrict__ key_cache,
    const T* __restrict__ value_cache, const uint32_t* __restrict__ block_tables,
    const uint32_t* __restrict__ context_lens, const uint32_t* __restrict__ query_start,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, float scale_log2,
    int early_kv) {
    if (!early_kv) pdl_enter();
    using L = Dec<D>;
    constexpr int S = L::S, CH = L::CH, DN = L::DN, DK = L::DK;
    constexpr uint32_t kRow = S * sizeof(T);
    constexpr uint32_t kTileBytes = BN * kRow;
    constexpr uint32_t kStageBytes = 2 * kTileBytes;
    extern __shared__ __align__(16) unsigned char dec_smem[];
    const uint32_t q_smem = smem_addr(dec_smem);
    const uint32_t kv_smem = q_smem + 16 * kRow;
    uint32_t* const key_block = reinterpret_cast<uint32_t*>(dec_smem + 16 * kRow + 2 * kStageBytes);
    uint32_t* const key_within = key_block + 2 * BN;

    const int seq = blockIdx.x;
    int qstart, nkeys;
    if (!decode_query(query_start, context_lens, seq, qstart, nkeys)) return;
    const int splits = gridDim.z;
    const int partition = decode_partition(nkeys, splits);
    const int key_begin = blockIdx.z * partition;
    // An empty partition: the combine does not read it. A cluster's CTA stays for the barriers:
    // it walks no tile and leaves m = -inf, which the merge does not read either.
    if (!CLUSTER && key_begin >= nkeys) return;
    const int key_end = min(key_begin + partition, nkeys);

    const int group = num_heads / num_kv_heads;  // <= 16 (the host checks)
    const uint32_t kv_head = blockIdx.y;
    const int head0 = kv_head * group;
    const uint32_t* table = block_tables + (size_t)seq * max_blocks_per_seq;

    // Block numbers (cp.async, landing with the next wait) and in-block offsets of keys
    // k0 .. k0 + BN into buffer `buf`; keys at or past key_end look up key 0 (zero-filled rows).
    auto fetch_slots = [&](int k0, int buf) {
        const int tid = tid_here();
        if (tid < BN) {
            const int key = k0 + tid < key_end ? k0 + tid : 0;
            const int col = key / block_size;
            cp_async4(smem_addr(&key_block[buf * BN + tid]), &table[col]);
            key_within[buf * BN + tid] = (uint32_t)(key - col * block_size);
        }
    };
    // Row and 16-byte chunk of the p-th copy unit of a tile.
    auto unit = [&](int p, int& r, int& c) {
        const int i = tid_here() + p * THREADS;
        r = i / CH;
        c = i % CH * 8;
    };
    // K/V element offset of the key in row r of the tile in stage st (its slot from the fetch).
    auto kv_offset = [&](int st, int r, int c) {
        const uint32_t slot =
            key_block[st * BN + r] * (uint32_t)block_size + key_within[st * BN + r];
        return ((size_t)slot * (uint32_t)num_kv_heads + kv_head) * D + c;
    };
    // Copies the tile of keys k0 .. k0 + BN into stage st (rows past key_end zero-filled), all
    // but the row of key `skip` (none when negative).
    auto load_tile = [&](int k0, int st, int skip) {
        const uint32_t ks = kv_smem + st * kStageBytes;
#pragma unroll
        for (int p = 0; p < (BN * CH + THREADS - 1) / THREADS; ++p) {
            if ((BN * CH) % THREADS != 0 && tid_here() + p * THREADS >= BN * CH) break;
            int r, c;
            unit(p, r, c);
            if (k0 + r == skip) continue;
            const bool valid = k0 + r < key_end;
            const size_t off = kv_offset(st, r, c);
            const uint32_t dst = ks + r * kRow + c * sizeof(T);
            cp_async16(dst, key_cache + off, valid);
            cp_async16(dst + kTileBytes, value_cache + off, valid);
        }
    };

    fetch_slots(key_begin, 0);
    fetch_slots(key_begin + BN, 1);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    // Key tiles 0 and 1 (stages 0 and 1). With early_kv they are issued before the wait for the
    // kernel before (the q/k/v projection, still writing this step's q and its K/V row; the block
    // table, the lengths and the older keys are written before it), all but the row of this
    // step's key, nkeys - 1, which is copied after the wait.
    // (Only when that key is one of this partition's: a row past key_end is zero-filled.)
    const int hole = early_kv && nkeys - 1 < key_end ? nkeys - 1 : -1;
    load_tile(key_begin, 0, hole);
    if (key_begin + BN < key_end) load_tile(key_begin + BN, 1, hole);
    cp_async_commit();
    if (early_kv) {
        pdl_enter();
        const int r = hole - key_begin;  // its row in tiles 0, 1 (stage r / BN), if there
        if (r >= 0 && r < 2 * BN && tid_here() < CH) {
            const int c = tid_here() * 8, st = r / BN, rr = r % BN;
            const size_t off = kv_offset(st, rr, c);
            const uint32_t dst = kv_smem + st * kStageBytes + rr * kRow + c * sizeof(T);
            cp_async16(dst, key_cache + off, true);
            cp_async16(dst + kTileBytes, value_cache + off, true);
        }
    }
    // The group's query rows (zeros past the group).
    const T* const q_rows = q + ((size_t)qstart * num_heads + head0) * D;
#pragma unroll
    for (int p = 0; p < (16 * CH + THREADS - 1) / THREADS; ++p) {
        if ((16 * CH) % THREADS != 0 && tid_here() + p * THREADS >= 16 * CH) break;
        int r, c;
        unit(p, r, c);
        const bool valid = r < group;
        cp_async16(q_smem + r * kRow + c * sizeof(T), valid ? q_rows + (size_t)r * D + c : q,
                   valid);
    }
    cp_async_commit();

    float o[DN][4];
#pragma unroll
    for (int j = 0; j < DN; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8
    uint32_t qf[DK][4];

    for (int k0 = key_begin; k0 < key_end; k0 += BN) {
        const int st = ((k0 - key_begin) / BN) & 1;
        cp_async_wait_all();
        __syncthreads();  // tile k0 visible to all; every warp is done with stage st ^ 1
        // Tile 1 came with tile 0; later tiles follow the wait (no hole: it is past).
        if (k0 > key_begin && k0 + BN < key_end) load_tile(k0 + BN, st ^ 1, -1);
        if (k0 + 2 * BN < key_end) fetch_slots(k0 + 2 * BN, st);
        cp_async_commit();
        const int lane = tid_here() & 31, warp = tid_here() >> 5;
        if (k0 == key_begin) {
            // Q's a fragments: rows lane & 15, columns + 8 for lanes 16..31.
            const uint32_t qa = q_smem + (lane & 15) * kRow + (lane >> 4) * 16;
#pragma unroll
            for (int kk = 0; kk < DK; ++kk) ldmatrix_x4(qf[kk], qa + kk * 32);
        }
        const int kw = k0 + warp * KW;  // this warp's first key of the tile
        if (kw >= key_end) continue;
        const int t = lane & 3;  // fragment column pair
        const uint32_t stage = kv_smem + st * kStageBytes + warp * KW * kRow;
        // K b fragments of n-tiles 0, 1: keys (lane & 7) + 8 (lane >= 16), columns + 8 (lane & 8).
        const uint32_t kst = stage + ((lane & 7) + ((lane >> 4) << 3)) * kRow + ((lane >> 3) & 1) * 16;
        // V b fragments (transposed) of n-tiles 2jp, 2jp+1: keys lane & 15, columns + 8 (lane >= 16).
        const uint32_t vst = stage + kTileBytes + (lane & 15) * kRow + (lane >> 4) * 16;

        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK; ++kk) {
            uint32_t b[4];
            ldmatrix_x4(b, kst + kk * 32);
            mma(s[0], qf[kk], b, T());
            mma(s[1], qf[kk], b + 2, T());
        }
        if (kw + KW > key_end) {
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (kw + j * 8 + 2 * t + (e & 1) >= key_end) s[j][e] = -INFINITY;
        }
        // Online softmax (log2 domain) for rows g (elements 0, 1) and g + 8 (elements 2, 3).
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float n = fmaxf(m[h], mx * scale_log2);  // finite: key kw is always visible
            alpha[h] = ex2(m[h] - n);
            m[h] = n;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                s[j][2 * h] = ex2(fmaf(s[j][2 * h], scale_log2, -n));
                s[j][2 * h + 1] = ex2(fmaf(s[j][2 * h + 1], scale_log2, -n));
                sum += s[j][2 * h] + s[j][2 * h + 1];
            }
            l[h] = l[h] * alpha[h] + sum;
        }
#pragma unroll
        for (int j = 0; j < DN; ++j) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
        // O += P V: S's two n-tiles are P's a fragment for the warp's 16 keys.
        uint32_t pa[4];
        pa[0] = pack2(s[0][0], s[0][1], T());
        pa[1] = pack2(s[0][2], s[0][3], T());
        pa[2] = pack2(s[1][0], s[1][1], T());
        pa[3] = pack2(s[1][2], s[1][3], T());
#pragma unroll
        for (int jp = 0; jp < DN / 2; ++jp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vst + jp * 32);
            mma(o[2 * jp], pa, b, T());
            mma(o[2 * jp + 1], pa, b + 2, T());
        }
    }

    // Merge the warps: each leaves (m, l) per row and its O rows in shared memory (over the
    // stages, after every warp is done with them and no copy is in flight).
    cp_async_wait_all();
    __syncthreads();
    float* const wm = reinterpret_cast<float*>(dec_smem + 16 * kRow);  // [WARPS][16]
    float* const wl = wm + WARPS * 16;                                  // [WARPS][16]
    float* const wo = wl + WARPS * 16;                                  // [WARPS][16][D]
    {
        const int lane = tid_here() & 31, warp = tid_here() >> 5;
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = l[h];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (t == 0) {
                wm[warp * 16 + g + 8 * h] = m[h];
                wl[warp * 16 + g + 8 * h] = sum;
            }
        }
#pragma unroll
        for (int j = 0; j < DN; ++j) {
            float* r0 = wo + (warp * 16 + g) * D + j * 8 + 2 * t;
            r0[0] = o[j][0];
            r0[1] = o[j][1];
            r0[8 * D] = o[j][2];
            r0[8 * D + 1] = o[j][3];
        }
    }
    // The CTA's merged partition for its cluster: m [16], l [16], acc [16][D].
    __shared__ float cpart[CLUSTER ? 16 * (D + 2) : 1];
    __syncthreads();
    for (int i = tid_here(); i < group * D; i += THREADS) {
        const int h = i / D, d = i % D;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, wm[w * 16 + h]);
        float lsum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float mw = wm[w * 16 + h];
            if (mw == -INFINITY) continue;  // a warp without keys
            const float wt = ex2(mw - mx);
            lsum += wt * wl[w * 16 + h];
            a += wt * wo[(w * 16 + h) * D + d];
        }
        const size_t orow = (size_t)qstart * num_heads + head0 + h;
        if (CLUSTER) {
            cpart[2 * 16 + h * D + d] = a;
            if (d == 0) {
                cpart[h] = mx;
                cpart[16 + h] = lsum;
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
        cluster_merge<T, D, 16, THREADS>(cpart, out + ((size_t)qstart * num_heads + head0) * D,
                                         group, (nkeys + partition - 1) / partition, splits);
    }
}

}  // namespace flash_decode

// Kernels flash_decode_<type>_d<D>[_cluster]. No L2 warm-up of later weights (paged_decode.cu's
// warm0..2): its launches at batch 1 are a few CTAs, and issuing the warm-up from them slowed the
// step (attention_cuda.rs).
#define FLASH_DECODE_V(T, NAME, D, CLUSTER)                                                     \
    extern "C" __global__ void __launch_bounds__(flash_decode::THREADS)                         \
        NAME(                                                                                   \
            T* out, float* part_m, float* part_l, float* part_acc, const T* q,                  \
            const T* key_cache, const T* value_cache, const uint32_t* block_tables,             \
            const uint32_t* context_lens, const uint32_t* query_start, int num_heads,           \
            int num_kv_heads, int block_size, int max_blocks_per_seq, float scale_log2,         \
            int early_kv) {                                                                     \
        flash_decode::flash_decode_impl<T, D, CLUSTER>(                                         \
            out, part_m, part_l, part_acc, q, key_cache, value_cache, block_tables,             \
            context_lens, query_start, num_heads, num_kv_heads, block_size, max_blocks_per_seq, \
            scale_log2, early_kv);                                                              \
    }

#define FLASH_DECODE(T, SUFFIX, D)                                     \
    FLASH_DECODE_V(T, flash_decode_##SUFFIX##_d##D, D, false)          \
    FLASH_DECODE_V(T, flash_decode_##SUFFIX##_d##D##_cluster, D, true)

#define FLASH_DECODE_ALL_D(T, SUFFIX) \
    FLASH_DECODE(T, SUFFIX, 64)       \
    FLASH_DECODE(T, SUFFIX, 80)       \
    FLASH_DECODE(T, SUFFIX, 96)       \
    FLASH_DECODE(T, SUFFIX, 128)

FLASH_DECODE_ALL_D(__half, f16)
FLASH_DECODE_ALL_D(__nv_bfloat16, bf16)
