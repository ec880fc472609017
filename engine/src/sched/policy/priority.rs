//! Priority: lower `priority` value first, arrival breaks ties; the lowest-priority (highest
//! value, latest arrival) running request is preempted first (vLLM's priority policy).

use super::{insert_sorted, SchedulingPolicy};
use crate::sched::request::Request;
use std::collections::VecDeque;

#[derive(Debug, Default, Clone, Copy)]
pub struct Priority;

fn key(r: &Request) -> (i32, std::time::Instant) {
    (r.priority, r.arrival_time)
}

impl SchedulingPolicy for Priority {
    fn name(&self) -> &'static str {
        "priority"
    }

    fn enqueue(&self, waiting: &mut VecDeque<Request>, request: Request) {
        insert_sorted(waiting, request, key);
    }

    fn requeue_preempted(&self, waiting: &mut VecDeque<Request>, request: Request) {
        insert_sorted(waiting, request, key);
    }

    fn select_victim(&self, running: &[Request]) -> usize {
        // max_by_key returns the last of equal maxima: the latest in batch order.
        running
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| key(r))
            .map_or(0, |(i, _)| i)
    }
}
