//! The timers and the device's ceilings: host and CUDA-event milliseconds, the queued timer for a
//! part's kernels alone, device-to-device copy bandwidth and square-matmul TFLOP/s.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Milliseconds of `f` on the host, synchronized before and after.
pub(crate) fn host_ms(device: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    device.synchronize()?;
    let t = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// GPU-side milliseconds between CUDA events around `f`, plus the host time until `f` returned
/// (enqueue time; `f` must not synchronize for the comparison to mean anything).
#[cfg(feature = "cuda")]
pub(crate) fn event_ms(device: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<(f64, f64)> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let stream = device.as_cuda_device()?.cuda_stream();
    device.synchronize()?;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let t = Instant::now();
    f()?;
    let enqueue = t.elapsed().as_secs_f64() * 1e3;
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    Ok((enqueue, start.elapsed_ms(&end)? as f64))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn event_ms(_device: &Device, _f: &mut dyn FnMut() -> Result<()>) -> Result<(f64, f64)> {
    bail!("CUDA events need the cuda feature")
}

/// Square bf16 matmuls queued ahead of a part timed by `QueuedTimer` (~6 ms of GPU work).
pub(crate) const BUSY_MATMULS: usize = 4;
#[cfg(feature = "cuda")]
pub(crate) const BUSY_N: usize = 8192;

/// Times a part's kernels back to back on the GPU, without the host's launch gaps: the stream is
/// first given a few large matmuls, so the host has enqueued the whole part before the GPU
/// reaches it, and CUDA events around the part measure the kernels alone (as a graph replay
/// would run them). Parts whose enqueue outlasts the queued work are counted in `late`.
#[cfg(feature = "cuda")]
pub(crate) struct QueuedTimer {
    busy: (Tensor, Tensor),
    pub(crate) busy_ms: f64,
    pub(crate) late: usize,
}

#[cfg(feature = "cuda")]
impl QueuedTimer {
    pub(crate) fn new(device: &Device) -> Result<Self> {
        let a = Tensor::randn(0f32, 1.0, (BUSY_N, BUSY_N), device)?.to_dtype(DType::BF16)?;
        let busy = (a.clone(), a);
        let mut times = Vec::new();
        for _ in 0..3 {
            times.push(
                event_ms(device, &mut || {
                    for _ in 0..BUSY_MATMULS {
                        let _ = busy.0.matmul(&busy.1)?;
                    }
                    Ok(())
                })?
                .1,
            );
        }
        Ok(Self {
            busy,
            busy_ms: median(times),
            late: 0,
        })
    }

    /// GPU milliseconds between events recorded after the queued matmuls and after `f`.
    pub(crate) fn time(
        &mut self,
        device: &Device,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let stream = device.as_cuda_device()?.cuda_stream();
        device.synchronize()?;
        for _ in 0..BUSY_MATMULS {
            let _ = self.busy.0.matmul(&self.busy.1)?;
        }
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let t = Instant::now();
        f()?;
        let enqueue = t.elapsed().as_secs_f64() * 1e3;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        if enqueue > 0.9 * self.busy_ms {
            self.late += 1;
        }
        Ok(start.elapsed_ms(&end)? as f64)
    }
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), cuMemcpyDtoD of `bytes`.
#[cfg(feature = "cuda")]
pub(crate) fn copy_bandwidth(device: &Device, bytes: usize, iters: usize) -> Result<f64> {
    let n = bytes / 4;
    let src = Tensor::randn(0f32, 1.0, n, device)?;
    let stream = device.as_cuda_device()?.cuda_stream();
    let mut dst = stream.alloc_zeros::<f32>(n)?;
    let (storage, _) = src.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        bail!("copy source is not on the GPU")
    };
    let src_slice = s.as_cuda_slice::<f32>()?;
    let mut times = Vec::new();
    for i in 0..iters + 2 {
        let (_, ms) = event_ms(device, &mut || {
            stream.memcpy_dtod(src_slice, &mut dst)?;
            Ok(())
        })?;
        if i >= 2 {
            times.push(ms);
        }
    }
    Ok(2.0 * (n * 4) as f64 / (median(times) * 1e-3) / 1e9)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn copy_bandwidth(device: &Device, bytes: usize, iters: usize) -> Result<f64> {
    let src = Tensor::randn(0f32, 1.0, bytes / 4, device)?;
    let mut times = Vec::new();
    for _ in 0..iters {
        times.push(host_ms(device, &mut || {
            let _ = src.copy()?;
            Ok(())
        })?);
    }
    Ok(2.0 * bytes as f64 / (median(times) * 1e-3) / 1e9)
}

/// Square matmul TFLOP/s in `dtype` (random inputs).
pub(crate) fn matmul_tflops(device: &Device, dtype: DType, n: usize, iters: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let mut times = Vec::new();
    for i in 0..iters + 2 {
        let ms = host_ms(device, &mut || {
            let _ = a.matmul(&b)?;
            Ok(())
        })?;
        if i >= 2 {
            times.push(ms);
        }
    }
    Ok(2.0 * (n as f64).powi(3) / (median(times) * 1e-3) / 1e12)
}
