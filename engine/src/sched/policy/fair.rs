//! Fair (the CFS idea): the queue is ordered by tokens generated so far, least first; a running
//! request that generated its quantum since it was scheduled in yields to a waiting request that
//! has generated fewer, and is preempted by swapping its KV blocks to the CPU pool.

use super::{insert_sorted, PreemptionMode, SchedulingPolicy};
use crate::sched::request::Request;
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy)]
pub struct Fair {
    /// Tokens a request generates before it may be made to yield (`--fair-quantum`).
    pub quantum: usize,
}

impl Fair {
    pub fn new(quantum: usize) -> Self {
        Self {
            quantum: quantum.max(1),
        }
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
        request.tokens_since_scheduled_in() >= self.quantum
            && waiting
                .front()
                .is_some_and(|w| w.num_output_tokens() < request.num_output_tokens())
    }

    fn preemption_mode(&self) -> PreemptionMode {
        PreemptionMode::Swap
    }
}
