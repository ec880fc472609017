//! Tensor parallelism (Megatron-style): the collective seam, and sharding HF weights per rank.
//!
//! A rank holds `1/N` of the attention heads (query and KV heads, by contiguous head groups) and
//! of the MLP intermediate: q/k/v and gate/up are column-parallel (split by output rows), o_proj
//! and down_proj row-parallel (split by input columns) and followed by an all-reduce sum.
//! Embeddings and norms are replicated; lm_head is split by vocab rows when the vocab divides
//! (logits all-gathered), replicated otherwise. A rank's model is an ordinary `LlamaModel` built
//! from a per-rank `ModelConfig` (heads/N, kv heads/N, intermediate/N; vocab and hidden full) and
//! a `ShardedSource` that narrows each full tensor; it keeps its own `KvCache` from that config.

use std::fmt::Debug;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::{bail, DType, Device, Result, Tensor, D};

use super::llama::LlamaModel;
use crate::config::{ConfigError, ModelConfig};
use crate::weights::{LoadError, WeightSource};

/// Communication between the ranks of one tensor-parallel group. Every rank must make the same
/// calls in the same order (the model guarantees it when all ranks get the same batches).
pub trait Collective: Send + Sync + Debug {
    /// Element-wise sum of `t` over all ranks; every rank gets the same result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Concatenation of every rank's `t` along the last dim, in rank order.
    fn all_gather_last_dim(&self, t: &Tensor) -> Result<Tensor>;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
}

/// World size 1: every collective is the identity (what the engine uses without TP).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather_last_dim(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
}

#[derive(Debug)]
struct CpuShared {
    barrier: Barrier,
    slots: Mutex<Vec<Option<Tensor>>>,
}

/// N ranks as N threads of one process, exchanging tensors through shared memory. A rank that
/// fails before a collective leaves the others waiting at the barrier: test/reference use only.
#[derive(Debug, Clone)]
pub struct CpuCollective {
    rank: usize,
    world_size: usize,
    shared: Arc<CpuShared>,
}

impl CpuCollective {
    /// One handle per rank (index = rank); give each to its own thread.
    pub fn group(world_size: usize) -> Vec<CpuCollective> {
        let world_size = world_size.max(1);
        let shared = Arc::new(CpuShared {
            barrier: Barrier::new(world_size),
            slots: Mutex::new(vec![None; world_size]),
        });
        (0..world_size)
            .map(|rank| CpuCollective {
                rank,
                world_size,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `t`, in rank order.
    fn exchange(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let lock = || {
            self.shared
                .slots
                .lock()
                .map_err(|_| candle_core::Error::Msg("CpuCollective: poisoned lock".into()))
        };
        lock()?[self.rank] = Some(t.clone());
        self.shared.barrier.wait();
        let all: Option<Vec<Tensor>> = lock()?.iter().cloned().collect();
        // Nobody writes the next call's slot before every rank has read this one.
        self.shared.barrier.wait();
        lock()?[self.rank] = None;
        all.ok_or_else(|| candle_core::Error::Msg("CpuCollective: missing rank tensor".into()))
    }
}

impl Collective for CpuCollective {
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.exchange(t)?;
        // f32, rank order: every rank computes the bit-identical sum.
        let mut acc = all[0].to_device(t.device())?.to_dtype(DType::F32)?;
        for x in &all[1..] {
            acc = (acc + x.to_device(t.device())?.to_dtype(DType::F32)?)?;
        }
        acc.to_dtype(t.dtype())
    }
    fn all_gather_last_dim(&self, t: &Tensor) -> Result<Tensor> {
        let all = self
            .exchange(t)?
            .iter()
            .map(|x| x.to_device(t.device()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&all, D::Minus1)
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
}

/// This rank's lm_head rows `(start, len)` when the vocab is split (world > 1 and it divides),
/// `None` when lm_head is replicated.
pub fn vocab_shard(vocab_size: usize, rank: usize, world_size: usize) -> Option<(usize, usize)> {
    if world_size <= 1 || !vocab_size.is_multiple_of(world_size) {
        return None;
    }
    let len = vocab_size / world_size;
    Some((rank * len, len))
}

/// The config one rank's model is built from: heads, KV heads and intermediate divided by
/// `world_size`; everything else (hidden, head_dim, vocab, layers) unchanged.
pub fn rank_config(
    cfg: &ModelConfig,
    world_size: usize,
) -> std::result::Result<ModelConfig, LoadError> {
    let invalid = |m: String| Err(LoadError::Config(ConfigError::Invalid(m)));
    let (heads, kvh, inter) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    );
    if world_size == 0 {
        return invalid("tensor parallel size must be at least 1".into());
    }
    if kvh < world_size {
        return invalid(format!(
            "tensor parallel size {world_size} exceeds num_key_value_heads {kvh} \
             (replicating KV heads across ranks is not supported)"
        ));
    }
    if heads % world_size != 0 || kvh % world_size != 0 {
        return invalid(format!(
            "num_attention_heads {heads} and num_key_value_heads {kvh} must both be divisible \
             by tensor parallel size {world_size}"
        ));
    }
    if inter % world_size != 0 {
        return invalid(format!(
            "intermediate_size {inter} must be divisible by tensor parallel size {world_size}"
        ));
    }
    Ok(ModelConfig {
        num_attention_heads: heads / world_size,
        num_key_value_heads: kvh / world_size,
        intermediate_size: inter / world_size,
        ..cfg.clone()
    })
}

/// How a full tensor is split: along `dim`, each `(start, len)` part of it is cut into
/// `world_size` equal pieces; a rank's shard is its piece of every part, concatenated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub full_shape: Vec<usize>,
    pub dim: usize,
    pub parts: Vec<(usize, usize)>,
}

/// The split of an HF-named weight under the full config `cfg`; `None` = replicated.
pub fn split_for(cfg: &ModelConfig, name: &str, world_size: usize) -> Option<Split> {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let split = |full_shape: Vec<usize>, dim, parts| {
        Some(Split {
            full_shape,
            dim,
            parts,
        })
    };
    if name == "lm_head.weight" {
        vocab_shard(cfg.vocab_size, 0, world_size)?;
        let v = cfg.vocab_size;
        return split(vec![v, h], 0, vec![(0, v)]);
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (_, suffix) = rest.split_once('.')?;
    let (param, is_bias) = match suffix.strip_suffix(".weight") {
        Some(p) => (p, false),
        None => (suffix.strip_suffix(".bias")?, true),
    };
    // Column-parallel: output rows (dim 0); biases are 1-D and split the same way.
    let rows = |n: usize, parts: Vec<(usize, usize)>| {
        split(if is_bias { vec![n] } else { vec![n, h] }, 0, parts)
    };
    match param {
        "self_attn.q_proj" => rows(q, vec![(0, q)]),
        "self_attn.k_proj" | "self_attn.v_proj" => rows(kv, vec![(0, kv)]),
        "self_attn.qkv_proj" => rows(q + 2 * kv, vec![(0, q), (q, kv), (q + kv, kv)]),
        "mlp.gate_proj" | "mlp.up_proj" if !is_bias => rows(inter, vec![(0, inter)]),
        "mlp.gate_up_proj" if !is_bias => rows(2 * inter, vec![(0, inter), (inter, inter)]),
        // Row-parallel: input columns (dim 1).
        "self_attn.o_proj" if !is_bias => split(vec![h, q], 1, vec![(0, q)]),
        "mlp.down_proj" if !is_bias => split(vec![h, inter], 1, vec![(0, inter)]),
        _ => None,
    }
}

/// Rank `rank`'s shard of `full` under `split` (a fresh tensor, not a view of `full`).
pub fn shard_tensor(
    full: &Tensor,
    split: &Split,
    rank: usize,
    world_size: usize,
) -> Result<Tensor> {
    if rank >= world_size {
        bail!("rank {rank} out of tensor parallel size {world_size}");
    }
    let pieces = split
        .parts
        .iter()
        .map(|&(start, len)| {
            if len % world_size != 0 {
                bail!("part of {len} rows/columns not divisible by {world_size} ranks");
            }
            let n = len / world_size;
            full.narrow(split.dim, start + rank * n, n)
        })
        .collect::<Result<Vec<_>>>()?;
    match pieces.as_slice() {
        [one] => one.force_contiguous(),
        _ => Tensor::cat(&pieces, split.dim),
    }
}

/// Presents one rank's shards of a full HF-named weight set. The shapes asked for are the rank
/// config's; the inner source is asked for the full tensors (it may deliver them on the CPU: the
/// shard is moved to `device`, so only the rank's part reaches the device).
pub struct ShardedSource<'a> {
    inner: &'a mut dyn WeightSource,
    full: ModelConfig,
    rank: usize,
    world_size: usize,
    device: Device,
}

impl<'a> ShardedSource<'a> {
    pub fn new(
        inner: &'a mut dyn WeightSource,
        full: &ModelConfig,
        rank: usize,
        world_size: usize,
        device: &Device,
    ) -> Self {
        Self {
            inner,
            full: full.clone(),
            rank,
            world_size,
            device: device.clone(),
        }
    }
}

impl WeightSource for ShardedSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> std::result::Result<Tensor, LoadError> {
        let t = match split_for(&self.full, name, self.world_size) {
            None => self.inner.get(name, shape)?,
            Some(split) => {
                let full = self.inner.get(name, &split.full_shape)?;
                shard_tensor(&full, &split, self.rank, self.world_size)?
            }
        };
        if t.dims() != shape {
            return Err(LoadError::Shape {
                name: format!("{name} (rank {} of {})", self.rank, self.world_size),
                found: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t.to_device(&self.device)?)
    }
}

/// Build the model of rank `tp.rank()` from the full config and a source of full HF-named
/// weights. Phi-3's pre-fused qkv_proj / gate_up_proj are narrowed part by part. World size 1
/// loads the full weights as they come (no shard copies).
pub fn load_rank(
    full: &ModelConfig,
    src: &mut dyn WeightSource,
    dtype: DType,
    device: &Device,
    tp: Arc<dyn Collective>,
) -> std::result::Result<LlamaModel, LoadError> {
    let (rank, world) = (tp.rank(), tp.world_size());
    if rank >= world {
        return Err(LoadError::Layout(format!(
            "rank {rank} out of tensor parallel size {world}"
        )));
    }
    if world == 1 {
        return LlamaModel::load_with_collective(full, src, dtype, device, tp);
    }
    let cfg = rank_config(full, world)?;
    let mut sharded = ShardedSource::new(src, full, rank, world, device);
    LlamaModel::load_with_collective(&cfg, &mut sharded, dtype, device, tp)
}

#[cfg(test)]
#[path = "tp_tests.rs"]
mod tests;
