// Helpers shared by the paged-attention kernels (included, not compiled on its own).
#pragma once
#include <stdint.h>

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
