//! One request's scheduling state: its tokens, progress, status and timing stamps.

use crate::core::{FinishReason, RequestTimings};
use crate::kv::KvRequest;
use crate::sampling::SamplingParams;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    Waiting,
    Running,
    /// Preempted by recompute: blocks freed, back in the waiting queue.
    Preempted,
    /// Preempted by swapping: KV blocks copied to the CPU pool, computed tokens kept.
    Swapped,
    /// Yielded its turn (time slicing) with its KV blocks kept on the GPU.
    Paused,
    FinishedStopped,
    FinishedLengthCapped,
    FinishedAborted,
    /// Failed by a model error.
    FinishedError,
}

impl RequestStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::FinishedStopped
                | Self::FinishedLengthCapped
                | Self::FinishedAborted
                | Self::FinishedError
        )
    }

    /// The OpenAI finish reason of a finished status.
    pub fn finish_reason(self) -> Option<FinishReason> {
        match self {
            Self::FinishedStopped => Some(FinishReason::Stop),
            Self::FinishedLengthCapped => Some(FinishReason::Length),
            Self::FinishedAborted | Self::FinishedError => Some(FinishReason::Abort),
            _ => None,
        }
    }
}

/// Timing stamps of a request's life (all `Instant`s; durations derived on demand).
#[derive(Debug, Clone, Default)]
pub struct RequestStamps {
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub finished: Option<Instant>,
    preempted_at: Option<Instant>,
    pub preempted_total: Duration,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub request_id: String,
    /// Prompt followed by generated tokens.
    all_token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    /// Tokens whose K/V is in this request's blocks.
    pub num_computed_tokens: usize,
    /// Prompt tokens served from the prefix cache at first scheduling.
    pub num_cached_tokens: usize,
    pub status: RequestStatus,
    pub sampling: SamplingParams,
    pub priority: i32,
    pub arrival_time: Instant,
    pub num_preemptions: u32,
    pub stamps: RequestStamps,
    /// Output tokens it had when last scheduled in (the fair policy's quantum counts from here).
    pub(crate) output_tokens_at_schedule_in: usize,
}

impl Request {
    pub fn new(
        request_id: String,
        prompt_token_ids: Vec<u32>,
        sampling: SamplingParams,
        priority: i32,
        arrival_time: Instant,
    ) -> Self {
        Self {
            request_id,
            num_prompt_tokens: prompt_token_ids.len(),
            all_token_ids: prompt_token_ids,
            num_computed_tokens: 0,
            num_cached_tokens: 0,
            status: RequestStatus::Waiting,
            sampling,
            priority,
            arrival_time,
            num_preemptions: 0,
            stamps: RequestStamps::default(),
            output_tokens_at_schedule_in: 0,
        }
    }

    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.all_token_ids[..self.num_prompt_tokens]
    }

    pub fn output_token_ids(&self) -> &[u32] {
        &self.all_token_ids[self.num_prompt_tokens..]
    }

    pub fn num_prompt_tokens(&self) -> usize {
        self.num_prompt_tokens
    }

    pub fn num_output_tokens(&self) -> usize {
        self.all_token_ids.len() - self.num_prompt_tokens
    }

    /// Known tokens: prompt + generated.
    pub fn num_tokens(&self) -> usize {
        self.all_token_ids.len()
    }

    pub fn append_output_token(&mut self, token: u32, now: Instant) {
        self.all_token_ids.push(token);
        self.stamps.first_token.get_or_insert(now);
        self.stamps.last_token = Some(now);
    }

    pub(crate) fn mark_scheduled(&mut self, now: Instant) {
        self.stamps.first_scheduled.get_or_insert(now);
        if let Some(t) = self.stamps.preempted_at.take() {
            self.stamps.preempted_total += now.saturating_duration_since(t);
        }
        self.status = RequestStatus::Running;
        self.output_tokens_at_schedule_in = self.num_output_tokens();
    }

    /// Output tokens generated since it was last scheduled in.
    pub fn tokens_since_scheduled_in(&self) -> usize {
        self.num_output_tokens() - self.output_tokens_at_schedule_in
    }

    /// Preempted by swap: its computed tokens stay valid (their K/V moves to the CPU pool).
    /// Preempted by swap (or a paused request's blocks moved out): its computed tokens stay
    /// valid (their K/V moves to the CPU pool).
    pub(crate) fn mark_swapped(&mut self, now: Instant) {
        if self.status != RequestStatus::Paused {
            self.num_preemptions += 1;
        }
        self.status = RequestStatus::Swapped;
        self.stamps.preempted_at.get_or_insert(now);
    }

    /// Preempted by recompute (or a paused request's blocks freed): computed tokens are lost.
    pub(crate) fn mark_preempted(&mut self, now: Instant) {
        if self.status != RequestStatus::Paused {
            self.num_preemptions += 1;
        }
        self.status = RequestStatus::Preempted;
        self.num_computed_tokens = 0;
        self.stamps.preempted_at.get_or_insert(now);
    }

    /// Yielded its turn with its blocks kept on the GPU: computed tokens stay valid.
    pub(crate) fn mark_paused(&mut self, now: Instant) {
        self.status = RequestStatus::Paused;
        self.num_preemptions += 1;
        self.stamps.preempted_at = Some(now);
    }

    /// Server-side timings in seconds (queue, prefill up to first token, decode after it).
    pub fn timings(&self) -> RequestTimings {
        let secs = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        RequestTimings {
            queued_s: secs(Some(self.arrival_time), self.stamps.first_scheduled),
            prefill_s: secs(self.stamps.first_scheduled, self.stamps.first_token),
            decode_s: secs(self.stamps.first_token, self.stamps.last_token),
            // A request ended while preempted counts its open interval up to its end.
            preempted_s: (self.stamps.preempted_total
                + match (self.stamps.preempted_at, self.stamps.finished) {
                    (Some(a), Some(f)) => f.saturating_duration_since(a),
                    _ => Duration::ZERO,
                })
            .as_secs_f64(),
        }
    }
}

impl KvRequest for Request {
    fn request_id(&self) -> &str {
        &self.request_id
    }
    fn all_token_ids(&self) -> &[u32] {
        &self.all_token_ids
    }
    fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }
}
