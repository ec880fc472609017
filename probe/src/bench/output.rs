//! Writes a benchmark run's folder: summary.txt, result.json, records.jsonl, requests.csv,
//! samples.csv, plots/*.png and report.md (Tera template tying them together).

use super::plots::{stage_stats, write_run_plots};
use super::run::StopReason;
use super::stats::{compute, BenchStats, Slo};
use super::summary::{self, RequestRow, RunInfo, SamplePoint, SummaryError};
use crate::plot::PlotError;
use crate::record::RequestRecord;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const BENCH_TEMPLATE: &str = include_str!("../../../templates/bench_report.md.tera");

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Summary(#[from] SummaryError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("report template: {0}")]
    Template(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Renders a Tera template given as text (the embedded default or a file's content).
pub fn render(template: &str, ctx: &impl Serialize) -> Result<String, OutputError> {
    let ctx = tera::Context::from_serialize(ctx).map_err(|e| OutputError::Template(chain(&e)))?;
    tera::Tera::one_off(template, &ctx, false).map_err(|e| OutputError::Template(chain(&e)))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(i) = src {
        s.push_str(": ");
        s.push_str(&i.to_string());
        src = i.source();
    }
    s
}

#[derive(Serialize)]
struct ReportCtx<'a> {
    info: &'a RunInfo,
    stats: &'a BenchStats,
    summary: &'a str,
    planned: usize,
    issued: usize,
    stopped: Option<String>,
    failures: Vec<FailureRow>,
    plots: Vec<String>,
    stages: Vec<StageRow>,
    dists: Vec<DistRow>,
}

#[derive(Serialize)]
struct DistRow {
    name: &'static str,
    mean: f64,
    median: f64,
    std: f64,
    percentiles: Vec<f64>,
}

#[derive(Serialize)]
struct FailureRow {
    index: usize,
    kind: String,
    status: String,
    message: String,
}

#[derive(Serialize)]
struct StageRow {
    qps: f64,
    completed: usize,
    failed: usize,
    request_throughput: f64,
    output_throughput: f64,
    ttft_p90_ms: f64,
    tpot_mean_ms: f64,
    e2el_mean_ms: f64,
}

/// The run's data needed to write its folder.
pub struct RunData<'a> {
    pub info: &'a RunInfo,
    pub records: &'a [RequestRecord],
    pub samples: &'a [SamplePoint],
    pub planned: usize,
    pub stopped: Option<&'a StopReason>,
    pub slo: Slo,
    /// Offered QPS of each stage (empty unless staged).
    pub stage_rates: &'a [f64],
    /// Optional template file overriding the embedded one.
    pub template: Option<&'a Path>,
}

/// Writes every output file into `dir`; returns the statistics.
pub fn write_run(dir: &Path, d: &RunData) -> Result<BenchStats, OutputError> {
    std::fs::create_dir_all(dir.join("plots")).map_err(io(dir))?;
    let stats = compute(d.records, &d.slo);
    let text = summary::text_block(&stats, d.info);
    let write = |name: &str, content: &[u8]| -> Result<(), OutputError> {
        let p = dir.join(name);
        std::fs::write(&p, content).map_err(io(&p))
    };
    write("summary.txt", text.as_bytes())?;
    let json = summary::result_json(&stats, d.info, d.records);
    write(
        "result.json",
        serde_json::to_string_pretty(&json)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let mut jsonl = String::new();
    for r in d.records {
        jsonl.push_str(&serde_json::to_string(r).unwrap_or_default());
        jsonl.push('\n');
    }
    write("records.jsonl", jsonl.as_bytes())?;
    summary::write_requests_csv(&dir.join("requests.csv"), d.records)?;
    summary::write_samples_csv(&dir.join("samples.csv"), d.samples)?;
    let rows: Vec<RequestRow> = d.records.iter().map(RequestRow::from_record).collect();
    let stages = stage_stats(d.records, d.stage_rates);
    let plots = write_run_plots(&dir.join("plots"), &rows, d.samples, &stats, &stages)?;
    let failures = d
        .records
        .iter()
        .filter_map(|r| {
            r.error.as_ref().map(|e| FailureRow {
                index: r.index,
                kind: super::stats::kind_name(e.kind).to_string(),
                status: e.status.map(|s| s.to_string()).unwrap_or_default(),
                message: e.message.replace('|', "\\|").replace('\n', " "),
            })
        })
        .collect();
    let ctx = ReportCtx {
        info: d.info,
        stats: &stats,
        summary: &text,
        planned: d.planned,
        issued: d.records.len(),
        stopped: d.stopped.map(|s| match s {
            StopReason::Interrupted => "interrupted (Ctrl-C); results are partial".to_string(),
            StopReason::ServerDown(m) => format!("server unreachable, run ended early: {m}"),
        }),
        failures,
        dists: [
            ("TTFT (ms)", &stats.ttft_ms),
            ("TPOT (ms)", &stats.tpot_ms),
            ("ITL (ms)", &stats.itl_ms),
            ("E2EL (ms)", &stats.e2el_ms),
            ("queue (ms)", &stats.queue_ms),
        ]
        .into_iter()
        .map(|(name, d)| DistRow {
            name,
            mean: d.mean,
            median: d.median,
            std: d.std,
            percentiles: d.percentiles.iter().map(|p| p.1).collect(),
        })
        .collect(),
        plots: plots
            .iter()
            .map(|p| format!("plots/{}", p.display()))
            .collect(),
        stages: stages
            .iter()
            .map(|(q, s)| StageRow {
                qps: *q,
                completed: s.completed,
                failed: s.failed,
                request_throughput: s.request_throughput,
                output_throughput: s.output_throughput,
                ttft_p90_ms: s.ttft_ms.p(90.0),
                tpot_mean_ms: s.tpot_ms.mean,
                e2el_mean_ms: s.e2el_ms.mean,
            })
            .collect(),
    };
    let template = match d.template {
        Some(p) => std::fs::read_to_string(p).map_err(io(p))?,
        None => BENCH_TEMPLATE.to_string(),
    };
    write("report.md", render(&template, &ctx)?.as_bytes())?;
    Ok(stats)
}

/// Reads a run folder's records back (for re-rendering and comparing).
pub fn read_records(dir: &Path) -> Result<Vec<RequestRecord>, OutputError> {
    let p: PathBuf = dir.join("records.jsonl");
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| OutputError::Io {
                path: p.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
        })
        .collect()
}
