// Programmatic dependent launch (engine/src/model/pdl.rs): every kernel the engine launches with
// the programmatic-serialization attribute calls pdl_wait() before it touches memory that earlier
// work in the stream uses, then pdl_trigger() so that the next kernel can start launching.
#pragma once

// Returns once the kernel before this one in the stream has completed and its writes are visible
// (at once when this kernel was not launched programmatically).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream launch once every CTA of this one has called it (or exited).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Both, at a kernel's start: wait for the previous kernel, then let the next one launch.
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_trigger();
}

// Asks the L2 cache to fetch the line holding p (no register, no wait): data that does not depend
// on the previous kernel (weights) can be read ahead of pdl_wait().
__device__ __forceinline__ void prefetch_l2_line(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
