//! The engine core: the step loop on its own thread (take new/aborted requests, schedule, run, emit).
//!
//! CONTRACT with `api` (the only way HTTP handlers talk to the engine):
//! - `EngineHandle::add_request(EngineRequest)` returns a receiver of `RequestEvent`s: zero or more
//!   `Tokens` then exactly one `Finished` (or `Error`). Dropping the receiver (client gone) or calling
//!   `abort` frees the request's KV blocks on the next step.
//! - Requests are already validated and tokenized by `api` (limits checked there).
//! - `EngineHandle::stats()` gives the live numbers `/metrics` renders.

use crate::sampling::SamplingParams;
use std::time::Instant;

/// A validated, tokenized request handed to the core.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Lower runs first under `--scheduling-policy priority`.
    pub priority: i32,
    pub arrival_time: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS token or a stop string/token.
    Stop,
    /// `max_tokens` reached (or max-model-len).
    Length,
    Abort,
}

/// Server-side timings of one request, seconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RequestTimings {
    pub queued_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub preempted_s: f64,
}

#[derive(Debug, Clone)]
pub enum RequestEvent {
    /// Newly generated token ids (usually one per step).
    Tokens { token_ids: Vec<u32> },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
        timings: RequestTimings,
    },
    Error { message: String },
}
