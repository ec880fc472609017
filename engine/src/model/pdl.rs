//! Launches of the engine's own kernels with programmatic dependent launch (PDL, Hopper): a kernel
//! may start while the one before it in the stream finishes, prefetch its weights, and wait in
//! `griddepcontrol.wait` (engine/kernels/pdl.cuh) until that one's writes are visible.
//!
//! Only kernels that call `pdl_enter()` before they read an earlier kernel's output or write
//! anything may be launched here: the attribute lets them start early, the wait keeps them
//! correct. On a GPU below sm_90, or with the switch off, the launch is an ordinary one.
//!
//! CUDA graph captures keep it ([`pdl_in_graphs`], on): `pdl_capture` chains the captured kernels
//! by programmatic edges. Off, captures run with the switch off on their thread
//! (`pdl_capture::Capturing`).
//!
//! A launch may also ask for thread-block clusters (`Launch::cluster`; the decode attention's
//! cluster merge), passed as a second launch attribute.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaStream, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

crate::switch! {
    /// Kernels of `engine/kernels` launched with the programmatic stream-serialization attribute
    /// (on) or as ordinary launches (off).
    static PDL = true;
}

crate::switch! {
    /// CUDA graph captures keep programmatic dependent launch (on): each PDL kernel gets a
    /// programmatic edge from the PDL kernel before it when only graph memory nodes lie between
    /// them (`pdl_capture`). Off, captures run with PDL off on their thread. The edges alone did
    /// not pay at batch 1 (run27; run66b 1.253 ms against 1.239-1.250 without); with kernels that
    /// work before their wait (the decode attention's K/V copies, the o projection's loads) the
    /// H200 Qwen2.5-1.5B step took 1.199 ms at batch 1 and 1.733 at batch 8 against 1.251 and
    /// 1.796 without both (days/gpu-engine/run69), CodeLlama-34B batch 1 15.80 against 15.95 ms
    /// without the edges (run68c).
    static PDL_GRAPHS = true;
}

/// Turns programmatic edges in CUDA graph captures on or off process-wide (side-by-side
/// benchmarks). Captured graphs are dropped, to be captured again under the new setting.
pub fn set_pdl_in_graphs(on: bool) {
    PDL_GRAPHS.set(on);
    super::cuda_graph::invalidate_graphs();
}

/// [`set_pdl_in_graphs`] for captures on this thread (`None`: the process-wide value).
pub fn set_pdl_in_graphs_on_this_thread(on: Option<bool>) {
    PDL_GRAPHS.set_on_this_thread(on);
    super::cuda_graph::invalidate_graphs();
}

/// Whether captures on this thread keep programmatic dependent launch.
pub fn pdl_in_graphs() -> bool {
    PDL_GRAPHS.on()
}

/// Turns programmatic dependent launch on or off process-wide (side-by-side benchmarks).
pub fn set_pdl(on: bool) {
    PDL.set(on);
}

/// [`set_pdl`] for launches on this thread (`None`: the process-wide value).
pub fn set_pdl_on_this_thread(on: Option<bool>) {
    PDL.set_on_this_thread(on);
}

/// This thread's override, if any.
pub fn pdl_on_this_thread() -> Option<bool> {
    PDL.this_thread()
}

/// Whether launches on this thread carry the attribute.
pub fn pdl() -> bool {
    PDL.on()
}

/// A kernel launch being built: the function, the device's stream and pointers to the arguments,
/// which must outlive the launch (`'a`).
pub struct Launch<'a> {
    func: CudaFunction,
    stream: Arc<CudaStream>,
    args: Vec<*mut c_void>,
    /// Thread-block cluster dimensions (sm_90), none when `None`.
    cluster: Option<(u32, u32, u32)>,
    /// Launch without the PDL attribute whatever the switch.
    ordinary: bool,
    _args: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    /// Starts a launch of kernel `name` (one of engine/kernels' functions, with the wait) of
    /// `module`, loaded from `ptx` on first use, on `dev`'s stream.
    pub fn new(dev: &CudaDevice, name: &str, module: &str, ptx: &str) -> Result<Self> {
        Ok(Self {
            func: dev
                .get_or_load_custom_func(name, module, ptx)?
                .into_cuda_function(),
            stream: dev.cuda_stream(),
            args: Vec::with_capacity(16),
            cluster: None,
            ordinary: false,
            _args: PhantomData,
        })
    }

    /// The kernel being launched (to set its attributes, e.g. its dynamic shared-memory limit).
    pub fn function(&self) -> &CudaFunction {
        &self.func
    }

    /// Launches the grid as thread-block clusters of `dims` CTAs (sm_90; the grid must be a whole
    /// number of clusters). Above 8 CTAs (the portable size, up to 16 on H100/H200) the kernel is
    /// allowed non-portable sizes first.
    pub fn cluster(&mut self, dims: (u32, u32, u32)) -> Result<&mut Self> {
        if dims.0 * dims.1 * dims.2 > 8 {
            self.func
                .set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                    1,
                )
                .w()?;
        }
        self.cluster = Some(dims);
        Ok(self)
    }

    /// Queues the launch on `stream` instead of the device's own (a side stream).
    pub fn on_stream(&mut self, stream: Arc<CudaStream>) -> &mut Self {
        self.stream = stream;
        self
    }

    /// Launches without the programmatic stream-serialization attribute, whatever the switch.
    pub fn ordinary(&mut self) -> &mut Self {
        self.ordinary = true;
        self
    }

    /// Appends one kernel argument (a scalar or a device pointer as `u64`).
    pub fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.args.push(value as *const T as *mut c_void);
        self
    }

    /// Queues the kernel, with the PDL attribute when [`pdl`] is on and the cluster dimensions
    /// when set.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters, and the kernel must call `pdl_enter()`
    /// before it touches anything an earlier kernel writes or reads.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        self.stream.context().bind_to_thread().w()?;
        let mut attrs: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
        let mut num_attrs = 0;
        let programmatic = pdl() && !self.ordinary;
        if programmatic {
            let a = &mut attrs[num_attrs];
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            a.value.programmaticStreamSerializationAllowed = 1;
            num_attrs += 1;
        }
        if let Some((x, y, z)) = self.cluster {
            let a = &mut attrs[num_attrs];
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            a.value.clusterDim.x = x;
            a.value.clusterDim.y = y;
            a.value.clusterDim.z = z;
            num_attrs += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: num_attrs as u32,
        };
        let func = self.func.cu_function();
        let args = self.args.as_mut_ptr();
        // `config`, `attrs` and the arguments outlive the call.
        let launch = || {
            unsafe { sys::cuLaunchKernelEx(&config, func, args, std::ptr::null_mut()) }
                .result()
                .w()
        };
        if programmatic && super::pdl_capture::capturing() {
            super::pdl_capture::chained(&self.stream, launch)
        } else {
            launch()
        }
    }
}
