//! `probe cold-warm`: start (or attach to) a server, time its first request (cold) and N repeats
//! (warm) with counters sampled on the same clock, and write the raw data plus the report.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{Api, Client, ClientOptions, GenRequest};
use crate::clock::Clock;
use crate::record::RequestRecord;
use crate::report::{self, Format};
use crate::samplers::{Reading, SamplerConfig, SamplerTask};
use crate::server::{self, LaunchSpec, ServerHandle, StartupFacts};

pub const DEFAULT_PROMPT: &str = "Explain in two sentences why the sky is blue.";
pub const DEFAULT_DAY: &str = "day-007-vllm-runtime-probes";

/// Everything `cold-warm` was asked to do (stored in `run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColdWarmConfig {
    /// Model for our engine (default: the cached SmolLM2 GGUF, fetched when absent).
    pub model: Option<PathBuf>,
    /// Extra flags for our engine (shell words).
    pub engine_args: Option<String>,
    /// Any server command (shell words, `{port}` replaced); overrides the engine.
    pub server_cmd: Option<String>,
    /// Attach to a running server instead of starting one.
    pub url: Option<String>,
    pub warm: usize,
    pub max_tokens: u32,
    pub prompt: String,
    pub api: Api,
    pub day: String,
    pub out: PathBuf,
    pub template: Option<PathBuf>,
    pub format: Format,
    pub request_timeout_s: f64,
    pub ready_timeout_s: f64,
    pub sample_interval_s: f64,
}

impl Default for ColdWarmConfig {
    fn default() -> Self {
        Self {
            model: None,
            engine_args: None,
            server_cmd: None,
            url: None,
            warm: 5,
            max_tokens: 64,
            prompt: DEFAULT_PROMPT.into(),
            api: Api::Chat,
            day: DEFAULT_DAY.into(),
            out: PathBuf::from("days"),
            template: None,
            format: Format::Md,
            request_timeout_s: 120.0,
            ready_timeout_s: 600.0,
            sample_interval_s: 0.5,
        }
    }
}

/// Facts of one run besides records and samples (`run.json`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RunInfo {
    pub kind: String,
    pub config: Option<ColdWarmConfig>,
    pub started_unix_s: f64,
    /// "spawned" (the probe started the server) or "attached".
    pub mode: String,
    pub server_url: String,
    pub launch_command: Option<String>,
    pub server_log: Option<PathBuf>,
    pub server_pid: Option<u32>,
    pub spawn_s: Option<f64>,
    pub ready_s: Option<f64>,
    pub spawn_to_ready_s: Option<f64>,
    pub startup: StartupFacts,
    pub served_model: Option<String>,
    pub engine_version: Option<String>,
    /// What was done so the cold request is really cold.
    pub prefix_cache_note: String,
    pub gpu: Option<Reading<String>>,
    pub os: String,
    pub kernel: String,
    /// Run-level failures (server not ready, cancelled...); request failures are in the records.
    pub errors: Vec<String>,
    /// False when the run stopped early (partial results).
    pub finished: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ColdWarmError {
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Report(#[from] report::ReportError),
    #[error("interrupted (Ctrl-C); partial results written to {0}")]
    Cancelled(PathBuf),
    #[error("{0}")]
    Bad(String),
}

/// What a finished (or partial) run left on disk.
#[derive(Debug, Clone)]
pub struct ColdWarmOutcome {
    pub dir: PathBuf,
    pub report: PathBuf,
    pub info: RunInfo,
    pub records: Vec<RequestRecord>,
}

struct Shared {
    info: RunInfo,
    records: Vec<RequestRecord>,
}

/// Runs the experiment; on any exit (error or Ctrl-C included) the data gathered so far is
/// written to `<out>/<day>/` and the report rendered from it.
pub async fn run(
    cfg: ColdWarmConfig,
    progress: &crate::progress::Progress,
) -> Result<ColdWarmOutcome, ColdWarmError> {
    let dir = cfg.out.join(&cfg.day);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ColdWarmError::Bad(format!("{}: {e}", dir.display())))?;
    let clock = Clock::start();
    let (os, kernel) = os_and_kernel();
    let shared = Arc::new(Mutex::new(Shared {
        info: RunInfo {
            kind: "cold-warm".into(),
            config: Some(cfg.clone()),
            started_unix_s: clock.start_unix_s,
            os,
            kernel,
            ..Default::default()
        },
        records: Vec::new(),
    }));
    let opts = ClientOptions {
        request_timeout: Some(Duration::from_secs_f64(cfg.request_timeout_s.max(0.001))),
        ..Default::default()
    };
    let interval = Duration::from_secs_f64(cfg.sample_interval_s.max(0.01));
    let http = reqwest::Client::new();
    let samplers = SamplerTask::new(
        clock,
        http.clone(),
        SamplerConfig {
            interval,
            server_url: None,
            pid: None,
        },
    );
    let mut handle: Option<ServerHandle> = None;
    let result = tokio::select! {
        r = experiment(&cfg, &dir, clock, opts, &samplers, &mut handle, &shared, progress) => r,
        _ = tokio::signal::ctrl_c() => Err(ColdWarmError::Cancelled(dir.clone())),
    };
    samplers.stop_periodic();
    if let Some(mut h) = handle.take() {
        progress.line("stopping the server");
        h.shutdown(Duration::from_secs(5)).await;
    }
    let (mut info, records) = {
        let s = shared.lock().unwrap_or_else(|e| e.into_inner());
        (s.info.clone(), s.records.clone())
    };
    if let Err(e) = &result {
        info.errors.push(e.to_string());
    }
    info.finished = result.is_ok();
    let samples = samplers.samples().await;
    let report_path = report::write_run(
        &dir,
        &info,
        &records,
        &samples,
        cfg.template.as_deref(),
        cfg.format,
    )?;
    result.map(|()| ColdWarmOutcome {
        dir,
        report: report_path,
        info,
        records,
    })
}

#[allow(clippy::too_many_arguments)]
async fn experiment(
    cfg: &ColdWarmConfig,
    dir: &Path,
    clock: Clock,
    opts: ClientOptions,
    samplers: &SamplerTask,
    handle: &mut Option<ServerHandle>,
    shared: &Arc<Mutex<Shared>>,
    progress: &crate::progress::Progress,
) -> Result<(), ColdWarmError> {
    let set =
        |f: &dyn Fn(&mut RunInfo)| f(&mut shared.lock().unwrap_or_else(|e| e.into_inner()).info);
    let gpu = samplers.gpu_description().await;
    set(&|i| i.gpu = Some(gpu.clone()));
    samplers.snapshot("before_start").await;

    let url = match &cfg.url {
        Some(url) => {
            let client = Client::new(url, clock, opts.clone())?;
            let url = client.base_url().to_string();
            progress.line(&format!("attaching to {url}"));
            let health = http_status(client.http(), &client.url("/health"), false).await;
            if health != Some(200) {
                return Err(ColdWarmError::Bad(format!(
                    "{url}/health is not ready ({health:?})"
                )));
            }
            let note = match http_status(client.http(), &client.url("/reset_prefix_cache"), true).await {
                Some(s) if (200..300).contains(&s) => {
                    "attached to a running server: called POST /reset_prefix_cache (ok) before the cold request; weights and kernels were already loaded, so cold measures a cache-reset first request, not a process cold start".to_string()
                }
                other => format!(
                    "attached to a running server: POST /reset_prefix_cache unavailable ({}); the cold request may hit a warm prefix cache",
                    other.map(|s| format!("HTTP {s}")).unwrap_or_else(|| "no answer".into())
                ),
            };
            set(&|i| {
                i.mode = "attached".into();
                i.server_url = url.clone();
                i.prefix_cache_note = note.clone();
            });
            url
        }
        None => {
            let port = server::free_port()?;
            let (argv, engine_bin) = launch_argv(cfg, port, progress).await?;
            let spec = LaunchSpec {
                argv,
                port,
                log_path: dir.join("server.log"),
                ready_timeout: Duration::from_secs_f64(cfg.ready_timeout_s),
                env: Vec::new(),
            };
            let version = match &engine_bin {
                Some(bin) => engine_version(bin).await,
                None => None,
            };
            progress.line(&format!("starting: {}", spec.command_line()));
            set(&|i| {
                i.mode = "spawned".into();
                i.server_url = spec.url();
                i.launch_command = Some(spec.command_line());
                i.server_log = Some(spec.log_path.clone());
                i.engine_version = version.clone();
                i.prefix_cache_note = "fresh server process started by the probe: empty prefix cache; only the warmup the server itself runs before reporting ready preceded the cold request".into();
            });
            let h = handle.insert(ServerHandle::spawn(&spec, &clock).await?);
            let pid = h.pid;
            set(&|i| {
                i.server_pid = Some(pid);
                i.spawn_s = Some(h.spawn_s);
            });
            samplers
                .watch_server(Some(pid as i32), Some(spec.url()))
                .await;
            samplers.start_periodic();
            let http = reqwest::Client::new();
            let ready = h.wait_ready(&http, &clock, spec.ready_timeout).await;
            let facts = StartupFacts::from_log(&h.log_text());
            set(&|i| i.startup = facts.clone());
            let spawn_to_ready = ready?;
            let ready_s = h.ready_s;
            set(&|i| {
                i.spawn_to_ready_s = Some(spawn_to_ready);
                i.ready_s = ready_s;
            });
            progress.line(&format!("server ready after {spawn_to_ready:.2} s"));
            spec.url()
        }
    };
    let client = Client::new(&url, clock, opts)?;
    let engine_startup = StartupFacts::fetch_engine_startup(client.http(), &url).await;
    let served = crate::client::served_model(client.http(), &url).await;
    let version = server_version(client.http(), &url).await;
    set(&|i| {
        i.startup.engine_startup = engine_startup.clone();
        i.served_model = served.clone();
        if version.is_some() {
            i.engine_version = version.clone();
        }
    });
    let model = served.unwrap_or_else(|| "default".into());
    let req = GenRequest::greedy(cfg.api, &model, &cfg.prompt, cfg.max_tokens);
    let push = |r: RequestRecord| {
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .push(r)
    };

    samplers.snapshot("before_cold").await;
    let bar = progress.bar(1 + cfg.warm as u64, "requests");
    let rec = client.stream(&req, 0, "cold_1", clock.now_s()).await;
    log_record(progress, &rec);
    push(rec);
    bar.inc(1);
    samplers.snapshot("after_cold").await;
    samplers.start_periodic();
    for i in 1..=cfg.warm {
        let rec = client
            .stream(&req, i, &format!("warm_{i}"), clock.now_s())
            .await;
        log_record(progress, &rec);
        push(rec);
        bar.inc(1);
    }
    bar.finish();
    samplers.snapshot("after_warm").await;
    Ok(())
}

fn log_record(progress: &crate::progress::Progress, r: &RequestRecord) {
    let line = match (&r.error, r.ttft_s()) {
        (Some(e), _) => format!("{}: failed ({:?}): {}", r.label, e.kind, e.message),
        (None, Some(t)) => format!(
            "{}: TTFT {:.1} ms, e2e {:.1} ms, {} tokens",
            r.label,
            t * 1e3,
            r.e2e_s() * 1e3,
            r.completion_tokens
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into())
        ),
        (None, None) => format!("{}: no content in {:.1} ms", r.label, r.e2e_s() * 1e3),
    };
    progress.line(&line);
}

/// argv of the server to start, and the engine binary when it is ours.
async fn launch_argv(
    cfg: &ColdWarmConfig,
    port: u16,
    progress: &crate::progress::Progress,
) -> Result<(Vec<String>, Option<PathBuf>), ColdWarmError> {
    if let Some(cmd) = &cfg.server_cmd {
        return Ok((server::command_words(cmd, port)?, None));
    }
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => {
            progress.line("model: default SmolLM2-135M-Instruct Q4_1 (fetching if not cached)");
            let m = crate::fetch::SMOLLM2;
            tokio::task::spawn_blocking(move || crate::fetch::ensure(&m))
                .await
                .map_err(|e| ColdWarmError::Bad(e.to_string()))??
        }
    };
    let bin = server::engine_bin_or_build().await?;
    let mut argv = vec![
        bin.display().to_string(),
        "--model".into(),
        model.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
    ];
    if let Some(extra) = &cfg.engine_args {
        argv.extend(server::command_words(extra, port)?);
    }
    Ok((argv, Some(bin)))
}

async fn http_status(http: &reqwest::Client, url: &str, post: bool) -> Option<u16> {
    let req = if post { http.post(url) } else { http.get(url) };
    req.timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// vLLM's `GET /version`.
async fn server_version(http: &reqwest::Client, url: &str) -> Option<String> {
    let r = http
        .get(format!("{url}/version"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let v: serde_json::Value = r.json().await.ok()?;
    v.get("version")?.as_str().map(str::to_string)
}

async fn engine_version(bin: &Path) -> Option<String> {
    let out = tokio::process::Command::new(bin)
        .arg("--version")
        .output()
        .await
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn os_and_kernel() -> (String, String) {
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    (os, kernel)
}
