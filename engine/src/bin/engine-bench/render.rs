//! The markdown report: the device's ceilings, decode and prefill rows against their floors, the
//! variant columns side by side, the parts and the split sweep.

use super::parts;
use super::timing::BUSY_MATMULS;
use super::variants::variant_names;
use super::Cli;
use candle_core::{DType, Device};
use engine::config::ModelConfig;
use std::fmt::Write as _;

pub(crate) struct PrefillRow {
    pub(crate) tokens: usize,
    pub(crate) ms: f64,
    pub(crate) no_flash_ms: Option<f64>,
    /// The forward with the tensor-core kernel's 64-row, 32-key tiles instead of 128 x 64.
    pub(crate) narrow_tiles_ms: Option<f64>,
    pub(crate) matmuls_ms: f64,
    pub(crate) attention_ms: f64,
    pub(crate) elementwise_ms: f64,
    pub(crate) unfused_ms: Option<f64>,
    pub(crate) floor_ms: f64,
    /// TFLOP/s of each projection alone (`parts::PROJECTIONS` order).
    pub(crate) proj_tflops: [f64; 4],
}

/// GPU milliseconds of a decode step's parts at one batch size (`QueuedTimer`).
pub(crate) struct DecodeParts {
    pub(crate) batch: usize,
    pub(crate) matmuls: f64,
    pub(crate) lm_head: f64,
    pub(crate) attention: f64,
    pub(crate) elementwise: f64,
}

pub(crate) struct DecodeRow {
    pub(crate) batch: usize,
    pub(crate) step_ms: f64,
    pub(crate) forward_ms: f64,
    pub(crate) enqueue_ms: Option<f64>,
    pub(crate) gpu_ms: Option<f64>,
    pub(crate) floor_ms: f64,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn render(
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
    if cli.persistent_decode {
        let _ = writeln!(
            s,
            "Run with the persistent decode step (`--persistent-decode`).\n"
        );
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
