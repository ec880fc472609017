//! Fused decoder-layer ops: one CUDA launch each on the GPU, the unfused candle ops on the CPU.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{bail, Result, Tensor, D};

use super::attention::write_kv_cache;

static FUSED_KERNELS: AtomicBool = AtomicBool::new(true);

/// Turns the fused CUDA kernels on or off process-wide (on by default); off, CUDA tensors take the
/// unfused candle ops like the CPU. For side-by-side benchmarks.
pub fn set_fused_kernels(enabled: bool) {
    FUSED_KERNELS.store(enabled, Ordering::Relaxed);
}

/// Whether the fused CUDA kernels are on (the process-wide switch).
#[cfg(feature = "cuda")]
pub(crate) fn fused_kernels() -> bool {
    FUSED_KERNELS.load(Ordering::Relaxed)
}

/// Whether `t` takes a fused CUDA kernel.
#[cfg(feature = "cuda")]
fn on_fused_kernel(t: &Tensor) -> bool {
    t.device().is_cuda() && fused_kernels()
}

/// `(rms_norm(x + residual) * weight, x + residual)` for `[n, hidden]` rows: the residual add
/// rounds to the tensor dtype (as candle's add), the norm follows `candle_nn::ops::rms_norm`.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if on_fused_kernel(x) {
        return super::fused_cuda::add_rms_norm(x, residual, weight, eps);
    }
    let sum = (x + residual)?;
    let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
    Ok((normed, sum))
}

/// Checks the operands of an [`add_rms_norm`] that a fused op takes: `addend` and `residual`
/// `[n, hidden]`, `weight` `[hidden]`.
pub(crate) fn check_add_rms_norm(
    what: &str,
    addend: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
) -> Result<()> {
    match (addend.dims(), residual.dims(), weight.dims()) {
        (&[_, hidden], r, &[w]) if r == addend.dims() && w == hidden => Ok(()),
        _ => bail!(
            "{what}: addend {:?}, residual {:?} and norm weight {:?} are not [n, hidden], \
             [n, hidden] and [hidden]",
            addend.shape(),
            residual.shape(),
            weight.shape()
        ),
    }
}

/// `silu(gate) * up` from the fused `[gate | up]` projection output `[n, 2 * inter]`.
pub fn silu_mul(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_fused_kernel(gate_up) {
        return super::fused_cuda::silu_mul(gate_up, inter);
    }
    let gate = gate_up.narrow(D::Minus1, 0, inter)?;
    let up = gate_up.narrow(D::Minus1, inter, inter)?;
    candle_nn::ops::silu(&gate)? * up
}

/// Splits a fused (biased) projection output `[n, (heads + 2 * kv_heads) * head_dim]` into q
/// `[n, heads, hd]` and k, v `[n, kv_heads, hd]`, rotary ("rotate_half", `rope_thd`) applied to q
/// and k with `cos`/`sin` `[n, hd / 2]` (rows per token position).
pub fn split_rope(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = qkv.dim(0)?;
    let hd = head_dim;
    let q = qkv.narrow(1, 0, heads * hd)?.reshape((1, n, heads, hd))?;
    let k = qkv
        .narrow(1, heads * hd, kv_heads * hd)?
        .reshape((1, n, kv_heads, hd))?;
    let v = qkv
        .narrow(1, (heads + kv_heads) * hd, kv_heads * hd)?
        .reshape((n, kv_heads, hd))?;
    let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?.squeeze(0)?;
    let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?.squeeze(0)?;
    Ok((q, k, v.contiguous()?))
}

/// Where a fused q/k/v projection's output goes after the bias and rotary: `bias`
/// `[(heads + 2 * kv_heads) * head_dim]`, `cos`/`sin` `[n, head_dim / 2]` (rows per token
/// position), the paged caches `[num_blocks, block_size, kv_heads, head_dim]` and one slot per token
/// (`slot_mapping`, i64 or u32; -1 or past the cache: not stored).
#[derive(Debug, Clone, Copy)]
pub struct RopeCache<'a> {
    pub bias: Option<&'a Tensor>,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub key_cache: &'a Tensor,
    pub value_cache: &'a Tensor,
    pub slot_mapping: &'a Tensor,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// From the unbiased fused projection output `qkv` `[n, (heads + 2 * kv_heads) * head_dim]`: adds
/// the bias, applies rotary to q and k (see `split_rope`), writes k and v into the paged caches at
/// their slots (as `attention::write_kv_cache`; -1 skipped) and returns q `[n, heads, hd]`.
pub fn qkv_rope_cache(qkv: &Tensor, r: &RopeCache) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_fused_kernel(qkv) {
        return super::fused_cuda::qkv_rope_cache(qkv, r);
    }
    let qkv = match r.bias {
        Some(b) => qkv.broadcast_add(b)?,
        None => qkv.clone(),
    };
    let (q, k, v) = split_rope(&qkv, r.cos, r.sin, r.num_heads, r.num_kv_heads, r.head_dim)?;
    write_kv_cache(&k, &v, r.key_cache, r.value_cache, r.slot_mapping)?;
    Ok(q)
}

/// [`qkv_rope_cache`] of the fused projection `x W^T` (`x` `[n, hidden]`, W
/// `[(heads + 2 * kv_heads) * head_dim, hidden]`, unbiased): on CUDA one token takes the
/// projection with the bias, rotary and cache write as its epilogue (one launch instead of two,
/// same bits) when the kernels it needs are on and its rows fit; everything else is
/// `gemv::matmul_t` then [`qkv_rope_cache`].
pub fn qkv_proj_rope_cache(x: &Tensor, w: &Tensor, r: &RopeCache) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if takes_rope_epilogue(x, w, r) {
        return super::fused_cuda::qkv_gemv_rope_cache(x, w, r);
    }
    qkv_rope_cache(&super::gemv::matmul_t(x, w)?, r)
}

/// Whether the projection `x W^T` takes the rotary epilogue of the warp-per-row kernel.
#[cfg(feature = "cuda")]
fn takes_rope_epilogue(x: &Tensor, w: &Tensor, r: &RopeCache) -> bool {
    super::gemv::gemv_rope_epilogue()
        && r.head_dim.is_multiple_of(2)
        && super::gemv::takes_pair_epilogue(x, w)
}

/// [`qkv_proj_rope_cache`] of `add_rms_norm(addend, residual, norm_w, eps)` ([`add_rms_norm`]: the
/// normed rows and their sum `addend + residual`, the next residual), returning q
/// `[n, heads, hd]` and the sum `[n, hidden]`. On CUDA a token that takes the rotary epilogue
/// also takes the add and norm folded into the projection when the fold switch
/// (`gemv::set_gemv_norm_fold`) is on and the residual and norm weight fit it (one launch
/// instead of two, within rounding); everything else is [`add_rms_norm`] then
/// [`qkv_proj_rope_cache`].
pub fn add_rms_norm_qkv_proj_rope_cache(
    addend: &Tensor,
    residual: &Tensor,
    norm_w: &Tensor,
    eps: f32,
    w: &Tensor,
    r: &RopeCache,
) -> Result<(Tensor, Tensor)> {
    check_add_rms_norm("add_rms_norm_qkv_proj_rope_cache", addend, residual, norm_w)?;
    #[cfg(feature = "cuda")]
    if takes_rope_epilogue(addend, w, r) && super::gemv::takes_norm_fold(addend, residual, norm_w) {
        return super::fused_cuda::qkv_gemv_rope_cache_norm(addend, residual, norm_w, eps, w, r);
    }
    let (h, sum) = add_rms_norm(addend, residual, norm_w, eps)?;
    Ok((qkv_proj_rope_cache(&h, w, r)?, sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap()
    }

    /// Bitwise equality (f16/bf16 -> f32 is exact and injective).
    fn assert_same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.shape(), b.shape());
        assert_eq!(a.dtype(), b.dtype());
        let flat = |t: &Tensor| -> Vec<u32> {
            let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            v.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(flat(a), flat(b));
    }

    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    #[test]
    fn add_rms_norm_cpu_is_the_unfused_sequence() {
        for dtype in DTYPES {
            let (x, o, w) = (
                randn(&[5, 96], dtype),
                randn(&[5, 96], dtype),
                randn(&[96], dtype),
            );
            // The model calls add_rms_norm(layer_out, x) for `x = x + layer_out; rms_norm(x)`.
            let (normed, sum) = add_rms_norm(&o, &x, &w, 1e-6).unwrap();
            let want_sum = (&x + &o).unwrap();
            assert_same(&sum, &want_sum);
            assert_same(
                &normed,
                &candle_nn::ops::rms_norm(&want_sum, &w, 1e-6).unwrap(),
            );
        }
    }

    #[test]
    fn silu_mul_cpu_is_the_unfused_sequence() {
        for dtype in DTYPES {
            let gu = randn(&[3, 2 * 40], dtype);
            let gate = gu.narrow(D::Minus1, 0, 40).unwrap();
            let up = gu.narrow(D::Minus1, 40, 40).unwrap();
            let want = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
            assert_same(&silu_mul(&gu, 40).unwrap(), &want);
        }
    }

    #[test]
    fn qkv_rope_cache_cpu_is_the_unfused_sequence() {
        let (heads, kvh, hd, n, blocks, bs) = (4, 2, 16, 3, 4, 4);
        for dtype in DTYPES {
            let width = (heads + 2 * kvh) * hd;
            let (qkv, bias) = (randn(&[n, width], dtype), randn(&[width], dtype));
            let (cos, sin) = (randn(&[n, hd / 2], dtype), randn(&[n, hd / 2], dtype));
            let slots = Tensor::new(&[5i64, -1, 12], &Device::Cpu).unwrap();
            let caches = || -> [Tensor; 2] {
                [0, 1].map(|_| Tensor::ones((blocks, bs, kvh, hd), dtype, &Device::Cpu).unwrap())
            };
            let [kc, vc] = caches();
            let rope = RopeCache {
                bias: Some(&bias),
                cos: &cos,
                sin: &sin,
                key_cache: &kc,
                value_cache: &vc,
                slot_mapping: &slots,
                num_heads: heads,
                num_kv_heads: kvh,
                head_dim: hd,
            };
            let q = qkv_rope_cache(&qkv, &rope).unwrap();
            // The model's sequence before fusion: biased projection, narrow, rope, cache write.
            let biased = qkv.broadcast_add(&bias).unwrap();
            let q0 = biased.narrow(1, 0, heads * hd).unwrap();
            let k0 = biased.narrow(1, heads * hd, kvh * hd).unwrap();
            let v0 = biased.narrow(1, (heads + kvh) * hd, kvh * hd).unwrap();
            let rope = |t: &Tensor, h: usize| {
                let t = t.reshape((1, n, h, hd)).unwrap().contiguous().unwrap();
                candle_nn::rotary_emb::rope_thd(&t, &cos, &sin)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
            };
            let [kc0, vc0] = caches();
            let v0 = v0.reshape((n, kvh, hd)).unwrap().contiguous().unwrap();
            write_kv_cache(&rope(&k0, kvh), &v0, &kc0, &vc0, &slots).unwrap();
            assert_same(&q, &rope(&q0, heads));
            assert!(q.is_contiguous());
            assert_same(&kc, &kc0);
            assert_same(&vc, &vc0);
        }
    }

    #[test]
    fn add_rms_norm_qkv_proj_rope_cache_cpu_is_the_unfused_sequence() {
        let (heads, kvh, hd, hidden, blocks, bs) = (4, 2, 16, 48, 2, 4);
        let width = (heads + 2 * kvh) * hd;
        for dtype in DTYPES {
            let (out, x, norm_w) = (
                randn(&[1, hidden], dtype),
                randn(&[1, hidden], dtype),
                randn(&[hidden], dtype),
            );
            let (w, bias) = (randn(&[width, hidden], dtype), randn(&[width], dtype));
            let (cos, sin) = (randn(&[1, hd / 2], dtype), randn(&[1, hd / 2], dtype));
            let slots = Tensor::new(&[6i64], &Device::Cpu).unwrap();
            let caches = || -> [Tensor; 2] {
                [0, 1].map(|_| Tensor::zeros((blocks, bs, kvh, hd), dtype, &Device::Cpu).unwrap())
            };
            let ([kc, vc], [kc0, vc0]) = (caches(), caches());
            let rope = |kc, vc| RopeCache {
                bias: Some(&bias),
                cos: &cos,
                sin: &sin,
                key_cache: kc,
                value_cache: vc,
                slot_mapping: &slots,
                num_heads: heads,
                num_kv_heads: kvh,
                head_dim: hd,
            };
            let (q, sum) =
                add_rms_norm_qkv_proj_rope_cache(&out, &x, &norm_w, 1e-6, &w, &rope(&kc, &vc))
                    .unwrap();
            // The model's sequence before the fusion.
            let (h, want_sum) = add_rms_norm(&out, &x, &norm_w, 1e-6).unwrap();
            let want_q = qkv_proj_rope_cache(&h, &w, &rope(&kc0, &vc0)).unwrap();
            assert_same(&sum, &want_sum);
            assert_same(&q, &want_q);
            assert_same(&kc, &kc0);
            assert_same(&vc, &vc0);
            // Operands that do not fit each other are refused with their shapes.
            let short = randn(&[hidden - 8], dtype);
            let err = add_rms_norm_qkv_proj_rope_cache(&out, &x, &short, 1e-6, &w, &rope(&kc, &vc))
                .unwrap_err()
                .to_string();
            assert!(err.contains("norm weight [40]"), "{err}");
        }
    }
}
