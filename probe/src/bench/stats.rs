//! Serving-benchmark statistics from request records, as vLLM's `benchmark_serving` defines them.
//!
//! Definitions (all latencies from when the request was sent, in ms, as vLLM measures them; the
//! wait between the scheduled time and the send, for a `--max-concurrency` slot, is `queue`):
//! - TTFT = first content chunk - sent; E2EL = end - sent;
//! - TPOT = (E2EL - TTFT) / (output_tokens - 1), requests with >= 2 output tokens;
//! - ITL = every gap between consecutive content chunks, pooled over requests;
//! - throughputs divide by the benchmark duration = last end - first scheduled time;
//! - token counts come from the server's `usage`; a completed request without usage counts
//!   one output token per content chunk (and 0 input tokens).
//! - mean/median/std (population, like numpy) and percentiles with linear interpolation (numpy's
//!   default), over completed requests only. Failed requests are counted by error kind.

use crate::record::{ErrorKind, RequestRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Percentiles every distribution reports.
pub const PERCENTILES: [f64; 4] = [50.0, 90.0, 95.0, 99.0];

/// Summary of one latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// (percentile, value) for each of [`PERCENTILES`].
    pub percentiles: Vec<(f64, f64)>,
}

impl Distribution {
    /// Summary of `values`; all zeros when empty (as vLLM reports).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Distribution {
                percentiles: PERCENTILES.iter().map(|&p| (p, 0.0)).collect(),
                ..Default::default()
            };
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        Distribution {
            count: v.len(),
            mean,
            median: percentile_sorted(&v, 50.0),
            std,
            min: v[0],
            max: v[v.len() - 1],
            percentiles: PERCENTILES
                .iter()
                .map(|&p| (p, percentile_sorted(&v, p)))
                .collect(),
        }
    }

    pub fn p(&self, p: f64) -> f64 {
        self.percentiles
            .iter()
            .find(|(q, _)| *q == p)
            .map(|x| x.1)
            .unwrap_or(f64::NAN)
    }
}

/// numpy's default percentile (linear interpolation between closest ranks) of sorted values.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Service-level objectives for goodput (vLLM's `--goodput ttft:X tpot:Y e2el:Z`, ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2el_ms.is_some()
    }
}

/// The result of a benchmark run, with vLLM's field names where vLLM has them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchStats {
    pub completed: usize,
    pub failed: usize,
    /// Failed requests by error kind (`connect`, `http_status`, `timeout`, `protocol`, `cancelled`).
    pub failures_by_kind: BTreeMap<String, usize>,
    pub duration: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    /// Prompt tokens the server served from its prefix cache (`usage.prompt_tokens_details.
    /// cached_tokens`), summed over completed requests; None when the server never reported it.
    #[serde(default)]
    pub total_cached_tokens: Option<u64>,
    pub request_throughput: f64,
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Most output tokens finished within one 1-second window of the run clock.
    pub max_output_tokens_per_s: f64,
    /// Most requests in flight (sent, not yet ended) at one time.
    pub max_concurrent_requests: usize,
    pub ttft_ms: Distribution,
    pub tpot_ms: Distribution,
    pub itl_ms: Distribution,
    pub e2el_ms: Distribution,
    /// Client-side queueing (sent - scheduled) of every issued request.
    pub queue_ms: Distribution,
}

/// Output tokens of a completed request: `usage`, else one per content chunk.
pub fn output_tokens(r: &RequestRecord) -> u64 {
    r.completion_tokens.unwrap_or(r.chunk_times_s.len() as u64)
}

/// TPOT in seconds using [`output_tokens`] (the record's own `tpot_s` needs `usage`).
fn tpot_s(r: &RequestRecord) -> Option<f64> {
    let n = output_tokens(r);
    if n < 2 {
        return None;
    }
    Some((r.e2e_s() - r.ttft_s()?) / (n as f64 - 1.0))
}

/// Computes every statistic of a run from its records (pure).
pub fn compute(records: &[RequestRecord], slo: &Slo) -> BenchStats {
    let ms = |s: f64| s * 1000.0;
    let done: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
    let mut failures_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in records.iter().filter(|r| !r.ok()) {
        let kind = r
            .error
            .as_ref()
            .map(|e| e.kind)
            .unwrap_or(ErrorKind::Protocol);
        *failures_by_kind
            .entry(kind_name(kind).to_string())
            .or_default() += 1;
    }
    let start = records
        .iter()
        .map(|r| r.scheduled_s)
        .fold(f64::INFINITY, f64::min);
    let end = records
        .iter()
        .map(|r| r.end_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration = if records.is_empty() {
        0.0
    } else {
        (end - start).max(0.0)
    };
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };

    let total_input_tokens: u64 = done.iter().map(|r| r.prompt_tokens.unwrap_or(0)).sum();
    let total_output_tokens: u64 = done.iter().map(|r| output_tokens(r)).sum();
    let total_cached_tokens = done
        .iter()
        .filter_map(|r| r.cached_tokens)
        .reduce(|a, b| a + b);
    let ttfts: Vec<f64> = done.iter().filter_map(|r| r.ttft_s()).map(ms).collect();
    let tpots: Vec<f64> = done.iter().filter_map(|r| tpot_s(r)).map(ms).collect();
    let itls: Vec<f64> = done.iter().flat_map(|r| r.itl_s()).map(ms).collect();
    let e2els: Vec<f64> = done.iter().map(|r| ms(r.e2e_s())).collect();
    let queues: Vec<f64> = records
        .iter()
        .map(|r| ms(r.sent_s - r.scheduled_s))
        .collect();

    let request_goodput = slo.is_set().then(|| {
        let good = done
            .iter()
            .filter(|r| {
                let within = |v: Option<f64>, lim: Option<f64>| match (v, lim) {
                    (_, None) => true,
                    (Some(v), Some(l)) => ms(v) <= l,
                    (None, Some(_)) => true,
                };
                within(r.ttft_s(), slo.ttft_ms)
                    && within(tpot_s(r), slo.tpot_ms)
                    && within(Some(r.e2e_s()), slo.e2el_ms)
            })
            .count();
        per_s(good as f64)
    });

    BenchStats {
        completed: done.len(),
        failed: records.len() - done.len(),
        failures_by_kind,
        duration,
        total_input_tokens,
        total_output_tokens,
        total_cached_tokens,
        request_throughput: per_s(done.len() as f64),
        request_goodput,
        output_throughput: per_s(total_output_tokens as f64),
        total_token_throughput: per_s((total_input_tokens + total_output_tokens) as f64),
        max_output_tokens_per_s: peak_tokens_per_s(&done, start),
        max_concurrent_requests: peak_concurrency(records),
        ttft_ms: Distribution::of(&ttfts),
        tpot_ms: Distribution::of(&tpots),
        itl_ms: Distribution::of(&itls),
        e2el_ms: Distribution::of(&e2els),
        queue_ms: Distribution::of(&queues),
    }
}

pub fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Connect => "connect",
        ErrorKind::HttpStatus => "http_status",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Protocol => "protocol",
        ErrorKind::Cancelled => "cancelled",
    }
}

/// Output tokens per 1-second bucket (from `start`), spreading each request's tokens evenly over
/// its content chunks; returns the largest bucket.
fn peak_tokens_per_s(done: &[&RequestRecord], start: f64) -> f64 {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    for r in done {
        if r.chunk_times_s.is_empty() {
            continue;
        }
        let per_chunk = output_tokens(r) as f64 / r.chunk_times_s.len() as f64;
        for t in &r.chunk_times_s {
            *buckets
                .entry(((t - start).max(0.0)).floor() as u64)
                .or_default() += per_chunk;
        }
    }
    buckets.values().cloned().fold(0.0, f64::max)
}

/// Largest number of requests in flight at once (sent <= t < end).
pub fn peak_concurrency(records: &[RequestRecord]) -> usize {
    let mut events: Vec<(f64, i32)> = Vec::with_capacity(records.len() * 2);
    for r in records {
        events.push((r.sent_s, 1));
        events.push((r.end_s.max(r.sent_s), -1));
    }
    // Ends before starts at the same instant.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut peak) = (0i32, 0i32);
    for (_, d) in events {
        cur += d;
        peak = peak.max(cur);
    }
    peak as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RequestError;

    fn rec(
        index: usize,
        sched: f64,
        sent: f64,
        chunks: &[f64],
        end: f64,
        toks: u64,
    ) -> RequestRecord {
        RequestRecord {
            index,
            scheduled_s: sched,
            sent_s: sent,
            chunk_times_s: chunks.to_vec(),
            end_s: end,
            prompt_tokens: Some(10),
            completion_tokens: Some(toks),
            ..Default::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_match_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1,2,3,4], [50, 90, 99]) = 2.5, 3.7, 3.97
        assert!(close(percentile_sorted(&v, 50.0), 2.5));
        assert!(close(percentile_sorted(&v, 90.0), 3.7));
        assert!(close(percentile_sorted(&v, 99.0), 3.97));
        let d = Distribution::of(&[4.0, 1.0, 3.0, 2.0]);
        assert!(close(d.mean, 2.5) && close(d.median, 2.5));
        // population std of 1..4 = sqrt(1.25)
        assert!(close(d.std, 1.25f64.sqrt()));
        assert_eq!((d.min, d.max, d.count), (1.0, 4.0, 4));
        assert!(close(d.p(95.0), 3.85));
        let e = Distribution::of(&[]);
        assert_eq!((e.count, e.mean, e.p(99.0)), (0, 0.0, 0.0));
    }

    #[test]
    fn hand_computed_run() {
        // r0: scheduled 0, sent 0, chunks at .1 .2 .3 .4, end .4, 4 tokens.
        //   ttft 100, e2el 400, tpot (400-100)/3 = 100, itl 100 x3
        // r1: scheduled .5, sent .6 (queued 100 ms, not part of its latency), chunks .8 1.0,
        //   end 1.1, 3 tokens: ttft 200, e2el 500, tpot (500-200)/2 = 150, itl 200
        // r2: failed (timeout), scheduled 1.0, sent 1.0, end 2.0.
        let r0 = rec(0, 0.0, 0.0, &[0.1, 0.2, 0.3, 0.4], 0.4, 4);
        let r1 = rec(1, 0.5, 0.6, &[0.8, 1.0], 1.1, 3);
        let mut r2 = rec(2, 1.0, 1.0, &[], 2.0, 0);
        r2.completion_tokens = None;
        r2.error = Some(RequestError {
            kind: ErrorKind::Timeout,
            message: "timed out".into(),
            status: None,
        });
        let s = compute(&[r0, r1, r2], &Slo::default());
        assert_eq!((s.completed, s.failed), (2, 1));
        assert_eq!(s.failures_by_kind.get("timeout"), Some(&1));
        assert!(close(s.duration, 2.0));
        assert_eq!((s.total_input_tokens, s.total_output_tokens), (20, 7));
        assert!(close(s.request_throughput, 1.0));
        assert!(close(s.output_throughput, 3.5));
        assert!(close(s.total_token_throughput, 13.5));
        assert!(close(s.ttft_ms.mean, 150.0) && close(s.ttft_ms.median, 150.0));
        assert!(close(s.ttft_ms.std, 50.0));
        assert!(close(s.tpot_ms.mean, 125.0));
        assert!(close(s.itl_ms.mean, 125.0) && s.itl_ms.count == 4);
        assert!(close(s.itl_ms.p(50.0), 100.0));
        assert!(close(s.e2el_ms.mean, 450.0));
        assert!(close(s.e2el_ms.p(90.0), 490.0));
        assert!(close(s.queue_ms.max, 100.0) && s.queue_ms.count == 3);
        assert_eq!(s.request_goodput, None);
        // Peak: r0 + r1 overlap? r0 ends .4 < r1 sent .6; r1 ends 1.1 > r2 sent 1.0 -> 2.
        assert_eq!(s.max_concurrent_requests, 2);
        // Buckets: [0,1): r0 4 tokens + r1 chunk at .8 (1.5) = 5.5; [1,2): r1 chunk at 1.0 = 1.5.
        assert!(close(s.max_output_tokens_per_s, 5.5));
        // Goodput: TTFT <= 150 ms keeps only r0 -> 1 / 2 s.
        let slo = Slo {
            ttft_ms: Some(150.0),
            ..Default::default()
        };
        let r0 = rec(0, 0.0, 0.0, &[0.1, 0.2, 0.3, 0.4], 0.4, 4);
        let r1 = rec(1, 0.5, 0.6, &[0.8, 1.0], 1.1, 3);
        let g = compute(&[r0, r1], &slo);
        assert!(close(g.request_goodput.unwrap(), 1.0 / 1.1));
    }

    #[test]
    fn missing_usage_counts_chunks_and_empty_run_is_zero() {
        let mut r = rec(0, 0.0, 0.0, &[0.5, 1.0, 1.5], 2.0, 0);
        r.completion_tokens = None;
        r.prompt_tokens = None;
        let s = compute(&[r], &Slo::default());
        assert_eq!(s.total_output_tokens, 3);
        // tpot = (2000 - 500) / 2
        assert!(close(s.tpot_ms.mean, 750.0));
        let e = compute(&[], &Slo::default());
        assert_eq!(
            (e.completed, e.duration, e.request_throughput),
            (0, 0.0, 0.0)
        );
    }

    #[test]
    fn cached_tokens_sum_over_completed_requests_only() {
        let mut r0 = rec(0, 0.0, 0.0, &[0.1, 0.2], 0.2, 2);
        let mut r1 = rec(1, 0.0, 0.0, &[0.1, 0.2], 0.2, 2);
        let mut failed = rec(2, 0.0, 0.0, &[], 0.5, 0);
        assert_eq!(
            compute(&[r0.clone()], &Slo::default()).total_cached_tokens,
            None
        );
        r0.cached_tokens = Some(0);
        r1.cached_tokens = Some(8);
        failed.cached_tokens = Some(100);
        failed.error = Some(RequestError {
            kind: ErrorKind::Cancelled,
            message: "stopped".into(),
            status: None,
        });
        let s = compute(&[r0, r1, failed], &Slo::default());
        assert_eq!(s.total_cached_tokens, Some(8));
        let block = crate::bench::summary::text_block(&s, &Default::default());
        assert!(
            block.contains(&format!(
                "{:<40} {:<10}",
                "Prefix-cached input tokens:", "8 (40.0%)"
            )),
            "{block}"
        );
    }
}
