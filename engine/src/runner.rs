//! The model runner: one planned step in, one flattened forward pass, one sampled token per
//! sequence that reached the end of its known tokens out.

use crate::core::{ExecuteError, ModelExecutor};
use crate::model::cache::HostBlocks;
use crate::model::{greedy, CausalLM, ForwardBatch, KvCache, SeqInput};
use crate::sampling::Sampler;
use crate::sched::SchedulerOutput;
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// Flattens every scheduled request's new tokens into one batch: positions continue from each
/// request's computed tokens, each token's cache slot comes from its block table, and logits are
/// asked for only where the scheduler wants a sample.
pub fn build_forward_batch(
    out: &SchedulerOutput,
    block_size: usize,
) -> Result<ForwardBatch, ExecuteError> {
    let mut b = ForwardBatch::default();
    let n = out.total_num_scheduled_tokens;
    b.token_ids.reserve(n);
    b.positions.reserve(n);
    b.slot_mapping.reserve(n);
    for sr in &out.scheduled {
        let start = sr.num_computed_tokens;
        let context_len = start + sr.token_ids.len();
        let blocks_needed = context_len.div_ceil(block_size);
        if sr.block_table.len() < blocks_needed {
            return Err(ExecuteError(format!(
                "request {:?}: block table has {} blocks, {context_len} tokens need {blocks_needed}",
                sr.request_id,
                sr.block_table.len()
            )));
        }
        b.seqs.push(SeqInput {
            query_start: b.token_ids.len(),
            query_len: sr.token_ids.len(),
            context_len,
            block_table: sr.block_table[..blocks_needed].to_vec(),
            compute_logits: sr.sample,
        });
        for (j, &t) in sr.token_ids.iter().enumerate() {
            let pos = start + j;
            let block = sr.block_table[pos / block_size] as i64;
            b.token_ids.push(t);
            b.positions.push(pos as u32);
            b.slot_mapping
                .push(block * block_size as i64 + (pos % block_size) as i64);
        }
    }
    Ok(b)
}

/// Owns the model, its paged cache and the per-request samplers.
pub struct ModelRunner {
    model: Box<dyn CausalLM>,
    cache: KvCache,
    sampler: Sampler,
    /// The CPU swap pool's contents: per CPU block, (K, V) of each layer `[1, bs, kvh, hd]`.
    host_blocks: HashMap<u32, Vec<(Tensor, Tensor)>>,
}

impl ModelRunner {
    pub fn new(model: Box<dyn CausalLM>, cache: KvCache) -> Self {
        Self {
            model,
            cache,
            sampler: Sampler::new(),
            host_blocks: HashMap::new(),
        }
    }

    /// Executes a step's block copies: every swap-out, then every swap-in (a block freed by a
    /// swap-out may be the destination of a swap-in in the same step).
    pub fn swap_blocks(
        &mut self,
        swap_out: &[(u32, u32)],
        swap_in: &[(u32, u32)],
    ) -> Result<(), ExecuteError> {
        let err = |e: candle_core::Error| ExecuteError(format!("KV swap failed: {e}"));
        if !swap_out.is_empty() {
            let gpu: Vec<u32> = swap_out.iter().map(|p| p.0).collect();
            let host = self.cache.swap_out(&gpu).map_err(err)?;
            for (i, &(_, cpu)) in swap_out.iter().enumerate() {
                let layers = host
                    .layers
                    .iter()
                    .map(|(k, v)| Ok((k.narrow(0, i, 1)?, v.narrow(0, i, 1)?)))
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map_err(err)?;
                self.host_blocks.insert(cpu, layers);
            }
        }
        if !swap_in.is_empty() {
            let mut per_block = Vec::with_capacity(swap_in.len());
            for &(cpu, _) in swap_in {
                let b = self.host_blocks.remove(&cpu).ok_or_else(|| {
                    ExecuteError(format!("swap-in of CPU block {cpu}, which holds nothing"))
                })?;
                per_block.push(b);
            }
            let num_layers = self.cache.layers.len();
            let layers = (0..num_layers)
                .map(|l| {
                    let ks: Vec<&Tensor> = per_block.iter().map(|b| &b[l].0).collect();
                    let vs: Vec<&Tensor> = per_block.iter().map(|b| &b[l].1).collect();
                    Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(err)?;
            let gpu: Vec<u32> = swap_in.iter().map(|p| p.1).collect();
            self.cache
                .swap_in(&HostBlocks { layers }, &gpu)
                .map_err(err)?;
        }
        Ok(())
    }

    /// CPU blocks currently holding swapped-out KV.
    pub fn num_host_blocks(&self) -> usize {
        self.host_blocks.len()
    }

    pub fn model(&self) -> &dyn CausalLM {
        self.model.as_ref()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The model and its cache together (benchmarks time the forward alone through these).
    pub fn parts_mut(&mut self) -> (&dyn CausalLM, &mut KvCache) {
        (self.model.as_ref(), &mut self.cache)
    }

    /// Requests with live sampler state (seeded generators).
    pub fn num_sampler_states(&self) -> usize {
        self.sampler.num_generators()
    }
}

impl ModelExecutor for ModelRunner {
    fn kv_bytes_per_block(&self) -> Option<usize> {
        let cfg = self.model.config();
        Some(KvCache::bytes_per_block(
            cfg,
            self.cache.block_size,
            self.cache.dtype(),
        ))
    }

    fn execute(&mut self, out: &SchedulerOutput) -> Result<Vec<Option<u32>>, ExecuteError> {
        for id in &out.finished_req_ids {
            self.sampler.remove(id);
        }
        self.swap_blocks(&out.blocks_to_swap_out, &out.blocks_to_swap_in)?;
        if out.scheduled.is_empty() {
            return Ok(Vec::new());
        }
        let batch = build_forward_batch(out, self.cache.block_size)?;
        let n_logits = batch.seqs.iter().filter(|s| s.compute_logits).count();
        let all_greedy = out
            .scheduled
            .iter()
            .filter(|sr| sr.sample)
            .all(|sr| sr.sampling.is_greedy());
        if n_logits > 0 && all_greedy {
            // Greedy only: argmax on the model's device, so that only the token ids come back
            // (a batch of 128 rows of a 152k vocabulary is 78 MB of f32 logits otherwise).
            let ids = self
                .model
                .forward(&batch, &mut self.cache)
                .and_then(|t| greedy::greedy_tokens(&t))
                .map_err(|e| ExecuteError(e.to_string()))?;
            if ids.len() != n_logits {
                return Err(ExecuteError(format!(
                    "model returned {} logit rows for {n_logits} sequences",
                    ids.len()
                )));
            }
            let mut ids = ids.into_iter();
            return Ok(out
                .scheduled
                .iter()
                .map(|sr| sr.sample.then(|| ids.next().expect("counted above")))
                .collect());
        }
        let rows: Vec<Vec<f32>> = if n_logits == 0 {
            // Nothing to sample (all mid-prefill chunks): still write the cache.
            self.model
                .forward(&batch, &mut self.cache)
                .map_err(|e| ExecuteError(e.to_string()))?;
            Vec::new()
        } else {
            self.model
                .forward(&batch, &mut self.cache)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(|e| ExecuteError(e.to_string()))?
        };
        if rows.len() != n_logits {
            return Err(ExecuteError(format!(
                "model returned {} logit rows for {n_logits} sequences",
                rows.len()
            )));
        }
        let mut rows = rows.into_iter();
        Ok(out
            .scheduled
            .iter()
            .map(|sr| {
                sr.sample.then(|| {
                    let row = rows.next().expect("counted above");
                    self.sampler.sample(&sr.request_id, &row, &sr.sampling)
                })
            })
            .collect())
    }
}
