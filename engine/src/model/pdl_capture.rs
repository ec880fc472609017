//! Programmatic edges for PDL launches inside a CUDA graph capture.
//!
//! Stream capture turns a PDL launch into a programmatic edge only when the kernel directly
//! follows another kernel. In a captured forward, candle's allocations and frees of intermediate
//! tensors (graph memory nodes) sit between consecutive kernels, and the driver refuses to remove
//! edges from a graph that holds memory nodes. So the edges are chosen while capturing:
//! - Before a PDL kernel K is captured, if everything captured since the previous PDL kernel P is
//!   memory nodes, K's dependencies are set to P alone, through a programmatic edge.
//! - After K, the capture's dependencies are K plus those memory nodes (normal edges), so that
//!   every later node still follows them (a free after its allocation) and any kernel or copy
//!   that is not a PDL launch waits for K to complete.
//!
//! K then no longer follows the allocation of its own output. That is sound for these kernels:
//! graph memory is mapped for the whole replay, and a PDL kernel writes nothing before its
//! `pdl_enter()` (engine/kernels/pdl.cuh), which returns only once P has completed, and with it
//! everything the allocation was ordered after.
//!
//! Only kernels on the same stream chain (a launch on a side stream starts no chain and follows
//! none). Used while [`super::pdl::pdl_in_graphs`] is on.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::Result;

/// The previous PDL kernel captured on this thread and the memory nodes carried after it.
struct Chained {
    capture: u64,
    stream: usize,
    kernel: sys::CUgraphNode,
    carried: Vec<sys::CUgraphNode>,
}

thread_local! {
    static LAST: RefCell<Option<Chained>> = const { RefCell::new(None) };
    /// A capture runs on this thread (`Capturing`): only then do launches ask the driver.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

/// A CUDA graph capture on this thread, until dropped: launches inside it chain ([`chained`];
/// launches outside it, eager steps, skip the capture query), or, with
/// [`super::pdl::pdl_in_graphs`] off, run with PDL off.
pub(super) struct Capturing {
    was_capturing: bool,
    /// This thread's PDL override before, when the capture turned PDL off.
    pdl_before: Option<Option<bool>>,
}

impl Capturing {
    pub(super) fn on_this_thread() -> Self {
        use super::pdl::{pdl_in_graphs, pdl_on_this_thread, set_pdl_on_this_thread};
        let pdl_before = (!pdl_in_graphs()).then(|| {
            let before = pdl_on_this_thread();
            set_pdl_on_this_thread(Some(false));
            before
        });
        Self {
            was_capturing: CAPTURING.with(|c| c.replace(true)),
            pdl_before,
        }
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        CAPTURING.with(|c| c.set(self.was_capturing));
        if let Some(before) = self.pdl_before {
            super::pdl::set_pdl_on_this_thread(before);
        }
    }
}

/// Whether a capture runs on this thread.
pub(super) fn capturing() -> bool {
    CAPTURING.with(Cell::get)
}

static EDGES: AtomicUsize = AtomicUsize::new(0);

/// Programmatic kernel-to-kernel edges made in captures so far (process-wide).
pub fn programmatic_edges() -> usize {
    EDGES.load(Ordering::Relaxed)
}

struct Capture {
    id: u64,
    deps: Vec<sys::CUgraphNode>,
}

/// The stream's capture, if it is capturing.
fn capture_info(stream: &CudaStream) -> Result<Option<Capture>> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let mut id = 0;
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let mut deps: *const sys::CUgraphNode = std::ptr::null();
    let mut edges: *const sys::CUgraphEdgeData = std::ptr::null();
    let mut n = 0usize;
    unsafe {
        sys::cuStreamGetCaptureInfo_v3(
            stream.cu_stream(),
            &mut status,
            &mut id,
            &mut graph,
            &mut deps,
            &mut edges,
            &mut n,
        )
    }
    .result()
    .w()?;
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
        return Ok(None);
    }
    let deps = if n == 0 || deps.is_null() {
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(deps, n) }.to_vec()
    };
    Ok(Some(Capture { id, deps }))
}

fn node_type(node: sys::CUgraphNode) -> Result<sys::CUgraphNodeType> {
    let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    unsafe { sys::cuGraphNodeGetType(node, &mut t) }
        .result()
        .w()?;
    Ok(t)
}

fn dependencies(node: sys::CUgraphNode) -> Result<Vec<sys::CUgraphNode>> {
    let mut n = 0usize;
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(node, std::ptr::null_mut(), std::ptr::null_mut(), &mut n)
    }
    .result()
    .w()?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(node, nodes.as_mut_ptr(), std::ptr::null_mut(), &mut n)
    }
    .result()
    .w()?;
    nodes.truncate(n);
    Ok(nodes)
}

fn is_memory_node(node: sys::CUgraphNode) -> Result<bool> {
    Ok(matches!(
        node_type(node)?,
        sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC
            | sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE
    ))
}

/// Whether everything between `last.kernel` and the capture frontier `deps` is memory nodes
/// (walking back through them, stopping at the kernel and at the nodes carried after it).
fn only_memory_since(last: &Chained, deps: &[sys::CUgraphNode]) -> Result<bool> {
    let stop: HashSet<usize> = last.carried.iter().map(|n| *n as usize).collect();
    let mut seen = HashSet::new();
    let mut todo = deps.to_vec();
    let mut reached = false;
    while let Some(node) = todo.pop() {
        if node == last.kernel {
            reached = true;
            continue;
        }
        if stop.contains(&(node as usize)) || !seen.insert(node as usize) {
            continue;
        }
        if !is_memory_node(node)? {
            return Ok(false);
        }
        todo.extend(dependencies(node)?);
    }
    Ok(reached)
}

fn set_dependencies(
    stream: &CudaStream,
    nodes: &mut [sys::CUgraphNode],
    edges: &[sys::CUgraphEdgeData],
) -> Result<()> {
    unsafe {
        sys::cuStreamUpdateCaptureDependencies_v2(
            stream.cu_stream(),
            nodes.as_mut_ptr(),
            edges.as_ptr(),
            nodes.len(),
            sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES as u32,
        )
    }
    .result()
    .w()
}

fn normal() -> sys::CUgraphEdgeData {
    // SAFETY: plain data; all zeros is a full dependency.
    unsafe { std::mem::zeroed() }
}

fn programmatic() -> sys::CUgraphEdgeData {
    let mut e = normal();
    e.from_port = sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8;
    e.type_ = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
    e
}

/// Runs `launch` (one PDL kernel launch on `stream`) with the edges described at the top when
/// the stream is capturing; otherwise just runs it.
pub(super) fn chained(stream: &CudaStream, launch: impl FnOnce() -> Result<()>) -> Result<()> {
    let Some(cap) = capture_info(stream)? else {
        LAST.with(|l| l.borrow_mut().take());
        return launch();
    };
    let last = LAST.with(|l| l.borrow_mut().take());
    let mut carried = Vec::new();
    let here = stream.cu_stream() as usize;
    if let Some(last) = last.filter(|l| l.capture == cap.id && l.stream == here) {
        if only_memory_since(&last, &cap.deps)? {
            carried = cap
                .deps
                .iter()
                .copied()
                .filter(|n| *n != last.kernel)
                .collect();
            set_dependencies(stream, &mut [last.kernel], &[programmatic()])?;
            EDGES.fetch_add(1, Ordering::Relaxed);
        }
    }
    launch()?;
    let after = capture_info(stream)?.map(|c| c.deps).unwrap_or_default();
    let [kernel] = after[..] else {
        return Ok(());
    };
    if !carried.is_empty() {
        let mut nodes: Vec<_> = std::iter::once(kernel)
            .chain(carried.iter().copied())
            .collect();
        let edges = vec![normal(); nodes.len()];
        set_dependencies(stream, &mut nodes, &edges)?;
    }
    LAST.with(|l| {
        *l.borrow_mut() = Some(Chained {
            capture: cap.id,
            stream: here,
            kernel,
            carried,
        })
    });
    Ok(())
}
