//! Greedy sampling on the model's device: the argmax of each logits row, with the tie and NaN
//! rules of [`crate::sampling::argmax`], so that only the token ids come back to the host.

use candle_core::{bail, DType, Result, Tensor};

use crate::sampling;

crate::switch! {
    /// CUDA logits take our argmax kernel (`engine/kernels/argmax.cu`, on) or candle's `argmax`
    /// (off). candle's scans a row with one CTA and index arithmetic per element; its step cost
    /// is measured in days/gpu-engine (engine-bench `--without argmax`).
    static ARGMAX_KERNEL = true;
}

/// Turns the argmax kernel on or off process-wide (on by default).
pub fn set_argmax_kernel(on: bool) {
    ARGMAX_KERNEL.set(on);
}

/// Overrides the process-wide switch on this thread (`None`: follow it); for tests.
pub fn set_argmax_kernel_on_this_thread(on: Option<bool>) {
    ARGMAX_KERNEL.set_on_this_thread(on);
}

/// The greedy token of each row of `logits [n, vocab]`: the index of its largest value, the
/// lowest index on ties; NaN never wins and a row without a value above -inf gives 0.
pub fn greedy_tokens(logits: &Tensor) -> Result<Vec<u32>> {
    if logits.rank() != 2 {
        bail!(
            "greedy tokens: want logits [n, vocab], got {:?}",
            logits.shape()
        )
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        if ARGMAX_KERNEL.on() {
            return argmax_rows(logits)?.to_vec1();
        }
        return logits.argmax(candle_core::D::Minus1)?.to_vec1();
    }
    let vocab = logits.dim(1)?;
    if vocab == 0 {
        return Ok(vec![0; logits.dim(0)?]);
    }
    // One host buffer for every row, not one per row.
    let all = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(all.chunks(vocab).map(sampling::argmax).collect())
}

/// `u32 [n]`: each row's greedy token, on the device of f32 `logits [n, vocab]` (CUDA: one
/// launch; elsewhere through the host).
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        return logits.apply_op1_no_bwd(&cuda::ArgmaxRows);
    }
    let ids = greedy_tokens(logits)?;
    let n = ids.len();
    Tensor::from_vec(ids, n, logits.device())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape};

    use super::super::attention_cuda::{device_ptr, ptx};
    use super::super::pdl;

    /// Threads per CTA of `argmax_rows_f32` (`kThreads` in argmax.cu).
    const THREADS: u32 = 1024;

    /// u32 `[n]` = the argmax of each row of contiguous f32 `[n, vocab]`, one CTA per row.
    pub struct ArgmaxRows;

    impl CustomOp1 for ArgmaxRows {
        fn name(&self) -> &'static str {
            "argmax-rows"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("argmax-rows: CUDA tensors only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let &[n, vocab] = l.dims() else {
                bail!("argmax-rows: want logits [n, vocab], got {:?}", l.dims())
            };
            if !l.is_contiguous() || vocab == 0 || vocab > u32::MAX as usize {
                bail!("argmax-rows: contiguous logits [{n}, {vocab}] with 1..2^32 columns")
            }
            let dev = s.device().clone();
            let stream = dev.cuda_stream();
            // SAFETY: the kernel writes one id per row, every row.
            let out = unsafe { dev.alloc::<u32>(n.max(1)) }?;
            if n > 0 {
                let (lp, _gl) = device_ptr(s, l, &stream)?;
                let (op, _go) = out.device_ptr(&stream);
                let vocab_i = vocab as i64;
                let vec4 = i32::from(vocab % 4 == 0 && lp % 16 == 0);
                let mut b = pdl::Launch::new(&dev, "argmax_rows_f32", "argmax", ptx::ARGMAX)?;
                b.arg(&lp).arg(&vocab_i).arg(&vec4).arg(&op);
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match argmax_rows_f32's; it waits before reading.
                unsafe { b.launch(cfg) }?;
            }
            let out = CudaStorage::wrap_cuda_slice(out, dev);
            Ok((out, Shape::from(n)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_rows_follow_the_host_argmax() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        let rows = [
            [0.5, 2.0, 2.0, -1.0],
            [nan, 1.0, nan, 3.0],
            [ninf, nan, ninf, nan],
            [nan, nan, nan, nan],
        ];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let logits = Tensor::from_vec(flat, (4, 4), &Device::Cpu).unwrap();
        assert_eq!(greedy_tokens(&logits).unwrap(), vec![1, 3, 0, 0]);
        let on_device: Vec<u32> = argmax_rows(&logits).unwrap().to_vec1().unwrap();
        assert_eq!(on_device, vec![1, 3, 0, 0]);
    }

    #[test]
    fn logits_that_are_not_rows_are_an_error() {
        let logits = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        let err = greedy_tokens(&logits).unwrap_err().to_string();
        assert!(err.contains("want logits [n, vocab]"), "{err}");
    }
}
