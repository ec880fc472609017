//! engine-bench: times the model directly (no HTTP) against the hardware floor of each phase.
//!
//! Measures the device's two ceilings (device-to-device copy bandwidth, bf16 matmul TFLOP/s), then
//! decode steps at several batch sizes over a filled paged cache and single-sequence prefills, and
//! prints each beside its floor (bytes / bandwidth for decode, 2 x params x tokens / TFLOP/s for
//! prefill) as a markdown table. Decode is timed three ways: the runner's whole step (forward,
//! logits to host, sampling), the forward alone (synchronized), and the forward's host enqueue
//! time against its GPU time between CUDA events (launch-bound when the two are close). With
//! `--cuda-graphs`, decode-only steps replay CUDA graphs as the engine's `--cuda-graphs` does, and
//! the side-by-side table also times the same forward eagerly, right after, in the same process.

mod parts;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use engine::args::{DeviceArg, DtypeArg};
use engine::config::ModelConfig;
use engine::core::ModelExecutor;
use engine::launch::{resolve_dtype, select_device};
use engine::model::{CausalLM, ForwardBatch, KvCache};
use engine::runner::ModelRunner;
use engine::sampling::SamplingParams;
use engine::sched::{ScheduledRequest, SchedulerOutput};
use engine::weights::{load_model, LoadFormat};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "engine-bench",
    about = "Model decode/prefill timings against the hardware floor"
)]
struct Cli {
    /// config.json (with --load-format dummy), a GGUF file or a safetensors directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t = LoadFormat::Dummy)]
    load_format: LoadFormat,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Decode batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    batch_sizes: Vec<usize>,
    /// Tokens of context each decoding sequence reads.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Prefill lengths (one sequence each), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    prefill: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Square matmul size for the TFLOP/s ceiling.
    #[arg(long, default_value_t = 8192)]
    matmul_size: usize,
    /// Bytes copied for the bandwidth ceiling (MiB).
    #[arg(long, default_value_t = 2048)]
    copy_mib: usize,
    /// Replay decode steps from CUDA graphs ("as served"); the other variants run eagerly.
    #[arg(long)]
    cuda_graphs: bool,
    /// Also time decode attention under these context splits of the paged kernel, each
    /// `CTAS_PER_SM:MIN_TILES` (e.g. `2:2,8:1,32:1`; the engine's default is 2:2).
    #[arg(long, value_delimiter = ',')]
    attn_splits: Vec<String>,
    /// The same for the decode kernel's split, each `CTAS_PER_SM:MIN_PARTITION_KEYS` (the
    /// engine's default is 4:128 on CUDA cores, 2:128 on tensor cores), optionally followed by
    /// `:g<HEADS>` (query heads per CTA: 1, 4 or 8), `:combine` (partials and the combine launch
    /// instead of the cluster merge) and `:tc` (the tensor-core decode kernel; otherwise the
    /// CUDA-core one).
    #[arg(long, value_delimiter = ',')]
    decode_splits: Vec<String>,
    /// Fewest sequences a decode step needs to take the decode kernel (the engine's default is
    /// 1: every decode step; below it, the paged kernel).
    #[arg(long)]
    decode_min_seqs: Option<usize>,
    /// Query heads per decode-kernel CTA (1, 4 or 8; default: 1 at small batches, else the
    /// smallest that holds the GQA group).
    #[arg(long)]
    decode_head_tile: Option<usize>,
    /// The decode kernel's split for the whole run, `CTAS_PER_SM:MIN_PARTITION_KEYS`.
    #[arg(long)]
    decode_split: Option<String>,
    /// Time the prefill variants (paged-attention kernel only, 64x32 tiles, unfused ops) only up
    /// to this many tokens: the paged kernel alone is quadratic and slow on long prompts.
    #[arg(long, default_value_t = usize::MAX)]
    prefill_variants_max: usize,
    /// Run everything with these paths off, so that "as served" (CUDA graphs included) measures
    /// the engine without them: silu (SiLU-gate epilogue), rope (rotary epilogue), warp-rows
    /// (warp-per-row GEMV), fused, decode-kernel, pdl (programmatic dependent launch), cluster
    /// (the decode kernel's cluster merge), warm (its L2 warm-up).
    #[arg(long, value_delimiter = ',')]
    without: Vec<String>,
    /// Also write the table here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Milliseconds of `f` on the host, synchronized before and after.
fn host_ms(device: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    device.synchronize()?;
    let t = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// GPU-side milliseconds between CUDA events around `f`, plus the host time until `f` returned
/// (enqueue time; `f` must not synchronize for the comparison to mean anything).
#[cfg(feature = "cuda")]
fn event_ms(device: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<(f64, f64)> {
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
fn event_ms(_device: &Device, _f: &mut dyn FnMut() -> Result<()>) -> Result<(f64, f64)> {
    bail!("CUDA events need the cuda feature")
}

/// Square bf16 matmuls queued ahead of a part timed by `QueuedTimer` (~6 ms of GPU work).
const BUSY_MATMULS: usize = 4;
#[cfg(feature = "cuda")]
const BUSY_N: usize = 8192;

/// Times a part's kernels back to back on the GPU, without the host's launch gaps: the stream is
/// first given a few large matmuls, so the host has enqueued the whole part before the GPU
/// reaches it, and CUDA events around the part measure the kernels alone (as a graph replay
/// would run them). Parts whose enqueue outlasts the queued work are counted in `late`.
#[cfg(feature = "cuda")]
struct QueuedTimer {
    busy: (Tensor, Tensor),
    busy_ms: f64,
    late: usize,
}

#[cfg(feature = "cuda")]
impl QueuedTimer {
    fn new(device: &Device) -> Result<Self> {
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
    fn time(&mut self, device: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
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
fn copy_bandwidth(device: &Device, bytes: usize, iters: usize) -> Result<f64> {
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
fn copy_bandwidth(device: &Device, bytes: usize, iters: usize) -> Result<f64> {
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
fn matmul_tflops(device: &Device, dtype: DType, n: usize, iters: usize) -> Result<f64> {
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

/// Replace every cache tensor with random values (never time attention over zeros).
fn fill_cache(cache: &mut KvCache, device: &Device) -> Result<()> {
    let dtype = cache.dtype();
    for (k, v) in cache.layers.iter_mut() {
        let shape = k.shape().clone();
        *k = Tensor::randn(0f32, 1.0, &shape, device)?.to_dtype(dtype)?;
        *v = Tensor::randn(0f32, 1.0, &shape, device)?.to_dtype(dtype)?;
    }
    Ok(())
}

/// One decode step of `batch` sequences, each with `context` cached tokens and its own blocks.
fn decode_step(batch: usize, context: usize, block_size: usize, vocab: usize) -> SchedulerOutput {
    let blocks_per_seq = (context + 1).div_ceil(block_size);
    let scheduled = (0..batch)
        .map(|s| ScheduledRequest {
            request_id: format!("bench-{s}"),
            token_ids: vec![((s * 7919 + 13) % vocab) as u32],
            num_computed_tokens: context,
            block_table: (0..blocks_per_seq)
                .map(|b| (s * blocks_per_seq + b) as u32)
                .collect(),
            sample: true,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            num_output_tokens: 1,
        })
        .collect();
    SchedulerOutput {
        scheduled,
        total_num_scheduled_tokens: batch,
        ..SchedulerOutput::default()
    }
}

fn prefill_batch(n: usize, block_size: usize, vocab: usize) -> ForwardBatch {
    let tokens = (0..n).map(|i| ((i * 31 + 7) % vocab) as u32).collect();
    ForwardBatch::one_prompt(tokens, block_size)
}

/// 1-row projections of rows up to `WARP_ROWS_MAX_CHUNKS` on the CTA-per-rows GEMV kernel instead
/// of the warp-per-row kernel.
const ONE_ROW_CTA: &str = "1-row GEMV on CTA-per-rows kernel";

/// The MLP's SiLU-gate product as its own launch instead of the 1-row gate/up GEMV's epilogue.
const SILU_OWN_LAUNCH: &str = "SiLU-gate as own launch";

/// The bias, rotary and KV-cache write as their own launch instead of the 1-row q/k/v GEMV's
/// epilogue.
const ROPE_OWN_LAUNCH: &str = "rotary + KV write as own launch";

/// The residual add + RMSNorm as the prologue of the 1-row q/k/v and gate/up GEMVs instead of
/// their own launch (off in the engine).
const NORM_PROLOGUE: &str = "add + RMSNorm in the GEMV prologue";

/// The split paged attention's partitions merged in the kernel's last CTA instead of by the
/// combine launch (off in the engine).
const COMBINE_IN_KERNEL: &str = "attention combine in the kernel";

/// The engine's kernels as ordinary launches instead of with programmatic dependent launch
/// (eager launches only: CUDA graphs are captured without it).
const NO_PDL: &str = "ordinary launches (no PDL)";

/// Split decode attention through partials and the combine launch instead of the cluster merge.
const NO_DECODE_CLUSTER: &str = "decode combine launch (no cluster)";

/// Decode attention of whole GQA groups on the CUDA-core decode kernel instead of the tensor-core
/// one.
const NO_DECODE_TC: &str = "CUDA-core decode attention";

/// Short decode attention launches without their L2 warm-up of the next projections' weights.
const NO_WARM_L2: &str = "no L2 warm-up in attention";

/// The decode variant without CUDA graphs (timed only with `--cuda-graphs`).
const EAGER: &str = "eager (no CUDA graphs)";

/// Settings the decode forward is also timed under (beside the engine's own): each is turned on,
/// measured and turned back off. With CUDA graphs, every variant but "as served" runs eagerly.
fn variant_names(cuda_graphs: bool) -> Vec<&'static str> {
    let mut v = vec![
        "as served",
        "cuBLAS for every projection",
        ONE_ROW_CTA,
        SILU_OWN_LAUNCH,
        ROPE_OWN_LAUNCH,
        NORM_PROLOGUE,
        COMBINE_IN_KERNEL,
        NO_PDL,
        NO_DECODE_CLUSTER,
        NO_WARM_L2,
        NO_DECODE_TC,
        "paged kernel for decode",
        "unfused ops",
        "cudarc event tracking on",
    ];
    if cuda_graphs {
        v.insert(1, EAGER);
    }
    v
}

#[cfg(feature = "cuda")]
fn set_variant(device: &Device, variant: &str, on: bool, cuda_graphs: bool) -> Result<()> {
    if variant != "as served" {
        engine::model::cuda_graph::set_cuda_graphs(cuda_graphs && !on);
    }
    if variant == "cudarc event tracking on" {
        engine::gpu_memory::set_event_tracking(device, on)?;
    } else {
        set_path(variant, on);
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn set_variant(_: &Device, _: &str, _: bool, _: bool) -> Result<()> {
    Ok(())
}

/// Takes the variant `variant` of an engine path (`on`) or goes back to the engine's own (off);
/// false when `variant` names no path of this build.
fn set_path(variant: &str, on: bool) -> bool {
    match variant {
        "unfused ops" => engine::model::fused::set_fused_kernels(!on),
        "cuBLAS for every projection" => engine::model::gemv::set_gemv_kernel(!on),
        ONE_ROW_CTA => engine::model::gemv::set_gemv_warp_rows(!on),
        SILU_OWN_LAUNCH => engine::model::gemv::set_gemv_silu_epilogue(!on),
        ROPE_OWN_LAUNCH => engine::model::gemv::set_gemv_rope_epilogue(!on),
        NORM_PROLOGUE => engine::model::gemv::set_gemv_norm_prologue(on),
        #[cfg(feature = "cuda")]
        COMBINE_IN_KERNEL => engine::model::attention_cuda::set_in_kernel_combine(on),
        #[cfg(feature = "cuda")]
        NO_PDL => engine::model::pdl::set_pdl(!on),
        #[cfg(feature = "cuda")]
        NO_WARM_L2 => engine::model::attention_cuda::set_warm_l2(!on),
        #[cfg(feature = "cuda")]
        NO_DECODE_CLUSTER => engine::model::attention_cuda::set_decode_cluster(!on),
        #[cfg(feature = "cuda")]
        NO_DECODE_TC => engine::model::attention_cuda::set_decode_tensor_cores(!on),
        #[cfg(feature = "cuda")]
        "paged kernel for decode" => engine::model::attention_cuda::set_decode_kernel(!on),
        _ => return false,
    }
    true
}

/// `--without` keys and the variant each takes for the whole run.
const WITHOUT: [(&str, &str); 9] = [
    ("silu", SILU_OWN_LAUNCH),
    ("rope", ROPE_OWN_LAUNCH),
    ("warp-rows", ONE_ROW_CTA),
    ("fused", "unfused ops"),
    ("decode-kernel", "paged kernel for decode"),
    ("pdl", NO_PDL),
    ("cluster", NO_DECODE_CLUSTER),
    ("warm", NO_WARM_L2),
    ("tensor-cores", NO_DECODE_TC),
];

/// Turns one optional path off for the whole run (`--without`).
fn turn_off(path: &str) -> Result<()> {
    match WITHOUT.iter().find(|(key, _)| *key == path) {
        Some((_, variant)) if set_path(variant, true) => Ok(()),
        _ => {
            let keys: Vec<&str> = WITHOUT.iter().map(|(key, _)| *key).collect();
            bail!(
                "--without {path}: not one of {} (the last five need CUDA)",
                keys.join(", ")
            )
        }
    }
}

/// The CUDA-graph counters: (replays, failed captures, why the last capture failed).
#[cfg(feature = "cuda")]
fn graph_status() -> (usize, usize, Option<String>) {
    use engine::model::cuda_graph::{graph_counts, last_capture_error};
    let (replays, failed) = graph_counts();
    (replays, failed, last_capture_error())
}

#[cfg(not(feature = "cuda"))]
fn graph_status() -> (usize, usize, Option<String>) {
    (0, 0, None)
}

struct PrefillRow {
    tokens: usize,
    ms: f64,
    no_flash_ms: Option<f64>,
    /// The forward with the tensor-core kernel's 64-row, 32-key tiles instead of 128 x 64.
    narrow_tiles_ms: Option<f64>,
    matmuls_ms: f64,
    attention_ms: f64,
    elementwise_ms: f64,
    unfused_ms: Option<f64>,
    floor_ms: f64,
    /// TFLOP/s of each projection alone (`parts::PROJECTIONS` order).
    proj_tflops: [f64; 4],
}

#[cfg(feature = "cuda")]
fn set_flash_prefill(on: bool) {
    use engine::model::attention_cuda::{set_prefill_kernel, PrefillKernel};
    set_prefill_kernel(if on {
        PrefillKernel::TensorCore
    } else {
        PrefillKernel::Paged
    });
}

#[cfg(not(feature = "cuda"))]
fn set_flash_prefill(_: bool) {}

/// GPU milliseconds of a decode step's parts at one batch size (`QueuedTimer`).
struct DecodeParts {
    batch: usize,
    matmuls: f64,
    lm_head: f64,
    attention: f64,
    elementwise: f64,
}

struct DecodeRow {
    batch: usize,
    step_ms: f64,
    forward_ms: f64,
    enqueue_ms: Option<f64>,
    gpu_ms: Option<f64>,
    floor_ms: f64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let device = select_device(cli.device)?;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        engine::gpu_memory::keep_pool_memory(&device)?;
        engine::gpu_memory::set_event_tracking(&device, false)?;
        engine::model::cuda_graph::set_cuda_graphs(cli.cuda_graphs);
    }
    for path in &cli.without {
        turn_off(path)?;
    }
    #[cfg(feature = "cuda")]
    {
        use engine::model::attention_cuda::{set_decode_head_tile, set_decode_min_seqs};
        if let Some(n) = cli.decode_min_seqs {
            set_decode_min_seqs(n);
        }
        set_decode_head_tile(cli.decode_head_tile)?;
        if let Some(split) = &cli.decode_split {
            let (a, b) = parse_split(split)?;
            engine::model::attention_cuda::set_decode_split(a, b);
        }
    }
    let dtype = resolve_dtype(cli.dtype, &device);
    let iters = cli.iters.max(1);
    eprintln!("device {device:?}, dtype {dtype:?}");

    let copy_gbs = copy_bandwidth(&device, cli.copy_mib << 20, iters)?;
    let tflops = matmul_tflops(&device, dtype, cli.matmul_size, iters.min(10))?;
    eprintln!("copy {copy_gbs:.0} GB/s, matmul {tflops:.1} TFLOP/s");

    let t = Instant::now();
    let model = load_model(&cli.model, cli.load_format, dtype, &device, cli.seed)
        .with_context(|| format!("loading {}", cli.model.display()))?;
    device.synchronize()?;
    let cfg: ModelConfig = model.config().clone();
    let params = cfg.num_parameters();
    let weight_bytes = params * dtype.size_in_bytes() as u64;
    eprintln!(
        "model: {} layers, {:.3} B params, {:.2} GiB weights, loaded in {:.1} s",
        cfg.num_hidden_layers,
        params as f64 / 1e9,
        weight_bytes as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );
    let bs = cli.block_size;
    let max_batch = cli.batch_sizes.iter().copied().max().unwrap_or(1);
    let max_prefill = cli.prefill.iter().copied().max().unwrap_or(0);
    if cli.context + 1 > cfg.max_position_embeddings || max_prefill > cfg.max_position_embeddings {
        bail!("context/prefill past max_position_embeddings");
    }
    let num_blocks = (max_batch * (cli.context + 1).div_ceil(bs)).max(max_prefill.div_ceil(bs));
    let mut cache = KvCache::new(&cfg, num_blocks, bs, dtype, &device)?;
    fill_cache(&mut cache, &device)?;
    let kv_per_token = cfg.kv_bytes_per_token(dtype) as u64;
    let mut runner = ModelRunner::new(model, cache);

    // ---- decode
    // Warm every batch size first (clocks, pools, kernel loads), so the first row is not the
    // one paying for it.
    for &batch in &cli.batch_sizes {
        let step = decode_step(batch, cli.context, bs, cfg.vocab_size);
        let fb = engine::runner::build_forward_batch(&step, bs)?;
        for _ in 0..10 {
            let (model, cache) = runner_parts(&mut runner);
            model.forward(&fb, cache)?;
        }
    }
    device.synchronize()?;
    let mut rows = Vec::new();
    for &batch in &cli.batch_sizes {
        let step = decode_step(batch, cli.context, bs, cfg.vocab_size);
        let fb = engine::runner::build_forward_batch(&step, bs)?;
        let (mut step_t, mut fwd_t, mut enq_t, mut gpu_t) = (vec![], vec![], vec![], vec![]);
        for i in 0..iters + 3 {
            let s = host_ms(&device, &mut || {
                runner.execute(&step).map_err(|e| anyhow::anyhow!(e.0))?;
                Ok(())
            })?;
            let f = {
                let (model, cache) = runner_parts(&mut runner);
                host_ms(&device, &mut || {
                    model.forward(&fb, cache)?;
                    Ok(())
                })?
            };
            let ev = if device.is_cuda() {
                let (model, cache) = runner_parts(&mut runner);
                Some(event_ms(&device, &mut || {
                    model.forward(&fb, cache)?;
                    Ok(())
                })?)
            } else {
                None
            };
            if i >= 3 {
                step_t.push(s);
                fwd_t.push(f);
                if let Some((e, g)) = ev {
                    enq_t.push(e);
                    gpu_t.push(g);
                }
            }
        }
        let bytes = weight_bytes + batch as u64 * (cli.context as u64 + 1) * kv_per_token;
        let row = DecodeRow {
            batch,
            step_ms: median(step_t),
            forward_ms: median(fwd_t),
            enqueue_ms: (!enq_t.is_empty()).then(|| median(enq_t)),
            gpu_ms: (!gpu_t.is_empty()).then(|| median(gpu_t)),
            floor_ms: bytes as f64 / (copy_gbs * 1e9) * 1e3,
        };
        eprintln!(
            "decode batch {batch}: step {:.3} ms, forward {:.3} ms, floor {:.3} ms",
            row.step_ms, row.forward_ms, row.floor_ms
        );
        rows.push(row);
    }

    // ---- decode forward under other settings, side by side (GPU ms between events)
    let mut variants = Vec::new();
    if device.is_cuda() {
        for &batch in &cli.batch_sizes {
            let step = decode_step(batch, cli.context, bs, cfg.vocab_size);
            let fb = engine::runner::build_forward_batch(&step, bs)?;
            let mut row = Vec::new();
            for v in variant_names(cli.cuda_graphs) {
                set_variant(&device, v, true, cli.cuda_graphs)?;
                let mut times = Vec::new();
                for i in 0..iters + 2 {
                    let (model, cache) = runner_parts(&mut runner);
                    let (enqueue, gpu) = event_ms(&device, &mut || {
                        model.forward(&fb, cache)?;
                        Ok(())
                    })?;
                    if i >= 2 {
                        times.push((enqueue, gpu));
                    }
                }
                set_variant(&device, v, false, cli.cuda_graphs)?;
                // Back to the run's own paths: a variant that `--without` took stays taken.
                for path in &cli.without {
                    turn_off(path)?;
                }
                let gpu = median(times.iter().map(|t| t.1).collect());
                let enqueue = median(times.iter().map(|t| t.0).collect());
                eprintln!("decode batch {batch}, {v}: enqueue {enqueue:.3} ms, GPU {gpu:.3} ms");
                row.push((enqueue, gpu));
            }
            variants.push((batch, row));
        }
    }
    let graphs = (cli.cuda_graphs && device.is_cuda()).then(graph_status);
    if let Some((replays, failed, error)) = &graphs {
        eprintln!("CUDA graphs: {replays} replays, {failed} failed captures ({error:?})");
    }

    // ---- decode parts, each alone over every layer, kernels queued back to back
    #[cfg(feature = "cuda")]
    let dparts = if device.is_cuda() {
        let (_, cache) = runner_parts(&mut runner);
        decode_parts(&device, dtype, &cfg, &cli, cache)?
    } else {
        Vec::new()
    };
    #[cfg(not(feature = "cuda"))]
    let dparts: Vec<DecodeParts> = Vec::new();
    #[cfg(feature = "cuda")]
    let sweep = if device.is_cuda() && !(cli.attn_splits.is_empty() && cli.decode_splits.is_empty())
    {
        let (_, cache) = runner_parts(&mut runner);
        split_sweep(&device, dtype, &cfg, &cli, cache)?
    } else {
        Vec::new()
    };
    #[cfg(not(feature = "cuda"))]
    let sweep: Vec<(String, Vec<(usize, f64)>)> = Vec::new();

    // ---- prefill
    let mut prows = Vec::new();
    for &n in &cli.prefill {
        let fb = prefill_batch(n, bs, cfg.vocab_size);
        let reps = iters.min(10);
        let ms = forward_ms(&device, &mut runner, &fb, reps, 2)?;
        // The same forward with every sequence on the paged-attention kernel (no tensor-core
        // prefill kernel), then with the unfused ops: the gaps are what each saves.
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let (mut no_flash, mut narrow, mut unfused) = (None, None, None);
        if device.is_cuda() && n <= cli.prefill_variants_max {
            set_flash_prefill(false);
            no_flash = Some(forward_ms(&device, &mut runner, &fb, reps, 1)?);
            set_flash_prefill(true);
            #[cfg(feature = "cuda")]
            {
                use engine::model::attention_cuda::set_flash_wide_tiles;
                set_flash_wide_tiles(false);
                narrow = Some(forward_ms(&device, &mut runner, &fb, reps, 1)?);
                set_flash_wide_tiles(true);
            }
            engine::model::fused::set_fused_kernels(false);
            unfused = Some(forward_ms(&device, &mut runner, &fb, reps, 1)?);
            engine::model::fused::set_fused_kernels(true);
        }
        let mut host = parts::host_timer(&device);
        let gemm = parts::matmuls_ms(&device, dtype, &cfg, n, reps, &mut host)?;
        let proj_tflops = parts::projection_tflops(&device, dtype, &cfg, n, reps, &mut host)?;
        let (attn, elementwise) = {
            let (_, cache) = runner_parts(&mut runner);
            (
                parts::attention_ms(&device, dtype, &cfg, &fb, cache, reps, &mut host)?,
                parts::elementwise_ms(&device, dtype, &cfg, n, cache, reps, &mut host)?,
            )
        };
        let floor = 2.0 * params as f64 * n as f64 / (tflops * 1e12) * 1e3;
        let row = PrefillRow {
            tokens: n,
            ms,
            no_flash_ms: no_flash,
            narrow_tiles_ms: narrow,
            matmuls_ms: gemm,
            attention_ms: attn,
            elementwise_ms: elementwise,
            unfused_ms: unfused,
            floor_ms: floor,
            proj_tflops,
        };
        eprintln!(
            "prefill {n}: {:.2} ms (paged-attention kernel only: {:?} ms), matmuls {gemm:.2} ms, attention {attn:.2} ms, floor {floor:.2} ms",
            row.ms, row.no_flash_ms
        );
        prows.push(row);
    }

    let table = render(
        &cli, &device, dtype, &cfg, copy_gbs, tflops, &rows, &variants, graphs, &dparts, &sweep,
        &prows,
    );
    println!("{table}");
    if let Some(p) = &cli.out {
        std::fs::write(p, &table).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The decode step's parts at every batch size, timed by `QueuedTimer`.
#[cfg(feature = "cuda")]
fn decode_parts(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    cli: &Cli,
    cache: &KvCache,
) -> Result<Vec<DecodeParts>> {
    let (bs, iters) = (cli.block_size, cli.iters.max(1));
    let mut q = QueuedTimer::new(device)?;
    let mut out = Vec::new();
    {
        let mut time = |f: &mut dyn FnMut() -> Result<()>| q.time(device, f);
        for &batch in &cli.batch_sizes {
            let step = decode_step(batch, cli.context, bs, cfg.vocab_size);
            let fb = engine::runner::build_forward_batch(&step, bs)?;
            let matmuls = parts::matmuls_ms(device, dtype, cfg, batch, iters, &mut time)?;
            let lm_head = parts::lm_head_ms(device, dtype, cfg, batch, iters, &mut time)?;
            let attention = parts::attention_ms(device, dtype, cfg, &fb, cache, iters, &mut time)?;
            let elementwise =
                parts::elementwise_ms(device, dtype, cfg, batch, cache, iters, &mut time)?;
            eprintln!(
                "decode parts, batch {batch}: matmuls {matmuls:.3} ms, LM head {lm_head:.3} ms, attention {attention:.3} ms, elementwise {elementwise:.3} ms"
            );
            out.push(DecodeParts {
                batch,
                matmuls,
                lm_head,
                attention,
                elementwise,
            });
        }
    }
    if q.late > 0 {
        eprintln!(
            "warning: {} decode-part timings enqueued for longer than the queued {:.1} ms of matmuls (launch gaps may be included)",
            q.late, q.busy_ms
        );
    }
    Ok(out)
}

/// Decode attention (every layer, queued GPU ms) at each batch size under each `--attn-splits`
/// setting of the paged kernel (decode kernel off) and each `--decode-splits` setting of the
/// decode kernel: rows of (setting, [(batch, ms)]).
#[cfg(feature = "cuda")]
fn split_sweep(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    cli: &Cli,
    cache: &KvCache,
) -> Result<Vec<(String, Vec<(usize, f64)>)>> {
    use engine::model::attention_cuda::{
        decode_split, flash_decode_split, paged_split, set_decode_cluster_on_this_thread,
        set_decode_head_tile, set_decode_kernel_on_this_thread, set_decode_split,
        set_decode_tensor_cores_on_this_thread, set_flash_decode_split, set_paged_split,
    };
    let defaults = (paged_split(), decode_split(), flash_decode_split());
    let mut q = QueuedTimer::new(device)?;
    let mut rows = Vec::new();
    let settings = cli
        .attn_splits
        .iter()
        .map(|s| ("paged", s))
        .chain(cli.decode_splits.iter().map(|s| ("decode", s)));
    for (kernel, setting) in settings {
        let (ab, opts) = match setting.match_indices(':').nth(1) {
            Some((i, _)) => (&setting[..i], &setting[i + 1..]),
            None => (setting.as_str(), ""),
        };
        let (a, b) = parse_split(ab)?;
        let fields = opts.split(':').map(str::trim).filter(|f| !f.is_empty());
        // Decode kernel options after A:B: `g<N>` query heads per CTA, `combine`, `tc`.
        let (mut tile, mut combine, mut tc) = (cli.decode_head_tile, false, false);
        for f in fields {
            match (f, f.strip_prefix('g')) {
                ("combine", _) if kernel == "decode" => combine = true,
                ("tc", _) if kernel == "decode" => tc = true,
                (_, Some(g)) if kernel == "decode" => tile = Some(g.parse()?),
                _ => bail!(
                    "split {setting:?}: unknown option {f:?} (decode splits take g<N>, combine, tc)"
                ),
            }
        }
        set_decode_head_tile(tile)?;
        set_decode_cluster_on_this_thread(combine.then_some(false));
        set_decode_tensor_cores_on_this_thread(Some(tc));
        if tc {
            set_flash_decode_split(a, b);
        }
        // Each kernel at every batch size (the engine picks by size: DECODE_MIN_SEQS).
        if kernel == "paged" {
            set_decode_kernel_on_this_thread(Some(false));
            set_paged_split(a, b);
        } else {
            set_decode_kernel_on_this_thread(Some(true));
            set_decode_split(a, b);
        }
        let mut row = Vec::new();
        let mut time = |f: &mut dyn FnMut() -> Result<()>| q.time(device, f);
        for &batch in &cli.batch_sizes {
            let step = decode_step(batch, cli.context, cli.block_size, cfg.vocab_size);
            let fb = engine::runner::build_forward_batch(&step, cli.block_size)?;
            let ms =
                parts::attention_ms(device, dtype, cfg, &fb, cache, cli.iters.max(1), &mut time)?;
            eprintln!("attention {kernel} {setting}, batch {batch}: {ms:.3} ms");
            row.push((batch, ms));
        }
        rows.push((format!("{kernel} {setting}"), row));
    }
    set_paged_split(defaults.0 .0, defaults.0 .1);
    set_decode_split(defaults.1 .0, defaults.1 .1);
    set_flash_decode_split(defaults.2 .0, defaults.2 .1);
    set_decode_kernel_on_this_thread(None);
    set_decode_cluster_on_this_thread(None);
    set_decode_tensor_cores_on_this_thread(None);
    set_decode_head_tile(cli.decode_head_tile)?;
    Ok(rows)
}

/// `A:B` as two counts (a context split: CTAs per SM and the least partition).
#[cfg(feature = "cuda")]
fn parse_split(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("split {s:?}: want A:B"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

/// Median milliseconds of the model's forward of `fb` over `reps` runs after `warm` untimed ones.
fn forward_ms(
    device: &Device,
    runner: &mut ModelRunner,
    fb: &ForwardBatch,
    reps: usize,
    warm: usize,
) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..reps + warm {
        let (model, cache) = runner_parts(runner);
        let ms = host_ms(device, &mut || {
            model.forward(fb, cache)?;
            Ok(())
        })?;
        if i >= warm {
            times.push(ms);
        }
    }
    Ok(median(times))
}

/// The runner's model and cache, to time the forward alone through the same objects.
fn runner_parts(runner: &mut ModelRunner) -> (&dyn CausalLM, &mut KvCache) {
    runner.parts_mut()
}

#[allow(clippy::too_many_arguments)]
fn render(
    cli: &Cli,
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    copy_gbs: f64,
    tflops: f64,
    rows: &[DecodeRow],
    variants: &[(usize, Vec<(f64, f64)>)],
    graphs: Option<(usize, usize, Option<String>)>,
    dparts: &[DecodeParts],
    sweep: &[(String, Vec<(usize, f64)>)],
    prows: &[PrefillRow],
) -> String {
    let mut s = String::new();
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let opt2 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let _ = writeln!(
        s,
        "# engine-bench: {} ({} layers, {:.3} B params), {:?}, {:?}\n",
        cli.model.display(),
        cfg.num_hidden_layers,
        cfg.num_parameters() as f64 / 1e9,
        dtype,
        device
    );
    if !cli.without.is_empty() {
        let _ = writeln!(s, "Run without: {}.\n", cli.without.join(", "));
    }
    if let Some(n) = cli.decode_min_seqs {
        let _ = writeln!(s, "Decode kernel from {n} sequences per step.\n");
    }
    if let Some(g) = cli.decode_head_tile {
        let _ = writeln!(s, "Decode kernel with {g} query heads per CTA.\n");
    }
    if let Some(split) = &cli.decode_split {
        let _ = writeln!(
            s,
            "Decode kernel split {split} (CTAs per SM : keys per partition at least).\n"
        );
    }
    let _ = writeln!(
        s,
        "Ceilings: device-to-device copy {copy_gbs:.0} GB/s (read + write, {} MiB), {:?} matmul {tflops:.1} TFLOP/s ({n}x{n}x{n}).\n",
        cli.copy_mib, dtype, n = cli.matmul_size
    );
    let _ = writeln!(
        s,
        "## Decode (context {}, block {}, greedy; median of {})\n",
        cli.context, cli.block_size, cli.iters
    );
    let _ = writeln!(s, "| batch | runner step ms | forward ms | enqueue ms | GPU ms (events) | HBM floor ms | step / floor | tok/s |");
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {} | {} | {:.3} | {:.2}x | {:.0} |",
            r.batch,
            r.step_ms,
            r.forward_ms,
            opt(r.enqueue_ms),
            opt(r.gpu_ms),
            r.floor_ms,
            r.step_ms / r.floor_ms,
            r.batch as f64 / (r.step_ms * 1e-3)
        );
    }
    let _ = writeln!(s, "\nHBM floor = (weight bytes + batch x (context + 1) x KV bytes/token) / copy bandwidth. Enqueue = host time until the forward returned without a sync; when it is close to the GPU time the step is launch-bound.\n");
    if !variants.is_empty() {
        let _ = writeln!(
            s,
            "### Decode forward side by side (enqueue ms / GPU ms between events; median of {})\n",
            cli.iters
        );
        let names = variant_names(cli.cuda_graphs);
        // With graphs, one more column: eager GPU ms over graph-replay GPU ms.
        let ratio = if cli.cuda_graphs {
            " | eager / graph GPU"
        } else {
            ""
        };
        let _ = writeln!(s, "| batch | {}{ratio} |", names.join(" | "));
        let cols = names.len() + usize::from(cli.cuda_graphs);
        let _ = writeln!(s, "|---:|{}", "---:|".repeat(cols));
        for (batch, row) in variants {
            let mut cells: Vec<String> = row
                .iter()
                .map(|(e, g)| format!("{e:.3} / {g:.3}"))
                .collect();
            if let (true, [(_, graph), (_, eager), ..]) = (cli.cuda_graphs, row.as_slice()) {
                cells.push(format!("{:.2}x", eager / graph));
            }
            let _ = writeln!(s, "| {batch} | {} |", cells.join(" | "));
        }
        let _ = writeln!(s);
    }
    if let Some((replays, failed, error)) = graphs {
        let fallback = error
            .map(|e| format!(" (\"as served\" ran eagerly after the failure: {e})"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "CUDA graphs (--cuda-graphs): \"as served\" decode steps replay one graph per batch and block-table bucket, every other variant runs eagerly; {replays} replays, {failed} failed captures{fallback}.\n"
        );
    }
    if !dparts.is_empty() {
        let _ = writeln!(
            s,
            "### Decode parts (GPU ms, kernels queued back to back; median of {})\n",
            cli.iters
        );
        let _ = writeln!(s, "| batch | matmuls | LM head | attention | fused elementwise | sum | step GPU ms (as served) | HBM floor ms |");
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in dparts {
            let step = variants
                .iter()
                .find(|(b, _)| *b == p.batch)
                .and_then(|(_, row)| row.first())
                .map(|(_, g)| format!("{g:.3}"))
                .unwrap_or_else(|| "-".into());
            let floor = rows
                .iter()
                .find(|r| r.batch == p.batch)
                .map_or("-".into(), |r| format!("{:.3}", r.floor_ms));
            let _ = writeln!(
                s,
                "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {step} | {floor} |",
                p.batch,
                p.matmuls,
                p.lm_head,
                p.attention,
                p.elementwise,
                p.matmuls + p.lm_head + p.attention + p.elementwise
            );
        }
        let _ = writeln!(s, "\nEach part alone over every layer at the step's batch: the four projections (distinct weights cycled so that they come from HBM), the LM head (16-bit head, f32 logits), paged attention over the filled cache, and the fused elementwise ops. The parts' kernels are queued behind ~{BUSY_MATMULS} large matmuls, so their events time the kernels without launch gaps; the difference from the step is the embedding, the rotary tables and what a whole step adds.\n");
    }
    if !sweep.is_empty() {
        let _ = writeln!(s, "### Decode attention by kernel and context split (GPU ms over every layer, queued; paged kernel: CTAs per SM : key tiles per partition; decode kernel: CTAs per SM : keys per partition, on CUDA cores unless `:tc`)\n");
        let _ = writeln!(
            s,
            "| split | {} |",
            cli.batch_sizes
                .iter()
                .map(|b| format!("batch {b}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|{}", "---:|".repeat(cli.batch_sizes.len()));
        for (setting, row) in sweep {
            let cells: Vec<String> = row.iter().map(|(_, ms)| format!("{ms:.3}")).collect();
            let _ = writeln!(s, "| {setting} | {} |", cells.join(" | "));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Prefill (one sequence; median)\n");
    let _ = writeln!(
        s,
        "| tokens | forward ms | paged-attention kernel only ms | 64x32 prefill tiles ms | unfused ops ms | matmuls ms | attention ms | attention TFLOP/s | fused elementwise ms | matmul floor ms | forward / floor | tok/s |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in prows {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2}x | {:.0} |",
            r.tokens,
            r.ms,
            opt2(r.no_flash_ms),
            opt2(r.narrow_tiles_ms),
            opt2(r.unfused_ms),
            r.matmuls_ms,
            r.attention_ms,
            parts::attention_flops(cfg, r.tokens) / (r.attention_ms * 1e-3) / 1e12,
            r.elementwise_ms,
            r.floor_ms,
            r.ms / r.floor_ms,
            r.tokens as f64 / (r.ms * 1e-3)
        );
    }
    let _ = writeln!(
        s,
        "\nMatmul floor = 2 x params x tokens / measured TFLOP/s (attention FLOPs not counted). Forward: as served (tensor-core prefill kernel for bf16/f16 with 128-row, 64-key tiles, fused ops); paged-attention kernel only / 64x32 prefill tiles / unfused ops: the same forward with that kernel / the tensor-core kernel's 64-row, 32-key tiles / the fused ops off. Parts, each alone over every layer at this token count: matmuls (the four projections), attention, fused elementwise (two add + RMSNorm, SiLU-gate product, bias + rotary + KV write); the rest of the forward is the embedding, rotary tables and the LM head of the last token."
    );
    let _ = writeln!(
        s,
        "\n### Prefill projections alone (TFLOP/s; ceiling {tflops:.1})\n\n| tokens | {} | all four |\n|---:|---:|---:|---:|---:|---:|",
        parts::PROJECTIONS.join(" | ")
    );
    for r in prows {
        let flops = parts::projection_flops(cfg, r.tokens);
        let cells: Vec<String> = r.proj_tflops.iter().map(|t| format!("{t:.0}")).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} |",
            r.tokens,
            cells.join(" | "),
            flops / (r.matmuls_ms * 1e-3) / 1e12
        );
    }
    s
}
