//! Llama-family decoder (Llama, Qwen2 with QKV bias, Phi-3 with fused projections) on candle ops.
//!
//! Weights use the Hugging Face layout and rotary convention ("rotate_half" over the two halves of
//! each head); loaders convert other layouts (llama.cpp's permuted Q/K) before they get here.
//! Matmuls run in the compute dtype; RMSNorm statistics and softmax run in f32. The LM head runs
//! in f32 (its weight is kept in f32): bf16 logits carry 8 mantissa bits, so close candidates
//! round to the same value and greedy decoding would depend on how argmax breaks ties.

use std::sync::Arc;

use candle_core::{bail, DType, Device, Module, Result, Tensor};

use super::attention::{paged_attention_warming, AttentionMetadata, L2Range};
use super::fused;
use super::gemv;
use super::tp::{vocab_shard, Collective, SingleRank};
use super::{CausalLM, ForwardBatch, KvCache};
use crate::config::{Architecture, ModelConfig};
use crate::weights::{LoadError, WeightSource};

/// y = x W^T (+ b), W `[out, in]`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// x W^T without the bias: the skinny-matmul kernel for a few rows on CUDA, else (and
    /// always on the CPU) candle's matmul.
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        gemv::matmul_t(x, &self.weight)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.matmul(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    /// Fused [q; k; v] projection.
    qkv_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: Tensor,
    /// Fused [gate; up] projection.
    gate_up_proj: Linear,
    down_proj: Linear,
}

/// A loaded Llama-family model (or one tensor-parallel rank of it, see `tp`).
#[derive(Debug)]
pub struct LlamaModel {
    /// For a tensor-parallel rank: the rank's config (heads and intermediate divided).
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// Tensor-parallel group; all-reduce after o_proj/down_proj only when world size > 1.
    tp: Arc<dyn Collective>,
    /// lm_head holds this rank's vocab rows: logits are all-gathered over the last dim.
    lm_head_sharded: bool,
    /// Rotary tables `[max_position_embeddings, head_dim / 2]` in the compute dtype.
    cos: Tensor,
    sin: Tensor,
    /// Captured decode steps (a CUDA device without tensor parallelism).
    #[cfg(feature = "cuda")]
    graphs: Option<std::sync::Mutex<super::cuda_graph::DecodeGraphs>>,
    /// The stream of the L2 prefetch (`l2_prefetch`), made on first use.
    #[cfg(feature = "cuda")]
    side: super::l2_prefetch::SideStream,
}

fn shape_err(e: candle_core::Error) -> LoadError {
    LoadError::Tensor(e)
}

impl LlamaModel {
    /// Build the model from HF-named weights (already in `dtype` on `device`).
    pub fn load(
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        Self::load_with_collective(cfg, src, dtype, device, Arc::new(SingleRank))
    }

    /// `load` for one tensor-parallel rank: `cfg` is the rank's config and `src` delivers the
    /// rank's shards (see `tp::load_rank`); with world size 1 this is exactly `load`.
    pub fn load_with_collective(
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
        tp: Arc<dyn Collective>,
    ) -> std::result::Result<Self, LoadError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let inter = cfg.intermediate_size;
        let embed_tokens = src.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (qkv, gate_up) = if cfg.architecture == Architecture::Phi3 {
                (
                    src.get(
                        &format!("{p}.self_attn.qkv_proj.weight"),
                        &[q_out + 2 * kv_out, h],
                    )?,
                    src.get(&format!("{p}.mlp.gate_up_proj.weight"), &[2 * inter, h])?,
                )
            } else {
                let q = src.get(&format!("{p}.self_attn.q_proj.weight"), &[q_out, h])?;
                let k = src.get(&format!("{p}.self_attn.k_proj.weight"), &[kv_out, h])?;
                let v = src.get(&format!("{p}.self_attn.v_proj.weight"), &[kv_out, h])?;
                let gate = src.get(&format!("{p}.mlp.gate_proj.weight"), &[inter, h])?;
                let up = src.get(&format!("{p}.mlp.up_proj.weight"), &[inter, h])?;
                (
                    Tensor::cat(&[q, k, v], 0).map_err(shape_err)?,
                    Tensor::cat(&[gate, up], 0).map_err(shape_err)?,
                )
            };
            let qkv_bias = if cfg.attention_bias {
                let q = src.get(&format!("{p}.self_attn.q_proj.bias"), &[q_out])?;
                let k = src.get(&format!("{p}.self_attn.k_proj.bias"), &[kv_out])?;
                let v = src.get(&format!("{p}.self_attn.v_proj.bias"), &[kv_out])?;
                Some(Tensor::cat(&[q, k, v], 0).map_err(shape_err)?)
            } else {
                None
            };
            layers.push(Layer {
                input_layernorm: src.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv_proj: Linear::new(qkv, qkv_bias),
                o_proj: Linear::new(
                    src.get(&format!("{p}.self_attn.o_proj.weight"), &[h, q_out])?,
                    None,
                ),
                post_attention_layernorm: src
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up_proj: Linear::new(gate_up, None),
                down_proj: Linear::new(
                    src.get(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?,
                    None,
                ),
            });
        }
        let norm = src.get("model.norm.weight", &[h])?;
        let shard = vocab_shard(cfg.vocab_size, tp.rank(), tp.world_size());
        let lm_head = match (cfg.tie_word_embeddings, shard) {
            (true, None) => embed_tokens.clone(),
            (true, Some((start, len))) => embed_tokens.narrow(0, start, len)?,
            (false, None) => src.get("lm_head.weight", &[cfg.vocab_size, h])?,
            (false, Some((_, len))) => src.get("lm_head.weight", &[len, h])?,
        };
        let (cos, sin) = rotary_tables(cfg, dtype, device).map_err(shape_err)?;
        #[cfg(feature = "cuda")]
        let graphs = (device.is_cuda() && tp.world_size() == 1)
            .then(|| std::sync::Mutex::new(super::cuda_graph::DecodeGraphs::default()));
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            dtype,
            embed_tokens,
            layers,
            norm,
            lm_head: Linear::new(
                lm_head
                    .to_dtype(super::lm_head::storage_dtype(dtype, device.is_cuda()))
                    .map_err(shape_err)?,
                None,
            ),
            tp,
            lm_head_sharded: shard.is_some(),
            cos,
            sin,
            #[cfg(feature = "cuda")]
            graphs,
            #[cfg(feature = "cuda")]
            side: Default::default(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sum a row-parallel layer's partial outputs over the ranks (nothing at world size 1).
    fn all_reduce(&self, x: Tensor) -> Result<Tensor> {
        if self.tp.world_size() > 1 {
            self.tp.all_reduce_sum(&x)
        } else {
            Ok(x)
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, w, self.cfg.rms_norm_eps as f32)
    }

    /// q/k/v for `n` tokens with rotary applied: q `[n, heads, hd]`, k/v `[n, kvh, hd]`.
    fn qkv(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (heads, kvh, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        fused::split_rope(&layer.qkv_proj.forward(x)?, cos, sin, heads, kvh, hd)
    }

    /// down(silu(gate) * up) of normed rows `x`.
    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        let act = match &layer.gate_up_proj.bias {
            None => gemv::gate_up_silu(x, &layer.gate_up_proj.weight, self.cfg.intermediate_size)?,
            Some(_) => self.biased_mlp_act(layer, x)?,
        };
        self.mlp_down(layer, &act)
    }

    /// The MLP's activation silu(gate) * up of `post_attention_layernorm(residual + attn)`, and
    /// that sum (the next residual): through the gate/up projection's folded RMSNorm and
    /// SiLU-gate epilogue where they fit (the unfused candle ops on the CPU).
    fn add_norm_mlp_act(
        &self,
        layer: &Layer,
        attn: &Tensor,
        residual: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let norm_w = &layer.post_attention_layernorm;
        match &layer.gate_up_proj.bias {
            None => {
                let (w, inter) = (&layer.gate_up_proj.weight, self.cfg.intermediate_size);
                gemv::add_rms_norm_gate_up_silu(attn, residual, norm_w, eps, w, inter)
            }
            Some(_) => {
                let (h, sum) = fused::add_rms_norm(attn, residual, norm_w, eps)?;
                Ok((self.biased_mlp_act(layer, &h)?, sum))
            }
        }
    }

    /// silu(gate) * up of a gate/up projection with a bias (no epilogue takes the bias).
    fn biased_mlp_act(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        fused::silu_mul(&layer.gate_up_proj.forward(x)?, self.cfg.intermediate_size)
    }

    /// The down projection of the MLP's activation, summed over the tensor-parallel ranks.
    fn mlp_down(&self, layer: &Layer, act: &Tensor) -> Result<Tensor> {
        self.all_reduce(layer.down_proj.forward(act)?)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(t) = tokens.iter().find(|t| **t as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {t} out of the vocabulary ({})",
                self.cfg.vocab_size
            );
        }
        Ok(())
    }

    /// f32 logits of residual-stream rows `x` (final norm, LM head).
    pub(super) fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.rms_norm(x, &self.norm)?;
        let logits = super::lm_head::logits(&x, &self.lm_head.weight)?;
        let logits = if self.lm_head_sharded {
            self.tp.all_gather_last_dim(&logits)?
        } else {
            logits
        };
        logits.to_dtype(DType::F32)
    }

    /// Causal attention over the whole sequence without a cache, in f32 softmax.
    fn dense_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let n = q.dim(0)?;
        let (heads, kvh, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let group = heads / kvh;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            // [n, kvh, hd] -> [heads, n, hd]
            t.transpose(0, 1)?
                .unsqueeze(1)?
                .expand((kvh, group, n, hd))?
                .reshape((heads, n, hd))
        };
        let q = q.transpose(0, 1)?.contiguous()?;
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, n, n), &self.device)?;
        let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        p.to_dtype(self.dtype)?
            .matmul(&v)?
            .transpose(0, 1)?
            .reshape((n, heads * hd))
    }
}

/// Bytes of weights a short decode attention fetches into L2 for the projections after it.
const WARM_L2_BYTES: usize = 24 << 20;

impl LlamaModel {
    /// What the attention of `layer` fetches into L2 (where its launch is short): the o
    /// projection, then the gate and up rows the gate/up projection reads first (row i of both
    /// halves together), `WARM_L2_BYTES` in all.
    fn warm_after_attention(layer: &Layer) -> Result<Vec<L2Range<'_>>> {
        let (o, gu) = (&layer.o_proj.weight, &layer.gate_up_proj.weight);
        let mut warm = vec![L2Range {
            tensor: o,
            offset: 0,
            len: o.elem_count(),
        }];
        let (rows2, k) = gu.dims2()?;
        let left = WARM_L2_BYTES.saturating_sub(o.elem_count() * o.dtype().size_in_bytes());
        let rows = (left / (2 * k * gu.dtype().size_in_bytes()).max(1)).min(rows2 / 2);
        if rows > 0 {
            for half in [0, rows2 / 2] {
                warm.push(L2Range {
                    tensor: gu,
                    offset: half * k,
                    len: rows * k,
                });
            }
        }
        Ok(warm)
    }

    /// The paged forward's layers over inputs already on the device: writes every token's K/V
    /// and returns the final residual stream `[n, hidden]` (before the final norm). Uploads
    /// nothing itself, so a CUDA graph can capture it.
    pub(super) fn hidden_states(&self, inputs: &StepInputs, cache: &KvCache) -> Result<Tensor> {
        let (meta, slots) = (&inputs.meta, &inputs.slot_mapping);
        let n = inputs.token_ids.dim(0)?;
        let cos = self.cos.index_select(&inputs.positions, 0)?;
        let sin = self.sin.index_select(&inputs.positions, 0)?;
        let (heads, kvh, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        let eps = self.cfg.rms_norm_eps as f32;
        // Fused ops (the unfused candle ops on the CPU): each residual add runs with the norm
        // after it (`fused::add_rms_norm`, or folded into the q/k/v or gate/up projection
        // that follows when `gemv::set_gemv_norm_fold` is on and that one takes its fused
        // one-row kernel); the QKV bias and rotary with the cache write, in the q/k/v
        // projection's epilogue; the SiLU-gate product in the gate/up projection's. A short
        // decode attention also fetches the next projections' first weights into L2, and with
        // `l2_prefetch` on, a side stream fetches part of each layer's o, gate/up and down rows.
        let mut x = self.embed_tokens.index_select(&inputs.token_ids, 0)?;
        #[cfg(feature = "cuda")]
        if let Some(out) = self.persistent_step(inputs, cache, &x, &cos, &sin)? {
            return Ok(out);
        }
        // The layer before's MLP output, not yet added to the residual stream x: the next q/k/v
        // projection adds it and normalises the sum.
        let mut mlp: Option<Tensor> = None;
        #[cfg(feature = "cuda")]
        let prefetch = super::l2_prefetch::l2_prefetch()
            .filter(|_| self.device.is_cuda() && n <= gemv::MAX_ROWS);
        // Whether this forward forked the prefetch's side stream (to be joined at the end).
        #[cfg(feature = "cuda")]
        let mut forked = false;
        for (layer, (kc, vc)) in self.layers.iter().zip(&cache.layers) {
            #[cfg(feature = "cuda")]
            if let Some(p) = prefetch {
                let mats = [
                    (&layer.o_proj.weight, p.o),
                    (&layer.gate_up_proj.weight, p.gate_up),
                    (&layer.down_proj.weight, p.down),
                ];
                forked |=
                    super::l2_prefetch::prefetch_rows(&self.side, &self.device, &mats, p.ctas)?;
            }
            let rope = fused::RopeCache {
                bias: layer.qkv_proj.bias.as_ref(),
                cos: &cos,
                sin: &sin,
                key_cache: kc,
                value_cache: vc,
                slot_mapping: slots,
                num_heads: heads,
                num_kv_heads: kvh,
                head_dim: hd,
            };
            let (w, norm_w) = (&layer.qkv_proj.weight, &layer.input_layernorm);
            let q = match mlp.take() {
                // The first layer: nothing to add.
                None => fused::qkv_proj_rope_cache(&self.rms_norm(&x, norm_w)?, w, &rope)?,
                Some(out) => {
                    let (q, sum) =
                        fused::add_rms_norm_qkv_proj_rope_cache(&out, &x, norm_w, eps, w, &rope)?;
                    x = sum;
                    q
                }
            };
            let warm = Self::warm_after_attention(layer)?;
            let attn = paged_attention_warming(&q, kc, vc, meta, scale, &warm)?
                .reshape((n, heads * hd))?;
            let attn = self.all_reduce(layer.o_proj.forward(&attn)?)?;
            let (act, sum) = self.add_norm_mlp_act(layer, &attn, &x, eps)?;
            x = sum;
            mlp = Some(self.mlp_down(layer, &act)?);
        }
        #[cfg(feature = "cuda")]
        if forked {
            super::l2_prefetch::join(&self.side, &self.device)?;
        }
        // The last layer's MLP output.
        match mlp {
            Some(out) => x + out,
            None => Ok(x),
        }
    }
}

#[cfg(feature = "cuda")]
impl LlamaModel {
    /// The final residual stream of a one-token step of one sequence through the persistent
    /// decode kernel (`decode_step`), or None where it does not apply: switched off, tensor
    /// parallel, a dtype other than bf16/f16, the unfused ops, a gate/up bias, more than one
    /// sequence or token, or a shape the kernel cannot take.
    fn persistent_step(
        &self,
        inputs: &StepInputs,
        cache: &KvCache,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Option<Tensor>> {
        use super::decode_step::{self as ds, LayerRefs, StepRefs, StepShape};
        let meta = &inputs.meta;
        let applies = ds::persistent_decode()
            && self.device.is_cuda()
            && self.tp.world_size() == 1
            && matches!(self.dtype, DType::BF16 | DType::F16)
            && fused::fused_kernels()
            && x.dim(0)? == 1
            && meta.host.block_tables.len() == 1
            && meta.max_query_len == 1
            && self.layers.iter().all(|l| l.gate_up_proj.bias.is_none());
        if !applies {
            return Ok(None);
        }
        let shape = StepShape {
            hidden: self.cfg.hidden_size,
            intermediate: self.cfg.intermediate_size,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            layers: self.layers.len(),
            max_blocks: meta.block_tables.dim(1)?,
            block_size: cache.block_size,
            ctas: ds::ctas(x)?,
        };
        if shape.unsupported().is_some() {
            return Ok(None);
        }
        let layers: Vec<LayerRefs> = self
            .layers
            .iter()
            .zip(&cache.layers)
            .map(|(l, (k, v))| LayerRefs {
                qkv_w: &l.qkv_proj.weight,
                qkv_b: l.qkv_proj.bias.as_ref(),
                input_norm: &l.input_layernorm,
                o_w: &l.o_proj.weight,
                post_norm: &l.post_attention_layernorm,
                gate_up_w: &l.gate_up_proj.weight,
                down_w: &l.down_proj.weight,
                k_cache: k,
                v_cache: v,
            })
            .collect();
        let step = StepRefs {
            x,
            cos,
            sin,
            slot_mapping: &inputs.slot_mapping,
            block_tables: &meta.block_tables,
            context_lens: &meta.context_lens,
            eps: self.cfg.rms_norm_eps as f32,
            scale: 1.0 / (self.cfg.head_dim as f32).sqrt(),
            num_slots: cache.num_blocks * cache.block_size,
        };
        ds::run(&step, &layers, &shape).map(Some)
    }
}

/// One paged step's inputs on the model's device.
#[derive(Debug)]
pub(super) struct StepInputs {
    /// u32 `[n]`.
    pub token_ids: Tensor,
    /// u32 `[n]`.
    pub positions: Tensor,
    /// i64 `[n]`.
    pub slot_mapping: Tensor,
    pub meta: AttentionMetadata,
}

impl StepInputs {
    /// Copies a batch's host data to `device`.
    fn upload(batch: &ForwardBatch, device: &Device) -> Result<Self> {
        let meta = AttentionMetadata::new(&batch.seqs, device)?;
        Ok(Self {
            token_ids: Tensor::new(batch.token_ids.as_slice(), device)?,
            positions: Tensor::new(batch.positions.as_slice(), device)?,
            slot_mapping: Tensor::new(batch.slot_mapping.as_slice(), device)?,
            meta,
        })
    }
}

/// cos/sin of `position * theta^(-2i/head_dim)`, `[max_position_embeddings, head_dim / 2]`.
fn rotary_tables(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let max_pos = cfg.max_position_embeddings.max(1);
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64) as f32)
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, max_pos as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_pos, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

impl CausalLM for LlamaModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let n = batch.token_ids.len();
        if n == 0 || batch.positions.len() != n || batch.slot_mapping.len() != n {
            bail!(
                "forward: {} tokens, {} positions, {} slots",
                n,
                batch.positions.len(),
                batch.slot_mapping.len()
            );
        }
        if cache.layers.len() != self.layers.len() {
            bail!(
                "KV cache has {} layers, model {}",
                cache.layers.len(),
                self.layers.len()
            );
        }
        self.check_tokens(&batch.token_ids)?;
        if let Some(p) = batch
            .positions
            .iter()
            .find(|p| **p as usize >= self.cfg.max_position_embeddings)
        {
            bail!(
                "position {p} past max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        #[cfg(feature = "cuda")]
        if let Some(graphs) = self
            .graphs
            .as_ref()
            .filter(|_| super::cuda_graph::cuda_graphs_enabled())
        {
            let mut graphs = graphs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(logits) = graphs.run(self, batch, cache)? {
                return Ok(logits);
            }
        }
        let inputs = StepInputs::upload(batch, &self.device)?;
        // Every token's K/V is written here even when no sequence wants logits (a mid-prompt
        // chunk).
        let x = self.hidden_states(&inputs, cache)?;
        let last: Vec<u32> = batch
            .seqs
            .iter()
            .filter(|s| s.compute_logits)
            .map(|s| (s.query_start + s.query_len - 1) as u32)
            .collect();
        if last.is_empty() {
            return Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device);
        }
        let idx = Tensor::new(last.as_slice(), &self.device)?;
        self.logits(&x.index_select(&idx, 0)?)
    }

    fn forward_full(&self, tokens: &[u32]) -> Result<Tensor> {
        let n = tokens.len();
        if n == 0 || n > self.cfg.max_position_embeddings {
            bail!(
                "forward_full: {n} tokens (max {})",
                self.cfg.max_position_embeddings
            );
        }
        self.check_tokens(tokens)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let cos = self.cos.narrow(0, 0, n)?;
        let sin = self.sin.narrow(0, 0, n)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        for layer in &self.layers {
            let h = self.rms_norm(&x, &layer.input_layernorm)?;
            let (q, k, v) = self.qkv(layer, &h, &cos, &sin)?;
            let attn = self.dense_attention(&q, &k, &v)?;
            x = (x + self.all_reduce(layer.o_proj.forward(&attn)?)?)?;
            let h = self.rms_norm(&x, &layer.post_attention_layernorm)?;
            x = (&x + self.mlp(layer, &h)?)?;
        }
        self.logits(&x)
    }
}
