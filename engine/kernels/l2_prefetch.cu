// L2 prefetch of weight rows ahead of the projections that read them (engine/src/model/
// l2_prefetch.rs). Launched on a second stream at the start of a decode layer, it asks for the
// first `prefix` bytes of every row of up to three row-major matrices, so that the MLP's GEMVs,
// which come after the layer's latency-bound kernels (norm, q/k/v, attention, o), find part of
// every row in L2. Each row's prefix rather than a block of whole rows: every warp of a GEMV then
// saves the same share of its HBM reads, and none waits on a row the others were spared.
//
// The prefetches are hints (sm_90 bulk prefetch, pdl.cuh): nothing is written, nothing waits for
// them, and a model's outputs are the same bits with or without this kernel. The projections
// stream their weights with the evict-first L2 policy (loads.cuh), so those reads do not push out
// prefetched lines that have not been read yet.
//
// Matrix i: base_i (16-byte aligned), rows_i rows `pitch_i` bytes apart, prefix_i bytes of each
// (a multiple of 16, at most pitch_i; rows_i = 0 for none). Thread j of the grid takes rows j,
// j + threads, ... of the three matrices in turn, in pieces of at most 16 KB.
#include <stdint.h>

#include "pdl.cuh"

constexpr unsigned int PIECE = 16384;

__device__ __forceinline__ void prefetch_prefix(const char* row, unsigned int prefix) {
    for (unsigned int off = 0; off < prefix; off += PIECE)
        prefetch_l2(row + off, prefix - off < PIECE ? prefix - off : PIECE);
}

extern "C" __global__ void l2_prefetch_rows(const char* base0, unsigned long long rows0,
                                            unsigned long long pitch0, unsigned int prefix0,
                                            const char* base1, unsigned long long rows1,
                                            unsigned long long pitch1, unsigned int prefix1,
                                            const char* base2, unsigned long long rows2,
                                            unsigned long long pitch2, unsigned int prefix2) {
    const unsigned long long threads = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long me = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long total = rows0 + rows1 + rows2;
    for (unsigned long long i = me; i < total; i += threads) {
        if (i < rows0) {
            prefetch_prefix(base0 + i * pitch0, prefix0);
        } else if (i < rows0 + rows1) {
            prefetch_prefix(base1 + (i - rows0) * pitch1, prefix1);
        } else {
            prefetch_prefix(base2 + (i - rows0 - rows1) * pitch2, prefix2);
        }
    }
}
