// Kernel lab for the batch-1 projections: the engine's GEMV kernels (gemv.cu, included whole) beside
// plain streaming reads of the same bytes, and variants under study, for scripts/gpu/gemv-lab.py
// (built on the GPU machine with nvcc into a cubin; nothing here is part of the engine).
#include "../../engine/kernels/gemv.cu"

// Reads every 16-byte chunk of p[0 .. chunks) once with the GEMVs' streaming load and stores one
// word per thread (so the loads are live). Grid-stride, U chunks per thread in flight per step.
template <int U>
__device__ void read_grid_stride(const uint4* __restrict__ p, long long chunks,
                                 unsigned* __restrict__ out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long me = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (long long c0 = me; c0 < chunks; c0 += stride * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long long c = c0 + u * stride;
            v[u] = load_stream(p + (c < chunks ? c : chunks - 1));
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c0 + u * stride < chunks) acc += v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    out[me] = acc;
}

// The same bytes in contiguous pieces: CTA b reads chunks [b * per, (b + 1) * per), its threads
// striding over the piece U chunks at a time (the access of a GEMV CTA over its rows).
template <int U>
__device__ void read_pieces(const uint4* __restrict__ p, long long chunks, long long per,
                            unsigned* __restrict__ out) {
    const long long begin = (long long)blockIdx.x * per;
    const long long end = begin + per < chunks ? begin + per : chunks;
    unsigned acc = 0;
    for (long long c0 = begin + threadIdx.x; c0 < end; c0 += (long long)blockDim.x * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long long c = c0 + u * (long long)blockDim.x;
            v[u] = load_stream(p + (c < end ? c : end - 1));
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c0 + u * (long long)blockDim.x < end) acc += v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    out[(long long)blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

#define READ_GS(U, TH, MINB)                                                                      \
    extern "C" __global__ void __launch_bounds__(TH, MINB)                                        \
        read_gs_u##U##_t##TH(const uint4* p, long long chunks, unsigned* out) {                   \
        read_grid_stride<U>(p, chunks, out);                                                      \
    }
#define READ_PC(U, TH, MINB)                                                                      \
    extern "C" __global__ void __launch_bounds__(TH, MINB)                                        \
        read_pc_u##U##_t##TH(const uint4* p, long long chunks, long long per, unsigned* out) {    \
        read_pieces<U>(p, chunks, per, out);                                                      \
    }

READ_GS(4, 256, 4)
READ_GS(8, 256, 4)
READ_GS(16, 256, 2)
READ_GS(8, 512, 2)
READ_GS(4, 1024, 1)
READ_PC(8, 128, 8)
READ_PC(9, 128, 4)
READ_PC(16, 256, 2)

// CTA-per-rows variants of the one-row kernel: R rows per CTA, U chunks per thread in flight.
#define GEMV_V_VAR(R, U, MINB)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS, MINB)                                   \
        lab_gemv_bf16_m1_r##R##_u##U##_b##MINB(const __nv_bfloat16* x, const __nv_bfloat16* w,              \
                                     __nv_bfloat16* y, int n, int k) {                            \
        gemv_v_impl<__nv_bfloat16, 1, R, U>(x, w, y, n, k);                                       \
    }
GEMV_V_VAR(1, 9, 8)
GEMV_V_VAR(1, 9, 6)
GEMV_V_VAR(2, 9, 4)
GEMV_V_VAR(1, 5, 8)
GEMV_V_VAR(4, 3, 4)
GEMV_V_VAR(4, 3, 6)
GEMV_V_VAR(4, 2, 8)
GEMV_V_VAR(8, 2, 4)
GEMV_V_VAR(4, 4, 4)
GEMV_V_VAR(2, 5, 6)
GEMV_V_VAR(8, 3, 2)
