//! Skinny projections `x W^T` (1..=`MAX_ROWS` rows of x): one bandwidth-bound CUDA kernel, candle's matmul otherwise.

use std::cell::Cell;

use candle_core::{Result, Tensor};

use super::switch::Switch;

/// Most rows of x the CUDA kernel takes (`engine/kernels/gemv.cu` is instantiated for 1..=8).
pub const MAX_ROWS: usize = 8;
/// Most rows the model sends to the kernel: on an H200 at the Qwen2.5-1.5B projections it beat
/// cuBLAS at 1 row (42 against 48 us per layer) and lost at 8 (71 against 47 us;
/// `days/gpu-engine/run10/gemv-bw.log`). A thread's override `Some(true)` takes it up to `MAX_ROWS`.
pub const SERVED_ROWS: usize = 1;

thread_local! {
    static GEMV_HERE: Cell<Option<bool>> = const { Cell::new(None) };
}
static GEMV: Switch = Switch::new(true, &GEMV_HERE);

/// Turns the skinny-matmul CUDA kernel on or off process-wide (on by default); off, every
/// projection takes candle's matmul (cuBLAS). For side-by-side benchmarks.
pub fn set_gemv_kernel(enabled: bool) {
    GEMV.set(enabled);
}

/// Overrides the process-wide switch for calls on this thread (`None`: follow it); for tests
/// that compare both paths while other threads run models.
pub fn set_gemv_kernel_on_this_thread(enabled: Option<bool>) {
    GEMV.set_on_this_thread(enabled);
}

/// Whether projections called on this thread may take the kernel.
pub fn gemv_kernel_enabled() -> bool {
    max_kernel_rows() > 0
}

/// Most rows of x that take the kernel on this thread: `SERVED_ROWS` when the switch is on,
/// `MAX_ROWS` under a thread override `Some(true)`, none when off.
fn max_kernel_rows() -> usize {
    match GEMV.this_thread() {
        Some(true) => MAX_ROWS,
        Some(false) => 0,
        None if GEMV.process() => SERVED_ROWS,
        None => 0,
    }
}

/// `x W^T` for x `[m, k]` and a weight W `[n, k]` (the Linear layout). CUDA tensors with
/// 1..=`SERVED_ROWS` (a thread override: `MAX_ROWS`) contiguous rows and a contiguous weight of the same dtype (f32, f16, bf16) take
/// the kernel (f32 accumulation, one rounding); everything else is exactly `x.matmul(&w.t()?)`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if takes_kernel(x, w) {
        return super::gemv_cuda::gemv(x, w);
    }
    x.matmul(&w.t()?)
}

#[cfg(feature = "cuda")]
fn takes_kernel(x: &Tensor, w: &Tensor) -> bool {
    use candle_core::DType;
    let shapes_fit = match (x.dims(), w.dims()) {
        (&[m, k], &[n, k2]) => (1..=max_kernel_rows()).contains(&m) && k == k2 && k > 0 && n > 0,
        _ => false,
    };
    shapes_fit
        && x.device().is_cuda()
        && x.device().same_device(w.device())
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && x.is_contiguous()
        && w.is_contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        v.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn cpu_is_candle_matmul_bit_for_bit() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for m in [1, 3, 8, 9] {
                let x = Tensor::randn(0f32, 1f32, (m, 40), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap();
                let w = Tensor::randn(0f32, 1f32, (24, 40), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap();
                let got = matmul_t(&x, &w).unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap();
                assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
                assert_eq!(bits(&got), bits(&want));
            }
        }
    }

    #[test]
    fn thread_override_wins_over_the_switch() {
        set_gemv_kernel_on_this_thread(Some(false));
        assert!(!gemv_kernel_enabled());
        set_gemv_kernel_on_this_thread(Some(true));
        assert!(gemv_kernel_enabled());
        set_gemv_kernel_on_this_thread(None);
    }
}
