//! Startup: load tokenizer and weights, warm up, size and allocate the KV cache, timing each phase.

use crate::api::generate::{EngineClient, IncrementalDecode, TextCodec};
use crate::api::server::Served;
use crate::args::{DeviceArg, DtypeArg, EngineArgs};
use crate::core::{EngineCore, EngineHandle, EngineRequest, RequestEvent};
use crate::executor::Ranks;
use crate::gpu_memory;
use crate::metrics::EngineMetrics;
use crate::model::{ForwardBatch, KvCache, SeqInput};
use crate::sched::SchedulerConfig;
use crate::tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};
use candle_core::{DType, Device, DeviceLocation};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// Why the engine cannot start with the given flags and model.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Args(#[from] crate::args::ArgsError),
    #[error(
        "--max-model-len {requested} is larger than the model's max_position_embeddings ({max_pos}); use --max-model-len {max_pos} or less"
    )]
    MaxModelLenTooLarge { requested: usize, max_pos: usize },
    #[error(
        "the KV cache budget of {budget_gib:.2} GiB holds only {fit} tokens ({blocks} blocks of {block_size}), but one request of --max-model-len {max_model_len} needs {needed} tokens: only {fit} tokens fit; use --max-model-len {fit_plain} or raise --kv-cache-memory"
    )]
    KvCacheTooSmall {
        budget_gib: f64,
        fit: String,
        fit_plain: usize,
        blocks: usize,
        block_size: usize,
        max_model_len: usize,
        needed: String,
    },
    #[error(
        "no GPU memory left for the KV cache: {used_gib:.2} GiB in use after loading, limit {limit_gib:.2} GiB (--gpu-memory-utilization {util}); raise --gpu-memory-utilization or set --kv-cache-memory"
    )]
    NoGpuMemoryForKv {
        used_gib: f64,
        limit_gib: f64,
        util: f64,
    },
    #[error("--device cuda needs an engine built with the `cuda` feature (scripts/build-cuda.sh)")]
    CudaNotBuilt,
    #[error("{phase} failed: {message}")]
    Phase {
        phase: &'static str,
        message: String,
    },
}

/// `23296` -> `"23,296"`.
pub fn format_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// The model length to serve: the flag, or the model's own limit; never past it.
pub fn resolve_max_model_len(
    requested: Option<usize>,
    max_position_embeddings: usize,
) -> Result<usize, LaunchError> {
    match requested {
        None => Ok(max_position_embeddings),
        Some(r) if r > max_position_embeddings => Err(LaunchError::MaxModelLenTooLarge {
            requested: r,
            max_pos: max_position_embeddings,
        }),
        Some(r) => Ok(r),
    }
}

/// How the KV cache is laid out for a byte budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvPlan {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_tokens: usize,
    pub bytes_per_block: u64,
    pub kv_bytes: u64,
    /// How many requests of `max_model_len` tokens fit at once.
    pub max_concurrency: f64,
}

impl KvPlan {
    /// vLLM's line: `KV cache size: 23,296 tokens`.
    pub fn size_line(&self) -> String {
        format!(
            "KV cache size: {} tokens",
            format_thousands(self.num_tokens as u64)
        )
    }

    /// vLLM's line: `Maximum concurrency for 8,192 tokens per request: 2.84x`.
    pub fn concurrency_line(&self, max_model_len: usize) -> String {
        format!(
            "Maximum concurrency for {} tokens per request: {:.2}x",
            format_thousands(max_model_len as u64),
            self.max_concurrency
        )
    }
}

/// blocks = budget / bytes_per_block; refuses a cache that cannot hold one full-length request.
pub fn plan_kv_cache(
    budget_bytes: u64,
    bytes_per_block: u64,
    block_size: usize,
    max_model_len: usize,
) -> Result<KvPlan, LaunchError> {
    if bytes_per_block == 0 || block_size == 0 || max_model_len == 0 {
        return Err(LaunchError::Phase {
            phase: "KV cache sizing",
            message: format!(
                "invalid sizes: bytes_per_block {bytes_per_block}, block_size {block_size}, max_model_len {max_model_len}"
            ),
        });
    }
    let num_blocks = (budget_bytes / bytes_per_block) as usize;
    let num_tokens = num_blocks * block_size;
    let blocks_per_request = max_model_len.div_ceil(block_size);
    if num_blocks < blocks_per_request {
        return Err(LaunchError::KvCacheTooSmall {
            budget_gib: budget_bytes as f64 / GIB,
            fit: format_thousands(num_tokens as u64),
            fit_plain: num_tokens,
            blocks: num_blocks,
            block_size,
            max_model_len,
            needed: format_thousands((blocks_per_request * block_size) as u64),
        });
    }
    Ok(KvPlan {
        num_blocks,
        block_size,
        num_tokens,
        bytes_per_block,
        kv_bytes: num_blocks as u64 * bytes_per_block,
        max_concurrency: num_tokens as f64 / max_model_len as f64,
    })
}

/// KV budget on a GPU: `util * total` minus what weights and warmup already use.
pub fn gpu_kv_budget(total: u64, free_after_load: u64, util: f64) -> Result<u64, LaunchError> {
    let used = total.saturating_sub(free_after_load);
    let limit = (total as f64 * util) as u64;
    if limit <= used {
        return Err(LaunchError::NoGpuMemoryForKv {
            used_gib: used as f64 / GIB,
            limit_gib: limit as f64 / GIB,
            util,
        });
    }
    Ok(limit - used)
}

/// Seconds spent in each startup phase, in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartupPhases {
    pub tokenizer_load: f64,
    pub weights_load: f64,
    /// CUDA only: one forward of `--max-num-batched-tokens` tokens to measure activation memory.
    pub profile: f64,
    pub kv_cache_alloc: f64,
    /// One paged forward through the real cache (first kernel launches) before ready.
    pub warmup: f64,
    /// Process start (first line of `main`) to ready.
    pub total: f64,
}

impl StartupPhases {
    /// (label, seconds) for `engine_startup_phase_seconds{phase=...}`.
    pub fn labeled(&self) -> [(&'static str, f64); 6] {
        [
            ("tokenizer_load", self.tokenizer_load),
            ("weights_load", self.weights_load),
            ("profile", self.profile),
            ("kv_cache_alloc", self.kv_cache_alloc),
            ("warmup", self.warmup),
            ("total", self.total),
        ]
    }
}

/// What `GET /v1/engine/startup` answers: where cold-start time went and what was built.
#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub model: String,
    pub served_model_name: String,
    pub device: String,
    pub dtype: String,
    /// Ranks the model is split over (weights and KV sizes below are totals over ranks).
    pub tensor_parallel_size: usize,
    pub load_format: String,
    pub phases: StartupPhases,
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub kv_cache_tokens: usize,
    pub num_gpu_blocks: usize,
    pub block_size: usize,
    pub max_model_len: usize,
    pub max_concurrency: f64,
}
/// The device to run on: the flag, else CUDA when built with it and a GPU exists, else CPU.
pub fn select_device(arg: Option<DeviceArg>) -> Result<Device, LaunchError> {
    let cuda = |e: candle_core::Error| LaunchError::Phase {
        phase: "CUDA device init",
        message: e.to_string(),
    };
    match arg {
        Some(DeviceArg::Cpu) => Ok(Device::Cpu),
        Some(DeviceArg::Cuda) if !cfg!(feature = "cuda") => Err(LaunchError::CudaNotBuilt),
        Some(DeviceArg::Cuda) => Device::new_cuda(0).map_err(cuda),
        None if candle_core::utils::cuda_is_available() => Device::new_cuda(0).map_err(cuda),
        None => Ok(Device::Cpu),
    }
}

/// `--dtype auto`: float32 on CPU, bfloat16 on CUDA.
pub fn resolve_dtype(arg: DtypeArg, device: &Device) -> DType {
    match arg {
        DtypeArg::Auto if device.is_cuda() => DType::BF16,
        DtypeArg::Auto | DtypeArg::Float32 => DType::F32,
        DtypeArg::Bfloat16 => DType::BF16,
        DtypeArg::Float16 => DType::F16,
    }
}

fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// One device per tensor-parallel rank: rank r on GPU r when `first` is a GPU, every rank on the
/// CPU otherwise.
pub fn rank_devices(first: &Device, tp: usize) -> Result<Vec<Device>, LaunchError> {
    let mut devices = vec![first.clone()];
    for rank in 1..tp {
        devices.push(if first.is_cuda() {
            Device::new_cuda(rank).map_err(|e| LaunchError::Phase {
                phase: "CUDA device init",
                message: format!(
                    "--tensor-parallel-size {tp} needs {tp} GPUs; GPU {rank} is not usable: {e}"
                ),
            })?
        } else {
            Device::Cpu
        });
    }
    Ok(devices)
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "other",
    }
}

/// (free, total) bytes of GPU memory now.
#[cfg(feature = "cuda")]
fn gpu_mem_info(device: &Device) -> Result<(u64, u64), LaunchError> {
    let dev = device.as_cuda_device().map_err(|e| LaunchError::Phase {
        phase: "KV cache sizing",
        message: e.to_string(),
    })?;
    let (free, total) =
        dev.cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| LaunchError::Phase {
                phase: "KV cache sizing",
                message: format!("cuMemGetInfo: {e}"),
            })?;
    Ok((free as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
fn gpu_mem_info(_device: &Device) -> Result<(u64, u64), LaunchError> {
    Err(LaunchError::CudaNotBuilt)
}

/// Default CPU KV budget when `--kv-cache-memory` is not given.
pub const CPU_KV_CACHE_DEFAULT: u64 = 1 << 30;

/// The tokenizer as the API sees it; prompt token ids are checked against the model's vocab.
pub struct ModelCodec {
    tokenizer: Tokenizer,
    vocab_size: usize,
}

impl IncrementalDecode for IncrementalDecoder {
    fn push(&mut self, token_id: u32) -> Option<String> {
        IncrementalDecoder::push(self, token_id)
    }
    fn flush(&mut self) -> Option<String> {
        IncrementalDecoder::flush(self)
    }
}

impl TextCodec for ModelCodec {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode_with(text, true)
    }
    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| e.to_string())
    }
    fn encode_chat(&self, messages: &[(String, String)]) -> Result<Vec<u32>, String> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|(role, content)| ChatMessage {
                role: role.clone(),
                content: content.clone(),
            })
            .collect();
        let text = self
            .tokenizer
            .apply_chat_template(&messages, true)
            .map_err(|e| e.to_string())?;
        self.tokenizer
            .encode(&text, false)
            .map_err(|e| e.to_string())
    }
    fn decoder(&self) -> Box<dyn IncrementalDecode> {
        Box::new(self.tokenizer.incremental_decoder())
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

impl EngineClient for EngineHandle {
    fn add_request(&self, request: EngineRequest) -> UnboundedReceiver<RequestEvent> {
        EngineHandle::add_request(self, request)
    }
    fn abort(&self, request_id: &str) {
        EngineHandle::abort(self, request_id)
    }
    fn render_metrics(&self) -> String {
        self.metrics().render_prometheus()
    }
    fn reset_prefix_cache(&self) -> Option<bool> {
        Some(EngineHandle::reset_prefix_cache(self))
    }
}

/// A started engine: what the routes serve with, plus the core thread.
pub struct Launched {
    pub served: Served,
    pub handle: EngineHandle,
    pub core_thread: std::thread::JoinHandle<()>,
}

fn phase<E: std::fmt::Display>(phase: &'static str) -> impl Fn(E) -> LaunchError {
    move |e| LaunchError::Phase {
        phase,
        message: e.to_string(),
    }
}

/// Up to 4 decode sequences (one new token each) after a `context`-token prefix, each reading
/// block 0 and writing its new token to a slot of its own block (never past `num_blocks`).
fn decode_warmup_batch(context: usize, block_size: usize, num_blocks: usize) -> ForwardBatch {
    let num_seqs = num_blocks.saturating_sub(1).clamp(1, 4);
    let mut b = ForwardBatch::default();
    for s in 0..num_seqs {
        let pos = context; // the token after the prefix written by the prefill warmup
        let own_block = if num_blocks > 1 { 1 + s as u32 } else { 0 };
        let table = if pos / block_size == 0 {
            vec![0]
        } else {
            vec![0, own_block]
        };
        let block = table[pos / block_size];
        b.token_ids.push(s as u32);
        b.positions.push(pos as u32);
        b.slot_mapping
            .push(block as i64 * block_size as i64 + (pos % block_size) as i64);
        b.seqs.push(SeqInput {
            query_start: s,
            query_len: 1,
            context_len: pos + 1,
            block_table: table,
            compute_logits: true,
        });
    }
    b
}

/// The startup line on CUDA graphs.
#[cfg(feature = "cuda")]
fn cuda_graphs_line(requested: bool, tp: usize) -> String {
    match (requested, tp) {
        (true, 1) => format!(
            "CUDA graphs: decode-only steps of up to {} sequences are captured per batch and block-table bucket on first use",
            crate::model::cuda_graph::MAX_BATCH
        ),
        (true, _) => "CUDA graphs off with tensor parallelism: every step runs eagerly".into(),
        (false, _) => "CUDA graphs off: every step runs eagerly (--cuda-graphs to capture decode steps)".into(),
    }
}

/// Build everything `args` asks for, timing each phase; `process_start` is the first instant of
/// the process, so `phases.total` is cold-start time.
pub fn launch(args: &EngineArgs, process_start: Instant) -> Result<Launched, LaunchError> {
    args.validate()?;
    let model_path = args.model()?.clone();
    let served_model_name = args.served_model_name()?;
    let device = select_device(args.device)?;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        gpu_memory::keep_pool_memory(&device).map_err(phase("CUDA device init"))?;
        gpu_memory::set_event_tracking(&device, false).map_err(phase("CUDA device init"))?;
        crate::model::cuda_graph::set_cuda_graphs(args.cuda_graphs);
    }
    if args.cuda_graphs && !device.is_cuda() {
        tracing::warn!("--cuda-graphs applies to CUDA devices only; ignored");
    }
    let dtype = resolve_dtype(args.dtype, &device);
    let mut phases = StartupPhases::default();

    let t = Instant::now();
    let tokenizer = Tokenizer::from_model_path(args.tokenizer.as_deref().unwrap_or(&model_path))
        .map_err(phase("tokenizer load"))?;
    phases.tokenizer_load = t.elapsed().as_secs_f64();

    let tp = args.tensor_parallel_size;
    let devices = rank_devices(&device, tp)?;
    #[cfg(feature = "cuda")]
    for d in devices.iter().skip(1) {
        gpu_memory::keep_pool_memory(d).map_err(phase("CUDA device init"))?;
        gpu_memory::set_event_tracking(d, false).map_err(phase("CUDA device init"))?;
    }

    let t = Instant::now();
    let mut model = Ranks::load(&model_path, args.load_format, dtype, &devices, args.seed)
        .map_err(phase("weights load"))?;
    for d in &devices {
        d.synchronize().map_err(phase("weights load"))?;
    }
    phases.weights_load = t.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let weights_bytes = cfg.num_parameters() * dtype.size_in_bytes() as u64;
    if tp > 1 {
        tracing::info!(
            "Tensor parallel size {tp}: {} / {tp} attention heads, {} / {tp} KV heads and {} / {tp} MLP columns per rank on {}",
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            devices.iter().map(device_name).collect::<Vec<_>>().join(", ")
        );
    }
    tracing::info!(
        "Model loading took {:.4} GiB and {:.6} seconds",
        weights_bytes as f64 / GIB,
        phases.weights_load
    );
    let max_model_len = resolve_max_model_len(args.max_model_len, cfg.max_position_embeddings)?;

    // The budget of one rank (one GPU); every rank holds its KV heads of every block.
    let budget_per_rank = match args.kv_cache_memory {
        Some(b) => b,
        None if device.is_cuda() => {
            let t = Instant::now();
            let (free, total) = gpu_mem_info(&device)?;
            let mem = phase("memory profiling");
            let pool_before = gpu_memory::pool_used(&device).map_err(&mem)?;
            gpu_memory::reset_pool_peak(&device).map_err(&mem)?;
            let n = args.max_num_batched_tokens.min(max_model_len);
            let tokens: Vec<u32> = (0..n as u32).map(|i| i % cfg.vocab_size as u32).collect();
            model
                .forward_full(&tokens)
                .map_err(phase("memory profiling"))?;
            let peak = gpu_memory::pool_used_peak(&device).map_err(&mem)?;
            phases.profile = t.elapsed().as_secs_f64();
            let profile = gpu_memory::GpuMemoryProfile {
                total,
                used_after_load: total.saturating_sub(free),
                activation_peak: peak.saturating_sub(pool_before),
                utilization: args.gpu_memory_utilization,
            };
            tracing::info!(
                "Memory profiling takes {:.2} seconds: total GPU memory {:.2} GiB x utilization {} = {:.2} GiB; in use after loading {:.2} GiB (weights {:.2} GiB); activation peak of a {n}-token forward {:.2} GiB",
                phases.profile,
                total as f64 / GIB,
                args.gpu_memory_utilization,
                total as f64 * args.gpu_memory_utilization / GIB,
                profile.used_after_load as f64 / GIB,
                weights_bytes as f64 / tp as f64 / GIB,
                profile.activation_peak as f64 / GIB
            );
            match profile.kv_budget() {
                Some(b) => b,
                None => {
                    return Err(LaunchError::NoGpuMemoryForKv {
                        used_gib: (profile.used_after_load + profile.activation_peak) as f64 / GIB,
                        limit_gib: total as f64 * args.gpu_memory_utilization / GIB,
                        util: args.gpu_memory_utilization,
                    })
                }
            }
        }
        None => CPU_KV_CACHE_DEFAULT,
    };
    // Over all ranks: a block holds every KV head of its tokens, 1/tp of them on each rank.
    let bytes_per_block = KvCache::bytes_per_block(&cfg, args.block_size, dtype) as u64;
    let plan = plan_kv_cache(
        budget_per_rank * tp as u64,
        bytes_per_block,
        args.block_size,
        max_model_len,
    )?;

    let t = Instant::now();
    model
        .allocate_cache(plan.num_blocks, args.block_size, dtype)
        .map_err(phase("KV cache allocation"))?;
    phases.kv_cache_alloc = t.elapsed().as_secs_f64();
    tracing::info!(
        "Available KV cache memory: {:.2} GiB",
        plan.kv_bytes as f64 / GIB
    );
    tracing::info!("{}", plan.size_line());
    tracing::info!("{}", plan.concurrency_line(max_model_len));
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        tracing::info!("{}", cuda_graphs_line(args.cuda_graphs, tp));
    }

    // Kernel warmup. First every kernel module the engine may launch, so that no step waits for
    // the driver's PTX JIT (seconds per module while its cache is cold, the first run on a
    // machine); then steps on the paged path the server runs.
    let t = Instant::now();
    #[cfg(feature = "cuda")]
    for d in &devices {
        if let candle_core::Device::Cuda(dev) = d {
            let t_load = Instant::now();
            let loaded = crate::model::kernel_modules::load_all(dev).map_err(phase("warmup"))?;
            tracing::info!(
                "Loaded {} CUDA kernel modules ({} kernels) on {} in {:.2} s (slowest: {})",
                loaded.modules,
                loaded.functions,
                device_name(d),
                t_load.elapsed().as_secs_f64(),
                loaded.slowest(3)
            );
        }
    }
    // One short sequence through block 0.
    let n = args.block_size.min(4);
    let warm = ForwardBatch::one_prompt((0..n as u32).collect(), args.block_size);
    model.forward(&warm).map_err(phase("warmup"))?;
    // Then a decode-shaped step (several sequences of one new token each), so that every kernel
    // the serving loop launches is loaded (PTX JIT on CUDA) before the engine reports ready.
    model
        .forward(&decode_warmup_batch(n, args.block_size, plan.num_blocks))
        .map_err(phase("warmup"))?;
    phases.warmup = t.elapsed().as_secs_f64();

    let metrics = Arc::new(EngineMetrics::new(served_model_name.clone()));
    metrics.set_tensor_parallel_size(tp);
    let scheduler_config = SchedulerConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len,
        block_size: args.block_size,
        num_gpu_blocks: plan.num_blocks,
        enable_prefix_caching: args.prefix_caching(),
    };
    let policy = args.scheduling_policy();
    let eos_token_ids = if tokenizer.eos_token_ids().is_empty() {
        cfg.eos_token_ids.clone()
    } else {
        tokenizer.eos_token_ids().to_vec()
    };
    let codec = ModelCodec {
        vocab_size: cfg.vocab_size.min(tokenizer.vocab_size().max(1)).max(1),
        tokenizer,
    };
    let runner = model.into_executor().map_err(phase("engine core start"))?;
    let (handle, core_thread) = EngineCore::spawn_with_swap_space(
        scheduler_config,
        policy,
        runner,
        metrics.clone(),
        args.swap_space,
    )
    .map_err(phase("engine core start"))?;
    phases.total = process_start.elapsed().as_secs_f64();
    for (name, seconds) in phases.labeled() {
        metrics.set_startup_phase(name, seconds);
    }
    tracing::info!(
        "Engine ready in {:.2} s (tokenizer {:.2} s, weights {:.2} s, memory profiling {:.2} s, KV alloc {:.2} s, warmup {:.2} s)",
        phases.total,
        phases.tokenizer_load,
        phases.weights_load,
        phases.profile,
        phases.kv_cache_alloc,
        phases.warmup
    );
    let startup = StartupReport {
        model: model_path.to_string_lossy().into_owned(),
        served_model_name,
        device: device_name(&device),
        dtype: dtype_name(dtype).into(),
        tensor_parallel_size: tp,
        load_format: format!("{:?}", args.load_format).to_lowercase(),
        phases,
        weights_bytes,
        kv_cache_bytes: plan.kv_bytes,
        kv_cache_tokens: plan.num_tokens,
        num_gpu_blocks: plan.num_blocks,
        block_size: args.block_size,
        max_model_len,
        max_concurrency: plan.max_concurrency,
    };
    Ok(Launched {
        served: Served {
            engine: Arc::new(handle.clone()),
            codec: Arc::new(codec),
            max_model_len,
            eos_token_ids,
            startup,
        },
        handle,
        core_thread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands() {
        assert_eq!(format_thousands(0), "0");
        assert_eq!(format_thousands(999), "999");
        assert_eq!(format_thousands(1000), "1,000");
        assert_eq!(format_thousands(23296), "23,296");
        assert_eq!(format_thousands(1234567), "1,234,567");
    }

    #[test]
    fn kv_plan_lines_match_vllm() {
        // 1456 blocks of 16 = 23,296 tokens; 23296/8192 = 2.84x.
        let p = plan_kv_cache(1456 * 1000 + 999, 1000, 16, 8192).unwrap();
        assert_eq!(p.num_blocks, 1456);
        assert_eq!(p.kv_bytes, 1_456_000);
        assert_eq!(p.size_line(), "KV cache size: 23,296 tokens");
        assert_eq!(
            p.concurrency_line(8192),
            "Maximum concurrency for 8,192 tokens per request: 2.84x"
        );
    }

    #[test]
    fn kv_too_small_names_what_fits() {
        let e = plan_kv_cache(64 * 100, 100, 16, 2048).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("only 1,024 tokens fit"), "{msg}");
        assert!(msg.contains("use --max-model-len 1024"), "{msg}");
        assert!(msg.contains("raise --kv-cache-memory"), "{msg}");
        // A partial last block still needs a whole block.
        assert!(plan_kv_cache(64 * 100, 100, 16, 1025).is_err());
        assert!(plan_kv_cache(64 * 100, 100, 16, 1024).is_ok());
        assert!(plan_kv_cache(0, 100, 16, 1).is_err());
        assert!(plan_kv_cache(100, 0, 16, 1).is_err());
    }

    #[test]
    fn max_model_len_resolution() {
        assert_eq!(resolve_max_model_len(None, 8192).unwrap(), 8192);
        assert_eq!(resolve_max_model_len(Some(512), 8192).unwrap(), 512);
        let e = resolve_max_model_len(Some(9000), 8192)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_position_embeddings (8192)"), "{e}");
    }

    #[test]
    fn gpu_budget() {
        let g = 1u64 << 30;
        assert_eq!(gpu_kv_budget(80 * g, 70 * g, 0.5).unwrap(), 30 * g);
        assert!(gpu_kv_budget(80 * g, 30 * g, 0.5).is_err());
    }
}
