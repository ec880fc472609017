//! The short load of one kv-scaling setting: per concurrency level, N random-token prompts with
//! a fixed output length, while `/metrics` (running requests, preemptions) and NVML are scraped.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::{Rng, SeedableRng};

use super::table::Row;
use super::{prompt_tokens, Capacity, KvScalingConfig, Setting};
use crate::bench::stats::{compute, Slo};
use crate::client::{Api, Client, GenRequest, Prompt};
use crate::progress::Progress;
use crate::record::RequestRecord;
use crate::samplers::{GpuSampler, Reading, ServerMetrics};

/// Token ids prompts are drawn from: inside every real vocabulary, away from special tokens.
const TOKEN_IDS: std::ops::Range<u32> = 1000..8000;

/// Peaks seen by the scraper during one level.
#[derive(Debug, Clone, Default)]
struct Peaks {
    running: Option<u64>,
    preemptions_last: Option<f64>,
    gpu_used: Option<u64>,
    gpu_reason: Option<String>,
}

/// A request of `prompt_len` seeded random token ids and exactly `max_tokens` output tokens.
pub fn load_request(model: &str, prompt_len: u64, max_tokens: u32, seed: u64) -> GenRequest {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ids = (0..prompt_len).map(|_| rng.gen_range(TOKEN_IDS)).collect();
    let mut extra = serde_json::Map::new();
    extra.insert("ignore_eos".into(), true.into());
    extra.insert("min_tokens".into(), max_tokens.into());
    GenRequest {
        api: Api::Completions,
        model: model.to_string(),
        prompt: Prompt::Tokens(ids),
        max_tokens,
        temperature: 0.0,
        extra,
    }
}

/// Runs every concurrency level against a started server; one row per level.
pub async fn run_levels(
    cfg: &KvScalingConfig,
    s: &Setting,
    client: &Client,
    cap: &Capacity,
    gpu: Arc<GpuSampler>,
    progress: &Progress,
) -> Vec<Row> {
    let prompt_len = prompt_tokens(s.max_model_len, cfg.fill, cfg.max_tokens);
    let mut rows = Vec::new();
    for &c in &cfg.concurrency {
        let n = cfg.requests_per_level.unwrap_or(2 * c);
        let before = scrape(client).await;
        let stop = Arc::new(tokio::sync::Notify::new());
        let scraper = tokio::spawn(scrape_loop(
            client.http().clone(),
            client.base_url().to_string(),
            gpu.clone(),
            Duration::from_secs_f64(cfg.scrape_interval_s.max(0.005)),
            stop.clone(),
        ));
        let seed_base = cfg.seed ^ (s.max_model_len << 32) ^ (c << 16);
        let records: Vec<RequestRecord> = futures::stream::iter(0..n)
            .map(|i| {
                let req = load_request(
                    &cap.model_name,
                    prompt_len,
                    cfg.max_tokens,
                    seed_base.wrapping_add(i),
                );
                let label = format!("len{}_c{c}_{i}", s.max_model_len);
                async move {
                    client
                        .stream(&req, i as usize, &label, client.clock().now_s())
                        .await
                }
            })
            .buffer_unordered(c as usize)
            .collect()
            .await;
        stop.notify_one();
        let mut peaks = scraper.await.unwrap_or_default();
        // One last look: a short level can finish between two scrapes.
        let after = scrape(client).await;
        if let Some(r) = after.num_requests_running {
            peaks.running = Some(peaks.running.unwrap_or(0).max(r as u64));
        }
        let stats = compute(&records, &Slo::default());
        let done = stats.completed > 0;
        let some = |v: f64| (done && v.is_finite()).then_some(v);
        let first_error = records
            .iter()
            .find_map(|r| r.error.as_ref())
            .map(|e| e.message.clone());
        let preemptions = match (
            before.num_preemptions_total,
            after.num_preemptions_total.or(peaks.preemptions_last),
        ) {
            (Some(a), Some(b)) => Some((b - a).max(0.0) as u64),
            _ => None,
        };
        let row = Row {
            concurrency: Some(c),
            predicted_running_peak: cap.fit_requests.map(|f| f.min(c).min(n)),
            observed_running_peak: peaks.running,
            preemptions,
            gpu_memory_used_gib: match (peaks.gpu_used, &peaks.gpu_reason) {
                (Some(b), _) => format!("{:.3}", b as f64 / (1u64 << 30) as f64),
                (None, Some(r)) => format!("not available ({r})"),
                (None, None) => "not available".into(),
            },
            ttft_p50_ms: some(stats.ttft_ms.median),
            ttft_p99_ms: some(stats.ttft_ms.p(99.0)),
            tpot_p50_ms: some(stats.tpot_ms.median).filter(|_| stats.tpot_ms.count > 0),
            output_tok_s: some(stats.output_throughput),
            completed: stats.completed as u64,
            failed: stats.failed as u64,
            error: first_error.unwrap_or_default(),
            ..cap.base.clone()
        };
        progress.line(&format!(
            "  concurrency {c}: {} ok / {} failed, TTFT p50 {} ms p99 {} ms, running peak {} (predicted {}), preemptions {}",
            row.completed,
            row.failed,
            fmt(row.ttft_p50_ms),
            fmt(row.ttft_p99_ms),
            row.observed_running_peak.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
            row.predicted_running_peak.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
            row.preemptions.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
        ));
        rows.push(row);
    }
    rows
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

async fn scrape(client: &Client) -> ServerMetrics {
    ServerMetrics::scrape(client.http(), client.base_url())
        .await
        .value()
        .cloned()
        .unwrap_or_default()
}

async fn scrape_loop(
    http: reqwest::Client,
    url: String,
    gpu: Arc<GpuSampler>,
    every: Duration,
    stop: Arc<tokio::sync::Notify>,
) -> Peaks {
    let mut p = Peaks::default();
    loop {
        if let Reading::Value(m) = ServerMetrics::scrape(&http, &url).await {
            if let Some(r) = m.num_requests_running {
                p.running = Some(p.running.unwrap_or(0).max(r as u64));
            }
            if m.num_preemptions_total.is_some() {
                p.preemptions_last = m.num_preemptions_total;
            }
        }
        match gpu.read() {
            Reading::Value(v) if !v.is_empty() => {
                if let Some(used) = v.iter().map(|g| g.memory_used_bytes).sum::<Option<u64>>() {
                    p.gpu_used = Some(p.gpu_used.unwrap_or(0).max(used));
                }
            }
            Reading::Value(_) => p.gpu_reason = Some("NVML sees no GPU".into()),
            other => p.gpu_reason = other.reason().map(str::to_string),
        }
        tokio::select! {
            _ = stop.notified() => return p,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_requests_are_seeded_token_prompts() {
        let a = load_request("m", 100, 8, 7);
        let b = load_request("m", 100, 8, 7);
        let c = load_request("m", 100, 8, 8);
        assert_eq!(a, b);
        assert_ne!(a.prompt, c.prompt);
        let Prompt::Tokens(ids) = &a.prompt else {
            panic!("token prompt expected")
        };
        assert_eq!(ids.len(), 100);
        assert!(ids.iter().all(|t| TOKEN_IDS.contains(t)));
        let body: serde_json::Value = serde_json::from_slice(&a.body().unwrap()).unwrap();
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["max_tokens"], 8);
    }
}
