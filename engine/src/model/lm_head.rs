//! The LM head: f32 logits of the last hidden rows. On CUDA a 16-bit head is read in 16 bits and
//! multiplied with f32 accumulation straight into f32 logits (cublasGemmEx); elsewhere, and for an
//! f32 head, the rows are widened to f32 and multiplied by the f32 head.

use candle_core::{DType, Result, Tensor};

/// The dtype the head is stored in: the model dtype on CUDA for 16-bit models (half the bytes of
/// f32 to read every decode step), f32 otherwise.
pub fn storage_dtype(model_dtype: DType, on_cuda: bool) -> DType {
    match model_dtype {
        DType::BF16 | DType::F16 if on_cuda && cfg!(feature = "cuda") => model_dtype,
        _ => DType::F32,
    }
}

/// `x [n, hidden]` (model dtype) times `head [vocab, hidden]`^T, as f32 `[n, vocab]`.
pub fn logits(x: &Tensor, head: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if head.dtype() != DType::F32 && x.device().is_cuda() {
        let x = x.to_dtype(head.dtype())?.contiguous()?;
        return x.apply_op2_no_bwd(head, &cuda::MixedLogits);
    }
    x.to_dtype(DType::F32)?
        .matmul(&head.to_dtype(DType::F32)?.t()?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape};

    use super::super::attention_cuda::device_ptr;

    /// f32 `[n, vocab]` = 16-bit `x [n, hidden]` x 16-bit `head [vocab, hidden]`^T, f32 accumulation.
    pub struct MixedLogits;

    impl CustomOp2 for MixedLogits {
        fn name(&self) -> &'static str {
            "lm-head-mixed"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("lm-head-mixed: CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (&[n, hidden], &[vocab, hidden_w]) = (xl.dims(), wl.dims()) else {
                bail!("lm-head-mixed: want x [n, hidden] and head [vocab, hidden]")
            };
            if hidden != hidden_w || !xl.is_contiguous() || !wl.is_contiguous() {
                bail!("lm-head-mixed: contiguous x [n, {hidden}] and head [vocab, {hidden_w}]")
            }
            let data_type = match (x.dtype(), w.dtype()) {
                (DType::BF16, DType::BF16) => cublas::cudaDataType_t::CUDA_R_16BF,
                (DType::F16, DType::F16) => cublas::cudaDataType_t::CUDA_R_16F,
                (a, b) => bail!("lm-head-mixed: dtypes {a:?} and {b:?}"),
            };
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            // SAFETY: the GEMM below (beta = 0) writes every element.
            let out = unsafe { dev.alloc::<f32>(n * vocab) }?;
            {
                let (xp, _gx) = device_ptr(x, xl, &stream)?;
                let (wp, _gw) = device_ptr(w, wl, &stream)?;
                let (op, _go) = out.device_ptr(&stream);
                let (alpha, beta) = (1f32, 0f32);
                // Column-major: logits^T [vocab, n] = head [vocab, hidden] . x^T [hidden, n].
                let status = unsafe {
                    cublas::cublasGemmEx(
                        *dev.cublas_handle().handle(),
                        cublas::cublasOperation_t::CUBLAS_OP_T,
                        cublas::cublasOperation_t::CUBLAS_OP_N,
                        vocab as i32,
                        n as i32,
                        hidden as i32,
                        (&alpha) as *const f32 as *const _,
                        wp as *const _,
                        data_type,
                        hidden as i32,
                        xp as *const _,
                        data_type,
                        hidden as i32,
                        (&beta) as *const f32 as *const _,
                        op as *mut _,
                        cublas::cudaDataType_t::CUDA_R_32F,
                        vocab as i32,
                        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                };
                if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    bail!("lm-head-mixed: cublasGemmEx {status:?}")
                }
            }
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev),
                Shape::from((n, vocab)),
            ))
        }
    }
}
