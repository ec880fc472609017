// Tensor-core building blocks shared by the attention kernels (included, not compiled on its
// own): mma.sync m16n8k16 on 16-bit inputs with f32 accumulation, ldmatrix, cp.async, and small
// arithmetic helpers. Fragment layouts are those of the PTX ISA for m16n8k16.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace flash {

constexpr int kPad = 8;  // elements of row padding (row stride = an odd number of 16-byte units)

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

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory (32-bit shared addresses); lanes 8i .. 8i+7 give
// the row addresses of matrix i, register i receives it (lane l: row l / 4, columns 2 (l % 4), +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t row_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row_addr));
}
// The same, each matrix transposed (lane l holds column l / 4, rows 2 (l % 4), +1).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t row_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row_addr));
}

// 16 bytes global -> shared without a register round trip; zero-filled when `valid` is false.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared (through L1: block-table entries are re-read by neighbouring CTAs).
__device__ __forceinline__ void cp_async4(uint32_t smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n"); }

// 1 / x (approximate), volatile so that it is computed where it is used instead of occupying a
// register across the main loop.
__device__ __forceinline__ float rcp_here(int x) {
    float y;
    asm volatile("{\n .reg .f32 t;\n cvt.rn.f32.s32 t, %1;\n rcp.approx.ftz.f32 %0, t;\n}\n"
                 : "=f"(y)
                 : "r"(x));
    return y;
}

// threadIdx.x, re-read wherever it is written: the compiler cannot hoist a volatile read, so
// the values derived from it (fragment addresses, row numbers) are recomputed per tile instead
// of occupying registers across the main loop, where the accumulators need every register.
__device__ __forceinline__ int tid_here() {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
    return t;
}

// 2^x (MUFU; 2^-inf = 0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace flash
