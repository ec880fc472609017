//! CUDA graphs for decode steps: the paged forward captured once per batch shape, then replayed.
//!
//! A decode step launches ~300 small kernels, and at small batches their host-side cost (candle
//! op bookkeeping, allocation, launch) exceeds their GPU time. As in vLLM, decode-only steps
//! (every sequence one query token, every sequence sampled) are padded to a batch bucket (1, 2, 4,
//! ... `MAX_BATCH`) and a block-table width bucket (powers of two); each (batch, width) pair is
//! captured once over static input tensors and replayed after the step's inputs are copied in.
//! Padding rows read block 0 and write no KV (slot -1); their logits are dropped. Everything else
//! runs eagerly. Graphs are opt-in (`--cuda-graphs`). A failed capture is logged and turns graphs
//! off for the model. cuBLAS gets a workspace of its own before the first capture, so that it
//! never allocates one inside a capture.
//!
//! The captured forward allocates only inside the capture (graph memory, freed inside it) and
//! writes its logits into a tensor allocated before the capture, so replays reuse fixed addresses.
//! Graphs hold the addresses of the KV cache: they are dropped when the cache changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CpuStorage, CudaStorage, DType, InplaceOp1, Layout, Result, Tensor};
use candle_core::{Device, TensorId};

use super::attention::{AttentionMetadata, HostMetadata};
use super::llama::{LlamaModel, StepInputs};
use super::{CausalLM, ForwardBatch, KvCache};

/// Largest decode batch that is captured (larger ones are not launch-bound).
pub const MAX_BATCH: usize = 256;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns decode graphs on or off process-wide (off by default; `--cuda-graphs` turns them on).
pub fn set_cuda_graphs(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

pub fn cuda_graphs_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

static REPLAYS: AtomicUsize = AtomicUsize::new(0);
static FAILED_CAPTURES: AtomicUsize = AtomicUsize::new(0);

/// Decode steps run from a graph, and captures that failed, in this process so far.
pub fn graph_counts() -> (usize, usize) {
    (
        REPLAYS.load(Ordering::Relaxed),
        FAILED_CAPTURES.load(Ordering::Relaxed),
    )
}

/// The captured decode graphs of one model.
#[derive(Default)]
pub struct DecodeGraphs {
    graphs: HashMap<(usize, usize), Captured>,
    /// The KV cache the graphs were captured against (its first key tensor).
    cache: Option<TensorId>,
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
    inputs: StepInputs,
    /// f32 `[batch, vocab]`, written by every replay.
    logits: Tensor,
    graph: Graph,
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
        let Some((key_cache, _)) = cache.layers.first() else {
            return Ok(None);
        };
        if self.cache != Some(key_cache.id()) {
            self.graphs.clear();
            self.cache = Some(key_cache.id());
        }
        let block_size = key_cache.dim(1)?;
        let step = PaddedStep::new(batch, rows, width);
        if let Some(c) = self.graphs.get(&(rows, width)) {
            step.copy_into(&c.inputs)?;
            c.graph.0.launch().w()?;
            REPLAYS.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(c.logits.narrow(0, 0, batch.seqs.len())?));
        }
        if !self.cublas_workspace_set {
            set_cublas_workspace(model.device())?;
            self.cublas_workspace_set = true;
        }
        match capture(model, &step, cache, block_size) {
            Ok(c) => {
                c.graph.0.launch().w()?;
                REPLAYS.fetch_add(1, Ordering::Relaxed);
                let logits = c.logits.narrow(0, 0, batch.seqs.len())?;
                tracing::debug!(rows, width, "captured a decode CUDA graph");
                self.graphs.insert((rows, width), c);
                Ok(Some(logits))
            }
            Err(e) => {
                FAILED_CAPTURES.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "CUDA graph capture failed ({e}); decode steps run eagerly from now on"
                );
                self.failed = true;
                self.graphs.clear();
                Ok(None)
            }
        }
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
    Some((n.next_power_of_two(), width.next_power_of_two().max(16)))
}

/// A decode step's host inputs padded to `rows` sequences and block tables `width` wide.
struct PaddedStep {
    rows: usize,
    width: usize,
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    slot_mapping: Vec<i64>,
    block_tables: Vec<u32>,
    context_lens: Vec<u32>,
}

impl PaddedStep {
    fn new(batch: &ForwardBatch, rows: usize, width: usize) -> Self {
        let n = batch.seqs.len();
        let mut block_tables = vec![0u32; rows * width];
        for (i, s) in batch.seqs.iter().enumerate() {
            block_tables[i * width..][..s.block_table.len()].copy_from_slice(&s.block_table);
        }
        let pad = |v: &[u32], fill: u32| -> Vec<u32> {
            v.iter()
                .copied()
                .chain(std::iter::repeat_n(fill, rows - n))
                .collect()
        };
        let context_lens: Vec<u32> = batch.seqs.iter().map(|s| s.context_len as u32).collect();
        let mut slot_mapping = batch.slot_mapping.clone();
        slot_mapping.resize(rows, -1);
        Self {
            rows,
            width,
            token_ids: pad(&batch.token_ids, 0),
            positions: pad(&batch.positions, 0),
            slot_mapping,
            block_tables,
            // A padding row attends to one key of block 0.
            context_lens: pad(&context_lens, 1),
        }
    }

    /// Static inputs holding this step (allocated once per graph).
    fn upload(&self, device: &Device, block_size: usize) -> Result<StepInputs> {
        let rows: Vec<u32> = (0..self.rows as u32).collect();
        let query_start_loc: Vec<u32> = (0..=self.rows as u32).collect();
        let meta = AttentionMetadata {
            block_tables: Tensor::from_slice(&self.block_tables, (self.rows, self.width), device)?,
            context_lens: Tensor::new(self.context_lens.as_slice(), device)?,
            query_start_loc: Tensor::new(query_start_loc.as_slice(), device)?,
            // Any context length up to the table width: sizes the attention's context split.
            max_context_len: self.width * block_size,
            max_query_len: 1,
            host: HostMetadata {
                block_tables: self
                    .block_tables
                    .chunks(self.width)
                    .map(<[u32]>::to_vec)
                    .collect(),
                context_lens: self.context_lens.clone(),
                query_start_loc,
            },
        };
        Ok(StepInputs {
            token_ids: Tensor::new(self.token_ids.as_slice(), device)?,
            positions: Tensor::new(self.positions.as_slice(), device)?,
            slot_mapping: Tensor::new(self.slot_mapping.as_slice(), device)?,
            meta,
            logit_rows: Tensor::new(rows.as_slice(), device)?,
        })
    }

    /// Copies this step into a graph's static inputs (same bucket), in stream order.
    fn copy_into(&self, inputs: &StepInputs) -> Result<()> {
        inputs
            .token_ids
            .inplace_op1(&CopyIn::U32(&self.token_ids))?;
        inputs
            .positions
            .inplace_op1(&CopyIn::U32(&self.positions))?;
        inputs
            .slot_mapping
            .inplace_op1(&CopyIn::I64(&self.slot_mapping))?;
        let meta = &inputs.meta;
        meta.block_tables
            .inplace_op1(&CopyIn::U32(&self.block_tables))?;
        meta.context_lens
            .inplace_op1(&CopyIn::U32(&self.context_lens))
    }
}

/// Captures the forward over `step`'s static inputs (after two eager warm-up runs on them, which
/// load every kernel and let cuBLAS set up its workspace outside the capture).
fn capture(
    model: &LlamaModel,
    step: &PaddedStep,
    cache: &KvCache,
    block_size: usize,
) -> Result<Captured> {
    let device = model.device();
    let inputs = step.upload(device, block_size)?;
    let logits = Tensor::zeros((step.rows, model.config().vocab_size), DType::F32, device)?;
    for _ in 0..2 {
        model.forward_inputs(&inputs, cache)?;
    }
    device.synchronize()?;
    let stream = device.as_cuda_device()?.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    // Every tensor made inside is dropped inside (graph-owned memory); only `logits` outlives it.
    let body = model
        .forward_inputs(&inputs, cache)
        .and_then(|out| logits.slice_set(&out, 0, 0));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    body?;
    let Some(graph) = graph.w()? else {
        bail!("the capture recorded no work")
    };
    Ok(Captured {
        inputs,
        logits,
        graph: Graph(graph),
    })
}

/// Bytes of the cuBLAS workspace handed to the device's handle.
const CUBLAS_WORKSPACE: usize = 32 << 20;

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

/// Host data copied into a static input tensor of the same length, in place.
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
            (CudaStorageSlice::U32(d), CopyIn::U32(h)) if h.len() == len => {
                stream.memcpy_htod(*h, d).w()?
            }
            (CudaStorageSlice::I64(d), CopyIn::I64(h)) if h.len() == len => {
                stream.memcpy_htod(*h, d).w()?
            }
            _ => bail!("graph input: dtype or length mismatch"),
        }
        Ok(())
    }
}
