//! CUDA wrappers of the fused decoder-layer ops (kernels in `engine/kernels/fused_ops.cu`).
//!
//! Same contract as the CPU references in `fused.rs`. Each op is one kernel launch on candle's
//! stream; outputs are fresh contiguous tensors except the paged caches, written in place.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{
    bail, CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor,
};

use super::attention_cuda::{device_ptr, device_ptr_mut, multiprocessor_count, ptx};
use super::fused::RopeCache;
use super::gemv::WARP_ROWS_MAX_CHUNKS;
use super::{gemv_cuda, pdl};

const MODULE: &str = "fused_ops";

/// The kernel launch: output addresses, then input addresses, in the order they were given.
pub(super) type Launch<'a> = &'a dyn Fn(&[u64], &[u64]) -> Result<()>;

/// Runs `launch` with the addresses of `outs` (each held through candle's write lock, one nested
/// in-place op per output) and of `ins` (read locks). Every tensor must be a contiguous CUDA
/// tensor, and an output may share storage with no other tensor (the locks would deadlock).
pub(super) fn with_ptrs(outs: &[&Tensor], ins: &[&Tensor], launch: Launch) -> Result<()> {
    with_ptrs_after(outs, ins, Vec::new(), launch)
}

fn with_ptrs_after(
    outs: &[&Tensor],
    ins: &[&Tensor],
    done: Vec<u64>,
    launch: Launch,
) -> Result<()> {
    if let Some((out, rest)) = outs.split_first() {
        return out.inplace_op1(&OutputPtr {
            rest,
            ins,
            done,
            launch,
        });
    }
    let locked: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let mut storages = Vec::with_capacity(locked.len());
    for (s, l) in &locked {
        match &**s {
            Storage::Cuda(c) if l.is_contiguous() => storages.push((c, *l)),
            _ => bail!("fused op: inputs must be contiguous CUDA tensors"),
        }
    }
    let Some(stream) = storages.first().map(|(c, _)| c.device.cuda_stream()) else {
        return launch(&done, &[]);
    };
    let mut ptrs = Vec::with_capacity(storages.len());
    let mut guards = Vec::with_capacity(storages.len()); // live until the launch
    for (c, l) in &storages {
        let (p, g) = device_ptr(c, l, &stream)?;
        ptrs.push(p);
        guards.push(g);
    }
    launch(&done, &ptrs)
}

/// One output of a fused op: takes its address under the write lock and recurses.
struct OutputPtr<'a> {
    rest: &'a [&'a Tensor],
    ins: &'a [&'a Tensor],
    done: Vec<u64>,
    launch: Launch<'a>,
}

impl InplaceOp1 for OutputPtr<'_> {
    fn name(&self) -> &'static str {
        "fused-op-output"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("fused CUDA op called with CPU tensors; use model::fused")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        if !l.is_contiguous() {
            bail!("fused op: outputs must be contiguous")
        }
        let stream = s.device.cuda_stream();
        let (ptr, _guard) = device_ptr_mut(s, l, &stream)?;
        let mut done = self.done.clone();
        done.push(ptr);
        with_ptrs_after(self.rest, self.ins, done, self.launch)
    }
}

// ------------------------------------------------------------------------------ helpers

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("fused CUDA op called with a {:?} tensor", t.device()),
    }
}

/// `name_<dtype>`, the kernel for `dtype`.
fn kernel(name: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("{name}: unsupported dtype {other:?}"),
    };
    Ok(format!("{name}_{suffix}"))
}

/// Whether the 8-wide kernels (`_v8`) may run: every size a multiple of 8 elements and every
/// address 16-byte aligned (rows then stay aligned too).
fn vec8(sizes: &[usize], outs: &[u64], ins: &[u64]) -> bool {
    sizes.iter().all(|s| s % 8 == 0) && outs.iter().chain(ins).all(|p| p % 16 == 0)
}

/// The name of kernel `name` for `dtype`, 8 elements per access when `wide`.
fn wide_kernel(name: &str, dtype: DType, wide: bool) -> Result<String> {
    Ok(format!(
        "{}{}",
        kernel(name, dtype)?,
        if wide { "_v8" } else { "" }
    ))
}

/// The common dtype of `ts`.
fn same_dtype(what: &str, ts: &[&Tensor]) -> Result<DType> {
    let dtype = ts[0].dtype();
    if let Some(t) = ts.iter().find(|t| t.dtype() != dtype) {
        bail!("{what}: mixed dtypes {dtype:?} and {:?}", t.dtype())
    }
    Ok(dtype)
}

/// An uninitialised tensor of `t`'s dtype and device (the caller's kernel writes every element);
/// zeros when it is empty.
pub(super) fn empty(t: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if shape.contains(&0) {
        return Tensor::zeros(shape, t.dtype(), t.device());
    }
    // SAFETY: the caller's kernel writes every element before anything reads it.
    unsafe { Tensor::empty(shape, t.dtype(), t.device()) }
}

// ------------------------------------------------------------------------------ ops

/// CUDA `fused::add_rms_norm`: `(rms_norm(x + residual) * weight, x + residual)`, one launch.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (n, hidden) = x.dims2()?;
    if residual.dims2()? != (n, hidden) || weight.dims1()? != hidden {
        bail!(
            "add_rms_norm: x {:?}, residual {:?}, weight {:?}",
            x.shape(),
            residual.shape(),
            weight.shape()
        )
    }
    let dtype = same_dtype("add_rms_norm", &[x, residual, weight])?;
    let (x, residual, weight) = (
        x.contiguous()?,
        residual.contiguous()?,
        weight.contiguous()?,
    );
    let (normed, sum) = (empty(&x, &[n, hidden])?, empty(&x, &[n, hidden])?);
    if n == 0 || hidden == 0 {
        return Ok((normed, sum));
    }
    let dev = cuda_device(&x)?;
    // About 8 elements per thread, whole warps, one CTA per row.
    let threads = (hidden.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let hidden_i = hidden as i32;
    with_ptrs(&[&normed, &sum], &[&x, &residual, &weight], &|out, inp| {
        let wide = vec8(&[hidden], out, inp);
        let mut b = pdl::Launch::new(
            &dev,
            &wide_kernel("add_rms_norm", dtype, wide)?,
            MODULE,
            ptx::FUSED_OPS,
        )?;
        b.arg(&inp[0]).arg(&inp[1]).arg(&inp[2]);
        b.arg(&out[0]).arg(&out[1]).arg(&hidden_i).arg(&eps);
        unsafe { b.launch(cfg) }?;
        Ok(())
    })?;
    Ok((normed, sum))
}

/// CUDA `fused::silu_mul`: `silu(gate_up[:, :inter]) * gate_up[:, inter:]`, one launch.
pub fn silu_mul(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    let (n, width) = gate_up.dims2()?;
    if width != 2 * inter {
        bail!(
            "silu_mul: gate_up {:?} is not [n, 2 * {inter}]",
            gate_up.shape()
        )
    }
    let gate_up = gate_up.contiguous()?;
    let out = empty(&gate_up, &[n, inter])?;
    let total = n * inter;
    if total == 0 {
        return Ok(out);
    }
    let dev = cuda_device(&gate_up)?;
    let dtype = gate_up.dtype();
    const THREADS: usize = 256;
    let (n_i, inter_i) = (n as i64, inter as i64);
    with_ptrs(&[&out], &[&gate_up], &|out, inp| {
        let wide = vec8(&[inter], out, inp);
        let mut b = pdl::Launch::new(
            &dev,
            &wide_kernel("silu_mul", dtype, wide)?,
            MODULE,
            ptx::FUSED_OPS,
        )?;
        let per_thread = if wide { 8 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (
                inter.div_ceil(THREADS * per_thread).min(1 << 16) as u32,
                n.min(65_535) as u32,
                1,
            ),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        b.arg(&inp[0]).arg(&out[0]).arg(&n_i).arg(&inter_i);
        unsafe { b.launch(cfg) }?;
        Ok(())
    })?;
    Ok(out)
}

/// Checks the inputs of the rotary + cache write of `n` tokens of a fused projection `width`
/// wide, and returns the cache's slot count.
fn check_rope_cache(n: usize, width: usize, r: &RopeCache) -> Result<i64> {
    let (num_heads, num_kv_heads, head_dim) = (r.num_heads, r.num_kv_heads, r.head_dim);
    let heads = num_heads + 2 * num_kv_heads;
    let half = head_dim / 2;
    if !head_dim.is_multiple_of(2) || width != heads * head_dim {
        bail!(
            "qkv_rope_cache: width {width} vs {num_heads} + 2 x {num_kv_heads} heads of {head_dim}"
        )
    }
    if r.cos.dims2()? != (n, half) || r.sin.dims2()? != (n, half) {
        bail!(
            "qkv_rope_cache: cos {:?} / sin {:?} must be [{n}, {half}]",
            r.cos.shape(),
            r.sin.shape()
        )
    }
    if let Some(b) = r.bias {
        if b.dims1()? != width {
            bail!("qkv_rope_cache: bias {:?} must be [{width}]", b.shape())
        }
    }
    let (num_blocks, block_size, cache_heads, cache_dim) = r.key_cache.dims4()?;
    if r.value_cache.shape() != r.key_cache.shape()
        || (cache_heads, cache_dim) != (num_kv_heads, head_dim)
    {
        bail!(
            "qkv_rope_cache: caches {:?} / {:?} vs {num_kv_heads} kv heads of {head_dim}",
            r.key_cache.shape(),
            r.value_cache.shape()
        )
    }
    if r.slot_mapping.dims1()? != n {
        bail!(
            "qkv_rope_cache: slot_mapping {:?} must be [{n}]",
            r.slot_mapping.shape()
        )
    }
    Ok((num_blocks * block_size) as i64)
}

/// The contiguous inputs every rotary kernel reads beside its projection: cos, sin, the slots as
/// i64, then the bias if any.
fn rope_inputs(r: &RopeCache) -> Result<Vec<Tensor>> {
    let mut ins = vec![
        r.cos.contiguous()?,
        r.sin.contiguous()?,
        r.slot_mapping.to_dtype(DType::I64)?.contiguous()?,
    ];
    if let Some(b) = r.bias {
        ins.push(b.contiguous()?);
    }
    Ok(ins)
}

/// The common dtype of a rotary op's tensors (`first` its projection input(s)).
fn rope_dtype(what: &str, first: &[&Tensor], r: &RopeCache) -> Result<DType> {
    let mut dtyped = first.to_vec();
    dtyped.extend([r.cos, r.sin, r.key_cache, r.value_cache]);
    dtyped.extend(r.bias);
    same_dtype(what, &dtyped)
}

/// CUDA `fused::qkv_rope_cache`: bias, rotary on q and k, q out, k and v into the paged caches,
/// one launch (see `fused_ops.cu`).
pub fn qkv_rope_cache(qkv: &Tensor, r: &RopeCache) -> Result<Tensor> {
    let (n, width) = qkv.dims2()?;
    let (heads, half) = (r.num_heads + 2 * r.num_kv_heads, r.head_dim / 2);
    let num_slots = check_rope_cache(n, width, r)?;
    let dtype = rope_dtype("qkv_rope_cache", &[qkv], r)?;
    let q = empty(qkv, &[n, r.num_heads, r.head_dim])?;
    if n == 0 {
        return Ok(q);
    }
    let qkv = qkv.contiguous()?;
    let extra = rope_inputs(r)?;
    let ins: Vec<&Tensor> = std::iter::once(&qkv).chain(&extra).collect();

    let dev = cuda_device(&qkv)?;
    const THREADS: usize = 128;
    let (h_i, kv_i, hd_i) = (r.num_heads as i32, r.num_kv_heads as i32, r.head_dim as i32);
    with_ptrs(&[&q, r.key_cache, r.value_cache], &ins, &|out, inp| {
        // 8-wide: hd/2 a multiple of 8 (rows of qkv, q, cos/sin and the caches stay aligned).
        let wide = vec8(&[half], out, inp);
        let mut b = pdl::Launch::new(
            &dev,
            &wide_kernel("qkv_rope_cache", dtype, wide)?,
            MODULE,
            ptx::FUSED_OPS,
        )?;
        let items = heads * half / if wide { 8 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, items.div_ceil(THREADS) as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let bias_ptr = inp.get(4).copied().unwrap_or(0);
        b.arg(&inp[0])
            .arg(&bias_ptr)
            .arg(&inp[1])
            .arg(&inp[2])
            .arg(&inp[3]);
        b.arg(&out[0]).arg(&out[1]).arg(&out[2]);
        b.arg(&h_i).arg(&kv_i).arg(&hd_i).arg(&num_slots);
        unsafe { b.launch(cfg) }?;
        Ok(())
    })?;
    Ok(q)
}

/// CUDA `fused::qkv_proj_rope_cache` for one token: the fused projection `x W^T` with the bias,
/// rotary and cache write as its epilogue (`gemv_<dtype>_m1_w2u8_rope` in `gemv.cu`), one launch,
/// bit for bit the projection on the warp-per-row kernel followed by [`qkv_rope_cache`]. x
/// `[1, k]`, W `[(heads + 2 kv_heads) hd, k]`, k a whole number of 16-byte chunks (at most
/// `WARP_ROWS_MAX_CHUNKS`), x and W 16-byte aligned (the caller checks with
/// `gemv::takes_pair_epilogue`).
pub fn qkv_gemv_rope_cache(x: &Tensor, w: &Tensor, r: &RopeCache) -> Result<Tensor> {
    Ok(qkv_gemv_rope(x, w, r, None)?.0)
}

/// CUDA `fused::add_rms_norm_qkv_proj_rope_cache` for one token: [`qkv_gemv_rope_cache`] of
/// [`add_rms_norm`]`(addend, residual, norm_w, eps)` with the add and norm folded into the
/// projection (`gemv_<dtype>_m1_w2u8_rope_norm`), one launch, within rounding of [`add_rms_norm`]
/// followed by [`qkv_gemv_rope_cache`]: q and the sum `addend + residual` `[1, k]` (a fresh
/// tensor, bit for bit). The
/// residual `[1, k]` and norm weight `[k]` of the same dtype, contiguous and 16-byte aligned too
/// (the caller checks with `gemv::takes_norm_fold`).
pub fn qkv_gemv_rope_cache_norm(
    addend: &Tensor,
    residual: &Tensor,
    norm_w: &Tensor,
    eps: f32,
    w: &Tensor,
    r: &RopeCache,
) -> Result<(Tensor, Tensor)> {
    let norm = NormFold {
        residual,
        weight: norm_w,
        eps,
    };
    let (q, sum) = qkv_gemv_rope(addend, w, r, Some(&norm))?;
    Ok((q, sum.expect("the fold's launch returns the sum")))
}

/// The residual add + RMSNorm a warp-per-row GEMV folds in (`_norm` kernels of `gemv.cu`): x is
/// the addend, the projection's input `rms_norm(x + residual) * weight`.
pub(super) struct NormFold<'a> {
    pub residual: &'a Tensor,
    pub weight: &'a Tensor,
    pub eps: f32,
}

impl NormFold<'_> {
    /// Checks the residual and weight against x `[1, k]` (the dtype is the caller's check) and
    /// returns the fresh sum tensor `[1, k]` the kernel writes.
    pub(super) fn sum_for(&self, what: &str, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if self.residual.dims2()? != (m, k) || self.weight.dims1()? != k {
            bail!(
                "{what}: residual {:?} must be x's shape {:?} and the norm weight {:?} [{k}]",
                self.residual.shape(),
                x.shape(),
                self.weight.shape()
            )
        }
        empty(x, &[m, k])
    }
}

/// Whether every address is 16-byte aligned (the warp-per-row kernels' 16-byte accesses).
pub(super) fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

/// [`qkv_gemv_rope_cache`], with the RMSNorm folded in when `norm` is given (then also the sum).
fn qkv_gemv_rope(
    x: &Tensor,
    w: &Tensor,
    r: &RopeCache,
    norm: Option<&NormFold>,
) -> Result<(Tensor, Option<Tensor>)> {
    let what = match norm {
        None => "qkv_gemv_rope_cache",
        Some(_) => "qkv_gemv_rope_cache_norm",
    };
    let (m, k) = x.dims2()?;
    let (width, k2) = w.dims2()?;
    if m != 1 || k != k2 {
        bail!(
            "{what}: x {:?} must be [1, k] and w {:?} [width, k]",
            x.shape(),
            w.shape()
        )
    }
    let num_slots = check_rope_cache(1, width, r)?;
    let mut dtyped = vec![x, w];
    dtyped.extend(norm.iter().flat_map(|n| [n.residual, n.weight]));
    let dtype = rope_dtype(what, &dtyped, r)?;
    let sum = norm.map(|n| n.sum_for(what, x)).transpose()?;
    let q = empty(x, &[1, r.num_heads, r.head_dim])?;
    let extra = rope_inputs(r)?;
    // x, w, then the fold's residual and weight, then cos, sin, slots (and the bias).
    let ins: Vec<&Tensor> = [x, w]
        .into_iter()
        .chain(norm.iter().flat_map(|n| [n.residual, n.weight]))
        .chain(&extra)
        .collect();
    let mut outs = vec![&q, r.key_cache, r.value_cache];
    outs.extend(&sum);

    let dev = cuda_device(x)?;
    let pairs = width / 2;
    let chunk = 16 / dtype.size_in_bytes();
    let (pairs_i, k_i) = (pairs as i32, k as i32);
    let (h_i, kv_i, hd_i) = (r.num_heads as i32, r.num_kv_heads as i32, r.head_dim as i32);
    let eps = norm.map_or(0.0, |n| n.eps);
    with_ptrs(&outs, &ins, &|out, inp| {
        // The fold's tensors: the residual and norm weight in, the sum out.
        let (norm_in, rope_in) = inp[2..].split_at(if norm.is_some() { 2 } else { 0 });
        let mut wide = [inp[0], inp[1]].to_vec();
        wide.extend(norm_in);
        wide.extend(out.get(3));
        if !k.is_multiple_of(chunk) || !aligned16(&wide) {
            bail!(
                "{what}: k {k} must be a multiple of {chunk}; x, w and the fold's residual, \
                 weight and sum 16-byte aligned"
            )
        }
        if norm.is_some() && k / chunk > WARP_ROWS_MAX_CHUNKS {
            bail!("{what}: k {k} past the fold's {WARP_ROWS_MAX_CHUNKS} chunks of {chunk}")
        }
        let stream = dev.cuda_stream();
        let warps = gemv_cuda::THREADS as usize / 32;
        let ctas = super::gemv::rope_pairs_plan(pairs, multiprocessor_count(&stream), warps);
        let name = format!(
            "{}_m1_w2u8_rope{}",
            kernel("gemv", dtype)?,
            if norm.is_some() { "_norm" } else { "" }
        );
        let mut b = pdl::Launch::new(&dev, &name, gemv_cuda::MODULE, ptx::GEMV)?;
        let cfg = LaunchConfig {
            grid_dim: (ctas, 1, 1),
            block_dim: (gemv_cuda::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let bias_ptr = rope_in.get(3).copied().unwrap_or(0);
        b.arg(&inp[0])
            .arg(&inp[1])
            .arg(&out[0])
            .arg(&pairs_i)
            .arg(&k_i);
        b.arg(&bias_ptr)
            .arg(&rope_in[0])
            .arg(&rope_in[1])
            .arg(&rope_in[2]);
        b.arg(&out[1]).arg(&out[2]);
        b.arg(&h_i).arg(&kv_i).arg(&hd_i).arg(&num_slots);
        if norm.is_some() {
            b.arg(&norm_in[0]).arg(&norm_in[1]).arg(&out[3]).arg(&eps);
        }
        unsafe { b.launch(cfg) }?;
        Ok(())
    })?;
    Ok((q, sum))
}
