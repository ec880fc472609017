//! Where a batch-1 step of the persistent decode kernel goes: CTA 0's clock at the end of each
//! phase and after each grid barrier (`decode_step::set_phase_timing`), as medians over layers.

use std::fmt::Write;

use anyhow::Result;
use candle_core::Device;
use engine::model::{CausalLM, ForwardBatch, KvCache};

use crate::timing::median;

/// The intervals of one layer, in order: the wait at the grid barrier before each phase (its
/// first loads of weights already in flight), then the phase.
pub(crate) const PHASES: [&str; 10] = [
    "wait",
    "q/k/v",
    "wait",
    "attention",
    "wait",
    "o",
    "wait",
    "gate/up",
    "wait",
    "down",
];

/// Per-interval medians over the layers (us) and the whole step (us), from the stamps of one
/// launch: the start, then ten per layer (each wait's end and each phase's end).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn phase_medians(stamps: &[i64], layers: usize) -> Option<(Vec<f64>, f64)> {
    if layers == 0 || stamps.len() < 1 + 10 * layers {
        return None;
    }
    let us = |a: i64, b: i64| (b - a) as f64 / 1e3;
    let per = (0..10)
        .map(|k| {
            median(
                (0..layers)
                    .map(|l| us(stamps[10 * l + k], stamps[10 * l + k + 1]))
                    .collect(),
            )
        })
        .collect();
    Some((per, us(stamps[0], stamps[10 * layers])))
}

/// Runs `fb` (one sequence, one token) three times eagerly through the persistent step (turned on
/// for this thread) with phase timing on and returns the last launch's medians; None when the
/// step did not take the persistent kernel (a shape it cannot take).
#[cfg(feature = "cuda")]
pub(crate) fn persistent_phases(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    fb: &ForwardBatch,
    device: &Device,
) -> Result<Option<(Vec<f64>, f64)>> {
    use candle_core::{DType, Tensor};
    use engine::model::cuda_graph::set_cuda_graphs_on_this_thread;
    use engine::model::decode_step::{set_persistent_decode_on_this_thread, set_phase_timing};
    let layers = model.config().num_hidden_layers;
    if fb.seqs.len() != 1 || fb.token_ids.len() != 1 {
        return Ok(None);
    }
    let buf = Tensor::zeros(1 + 10 * layers, DType::I64, device)?;
    set_phase_timing(Some(buf.clone()));
    set_cuda_graphs_on_this_thread(Some(false));
    set_persistent_decode_on_this_thread(Some(true));
    let ran = (0..3).try_for_each(|_| model.forward(fb, cache).map(|_| ()));
    set_persistent_decode_on_this_thread(None);
    set_cuda_graphs_on_this_thread(None);
    set_phase_timing(None);
    ran?;
    let stamps: Vec<i64> = buf.to_vec1()?;
    if stamps.iter().all(|&s| s == 0) {
        return Ok(None);
    }
    Ok(phase_medians(&stamps, layers))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn persistent_phases(
    _: &dyn CausalLM,
    _: &mut KvCache,
    _: &ForwardBatch,
    _: &Device,
) -> Result<Option<(Vec<f64>, f64)>> {
    Ok(None)
}

/// The markdown section for `persistent_phases`' result.
pub(crate) fn render_phases(s: &mut String, phases: &(Vec<f64>, f64), layers: usize) {
    let (per, step) = phases;
    let _ = writeln!(
        s,
        "\n### Persistent decode step, batch 1: phases (us, median over the {layers} layers, CTA 0's clock)\n"
    );
    let _ = writeln!(s, "| {} | layer | step |", PHASES.join(" | "));
    let _ = writeln!(s, "|{}---:|---:|", "---:|".repeat(PHASES.len()));
    let cells: Vec<String> = per.iter().map(|v| format!("{v:.2}")).collect();
    let _ = writeln!(
        s,
        "| {} | {:.2} | {:.1} |",
        cells.join(" | "),
        per.iter().sum::<f64>(),
        step
    );
    let _ = writeln!(s, "\nEach phase is CTA 0's own work; each wait is its time at the grid barrier before the phase (the slowest CTA's lag plus the barrier, while the phase's first weight loads fly). Eager launch, stamps of one step.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_interval_over_layers() {
        // Start at 1,000 ns; three layers whose intervals take 1..=10 us, 2x and 3x that.
        let mut stamps = vec![1_000i64];
        for l in 1..=3 {
            for k in 1..=10 {
                stamps.push(stamps.last().unwrap() + 1_000 * k * l);
            }
        }
        let (per, step) = phase_medians(&stamps, 3).unwrap();
        assert_eq!(per[0], 2.0);
        assert_eq!(per[9], 20.0);
        assert_eq!(step, 330.0);
        assert!(phase_medians(&stamps[..30], 3).is_none());
    }
}
