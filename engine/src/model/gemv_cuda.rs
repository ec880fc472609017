//! CUDA launch of the skinny matmul `y = x W^T` (kernels in `engine/kernels/gemv.cu`).
//!
//! Same contract as `gemv::matmul_t`, `gemv::gate_up_silu` and `gemv::add_rms_norm_gate_up_silu`
//! on CUDA tensors. One launch on candle's stream with the sizes as scalar arguments (nothing is
//! uploaded), the outputs allocated on that stream, so that a CUDA graph can capture it.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, DType, InplaceOp1, Layout, Result, Shape, Storage,
    Tensor,
};

use super::attention_cuda::{
    device_ptr, device_ptr_mut, multiprocessor_count, ptx, uninit_storage,
};
use super::fused_cuda::{aligned16, empty, with_ptrs, NormFold};
use super::gemv::{
    cta_rows_variant, gemv_warp_rows, silu_pairs_plan, silu_variant, warp_rows_plan, MAX_ROWS,
    WARP_ROWS_MAX_CHUNKS,
};
use super::pdl::Launch;

/// The kernels' module name (`fused_cuda.rs` launches the rotary epilogue from it too).
pub(super) const MODULE: &str = "gemv";
/// Threads per CTA (`THREADS` in gemv.cu).
pub(super) const THREADS: u32 = 128;

/// Rows of W per CTA for `m` rows of x (`rows_per_cta` in gemv.cu).
fn rows_per_cta(m: usize) -> usize {
    if m >= 4 {
        4
    } else {
        2
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("gemv: unsupported dtype {other:?}"),
    })
}

/// Checks x `[m, k]`, W `[n, k]` and the output `[m, n]` and returns `(m, n, k)`.
fn check(x_l: &Layout, w_l: &Layout, out_l: &Layout, dtypes: [DType; 3]) -> Result<[usize; 3]> {
    let (m, k) = x_l.shape().dims2()?;
    let (n, k2) = w_l.shape().dims2()?;
    if k != k2 || out_l.shape().dims2()? != (m, n) {
        bail!(
            "gemv: x {:?}, w {:?}, out {:?} are not [m, k], [n, k], [m, n]",
            x_l.shape(),
            w_l.shape(),
            out_l.shape()
        )
    }
    if !(1..=MAX_ROWS).contains(&m) || k == 0 || n == 0 {
        bail!("gemv: {m} rows (1..={MAX_ROWS}), n {n} and k {k} must be positive")
    }
    if k > i32::MAX as usize || n > i32::MAX as usize {
        bail!("gemv: n {n} or k {k} past i32")
    }
    if dtypes.iter().any(|d| *d != dtypes[0]) {
        bail!("gemv: mixed dtypes {dtypes:?}")
    }
    if !x_l.is_contiguous() || !w_l.is_contiguous() || !out_l.is_contiguous() {
        bail!("gemv: x, w and out must be contiguous")
    }
    Ok([m, n, k])
}

/// Launches the kernel writing `out`: `x W^T` (`silu` None: `gemv_<dtype>_m<m>[_v]` or, for one
/// row, the warp-per-row `gemv_<dtype>_m1_w*`), or with the SiLU-gate epilogue over the fused
/// `[gate | up]` weight W `[2 * inter, k]` (`Some(inter)`: `gemv_<dtype>_m1_w2u4_silu`, `out`
/// `[1, inter]`).
fn launch(
    x: &CudaStorage,
    x_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    out: &mut CudaStorage,
    out_l: &Layout,
    silu: Option<usize>,
) -> Result<()> {
    let dtypes = [x.dtype(), w.dtype(), out.dtype()];
    let [m, n, k] = match silu {
        None => check(x_l, w_l, out_l, dtypes)?,
        Some(inter) => {
            let gate_up = Layout::contiguous(Shape::from((1, 2 * inter)));
            let [m, n, k] = check(x_l, w_l, &gate_up, dtypes)?;
            if m != 1 || n != 2 * inter || !out_l.is_contiguous() {
                bail!("gemv_silu: x [1, k], w [2 * {inter}, k] expected, got {m} rows and {n} weight rows")
            }
            [m, n, k]
        }
    };
    let dtype = x.dtype();
    let dev: CudaDevice = x.device.clone();
    let stream = dev.cuda_stream();
    let (x_ptr, _g1) = device_ptr(x, x_l, &stream)?;
    let (w_ptr, _g2) = device_ptr(w, w_l, &stream)?;
    let (y_ptr, _g3) = device_ptr_mut(out, out_l, &stream)?;
    // 16-byte chunks: k a multiple of a chunk, x and W 16-byte aligned (rows then are too).
    let chunk = 16 / dtype.size_in_bytes();
    let wide = k.is_multiple_of(chunk) && x_ptr % 16 == 0 && w_ptr % 16 == 0;
    let short_rows = k / chunk <= WARP_ROWS_MAX_CHUNKS;
    let sfx = suffix(dtype)?;
    let warps = THREADS as usize / 32;
    // Kernel, grid and the row count it takes (the outputs: W's rows, or the gate/up pairs).
    let (name, ctas, rows) = match silu {
        Some(inter) => {
            if !wide {
                bail!("gemv_silu: k {k} must be a multiple of {chunk} and x, w 16-byte aligned")
            }
            let (variant, per_sm) = silu_variant();
            let ctas = silu_pairs_plan(inter, multiprocessor_count(&stream), warps, per_sm);
            (format!("gemv_{sfx}_m1_{variant}_silu"), ctas, inter)
        }
        None if m == 1 && wide && short_rows && gemv_warp_rows() => {
            let (variant, ctas) = warp_rows_plan(n, multiprocessor_count(&stream), warps);
            (format!("gemv_{sfx}_m1_{variant}"), ctas, n)
        }
        None => {
            let ctas = n.div_ceil(rows_per_cta(m)) as u32;
            let variant = if wide {
                cta_rows_variant(m, k / chunk)
            } else {
                ""
            };
            (format!("gemv_{sfx}_m{m}{variant}"), ctas, n)
        }
    };
    let mut b = Launch::new(&dev, &name, MODULE, ptx::GEMV)?;
    let cfg = LaunchConfig {
        grid_dim: (ctas, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, k_i) = (rows as i32, k as i32);
    b.arg(&x_ptr).arg(&w_ptr).arg(&y_ptr).arg(&n_i).arg(&k_i);
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `x W^T` into a fresh tensor (`silu` None), or `silu(x W_gate^T) * (x W_up^T)` into a fresh
/// `[1, inter]` one (`Some(inter)`).
struct Gemv {
    silu: Option<usize>,
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gemv"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("gemv (CUDA) called with CPU tensors; use gemv::matmul_t or gemv::gate_up_silu")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let shape = match self.silu {
            Some(inter) => Shape::from((1, inter)),
            None => Shape::from((x_l.shape().dims2()?.0, w_l.shape().dims2()?.0)),
        };
        let dev = x.device.clone();
        // SAFETY: the kernel writes every element before anything reads it.
        let mut out = unsafe { uninit_storage(&dev, x.dtype(), shape.elem_count(), "gemv")? };
        launch(
            x,
            x_l,
            w,
            w_l,
            &mut out,
            &Layout::contiguous(&shape),
            self.silu,
        )?;
        Ok((out, shape))
    }
}

/// CUDA `silu(x W[..inter]^T) * (x W[inter..]^T)` for one row x `[1, k]` and the fused
/// `[gate | up]` weight W `[2 * inter, k]` (contiguous, one 16-bit or f32 dtype, k a multiple of
/// 16 bytes, 16-byte aligned): `[1, inter]`, one launch, bit for bit `gemv` then
/// `fused::silu_mul`.
pub fn gemv_silu(x: &Tensor, w: &Tensor, inter: usize) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &Gemv { silu: Some(inter) })
}

/// CUDA [`gemv_silu`] of `fused::add_rms_norm(addend, residual, norm_w, eps)` with the add and
/// norm folded into the projection (`gemv_<dtype>_m1_w2u{6,4}_silu_norm`), one launch, within
/// rounding of `fused::add_rms_norm` followed by [`gemv_silu`] (the sum bit for bit): the
/// activation `[1, inter]` and the sum `addend + residual` `[1, k]` (fresh tensors). addend,
/// residual `[1, k]` and the norm weight `[k]` as x for [`gemv_silu`] (contiguous, one dtype with
/// W, 16-byte aligned, k at most `WARP_ROWS_MAX_CHUNKS` 16-byte chunks).
pub fn gemv_silu_norm(
    addend: &Tensor,
    residual: &Tensor,
    norm_w: &Tensor,
    eps: f32,
    w: &Tensor,
    inter: usize,
) -> Result<(Tensor, Tensor)> {
    const WHAT: &str = "gemv_silu_norm";
    let (m, k) = addend.dims2()?;
    let (rows, k2) = w.dims2()?;
    if m != 1 || k != k2 || rows != 2 * inter || inter == 0 {
        bail!(
            "{WHAT}: addend {:?} must be [1, k] and w {:?} [2 * {inter}, k]",
            addend.shape(),
            w.shape()
        )
    }
    if inter > i32::MAX as usize || k > i32::MAX as usize {
        bail!("{WHAT}: inter {inter} or k {k} past i32")
    }
    let dtype = addend.dtype();
    let (variant, per_sm) = silu_variant();
    let name = format!("gemv_{}_m1_{variant}_silu_norm", suffix(dtype)?);
    if let Some(t) = [w, residual, norm_w].iter().find(|t| t.dtype() != dtype) {
        bail!("{WHAT}: mixed dtypes {dtype:?} and {:?}", t.dtype())
    }
    let norm = NormFold {
        residual,
        weight: norm_w,
        eps,
    };
    let sum = norm.sum_for(WHAT, addend)?;
    let act = empty(addend, &[1, inter])?;
    let dev = match addend.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        other => bail!("{WHAT}: called with a {other:?} tensor"),
    };
    let chunk = 16 / dtype.size_in_bytes();
    let (n_i, k_i) = (inter as i32, k as i32);
    with_ptrs(
        &[&act, &sum],
        &[addend, w, residual, norm_w],
        &|out, inp| {
            if !k.is_multiple_of(chunk) || !aligned16(inp) || !aligned16(out) {
                bail!("{WHAT}: k {k} must be a multiple of {chunk}, every tensor 16-byte aligned")
            }
            if k / chunk > WARP_ROWS_MAX_CHUNKS {
                bail!("{WHAT}: k {k} past the fold's {WARP_ROWS_MAX_CHUNKS} chunks of {chunk}")
            }
            let stream = dev.cuda_stream();
            let sms = multiprocessor_count(&stream);
            let ctas = silu_pairs_plan(inter, sms, THREADS as usize / 32, per_sm);
            let mut b = Launch::new(&dev, &name, MODULE, ptx::GEMV)?;
            let cfg = LaunchConfig {
                grid_dim: (ctas, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            b.arg(&inp[0]).arg(&inp[1]).arg(&out[0]).arg(&n_i).arg(&k_i);
            b.arg(&inp[2]).arg(&inp[3]).arg(&out[1]).arg(&eps);
            unsafe { b.launch(cfg) }?;
            Ok(())
        },
    )?;
    Ok((act, sum))
}

/// CUDA `x W^T` for x `[m, k]` (1..=`MAX_ROWS` rows) and W `[n, k]`, contiguous, one dtype
/// (f32, f16, bf16): `[m, n]` in that dtype.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &Gemv { silu: None })
}

/// [`gemv`] writing into `out` (`[m, n]`, contiguous, the same dtype; sharing storage with neither
/// input): lets tests poison the output to prove that every element is written.
pub fn gemv_into(out: &Tensor, x: &Tensor, w: &Tensor) -> Result<()> {
    out.inplace_op1(&GemvInto { x, w })
}

struct GemvInto<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
}

impl InplaceOp1 for GemvInto<'_> {
    fn name(&self) -> &'static str {
        "gemv_into"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("gemv (CUDA) called with CPU tensors; use gemv::matmul_t")
    }

    fn cuda_fwd(&self, out: &mut CudaStorage, out_l: &Layout) -> Result<()> {
        let (x_s, x_l) = self.x.storage_and_layout();
        let (w_s, w_l) = self.w.storage_and_layout();
        match (&*x_s, &*w_s) {
            (Storage::Cuda(x), Storage::Cuda(w)) => launch(x, x_l, w, w_l, out, out_l, None),
            _ => bail!("gemv_into: x and w must live on the CUDA device"),
        }
    }
}
