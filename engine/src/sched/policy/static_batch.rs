//! Static batching, the naive baseline: admit up to `--max-num-seqs` requests together, then
//! admit nothing until every request of that batch has finished.

use super::SchedulingPolicy;
use crate::sched::request::Request;
use std::collections::VecDeque;

#[derive(Debug, Default, Clone, Copy)]
pub struct StaticBatch;

impl SchedulingPolicy for StaticBatch {
    fn name(&self) -> &'static str {
        "static"
    }

    fn enqueue(&self, waiting: &mut VecDeque<Request>, request: Request) {
        waiting.push_back(request);
    }

    fn select_victim(&self, running: &[Request]) -> usize {
        running.len() - 1
    }

    fn admits_beyond_budget(&self) -> bool {
        true
    }

    /// A batch forms in one step (up to `--max-num-seqs`, whatever the step's token budget; the
    /// prefills then run chunked over the next steps): only while every running request joined
    /// this step (or none runs). Requests of the batch preempted by recompute rejoin only with
    /// the next batch.
    fn may_admit(
        &self,
        running: &[Request],
        _waiting: &VecDeque<Request>,
        admitted_this_step: usize,
    ) -> bool {
        running.len() == admitted_this_step
    }
}
