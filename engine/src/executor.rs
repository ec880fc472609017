//! Running the model on one rank (in-process) or on N tensor-parallel ranks: one worker thread
//! per rank, each owning its shard of the model and of the KV cache; every step is broadcast to
//! all ranks and rank 0's sampled tokens are the step's.
//!
//! The scheduler runs once (in the core thread) and every rank executes the same
//! `SchedulerOutput`: the same block ids index each rank's own cache shard (its KV heads only), so
//! the block manager needs no notion of ranks. Ranks meet in the model's collectives; because all
//! ranks run the same batches, a failure is the same on every rank (bad block table, shape) and
//! is reported once.

use crate::config::ModelConfig;
use crate::core::{ExecuteError, ModelExecutor};
use crate::model::tp::{Collective, CpuCollective};
use crate::model::{CausalLM, ForwardBatch, KvCache};
use crate::runner::ModelRunner;
use crate::sched::SchedulerOutput;
use crate::weights::{self, LoadFormat};
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The model through startup (load, profile, cache allocation, warmup), then its executor.
pub enum Ranks {
    /// Tensor parallel size 1: the model runs in the engine core's thread.
    One {
        model: Box<dyn CausalLM>,
        cache: Option<KvCache>,
    },
    /// N ranks on N worker threads; `cfg` is the full (unsharded) config.
    Tp { ex: TpExecutor, cfg: ModelConfig },
}

/// A zeroed paged cache for `model`'s KV heads on its device, synchronized.
fn new_cache(
    model: &dyn CausalLM,
    num_blocks: usize,
    block_size: usize,
    dtype: DType,
) -> Result<KvCache, String> {
    KvCache::new(
        model.config(),
        num_blocks,
        block_size,
        dtype,
        model.device(),
    )
    .and_then(|c| model.device().synchronize().map(|_| c))
    .map_err(|e| e.to_string())
}

/// One collective per rank: NCCL when the ranks are GPUs (CUDA builds), threads sharing host
/// memory otherwise.
fn collectives(devices: &[Device]) -> candle_core::Result<Vec<Arc<dyn Collective>>> {
    #[cfg(feature = "cuda")]
    if devices.iter().all(|d| d.is_cuda()) {
        return Ok(crate::model::nccl::NcclCollective::group(devices)?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect());
    }
    Ok(CpuCollective::group(devices.len())
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Collective>)
        .collect())
}

impl Ranks {
    /// Loads the model at `path` on `devices` (one per rank; rank r gets `devices[r]`). Ranks
    /// exchange activations through NCCL on GPUs, through host memory on the CPU.
    pub fn load(
        path: &Path,
        format: LoadFormat,
        dtype: DType,
        devices: &[Device],
        seed: u64,
    ) -> Result<Self, String> {
        let world = devices.len();
        if world <= 1 {
            let device = devices.first().cloned().unwrap_or(Device::Cpu);
            let model = weights::load_model(path, format, dtype, &device, seed)
                .map_err(|e| e.to_string())?;
            return Ok(Ranks::One { model, cache: None });
        }
        let cfg = weights::load_config(path, format).map_err(|e| e.to_string())?;
        crate::model::tp::rank_config(&cfg, world).map_err(|e| e.to_string())?;
        let group = collectives(devices).map_err(|e| e.to_string())?;
        let (path, devices) = (path.to_path_buf(), devices.to_vec());
        let load: Arc<LoadRank> = Arc::new(move |rank| {
            weights::load_model_rank(
                &path,
                format,
                dtype,
                &devices[rank],
                seed,
                group[rank].clone(),
            )
            .map_err(|e| e.to_string())
        });
        Ok(Ranks::Tp {
            ex: TpExecutor::load(world, load)?,
            cfg,
        })
    }

    /// The full model's config (not a rank's).
    pub fn config(&self) -> &ModelConfig {
        match self {
            Ranks::One { model, .. } => model.config(),
            Ranks::Tp { cfg, .. } => cfg,
        }
    }

    /// A plain forward of `tokens` on every rank (activation profiling), synchronized.
    pub fn forward_full(&self, tokens: &[u32]) -> Result<(), String> {
        match self {
            Ranks::One { model, .. } => model
                .forward_full(tokens)
                .and_then(|_| model.device().synchronize())
                .map_err(|e| e.to_string()),
            Ranks::Tp { ex, .. } => ex.forward_full(tokens),
        }
    }

    /// Allocates the paged cache: `num_blocks` blocks, each rank holding its KV heads of them.
    pub fn allocate_cache(
        &mut self,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
    ) -> Result<(), String> {
        match self {
            Ranks::One { model, cache } => {
                *cache = Some(new_cache(model.as_ref(), num_blocks, block_size, dtype)?);
                Ok(())
            }
            Ranks::Tp { ex, cfg } => ex.allocate_cache(
                num_blocks,
                block_size,
                dtype,
                KvCache::bytes_per_block(cfg, block_size, dtype),
            ),
        }
    }

    /// One paged forward through the cache (warmup), synchronized; logits are dropped.
    pub fn forward(&mut self, batch: &ForwardBatch) -> Result<(), String> {
        match self {
            Ranks::One {
                model,
                cache: Some(cache),
            } => model
                .forward(batch, cache)
                .and_then(|_| model.device().synchronize())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Ranks::One { cache: None, .. } => Err("forward before the KV cache exists".into()),
            Ranks::Tp { ex, .. } => ex.forward(batch),
        }
    }

    /// The executor the engine core steps (after `allocate_cache`).
    pub fn into_executor(self) -> Result<Box<dyn ModelExecutor>, String> {
        match self {
            Ranks::One {
                model,
                cache: Some(cache),
            } => Ok(Box::new(ModelRunner::new(model, cache))),
            Ranks::One { cache: None, .. } => Err("no KV cache allocated".into()),
            Ranks::Tp { ex, .. } => Ok(Box::new(ex)),
        }
    }
}

/// What a worker holds: its model after loading, model and cache (a runner) after allocation.
enum RankState {
    Empty,
    Model(Box<dyn CausalLM>),
    Runner(ModelRunner),
}

/// A rank's share of one call; answers a step's sampled tokens (empty for other work).
type Job = Box<dyn FnOnce(&mut RankState) -> Result<Vec<Option<u32>>, String> + Send>;

struct Worker {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Result<Vec<Option<u32>>, String>>,
    thread: JoinHandle<()>,
}

/// Builds one rank's model on the rank's thread: `rank` in `0..world_size`.
pub type LoadRank = dyn Fn(usize) -> Result<Box<dyn CausalLM>, String> + Send + Sync;

/// N ranks of one model (N >= 1), each on its own thread.
pub struct TpExecutor {
    workers: Vec<Worker>,
    /// Bytes of one KV block summed over ranks (set once the caches exist).
    kv_bytes_per_block: Option<usize>,
}

impl TpExecutor {
    /// Starts `world_size` workers and loads every rank's model in parallel.
    pub fn load(world_size: usize, load: Arc<LoadRank>) -> Result<Self, String> {
        let mut workers = Vec::with_capacity(world_size);
        for rank in 0..world_size {
            let (jobs, job_rx) = mpsc::channel::<Job>();
            let (result_tx, results) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("tp-rank-{rank}"))
                .spawn(move || {
                    let mut state = RankState::Empty;
                    for job in job_rx {
                        let out = job(&mut state);
                        if result_tx.send(out).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| format!("cannot start the thread of rank {rank}: {e}"))?;
            workers.push(Worker {
                jobs,
                results,
                thread,
            });
        }
        let ex = TpExecutor {
            workers,
            kv_bytes_per_block: None,
        };
        ex.broadcast(|rank| {
            let load = load.clone();
            Box::new(move |state: &mut RankState| {
                *state = RankState::Model(load(rank).map_err(|e| format!("rank {rank}: {e}"))?);
                Ok(Vec::new())
            })
        })?;
        Ok(ex)
    }

    /// Runs `make(rank)`'s job on every rank at once; every rank's result, in rank order, or the
    /// first rank's error.
    fn broadcast(&self, make: impl Fn(usize) -> Job) -> Result<Vec<Vec<Option<u32>>>, String> {
        for (rank, w) in self.workers.iter().enumerate() {
            w.jobs
                .send(make(rank))
                .map_err(|_| format!("the thread of rank {rank} has stopped"))?;
        }
        let mut out = Vec::with_capacity(self.workers.len());
        let mut first_err = None;
        for (rank, w) in self.workers.iter().enumerate() {
            match w.results.recv() {
                Ok(Ok(v)) => out.push(v),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(format!("the thread of rank {rank} has stopped"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// A plain forward of `tokens` on every rank (activation profiling, before the cache exists).
    pub fn forward_full(&self, tokens: &[u32]) -> Result<(), String> {
        let tokens = Arc::new(tokens.to_vec());
        self.broadcast(|_| {
            let tokens = tokens.clone();
            Box::new(move |state: &mut RankState| {
                let RankState::Model(m) = state else {
                    return Err("profiling forward after the KV cache exists".into());
                };
                m.forward_full(&tokens)
                    .and_then(|_| m.device().synchronize())
                    .map(|_| Vec::new())
                    .map_err(|e| e.to_string())
            })
        })
        .map(|_| ())
    }

    /// Allocates every rank's cache shard (`num_blocks` blocks of its own KV heads) and turns
    /// each rank into a runner; `kv_bytes_per_block` is one block over all ranks.
    pub fn allocate_cache(
        &mut self,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        kv_bytes_per_block: usize,
    ) -> Result<(), String> {
        self.broadcast(|_| {
            Box::new(move |state: &mut RankState| {
                let RankState::Model(model) = std::mem::replace(state, RankState::Empty) else {
                    return Err("KV cache allocated twice".into());
                };
                let cache = new_cache(model.as_ref(), num_blocks, block_size, dtype)?;
                *state = RankState::Runner(ModelRunner::new(model, cache));
                Ok(Vec::new())
            })
        })?;
        self.kv_bytes_per_block = Some(kv_bytes_per_block);
        Ok(())
    }

    /// One paged forward through every rank's cache (warmup); logits are dropped.
    pub fn forward(&self, batch: &ForwardBatch) -> Result<(), String> {
        let batch = Arc::new(batch.clone());
        self.broadcast(|_| {
            let batch = batch.clone();
            Box::new(move |state: &mut RankState| {
                let RankState::Runner(r) = state else {
                    return Err("forward before the KV cache exists".into());
                };
                let (model, cache) = r.parts_mut();
                model
                    .forward(&batch, cache)
                    .and_then(|_| model.device().synchronize())
                    .map(|_| Vec::new())
                    .map_err(|e| e.to_string())
            })
        })
        .map(|_| ())
    }
}

impl ModelExecutor for TpExecutor {
    fn execute(&mut self, output: &SchedulerOutput) -> Result<Vec<Option<u32>>, ExecuteError> {
        let output = Arc::new(output.clone());
        let per_rank = self
            .broadcast(|_| {
                let output = output.clone();
                Box::new(move |state: &mut RankState| match state {
                    RankState::Runner(r) => r.execute(&output).map_err(|e| e.0),
                    _ => Err("step before the KV cache exists".into()),
                })
            })
            .map_err(ExecuteError)?;
        // Every rank sampled from the same all-gathered logits; rank 0 speaks for the group.
        Ok(per_rank.into_iter().next().unwrap_or_default())
    }

    fn kv_bytes_per_block(&self) -> Option<usize> {
        self.kv_bytes_per_block
    }
}

impl Drop for TpExecutor {
    fn drop(&mut self) {
        for Worker { jobs, thread, .. } in self.workers.drain(..) {
            // Closing the job channel ends the worker's loop.
            drop(jobs);
            let _ = thread.join();
        }
    }
}
