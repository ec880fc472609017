//! Adaptive: first come, first served under a running-request cap that follows KV pressure and
//! a queueing SLA.
//!
//! The rule, applied after every planned step (AIMD, like TCP congestion control):
//! - shrink: when the step preempted anyone or KV usage is above 0.95, the cap drops by a quarter
//!   (at least 1), never below 1;
//! - grow: otherwise, when the oldest waiting request has waited longer than
//!   `--adaptive-max-wait-ms` and KV usage is below 0.9, the cap grows by 1, never above
//!   `--max-num-seqs`;
//! - otherwise it stays. The cap starts at a quarter of `--max-num-seqs` (at least 1).

use super::{SchedulingPolicy, StepStats};
use crate::sched::request::Request;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// KV usage above which the cap shrinks.
pub const SHRINK_KV_USAGE: f64 = 0.95;
/// KV usage below which the cap may grow.
pub const GROW_KV_USAGE: f64 = 0.9;

#[derive(Debug)]
pub struct Adaptive {
    max_wait: Duration,
    /// Current cap; 0 until the first `max_running` call fixes the start from `--max-num-seqs`.
    cap: AtomicUsize,
    /// The `--max-num-seqs` bound seen last.
    upper: AtomicUsize,
}

impl Adaptive {
    pub fn new(max_wait: Duration) -> Self {
        Self {
            max_wait,
            cap: AtomicUsize::new(0),
            upper: AtomicUsize::new(0),
        }
    }

    /// The current cap on running requests (0 before the first step).
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }
}

impl SchedulingPolicy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn enqueue(&self, waiting: &mut VecDeque<Request>, request: Request) {
        waiting.push_back(request);
    }

    fn select_victim(&self, running: &[Request]) -> usize {
        running.len() - 1
    }

    fn max_running(&self, max_num_seqs: usize) -> usize {
        let upper = max_num_seqs.max(1);
        self.upper.store(upper, Ordering::Relaxed);
        let cap = self.cap.load(Ordering::Relaxed);
        if cap == 0 {
            let start = (upper / 4).max(1);
            self.cap.store(start, Ordering::Relaxed);
            return start;
        }
        cap.min(upper)
    }

    fn observe(&mut self, s: &StepStats) {
        let upper = *self.upper.get_mut();
        let cap = self.cap.get_mut();
        if upper == 0 || *cap == 0 {
            return;
        }
        if s.num_preempted > 0 || s.kv_usage > SHRINK_KV_USAGE {
            *cap = cap.saturating_sub((*cap / 4).max(1)).max(1);
        } else if s.kv_usage < GROW_KV_USAGE && s.oldest_wait.is_some_and(|w| w > self.max_wait) {
            *cap = (*cap + 1).min(upper);
        }
    }
}
