// Helpers shared by the paged-attention kernels (included, not compiled on its own).
#pragma once
#include <cooperative_groups.h>
#include <stdint.h>

#include "convert.cuh"

// The cluster merge of a split decode launch (paged_decode.cu's and flash_decode.cu's _cluster
// kernels): the partitions of one (sequence, head tile) are the CTAs of one cluster (rank =
// blockIdx.z = the partition), each holding its merged (m, l, acc) in shared memory at cpart as
// m [G], l [G], acc [G][D]. After a cluster barrier every thread of the cluster merges a slice of
// the `heads` x D outputs at out_rows ([heads][D]) over the `used` partitions, with
// paged_decode_combine's arithmetic in its order (the same bits), then waits at a second barrier
// so that no CTA leaves while another reads its shared memory. Every thread of every CTA calls
// it; empty partitions' CTAs too (they are not read). sm_90 only.
template <typename T, int D, int G, int THREADS>
__device__ __forceinline__ void cluster_merge(float* cpart, T* __restrict__ out_rows, int heads,
                                              int used, int splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int i = (int)blockIdx.z * THREADS + (int)threadIdx.x; i < heads * D;
         i += splits * THREADS) {
        const int h = i / D, d = i % D;
        float mx = -INFINITY;
#pragma unroll 8
        for (int z = 0; z < used; ++z) mx = fmaxf(mx, *cluster.map_shared_rank(&cpart[h], z));
        float lsum = 0.f, a = 0.f;
#pragma unroll 8
        for (int z = 0; z < used; ++z) {
            const float* pz = cluster.map_shared_rank(cpart, z);
            const float wt = exp2f(pz[h] - mx);
            lsum += wt * pz[G + h];
            a += wt * pz[2 * G + h * D + d];
        }
        out_rows[h * D + d] = from_f32<T>(lsum > 0.f ? a / lsum : 0.f);
    }
    cluster.sync();
#endif
}

// Finds which sequence and which of its `qt`-token tiles CTA `tile` covers, counting only the
// sequences whose query length is in [qlen_lo, qlen_hi) (the two attention kernels split a batch
// by query length); false if none. `last_first` numbers a sequence's tiles from its end (causal
// prefill: the last tiles see the most keys, so they are started first).
__device__ __forceinline__ bool locate_tile(const uint32_t* __restrict__ query_start, int num_seqs,
                                            int qt, int tile, int qlen_lo, int qlen_hi,
                                            bool last_first, int* seq, int* q_begin) {
    int seen = 0;
    for (int s = 0; s < num_seqs; ++s) {
        const int qlen = (int)(query_start[s + 1] - query_start[s]);
        if (qlen < qlen_lo || qlen >= qlen_hi) continue;
        const int tiles = (qlen + qt - 1) / qt;
        if (tile < seen + tiles) {
            *seq = s;
            *q_begin = (last_first ? tiles - 1 - (tile - seen) : tile - seen) * qt;
            return true;
        }
        seen += tiles;
    }
    return false;
}

// The query token of decode sequence `seq` (one token per sequence) and the keys it sees: row
// `qstart` of the step's tokens, keys 0 .. nkeys - 1 (0 ..= ctx - qlen). False when the sequence
// has no query token or no key: its CTAs write nothing. The decode kernels and their combine
// kernel agree on it.
__device__ __forceinline__ bool decode_query(const uint32_t* __restrict__ query_start,
                                             const uint32_t* __restrict__ context_lens, int seq,
                                             int& qstart, int& nkeys) {
    qstart = (int)query_start[seq];
    const int qlen = (int)query_start[seq + 1] - qstart;
    nkeys = (int)context_lens[seq] - qlen + 1;
    return qlen >= 1 && nkeys >= 1;
}

// Decode partitions (split-KV) are whole multiples of this many keys (paged_decode.cu's chunk).
constexpr int DECODE_PARTITION_KEYS = 32;

// Keys per context partition for a decode query that sees `nkeys` keys, split `splits` ways;
// the decode kernels and their combine kernel agree on it.
__device__ __forceinline__ int decode_partition(int nkeys, int splits) {
    const int per = (nkeys + splits - 1) / splits;
    constexpr int C = DECODE_PARTITION_KEYS;
    return max(C, (per + C - 1) / C * C);
}
