//! The benchmark's PNG plots: per-request TTFT/TPOT, server KV usage and queue over time, latency
//! percentiles, and per-stage latency/throughput against offered QPS; also the overlays of
//! `probe compare`.

use super::stats::{compute, BenchStats, Slo};
use super::summary::{RequestRow, SamplePoint};
use crate::plot::{draw, Chart, Mark, PlotError, Series};
use crate::record::RequestRecord;
use std::path::{Path, PathBuf};

const SIZE: (u32, u32) = (1000, 560);

/// (x, y) points of one series.
pub type Points = Vec<(f64, f64)>;

/// KV cache usage metric names, newest vLLM name first.
pub const KV_USAGE_METRICS: [&str; 2] = ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"];
pub const WAITING_METRIC: &str = "vllm:num_requests_waiting";
pub const RUNNING_METRIC: &str = "vllm:num_requests_running";

/// (index, ttft ms) and (index, tpot ms) of completed requests, in issuing order.
pub fn per_request_series(rows: &[RequestRow]) -> (Points, Points) {
    let ttft = rows
        .iter()
        .filter_map(|r| r.ttft_ms.map(|v| (r.index as f64, v)))
        .collect();
    let tpot = rows
        .iter()
        .filter_map(|r| r.tpot_ms.map(|v| (r.index as f64, v)))
        .collect();
    (ttft, tpot)
}

/// Points of one sampled metric, `(t_s, value)`.
pub fn metric_series(samples: &[SamplePoint], name: &str) -> Vec<(f64, f64)> {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| (s.t_s, s.value))
        .collect()
}

/// KV usage in percent, from whichever vLLM name the server exports (values are 0..1).
pub fn kv_usage_series(samples: &[SamplePoint]) -> Vec<(f64, f64)> {
    KV_USAGE_METRICS
        .iter()
        .map(|m| metric_series(samples, m))
        .find(|s| !s.is_empty())
        .unwrap_or_default()
        .into_iter()
        .map(|(t, v)| (t, v * 100.0))
        .collect()
}

/// Per-stage statistics of a staged run: (offered QPS, stats) for labels `stage{i}`.
pub fn stage_stats(records: &[RequestRecord], rates: &[f64]) -> Vec<(f64, BenchStats)> {
    rates
        .iter()
        .enumerate()
        .filter_map(|(i, &rate)| {
            let label = format!("stage{i}");
            let recs: Vec<RequestRecord> = records
                .iter()
                .filter(|r| r.label == label)
                .cloned()
                .collect();
            (!recs.is_empty()).then(|| (rate, compute(&recs, &Slo::default())))
        })
        .collect()
}

/// Writes every plot of one run into `dir`; returns the files written (relative names).
pub fn write_run_plots(
    dir: &Path,
    rows: &[RequestRow],
    samples: &[SamplePoint],
    stats: &BenchStats,
    stages: &[(f64, BenchStats)],
) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    let mut out = |name: &str, chart: Chart, series: Vec<Series>| -> Result<(), PlotError> {
        let p = dir.join(name);
        draw(&p, &chart, &series, SIZE)?;
        written.push(PathBuf::from(name));
        Ok(())
    };
    let (ttft, tpot) = per_request_series(rows);
    out(
        "ttft_per_request.png",
        Chart {
            title: "TTFT per request",
            x_label: "request index (issue order)",
            y_label: "TTFT (ms)",
            mark: Mark::Points,
            y_from_zero: true,
        },
        vec![Series::new("TTFT", ttft)],
    )?;
    out(
        "tpot_per_request.png",
        Chart {
            title: "TPOT per request",
            x_label: "request index (issue order)",
            y_label: "TPOT (ms)",
            mark: Mark::Points,
            y_from_zero: true,
        },
        vec![Series::new("TPOT", tpot)],
    )?;
    let pct = |d: &super::stats::Distribution| d.percentiles.clone();
    out(
        "latency_percentiles.png",
        Chart {
            title: "Latency percentiles",
            x_label: "percentile",
            y_label: "latency (ms)",
            mark: Mark::LinePoints,
            y_from_zero: true,
        },
        vec![
            Series::new("TTFT", pct(&stats.ttft_ms)),
            Series::new("TPOT", pct(&stats.tpot_ms)),
            Series::new("ITL", pct(&stats.itl_ms)),
            Series::new("E2EL", pct(&stats.e2el_ms)),
        ],
    )?;
    let kv = kv_usage_series(samples);
    let waiting = metric_series(samples, WAITING_METRIC);
    let running = metric_series(samples, RUNNING_METRIC);
    if !kv.is_empty() {
        out(
            "kv_cache_usage.png",
            Chart {
                title: "KV cache usage",
                x_label: "time (s)",
                y_label: "KV cache usage (%)",
                mark: Mark::Line,
                y_from_zero: true,
            },
            vec![Series::new("KV usage", kv)],
        )?;
    }
    if !waiting.is_empty() || !running.is_empty() {
        out(
            "queue.png",
            Chart {
                title: "Requests waiting and running",
                x_label: "time (s)",
                y_label: "requests",
                mark: Mark::Line,
                y_from_zero: true,
            },
            vec![
                Series::new("waiting", waiting),
                Series::new("running", running),
            ],
        )?;
    }
    if stages.len() > 1 {
        let xy = |f: &dyn Fn(&BenchStats) -> f64| {
            stages.iter().map(|(q, s)| (*q, f(s))).collect::<Vec<_>>()
        };
        out(
            "stages_latency.png",
            Chart {
                title: "Latency vs offered load",
                x_label: "offered QPS",
                y_label: "latency (ms)",
                mark: Mark::LinePoints,
                y_from_zero: true,
            },
            vec![
                Series::new("E2EL mean", xy(&|s| s.e2el_ms.mean)),
                Series::new("TTFT p90", xy(&|s| s.ttft_ms.p(90.0))),
                Series::new("TPOT mean", xy(&|s| s.tpot_ms.mean)),
            ],
        )?;
        out(
            "stages_throughput.png",
            Chart {
                title: "Throughput vs offered load",
                x_label: "offered QPS",
                y_label: "output tokens/s",
                mark: Mark::LinePoints,
                y_from_zero: true,
            },
            vec![Series::new("output tok/s", xy(&|s| s.output_throughput))],
        )?;
    }
    Ok(written)
}

/// One run's data for an overlay: its name, request rows and samples.
pub struct RunData<'a> {
    pub name: &'a str,
    pub rows: &'a [RequestRow],
    pub samples: &'a [SamplePoint],
}

/// Overlaid plots of several runs (one line per run): TTFT, TPOT per request, KV usage over time.
pub fn write_compare_plots(dir: &Path, runs: &[RunData]) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut kv = Vec::new();
    for r in runs {
        let (a, b) = per_request_series(r.rows);
        ttft.push(Series::new(r.name, a));
        tpot.push(Series::new(r.name, b));
        kv.push(Series::new(r.name, kv_usage_series(r.samples)));
    }
    let mut out = |name: &str, chart: Chart, series: Vec<Series>| -> Result<(), PlotError> {
        draw(&dir.join(name), &chart, &series, SIZE)?;
        written.push(PathBuf::from(name));
        Ok(())
    };
    out(
        "compare_ttft.png",
        Chart {
            title: "TTFT per request",
            x_label: "request index",
            y_label: "TTFT (ms)",
            mark: Mark::Line,
            y_from_zero: true,
        },
        ttft,
    )?;
    out(
        "compare_tpot.png",
        Chart {
            title: "TPOT per request",
            x_label: "request index",
            y_label: "TPOT (ms)",
            mark: Mark::Line,
            y_from_zero: true,
        },
        tpot,
    )?;
    if kv.iter().any(|s| !s.points.is_empty()) {
        out(
            "compare_kv_cache_usage.png",
            Chart {
                title: "KV cache usage",
                x_label: "time (s)",
                y_label: "KV cache usage (%)",
                mark: Mark::Line,
                y_from_zero: true,
            },
            kv,
        )?;
    }
    Ok(written)
}
