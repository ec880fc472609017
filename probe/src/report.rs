//! Cold/warm report: turns stored run data (run.json, records.json, samples.json) into the
//! template context and renders it with Tera (embedded template, overridable by path).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::coldwarm::RunInfo;
use crate::record::RequestRecord;
use crate::samplers::{Reading, Sample};

/// The embedded default template.
pub const FIRST_TOKEN_LATENCY: &str = include_str!("../../templates/first_token_latency.md.tera");
pub const REPORT_MD: &str = "first_token_latency.md";
pub const REPORT_JSON: &str = "first_token_latency.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Md,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid run data: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("template {name}: {detail}")]
    Template { name: String, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), ReportError> {
    let text = serde_json::to_string_pretty(v).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text).map_err(io_err(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ReportError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the raw data and the report into `dir`; returns the report path.
pub fn write_run(
    dir: &Path,
    info: &RunInfo,
    records: &[RequestRecord],
    samples: &[Sample],
    template: Option<&Path>,
    format: Format,
) -> Result<PathBuf, ReportError> {
    write_json(&dir.join("run.json"), info)?;
    write_json(&dir.join("records.json"), &records)?;
    write_json(&dir.join("samples.json"), &samples)?;
    render_to(dir, info, records, samples, template, format)
}

/// `probe report <dir>`: re-renders from the stored JSON files.
pub fn render_dir(
    dir: &Path,
    template: Option<&Path>,
    format: Format,
) -> Result<PathBuf, ReportError> {
    let info: RunInfo = read_json(&dir.join("run.json"))?;
    let records: Vec<RequestRecord> = read_json(&dir.join("records.json"))?;
    let samples: Vec<Sample> = read_json(&dir.join("samples.json"))?;
    render_to(dir, &info, &records, &samples, template, format)
}

fn render_to(
    dir: &Path,
    info: &RunInfo,
    records: &[RequestRecord],
    samples: &[Sample],
    template: Option<&Path>,
    format: Format,
) -> Result<PathBuf, ReportError> {
    let ctx = context(info, records, samples);
    let (path, text) = match format {
        Format::Json => {
            let t = serde_json::to_string_pretty(&ctx).map_err(|source| ReportError::Json {
                path: dir.join(REPORT_JSON),
                source,
            })?;
            (dir.join(REPORT_JSON), t)
        }
        Format::Md => (dir.join(REPORT_MD), render(&ctx, template)?),
    };
    std::fs::write(&path, text).map_err(io_err(&path))?;
    Ok(path)
}

/// Renders the context with the embedded template or the one at `template`.
pub fn render(ctx: &ReportContext, template: Option<&Path>) -> Result<String, ReportError> {
    let (name, source) = match template {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(io_err(p))?,
        ),
        None => (
            "first_token_latency.md.tera".to_string(),
            FIRST_TOKEN_LATENCY.to_string(),
        ),
    };
    let terr = |e: tera::Error| {
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            detail.push_str(&format!(": {s}"));
            src = s.source();
        }
        ReportError::Template {
            name: name.clone(),
            detail,
        }
    };
    let mut tera = tera::Tera::default();
    tera.add_raw_template("report", &source).map_err(terr)?;
    let context = tera::Context::from_serialize(ctx).map_err(terr)?;
    tera.render("report", &context).map_err(terr)
}

/// A labelled value for a table row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub value: String,
}

fn row(name: &str, value: impl Into<String>) -> Row {
    Row {
        name: name.to_string(),
        value: value.into(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub label: String,
    pub status: String,
    pub ttft_ms: String,
    pub e2e_ms: String,
    pub tpot_ms: String,
    pub prompt_tokens: String,
    /// Prompt tokens served from the server's prefix cache (`usage.prompt_tokens_details`).
    pub cached_tokens: String,
    pub completion_tokens: String,
    pub preview: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Variance {
    pub runs: usize,
    pub ok: usize,
    pub min_ms: String,
    pub median_ms: String,
    pub max_ms: String,
}

/// Everything the template sees.
#[derive(Debug, Clone, Serialize)]
pub struct ReportContext {
    pub title: String,
    pub finished: bool,
    pub errors: Vec<String>,
    pub config: Vec<Row>,
    pub single_runs: Vec<RunRow>,
    pub failed_runs: Vec<RunRow>,
    pub variance: Variance,
    pub sanity: Vec<Row>,
    pub observations: Vec<String>,
    pub launch_command: String,
    pub prefix_cache_note: String,
}

fn ms(s: f64) -> String {
    format!("{:.1}", s * 1e3)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "n/a".into())
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn preview(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut: String = one_line.chars().take(60).collect();
    let cut = cut.replace('|', "\\|");
    if one_line.chars().count() > 60 {
        format!("{cut}...")
    } else {
        cut
    }
}

fn run_row(r: &RequestRecord) -> RunRow {
    RunRow {
        label: r.label.clone(),
        status: match &r.error {
            None => "ok".into(),
            Some(e) => format!("{:?}: {}", e.kind, preview(&e.message)).to_lowercase(),
        },
        ttft_ms: r.ttft_s().map(ms).unwrap_or_else(|| "n/a".into()),
        e2e_ms: ms(r.e2e_s()),
        tpot_ms: r.tpot_s().map(ms).unwrap_or_else(|| "n/a".into()),
        prompt_tokens: opt(r.prompt_tokens),
        cached_tokens: opt(r.cached_tokens),
        completion_tokens: opt(r.completion_tokens.or(Some(r.chunk_times_s.len() as u64))),
        preview: preview(&r.text),
    }
}

/// Median of a non-empty slice (sorted copy).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn tagged<'a>(samples: &'a [Sample], tag: &str) -> Option<&'a Sample> {
    samples.iter().find(|s| s.tag == tag)
}

fn gpu_mem(s: Option<&Sample>) -> Result<f64, String> {
    let s = s.ok_or("not sampled")?;
    match &s.gpu {
        Reading::Value(g) => g
            .iter()
            .map(|x| x.memory_used_bytes.map(|b| b as f64))
            .sum::<Option<f64>>()
            .ok_or_else(|| "NVML gave no memory reading".into()),
        Reading::NotAvailable(r) => Err(r.clone()),
    }
}

fn na(reason: &str) -> String {
    format!("not available ({reason})")
}

fn proc_value<T>(
    s: Option<&Sample>,
    f: impl Fn(&crate::samplers::ProcReading) -> Option<T>,
) -> Result<T, String> {
    let s = s.ok_or("not sampled")?;
    match &s.process {
        None => Err("no server process watched (attach mode)".into()),
        Some(Reading::NotAvailable(r)) => Err(r.clone()),
        Some(Reading::Value(p)) => f(p).ok_or_else(|| {
            if p.missing.is_empty() {
                "field missing".into()
            } else {
                p.missing.join("; ")
            }
        }),
    }
}

/// CPU% of the server between two tagged samples.
fn cpu_between(samples: &[Sample], a: &str, b: &str) -> Result<f64, String> {
    let (sa, sb) = (tagged(samples, a), tagged(samples, b));
    let ca = proc_value(sa, |p| p.cpu_time_s)?;
    let cb = proc_value(sb, |p| p.cpu_time_s)?;
    let dt = sb.map(|s| s.t_s).unwrap_or(0.0) - sa.map(|s| s.t_s).unwrap_or(0.0);
    if dt <= 0.0 {
        return Err("no time between samples".into());
    }
    Ok(100.0 * (cb - ca) / dt)
}

fn page_cache(s: Option<&Sample>) -> Result<f64, String> {
    let s = s.ok_or("not sampled")?;
    match &s.meminfo {
        Reading::Value(m) => m
            .page_cache_bytes()
            .map(|b| b as f64)
            .ok_or_else(|| "Cached/Buffers missing in /proc/meminfo".into()),
        Reading::NotAvailable(r) => Err(r.clone()),
    }
}

fn show(v: Result<f64, String>, fmt: impl Fn(f64) -> String) -> String {
    match v {
        Ok(x) => fmt(x),
        Err(r) => na(&r),
    }
}

/// GPU utilization and power averaged over the periodic samples taken during the warm runs.
fn warm_gpu(samples: &[Sample]) -> (Result<f64, String>, Result<f64, String>) {
    let start = tagged(samples, "after_cold").map(|s| s.t_s);
    let end = tagged(samples, "after_warm").map(|s| s.t_s);
    let (Some(start), Some(end)) = (start, end) else {
        return (
            Err("warm runs not sampled".into()),
            Err("warm runs not sampled".into()),
        );
    };
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t_s >= start && s.t_s <= end)
        .collect();
    let mut reason = "no samples during warm runs".to_string();
    let (mut util, mut power) = (Vec::new(), Vec::new());
    for s in &during {
        match &s.gpu {
            Reading::Value(g) => {
                util.extend(g.iter().filter_map(|x| x.utilization_pct.map(f64::from)));
                power.extend(g.iter().filter_map(|x| x.power_w));
            }
            Reading::NotAvailable(r) => reason = r.clone(),
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            Err(reason.clone())
        } else {
            Ok(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    (mean(&util), mean(&power))
}

/// Builds the template context from stored data (pure; tested without a server).
pub fn context(info: &RunInfo, records: &[RequestRecord], samples: &[Sample]) -> ReportContext {
    let cfg = info.config.clone().unwrap_or_default();
    let model = info
        .served_model
        .clone()
        .or_else(|| cfg.model.as_ref().map(|m| m.display().to_string()))
        .unwrap_or_else(|| "n/a".into());
    let gpu = match &info.gpu {
        Some(Reading::Value(g)) => g.clone(),
        Some(Reading::NotAvailable(r)) => na(r),
        None => "n/a".into(),
    };
    let mut config = vec![
        row("Model", model),
        row(
            "Server",
            format!(
                "{} ({})",
                info.server_url,
                if info.mode.is_empty() {
                    "n/a"
                } else {
                    info.mode.as_str()
                }
            ),
        ),
        row(
            "Engine version",
            info.engine_version.clone().unwrap_or_else(|| "n/a".into()),
        ),
        row(
            "Flags",
            cfg.engine_args
                .clone()
                .or(cfg.server_cmd.clone())
                .unwrap_or_else(|| "(defaults)".into()),
        ),
        row(
            "API",
            format!("{:?}, streamed, temperature 0", cfg.api).to_lowercase(),
        ),
        row("Prompt", format!("{:?}", cfg.prompt)),
        row("Max tokens", cfg.max_tokens.to_string()),
        row("Warm runs", cfg.warm.to_string()),
        row("GPU", gpu),
        row("OS / kernel", format!("{} / {}", info.os, info.kernel)),
    ];
    if let Some(n) = info.startup.tensor_parallel_size() {
        config.push(row("Tensor parallel size", n.to_string()));
    }
    if let Some(n) = info.startup.kv_cache_tokens {
        config.push(row("KV cache size", format!("{n} tokens")));
    }
    if let (Some(t), Some(x)) = (
        info.startup.max_concurrency_tokens,
        info.startup.max_concurrency,
    ) {
        config.push(row(
            "Maximum concurrency",
            format!("{x:.2}x for {t} tokens per request"),
        ));
    }

    let cold = records.iter().find(|r| r.label == "cold_1");
    let warm: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.label.starts_with("warm_"))
        .collect();
    let single_runs = cold
        .into_iter()
        .chain(warm.first().copied())
        .map(run_row)
        .collect();
    let failed_runs = records.iter().filter(|r| !r.ok()).map(run_row).collect();
    let warm_ttft: Vec<f64> = warm
        .iter()
        .filter(|r| r.ok())
        .filter_map(|r| r.ttft_s())
        .collect();
    let fmt_opt = |v: Option<f64>| v.map(ms).unwrap_or_else(|| "n/a".into());
    let variance = Variance {
        runs: warm.len(),
        ok: warm_ttft.len(),
        min_ms: fmt_opt(warm_ttft.iter().copied().reduce(f64::min)),
        median_ms: fmt_opt(median(&warm_ttft)),
        max_ms: fmt_opt(warm_ttft.iter().copied().reduce(f64::max)),
    };

    let gib = |b: f64| format!("{:.2} GiB", b / (1u64 << 30) as f64);
    let during_warm = samples
        .iter()
        .filter(|s| s.tag == "periodic")
        .find(|s| tagged(samples, "after_cold").is_some_and(|c| s.t_s > c.t_s));
    let (util, power) = warm_gpu(samples);
    let rss = |tag: &str| {
        show(
            proc_value(tagged(samples, tag), |p| p.rss_bytes.map(|b| b as f64)),
            mb,
        )
    };
    let disk_cold = proc_value(tagged(samples, "after_cold"), |p| p.read_bytes).and_then(|b| {
        Ok(b as f64 - proc_value(tagged(samples, "before_cold"), |p| p.read_bytes)? as f64)
    });
    let disk_total = proc_value(tagged(samples, "after_warm"), |p| {
        p.read_bytes.map(|b| b as f64)
    });
    let sanity = vec![
        row(
            "GPU memory used before server start",
            show(gpu_mem(tagged(samples, "before_start")), gib),
        ),
        row(
            "GPU memory used after cold request",
            show(gpu_mem(tagged(samples, "after_cold")), gib),
        ),
        row(
            "GPU memory used during warm runs",
            show(gpu_mem(during_warm.or(tagged(samples, "after_warm"))), gib),
        ),
        row(
            "GPU utilization during warm runs (mean)",
            show(util, |x| format!("{x:.0} %")),
        ),
        row(
            "GPU power during warm runs (mean)",
            show(power, |x| format!("{x:.0} W")),
        ),
        row(
            "Server CPU during cold request",
            show(cpu_between(samples, "before_cold", "after_cold"), |x| {
                format!("{x:.0} %")
            }),
        ),
        row(
            "Server CPU during warm runs",
            show(cpu_between(samples, "after_cold", "after_warm"), |x| {
                format!("{x:.0} %")
            }),
        ),
        row("Server RSS after cold request", rss("after_cold")),
        row("Server RSS after warm runs", rss("after_warm")),
        row(
            "Server disk bytes read during cold request",
            show(disk_cold, mb),
        ),
        row("Server disk bytes read, whole run", show(disk_total, mb)),
        row(
            "Page cache (Cached+Buffers) before cold",
            show(page_cache(tagged(samples, "before_cold")), mb),
        ),
        row(
            "Page cache (Cached+Buffers) after cold",
            show(page_cache(tagged(samples, "after_cold")), mb),
        ),
    ];

    ReportContext {
        title: format!("First-token latency: cold vs warm ({})", cfg.day),
        finished: info.finished,
        errors: info.errors.clone(),
        config,
        single_runs,
        failed_runs,
        variance,
        sanity,
        observations: observations(info, cold, &warm, &warm_ttft),
        launch_command: info
            .launch_command
            .clone()
            .unwrap_or_else(|| format!("(attached to {}; no launch)", info.server_url)),
        prefix_cache_note: info.prefix_cache_note.clone(),
    }
}

fn timing(r: &RequestRecord, key: &str) -> Option<f64> {
    r.server_timings.as_ref()?.get(key)?.as_f64()
}

fn observations(
    info: &RunInfo,
    cold: Option<&RequestRecord>,
    warm: &[&RequestRecord],
    warm_ttft: &[f64],
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = info.spawn_to_ready_s {
        let phases = info.startup.phases();
        let named: Vec<String> = phases
            .iter()
            .filter(|(k, v)| k != "total" && *v >= 0.005)
            .map(|(k, v)| format!("{} {:.2} s", k.replace('_', " "), v))
            .collect();
        let known: f64 = phases
            .iter()
            .filter(|(k, _)| k != "total")
            .map(|(_, v)| v)
            .sum();
        if named.is_empty() {
            out.push(format!("The server took {t:.2} s from spawn to ready; it reported no startup phases, so that time is not split further."));
        } else {
            out.push(format!(
                "The server took {t:.2} s from spawn to ready: {}, leaving {:.2} s for process start, HTTP bind and health polling.",
                named.join(", "),
                (t - known).max(0.0)
            ));
        }
    }
    let Some(cold) = cold else {
        out.push("No cold request was made, so there is nothing to compare.".into());
        return out;
    };
    let Some(cold_ttft) = cold.ttft_s() else {
        out.push(format!(
            "The cold request produced no token ({}).",
            cold.error
                .as_ref()
                .map(|e| e.message.as_str())
                .unwrap_or("empty stream")
        ));
        return out;
    };
    match median(warm_ttft) {
        Some(w) if w > 0.0 && cold_ttft >= w => out.push(format!(
            "Cold TTFT was {} ms against a warm median of {} ms: the first request was {:.1}x slower ({} ms more).",
            ms(cold_ttft), ms(w), cold_ttft / w, ms(cold_ttft - w)
        )),
        Some(w) if w > 0.0 => out.push(format!(
            "Cold TTFT was {} ms against a warm median of {} ms: the warm runs were slower than the cold one ({:.2}x), so the cold start costs nothing measurable here and the warm runs were held back by something else (compare the server CPU rows; a busy host or other load).",
            ms(cold_ttft), ms(w), w / cold_ttft
        )),
        _ => out.push(format!("Cold TTFT was {} ms; no warm run succeeded to compare with.", ms(cold_ttft))),
    }
    if let (Some(q), Some(p)) = (timing(cold, "queued_s"), timing(cold, "prefill_s")) {
        let warm_prefill: Vec<f64> = warm.iter().filter_map(|r| timing(r, "prefill_s")).collect();
        let rest = cold_ttft - q - p;
        let mut s = format!(
            "Server-side, the cold request waited {} ms in the queue and spent {} ms in its first prefill",
            ms(q), ms(p)
        );
        if let Some(wp) = median(&warm_prefill).filter(|wp| p > *wp) {
            s.push_str(&format!(" (warm median prefill {} ms, so {} ms of first-prefill overhead such as lazy kernel setup)", ms(wp), ms(p - wp)));
        }
        if let Some(wp) = median(&warm_prefill).filter(|wp| p <= *wp) {
            s.push_str(&format!(
                " (no slower than the warm median prefill of {} ms)",
                ms(wp)
            ));
        }
        s.push_str(&format!(
            "; the other {} ms is HTTP, tokenization and streaming outside the engine's timers.",
            ms(rest.max(0.0))
        ));
        out.push(s);
    } else {
        out.push("The server reported no per-request timings, so the cold TTFT is not split into queueing and prefill.".into());
    }
    let failed = warm.iter().filter(|r| !r.ok()).count();
    if failed > 0 {
        out.push(format!("{failed} of {} warm runs failed; they are listed under Failed Requests and left out of the variance.", warm.len()));
    }
    if !info.prefix_cache_note.is_empty() {
        out.push(format!("Cold-start hygiene: {}.", info.prefix_cache_note));
    }
    let hits: Vec<(u64, u64)> = warm
        .iter()
        .filter_map(|r| Some((r.cached_tokens?, r.prompt_tokens?)))
        .collect();
    if let Some(&(c, p)) = hits.iter().max_by_key(|(c, _)| *c).filter(|(c, _)| *c > 0) {
        out.push(format!(
            "Warm runs send the same prompt, so the server's prefix cache served up to {c} of its {p} prompt tokens (column Cached prompt tokens): part of the cold/warm gap is prefix caching, not warm-up; start the server with prefix caching off to separate the two."
        ));
    }
    out
}
