//! Kernel launches with programmatic dependent launch (PDL): the engine's own kernels may start
//! while the kernel before them in the stream is still finishing.
//!
//! A kernel launched with the programmatic-serialization attribute may begin as soon as every CTA
//! of the kernel before it has executed `griddepcontrol.launch_dependents` (or exited); it must
//! execute `griddepcontrol.wait` (`pdl_wait()` in `engine/kernels/pdl.cuh`), which returns once
//! that kernel has completed and its memory is visible, before it reads or writes anything the
//! stream's earlier work touches. Every kernel launched through [`KernelLaunch`] does so, so a
//! step's decode kernels overlap their launch latency (and the GEMV its first weight reads) with
//! the tail of the kernel before; kernels of candle and cuBLAS launch as usual and keep the
//! stream's ordinary serialization. Off (`set_programmatic_launch(false)`), launches are plain
//! `cuLaunchKernel` and `griddepcontrol.wait` returns at once. Both are capturable in CUDA graphs.

use std::cell::Cell;
use std::ffi::c_void;
use std::marker::PhantomData;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig};
use candle_core::{bail, Result};

use super::switch::Switch;

thread_local! {
    static PDL_HERE: Cell<Option<bool>> = const { Cell::new(None) };
}
static PDL: Switch = Switch::new(true, &PDL_HERE);

/// Turns programmatic dependent launch of the engine's kernels on or off process-wide (on by
/// default). For side-by-side benchmarks.
pub fn set_programmatic_launch(enabled: bool) {
    PDL.set(enabled);
}

/// Overrides the process-wide switch for launches on this thread (`None`: follow it).
pub fn set_programmatic_launch_on_this_thread(enabled: Option<bool>) {
    PDL.set_on_this_thread(enabled);
}

/// Whether launches on this thread carry the programmatic-serialization attribute.
pub fn programmatic_launch() -> bool {
    PDL.on()
}

/// One launch of a kernel whose arguments are plain values (scalars and device addresses): the
/// arguments are borrowed until the launch, like cudarc's builder, without its event tracking
/// (nothing here is a `CudaSlice`).
pub struct KernelLaunch<'a> {
    func: &'a CudaFunction,
    stream: &'a CudaStream,
    args: Vec<*mut c_void>,
    _borrows: PhantomData<&'a ()>,
}

impl<'a> KernelLaunch<'a> {
    pub fn new(func: &'a CudaFunction, stream: &'a CudaStream) -> Self {
        Self {
            func,
            stream,
            args: Vec::with_capacity(20),
            _borrows: PhantomData,
        }
    }

    /// Appends one kernel argument (its bytes are read at the launch).
    pub fn arg<T: Copy>(&mut self, value: &'a T) -> &mut Self {
        self.args.push(value as *const T as *mut c_void);
        self
    }

    /// Launches on the stream, with the programmatic-serialization attribute when the switch is on.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and the kernel
    /// must call `pdl_wait()` before touching memory that earlier work in the stream uses.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let on = programmatic_launch();
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if on { &mut attr } else { std::ptr::null_mut() },
            numAttrs: u32::from(on),
        };
        if let Err(e) = self.stream.context().bind_to_thread() {
            bail!("kernel launch: binding the CUDA context: {e:?}")
        }
        // SAFETY: the caller vouches for the arguments; `config` and `attr` outlive the call.
        let status = unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if status != sys::CUresult::CUDA_SUCCESS {
            bail!("kernel launch (programmatic {on}): {status:?}")
        }
        Ok(())
    }
}
