//! The scheduler: each step, which requests compute how many tokens in which blocks (vLLM v1).
//!
//! No prefill/decode phases: every step each request is given `num_new_tokens` so that its
//! `num_computed_tokens` catches up with its known tokens (prompt + outputs). That one rule covers
//! chunked prefill, decode, prefix-cache hits and recompute after preemption. Ordering, admission
//! and victim choice come from a `SchedulingPolicy`; blocks from `kv::KVCacheManager`.

pub mod policy;
#[cfg(test)]
mod policy_tests;
pub mod request;
mod scheduler;
#[cfg(test)]
mod tests;

pub use request::{Request, RequestStatus};
pub use scheduler::{Scheduler, SwapCounts};

use crate::core::FinishReason;
use crate::sampling::SamplingParams;

/// Limits the scheduler enforces (vLLM flag names).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `--max-num-seqs`: requests running at once.
    pub max_num_seqs: usize,
    /// `--max-num-batched-tokens`: tokens computed per step over all requests.
    pub max_num_batched_tokens: usize,
    /// `--max-model-len`: prompt + output tokens of one request.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_gpu_blocks: usize,
    pub enable_prefix_caching: bool,
}

/// One request's share of a step, with everything the runner needs to build its slice.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledRequest {
    pub request_id: String,
    /// The tokens computed this step: positions `num_computed_tokens..` of the request.
    pub token_ids: Vec<u32>,
    /// Tokens already in the cache before this step.
    pub num_computed_tokens: usize,
    /// Block table covering all `num_computed_tokens + token_ids.len()` positions.
    pub block_table: Vec<u32>,
    /// This step reaches the end of the known tokens: sample the next one.
    pub sample: bool,
    pub sampling: SamplingParams,
    /// Tokens generated so far (for seeded sampling and penalties).
    pub num_output_tokens: usize,
}

/// A step's plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOutput {
    /// Requests to run this step, in batch order.
    pub scheduled: Vec<ScheduledRequest>,
    pub total_num_scheduled_tokens: usize,
    /// Requests preempted (by recompute or swap) while planning this step.
    pub preempted_req_ids: Vec<String>,
    /// KV blocks to copy GPU -> CPU before this step's forward: (gpu_block, cpu_block).
    pub blocks_to_swap_out: Vec<(u32, u32)>,
    /// KV blocks to copy CPU -> GPU before this step's forward (after the swap-outs):
    /// (cpu_block, gpu_block).
    pub blocks_to_swap_in: Vec<(u32, u32)>,
    /// Requests that finished or were aborted since the previous step (runner drops their state).
    pub finished_req_ids: Vec<String>,
}

impl SchedulerOutput {
    /// Nothing to run and nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
            && self.blocks_to_swap_out.is_empty()
            && self.blocks_to_swap_in.is_empty()
    }
}

/// What a step did to one request, for the core to forward to its client.
#[derive(Debug, Clone)]
pub struct RequestOutput {
    pub request_id: String,
    pub new_token_ids: Vec<u32>,
    /// Set when the request finished this step.
    pub finish_reason: Option<FinishReason>,
    /// The finished request itself (its counts and stamps), when it finished this step.
    pub finished: Option<Request>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("request {0:?} already exists")]
    DuplicateRequest(String),
    #[error("request {request_id:?} has an empty prompt")]
    EmptyPrompt { request_id: String },
    #[error(
        "request {request_id:?} needs {needed} tokens of context ({prompt} prompt tokens), more than max_model_len {max_model_len}"
    )]
    TooLong {
        request_id: String,
        prompt: usize,
        needed: usize,
        max_model_len: usize,
    },
    #[error(
        "request {request_id:?} needs {needed_blocks} KV blocks, the cache only has {num_blocks}"
    )]
    ExceedsKvCapacity {
        request_id: String,
        needed_blocks: usize,
        num_blocks: usize,
    },
}
