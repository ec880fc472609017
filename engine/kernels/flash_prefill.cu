// Tensor-core attention for prefill and chunked prefill over the paged KV cache (bf16/f16).
//
// Same contract and layouts as paged_attention.cu; this kernel takes the sequences whose query
// length is >= qlen_lo (the host sends the others to paged_attention). FlashAttention-2 scheme:
// a CTA owns BM query rows (tokens) of one sequence and one query head; each of its warps owns
// MT m16 tiles (16 MT consecutive rows), so every K and V fragment a warp loads feeds MT
// products. The CTA walks the keys 0 ..= its last causal key in tiles of BN keys:
//  - K and V rows are gathered through the block table into shared memory by cp.async, two
//    stages: tile i+1 loads while tile i computes. One barrier per tile: the one that publishes
//    tile i also shows that every warp is done with tile i-1, whose stage tile i+1 refills. The
//    block-table entries of tile i+2 travel (cp.async) with tile i+1, so that issuing a tile's
//    loads never waits on a block-table read.
//  - S = Q K^T and O += P V run on mma.sync m16n8k16 (16-bit inputs, f32 accumulation); every
//    operand fragment comes from ldmatrix.x4: Q (a), K (b, two 8-key n-tiles per load) and V
//    (b, transposed, two 8-column n-tiles per load). Rows are padded by 8 elements, so the 8
//    rows of each ldmatrix phase fall in distinct 16-byte bank groups for every D.
//  - Online softmax in f32 registers in the log2 domain (running max m, per-thread partial sums
//    l); P is rounded to the input type for P V like FlashAttention does. The causal / key_end
//    mask is applied only on tiles that cross a row's limit, a warp skips the tiles none of its
//    rows sees, and O is rescaled only when some row maximum moved.
// Each warp stages its normalized rows of O in its own rows of the Q tile and writes them out
// with 16-byte stores.
//
// Grid (num_heads, query tiles), block Tiles::kThreads, dynamic shared memory Tiles::kSmemBytes.
// Query tiles are numbered from each sequence's last one (the last tiles see the most keys), and
// the head is blockIdx.x, so the longest tiles of all heads are issued first.
//
// Two tilings are compiled for every head size and type, as kernels
// flash_prefill_<type>_d<D>_<BM>x<BN> (attention_cuda.rs picks one, see set_flash_wide_tiles):
//   128x64: 4 warps x 32 rows; Q fragments re-read from shared memory for every key tile, except
//           at d64 where they fit in registers;
//   64x32:  4 warps x 16 rows; Q fragments held in registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"
#include "paged_common.cuh"

namespace flash {

// Tile shape of one kernel variant: WARPS warps of MT m16 tiles each, BN keys per tile.
template <int D, int WARPS, int MT, int BN>
struct Tiles {
    static constexpr int kThreads = 32 * WARPS;
    static constexpr int BM = 16 * MT * WARPS;  // query rows per CTA
    static constexpr int S = D + kPad;           // shared-memory row stride in elements
    static constexpr int CH = D / 8;             // 16-byte chunks per row
    static constexpr int DN = D / 8;             // 8-column n-tiles of O
    static constexpr int DK = D / 16;            // k-steps of Q K^T
    static constexpr int KN = BN / 8;            // 8-key n-tiles of S
    // Q's a fragments stay in registers when O, S and Q together leave room for the rest (ptxas:
    // 128x64 spills from d80 up); otherwise they are re-read from shared memory per key tile.
    static constexpr bool kQRegs = MT * (DN * 4 + KN * 4 + DK * 4) <= 160;
    // Bytes of dynamic shared memory: the Q tile, stages 0 and 1 of [K tile; V tile], and the
    // block numbers and in-block offsets of the keys of two tiles.
    static constexpr int kSmemBytes = (BM + 4 * BN) * S * 2 + 2 * 2 * BN * 4;
    static_assert(D % 16 == 0 && D <= 128 && BN % 16 == 0 && BN <= kThreads, "head_dim, tiles");
};

template <typename T, int D, int WARPS, int MT, int BN>
__device__ __forceinline__ void flash_prefill_impl(
    T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ key_cache,
    const T* __restrict__ value_cache, const uint32_t* __restrict__ block_tables,
    const uint32_t* __restrict__ context_lens, const uint32_t* __restrict__ query_start,
    int num_seqs, int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,
    int qlen_lo, float scale_log2) {
    using L = Tiles<D, WARPS, MT, BN>;
    constexpr int BM = L::BM, S = L::S, CH = L::CH, DN = L::DN, DK = L::DK, KN = L::KN;
    constexpr int NT = L::kThreads;
    constexpr bool kQRegs = L::kQRegs;
    constexpr uint32_t kRow = S * sizeof(T);          // bytes per shared-memory row
    constexpr uint32_t kTileBytes = BN * kRow;        // one K or V tile
    constexpr uint32_t kStageBytes = 2 * kTileBytes;  // [K tile; V tile]
    // Dynamic shared memory: the Q tile (BM rows; later the O tile), 2 stages of K and V, and
    // for the keys of two tiles (buffer = tile & 1) their block numbers and in-block offsets.
    extern __shared__ __align__(16) unsigned char flash_smem[];
    const uint32_t q_smem = smem_addr(flash_smem);
    const uint32_t kv_smem = q_smem + BM * kRow;
    uint32_t* const key_block =
        reinterpret_cast<uint32_t*>(flash_smem + BM * kRow + 2 * kStageBytes);
    uint32_t* const key_within = key_block + 2 * BN;

    int seq, q_begin;
    // blockIdx.x is the head and blockIdx.y the query tile, so that CTAs are issued tile by
    // tile (the longest first) across all heads rather than head by head.
    if (!locate_tile(query_start, num_seqs, BM, blockIdx.y, qlen_lo, 0x7fffffff, true, &seq,
                     &q_begin))
        return;
    const int head = blockIdx.x;
    const uint32_t kv_head = head / (num_heads / num_kv_heads);
    const int qstart = (int)query_start[seq];
    const int qlen = (int)query_start[seq + 1] - qstart;
    const int ctx = (int)context_lens[seq];
    const int rows_here = min(BM, qlen - q_begin);
    const int past = ctx - qlen;                     // cached keys before this chunk
    const int key_end = past + q_begin + rows_here;  // one past the last key any row sees
    const uint32_t* table = block_tables + (size_t)seq * max_blocks_per_seq;
    // This warp's first row in the tile, and the last key that row sees.
    auto warp_row0 = [&] { return (tid_here() >> 5) * 16 * MT; };
    auto warp_lim = [&] { return key_end - rows_here + warp_row0(); };
    // Block-table look-up of the keys k0 .. k0 + BN into buffer `buf`, one key per thread: the
    // block number by cp.async (it lands with the next wait), the in-block offset directly.
    // Keys at or past key_end (zero-filled rows) look up key 0, any valid slot.
    auto fetch_slots = [&](int k0, int buf) {
        const int tid = tid_here();
        if (tid < BN) {
            const int key = k0 + tid < key_end ? k0 + tid : 0;
            // key / block_size from an f32 estimate, corrected (at most once either way for keys
            // below 2^21).
            int col = __float2int_rz((float)key * rcp_here(block_size));
            int w = key - col * block_size;
            while (w < 0) col -= 1, w += block_size;
            while (w >= block_size) col += 1, w -= block_size;
            cp_async4(smem_addr(&key_block[buf * BN + tid]), &table[col]);
            key_within[buf * BN + tid] = (uint32_t)w;
        }
    };
    const int q0 = qstart + q_begin;  // the tile's first token

    // Row and 16-byte chunk of the i-th copy unit of a BN x D or BM x D tile.
    auto unit = [&](int p, int& r, int& c) {
        const int tid = tid_here();
        if constexpr (NT % CH == 0) {
            r = tid / CH + p * (NT / CH);
            c = (tid % CH) * 8;
        } else {
            r = (tid + p * NT) / CH;
            c = (tid + p * NT) % CH * 8;
        }
    };
    // Slots of tiles 0 and 1, then the Q rows (zero past rows_here) in one cp.async group with
    // key tile 0.
    fetch_slots(0, 0);
    fetch_slots(BN, 1);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    const T* const q_tile = q + ((size_t)q0 * num_heads + head) * D;
#pragma unroll
    for (int p = 0; p < (BM * CH + NT - 1) / NT; ++p) {
        if ((BM * CH) % NT != 0 && tid_here() + p * NT >= BM * CH) break;
        int r, c;
        unit(p, r, c);
        const bool valid = r < rows_here;
        const T* src = valid ? q_tile + (size_t)r * num_heads * D + c : q;
        cp_async16(q_smem + r * kRow + c * sizeof(T), src, valid);
    }
    // K/V rows of keys k0 .. k0 + BN into stage `st` (rows at or past key_end zero-filled), at
    // the slots of slot buffer st.
    auto load_tile = [&](int k0, int st) {
        const uint32_t ks = smem_addr(flash_smem + BM * kRow + st * kStageBytes);
#pragma unroll
        for (int p = 0; p < (BN * CH + NT - 1) / NT; ++p) {
            if ((BN * CH) % NT != 0 && tid_here() + p * NT >= BN * CH) break;
            int r, c;
            unit(p, r, c);
            const bool valid = k0 + r < key_end;
            const uint32_t slot =
                key_block[st * BN + r] * (uint32_t)block_size + key_within[st * BN + r];
            const size_t off = ((size_t)slot * (uint32_t)num_kv_heads + kv_head) * D + c;
            const uint32_t dst = ks + r * kRow + c * sizeof(T);
            cp_async16(dst, key_cache + off, valid);
            cp_async16(dst + kTileBytes, value_cache + off, valid);
        }
    };

    float o[MT][DN][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < DN; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    // Per m-tile, rows g and g + 8: running max (log2 domain) and this thread's partial sum.
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;
    uint32_t qf[kQRegs ? MT : 1][kQRegs ? DK : 1][4];

    // ldmatrix row address of this lane for the Q a fragments (fragment layouts of m16n8k16):
    // rows r0 + (lane & 15), columns + 8 for lanes 16..31.
    auto q_frag_addr = [&] {
        const int lane = tid_here() & 31;
        return q_smem + (warp_row0() + (lane & 15)) * kRow + (lane >> 4) * 16;
    };

    // One key tile (stage st, keys k0 ..) for this warp's rows: S = Q K^T, mask, online
    // softmax, O += P V.
    auto compute_tile = [&](int k0, int st) {
        const int lane = tid_here() & 31;
        const int g = lane >> 2, t = lane & 3;  // fragment row group and column pair
        const int lim_warp = warp_lim();
        const uint32_t qa = q_frag_addr();
        // K b fragments of n-tiles 2p, 2p+1: keys + (lane & 7) + 8 (lane >= 16), columns + 8
        // (lane & 8). V b fragments (transposed) of n-tiles 2p, 2p+1: keys + (lane & 15),
        // columns + 8 (lane >= 16).
        const uint32_t kst = kv_smem + st * kStageBytes +
                             ((lane & 7) + ((lane >> 4) << 3)) * kRow + ((lane >> 3) & 1) * 16;
        const uint32_t vst = kv_smem + st * kStageBytes + kTileBytes + (lane & 15) * kRow +
                             (lane >> 4) * 16;

        // S = Q K^T: MT x KN tiles of 16x8.
        float s[MT][KN][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < KN; ++j)
                s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (kQRegs) {
#pragma unroll
                    for (int x = 0; x < 4; ++x) a[mt][x] = qf[mt][kk][x];
                } else {
                    ldmatrix_x4(a[mt], qa + mt * 16 * kRow + kk * 32);
                }
            }
#pragma unroll
            for (int jp = 0; jp < KN / 2; ++jp) {
                uint32_t b[4];
                ldmatrix_x4(b, kst + jp * 16 * kRow + kk * 32);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(s[mt][2 * jp], a[mt], b, T());
                    mma(s[mt][2 * jp + 1], a[mt], b + 2, T());
                }
            }
        }

        // Causal mask and key_end, only where some key of the tile is past a row's limit.
        if (k0 + BN - 1 > lim_warp || k0 + BN > key_end) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int lim = lim_warp + mt * 16 + g;  // row g; row g + 8 sees 8 more keys
#pragma unroll
                for (int j = 0; j < KN; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = k0 + j * 8 + 2 * t + (e & 1);
                        if (key > lim + (e >> 1) * 8 || key >= key_end) s[mt][j][e] = -INFINITY;
                    }
            }
        }

        // Online softmax in the log2 domain: p = 2^(s scale_log2 - m); row maxima and sums are
        // reduced as trees (short dependency chains).
        float alpha[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // rows g (elements 0, 1) and g + 8 (elements 2, 3)
                float v[KN];
#pragma unroll
                for (int j = 0; j < KN; ++j) v[j] = fmaxf(s[mt][j][2 * h], s[mt][j][2 * h + 1]);
#pragma unroll
                for (int w = KN / 2; w >= 1; w /= 2)
#pragma unroll
                    for (int j = 0; j < w; ++j) v[j] = fmaxf(v[j], v[j + w]);
                float mx = fmaxf(v[0], __shfl_xor_sync(0xffffffffu, v[0], 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float n = fmaxf(m[mt][h], mx * scale_log2);
                // A row with no visible key yet keeps m = -inf: base 0 makes its p and alpha 0.
                const float base = n == -INFINITY ? 0.f : n;
                alpha[mt][h] = ex2(m[mt][h] - base);
                m[mt][h] = n;
#pragma unroll
                for (int j = 0; j < KN; ++j) {
                    s[mt][j][2 * h] = ex2(fmaf(s[mt][j][2 * h], scale_log2, -base));
                    s[mt][j][2 * h + 1] = ex2(fmaf(s[mt][j][2 * h + 1], scale_log2, -base));
                    v[j] = s[mt][j][2 * h] + s[mt][j][2 * h + 1];
                }
#pragma unroll
                for (int w = KN / 2; w >= 1; w /= 2)
#pragma unroll
                    for (int j = 0; j < w; ++j) v[j] += v[j + w];
                // Per-thread partial sums; the quad is summed at the end.
                l[mt][h] = l[mt][h] * alpha[mt][h] + v[0];
            }
        }
        // Rescale O, unless no row maximum of the warp moved (every alpha is 1).
        bool moved = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) moved |= alpha[mt][0] != 1.f || alpha[mt][1] != 1.f;
        if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < DN; ++j) {
                    o[mt][j][0] *= alpha[mt][0];
                    o[mt][j][1] *= alpha[mt][0];
                    o[mt][j][2] *= alpha[mt][1];
                    o[mt][j][3] *= alpha[mt][1];
                }
        }

        // O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are P's a fragment for k-step kk.
#pragma unroll
        for (int kk = 0; kk < KN / 2; ++kk) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1], T());
                pa[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3], T());
                pa[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1], T());
                pa[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3], T());
            }
#pragma unroll
            for (int jp = 0; jp < DN / 2; ++jp) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vst + kk * 16 * kRow + jp * 32);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(o[mt][2 * jp], pa[mt], b, T());
                    mma(o[mt][2 * jp + 1], pa[mt], b + 2, T());
                }
            }
        }
    };

    load_tile(0, 0);
    cp_async_commit();
    // Key tiles k0 = 0, BN, .. below key_end; tile k0 / BN computes from stage st.
    for (int k0 = 0; k0 < key_end; k0 += BN) {
        const int st = (k0 / BN) & 1;
        cp_async_wait_all();
        __syncthreads();  // tile k0 visible to all; every warp is done with stage st ^ 1
        // The next tile into the other stage, the slots of the one after into buffer st (this
        // tile was issued from it last iteration).
        if (k0 + BN < key_end) load_tile(k0 + BN, st ^ 1);
        if (k0 + 2 * BN < key_end) fetch_slots(k0 + 2 * BN, st);
        cp_async_commit();
        if (kQRegs && k0 == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < DK; ++kk)
                    ldmatrix_x4(qf[kQRegs ? mt : 0][kQRegs ? kk : 0],
                                q_frag_addr() + mt * 16 * kRow + kk * 32);
        }
        // Skipped when the whole warp is causally masked (k0 past the last key of its last row,
        // lim_warp + 16 MT - 1, or of the last valid row, key_end - 1) or has no valid row.
        if (k0 < min(warp_lim() + 16 * MT, key_end) && warp_lim() < key_end)
            compute_tile(k0, st);
    }

    // Epilogue, per warp: normalize, stage the warp's rows of O in its own rows of the Q tile
    // (no other warp reads them), then write the valid rows with 16-byte stores.
    __syncwarp();
    const int lane = tid_here() & 31, r0 = warp_row0();
    const int g = lane >> 2, t = lane & 3;
    T* const os = reinterpret_cast<T*>(flash_smem);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = l[mt][h];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            inv[h] = sum > 0.f ? 1.f / sum : 0.f;
        }
        T* row = &os[(r0 + mt * 16 + g) * S + 2 * t];
#pragma unroll
        for (int j = 0; j < DN; ++j) {
            *reinterpret_cast<uint32_t*>(row + j * 8) =
                pack2(o[mt][j][0] * inv[0], o[mt][j][1] * inv[0], T());
            *reinterpret_cast<uint32_t*>(row + 8 * S + j * 8) =
                pack2(o[mt][j][2] * inv[1], o[mt][j][3] * inv[1], T());
        }
    }
    __syncwarp();
    T* const out_tile = out + ((size_t)q0 * num_heads + head) * D;
    static_assert(MT * 16 * CH % 32 == 0, "whole 16-byte units per lane");
#pragma unroll
    for (int p = 0; p < MT * 16 * CH / 32; ++p) {
        const int r = r0 + (lane + 32 * p) / CH, c = (lane + 32 * p) % CH * 8;
        if (r < rows_here)
            *reinterpret_cast<uint4*>(out_tile + (size_t)r * num_heads * D + c) =
                *reinterpret_cast<const uint4*>(&os[r * S + c]);
    }
}

}  // namespace flash

// Kernel flash_prefill_<type>_d<D>_<ROWS>x<KEYS>: WARPS warps of MT m16 tiles, ROWS = 16 MT WARPS
// query rows, KEYS keys per tile.
#define FLASH_PREFILL(T, SUFFIX, D, ROWS, KEYS, WARPS, MT)                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                    \
        flash_prefill_##SUFFIX##_d##D##_##ROWS##x##KEYS(                                        \
            T* out, const T* q, const T* key_cache, const T* value_cache,                       \
            const uint32_t* block_tables, const uint32_t* context_lens,                         \
            const uint32_t* query_start, int num_seqs, int num_heads, int num_kv_heads,         \
            int block_size, int max_blocks_per_seq, int qlen_lo, float scale_log2) {            \
        static_assert(flash::Tiles<D, WARPS, MT, KEYS>::BM == ROWS, "kernel name vs tiles");    \
        flash::flash_prefill_impl<T, D, WARPS, MT, KEYS>(                                       \
            out, q, key_cache, value_cache, block_tables, context_lens, query_start, num_seqs,  \
            num_heads, num_kv_heads, block_size, max_blocks_per_seq, qlen_lo, scale_log2);      \
    }

// Both tilings (attention_cuda.rs FLASH_WIDE, FLASH_NARROW) for every head size.
#define FLASH_PREFILL_D(T, SUFFIX, D)          \
    FLASH_PREFILL(T, SUFFIX, D, 128, 64, 4, 2) \
    FLASH_PREFILL(T, SUFFIX, D, 64, 32, 4, 1)
#define FLASH_PREFILL_ALL_D(T, SUFFIX) \
    FLASH_PREFILL_D(T, SUFFIX, 64)     \
    FLASH_PREFILL_D(T, SUFFIX, 80)     \
    FLASH_PREFILL_D(T, SUFFIX, 96)     \
    FLASH_PREFILL_D(T, SUFFIX, 128)

FLASH_PREFILL_ALL_D(__half, f16)
FLASH_PREFILL_ALL_D(__nv_bfloat16, bf16)
