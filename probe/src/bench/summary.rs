//! Benchmark output files: vLLM's text summary block, vLLM-named result JSON, per-request CSV and
//! the samples time-series CSV.

use super::stats::{kind_name, output_tokens, BenchStats, Distribution};
use crate::record::RequestRecord;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write CSV {path}: {source}")]
    Csv { path: String, source: csv::Error },
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
}

/// What was run, for the summary header and the result JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub label: String,
    pub date: String,
    pub base_url: String,
    pub endpoint: String,
    pub model_id: String,
    pub num_prompts: usize,
    /// Requests/s; None = burst (vLLM's `inf`).
    pub request_rate: Option<f64>,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub arrival: String,
    pub dataset: String,
    pub token_counting: String,
    pub seed: u64,
    /// Ranks the server splits the model over, when it says (our engine's startup report).
    #[serde(default)]
    pub tensor_parallel_size: Option<u64>,
}

/// One point of a sampled time series (long format: one metric per row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplePoint {
    pub t_s: f64,
    pub metric: String,
    pub value: f64,
}

fn row(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{:<40} {:<10}", label, value);
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

fn metric_section(out: &mut String, header: &str, name: &str, d: &Distribution) {
    let _ = writeln!(out, "{:-^50}", header);
    row(out, &format!("Mean {name} (ms):"), f2(d.mean));
    row(out, &format!("Median {name} (ms):"), f2(d.median));
    row(out, &format!("Std {name} (ms):"), f2(d.std));
    for (p, v) in &d.percentiles {
        row(out, &format!("P{p} {name} (ms):"), f2(*v));
    }
}

/// The "Serving Benchmark Result" block with vLLM's row labels and units (plus std, p50/p90/p95,
/// E2EL, failures by kind and client queueing).
pub fn text_block(stats: &BenchStats, info: &RunInfo) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:=^50}", " Serving Benchmark Result ");
    row(&mut out, "Successful requests:", stats.completed);
    row(&mut out, "Failed requests:", stats.failed);
    for (kind, n) in &stats.failures_by_kind {
        row(&mut out, &format!("  failed ({kind}):"), n);
    }
    if let Some(c) = info.max_concurrency {
        row(&mut out, "Maximum request concurrency:", c);
    }
    if let Some(tp) = info.tensor_parallel_size {
        row(&mut out, "Server tensor parallel size:", tp);
    }
    if let Some(r) = info.request_rate {
        row(&mut out, "Request rate configured (RPS):", f2(r));
    }
    row(&mut out, "Benchmark duration (s):", f2(stats.duration));
    row(&mut out, "Total input tokens:", stats.total_input_tokens);
    row(
        &mut out,
        "Total generated tokens:",
        stats.total_output_tokens,
    );
    if let Some(c) = stats.total_cached_tokens {
        let pct = if stats.total_input_tokens > 0 {
            100.0 * c as f64 / stats.total_input_tokens as f64
        } else {
            0.0
        };
        row(
            &mut out,
            "Prefix-cached input tokens:",
            format!("{c} ({pct:.1}%)"),
        );
    }
    row(
        &mut out,
        "Request throughput (req/s):",
        f2(stats.request_throughput),
    );
    if let Some(g) = stats.request_goodput {
        row(&mut out, "Request goodput (req/s):", f2(g));
    }
    row(
        &mut out,
        "Output token throughput (tok/s):",
        f2(stats.output_throughput),
    );
    row(
        &mut out,
        "Peak output token throughput (tok/s):",
        f2(stats.max_output_tokens_per_s),
    );
    row(
        &mut out,
        "Peak concurrent requests:",
        f2(stats.max_concurrent_requests as f64),
    );
    row(
        &mut out,
        "Total Token throughput (tok/s):",
        f2(stats.total_token_throughput),
    );
    metric_section(&mut out, "Time to First Token", "TTFT", &stats.ttft_ms);
    metric_section(
        &mut out,
        "Time per Output Token (excl. 1st token)",
        "TPOT",
        &stats.tpot_ms,
    );
    metric_section(&mut out, "Inter-token Latency", "ITL", &stats.itl_ms);
    metric_section(&mut out, "End-to-end Latency", "E2EL", &stats.e2el_ms);
    metric_section(
        &mut out,
        "Client Queueing (sent - scheduled)",
        "queue",
        &stats.queue_ms,
    );
    let _ = writeln!(out, "{}", "=".repeat(50));
    out
}

/// The result JSON with vLLM's field names (`mean_ttft_ms`, `p99_itl_ms`, `input_lens`, ...).
pub fn result_json(
    stats: &BenchStats,
    info: &RunInfo,
    records: &[RequestRecord],
) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        m.insert(k.to_string(), v);
    };
    put("date", info.date.clone().into());
    put("label", info.label.clone().into());
    put("backend", "openai".into());
    put("base_url", info.base_url.clone().into());
    put("endpoint", info.endpoint.clone().into());
    put("model_id", info.model_id.clone().into());
    put("num_prompts", info.num_prompts.into());
    put(
        "request_rate",
        info.request_rate
            .map(serde_json::Value::from)
            .unwrap_or_else(|| "inf".into()),
    );
    put("burstiness", info.burstiness.into());
    put("max_concurrency", info.max_concurrency.into());
    put("arrival", info.arrival.clone().into());
    put("dataset", info.dataset.clone().into());
    put("token_counting", info.token_counting.clone().into());
    put("seed", info.seed.into());
    put("duration", stats.duration.into());
    put("completed", stats.completed.into());
    put("failed", stats.failed.into());
    put(
        "failures_by_kind",
        serde_json::to_value(&stats.failures_by_kind).unwrap_or_default(),
    );
    put("total_input_tokens", stats.total_input_tokens.into());
    put("total_output_tokens", stats.total_output_tokens.into());
    put("total_cached_tokens", stats.total_cached_tokens.into());
    put("request_throughput", stats.request_throughput.into());
    put("request_goodput", stats.request_goodput.into());
    put("output_throughput", stats.output_throughput.into());
    put(
        "total_token_throughput",
        stats.total_token_throughput.into(),
    );
    put(
        "max_output_tokens_per_s",
        stats.max_output_tokens_per_s.into(),
    );
    put(
        "max_concurrent_requests",
        stats.max_concurrent_requests.into(),
    );
    let ok: Vec<&RequestRecord> = records.iter().collect();
    put(
        "input_lens",
        ok.iter()
            .map(|r| r.prompt_tokens.unwrap_or(0))
            .collect::<Vec<_>>()
            .into(),
    );
    put(
        "output_lens",
        ok.iter()
            .map(|r| if r.ok() { output_tokens(r) } else { 0 })
            .collect::<Vec<_>>()
            .into(),
    );
    put(
        "ttfts",
        ok.iter()
            .map(|r| r.ttft_s().unwrap_or(0.0))
            .collect::<Vec<_>>()
            .into(),
    );
    put(
        "itls",
        ok.iter().map(|r| r.itl_s()).collect::<Vec<_>>().into(),
    );
    put(
        "errors",
        ok.iter()
            .map(|r| {
                r.error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .into(),
    );
    for (name, d) in [
        ("ttft", &stats.ttft_ms),
        ("tpot", &stats.tpot_ms),
        ("itl", &stats.itl_ms),
        ("e2el", &stats.e2el_ms),
        ("queue", &stats.queue_ms),
    ] {
        put(&format!("mean_{name}_ms"), d.mean.into());
        put(&format!("median_{name}_ms"), d.median.into());
        put(&format!("std_{name}_ms"), d.std.into());
        for (p, v) in &d.percentiles {
            put(&format!("p{p}_{name}_ms"), (*v).into());
        }
    }
    put("stats", serde_json::to_value(stats).unwrap_or_default());
    put("run_info", serde_json::to_value(info).unwrap_or_default());
    serde_json::Value::Object(m)
}

/// One row of `requests.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRow {
    pub index: usize,
    pub label: String,
    pub scheduled_s: f64,
    pub sent_s: f64,
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub itl_mean_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    pub e2e_ms: f64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Prompt tokens served from the server's prefix cache, when it reports them.
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    pub status: String,
    pub error: String,
}

impl RequestRow {
    pub fn from_record(r: &RequestRecord) -> Self {
        let itl = Distribution::of(&r.itl_s().iter().map(|x| x * 1000.0).collect::<Vec<_>>());
        let ok = r.ok();
        let tpot = if ok && output_tokens(r) >= 2 {
            r.ttft_s()
                .map(|t| (r.e2e_s() - t) / (output_tokens(r) as f64 - 1.0) * 1000.0)
        } else {
            None
        };
        RequestRow {
            index: r.index,
            label: r.label.clone(),
            scheduled_s: r.scheduled_s,
            sent_s: r.sent_s,
            ttft_ms: if ok {
                r.ttft_s().map(|t| t * 1000.0)
            } else {
                None
            },
            tpot_ms: tpot,
            itl_mean_ms: (itl.count > 0).then_some(itl.mean),
            itl_p99_ms: (itl.count > 0).then(|| itl.p(99.0)),
            e2e_ms: r.e2e_s() * 1000.0,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cached_tokens: r.cached_tokens,
            status: match &r.error {
                None => "ok".to_string(),
                Some(e) => kind_name(e.kind).to_string(),
            },
            error: r
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default(),
        }
    }
}

fn write_csv<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), SummaryError> {
    let p = path.display().to_string();
    let mut w = csv::Writer::from_path(path).map_err(|source| SummaryError::Csv {
        path: p.clone(),
        source,
    })?;
    for r in rows {
        w.serialize(r).map_err(|source| SummaryError::Csv {
            path: p.clone(),
            source,
        })?;
    }
    w.flush()
        .map_err(|source| SummaryError::Io { path: p, source })
}

fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, SummaryError> {
    let p = path.display().to_string();
    let err = |e: csv::Error| SummaryError::Read {
        path: p.clone(),
        message: e.to_string(),
    };
    let mut r = csv::Reader::from_path(path).map_err(err)?;
    r.deserialize().collect::<Result<Vec<T>, _>>().map_err(err)
}

pub fn write_requests_csv(path: &Path, records: &[RequestRecord]) -> Result<(), SummaryError> {
    let rows: Vec<RequestRow> = records.iter().map(RequestRow::from_record).collect();
    write_csv(path, &rows)
}

pub fn read_requests_csv(path: &Path) -> Result<Vec<RequestRow>, SummaryError> {
    read_csv(path)
}

pub fn write_samples_csv(path: &Path, samples: &[SamplePoint]) -> Result<(), SummaryError> {
    write_csv(path, samples)
}

pub fn read_samples_csv(path: &Path) -> Result<Vec<SamplePoint>, SummaryError> {
    read_csv(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{compute, Slo};
    use crate::record::{ErrorKind, RequestError};

    fn records() -> Vec<RequestRecord> {
        let ok = RequestRecord {
            index: 0,
            label: "bench".into(),
            scheduled_s: 0.0,
            sent_s: 0.0,
            chunk_times_s: vec![0.1, 0.2, 0.3],
            end_s: 0.3,
            prompt_tokens: Some(5),
            completion_tokens: Some(3),
            ..Default::default()
        };
        let bad = RequestRecord {
            index: 1,
            label: "bench".into(),
            scheduled_s: 0.1,
            sent_s: 0.1,
            end_s: 0.2,
            error: Some(RequestError {
                kind: ErrorKind::HttpStatus,
                message: "HTTP 503, with a comma".into(),
                status: Some(503),
            }),
            ..Default::default()
        };
        vec![ok, bad]
    }

    #[test]
    fn text_block_has_vllm_rows() {
        let recs = records();
        let s = compute(&recs, &Slo::default());
        let info = RunInfo {
            request_rate: Some(4.0),
            max_concurrency: Some(8),
            ..Default::default()
        };
        let t = text_block(&s, &info);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "============ Serving Benchmark Result ============"
        );
        assert_eq!(
            lines[1],
            format!("{:<40} {:<10}", "Successful requests:", 1)
        );
        assert!(t.contains(&format!("{:<40} {:<10}", "Benchmark duration (s):", "0.30")));
        assert!(t.contains("  failed (http_status):"));
        assert!(
            !t.contains("tensor parallel"),
            "no row when the server did not say"
        );
        let tp = text_block(
            &s,
            &RunInfo {
                tensor_parallel_size: Some(2),
                ..info.clone()
            },
        );
        assert!(tp.contains(&format!("{:<40} {:<10}", "Server tensor parallel size:", 2)));
        assert!(t.contains("Request rate configured (RPS):           4.00"));
        assert!(t.contains("---------------Time to First Token----------------"));
        assert!(t.contains("-----Time per Output Token (excl. 1st token)------"));
        assert!(t.contains(&format!("{:<40} {:<10}", "Mean TTFT (ms):", "100.00")));
        assert!(t.contains(&format!("{:<40} {:<10}", "P99 ITL (ms):", "100.00")));
        assert_eq!(*lines.last().unwrap(), "=".repeat(50));
    }

    #[test]
    fn json_and_csv_round_trip() {
        let recs = records();
        let s = compute(&recs, &Slo::default());
        let j = result_json(&s, &RunInfo::default(), &recs);
        assert_eq!(j["completed"], 1);
        assert_eq!(j["failed"], 1);
        assert_eq!(j["request_rate"], "inf");
        assert_eq!(j["output_lens"], serde_json::json!([3, 0]));
        assert!((j["mean_ttft_ms"].as_f64().unwrap() - 100.0).abs() < 1e-9);
        assert!(j.get("p99_e2el_ms").is_some() && j.get("median_tpot_ms").is_some());
        let dir = std::env::temp_dir().join(format!("probe-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("requests.csv");
        write_requests_csv(&p, &recs).unwrap();
        let rows = read_requests_csv(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].status, "http_status");
        assert_eq!(rows[1].error, "HTTP 503, with a comma");
        assert_eq!(rows[1].ttft_ms, None);
        assert!((rows[0].tpot_ms.unwrap() - 100.0).abs() < 1e-9);
        let sp = dir.join("samples.csv");
        let pts = vec![SamplePoint {
            t_s: 1.0,
            metric: "vllm:kv_cache_usage_perc".into(),
            value: 0.5,
        }];
        write_samples_csv(&sp, &pts).unwrap();
        assert_eq!(read_samples_csv(&sp).unwrap(), pts);
        std::fs::remove_dir_all(&dir).ok();
    }
}
