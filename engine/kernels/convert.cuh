// Conversions between the storage types (f32, f16, bf16) and f32 arithmetic, shared by the
// kernels: to_f32 widens, from_f32<T> rounds to nearest even, widen16<T> widens a 16-byte load.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// The 16 / sizeof(T) elements of a 16-byte load of T, widened to f32 (element 0 from the low bits).
template <typename T>
__device__ __forceinline__ void widen16(const uint4& raw, float* dst) {
    constexpr int N = 16 / sizeof(T);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = to_f32(e[i]);
}
// bf16 is the high half of an f32: a shift or a mask per element.
template <>
__device__ __forceinline__ void widen16<__nv_bfloat16>(const uint4& raw, float* dst) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        dst[2 * i] = __uint_as_float(w[i] << 16);
        dst[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Value after a round trip through T (what an elementwise op in T would store).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// Rotary ("rotate_half") of the pair (a, b) = (x[i], x[i + hd/2]) by cos c and sin s: products
// rounded before the sum (no FMA contraction), so that every kernel that rotates stores the same
// bits.
__device__ __forceinline__ void rotate_pair(float& a, float& b, float c, float s) {
    const float r1 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    const float r2 = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    a = r1;
    b = r2;
}
