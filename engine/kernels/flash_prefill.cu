// Tensor-core attention for prefill and chunked prefill over the paged KV cache (bf16/f16).
//
// Same contract and layouts as paged_attention.cu; this kernel takes the sequences whose query
// length is >= qlen_lo (the host sends the others to paged_attention). FlashAttention-2 scheme:
// a CTA owns BM = 64 query tokens of one sequence and one query head (4 warps x 16 rows) and walks
// the keys 0 ..= last causal key in tiles of BN = 32, gathered through the block table into shared
// memory by cp.async, two stages (the next tile loads while this one computes). S = Q K^T and O += P V run on mma.sync m16n8k16 (16-bit inputs, f32 accumulation); the
// online softmax (running max m, sum l) is kept in f32 registers, P is rounded to the input type
// for the P V product like FlashAttention does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "paged_common.cuh"

#define BN 32     // keys per tile
#define PAD 8     // elements of row padding: conflict-free fragment loads for every D here

// One m16n8k16 product c += a b (a row-major 16x16, b column-major 16x8, c 16x8 f32).
__device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b, __nv_bfloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b, __half) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats rounded to the 16-bit type, the first in the low half (the lower column index).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t ld32(const void* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// b fragment of a 16x8 slice of V (rows = keys, 8 columns of D) stored row-major in shared memory.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t* b, const void* row_addr) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(a));
}

// 16 bytes global -> shared without a register round trip; zero-filled when `valid` is false.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T, int D, int WARPS>
__device__ void flash_prefill_impl(T* __restrict__ out, const T* __restrict__ q,
                                   const T* __restrict__ key_cache,
                                   const T* __restrict__ value_cache,
                                   const uint32_t* __restrict__ block_tables,
                                   const uint32_t* __restrict__ context_lens,
                                   const uint32_t* __restrict__ query_start, int num_seqs,
                                   int num_heads, int num_kv_heads, int block_size,
                                   int max_blocks_per_seq, int qlen_lo, float scale_log2) {
    constexpr int BM = 16 * WARPS;  // query rows per CTA
    static_assert(D % 16 == 0 && D <= 128 && BM <= 2 * BN, "head_dim, tile sizes");
    constexpr int S = D + PAD;  // shared-memory row stride in elements (a multiple of 8)
    constexpr int CH = D / 8;   // 16-byte chunks per row
    // Two stages of [K tile; V tile]; the Q tile (BM <= 2 x BN rows) first passes through stage 0.
    __shared__ __align__(16) T smem[2][2][BN * S];

    int seq, q_begin;
    if (!locate_tile(query_start, num_seqs, BM, blockIdx.x, qlen_lo, 0x7fffffff, true, &seq,
                     &q_begin))
        return;
    const int head = blockIdx.y;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;  // fragment row group and column pair
    const int qstart = (int)query_start[seq];
    const int qlen = (int)query_start[seq + 1] - qstart;
    const int ctx = (int)context_lens[seq];
    const int rows_here = min(BM, qlen - q_begin);
    const int past = ctx - qlen;  // cached keys before this chunk
    const int key_end = past + q_begin + rows_here;  // one past the last key any row sees
    const uint32_t* table = block_tables + (size_t)seq * max_blocks_per_seq;
    const int r0 = warp * 16;
    // Last key each of this thread's two rows (r0 + g, r0 + g + 8) may see.
    const int lim0 = past + q_begin + r0 + g, lim1 = lim0 + 8;

    // Q tile through shared memory into registers: a fragments for D / 16 k-steps.
    T* qs = &smem[0][0][0];
    for (int i = tid; i < BM * CH; i += WARPS * 32) {
        const int r = i / CH, c = (i % CH) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows_here)
            v = __ldg(reinterpret_cast<const uint4*>(
                q + ((size_t)(qstart + q_begin + r) * num_heads + head) * D + c));
        *reinterpret_cast<uint4*>(&qs[r * S + c]) = v;
    }
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk * 16 + 2 * t;
        qf[kk][0] = ld32(&qs[(r0 + g) * S + c]);
        qf[kk][1] = ld32(&qs[(r0 + g + 8) * S + c]);
        qf[kk][2] = ld32(&qs[(r0 + g) * S + c + 8]);
        qf[kk][3] = ld32(&qs[(r0 + g + 8) * S + c + 8]);
    }
    __syncthreads();

    // K/V rows of keys k0 .. k0 + BN into stage `st` (rows past key_end zero-filled).
    auto load_tile = [&](int k0, int st) {
        for (int i = tid; i < BN * CH; i += WARPS * 32) {
            const int r = i / CH, c = (i % CH) * 8;
            const int key = k0 + r;
            const bool valid = key < key_end;
            size_t off = 0;
            if (valid) {
                const size_t slot =
                    (size_t)table[key / block_size] * block_size + key % block_size;
                off = (slot * num_kv_heads + kv_head) * D + c;
            }
            cp_async16(&smem[st][0][r * S + c], key_cache + off, valid);
            cp_async16(&smem[st][1][r * S + c], value_cache + off, valid);
        }
        cp_async_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    // Whole warp masked out past this key (its last row's limit), or no valid rows at all.
    const int warp_last_key = r0 < rows_here ? past + q_begin + min(r0 + 15, rows_here - 1) : -1;

    const int num_tiles = (key_end + BN - 1) / BN;
    load_tile(0, 0);
    for (int it = 0; it < num_tiles; ++it) {
        const int k0 = it * BN, st = it & 1;
        if (it + 1 < num_tiles) {
            load_tile(k0 + BN, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* ks = smem[st][0];
        const T* vs = smem[st][1];

        if (k0 <= warp_last_key) {
            // S = Q K^T for 16 rows x BN keys: BN / 8 n-tiles of 16x8.
            float s[BN / 8][4];
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    const T* kr = &ks[(j * 8 + g) * S + kk * 16 + 2 * t];
                    const uint32_t b[2] = {ld32(kr), ld32(kr + 8)};
                    mma(s[j], qf[kk], b, T());
                }
            }
            // Causal mask, scale (log2 domain) and the tile's row maxima.
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + j * 8 + 2 * t + (e & 1);
                    const int lim = e < 2 ? lim0 : lim1;
                    const float v = (key <= lim && key < key_end) ? s[j][e] * scale_log2 : -INFINITY;
                    s[j][e] = v;
                    if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
                }
            }
#pragma unroll
            for (int x = 1; x <= 2; x <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            // A row with no visible key yet keeps m = -inf: use 0 as the base so exp2 gives 0.
            const float b0 = n0 == -INFINITY ? 0.f : n0, b1 = n1 == -INFINITY ? 0.f : n1;
            const float a0 = exp2f(m0 - b0), a1 = exp2f(m1 - b1);
            m0 = n0;
            m1 = n1;
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                s[j][0] = exp2f(s[j][0] - b0);
                s[j][1] = exp2f(s[j][1] - b0);
                s[j][2] = exp2f(s[j][2] - b1);
                s[j][3] = exp2f(s[j][3] - b1);
                sum0 += s[j][0] + s[j][1];
                sum1 += s[j][2] + s[j][3];
            }
            l0 = l0 * a0 + sum0;  // per-thread partial sums; the quad is summed at the end
            l1 = l1 * a1 + sum1;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                o[j][0] *= a0;
                o[j][1] *= a0;
                o[j][2] *= a1;
                o[j][3] *= a1;
            }
            // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are P's a fragment for k-step kk.
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const uint32_t a[4] = {pack2(s[2 * kk][0], s[2 * kk][1], T()),
                                       pack2(s[2 * kk][2], s[2 * kk][3], T()),
                                       pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], T()),
                                       pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], T())};
#pragma unroll
                for (int j = 0; j < D / 8; ++j) {
                    uint32_t b[2];
                    ldmatrix_x2_trans(b, &vs[(kk * 16 + (lane & 15)) * S + j * 8]);
                    mma(o[j], a, b, T());
                }
            }
        }
        __syncthreads();  // stage st is refilled by the next iteration's prefetch
    }

#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const int ra = r0 + g, rb = r0 + g + 8;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        const int d = j * 8 + 2 * t;
        if (ra < rows_here)
            *reinterpret_cast<uint32_t*>(
                &out[((size_t)(qstart + q_begin + ra) * num_heads + head) * D + d]) =
                pack2(o[j][0] * inv0, o[j][1] * inv0, T());
        if (rb < rows_here)
            *reinterpret_cast<uint32_t*>(
                &out[((size_t)(qstart + q_begin + rb) * num_heads + head) * D + d]) =
                pack2(o[j][2] * inv1, o[j][3] * inv1, T());
    }
}

#define FLASH_PREFILL(SUFFIX, T, D, W, NAME)                                                       \
    extern "C" __global__ void __launch_bounds__(W * 32) NAME(                                     \
        T* out, const T* q, const T* key_cache, const T* value_cache,                             \
        const uint32_t* block_tables, const uint32_t* context_lens, const uint32_t* query_start,  \
        int num_seqs, int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,    \
        int qlen_lo, float scale_log2) {                                                           \
        flash_prefill_impl<T, D, W>(out, q, key_cache, value_cache, block_tables, context_lens,    \
                                    query_start, num_seqs, num_heads, num_kv_heads, block_size,    \
                                    max_blocks_per_seq, qlen_lo, scale_log2);                      \
    }

// (32-row CTAs, 2 warps, measured slower on an H200 even where 64-row CTAs leave SMs idle.)
#define FLASH_PREFILL_ALL_D(SUFFIX, T)                              \
    FLASH_PREFILL(SUFFIX, T, 64, 4, flash_prefill_##SUFFIX##_d64)   \
    FLASH_PREFILL(SUFFIX, T, 80, 4, flash_prefill_##SUFFIX##_d80)   \
    FLASH_PREFILL(SUFFIX, T, 96, 4, flash_prefill_##SUFFIX##_d96)   \
    FLASH_PREFILL(SUFFIX, T, 128, 4, flash_prefill_##SUFFIX##_d128)

FLASH_PREFILL_ALL_D(f16, __half)
FLASH_PREFILL_ALL_D(bf16, __nv_bfloat16)
