//! Fair (the CFS idea): the queue is ordered by tokens generated so far, least first; a running
//! request that generated its quantum since it was scheduled in yields to a waiting request that
//! has generated fewer, and is preempted by swapping its KV blocks to the CPU pool.
//!
//! A waiting request that has no token yet gets a shorter quantum (like CFS's wakeup preemption):
//! with `--fair-first-token-quantum 1` (the default) running requests step aside after one token
//! each while new arrivals wait, so prompts are prefilled back to back and the last first token
//! of a burst comes as early as the prefill work allows.

use super::{insert_sorted, PreemptionMode, SchedulingPolicy};
use crate::sched::request::Request;
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy)]
pub struct Fair {
    /// Tokens a request generates before it may be made to yield (`--fair-quantum`).
    pub quantum: usize,
    /// Tokens a request generates before it yields to a request still waiting for its first
    /// token (`--fair-first-token-quantum`; at most `quantum`).
    pub first_token_quantum: usize,
}

impl Fair {
    /// `quantum` tokens between yields; a request still waiting for its first token gets the
    /// running ones to yield after one token each (`with_first_token_quantum` changes that).
    pub fn new(quantum: usize) -> Self {
        Self {
            quantum: quantum.max(1),
            first_token_quantum: 1,
        }
    }

    /// `n` = the quantum gives the plain CFS rule (new arrivals wait like everyone else).
    pub fn with_first_token_quantum(mut self, n: usize) -> Self {
        self.first_token_quantum = n.clamp(1, self.quantum);
        self
    }
}

fn key(r: &Request) -> (usize, std::time::Instant) {
    (r.num_output_tokens(), r.arrival_time)
}

impl SchedulingPolicy for Fair {
    fn name(&self) -> &'static str {
        "fair"
    }

    fn enqueue(&self, waiting: &mut VecDeque<Request>, request: Request) {
        insert_sorted(waiting, request, key);
    }

    fn requeue_preempted(&self, waiting: &mut VecDeque<Request>, request: Request) {
        insert_sorted(waiting, request, key);
    }

    /// The one that generated the most (latest arrival on ties) gives its blocks up.
    fn select_victim(&self, running: &[Request]) -> usize {
        running
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| key(r))
            .map_or(0, |(i, _)| i)
    }

    fn should_yield(&self, request: &Request, waiting: &VecDeque<Request>) -> bool {
        let Some(head) = waiting.front() else {
            return false;
        };
        let quantum = if head.num_output_tokens() == 0 {
            self.first_token_quantum
        } else {
            self.quantum
        };
        request.tokens_since_scheduled_in() >= quantum
            && head.num_output_tokens() < request.num_output_tokens()
    }

    fn preemption_mode(&self) -> PreemptionMode {
        PreemptionMode::Swap
    }
}
