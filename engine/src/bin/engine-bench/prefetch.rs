//! The L2 prefetch sweep (`--l2-prefetch`): the decode step (replayed from CUDA graphs with
//! `--cuda-graphs`) with the engine's prefetch off and at each setting, in alternating rounds;
//! and the table of `--l2-probe` (each projection with its weights from HBM and from L2).

use std::fmt::Write as _;

use anyhow::Result;
use candle_core::Device;
use engine::config::ModelConfig;
use engine::model::l2_prefetch::{set_l2_prefetch, L2Prefetch};
use engine::model::{CausalLM, ForwardBatch, KvCache};

use super::parts::{projection_shapes, PROJECTIONS};
use super::timing::{event_ms, median};

/// Rounds over the settings: each round times every setting for `iters` steps, so that a drift
/// of the clocks over the run falls on all of them alike.
const ROUNDS: usize = 2;

/// One batch size's row: (setting, enqueue ms, GPU ms), the off setting first.
pub(crate) type SweepRow = (usize, Vec<(String, f64, f64)>);

/// Times the forward of each batch at prefetch off and at each of `specs`, `ROUNDS` rounds of
/// `iters` steps (after 2 untimed ones per setting and round), medians over all rounds; leaves
/// the prefetch off.
pub(crate) fn prefetch_sweep(
    device: &Device,
    model: &dyn CausalLM,
    cache: &mut KvCache,
    batches: &[(usize, ForwardBatch)],
    specs: &[L2Prefetch],
    iters: usize,
) -> Result<Vec<SweepRow>> {
    let settings: Vec<Option<L2Prefetch>> = std::iter::once(None)
        .chain(specs.iter().copied().map(Some))
        .collect();
    let mut out = Vec::new();
    for (batch, fb) in batches {
        let mut times = vec![Vec::new(); settings.len()];
        for _ in 0..ROUNDS {
            for (s, t) in settings.iter().zip(times.iter_mut()) {
                set_l2_prefetch(*s);
                for i in 0..iters + 2 {
                    let (enqueue, gpu) = event_ms(device, &mut || {
                        model.forward(fb, cache)?;
                        Ok(())
                    })?;
                    if i >= 2 {
                        t.push((enqueue, gpu));
                    }
                }
            }
        }
        set_l2_prefetch(None);
        let row: Vec<_> = settings
            .iter()
            .zip(times)
            .map(|(s, t)| {
                let gpu = median(t.iter().map(|x| x.1).collect());
                let enqueue = median(t.iter().map(|x| x.0).collect());
                let name = s.map_or("off".to_string(), |p| p.to_string());
                eprintln!("decode batch {batch}, L2 prefetch {name}: enqueue {enqueue:.3} ms, GPU {gpu:.3} ms");
                (name, enqueue, gpu)
            })
            .collect();
        out.push((*batch, row));
    }
    Ok(out)
}

/// The markdown section for the sweep: GPU ms per setting and its ratio to off.
pub(crate) fn render_sweep(s: &mut String, rows: &[SweepRow], graphs: bool) {
    let Some((_, first)) = rows.first() else {
        return;
    };
    let how = if graphs {
        "replayed from CUDA graphs"
    } else {
        "eager"
    };
    let _ = writeln!(
        s,
        "\n### L2 prefetch on a side stream, decode step {how} (GPU ms between events; median of {ROUNDS} alternating rounds)\n"
    );
    let names: Vec<&str> = first.iter().map(|(n, _, _)| n.as_str()).collect();
    let _ = writeln!(s, "| batch | {} |", names.join(" | "));
    let _ = writeln!(s, "|---:|{}", "---:|".repeat(names.len()));
    for (batch, row) in rows {
        let off = row.first().map_or(f64::NAN, |r| r.2);
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, (_, _, gpu))| match i {
                0 => format!("{gpu:.3}"),
                _ => format!("{gpu:.3} ({:.3}x)", gpu / off),
            })
            .collect();
        let _ = writeln!(s, "| {batch} | {} |", cells.join(" | "));
    }
    let _ = writeln!(s, "\nSettings are GATE_UP:DOWN:O[:CTAS], the fraction of each row of those weights fetched into L2 at the start of every layer (and the prefetch launch's CTAs, 16 unless given); the ratio is to off in the same run. Every setting, off included, replays graphs captured again for it.");
}

/// The markdown section for the projections timed with their weights from HBM and from L2.
pub(crate) fn render_probe(
    s: &mut String,
    rows: &[(usize, [(f64, f64); 4])],
    cfg: &ModelConfig,
    elem_bytes: usize,
    copy_gbs: f64,
) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n### Projections alone, weights from HBM and from L2 (us per launch, kernels queued back to back)\n"
    );
    let _ = writeln!(
        s,
        "| batch | {} |",
        PROJECTIONS
            .iter()
            .map(|p| format!("{p} HBM | {p} L2 | {p} bytes at copy bandwidth"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---:|{}", "---:|".repeat(3 * PROJECTIONS.len()));
    let bytes = projection_shapes(cfg).map(|(k, out)| k * out * elem_bytes);
    for (batch, us) in rows {
        let cells: Vec<String> = us
            .iter()
            .zip(bytes)
            .map(|((hbm, l2), b)| format!("{hbm:.2} | {l2:.2} | {:.2}", b as f64 / copy_gbs / 1e3))
            .collect();
        let _ = writeln!(s, "| {batch} | {} |", cells.join(" | "));
    }
    let _ = writeln!(s, "\nHBM: the layers' distinct weights in turn (none left in L2 when it comes round again); L2: one layer's weights every time (held in L2 where they fit, 50 MB on H100/H200). Plain GEMVs, no fused epilogues.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_setting_against_off() {
        let rows = vec![(
            1,
            vec![
                ("off".to_string(), 0.05, 1.4),
                ("0.5:0:1".to_string(), 0.06, 1.26),
            ],
        )];
        let mut s = String::new();
        render_sweep(&mut s, &rows, true);
        assert!(s.contains("replayed from CUDA graphs"), "{s}");
        assert!(s.contains("| batch | off | 0.5:0:1 |"), "{s}");
        assert!(s.contains("| 1 | 1.400 | 1.260 (0.900x) |"), "{s}");
        let mut empty = String::new();
        render_sweep(&mut empty, &[], false);
        assert!(empty.is_empty());
    }
}
