//! Scheduling policies: the ordering, admission and victim choice the scheduler loop delegates.
//!
//! A policy never touches blocks or token counts; adding one is a new module here plus a line
//! in `policy_from_name`.

mod fcfs;

pub use fcfs::Fcfs;

use super::request::Request;
use std::collections::VecDeque;

pub trait SchedulingPolicy: Send + std::fmt::Debug {
    /// The `--scheduling-policy` name.
    fn name(&self) -> &'static str;

    /// Puts a newly arrived request into the waiting queue.
    fn enqueue(&self, waiting: &mut VecDeque<Request>, request: Request);

    /// Puts a request preempted by recompute back into the waiting queue (default: the front,
    /// so it resumes before newer arrivals).
    fn requeue_preempted(&self, waiting: &mut VecDeque<Request>, request: Request) {
        waiting.push_front(request);
    }

    /// Index in `running` of the request to preempt when blocks run out.
    fn select_victim(&self, running: &[Request]) -> usize;

    /// Whether waiting requests may be admitted this step (static batching says no while a
    /// batch is running).
    fn may_admit(&self, _running: &[Request], _waiting: &VecDeque<Request>) -> bool {
        true
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown scheduling policy {0:?} (known: fcfs)")]
pub struct UnknownPolicy(pub String);

/// The policy for a `--scheduling-policy` value.
pub fn policy_from_name(name: &str) -> Result<Box<dyn SchedulingPolicy>, UnknownPolicy> {
    match name {
        "fcfs" => Ok(Box::new(Fcfs)),
        other => Err(UnknownPolicy(other.to_string())),
    }
}
