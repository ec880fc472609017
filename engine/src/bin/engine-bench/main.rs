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
mod phases;
mod prefetch;
mod render;
#[cfg(feature = "cuda")]
mod sweep;
mod timing;
mod variants;

use render::{render, DecodeParts, DecodeRow, PrefillRow};
#[cfg(feature = "cuda")]
use sweep::{parse_split, split_sweep};
#[cfg(feature = "cuda")]
use timing::QueuedTimer;
use timing::{copy_bandwidth, event_ms, host_ms, matmul_tflops, median};
use variants::{graph_status, set_flash_prefill, set_variant, turn_off, variant_names};

use anyhow::{bail, Context, Result};
#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{Device, Tensor};
use clap::Parser;
use engine::args::{DeviceArg, DtypeArg};
use engine::config::ModelConfig;
use engine::core::ModelExecutor;
use engine::launch::{resolve_dtype, select_device};
use engine::model::l2_prefetch::L2Prefetch;
use engine::model::{CausalLM, ForwardBatch, KvCache};
use engine::runner::ModelRunner;
use engine::sampling::SamplingParams;
use engine::sched::{ScheduledRequest, SchedulerOutput};
use engine::weights::{load_model, LoadFormat};
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
    /// The tensor-core decode kernel's split for the whole run, `CTAS_PER_SM:MIN_PARTITION_KEYS`
    /// (the engine's default is 2:128).
    #[arg(long)]
    flash_decode_split: Option<String>,
    /// Time the prefill variants (paged-attention kernel only, 64x32 tiles, unfused ops) only up
    /// to this many tokens: the paged kernel alone is quadratic and slow on long prompts.
    #[arg(long, default_value_t = usize::MAX)]
    prefill_variants_max: usize,
    /// Run everything with these paths off, so that "as served" (CUDA graphs included) measures
    /// the engine without them: silu (SiLU-gate epilogue), rope (rotary epilogue), warp-rows
    /// (warp-per-row GEMV), fused, silu-one-step (the gate/up + SiLU GEMV's one-step variant),
    /// norm (the residual add + RMSNorm folded into the q/k/v and gate/up GEMVs),
    /// down-one-step (the long-row GEMV's), argmax (the greedy argmax kernel: candle's argmax
    /// instead, in the runner step), decode-kernel, pdl (programmatic dependent launch),
    /// cluster (the decode kernels' cluster merge), warm (its L2 warm-up), tensor-cores (the
    /// tensor-core decode kernel), early-kv (its key tiles issued before its wait), pdl-graphs
    /// (programmatic edges in CUDA graphs).
    #[arg(long, value_delimiter = ',')]
    without: Vec<String>,
    /// Batch-1 decode steps through the persistent decode step for the whole run, eager and in
    /// CUDA graphs (off in the engine).
    #[arg(long)]
    persistent_decode: bool,
    /// Also time the decode step (replayed from CUDA graphs with --cuda-graphs) with the L2
    /// prefetch on a side stream at each `GATE_UP:DOWN[:O]` setting (fractions of each row of
    /// those weights), alternating with the engine's default (off), e.g. `0.5:0:1,0.3:0.3`.
    #[arg(long, value_delimiter = ',', value_parser = parse_prefetch)]
    l2_prefetch: Vec<L2Prefetch>,
    /// Also time each projection alone at the batch sizes up to 8, per launch, with its weights
    /// from HBM and from L2 (one weight set launched back to back).
    #[arg(long)]
    l2_probe: bool,
    /// Also write the table here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_prefetch(s: &str) -> std::result::Result<L2Prefetch, String> {
    L2Prefetch::parse(s)
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
    engine::model::decode_step::set_persistent_decode(cli.persistent_decode);
    engine::model::decode_step::set_persistent_decode_in_graphs(cli.persistent_decode);
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
        if let Some(split) = &cli.flash_decode_split {
            let (a, b) = parse_split(split)?;
            engine::model::attention_cuda::set_flash_decode_split(a, b);
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

    // ---- the L2 prefetch sweep. Each setting recaptures the graphs; a recaptured graph replayed
    // ~5% slower than the first capture of its bucket, before the eager variants as after them
    // (days/gpu-engine/run51, run52), so its "off" column, not "as served", is the baseline.
    let prefetch_rows = if device.is_cuda() && !cli.l2_prefetch.is_empty() {
        let batches = cli
            .batch_sizes
            .iter()
            .map(|&b| {
                let step = decode_step(b, cli.context, bs, cfg.vocab_size);
                Ok((b, engine::runner::build_forward_batch(&step, bs)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let (model, cache) = runner_parts(&mut runner);
        prefetch::prefetch_sweep(&device, model, cache, &batches, &cli.l2_prefetch, iters)?
    } else {
        Vec::new()
    };
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
                engine::model::decode_step::set_persistent_decode(cli.persistent_decode);
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

    // ---- the persistent step's phases at batch 1
    let phases = if device.is_cuda() && cli.batch_sizes.contains(&1) {
        let step = decode_step(1, cli.context, bs, cfg.vocab_size);
        let fb = engine::runner::build_forward_batch(&step, bs)?;
        let (model, cache) = runner_parts(&mut runner);
        phases::persistent_phases(model, cache, &fb, &device)?
    } else {
        None
    };
    if let Some((per, step)) = &phases {
        eprintln!("persistent step phases (us, median over layers): {per:.2?}, step {step:.1} us");
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
    let probe = if device.is_cuda() && cli.l2_probe {
        l2_probe(&device, dtype, &cfg, &cli)?
    } else {
        Vec::new()
    };
    #[cfg(not(feature = "cuda"))]
    let probe: Vec<(usize, [(f64, f64); 4])> = Vec::new();
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

    let mut table = render(
        &cli, &device, dtype, &cfg, copy_gbs, tflops, &rows, &variants, graphs, &dparts, &sweep,
        &prows,
    );
    prefetch::render_sweep(&mut table, &prefetch_rows, cli.cuda_graphs);
    prefetch::render_probe(&mut table, &probe, &cfg, dtype.size_in_bytes(), copy_gbs);
    if let Some(p) = &phases {
        phases::render_phases(&mut table, p, cfg.num_hidden_layers);
    }
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

/// `parts::projections_hbm_l2_us` at each batch size up to 8 (the one-row to eight-row GEMVs).
#[cfg(feature = "cuda")]
fn l2_probe(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    cli: &Cli,
) -> Result<Vec<(usize, [(f64, f64); 4])>> {
    let mut q = QueuedTimer::new(device)?;
    let mut time = |f: &mut dyn FnMut() -> Result<()>| q.time(device, f);
    let mut out = Vec::new();
    for &batch in cli.batch_sizes.iter().filter(|&&b| b <= 8) {
        let us = parts::projections_hbm_l2_us(device, dtype, cfg, batch, cli.iters, &mut time)?;
        eprintln!("projections alone, batch {batch}, us per launch (HBM, L2): {us:.2?}");
        out.push((batch, us));
    }
    Ok(out)
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
