// KV-cache writes: reshape_and_cache copies new K or V rows into a paged cache at slot_mapping.
//
// src:          [num_tokens, num_kv_heads, head_dim], token rows `src_stride` units apart
// cache:        [num_blocks, block_size, num_kv_heads, head_dim] contiguous
// slot_mapping: [num_tokens] int64; slot -1 (or out of range) = skip; slot = block * block_size + offset,
//               so a token's row starts at unit slot * row_units of the cache.
// The copy is byte-exact and dtype-agnostic: one kernel per copy unit (2, 4 or 16 bytes) that divides
// the row, the source stride and both base addresses (chosen by the host).
#include <stdint.h>

#include "pdl.cuh"

template <typename U>
__device__ void reshape_and_cache_impl(const U* __restrict__ src, U* __restrict__ cache,
                                       const int64_t* __restrict__ slot_mapping, int64_t row_units,
                                       int64_t src_stride, int64_t num_slots) {
    const int64_t token = blockIdx.x;
    const int64_t slot = slot_mapping[token];
    if (slot < 0 || slot >= num_slots) return;
    const U* s = src + token * src_stride;
    U* d = cache + slot * row_units;
    for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) d[i] = s[i];
}

#define RESHAPE_AND_CACHE(NAME, U)                                                         \
    extern "C" __global__ void NAME(const U* src, U* cache, const int64_t* slot_mapping,   \
                                    int64_t row_units, int64_t src_stride,                 \
                                    int64_t num_slots) {                                   \
        pdl_enter();                                                                       \
        reshape_and_cache_impl<U>(src, cache, slot_mapping, row_units, src_stride,         \
                                  num_slots);                                              \
    }

RESHAPE_AND_CACHE(reshape_and_cache_u16, uint16_t)
RESHAPE_AND_CACHE(reshape_and_cache_u32, uint32_t)
RESHAPE_AND_CACHE(reshape_and_cache_v16, uint4)
