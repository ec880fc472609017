//! CUDA graphs for decode-only steps: the paged forward captured once per batch shape, then replayed.
//!
//! A batch-1 decode step launches ~300 small kernels and is bound by their host-side cost. Steps
//! in which every sequence has one query token and is sampled are padded to a batch bucket (1, 2,
//! 4, ... `MAX_BATCH` rows) and a block-table width bucket (powers of two, at least `MIN_WIDTH`);
//! each (rows, width) pair is captured once over static input tensors and replayed after the
//! step's inputs are copied into them in stream order. Padding rows read block 0 and write no KV
//! (slot -1); their logits are dropped. Every other step runs eagerly. Graphs are opt-in
//! (`set_cuda_graphs`); a failed capture is logged and turns graphs off for the model.
//!
//! What a replay must not depend on:
//! - Host memory. candle uploads small kernel parameters (dims, strides) from temporary host
//!   buffers; captured as they are, replays would read freed host memory. The capture (and the
//!   eager warm-up before it, same shapes) runs under candle's upload cache
//!   (`CudaDevice::enable_cuda_graph_htod_cache`), which keeps those buffers on the device and
//!   fails the capture on an upload it has not seen. The step's own inputs live in static tensors.
//! - Memory it does not own. Every tensor made inside the capture is dropped inside it (graph
//!   memory); the logits land in a tensor allocated before. cuBLAS gets a workspace of its own
//!   before the first capture, so that it never allocates one inside a capture.
//! - A changed KV cache. Graphs hold the cache's addresses: they are dropped when it changes.
//! - A changed setting that captures bake in (`invalidate_graphs`): they are dropped too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CpuStorage, CudaStorage, DType, InplaceOp1, Layout, Result, Tensor};
use candle_core::{Device, TensorId};

use super::attention::{split_counters, AttentionMetadata, HostMetadata};
use super::llama::{LlamaModel, StepInputs};
use super::{CausalLM, ForwardBatch, KvCache};

/// Largest decode batch that is captured (larger ones are not launch-bound).
pub const MAX_BATCH: usize = 256;
/// Narrowest block-table bucket.
pub const MIN_WIDTH: usize = 16;
/// Eager forwards over the static inputs before a capture: load every kernel, let cuBLAS pick its
/// algorithms, and fill candle's upload cache with every parameter buffer the capture uploads.
const WARMUP_FORWARDS: usize = 2;
/// Only this thread's potentially unsafe CUDA calls (a synchronous allocation, say) fail the
/// capture; other threads' calls (memory queries) are unaffected, as they would not be under
/// `GLOBAL`.
const CAPTURE_MODE: sys::CUstreamCaptureMode =
    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
/// Bytes of the cuBLAS workspace handed to the device's handle.
const CUBLAS_WORKSPACE: usize = 32 << 20;

static REPLAYS: AtomicUsize = AtomicUsize::new(0);
/// Bumped by a change of a setting that graphs capture (`invalidate_graphs`).
static SETTINGS_EPOCH: AtomicUsize = AtomicUsize::new(0);
static FAILED_CAPTURES: AtomicUsize = AtomicUsize::new(0);
static LAST_CAPTURE_ERROR: Mutex<Option<String>> = Mutex::new(None);

crate::switch! {
    static GRAPHS = false;
}

/// Turns decode graphs on or off process-wide (off by default; `--cuda-graphs` turns them on).
pub fn set_cuda_graphs(enabled: bool) {
    GRAPHS.set(enabled);
}

/// Overrides the process-wide switch for forwards called on this thread (`None`: follow it); for
/// tests that compare both paths while other threads run models.
pub fn set_cuda_graphs_on_this_thread(enabled: Option<bool>) {
    GRAPHS.set_on_this_thread(enabled);
}

/// Whether forwards called on this thread may replay graphs.
pub fn cuda_graphs_enabled() -> bool {
    GRAPHS.on()
}

/// Makes every model drop its captured graphs before its next step (a setting that captures bake
/// in has changed, e.g. `l2_prefetch::set_l2_prefetch`).
pub fn invalidate_graphs() {
    SETTINGS_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Decode steps run from a graph, and captures that failed, in this process so far.
pub fn graph_counts() -> (usize, usize) {
    (
        REPLAYS.load(Ordering::Relaxed),
        FAILED_CAPTURES.load(Ordering::Relaxed),
    )
}

/// Why the last failed capture failed.
pub fn last_capture_error() -> Option<String> {
    LAST_CAPTURE_ERROR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The captured decode graphs of one model.
#[derive(Default)]
pub struct DecodeGraphs {
    graphs: HashMap<(usize, usize), Captured>,
    /// The KV cache the graphs were captured against (every layer's K and V tensor).
    cache: Vec<(TensorId, TensorId)>,
    /// `SETTINGS_EPOCH` when the graphs were captured.
    epoch: usize,
    /// f32 `[rows, vocab]` per batch bucket, shared by its graphs: each replay's logits are
    /// copied out before the next replay is enqueued.
    logits: HashMap<usize, Tensor>,
    failed: bool,
    cublas_workspace_set: bool,
}

impl std::fmt::Debug for DecodeGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shapes: Vec<_> = self.graphs.keys().collect();
        shapes.sort();
        f.debug_struct("DecodeGraphs")
            .field("shapes", &shapes)
            .field("failed", &self.failed)
            .finish()
    }
}

struct Captured {
    /// First, so the graph goes before the memory it reads.
    graph: Graph,
    inputs: StaticInputs,
    /// f32 `[rows, vocab]`, written by every replay (shared with the bucket's other graphs).
    logits: Tensor,
}

/// A graph is only used under the model's mutex, by one thread at a time; CUDA asks for that
/// serialization, not for thread affinity.
struct Graph(CudaGraph);
unsafe impl Send for Graph {}

impl DecodeGraphs {
    /// Runs `batch` through a graph and returns its logits, or `None` when the step runs eagerly.
    pub fn run(
        &mut self,
        model: &LlamaModel,
        batch: &ForwardBatch,
        cache: &KvCache,
    ) -> Result<Option<Tensor>> {
        if self.failed || !cuda_graphs_enabled() {
            return Ok(None);
        }
        let Some((rows, width)) = bucket(batch) else {
            return Ok(None);
        };
        // Tensors that record cudarc events would make the capture wait on events from before it.
        if model.device().as_cuda_device()?.is_event_tracking() {
            return Ok(None);
        }
        let Some((key_cache, _)) = cache.layers.first() else {
            return Ok(None);
        };
        let ids: Vec<_> = cache.layers.iter().map(|(k, v)| (k.id(), v.id())).collect();
        let epoch = SETTINGS_EPOCH.load(Ordering::Relaxed);
        if self.cache != ids || self.epoch != epoch {
            self.graphs.clear();
            self.cache = ids;
            self.epoch = epoch;
        }
        let block_size = key_cache.dim(1)?;
        let step = PaddedStep::new(batch, rows, width);
        let key = (rows, width);
        if !self.graphs.contains_key(&key) {
            match self.capture(model, &step, cache, block_size) {
                Ok(c) => {
                    tracing::debug!(rows, width, "captured a decode CUDA graph");
                    self.graphs.insert(key, c);
                }
                Err(e) => {
                    FAILED_CAPTURES.fetch_add(1, Ordering::Relaxed);
                    *LAST_CAPTURE_ERROR.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(e.to_string());
                    tracing::warn!(
                        rows,
                        width,
                        "CUDA graph capture failed ({e}); decode steps run eagerly from now on"
                    );
                    self.failed = true;
                    self.graphs.clear();
                    self.logits.clear();
                    return Ok(None);
                }
            }
        }
        let c = &self.graphs[&key];
        step.copy_into(&c.inputs)?;
        c.graph.0.launch().w()?;
        REPLAYS.fetch_add(1, Ordering::Relaxed);
        // A copy: the next replay overwrites the graph's own buffer.
        Ok(Some(c.logits.narrow(0, 0, batch.seqs.len())?.copy()?))
    }

    fn capture(
        &mut self,
        model: &LlamaModel,
        step: &PaddedStep,
        cache: &KvCache,
        block_size: usize,
    ) -> Result<Captured> {
        if !self.cublas_workspace_set {
            set_cublas_workspace(model.device())?;
            self.cublas_workspace_set = true;
        }
        let logits = match self.logits.get(&step.rows) {
            Some(t) => t.clone(),
            None => {
                let vocab = model.config().vocab_size;
                let t = Tensor::zeros((step.rows, vocab), DType::F32, model.device())?;
                self.logits.insert(step.rows, t.clone());
                t
            }
        };
        capture(model, step, cache, block_size, logits)
    }
}

/// (batch rows, block-table width) buckets of a graph-eligible step, or `None`.
fn bucket(batch: &ForwardBatch) -> Option<(usize, usize)> {
    let n = batch.seqs.len();
    let decode_only = n > 0
        && n <= MAX_BATCH
        && batch.token_ids.len() == n
        && batch
            .seqs
            .iter()
            .all(|s| s.query_len == 1 && s.compute_logits);
    if !decode_only {
        return None;
    }
    let width = batch.seqs.iter().map(|s| s.block_table.len()).max()?;
    Some((
        n.next_power_of_two(),
        width.next_power_of_two().max(MIN_WIDTH),
    ))
}

/// A decode step's host inputs padded to `rows` sequences and block tables `width` wide.
struct PaddedStep {
    rows: usize,
    width: usize,
    /// u32 `[token_ids (rows) | positions (rows) | context_lens (rows) | block_tables (rows x
    /// width)]`, one copy per step.
    packed: Vec<u32>,
    /// i64 `[rows]`, -1 for the padding rows.
    slots: Vec<i64>,
}

impl PaddedStep {
    fn new(batch: &ForwardBatch, rows: usize, width: usize) -> Self {
        let mut packed = Vec::with_capacity(rows * (3 + width));
        packed.extend_from_slice(&batch.token_ids);
        packed.resize(rows, 0);
        packed.extend_from_slice(&batch.positions);
        packed.resize(2 * rows, 0);
        packed.extend(batch.seqs.iter().map(|s| s.context_len as u32));
        // A padding row attends to one key of block 0.
        packed.resize(3 * rows, 1);
        for s in &batch.seqs {
            let end = packed.len() + width;
            packed.extend_from_slice(&s.block_table);
            packed.resize(end, 0);
        }
        packed.resize(rows * (3 + width), 0);
        let mut slots = batch.slot_mapping.clone();
        slots.resize(rows, -1);
        Self {
            rows,
            width,
            packed,
            slots,
        }
    }

    /// Copies this step into a graph's static inputs (same bucket), in stream order.
    fn copy_into(&self, inputs: &StaticInputs) -> Result<()> {
        inputs.packed.inplace_op1(&CopyIn::U32(&self.packed))?;
        inputs.slots.inplace_op1(&CopyIn::I64(&self.slots))
    }
}

/// A graph's input tensors: `step` views `packed` and `slots`.
struct StaticInputs {
    packed: Tensor,
    slots: Tensor,
    step: StepInputs,
}

impl StaticInputs {
    /// Allocates the inputs of `step`'s bucket, holding `step`.
    fn new(step: &PaddedStep, block_size: usize, device: &Device) -> Result<Self> {
        let (rows, width) = (step.rows, step.width);
        let packed = Tensor::new(step.packed.as_slice(), device)?;
        let slots = Tensor::new(step.slots.as_slice(), device)?;
        let query_start_loc: Vec<u32> = (0..=rows as u32).collect();
        let meta = AttentionMetadata {
            block_tables: packed
                .narrow(0, 3 * rows, rows * width)?
                .reshape((rows, width))?,
            context_lens: packed.narrow(0, 2 * rows, rows)?,
            query_start_loc: Tensor::new(query_start_loc.as_slice(), device)?,
            // Any context up to the table width: sizes the attention's context partitions.
            max_context_len: width * block_size,
            max_query_len: 1,
            min_query_len: 1,
            split_counters: split_counters(rows, device)?,
            // The capture step's (the CUDA kernels read the tensors).
            host: HostMetadata {
                block_tables: step.packed[3 * rows..]
                    .chunks(width)
                    .map(<[u32]>::to_vec)
                    .collect(),
                context_lens: step.packed[2 * rows..3 * rows].to_vec(),
                query_start_loc,
            },
        };
        let step = StepInputs {
            token_ids: packed.narrow(0, 0, rows)?,
            positions: packed.narrow(0, rows, rows)?,
            slot_mapping: slots.clone(),
            meta,
        };
        Ok(Self {
            packed,
            slots,
            step,
        })
    }
}

/// Captures the forward over static inputs holding `step`, writing `logits`, after eager warm-up
/// forwards over the same inputs (they write the same K/V the step writes).
fn capture(
    model: &LlamaModel,
    step: &PaddedStep,
    cache: &KvCache,
    block_size: usize,
    logits: Tensor,
) -> Result<Captured> {
    let device = model.device();
    let cuda = device.as_cuda_device()?;
    let inputs = StaticInputs::new(step, block_size, device)?;
    let forward = || model.logits(&model.hidden_states(&inputs.step, cache)?);
    // Thread-local: the warm-up and the capture run on this thread, under one guard.
    let _uploads_cached = cuda.enable_cuda_graph_htod_cache();
    // With programmatic edges while `pdl_in_graphs` is on, else without PDL (`pdl_capture`).
    let _capturing = super::pdl_capture::Capturing::on_this_thread();
    let _persistent = super::decode_step::CaptureSetting::on_this_thread();
    for _ in 0..WARMUP_FORWARDS {
        forward()?;
    }
    device.synchronize()?;
    let stream = cuda.cuda_stream();
    stream.begin_capture(CAPTURE_MODE).w()?;
    // Every tensor made inside is dropped inside (graph memory); only `logits` outlives it.
    let body = forward().and_then(|out| logits.slice_set(&out, 0, 0));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    body?;
    let Some(graph) = graph.w()? else {
        bail!("the capture recorded no work")
    };
    Ok(Captured {
        graph: Graph(graph),
        inputs,
        logits,
    })
}

/// Gives the device's cuBLAS handle a workspace of its own (kept for the life of the process).
fn set_cublas_workspace(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE).w()?;
    let blas = cuda.cublas_handle();
    let status = {
        let (ptr, _guard) = workspace.device_ptr(&stream);
        // SAFETY: a live handle and a device allocation of the given size that is never freed.
        unsafe {
            cublas::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE,
            )
        }
    };
    if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("cublasSetWorkspace: {status:?}")
    }
    // The handle keeps using it for as long as the device lives.
    std::mem::forget(workspace);
    Ok(())
}

/// Host data copied into a whole static input tensor of the same length, in place, on the
/// stream (cudarc's copy, which candle's upload cache never sees).
enum CopyIn<'a> {
    U32(&'a [u32]),
    I64(&'a [i64]),
}

impl InplaceOp1 for CopyIn<'_> {
    fn name(&self) -> &'static str {
        "graph-input-copy"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("graph inputs live on the GPU")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        let len = l.shape().elem_count();
        if !l.is_contiguous() || l.start_offset() != 0 {
            bail!("graph input: not a whole contiguous tensor")
        }
        let stream = s.device().cuda_stream();
        match (&mut s.slice, self) {
            (CudaStorageSlice::U32(d), CopyIn::U32(h)) if h.len() == len && d.len() == len => {
                stream.memcpy_htod(*h, d).w()?
            }
            (CudaStorageSlice::I64(d), CopyIn::I64(h)) if h.len() == len && d.len() == len => {
                stream.memcpy_htod(*h, d).w()?
            }
            _ => bail!("graph input: dtype or length mismatch"),
        }
        Ok(())
    }
}
