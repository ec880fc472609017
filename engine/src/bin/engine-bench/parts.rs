//! The forward's parts timed alone over every layer: the four projections, the LM head, attention
//! and the fused elementwise ops, for a prefill or a decode step.

use super::timing::{host_ms, median};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use engine::config::ModelConfig;
use engine::model::attention::{paged_attention, AttentionMetadata};
use engine::model::{ForwardBatch, KvCache};

/// How a part is timed: `f` runs once per call and the timer returns its milliseconds.
pub type Timer<'a> = &'a mut dyn FnMut(&mut dyn FnMut() -> Result<()>) -> Result<f64>;

/// Distinct weight sets cycled over the layers: enough bytes that no layer's weights are still
/// in the L2 cache when it comes round again (decode reads them from HBM, as the model does).
const WEIGHT_BYTES_PER_PASS: usize = 512 << 20;

/// Milliseconds of the four projections (qkv, o, gate_up, down: x W^T through
/// `gemv::matmul_t`, as the model runs them) for `n` tokens over every layer.
pub fn matmuls_ms(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    n: usize,
    reps: usize,
    time: Timer,
) -> Result<f64> {
    projections_ms(device, dtype, cfg, n, reps, time, &[0, 1, 2, 3], None)
}

/// The four projections' names, in `projection_shapes` order.
pub const PROJECTIONS: [&str; 4] = ["qkv", "o", "gate_up", "down"];

/// `(in, out)` of the qkv, o, gate_up and down projections.
pub(crate) fn projection_shapes(cfg: &ModelConfig) -> [(usize, usize); 4] {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let q_out = cfg.num_attention_heads * hd;
    let qkv_out = q_out + 2 * cfg.num_key_value_heads * hd;
    [(h, qkv_out), (q_out, h), (h, 2 * inter), (inter, h)]
}

/// FLOPs of the four projections over every layer at `n` rows.
pub fn projection_flops(cfg: &ModelConfig, n: usize) -> f64 {
    let per_row: usize = projection_shapes(cfg).iter().map(|(k, o)| k * o).sum();
    2.0 * (n * per_row * cfg.num_hidden_layers) as f64
}

/// TFLOP/s of each projection alone over every layer at `n` rows (`PROJECTIONS` order).
pub fn projection_tflops(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    n: usize,
    reps: usize,
    time: Timer,
) -> Result<[f64; 4]> {
    let shapes = projection_shapes(cfg);
    let mut out = [0.0; 4];
    for (i, (k, o)) in shapes.iter().enumerate() {
        let ms = projections_ms(device, dtype, cfg, n, reps, time, &[i], None)?;
        let flops = 2.0 * (n * k * o * cfg.num_hidden_layers) as f64;
        out[i] = flops / (ms * 1e-3) / 1e12;
    }
    Ok(out)
}

/// Microseconds per launch of each projection alone at `n` rows (`PROJECTIONS` order), launched
/// once per layer back to back: (weights from HBM: distinct weight sets cycled as in
/// `matmuls_ms`; weights from L2: one set every time, which stays in L2 where it fits).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn projections_hbm_l2_us(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    n: usize,
    reps: usize,
    time: Timer,
) -> Result<[(f64, f64); 4]> {
    let mut out = [(0.0, 0.0); 4];
    let per = 1e3 / cfg.num_hidden_layers as f64;
    for (i, slot) in out.iter_mut().enumerate() {
        let hbm = projections_ms(device, dtype, cfg, n, reps, time, &[i], None)?;
        let l2 = projections_ms(device, dtype, cfg, n, reps, time, &[i], Some(1))?;
        *slot = (hbm * per, l2 * per);
    }
    Ok(out)
}

/// Milliseconds of the projections `which` (indices into `projection_shapes`) over every layer,
/// cycling `sets` distinct weight sets (`None`: enough that none is in L2 when it comes round
/// again, as the model's layers are).
#[allow(clippy::too_many_arguments)]
fn projections_ms(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    n: usize,
    reps: usize,
    time: Timer,
    which: &[usize],
    sets: Option<usize>,
) -> Result<f64> {
    let all = projection_shapes(cfg);
    let shapes: Vec<_> = which.iter().map(|&i| all[i]).collect();
    let layer_bytes: usize =
        shapes.iter().map(|(k, o)| k * o).sum::<usize>() * dtype.size_in_bytes();
    let sets = sets.unwrap_or_else(|| {
        WEIGHT_BYTES_PER_PASS
            .div_ceil(layer_bytes)
            .clamp(1, cfg.num_hidden_layers)
    });
    let xs = shapes
        .iter()
        .map(|&(k, _)| Ok(Tensor::randn(0f32, 1.0, (n, k), device)?.to_dtype(dtype)?))
        .collect::<Result<Vec<_>>>()?;
    let mut ws = Vec::new();
    for _ in 0..sets {
        let layer = shapes
            .iter()
            .map(|&(k, out)| Ok(Tensor::randn(0f32, 0.02, (out, k), device)?.to_dtype(dtype)?))
            .collect::<Result<Vec<_>>>()?;
        ws.push(layer);
    }
    repeat(reps, || {
        time(&mut || {
            for l in 0..cfg.num_hidden_layers {
                for (x, w) in xs.iter().zip(&ws[l % sets]) {
                    let _ = engine::model::gemv::matmul_t(x, w)?;
                }
            }
            Ok(())
        })
    })
}

/// Milliseconds of the LM head for `n` rows as the model runs it (`engine::model::lm_head`: a
/// 16-bit head into f32 logits on CUDA, f32 elsewhere).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn lm_head_ms(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    n: usize,
    reps: usize,
    time: Timer,
) -> Result<f64> {
    use engine::model::lm_head::{logits, storage_dtype};
    let x = Tensor::randn(0f32, 1.0, (n, cfg.hidden_size), device)?.to_dtype(dtype)?;
    let w = Tensor::randn(0f32, 0.02, (cfg.vocab_size, cfg.hidden_size), device)?
        .to_dtype(storage_dtype(dtype, device.is_cuda()))?;
    repeat(reps, || {
        time(&mut || {
            let _ = logits(&x, &w)?;
            Ok(())
        })
    })
}

/// Milliseconds of the layers' fused elementwise ops alone for `n` tokens over every layer: two
/// residual add + RMSNorm, the SiLU-gate product, and bias + rotary + KV-cache write.
pub fn elementwise_ms(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    n: usize,
    cache: &KvCache,
    reps: usize,
    time: Timer,
) -> Result<f64> {
    use engine::model::fused::{add_rms_norm, qkv_rope_cache, silu_mul, RopeCache};
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (heads, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let rand = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
    };
    let (x, residual, weight) = (rand(&[n, h])?, rand(&[n, h])?, rand(&[h])?);
    let gate_up = rand(&[n, 2 * inter])?;
    let qkv = rand(&[n, (heads + 2 * kvh) * hd])?;
    let bias = if cfg.attention_bias {
        Some(rand(&[(heads + 2 * kvh) * hd])?)
    } else {
        None
    };
    let (cos, sin) = (rand(&[n, hd / 2])?, rand(&[n, hd / 2])?);
    let slots = Tensor::arange(0i64, n as i64, device)?;
    let eps = cfg.rms_norm_eps as f32;
    repeat(reps, || {
        time(&mut || {
            for (k, v) in &cache.layers {
                let _ = add_rms_norm(&x, &residual, &weight, eps)?;
                let rope = RopeCache {
                    bias: bias.as_ref(),
                    cos: &cos,
                    sin: &sin,
                    key_cache: k,
                    value_cache: v,
                    slot_mapping: &slots,
                    num_heads: heads,
                    num_kv_heads: kvh,
                    head_dim: hd,
                };
                let _ = qkv_rope_cache(&qkv, &rope)?;
                let _ = silu_mul(&gate_up, inter)?;
                let _ = add_rms_norm(&x, &residual, &weight, eps)?;
            }
            Ok(())
        })
    })
}

/// FLOPs of causal attention over a fresh `n`-token prefill, every layer: QK^T and PV, each
/// 2 x head_dim per (query, visible key, head) pair.
pub fn attention_flops(cfg: &ModelConfig, n: usize) -> f64 {
    let pairs = n as f64 * (n as f64 + 1.0) / 2.0;
    4.0 * cfg.head_dim as f64
        * cfg.num_attention_heads as f64
        * pairs
        * cfg.num_hidden_layers as f64
}

/// Milliseconds of the attention op alone over all layers for the batch `fb` (random queries over
/// the filled cache), as the forward runs it.
pub fn attention_ms(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    fb: &ForwardBatch,
    cache: &KvCache,
    reps: usize,
    time: Timer,
) -> Result<f64> {
    let n = fb.token_ids.len();
    let meta = AttentionMetadata::new(&fb.seqs, device)?;
    let q = Tensor::randn(
        0f32,
        1.0,
        (n, cfg.num_attention_heads, cfg.head_dim),
        device,
    )?
    .to_dtype(dtype)?;
    let scale = 1.0 / (cfg.head_dim as f32).sqrt();
    repeat(reps, || {
        time(&mut || {
            for (k, v) in &cache.layers {
                let _ = paged_attention(&q, k, v, &meta, scale)?;
            }
            Ok(())
        })
    })
}

/// Median of `reps` timings after two untimed ones.
fn repeat(reps: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..reps + 2 {
        let ms = f()?;
        if i >= 2 {
            times.push(ms);
        }
    }
    Ok(median(times))
}

/// Host timer: synchronized before and after (parts long enough not to be launch-bound).
pub fn host_timer(
    device: &Device,
) -> impl FnMut(&mut dyn FnMut() -> Result<()>) -> Result<f64> + '_ {
    move |f| host_ms(device, f)
}
