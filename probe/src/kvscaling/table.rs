//! The kv-scaling result table: one row per (setting, concurrency level), its CSV, the sentences
//! that read it, its plots and the Tera report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plot::{self, Chart, Mark, PlotError, Series};

pub const KV_SCALING_TEMPLATE: &str = include_str!("../../../templates/kv_scaling.md.tera");
pub const CSV_NAME: &str = "kv_cache_scaling.csv";
pub const REPORT_NAME: &str = "LOG_tier03.md";
const GIB: f64 = (1u64 << 30) as f64;

/// One measured (or failed) setting at one concurrency level. A failed startup is one row with
/// `startup = "failed"`, no concurrency and the server's message in `error`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub max_model_len: u64,
    pub gpu_memory_utilization: Option<f64>,
    /// "ok" or "failed".
    pub startup: String,
    pub concurrency: Option<u64>,
    pub predicted_kv_tokens: Option<u64>,
    pub measured_kv_tokens: Option<u64>,
    /// Where the measured number came from (`metric`, `log`, `startup_json`).
    pub kv_tokens_source: String,
    pub kv_gib: Option<f64>,
    /// KV tokens / max-model-len (vLLM's "Maximum concurrency" factor), predicted and as logged.
    pub predicted_max_concurrency: Option<f64>,
    pub measured_max_concurrency: Option<f64>,
    /// Prompt + output tokens of one load request.
    pub tokens_per_request: u64,
    /// Requests that can run at once at this level: min(level, requests whose blocks fit).
    pub predicted_running_peak: Option<u64>,
    /// Highest `vllm:num_requests_running` scraped during the level.
    pub observed_running_peak: Option<u64>,
    /// `vllm:num_preemptions_total` increase during the level.
    pub preemptions: Option<u64>,
    /// Peak NVML memory used over the level, or "not available (reason)".
    pub gpu_memory_used_gib: String,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    pub output_tok_s: Option<f64>,
    pub completed: u64,
    pub failed: u64,
    pub error: String,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.startup == "ok"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("report template: {0}")]
    Template(String),
}

/// Writes all rows (rewritten whole after every setting, so partial runs keep their data).
pub fn write_csv(path: &Path, rows: &[Row]) -> Result<(), TableError> {
    let err = |e: &dyn std::fmt::Display| TableError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let tmp = path.with_extension("csv.tmp");
    let mut w = csv::Writer::from_path(&tmp).map_err(|e| err(&e))?;
    for r in rows {
        w.serialize(r).map_err(|e| err(&e))?;
    }
    w.flush().map_err(|e| err(&e))?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| err(&e))
}

pub fn read_csv(path: &Path) -> Result<Vec<Row>, TableError> {
    let err = |e: &dyn std::fmt::Display| TableError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut r = csv::Reader::from_path(path).map_err(|e| err(&e))?;
    r.deserialize().map(|x| x.map_err(|e| err(&e))).collect()
}

fn setting_name(len: u64, util: Option<f64>) -> String {
    match util {
        Some(u) => format!("max-model-len {len} (gpu-memory-utilization {u})"),
        None => format!("max-model-len {len}"),
    }
}

fn pct(from: f64, to: f64) -> String {
    if from == 0.0 {
        return "n/a".into();
    }
    format!("{:+.0}%", (to / from - 1.0) * 100.0)
}

fn change(from: u64, to: u64) -> String {
    let r = to as f64 / from.max(1) as f64;
    if to == 2 * from {
        "doubling".into()
    } else {
        format!("going x{r:.2}")
    }
}

/// Sentences computed from the table: prediction agreement, failed startups, what each step up in
/// max-model-len cost in capacity, concurrency and TTFT, and peaks against predictions.
pub fn read_table(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    // One representative row per setting (the first; setting-level columns repeat).
    let mut settings: BTreeMap<(Option<u64>, u64), &Row> = BTreeMap::new();
    for r in rows {
        let util_key = r
            .gpu_memory_utilization
            .map(|u| (u * 1000.0).round() as u64);
        settings.entry((util_key, r.max_model_len)).or_insert(r);
    }
    let started: Vec<&Row> = settings.values().copied().filter(|r| r.ok()).collect();
    let compared: Vec<&Row> = started
        .iter()
        .copied()
        .filter(|r| r.predicted_kv_tokens.is_some() && r.measured_kv_tokens.is_some())
        .collect();
    let mismatched: Vec<&Row> = compared
        .iter()
        .copied()
        .filter(|r| r.predicted_kv_tokens != r.measured_kv_tokens)
        .collect();
    if !compared.is_empty() && mismatched.is_empty() {
        out.push(format!(
            "Predicted and measured KV cache sizes agree exactly for all {} started setting(s).",
            compared.len()
        ));
    }
    for r in &mismatched {
        let (p, m) = (
            r.predicted_kv_tokens.unwrap_or(0),
            r.measured_kv_tokens.unwrap_or(0),
        );
        out.push(format!(
            "For {} the server reports {m} KV tokens against {p} predicted ({}).",
            setting_name(r.max_model_len, r.gpu_memory_utilization),
            pct(p as f64, m as f64)
        ));
    }
    for r in settings.values().filter(|r| !r.ok()) {
        let predicted = match (r.predicted_kv_tokens, r.predicted_max_concurrency) {
            (Some(t), Some(c)) if c < 1.0 => {
                format!(" (predicted: only {t} KV tokens, {c:.2}x of one request)")
            }
            (Some(t), _) => format!(" (predicted {t} KV tokens, so it was expected to fit)"),
            _ => String::new(),
        };
        out.push(format!(
            "{} did not start{predicted}: {}",
            setting_name(r.max_model_len, r.gpu_memory_utilization),
            r.error
        ));
    }
    // Consecutive started lengths at the same utilization.
    let mut by_util: BTreeMap<Option<u64>, Vec<&Row>> = BTreeMap::new();
    for ((u, _), r) in &settings {
        if r.ok() {
            by_util.entry(*u).or_default().push(r);
        }
    }
    for group in by_util.values() {
        for pair in group.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let mut s = format!(
                "{} max-model-len from {} to {}",
                capitalize(&change(a.max_model_len, b.max_model_len)),
                a.max_model_len,
                b.max_model_len
            );
            if let (Some(ta), Some(tb)) = (a.measured_kv_tokens, b.measured_kv_tokens) {
                if ta == tb {
                    s.push_str(&format!(" kept KV capacity at {ta} tokens"));
                } else {
                    s.push_str(&format!(
                        " changed KV capacity from {ta} to {tb} tokens ({})",
                        pct(ta as f64, tb as f64)
                    ));
                }
            }
            if let (Some(ca), Some(cb)) = (conc(a), conc(b)) {
                s.push_str(&format!(
                    " and cut the full-length concurrency from {ca:.2}x to {cb:.2}x ({})",
                    pct(ca, cb)
                ));
            }
            let level = common_level(rows, a, b);
            if let Some(c) = level {
                let ra = level_row(rows, a, c);
                let rb = level_row(rows, b, c);
                if let (Some(x), Some(y)) = (
                    ra.and_then(|r| r.ttft_p99_ms),
                    rb.and_then(|r| r.ttft_p99_ms),
                ) {
                    s.push_str(&format!(
                        "; with prompts at the same fill, TTFT p99 at concurrency {c} went from {x:.1} ms to {y:.1} ms ({})",
                        pct(x, y)
                    ));
                }
            }
            s.push('.');
            out.push(s);
        }
    }
    // Observed peaks against predictions.
    for r in rows.iter().filter(|r| r.ok()) {
        let (Some(c), Some(obs), Some(pred)) = (
            r.concurrency,
            r.observed_running_peak,
            r.predicted_running_peak,
        ) else {
            continue;
        };
        let pre = r.preemptions.unwrap_or(0);
        if obs < pred || pre > 0 {
            out.push(format!(
                "At {} and concurrency {c}, at most {obs} requests ran at once (predicted {pred}), with {pre} preemption(s).",
                setting_name(r.max_model_len, r.gpu_memory_utilization)
            ));
        }
    }
    if let Some(r) = rows
        .iter()
        .filter(|r| r.ok() && r.concurrency.is_some())
        .max_by_key(|r| r.observed_running_peak)
    {
        if let (Some(obs), Some(pred)) = (r.observed_running_peak, r.predicted_running_peak) {
            if obs >= pred {
                out.push(format!(
                    "The highest running-request peak, {obs} at {} and concurrency {}, reached the predicted {pred}.",
                    setting_name(r.max_model_len, r.gpu_memory_utilization),
                    r.concurrency.unwrap_or(0)
                ));
            }
        }
    }
    out
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn conc(r: &Row) -> Option<f64> {
    r.measured_max_concurrency.or(r.predicted_max_concurrency)
}

fn level_row<'a>(rows: &'a [Row], s: &Row, level: u64) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.ok()
            && r.max_model_len == s.max_model_len
            && r.gpu_memory_utilization == s.gpu_memory_utilization
            && r.concurrency == Some(level)
    })
}

/// The highest concurrency level measured (with a TTFT) for both settings.
fn common_level(rows: &[Row], a: &Row, b: &Row) -> Option<u64> {
    let levels = |s: &Row| -> Vec<u64> {
        rows.iter()
            .filter(|r| {
                r.ok()
                    && r.max_model_len == s.max_model_len
                    && r.gpu_memory_utilization == s.gpu_memory_utilization
                    && r.ttft_p99_ms.is_some()
            })
            .filter_map(|r| r.concurrency)
            .collect()
    };
    let lb = levels(b);
    levels(a).into_iter().filter(|c| lb.contains(c)).max()
}

fn series_name(prefix: &str, util: Option<f64>) -> String {
    match util {
        Some(u) => format!("{prefix} (util {u})"),
        None => prefix.to_string(),
    }
}

/// Draws the three plots into `dir/plots/`; returns their paths relative to `dir`.
pub fn write_plots(dir: &Path, rows: &[Row]) -> Result<Vec<PathBuf>, TableError> {
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| TableError::Write {
        path: plots.display().to_string(),
        message: e.to_string(),
    })?;
    let mut utils: Vec<Option<f64>> = Vec::new();
    for r in rows {
        if !utils.contains(&r.gpu_memory_utilization) {
            utils.push(r.gpu_memory_utilization);
        }
    }
    let per_setting = |util: Option<f64>, f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
        let mut pts: BTreeMap<u64, f64> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.gpu_memory_utilization == util) {
            if let Some(v) = f(r) {
                let e = pts.entry(r.max_model_len).or_insert(v);
                *e = e.max(v);
            }
        }
        pts.into_iter().map(|(k, v)| (k as f64, v)).collect()
    };
    let mut written = Vec::new();
    let mut tokens = Vec::new();
    let mut conc_series = Vec::new();
    for &u in &utils {
        tokens.push(Series::new(
            series_name("predicted", u),
            per_setting(u, &|r| r.predicted_kv_tokens.map(|v| v as f64)),
        ));
        tokens.push(Series::new(
            series_name("measured", u),
            per_setting(u, &|r| {
                r.measured_kv_tokens.filter(|_| r.ok()).map(|v| v as f64)
            }),
        ));
        conc_series.push(Series::new(
            series_name("predicted KV tokens / len", u),
            per_setting(u, &|r| r.predicted_max_concurrency),
        ));
        conc_series.push(Series::new(
            series_name("observed running peak", u),
            per_setting(u, &|r| r.observed_running_peak.map(|v| v as f64)),
        ));
    }
    let p = plots.join("kv_scaling_tokens.png");
    let chart = Chart {
        title: "KV cache tokens vs max-model-len",
        x_label: "max-model-len (tokens)",
        y_label: "KV cache tokens",
        mark: Mark::LinePoints,
        y_from_zero: true,
    };
    plot::draw(&p, &chart, &tokens, (800, 500))?;
    written.push(PathBuf::from("plots/kv_scaling_tokens.png"));
    let p = plots.join("kv_scaling_concurrency.png");
    let chart = Chart {
        title: "Max concurrency vs max-model-len",
        x_label: "max-model-len (tokens)",
        y_label: "requests",
        mark: Mark::LinePoints,
        y_from_zero: true,
    };
    plot::draw(&p, &chart, &conc_series, (800, 500))?;
    written.push(PathBuf::from("plots/kv_scaling_concurrency.png"));
    let mut ttft = Vec::new();
    let mut keys: Vec<(u64, Option<f64>)> = Vec::new();
    for r in rows.iter().filter(|r| r.ok() && r.concurrency.is_some()) {
        if !keys.contains(&(r.max_model_len, r.gpu_memory_utilization)) {
            keys.push((r.max_model_len, r.gpu_memory_utilization));
        }
    }
    for (len, u) in keys {
        let pts = rows
            .iter()
            .filter(|r| r.max_model_len == len && r.gpu_memory_utilization == u)
            .filter_map(|r| Some((r.concurrency? as f64, r.ttft_p99_ms?)))
            .collect();
        ttft.push(Series::new(series_name(&format!("len {len}"), u), pts));
    }
    let p = plots.join("kv_scaling_ttft_p99.png");
    let chart = Chart {
        title: "TTFT p99 vs concurrency",
        x_label: "concurrency",
        y_label: "TTFT p99 (ms)",
        mark: Mark::LinePoints,
        y_from_zero: true,
    };
    plot::draw(&p, &chart, &ttft, (800, 500))?;
    written.push(PathBuf::from("plots/kv_scaling_ttft_p99.png"));
    Ok(written)
}

/// Facts about the run the report states before the table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Setup {
    pub started: String,
    pub command: String,
    pub server: String,
    pub model: String,
    pub device: String,
    pub geometry: String,
    pub kv_bytes_per_token: Option<u64>,
    pub dtype_bytes: u64,
    pub dtype_source: String,
    pub block_size: u64,
    pub budget: String,
    pub fill: f64,
    pub max_tokens: u32,
    pub concurrency: Vec<u64>,
    pub requests_per_level: String,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
    pub finished: bool,
}

#[derive(Serialize)]
struct Ctx<'a> {
    setup: &'a Setup,
    rows: Vec<BTreeMap<&'static str, String>>,
    sentences: Vec<String>,
    plots: Vec<String>,
    kv_gib_note: &'a str,
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn u(v: Option<u64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// Renders the report (the embedded template, or `template` when given).
pub fn render_report(
    setup: &Setup,
    rows: &[Row],
    plots: &[PathBuf],
    template: Option<&Path>,
) -> Result<String, TableError> {
    let text = match template {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| TableError::Template(format!("{}: {e}", p.display())))?,
        None => KV_SCALING_TEMPLATE.to_string(),
    };
    let cells = rows
        .iter()
        .map(|r| {
            BTreeMap::from([
                ("len", r.max_model_len.to_string()),
                ("util", f(r.gpu_memory_utilization, 2)),
                ("startup", r.startup.clone()),
                ("concurrency", u(r.concurrency)),
                ("predicted_kv_tokens", u(r.predicted_kv_tokens)),
                ("measured_kv_tokens", u(r.measured_kv_tokens)),
                ("kv_gib", f(r.kv_gib, 4)),
                (
                    "predicted_max_concurrency",
                    f(r.predicted_max_concurrency, 2),
                ),
                ("measured_max_concurrency", f(r.measured_max_concurrency, 2)),
                ("predicted_running_peak", u(r.predicted_running_peak)),
                ("observed_running_peak", u(r.observed_running_peak)),
                ("preemptions", u(r.preemptions)),
                ("gpu_memory_used_gib", r.gpu_memory_used_gib.clone()),
                ("ttft_p50_ms", f(r.ttft_p50_ms, 1)),
                ("ttft_p99_ms", f(r.ttft_p99_ms, 1)),
                ("tpot_p50_ms", f(r.tpot_p50_ms, 1)),
                ("output_tok_s", f(r.output_tok_s, 1)),
                ("completed", r.completed.to_string()),
                ("failed", r.failed.to_string()),
                ("error", r.error.replace('|', "\\|").replace('\n', " ")),
            ])
        })
        .collect();
    let ctx = Ctx {
        setup,
        rows: cells,
        sentences: read_table(rows),
        plots: plots.iter().map(|p| p.display().to_string()).collect(),
        kv_gib_note: "KV GiB = measured KV tokens x bytes per token / 2^30",
    };
    let ctx =
        tera::Context::from_serialize(&ctx).map_err(|e| TableError::Template(e.to_string()))?;
    tera::Tera::one_off(&text, &ctx, false).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(i) = src {
            s.push_str(&format!(": {i}"));
            src = i.source();
        }
        TableError::Template(s)
    })
}

/// KV GiB of `tokens` at `bytes_per_token`.
pub fn kv_gib(tokens: u64, bytes_per_token: u64) -> f64 {
    (tokens as f64 * bytes_per_token as f64) / GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_row(len: u64, c: u64, kv: u64, ttft99: f64, peak: u64, pred_peak: u64) -> Row {
        Row {
            max_model_len: len,
            startup: "ok".into(),
            concurrency: Some(c),
            predicted_kv_tokens: Some(kv),
            measured_kv_tokens: Some(kv),
            predicted_max_concurrency: Some(kv as f64 / len as f64),
            measured_max_concurrency: Some(kv as f64 / len as f64),
            ttft_p99_ms: Some(ttft99),
            observed_running_peak: Some(peak),
            predicted_running_peak: Some(pred_peak),
            preemptions: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn sentences_read_the_numbers() {
        let rows = vec![
            ok_row(2048, 1, 8192, 10.0, 1, 1),
            ok_row(2048, 4, 8192, 40.0, 4, 4),
            ok_row(4096, 1, 8192, 20.0, 1, 1),
            ok_row(4096, 4, 8192, 100.0, 2, 4),
            Row {
                max_model_len: 16384,
                startup: "failed".into(),
                predicted_kv_tokens: Some(8192),
                predicted_max_concurrency: Some(0.5),
                error: "only 8,192 tokens fit".into(),
                ..Default::default()
            },
        ];
        let s = read_table(&rows);
        let all = s.join("\n");
        assert!(all.contains("agree exactly for all 2 started"), "{all}");
        assert!(
            all.contains("Doubling max-model-len from 2048 to 4096"),
            "{all}"
        );
        assert!(all.contains("from 4.00x to 2.00x (-50%)"), "{all}");
        assert!(
            all.contains("TTFT p99 at concurrency 4 went from 40.0 ms to 100.0 ms (+150%)"),
            "{all}"
        );
        assert!(all.contains("max-model-len 16384 did not start (predicted: only 8192 KV tokens, 0.50x of one request): only 8,192 tokens fit"), "{all}");
        assert!(all.contains("max-model-len 4096 and concurrency 4, at most 2 requests ran at once (predicted 4)"), "{all}");
    }

    #[test]
    fn mismatches_and_non_doubling_steps_are_named() {
        let mut a = ok_row(1000, 1, 4000, 5.0, 1, 1);
        a.measured_kv_tokens = Some(3000);
        a.measured_max_concurrency = None;
        let b = ok_row(3000, 1, 4000, 6.0, 1, 1);
        let s = read_table(&[a, b]).join("\n");
        assert!(
            s.contains("reports 3000 KV tokens against 4000 predicted (-25%)"),
            "{s}"
        );
        assert!(
            s.contains("Going x3.00 max-model-len from 1000 to 3000"),
            "{s}"
        );
        assert!(!s.contains("agree exactly"), "{s}");
        assert!(read_table(&[]).is_empty());
    }

    #[test]
    fn csv_round_trips_and_report_renders() {
        let dir = std::env::temp_dir().join(format!("kvs-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rows = vec![
            ok_row(256, 1, 448, 12.5, 1, 1),
            ok_row(256, 4, 448, 30.0, 2, 2),
        ];
        rows[0].gpu_memory_used_gib = "not available (no NVML)".into();
        rows.push(Row {
            max_model_len: 512,
            startup: "failed".into(),
            error: "a | b".into(),
            ..Default::default()
        });
        let p = dir.join(CSV_NAME);
        write_csv(&p, &rows).unwrap();
        assert_eq!(read_csv(&p).unwrap(), rows);
        let plots = write_plots(&dir, &rows).unwrap();
        assert_eq!(plots.len(), 3);
        assert!(dir.join(&plots[2]).is_file());
        let setup = Setup {
            device: "cpu".into(),
            ..Default::default()
        };
        let md = render_report(&setup, &rows, &plots, None).unwrap();
        assert!(md.contains("| 512 |"), "{md}");
        assert!(md.contains("a \\| b"), "{md}");
        assert!(md.contains("plots/kv_scaling_ttft_p99.png"), "{md}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
