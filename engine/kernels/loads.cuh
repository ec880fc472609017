// Global-memory load forms shared by the kernels.
#pragma once
#include <stdint.h>

// The L2 evict-first policy (sm_80+): lines a load brings in, or finds, are the first to be
// replaced. Pure, so the compiler makes it once per kernel.
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// 16 bytes of data read once (weights streamed by a projection): the non-coherent path, not kept
// in L1, which is left to what is read again, and evict-first in L2: a model's weights are read
// once per step and never fit in L2, so they give way before anything else there (the KV cache,
// activations, rows fetched ahead by l2_prefetch.cu). Only for data no kernel writes while it
// runs. Built with STREAM_L2_EVICT_NORMAL defined (KERNEL_DEFINES, engine/build.rs): the normal
// L2 policy instead, for comparison.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 r;
#ifdef STREAM_L2_EVICT_NORMAL
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
#else
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p), "l"(evict_first_policy()));
#endif
    return r;
}
