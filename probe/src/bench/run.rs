//! The load runner: issues each request at its scheduled time (optionally capped by a concurrency
//! semaphore), collects one record per issued request, stops cleanly on Ctrl-C or a dead server.
//!
//! Latency is measured from when a request is sent, as vLLM's benchmark does; time spent waiting
//! for a concurrency slot is recorded separately as client queueing (sent - scheduled).

use super::dataset::{self, DatasetError, DatasetSpec, TokenCounter};
use super::stats::Slo;
use super::summary::SamplePoint;
use super::workload::{self, ArrivalPattern, WorkloadError};
use crate::client::{Api, Client, ClientError, ClientOptions, GenRequest};
use crate::clock::Clock;
use crate::record::{ErrorKind, RequestError, RequestRecord};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read config {path}: {message}")]
    Config { path: String, message: String },
    #[error("the dataset produced no prompts")]
    NoPrompts,
    #[error("max concurrency must be >= 1")]
    BadConcurrency,
    #[error(transparent)]
    Output(#[from] super::output::OutputError),
}

/// Everything a benchmark run needs; read from TOML (`--config bench.toml`), then CLI overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchConfig {
    pub base_url: String,
    /// Model id to send; empty = the first one the server lists at `/v1/models` (resolved by
    /// [`BenchConfig::with_served_model`] before the run).
    pub model: String,
    pub api: Api,
    pub label: String,
    pub arrival: ArrivalPattern,
    /// Requests to issue (staged loads take theirs from the stages).
    pub num_prompts: usize,
    pub dataset: DatasetSpec,
    /// Local `tokenizer.json` for exact token counts.
    pub tokenizer: Option<PathBuf>,
    /// Ask the server's `/tokenize` when no local tokenizer is given.
    pub server_tokenizer: bool,
    pub max_concurrency: Option<usize>,
    pub request_timeout_s: f64,
    /// Requests sent one by one before the measured run (not counted).
    pub warmup: usize,
    /// Ask for exactly `output_len` tokens (`ignore_eos` + `min_tokens`).
    pub ignore_eos: bool,
    pub temperature: f32,
    pub metrics_interval_s: f64,
    pub seed: u64,
    pub goodput: Slo,
    /// Consecutive connection failures that mean the server is gone.
    pub max_connect_failures: usize,
    pub output_dir: PathBuf,
    pub progress: bool,
}

impl BenchConfig {
    /// With no model given, the one the server serves (`default` when it lists none).
    pub async fn with_served_model(mut self, http: &reqwest::Client) -> Self {
        if self.model.is_empty() {
            self.model = crate::client::served_model(http, &self.base_url)
                .await
                .unwrap_or_else(|| "default".into());
        }
        self
    }
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8000".into(),
            model: String::new(),
            api: Api::Completions,
            label: "bench".into(),
            arrival: ArrivalPattern::Burst { window_s: 0.0 },
            num_prompts: 100,
            dataset: DatasetSpec::Random {
                num_prompts: 100,
                input_len: 256,
                output_len: 64,
                range_ratio: 0.0,
                prefix_len: 0,
            },
            tokenizer: None,
            server_tokenizer: true,
            max_concurrency: None,
            request_timeout_s: 600.0,
            warmup: 0,
            ignore_eos: true,
            temperature: 0.0,
            metrics_interval_s: 1.0,
            seed: 0,
            goodput: Slo::default(),
            max_connect_failures: 3,
            output_dir: PathBuf::from("bench-out"),
            progress: true,
        }
    }
}

impl BenchConfig {
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, BenchError> {
        let err = |message: String| BenchError::Config {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }
}

/// Why a run ended before issuing every request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "message")]
pub enum StopReason {
    Interrupted,
    ServerDown(String),
}

/// A prepared request: when to send it and its encoded body.
pub struct Planned {
    pub at_s: f64,
    pub label: String,
    pub body: Vec<u8>,
}

/// The collected outcome of a run.
pub struct RunOutcome {
    pub records: Vec<RequestRecord>,
    pub planned: usize,
    pub stopped: Option<StopReason>,
    pub samples: Vec<SamplePoint>,
    pub token_counting: dataset::TokenCounting,
    pub prompts: Vec<dataset::BenchPrompt>,
}

/// Server-side samplers running on the run clock; `stop` ends them and `task` yields the points.
pub struct Sampling {
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Vec<SamplePoint>>,
}

/// Builds the dataset and schedule of `cfg` and encodes every body (before any timing starts).
pub async fn plan(
    cfg: &BenchConfig,
    http: &reqwest::Client,
) -> Result<(Vec<Planned>, dataset::Dataset), BenchError> {
    let counter = match &cfg.tokenizer {
        Some(p) => TokenCounter::from_tokenizer_file(p)?,
        None if cfg.server_tokenizer => {
            TokenCounter::from_server(http.clone(), &cfg.base_url, &cfg.model)
                .await
                .unwrap_or(TokenCounter::Approximate)
        }
        None => TokenCounter::Approximate,
    };
    let ds = dataset::build(&cfg.dataset, &counter, cfg.seed).await?;
    if ds.prompts.is_empty() {
        return Err(BenchError::NoPrompts);
    }
    let arrivals = workload::schedule(&cfg.arrival, cfg.num_prompts, cfg.seed)?;
    let mut planned = Vec::with_capacity(arrivals.len());
    for (i, a) in arrivals.iter().enumerate() {
        let p = &ds.prompts[i % ds.prompts.len()];
        let mut req = GenRequest::greedy(cfg.api, &cfg.model, &p.prompt, p.output_len as u32);
        req.temperature = cfg.temperature;
        if cfg.ignore_eos {
            req.extra.insert("ignore_eos".into(), true.into());
            req.extra.insert("min_tokens".into(), p.output_len.into());
        }
        let label = match a.stage {
            Some(s) => format!("stage{s}"),
            None => cfg.label.clone(),
        };
        planned.push(Planned {
            at_s: a.at_s,
            label,
            body: req.body()?,
        });
    }
    Ok((planned, ds))
}

fn cancelled(index: usize, label: &str, scheduled_s: f64, sent_s: f64, now: f64) -> RequestRecord {
    RequestRecord {
        index,
        label: label.to_string(),
        scheduled_s,
        sent_s,
        end_s: now,
        error: Some(RequestError {
            kind: ErrorKind::Cancelled,
            message: "cancelled by interrupt before it finished".into(),
            status: None,
        }),
        ..Default::default()
    }
}

/// Issues `planned` against `client`; `interrupt` flips to true on Ctrl-C.
pub async fn issue(
    client: &Client,
    api: Api,
    planned: Vec<Planned>,
    max_concurrency: Option<usize>,
    max_connect_failures: usize,
    interrupt: watch::Receiver<bool>,
    progress: bool,
) -> Result<(Vec<RequestRecord>, Option<StopReason>), BenchError> {
    if max_concurrency == Some(0) {
        return Err(BenchError::BadConcurrency);
    }
    let n = planned.len();
    let sem = max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let clock = *client.clock();
    let t0 = clock.now_s();
    let (tx, mut rx) = mpsc::unbounded_channel::<RequestRecord>();
    let (down_tx, down_rx) = watch::channel::<Option<String>>(None);
    let bar = if progress {
        indicatif::ProgressBar::new(n as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };

    // Collector: counts consecutive connection failures to detect a dead server.
    let collector = tokio::spawn(async move {
        let mut records = Vec::with_capacity(n);
        let mut consecutive = 0usize;
        while let Some(r) = rx.recv().await {
            let connect = r
                .error
                .as_ref()
                .is_some_and(|e| e.kind == ErrorKind::Connect);
            consecutive = if connect { consecutive + 1 } else { 0 };
            if connect && consecutive >= max_connect_failures.max(1) {
                let msg = r
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default();
                let _ = down_tx.send(Some(format!(
                    "{consecutive} consecutive requests could not connect; last error: {msg}"
                )));
            }
            bar.inc(1);
            records.push(r);
        }
        bar.finish_and_clear();
        records
    });

    let mut stopped = None;
    for (index, p) in planned.into_iter().enumerate() {
        let scheduled_s = t0 + p.at_s;
        let mut irq = interrupt.clone();
        let mut down = down_rx.clone();
        let due = clock.start + Duration::from_secs_f64(scheduled_s.max(0.0));
        // Wait for the scheduled time, then for a concurrency slot; either wait ends on a stop.
        let permit = tokio::select! {
            biased;
            _ = irq.wait_for(|v| *v) => { stopped = Some(StopReason::Interrupted); break; }
            msg = async { down.wait_for(|v| v.is_some()).await.ok().and_then(|m| m.clone()) } => {
                stopped = Some(StopReason::ServerDown(msg.unwrap_or_default()));
                break;
            }
            permit = async {
                tokio::time::sleep_until(due.into()).await;
                match &sem {
                    Some(s) => s.clone().acquire_owned().await.ok(),
                    None => None,
                }
            } => permit,
        };
        let client = client.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let sent_s = client.clock().now_s();
            let rec = tokio::select! {
                rec = client.stream_body(api, p.body, index, &p.label, scheduled_s) => rec,
                _ = irq.wait_for(|v| *v) => {
                    cancelled(index, &p.label, scheduled_s, sent_s, client.clock().now_s())
                }
            };
            drop(permit);
            let _ = tx.send(rec);
        });
    }
    drop(tx);
    let mut records = collector.await.unwrap_or_default();
    records.sort_by_key(|r| r.index);
    if stopped.is_none() {
        if let Some(msg) = down_rx.borrow().clone() {
            stopped = Some(StopReason::ServerDown(msg));
        }
    }
    Ok((records, stopped))
}

/// Runs a whole benchmark: plan, warm up, issue, collect samples.
pub async fn run(
    cfg: &BenchConfig,
    clock: Clock,
    sampling: Option<Sampling>,
    interrupt: watch::Receiver<bool>,
) -> Result<RunOutcome, BenchError> {
    let opts = ClientOptions {
        request_timeout: Some(Duration::from_secs_f64(cfg.request_timeout_s.max(0.001))),
        ..ClientOptions::default()
    };
    let client = Client::new(&cfg.base_url, clock, opts)?;
    let (planned, ds) = plan(cfg, client.http()).await?;
    let n = planned.len();
    // Warmup: the first prompts, one at a time, not recorded.
    for p in planned.iter().take(cfg.warmup) {
        let now = clock.now_s();
        let _ = client
            .stream_body(cfg.api, p.body.clone(), 0, "warmup", now)
            .await;
    }
    let (records, stopped) = issue(
        &client,
        cfg.api,
        planned,
        cfg.max_concurrency,
        cfg.max_connect_failures,
        interrupt,
        cfg.progress,
    )
    .await?;
    let samples = match sampling {
        Some(s) => {
            let _ = s.stop.send(true);
            s.task.await.unwrap_or_default()
        }
        None => Vec::new(),
    };
    Ok(RunOutcome {
        records,
        planned: n,
        stopped,
        samples,
        token_counting: ds.counting,
        prompts: ds.prompts,
    })
}

/// A watch flag that turns true on Ctrl-C.
pub fn ctrl_c_flag() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
        }
    });
    rx
}
