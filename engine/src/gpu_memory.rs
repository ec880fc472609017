//! GPU memory accounting for startup sizing: free/total memory, the stream-ordered pool's peak use.
//!
//! candle allocates through cudarc's `cuMemAllocAsync`, i.e. the device's default memory pool. By
//! default that pool hands memory back to the driver at every synchronization, so each step would
//! map its activations afresh and a profiling forward leaves no trace in `cuMemGetInfo`. The engine
//! therefore (1) keeps freed memory in the pool (release threshold = max, like a caching
//! allocator), and (2) reads the pool's used-memory high-water mark around the profiling forward
//! to learn the activation peak, as vLLM does with `torch.cuda.max_memory_allocated`.

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::Device;

/// Why a GPU memory query failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuMemoryError {
    #[error("not a CUDA device")]
    NotCuda,
    #[error("{call}: {message}")]
    Driver { call: &'static str, message: String },
}

/// (free, total) bytes of device memory now (`cuMemGetInfo`).
#[cfg(feature = "cuda")]
pub fn mem_get_info(device: &Device) -> Result<(u64, u64), GpuMemoryError> {
    let dev = device
        .as_cuda_device()
        .map_err(|_| GpuMemoryError::NotCuda)?;
    let (free, total) =
        dev.cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| GpuMemoryError::Driver {
                call: "cuMemGetInfo",
                message: e.to_string(),
            })?;
    Ok((free as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
pub fn mem_get_info(_device: &Device) -> Result<(u64, u64), GpuMemoryError> {
    Err(GpuMemoryError::NotCuda)
}

#[cfg(feature = "cuda")]
fn default_pool(device: &Device) -> Result<sys::CUmemoryPool, GpuMemoryError> {
    let dev = device
        .as_cuda_device()
        .map_err(|_| GpuMemoryError::NotCuda)?;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(|e| GpuMemoryError::Driver {
        call: "cuCtxSetCurrent",
        message: e.to_string(),
    })?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| GpuMemoryError::Driver {
            call: "cuDeviceGetDefaultMemPool",
            message: e.to_string(),
        })?;
    Ok(pool)
}

#[cfg(feature = "cuda")]
fn pool_attr(
    device: &Device,
    attr: sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Result<u64, GpuMemoryError> {
    let pool = default_pool(device)?;
    let mut value: u64 = set.unwrap_or(0);
    let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
    // SAFETY: every attribute used here is a cuuint64_t; `ptr` points at a live u64.
    let (call, r) = match set {
        Some(_) => ("cuMemPoolSetAttribute", unsafe {
            sys::cuMemPoolSetAttribute(pool, attr, ptr)
        }),
        None => ("cuMemPoolGetAttribute", unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, ptr)
        }),
    };
    r.result().map_err(|e| GpuMemoryError::Driver {
        call,
        message: e.to_string(),
    })?;
    Ok(value)
}

/// Keep freed memory in the device's default pool instead of returning it at each sync.
#[cfg(feature = "cuda")]
pub fn keep_pool_memory(device: &Device) -> Result<(), GpuMemoryError> {
    pool_attr(
        device,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        Some(u64::MAX),
    )
    .map(|_| ())
}

/// Turns cudarc's per-allocation stream events on or off for tensors allocated from now on.
///
/// cudarc gives every device allocation a read and a write event (created with it, destroyed with
/// it) to order its uses across streams; they are only consulted once a context has more than one
/// stream. The engine runs all of a device's work on one stream, so the engine turns them off:
/// otherwise each op's output costs four driver calls on top of its launch, on the host path that
/// bounds a small decode step.
#[cfg(feature = "cuda")]
pub fn set_event_tracking(device: &Device, on: bool) -> Result<(), GpuMemoryError> {
    let dev = device
        .as_cuda_device()
        .map_err(|_| GpuMemoryError::NotCuda)?;
    // Safety: no second stream is ever created on the engine's contexts, so no allocation relies
    // on these events for cross-stream ordering.
    unsafe {
        if on {
            dev.cuda_stream().context().enable_event_tracking();
        } else {
            dev.disable_event_tracking();
        }
    }
    Ok(())
}

/// Bytes of the default pool in use now (allocated and not yet freed).
#[cfg(feature = "cuda")]
pub fn pool_used(device: &Device) -> Result<u64, GpuMemoryError> {
    pool_attr(
        device,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        None,
    )
}

/// The pool's used-memory high-water mark since the last [`reset_pool_peak`].
#[cfg(feature = "cuda")]
pub fn pool_used_peak(device: &Device) -> Result<u64, GpuMemoryError> {
    pool_attr(
        device,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        None,
    )
}

/// Restart the used-memory high-water mark (the driver accepts only 0).
#[cfg(feature = "cuda")]
pub fn reset_pool_peak(device: &Device) -> Result<(), GpuMemoryError> {
    pool_attr(
        device,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        Some(0),
    )
    .map(|_| ())
}

/// What the KV cache may take on a GPU, vLLM's way: `total * utilization` minus everything already
/// in use after loading (weights, context, library workspaces) minus the activation peak of the
/// profiling forward (memory the pool hands back between steps but needs again at each one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuMemoryProfile {
    pub total: u64,
    /// `total - free` after the weights loaded, before profiling.
    pub used_after_load: u64,
    /// Pool high-water mark during the profiling forward minus the pool's use before it.
    pub activation_peak: u64,
    pub utilization: f64,
}

impl GpuMemoryProfile {
    /// `total * utilization - used_after_load - activation_peak`, or None when nothing is left.
    pub fn kv_budget(&self) -> Option<u64> {
        let limit = (self.total as f64 * self.utilization) as u64;
        limit
            .checked_sub(self.used_after_load)?
            .checked_sub(self.activation_peak)
            .filter(|b| *b > 0)
    }
}

#[cfg(not(feature = "cuda"))]
pub fn keep_pool_memory(_device: &Device) -> Result<(), GpuMemoryError> {
    Err(GpuMemoryError::NotCuda)
}

#[cfg(not(feature = "cuda"))]
pub fn set_event_tracking(_device: &Device, _on: bool) -> Result<(), GpuMemoryError> {
    Err(GpuMemoryError::NotCuda)
}

#[cfg(not(feature = "cuda"))]
pub fn pool_used(_device: &Device) -> Result<u64, GpuMemoryError> {
    Err(GpuMemoryError::NotCuda)
}

#[cfg(not(feature = "cuda"))]
pub fn pool_used_peak(_device: &Device) -> Result<u64, GpuMemoryError> {
    Err(GpuMemoryError::NotCuda)
}

#[cfg(not(feature = "cuda"))]
pub fn reset_pool_peak(_device: &Device) -> Result<(), GpuMemoryError> {
    Err(GpuMemoryError::NotCuda)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_budget_subtracts_load_and_activation_peak() {
        let g = 1u64 << 30;
        let p = GpuMemoryProfile {
            total: 80 * g,
            used_after_load: 4 * g,
            activation_peak: 2 * g,
            utilization: 0.9,
        };
        assert_eq!(p.kv_budget(), Some((80.0 * 0.9 * g as f64) as u64 - 6 * g));
        let full = GpuMemoryProfile {
            activation_peak: 70 * g,
            ..p
        };
        assert_eq!(full.kv_budget(), None);
        let exact = GpuMemoryProfile {
            total: 10 * g,
            used_after_load: 5 * g,
            activation_peak: 0,
            utilization: 0.5,
        };
        assert_eq!(exact.kv_budget(), None);
    }

    #[test]
    fn cpu_device_has_no_gpu_memory() {
        assert!(matches!(
            mem_get_info(&Device::Cpu),
            Err(GpuMemoryError::NotCuda)
        ));
    }
}
