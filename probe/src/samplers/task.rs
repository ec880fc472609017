//! Samples every counter source at once on the run clock, on demand (tagged snapshots) and from a
//! background task every interval; all samples land in one `Vec<Sample>`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{GpuReading, GpuSampler, MemInfo, ProcReading, ProcSampler, Reading, ServerMetrics};
use crate::clock::Clock;

/// Everything read at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds on the run clock.
    pub t_s: f64,
    /// "periodic" for background samples, else the caller's tag ("before_start", "after_cold"...).
    pub tag: String,
    pub gpu: Reading<Vec<GpuReading>>,
    pub meminfo: Reading<MemInfo>,
    /// The server process; None when no process is watched (attach mode).
    pub process: Option<Reading<ProcReading>>,
    /// The server's /metrics; None when no server is set yet.
    pub metrics: Option<Reading<ServerMetrics>>,
}

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub interval: Duration,
    /// Scrape `<url>/metrics` when set.
    pub server_url: Option<String>,
    /// Watch this process when set.
    pub pid: Option<i32>,
}

struct Sources {
    gpu: GpuSampler,
    process: Option<ProcSampler>,
    server_url: Option<String>,
    samples: Vec<Sample>,
}

/// The shared sampler: take tagged snapshots, run a periodic task, collect the samples.
#[derive(Clone)]
pub struct SamplerTask {
    clock: Clock,
    http: reqwest::Client,
    interval: Duration,
    inner: Arc<Mutex<Sources>>,
    periodic: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl SamplerTask {
    pub fn new(clock: Clock, http: reqwest::Client, cfg: SamplerConfig) -> Self {
        let sources = Sources {
            gpu: GpuSampler::new(),
            process: cfg.pid.map(ProcSampler::new),
            server_url: cfg.server_url,
            samples: Vec::new(),
        };
        Self {
            clock,
            http,
            interval: cfg.interval,
            inner: Arc::new(Mutex::new(sources)),
            periodic: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Points the process and /metrics sources at a (newly started) server.
    pub async fn watch_server(&self, pid: Option<i32>, url: Option<String>) {
        let mut s = self.inner.lock().await;
        s.process = pid.map(ProcSampler::new);
        s.server_url = url;
    }

    /// GPU description for reports.
    pub async fn gpu_description(&self) -> Reading<String> {
        self.inner.lock().await.gpu.describe()
    }

    /// Reads every source now, stores the sample under `tag` and returns it.
    pub async fn snapshot(&self, tag: &str) -> Sample {
        let mut s = self.inner.lock().await;
        let t_s = self.clock.now_s();
        let gpu = s.gpu.read();
        let meminfo = MemInfo::read();
        let process = s.process.as_mut().map(|p| p.read(t_s));
        let metrics = match &s.server_url {
            Some(url) => Some(ServerMetrics::scrape(&self.http, url).await),
            None => None,
        };
        let sample = Sample {
            t_s,
            tag: tag.to_string(),
            gpu,
            meminfo,
            process,
            metrics,
        };
        s.samples.push(sample.clone());
        sample
    }

    /// Starts sampling every interval in the background (tag "periodic"); idempotent.
    pub fn start_periodic(&self) {
        let mut slot = self.periodic.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let me = self.clone();
        *slot = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                me.snapshot("periodic").await;
            }
        }));
    }

    pub fn stop_periodic(&self) {
        if let Some(h) = self
            .periodic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
    }

    /// Every sample so far, in time order.
    pub async fn samples(&self) -> Vec<Sample> {
        let mut v = self.inner.lock().await.samples.clone();
        v.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
        v
    }
}
