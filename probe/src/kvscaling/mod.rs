//! `probe kv-scaling`: for each max-model-len (and GPU memory utilization) start a server, read
//! its KV cache capacity next to the one predicted from the model's geometry, drive a short load
//! at rising concurrency, and write the table, plots and report to `days/<day>/`.

pub mod cli;
pub mod load;
pub mod predict;
pub mod table;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientOptions};
use crate::clock::Clock;
use crate::progress::Progress;
use crate::samplers::{GpuSampler, Reading};
use crate::server::{self, LaunchSpec, ServerHandle, StartupFacts};
use predict::{KvGeometry, Prediction};
use table::{Row, Setup};

pub const DEFAULT_DAY: &str = "day-007-vllm-runtime-probes";
/// Our engine's KV budget on CPU when `--kv-cache-memory` is not given.
pub const ENGINE_CPU_KV_DEFAULT: u64 = 1 << 30;

/// Everything `kv-scaling` was asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvScalingConfig {
    pub lens: Vec<u64>,
    /// Empty: the server's default utilization (no flag passed).
    pub mem_utils: Vec<f64>,
    pub concurrency: Vec<u64>,
    /// Prompt length as a fraction of max-model-len.
    pub fill: f64,
    /// Requests per concurrency level; None = twice the level.
    pub requests_per_level: Option<u64>,
    pub max_tokens: u32,
    /// Model for our engine (default: the cached SmolLM2 GGUF); also read for GGUF geometry.
    pub model: Option<PathBuf>,
    /// HF config.json giving the KV geometry when the server does not report it.
    pub model_config: Option<PathBuf>,
    /// Extra flags for our engine (shell words).
    pub engine_args: Option<String>,
    /// Any server (shell words) with `{max_model_len}`, `{gpu_memory_utilization}`, `{port}`.
    pub server_cmd: Option<String>,
    /// KV budget in bytes: passed to our engine as `--kv-cache-memory`, used for the prediction.
    pub kv_cache_memory: Option<u64>,
    pub block_size: u64,
    /// KV element type (`float32`, `bfloat16`...) when the server does not report it.
    pub kv_dtype: Option<String>,
    /// Activation peak to subtract from a GPU budget (bytes; 0 = unknown).
    pub activation_bytes: u64,
    pub day: String,
    pub out: PathBuf,
    pub template: Option<PathBuf>,
    pub ready_timeout_s: f64,
    pub request_timeout_s: f64,
    pub scrape_interval_s: f64,
    pub seed: u64,
    /// How the run was asked for (shown in the report).
    pub command_line: String,
}

impl Default for KvScalingConfig {
    fn default() -> Self {
        Self {
            lens: vec![2048, 4096, 8192],
            mem_utils: Vec::new(),
            concurrency: vec![1, 4, 16, 64],
            fill: 0.5,
            requests_per_level: None,
            max_tokens: 32,
            model: None,
            model_config: None,
            engine_args: None,
            server_cmd: None,
            kv_cache_memory: None,
            block_size: 16,
            kv_dtype: None,
            activation_bytes: 0,
            day: DEFAULT_DAY.into(),
            out: PathBuf::from("days"),
            template: None,
            ready_timeout_s: 600.0,
            request_timeout_s: 300.0,
            scrape_interval_s: 0.05,
            seed: 0,
            command_line: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvScalingError {
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Predict(#[from] predict::PredictError),
    #[error(transparent)]
    Table(#[from] table::TableError),
    #[error("interrupted (Ctrl-C); partial results written to {0}")]
    Cancelled(PathBuf),
}

/// What a finished (or partial) run left on disk.
#[derive(Debug, Clone)]
pub struct KvScalingOutcome {
    pub dir: PathBuf,
    pub csv: PathBuf,
    pub report: PathBuf,
    pub rows: Vec<Row>,
}

/// One server start of the sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    pub max_model_len: u64,
    pub gpu_memory_utilization: Option<f64>,
}

impl Setting {
    fn label(&self) -> String {
        match self.gpu_memory_utilization {
            Some(u) => format!("len{}_util{u}", self.max_model_len),
            None => format!("len{}", self.max_model_len),
        }
    }
}

/// Prompt tokens of one load request: `fill` x len, leaving room for the output, at least 1.
pub fn prompt_tokens(max_model_len: u64, fill: f64, max_tokens: u32) -> u64 {
    let want = (fill * max_model_len as f64).round() as u64;
    want.min(max_model_len.saturating_sub(max_tokens as u64))
        .max(1)
}

/// The server's own reason for a failed start: the last error-looking log line, else the last line.
pub fn failure_message(log_tail: &str) -> String {
    let lines: Vec<&str> = log_tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let is_err = |l: &&&str| {
        l.starts_with("Error:")
            || l.contains("Error: ")
            || l.contains(" ERROR ")
            || l.starts_with("ERROR")
    };
    lines
        .iter()
        .rev()
        .find(is_err)
        .or(lines.last())
        .map(|l| l.strip_prefix("Error: ").unwrap_or(l).to_string())
        .unwrap_or_else(|| "exited without a message".into())
}

/// `vllm:cache_config_info{block_size="16",num_gpu_blocks="28",...} 1` -> (blocks, block size).
pub fn cache_config_info(metrics_text: &str) -> Option<(u64, Option<u64>)> {
    let line = metrics_text
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))?;
    let labels = &line[line.find('{')? + 1..line.rfind('}')?];
    let get = |key: &str| -> Option<u64> {
        let at = labels.find(&format!("{key}=\""))? + key.len() + 2;
        let rest = &labels[at..];
        rest[..rest.find('"')?].parse().ok()
    };
    Some((get("num_gpu_blocks")?, get("block_size")))
}

/// What the sweep has learned so far (shared by settings, written at the end).
struct State {
    rows: Vec<Row>,
    setup: Setup,
    geometry: Option<KvGeometry>,
    dtype_bytes: u64,
    block_size: u64,
    /// Total over ranks, as the engine reports it.
    weights_bytes: Option<u64>,
    /// Ranks the server splits the model over (its startup report; 1 when it says nothing).
    tensor_parallel_size: u64,
}

/// Runs the sweep; on any exit (errors and Ctrl-C included) the server is stopped and the rows so
/// far are written with the report.
pub async fn run(
    cfg: KvScalingConfig,
    progress: &Progress,
) -> Result<KvScalingOutcome, KvScalingError> {
    validate(&cfg)?;
    let dir = cfg.out.join(&cfg.day);
    std::fs::create_dir_all(&dir)
        .map_err(|e| KvScalingError::Bad(format!("{}: {e}", dir.display())))?;
    let csv = dir.join(table::CSV_NAME);
    let mut st = State {
        rows: Vec::new(),
        setup: Setup {
            started: chrono::Utc::now()
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string(),
            command: cfg.command_line.clone(),
            fill: cfg.fill,
            max_tokens: cfg.max_tokens,
            concurrency: cfg.concurrency.clone(),
            requests_per_level: match cfg.requests_per_level {
                Some(n) => n.to_string(),
                None => "2 x concurrency".into(),
            },
            ..Default::default()
        },
        geometry: None,
        dtype_bytes: 2,
        block_size: cfg.block_size,
        weights_bytes: None,
        tensor_parallel_size: 1,
    };
    let mut handle: Option<ServerHandle> = None;
    let result = tokio::select! {
        r = sweep(&cfg, &dir, &mut st, &mut handle, progress) => r,
        _ = tokio::signal::ctrl_c() => Err(KvScalingError::Cancelled(dir.clone())),
    };
    if let Some(mut h) = handle.take() {
        progress.line("stopping the server");
        h.shutdown(Duration::from_secs(5)).await;
    }
    if let Err(e) = &result {
        st.setup.errors.push(e.to_string());
    }
    st.setup.finished = result.is_ok();
    table::write_csv(&csv, &st.rows)?;
    let plots = table::write_plots(&dir, &st.rows)?;
    let md = table::render_report(&st.setup, &st.rows, &plots, cfg.template.as_deref())?;
    let report = dir.join(table::REPORT_NAME);
    std::fs::write(&report, md)
        .map_err(|e| KvScalingError::Bad(format!("{}: {e}", report.display())))?;
    result.map(|()| KvScalingOutcome {
        dir,
        csv,
        report,
        rows: st.rows,
    })
}

fn validate(cfg: &KvScalingConfig) -> Result<(), KvScalingError> {
    let bad = |m: &str| Err(KvScalingError::Bad(m.into()));
    if cfg.lens.is_empty() || cfg.lens.contains(&0) {
        return bad("--lens needs at least one positive length");
    }
    if cfg.concurrency.is_empty() || cfg.concurrency.contains(&0) {
        return bad("--concurrency needs at least one positive level");
    }
    if !(cfg.fill > 0.0 && cfg.fill <= 1.0) {
        return bad("--fill must be in (0, 1]");
    }
    if cfg.mem_utils.iter().any(|u| !(*u > 0.0 && *u <= 1.0)) {
        return bad("--mem-utils values must be in (0, 1]");
    }
    if cfg.max_tokens == 0 || cfg.block_size == 0 {
        return bad("--max-tokens and --block-size must be positive");
    }
    if cfg.requests_per_level == Some(0) {
        return bad("--requests-per-level must be positive");
    }
    Ok(())
}

fn engine_forced_cpu(cfg: &KvScalingConfig) -> bool {
    let words = cfg
        .engine_args
        .as_deref()
        .and_then(shlex::split)
        .unwrap_or_default();
    words
        .windows(2)
        .any(|w| w[0] == "--device" && w[1] == "cpu")
        || words.iter().any(|w| w == "--device=cpu")
}

async fn sweep(
    cfg: &KvScalingConfig,
    dir: &Path,
    st: &mut State,
    handle: &mut Option<ServerHandle>,
    progress: &Progress,
) -> Result<(), KvScalingError> {
    let clock = Clock::start();
    let gpu = std::sync::Arc::new(GpuSampler::new());
    let gpus = match gpu.read() {
        Reading::Value(v) if !v.is_empty() => Some(v),
        _ => None,
    };
    let on_gpu = gpus.is_some() && (cfg.server_cmd.is_some() || !engine_forced_cpu(cfg));
    st.setup.device = match (&gpus, on_gpu) {
        (Some(_), true) => format!(
            "GPU: {}",
            gpu.describe().value().cloned().unwrap_or_default()
        ),
        (Some(_), false) => "CPU (engine run with --device cpu; a GPU is present)".into(),
        (None, _) => format!(
            "CPU ({})",
            gpu.unavailable_reason().unwrap_or("NVML sees no GPU")
        ),
    };

    // The model and the KV geometry known before any server starts.
    let model = match (&cfg.model, &cfg.server_cmd) {
        (Some(m), _) => Some(m.clone()),
        (None, None) => {
            progress.line("model: default SmolLM2-135M-Instruct Q4_1 (fetching if not cached)");
            let m = crate::fetch::SMOLLM2;
            let p = tokio::task::spawn_blocking(move || crate::fetch::ensure(&m))
                .await
                .map_err(|e| KvScalingError::Bad(e.to_string()))??;
            Some(p)
        }
        (None, Some(_)) => None,
    };
    st.setup.model = model
        .as_ref()
        .map(|m| m.display().to_string())
        .unwrap_or_else(|| "as in --server-cmd".into());
    // A config.json given as the model (dummy weights), or a HF directory holding one.
    let model_json = model.as_ref().and_then(|m| {
        if m.extension().is_some_and(|e| e == "json") {
            Some(m.clone())
        } else {
            Some(m.join("config.json")).filter(|c| m.is_dir() && c.is_file())
        }
    });
    if let Some(c) = cfg.model_config.as_ref().or(model_json.as_ref()) {
        st.geometry = Some(KvGeometry::from_hf_config(c)?);
    } else if let Some(m) = model
        .as_ref()
        .filter(|m| m.extension().is_some_and(|e| e == "gguf"))
    {
        match KvGeometry::from_gguf(m) {
            Ok(g) => st.geometry = Some(g),
            Err(e) => st
                .setup
                .notes
                .push(format!("no geometry from the GGUF: {e}")),
        }
    }
    match &st.geometry {
        Some(g) => progress.line(&format!(
            "model geometry from {}: {} layers x {} kv heads x head_dim {}",
            g.source, g.num_hidden_layers, g.num_key_value_heads, g.head_dim
        )),
        None => progress.line("model geometry not known yet (pass --model-config config.json); waiting for the server's report"),
    }
    let (dtype_bytes, dtype_source) = match cfg.kv_dtype.as_deref() {
        Some(d) => (
            predict::dtype_bytes(d)
                .ok_or_else(|| KvScalingError::Bad(format!("unknown --kv-dtype {d:?}")))?,
            format!("--kv-dtype {d}"),
        ),
        None if cfg.server_cmd.is_none() && !on_gpu => {
            (4, "our engine's default on CPU (float32)".into())
        }
        None => (2, "assumed bfloat16 (set --kv-dtype)".into()),
    };
    st.dtype_bytes = dtype_bytes;
    st.setup.dtype_source = dtype_source;
    st.setup.server = match &cfg.server_cmd {
        Some(c) => format!("`{c}`"),
        None => format!(
            "our engine{}",
            cfg.engine_args
                .as_deref()
                .map(|a| format!(" with `{a}`"))
                .unwrap_or_default()
        ),
    };
    let engine_bin = match cfg.server_cmd {
        None => Some(server::engine_bin_or_build().await?),
        Some(_) => None,
    };
    let logs = dir.join("kv_scaling_logs");
    let utils: Vec<Option<f64>> = if cfg.mem_utils.is_empty() {
        vec![None]
    } else {
        cfg.mem_utils.iter().map(|u| Some(*u)).collect()
    };
    let settings: Vec<Setting> = cfg
        .lens
        .iter()
        .flat_map(|&len| {
            utils.iter().map(move |&u| Setting {
                max_model_len: len,
                gpu_memory_utilization: u,
            })
        })
        .collect();
    let csv = dir.join(table::CSV_NAME);
    for (i, s) in settings.iter().enumerate() {
        progress.line(&format!("[{}/{}] {}", i + 1, settings.len(), s.label()));
        let port = server::free_port()?;
        let argv = launch_argv(cfg, engine_bin.as_deref(), model.as_deref(), s, port)?;
        let spec = LaunchSpec {
            argv,
            port,
            log_path: logs.join(format!("{}.log", s.label())),
            ready_timeout: Duration::from_secs_f64(cfg.ready_timeout_s),
            env: Vec::new(),
        };
        progress.line(&format!("starting: {}", spec.command_line()));
        let used_before = gpu_used(&gpu);
        let h = handle.insert(ServerHandle::spawn(&spec, &clock).await?);
        let http = reqwest::Client::new();
        let ready = h.wait_ready(&http, &clock, spec.ready_timeout).await;
        let facts = StartupFacts::from_log(&h.log_text());
        let rows = match ready {
            Err(e) => {
                let msg = match &e {
                    server::ServerError::Exited { tail, .. } => failure_message(tail),
                    other => other.to_string(),
                };
                progress.line(&format!("{} did not start: {msg}", s.label()));
                let p = prediction(cfg, st, s, on_gpu, &gpus, used_before);
                vec![failed_row(s, p.as_ref(), cfg, &msg)]
            }
            Ok(secs) => {
                progress.line(&format!("ready after {secs:.2} s"));
                let url = spec.url();
                let ctx = measure_capacity(
                    cfg,
                    st,
                    s,
                    &http,
                    &url,
                    facts,
                    on_gpu,
                    &gpus,
                    used_before,
                    progress,
                )
                .await;
                let client = Client::new(
                    &url,
                    clock,
                    ClientOptions {
                        request_timeout: Some(Duration::from_secs_f64(
                            cfg.request_timeout_s.max(0.001),
                        )),
                        ..Default::default()
                    },
                )?;
                load::run_levels(cfg, s, &client, &ctx, gpu.clone(), progress).await
            }
        };
        if let Some(mut h) = handle.take() {
            h.shutdown(Duration::from_secs(5)).await;
        }
        st.rows.extend(rows);
        table::write_csv(&csv, &st.rows)?;
    }
    let g = st.geometry.clone();
    st.setup.geometry = match &g {
        Some(g) => format!(
            "{} layers x {} kv heads x head_dim {} (from {})",
            g.num_hidden_layers, g.num_key_value_heads, g.head_dim, g.source
        ),
        None => {
            "unknown: the server does not report it and no --model-config / GGUF was given".into()
        }
    };
    st.setup.kv_bytes_per_token = g.map(|g| g.kv_bytes_per_token(st.dtype_bytes));
    st.setup.dtype_bytes = st.dtype_bytes;
    st.setup.block_size = st.block_size;
    st.setup.budget = budget_text(cfg, on_gpu, st.weights_bytes);
    Ok(())
}

fn budget_text(cfg: &KvScalingConfig, on_gpu: bool, weights: Option<u64>) -> String {
    match (cfg.kv_cache_memory, on_gpu) {
        (Some(b), _) => format!("--kv-cache-memory {b} bytes ({:.4} GiB)", b as f64 / (1u64 << 30) as f64),
        (None, true) => format!(
            "GPU total x gpu-memory-utilization - memory in use before start - weights ({}) - activations ({} bytes{})",
            weights.map(|w| format!("{w} bytes")).unwrap_or_else(|| "unknown, not subtracted".into()),
            cfg.activation_bytes,
            if cfg.activation_bytes == 0 { ", unknown: the prediction is an upper bound" } else { "" }
        ),
        (None, false) if cfg.server_cmd.is_none() => {
            format!("our engine's CPU default, {ENGINE_CPU_KV_DEFAULT} bytes (1 GiB)")
        }
        (None, false) => "unknown (pass --kv-cache-memory to predict)".into(),
    }
}

fn gpu_used(gpu: &GpuSampler) -> Option<u64> {
    match gpu.read() {
        Reading::Value(v) if !v.is_empty() => v.iter().map(|g| g.memory_used_bytes).sum(),
        _ => None,
    }
}

/// The predicted cache for `s`, when geometry and budget are known.
fn prediction(
    cfg: &KvScalingConfig,
    st: &State,
    s: &Setting,
    on_gpu: bool,
    gpus: &Option<Vec<crate::samplers::GpuReading>>,
    used_before: Option<u64>,
) -> Option<Prediction> {
    let per_token = st.geometry.as_ref()?.kv_bytes_per_token(st.dtype_bytes);
    // One rank's budget (one GPU; --kv-cache-memory is per rank, as in vLLM), then all ranks'.
    let tp = st.tensor_parallel_size.max(1);
    let budget_per_rank = match (cfg.kv_cache_memory, on_gpu) {
        (Some(b), _) => b,
        (None, true) => {
            let g = gpus.as_ref()?.first()?;
            predict::gpu_budget(
                g.memory_total_bytes?,
                s.gpu_memory_utilization.unwrap_or(0.9),
                used_before.unwrap_or(0),
                st.weights_bytes.unwrap_or(0) / tp,
                cfg.activation_bytes,
            )
        }
        (None, false) if cfg.server_cmd.is_none() => ENGINE_CPU_KV_DEFAULT,
        (None, false) => return None,
    };
    let per_request =
        prompt_tokens(s.max_model_len, cfg.fill, cfg.max_tokens) + cfg.max_tokens as u64;
    Some(predict::predict(
        budget_per_rank * tp,
        per_token,
        st.block_size,
        s.max_model_len,
        per_request,
    ))
}

fn failed_row(s: &Setting, p: Option<&Prediction>, cfg: &KvScalingConfig, msg: &str) -> Row {
    Row {
        max_model_len: s.max_model_len,
        gpu_memory_utilization: s.gpu_memory_utilization,
        startup: "failed".into(),
        predicted_kv_tokens: p.map(|p| p.kv_tokens),
        predicted_max_concurrency: p.map(|p| p.max_concurrency),
        tokens_per_request: prompt_tokens(s.max_model_len, cfg.fill, cfg.max_tokens)
            + cfg.max_tokens as u64,
        gpu_memory_used_gib: String::new(),
        error: msg.to_string(),
        ..Default::default()
    }
}

/// The setting-level columns every level row of a started server shares.
#[derive(Debug, Clone, Default)]
pub struct Capacity {
    pub model_name: String,
    pub base: Row,
    /// Requests whose blocks fit at once (None when not predicted).
    pub fit_requests: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
async fn measure_capacity(
    cfg: &KvScalingConfig,
    st: &mut State,
    s: &Setting,
    http: &reqwest::Client,
    url: &str,
    facts: StartupFacts,
    on_gpu: bool,
    gpus: &Option<Vec<crate::samplers::GpuReading>>,
    used_before: Option<u64>,
    progress: &Progress,
) -> Capacity {
    let startup = StartupFacts::fetch_engine_startup(http, url).await;
    if let Some(j) = &startup {
        if let Some(g) = KvGeometry::from_startup_json(j) {
            if st.geometry.as_ref().map(|x| &x.source) != Some(&g.source) {
                progress.line(&format!("model geometry from {}", g.source));
            }
            st.geometry = Some(g);
        }
        if let Some(b) = j
            .get("dtype")
            .and_then(|d| d.as_str())
            .and_then(predict::dtype_bytes)
        {
            if b != st.dtype_bytes || !st.setup.dtype_source.starts_with("engine") {
                st.dtype_bytes = b;
                st.setup.dtype_source = format!(
                    "engine startup report ({})",
                    j["dtype"].as_str().unwrap_or("?")
                );
            }
        }
        if let Some(b) = j.get("block_size").and_then(|v| v.as_u64()) {
            st.block_size = b;
        }
        if let Some(w) = j.get("weights_bytes").and_then(|v| v.as_u64()) {
            st.weights_bytes = Some(w);
        }
        if let Some(tp) = j.get("tensor_parallel_size").and_then(|v| v.as_u64()) {
            if tp != st.tensor_parallel_size {
                progress.line(&format!(
                    "tensor parallel size {tp} (engine startup report)"
                ));
                let note = format!(
                    "Tensor parallel size {tp}: each rank holds 1/{tp} of the weights and of every KV block, so the predicted KV capacity is one rank's budget x {tp}."
                );
                if !st.setup.notes.contains(&note) {
                    st.setup.notes.push(note);
                }
            }
            st.tensor_parallel_size = tp.max(1);
        }
    }
    let metrics_text = match http
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
        _ => String::new(),
    };
    let from_metric = cache_config_info(&metrics_text);
    if let Some((_, Some(bs))) = from_metric {
        st.block_size = bs;
    }
    let (measured, source) = match (
        from_metric,
        facts.kv_cache_tokens,
        startup.as_ref().and_then(|j| j["kv_cache_tokens"].as_u64()),
    ) {
        (Some((blocks, bs)), _, _) => (Some(blocks * bs.unwrap_or(st.block_size)), "metric"),
        (None, Some(t), _) => (Some(t), "log"),
        (None, None, Some(t)) => (Some(t), "startup_json"),
        _ => (None, "none"),
    };
    let p = prediction(cfg, st, s, on_gpu, gpus, used_before);
    let measured_conc = facts
        .max_concurrency
        .or_else(|| startup.as_ref().and_then(|j| j["max_concurrency"].as_f64()));
    let per_token = st
        .geometry
        .as_ref()
        .map(|g| g.kv_bytes_per_token(st.dtype_bytes));
    let kv_gib = match (
        measured,
        per_token,
        startup.as_ref().and_then(|j| j["kv_cache_bytes"].as_u64()),
    ) {
        (Some(t), Some(b), _) => Some(table::kv_gib(t, b)),
        (_, _, Some(bytes)) => Some(bytes as f64 / (1u64 << 30) as f64),
        _ => None,
    };
    progress.line(&format!(
        "KV cache: measured {} tokens (from {source}), predicted {}",
        measured
            .map(|t| t.to_string())
            .unwrap_or_else(|| "?".into()),
        p.as_ref()
            .map(|p| p.kv_tokens.to_string())
            .unwrap_or_else(|| "? (no geometry or budget)".into())
    ));
    let model_name = crate::client::served_model(http, url)
        .await
        .unwrap_or_else(|| "default".into());
    let per_request =
        prompt_tokens(s.max_model_len, cfg.fill, cfg.max_tokens) + cfg.max_tokens as u64;
    // Requests whose blocks fit, from the measured capacity when known (what the server will do).
    let fit_requests = match measured {
        Some(t) => Some((t / st.block_size) / per_request.div_ceil(st.block_size).max(1)),
        None => p.as_ref().map(|p| p.max_concurrent_requests),
    };
    Capacity {
        model_name,
        fit_requests,
        base: Row {
            max_model_len: s.max_model_len,
            gpu_memory_utilization: s.gpu_memory_utilization,
            startup: "ok".into(),
            predicted_kv_tokens: p.as_ref().map(|p| p.kv_tokens),
            measured_kv_tokens: measured,
            kv_tokens_source: source.into(),
            kv_gib,
            predicted_max_concurrency: p.as_ref().map(|p| p.max_concurrency),
            measured_max_concurrency: measured_conc,
            tokens_per_request: per_request,
            ..Default::default()
        },
    }
}

/// argv for one setting: `--server-cmd` with placeholders filled, or our engine with the flags.
fn launch_argv(
    cfg: &KvScalingConfig,
    engine_bin: Option<&Path>,
    model: Option<&Path>,
    s: &Setting,
    port: u16,
) -> Result<Vec<String>, KvScalingError> {
    let util = s
        .gpu_memory_utilization
        .map(|u| u.to_string())
        .unwrap_or_else(|| "0.9".into());
    if let Some(cmd) = &cfg.server_cmd {
        let words = server::command_words(cmd, port)?;
        return Ok(words
            .into_iter()
            .map(|w| {
                w.replace("{max_model_len}", &s.max_model_len.to_string())
                    .replace("{gpu_memory_utilization}", &util)
            })
            .collect());
    }
    let (Some(bin), Some(model)) = (engine_bin, model) else {
        return Err(KvScalingError::Bad(
            "no engine binary or model to start".into(),
        ));
    };
    let mut argv = vec![
        bin.display().to_string(),
        "--model".into(),
        model.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--max-model-len".into(),
        s.max_model_len.to_string(),
        "--block-size".into(),
        cfg.block_size.to_string(),
    ];
    if let Some(b) = cfg.kv_cache_memory {
        argv.extend(["--kv-cache-memory".into(), b.to_string()]);
    }
    if let Some(u) = s.gpu_memory_utilization {
        argv.extend(["--gpu-memory-utilization".into(), u.to_string()]);
    }
    if let Some(extra) = &cfg.engine_args {
        argv.extend(server::command_words(extra, port)?);
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_leave_room_for_the_output() {
        assert_eq!(prompt_tokens(2048, 0.5, 32), 1024);
        assert_eq!(prompt_tokens(256, 1.0, 32), 224);
        assert_eq!(prompt_tokens(16, 0.5, 32), 1);
    }

    #[test]
    fn failure_message_takes_the_engine_error_line() {
        let tail = "2026 INFO engine args: ...\n2026 INFO Model loading took 0.5 GiB\n\
                    Error: the KV cache budget of 0.02 GiB holds only 448 tokens (28 blocks of 16)\n";
        assert_eq!(
            failure_message(tail),
            "the KV cache budget of 0.02 GiB holds only 448 tokens (28 blocks of 16)"
        );
        let vllm = "INFO x\nValueError: To serve at least one request with the models's max seq len (8192), (1.00 GiB KV cache is needed\nINFO shutdown";
        assert!(
            failure_message(vllm).starts_with("ValueError: To serve"),
            "{}",
            failure_message(vllm)
        );
        assert_eq!(failure_message("just died"), "just died");
        assert_eq!(failure_message("\n \n"), "exited without a message");
    }

    #[test]
    fn cache_config_info_is_read_from_labels() {
        let t = "# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"28\",engine=\"0\"} 1.0\n";
        assert_eq!(cache_config_info(t), Some((28, Some(16))));
        assert_eq!(
            cache_config_info("vllm:cache_config_info{num_gpu_blocks=\"7\"} 1"),
            Some((7, None))
        );
        assert_eq!(cache_config_info("vllm:num_requests_running 3"), None);
        assert_eq!(
            cache_config_info("vllm:cache_config_info{num_gpu_blocks=\"None\"} 1"),
            None
        );
    }

    #[test]
    fn server_cmd_placeholders_are_filled() {
        let cfg = KvScalingConfig {
            server_cmd: Some("vllm serve m --max-model-len {max_model_len} --gpu-memory-utilization {gpu_memory_utilization} --port {port}".into()),
            ..Default::default()
        };
        let s = Setting {
            max_model_len: 4096,
            gpu_memory_utilization: Some(0.7),
        };
        let a = launch_argv(&cfg, None, None, &s, 8000).unwrap().join(" ");
        assert_eq!(
            a,
            "vllm serve m --max-model-len 4096 --gpu-memory-utilization 0.7 --port 8000"
        );
        let cfg = KvScalingConfig {
            kv_cache_memory: Some(1 << 20),
            engine_args: Some("--device cpu".into()),
            ..Default::default()
        };
        let s = Setting {
            max_model_len: 256,
            gpu_memory_utilization: None,
        };
        let a = launch_argv(
            &cfg,
            Some(Path::new("/e")),
            Some(Path::new("/m.gguf")),
            &s,
            1,
        )
        .unwrap()
        .join(" ");
        assert_eq!(a, "/e --model /m.gguf --host 127.0.0.1 --port 1 --max-model-len 256 --block-size 16 --kv-cache-memory 1048576 --device cpu");
        assert!(engine_forced_cpu(&cfg));
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = KvScalingConfig::default();
        assert!(validate(&ok).is_ok());
        assert!(validate(&KvScalingConfig {
            lens: vec![],
            ..ok.clone()
        })
        .is_err());
        assert!(validate(&KvScalingConfig {
            fill: 0.0,
            ..ok.clone()
        })
        .is_err());
        assert!(validate(&KvScalingConfig {
            mem_utils: vec![1.5],
            ..ok.clone()
        })
        .is_err());
        assert!(validate(&KvScalingConfig {
            concurrency: vec![0],
            ..ok
        })
        .is_err());
    }
}
