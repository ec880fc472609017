//! `probe compare`: one markdown report putting several benchmark runs side by side, with
//! overlaid plots (TTFT and TPOT per request index, KV cache usage over time).

use super::output::{render, OutputError};
use super::plots::{write_compare_plots, RunData};
use super::stats::BenchStats;
use super::summary::{read_requests_csv, read_samples_csv, RequestRow, RunInfo, SamplePoint};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const COMPARE_TEMPLATE: &str = include_str!("../../../templates/compare_report.md.tera");

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("compare needs at least two run folders")]
    TooFew,
    #[error("{dir}: {message}")]
    Run { dir: String, message: String },
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// One stored run, loaded from its folder.
pub struct StoredRun {
    pub dir: PathBuf,
    pub name: String,
    pub info: RunInfo,
    pub stats: BenchStats,
    pub rows: Vec<RequestRow>,
    pub samples: Vec<SamplePoint>,
}

pub fn load_run(dir: &Path) -> Result<StoredRun, CompareError> {
    let err = |message: String| CompareError::Run {
        dir: dir.display().to_string(),
        message,
    };
    let raw = std::fs::read_to_string(dir.join("result.json"))
        .map_err(|e| err(format!("result.json: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&raw).map_err(|e| err(format!("result.json: {e}")))?;
    let stats: BenchStats = serde_json::from_value(v.get("stats").cloned().unwrap_or_default())
        .map_err(|e| err(format!("result.json has no probe stats: {e}")))?;
    let info: RunInfo = serde_json::from_value(v.get("run_info").cloned().unwrap_or_default())
        .map_err(|e| err(format!("result.json has no run_info: {e}")))?;
    let rows = read_requests_csv(&dir.join("requests.csv")).map_err(|e| err(e.to_string()))?;
    let samples = read_samples_csv(&dir.join("samples.csv")).unwrap_or_default();
    let base = dir
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let name = if info.label.is_empty() || info.label == base {
        base
    } else {
        format!("{base} ({})", info.label)
    };
    Ok(StoredRun {
        dir: dir.to_path_buf(),
        name,
        info,
        stats,
        rows,
        samples,
    })
}

#[derive(Serialize)]
struct Row {
    metric: &'static str,
    values: Vec<String>,
}

#[derive(Serialize)]
struct Ctx {
    runs: Vec<RunHead>,
    rows: Vec<Row>,
    plots: Vec<String>,
}

#[derive(Serialize)]
struct RunHead {
    name: String,
    dir: String,
    arrival: String,
    dataset: String,
    token_counting: String,
}

fn table(runs: &[StoredRun]) -> Vec<Row> {
    type Get = fn(&BenchStats) -> f64;
    let metrics: [(&'static str, Get); 17] = [
        ("Successful requests", |s| s.completed as f64),
        ("Failed requests", |s| s.failed as f64),
        ("Benchmark duration (s)", |s| s.duration),
        ("Total input tokens", |s| s.total_input_tokens as f64),
        ("Total generated tokens", |s| s.total_output_tokens as f64),
        ("Prefix-cached input tokens", |s| {
            s.total_cached_tokens.unwrap_or(0) as f64
        }),
        ("Request throughput (req/s)", |s| s.request_throughput),
        ("Output token throughput (tok/s)", |s| s.output_throughput),
        ("Total Token throughput (tok/s)", |s| {
            s.total_token_throughput
        }),
        ("Mean TTFT (ms)", |s| s.ttft_ms.mean),
        ("P90 TTFT (ms)", |s| s.ttft_ms.p(90.0)),
        ("P99 TTFT (ms)", |s| s.ttft_ms.p(99.0)),
        ("Mean TPOT (ms)", |s| s.tpot_ms.mean),
        ("P99 TPOT (ms)", |s| s.tpot_ms.p(99.0)),
        ("Mean ITL (ms)", |s| s.itl_ms.mean),
        ("P99 ITL (ms)", |s| s.itl_ms.p(99.0)),
        ("Mean E2EL (ms)", |s| s.e2el_ms.mean),
    ];
    metrics
        .iter()
        .map(|(metric, get)| Row {
            metric,
            values: runs
                .iter()
                .map(|r| format!("{:.2}", get(&r.stats)))
                .collect(),
        })
        .collect()
}

/// Loads `dirs`, writes `out/compare.md` and `out/plots/compare_*.png`; returns the report path.
pub fn compare(
    dirs: &[PathBuf],
    out: &Path,
    template: Option<&Path>,
) -> Result<PathBuf, CompareError> {
    if dirs.len() < 2 {
        return Err(CompareError::TooFew);
    }
    let runs = dirs
        .iter()
        .map(|d| load_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    let plot_dir = out.join("plots");
    std::fs::create_dir_all(&plot_dir).map_err(|e| CompareError::Run {
        dir: out.display().to_string(),
        message: e.to_string(),
    })?;
    let data: Vec<RunData> = runs
        .iter()
        .map(|r| RunData {
            name: &r.name,
            rows: &r.rows,
            samples: &r.samples,
        })
        .collect();
    let plots = write_compare_plots(&plot_dir, &data).map_err(OutputError::from)?;
    let ctx = Ctx {
        runs: runs
            .iter()
            .map(|r| RunHead {
                name: r.name.clone(),
                dir: r.dir.display().to_string(),
                arrival: r.info.arrival.clone(),
                dataset: r.info.dataset.clone(),
                token_counting: r.info.token_counting.clone(),
            })
            .collect(),
        rows: table(&runs),
        plots: plots
            .iter()
            .map(|p| format!("plots/{}", p.display()))
            .collect(),
    };
    let tpl = match template {
        Some(p) => std::fs::read_to_string(p).map_err(|e| CompareError::Run {
            dir: p.display().to_string(),
            message: e.to_string(),
        })?,
        None => COMPARE_TEMPLATE.to_string(),
    };
    let report = out.join("compare.md");
    std::fs::write(&report, render(&tpl, &ctx)?).map_err(|e| CompareError::Run {
        dir: out.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(report)
}
