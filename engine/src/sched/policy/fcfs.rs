//! First come, first served: arrival order, newest running request preempted first (vLLM default).

use super::SchedulingPolicy;
use crate::sched::request::Request;
use std::collections::VecDeque;

#[derive(Debug, Default, Clone, Copy)]
pub struct Fcfs;

impl SchedulingPolicy for Fcfs {
    fn name(&self) -> &'static str {
        "fcfs"
    }

    fn enqueue(&self, waiting: &mut VecDeque<Request>, request: Request) {
        waiting.push_back(request);
    }

    fn select_victim(&self, running: &[Request]) -> usize {
        running.len() - 1
    }
}
