// Programmatic dependent launch (Hopper, sm_90): a kernel launched with the programmatic
// stream-serialization attribute (engine/src/model/pdl.rs) may start while the kernel before it
// in the stream still runs. Each such kernel:
//   1. may read what no earlier kernel writes (weights) and prefetch it into L2, and what the
//      kernel just before does not write (it starts only once that kernel has passed its own
//      wait, so every kernel before that one has completed: the decode attention's older keys);
//   2. calls pdl_enter() in every thread before it reads anything the kernel before writes and
//      before it writes anything: its wait returns once the kernel before has completed and its
//      writes are visible (that one waited for its own predecessor, so all earlier work is done),
//      and it then lets the next kernel's CTAs start early.
// Without the attribute, or below sm_90, pdl_enter() is a no-op and the launch is ordered as usual.
#pragma once
#include <stdint.h>

// Waits for the kernel before (griddepcontrol.wait), then lets the next kernel's CTAs start
// (griddepcontrol.launch_dependents): the kernel's own work follows.
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks the copy engine to bring `bytes` (a multiple of 16, from a 16-byte aligned address) of
// global memory into L2 without waiting for them (sm_90's bulk prefetch; nothing below).
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n\t.reg .u64 gaddr;\n\tcvta.to.global.u64 gaddr, %0;\n\t"
        "cp.async.bulk.prefetch.L2.global [gaddr], %1;\n\t}\n" ::"l"(p),
        "r"(bytes)
        : "memory");
#endif
}

// Spreads an L2 warm-up of `bytes` (a multiple of 16) at `p` (16-byte aligned) over every thread of
// the grid, one bulk prefetch of at most 16 KB per thread and round: a kernel that leaves HBM idle
// (a short decode attention) fetches weights the next kernels will read. Nothing when p is null.
__device__ __forceinline__ void warm_l2(const void* p, unsigned long long bytes) {
    if (p == nullptr || bytes == 0) return;
    constexpr unsigned long long PIECE = 16384;
    const unsigned long long threads =
        (unsigned long long)gridDim.x * gridDim.y * gridDim.z * blockDim.x;
    const unsigned long long me =
        ((unsigned long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x * blockDim.x +
        (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long pieces = (bytes + PIECE - 1) / PIECE;
    for (unsigned long long i = me; i < pieces; i += threads) {
        const unsigned long long off = i * PIECE;
        const unsigned long long n = bytes - off < PIECE ? bytes - off : PIECE;
        prefetch_l2(static_cast<const char*>(p) + off, (uint32_t)n);
    }
}
