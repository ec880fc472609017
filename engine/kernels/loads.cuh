// Global-memory load forms shared by the kernels.
#pragma once
#include <stdint.h>

// 16 bytes of data read once (weights streamed by a projection): the non-coherent path, not kept
// in L1, which is left to what is read again. Only for data no kernel writes while it runs.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}
