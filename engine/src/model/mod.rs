//! Model architectures and the seam the runner calls: one flattened batch in, logits out.
//!
//! CONTRACT (shared by the runner, the model and the CUDA kernels; change only with all three):
//! - The runner flattens every scheduled sequence's new tokens into one batch (`ForwardBatch`).
//! - `CausalLM::forward` writes the new K/V of every token into the paged cache at
//!   `slot_mapping[i]` (slot = block_id * block_size + offset; -1 = do not write), then attends each
//!   token over its sequence's context (cached tokens + this chunk, causal) through the block table,
//!   and returns f32 logits `[n, vocab]` for the sequences with `compute_logits` (in `seqs` order).
//! - The paged cache tensors live in `KvCache` (one K and one V tensor per layer, shape
//!   `[num_blocks, block_size, num_kv_heads, head_dim]`); the `kv` module only does block accounting.
//! - Tensor parallelism (`tp`): a rank's model is a `LlamaModel` over the rank's shard (its config
//!   has heads, KV heads and intermediate divided by the world size) with its own `KvCache` built
//!   from that config; every rank runs the same `ForwardBatch` (same block tables and slots) and
//!   they meet in the `Collective` after o_proj, after down_proj and for vocab-sharded logits.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod attention_cuda;
pub mod attention_select;
pub mod cache;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
pub mod decode_step;
pub mod fused;
#[cfg(feature = "cuda")]
pub mod fused_cuda;
pub mod gemv;
#[cfg(feature = "cuda")]
pub mod gemv_cuda;
pub mod greedy;
pub mod kernel_modules;
pub mod l2_prefetch;
pub mod llama;
pub mod lm_head;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
pub mod pdl;
#[cfg(feature = "cuda")]
pub mod pdl_capture;
pub mod switch;
pub mod tp;

pub use cache::KvCache;

use crate::config::ModelConfig;
use candle_core::{Device, Result, Tensor};

/// One sequence's slice of a flattened batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqInput {
    /// Index of this sequence's first token in `ForwardBatch::token_ids`.
    pub query_start: usize,
    /// Number of new tokens of this sequence in the batch (1 for decode, a chunk for prefill).
    pub query_len: usize,
    /// Tokens of context after this step: already cached + `query_len`.
    pub context_len: usize,
    /// Physical block ids covering positions `0..context_len` (block_size tokens each).
    pub block_table: Vec<u32>,
    /// Return logits for this sequence's last token in this batch.
    pub compute_logits: bool,
}

/// A whole step's input: tokens of all scheduled sequences, flattened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    /// Absolute position of each token in its sequence.
    pub positions: Vec<u32>,
    /// Cache slot each token's K/V is written to.
    pub slot_mapping: Vec<i64>,
    pub seqs: Vec<SeqInput>,
}

impl ForwardBatch {
    /// One fresh prompt in blocks 0, 1, ... of `block_size` tokens (slots 0..n), logits of its
    /// last token: warm-ups, benchmarks and tests.
    pub fn one_prompt(token_ids: Vec<u32>, block_size: usize) -> Self {
        let table: Vec<u32> = (0..token_ids.len().div_ceil(block_size.max(1)) as u32).collect();
        let mut batch = Self::default();
        batch.push_prompt(&token_ids, &table, block_size);
        batch
    }

    /// Appends a fresh prompt (positions 0..n, logits of its last token) whose tokens go to the
    /// first blocks of `block_table` (at least ceil(n / block_size) of them).
    pub fn push_prompt(&mut self, token_ids: &[u32], block_table: &[u32], block_size: usize) {
        let n = token_ids.len();
        let block_size = block_size.max(1);
        self.seqs.push(SeqInput {
            query_start: self.token_ids.len(),
            query_len: n,
            context_len: n,
            block_table: block_table[..n.div_ceil(block_size)].to_vec(),
            compute_logits: true,
        });
        self.token_ids.extend_from_slice(token_ids);
        self.positions.extend(0..n as u32);
        self.slot_mapping.extend((0..n).map(|p| {
            block_table[p / block_size] as i64 * block_size as i64 + (p % block_size) as i64
        }));
    }
}

/// A decoder-only language model served by the engine.
pub trait CausalLM: Send {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// Paged forward (see the module contract). Returns f32 logits `[n_logits, vocab]`.
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor>;
    /// Plain forward without any cache: causal attention over `tokens` (positions 0..n), f32 logits
    /// for every position `[n, vocab]`. The reference the paged path is tested against.
    fn forward_full(&self, tokens: &[u32]) -> Result<Tensor>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_map_their_tokens_into_their_blocks() {
        let one = ForwardBatch::one_prompt(vec![7, 8, 9, 10, 11], 2);
        assert_eq!(one.slot_mapping, vec![0, 1, 2, 3, 4]);
        assert_eq!(one.seqs[0].block_table, vec![0, 1, 2]);

        let mut batch = ForwardBatch::default();
        batch.push_prompt(&[1, 2, 3], &[5, 2, 9], 2);
        batch.push_prompt(&[4], &[6], 2);
        assert_eq!(batch.token_ids, vec![1, 2, 3, 4]);
        assert_eq!(batch.positions, vec![0, 1, 2, 0]);
        assert_eq!(batch.slot_mapping, vec![10, 11, 4, 12]);
        let starts: Vec<_> = batch.seqs.iter().map(|s| s.query_start).collect();
        assert_eq!(starts, vec![0, 3]);
        // Only the blocks the prompt fills.
        assert_eq!(batch.seqs[0].block_table, vec![5, 2]);
        assert!(batch
            .seqs
            .iter()
            .all(|s| s.compute_logits && s.context_len == s.query_len));
    }
}
