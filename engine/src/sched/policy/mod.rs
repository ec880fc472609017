//! Scheduling policies: the ordering, admission, victim choice and preemption mode the scheduler
//! loop delegates.
//!
//! A policy never touches blocks or token counts; adding one is a new module here plus a line
//! in `policy_from_name`.

mod adaptive;
mod fair;
mod fcfs;
mod priority;
mod static_batch;

pub use adaptive::Adaptive;
pub use fair::Fair;
pub use fcfs::Fcfs;
pub use priority::Priority;
pub use static_batch::StaticBatch;

use super::request::Request;
use std::collections::VecDeque;
use std::time::Duration;

/// How a preempted request gives its KV blocks back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreemptionMode {
    /// Free the blocks; the request recomputes its tokens when it runs again.
    Recompute,
    /// Copy the blocks to the CPU pool and back later (recompute when the CPU pool is full).
    Swap,
}

/// What one planned step looked like, for policies that adapt (`adaptive`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// KV pool usage after planning, 0.0..=1.0.
    pub kv_usage: f64,
    /// Requests preempted (recompute or swap) for lack of blocks this step.
    pub num_preempted: usize,
    pub num_running: usize,
    pub num_waiting: usize,
    /// How long the oldest still-waiting request has waited since arrival.
    pub oldest_wait: Option<Duration>,
}

pub trait SchedulingPolicy: Send + std::fmt::Debug {
    /// The `--scheduling-policy` name.
    fn name(&self) -> &'static str;

    /// Puts a newly arrived request into the waiting queue.
    fn enqueue(&self, waiting: &mut VecDeque<Request>, request: Request);

    /// Puts a preempted request (recomputed or swapped) back into the waiting queue (default:
    /// the front, so it resumes before newer arrivals).
    fn requeue_preempted(&self, waiting: &mut VecDeque<Request>, request: Request) {
        waiting.push_front(request);
    }

    /// Index in `running` of the request to preempt when blocks run out.
    fn select_victim(&self, running: &[Request]) -> usize;

    /// Whether the head of `waiting` may be admitted now; `admitted_this_step` of the `running`
    /// requests were admitted while planning this step (static batching closes a batch with it).
    fn may_admit(
        &self,
        _running: &[Request],
        _waiting: &VecDeque<Request>,
        _admitted_this_step: usize,
    ) -> bool {
        true
    }

    /// Whether requests may join the running set in a step whose token budget is spent (their
    /// prefill then starts in later steps): static batching forms its whole batch at once.
    fn admits_beyond_budget(&self) -> bool {
        false
    }

    /// Most requests running at once, given `--max-num-seqs`.
    fn max_running(&self, max_num_seqs: usize) -> usize {
        max_num_seqs
    }

    /// Whether a running request should give its place to the waiting ones (time slicing).
    fn should_yield(&self, _request: &Request, _waiting: &VecDeque<Request>) -> bool {
        false
    }

    fn preemption_mode(&self) -> PreemptionMode {
        PreemptionMode::Recompute
    }

    /// Called once per planned step, after planning.
    fn observe(&mut self, _stats: &StepStats) {}
}

/// Inserts `request` after every queued request whose key is <= its key (stable ordering).
pub(crate) fn insert_sorted<K: Ord>(
    waiting: &mut VecDeque<Request>,
    request: Request,
    key: impl Fn(&Request) -> K,
) {
    let k = key(&request);
    let pos = waiting.partition_point(|r| key(r) <= k);
    waiting.insert(pos, request);
}

/// Knobs of the policies that have some (`--fair-quantum`, `--fair-first-token-quantum`,
/// `--adaptive-max-wait-ms`).
#[derive(Debug, Clone, Copy)]
pub struct PolicyOptions {
    pub fair_quantum: usize,
    pub fair_first_token_quantum: usize,
    pub adaptive_max_wait: Duration,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            fair_quantum: 16,
            fair_first_token_quantum: 1,
            adaptive_max_wait: Duration::from_millis(2000),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown scheduling policy {0:?} (known: fcfs, priority, fair, static, adaptive)")]
pub struct UnknownPolicy(pub String);

/// The policy for a `--scheduling-policy` value, with default knobs.
pub fn policy_from_name(name: &str) -> Result<Box<dyn SchedulingPolicy>, UnknownPolicy> {
    policy_with_options(name, PolicyOptions::default())
}

/// The policy for a `--scheduling-policy` value. `max_num_seqs` bounds `adaptive`.
pub fn policy_with_options(
    name: &str,
    opts: PolicyOptions,
) -> Result<Box<dyn SchedulingPolicy>, UnknownPolicy> {
    match name {
        "fcfs" => Ok(Box::new(Fcfs)),
        "priority" => Ok(Box::new(Priority)),
        "fair" => Ok(Box::new(
            Fair::new(opts.fair_quantum).with_first_token_quantum(opts.fair_first_token_quantum),
        )),
        "static" => Ok(Box::new(StaticBatch)),
        "adaptive" => Ok(Box::new(Adaptive::new(opts.adaptive_max_wait))),
        other => Err(UnknownPolicy(other.to_string())),
    }
}
