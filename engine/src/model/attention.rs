//! Paged attention and KV-cache writes as candle custom ops; the CPU versions are the reference.
//!
//! CONTRACT (the CPU ops here and the CUDA kernels in `attention_cuda.rs` implement the same math):
//! - `write_kv_cache(k, v, key_cache, value_cache, slot_mapping)`: k, v `[n, num_kv_heads, head_dim]`;
//!   caches `[num_blocks, block_size, num_kv_heads, head_dim]` (same dtype as k/v), written IN PLACE:
//!   token i goes to block `slot/block_size`, offset `slot%block_size`; slot -1 is skipped.
//! - `paged_attention(q, key_cache, value_cache, meta, scale)`: q `[n, num_heads, head_dim]` ->
//!   out `[n, num_heads, head_dim]`. GQA: head h reads kv head `h / (num_heads/num_kv_heads)`.
//!   Token j (0-based within its sequence's chunk) of sequence s attends causally to context
//!   positions `0 ..= context_len[s] - query_len[s] + j`, read through `block_tables[s]`.
//!   Softmax accumulates in f32 whatever the storage dtype.
//! - `AttentionMetadata` tensors live on the model's device: `block_tables` u32 `[num_seqs,
//!   max_blocks_per_seq]` (padded with 0), `context_lens` u32 `[num_seqs]`, `query_start_loc` u32
//!   `[num_seqs + 1]` (prefix sums of query_len).
