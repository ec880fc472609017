//! Per-request records: what one streamed request did, stamped on the run clock.
//!
//! CONTRACT shared by cold-warm, bench, kv-scaling and the stats/report code: every request a run
//! issues yields exactly one `RequestRecord` (failed ones too), with times in seconds on `Clock`.

use serde::{Deserialize, Serialize};

/// Why a request did not complete normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Could not connect / connection refused or reset before a response.
    Connect,
    /// Server answered with a non-2xx status (e.g. 400 over-long prompt, 503).
    HttpStatus,
    /// Exceeded the per-request timeout.
    Timeout,
    /// The SSE stream was malformed or ended without `[DONE]`.
    Protocol,
    /// Cancelled by the user (Ctrl-C) before finishing.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestError {
    pub kind: ErrorKind,
    pub message: String,
    /// HTTP status when `kind == HttpStatus`.
    pub status: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RequestRecord {
    /// Issue order within the run (0-based).
    pub index: usize,
    /// Free-form label: "cold_1", "warm_3", "stage2", "conc=16"...
    pub label: String,
    /// When the load generator meant to send it (latencies count from here).
    pub scheduled_s: f64,
    /// When the request actually left (client-side queueing = sent - scheduled).
    pub sent_s: f64,
    /// Arrival time of each SSE chunk that carried generated text, in order.
    pub chunk_times_s: Vec<f64>,
    /// When the stream ended (`[DONE]`) or the request failed.
    pub end_s: f64,
    /// From the server's `usage` when it sent one.
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    /// Generated text (possibly truncated for storage by the caller).
    pub text: String,
    pub error: Option<RequestError>,
    /// Server-side phase timings when the server returns them (our engine does), raw JSON.
    pub server_timings: Option<serde_json::Value>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
    /// Time to first token, from when the request was sent (vLLM's `benchmark_serving`: after any
    /// wait for a `--max-concurrency` slot, which is reported apart as client queueing).
    pub fn ttft_s(&self) -> Option<f64> {
        self.chunk_times_s.first().map(|t| t - self.sent_s)
    }
    /// End-to-end latency from when the request was sent.
    pub fn e2e_s(&self) -> f64 {
        self.end_s - self.sent_s
    }
    /// TPOT = (e2e - ttft) / (output_tokens - 1), vLLM's definition; None for < 2 tokens.
    pub fn tpot_s(&self) -> Option<f64> {
        let n = self.completion_tokens?;
        if n < 2 || !self.ok() {
            return None;
        }
        Some((self.e2e_s() - self.ttft_s()?) / (n as f64 - 1.0))
    }
    /// Inter-token latencies: gaps between consecutive content chunks.
    pub fn itl_s(&self) -> Vec<f64> {
        self.chunk_times_s.windows(2).map(|w| w[1] - w[0]).collect()
    }
}
