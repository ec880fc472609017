//! The scheduling loop proper: `schedule()` plans a step, `update_from_output()` applies its result.

use super::policy::{PreemptionMode, SchedulingPolicy, StepStats};
use super::request::{Request, RequestStatus};
use super::{RequestOutput, SchedError, ScheduledRequest, SchedulerConfig, SchedulerOutput};
use crate::kv::{BlockId, KVCacheManager};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// A request planned this step, before its block table is final.
struct Planned {
    request_id: String,
    num_new_tokens: usize,
    num_computed_before: usize,
}

/// Block copies planned this step: (GPU, CPU) pairs out, (CPU, GPU) pairs in.
#[derive(Default)]
struct Swaps {
    swap_out: Vec<(u32, u32)>,
    swap_in: Vec<(u32, u32)>,
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    policy: Box<dyn SchedulingPolicy>,
    kv: KVCacheManager,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    finished_req_ids: Vec<String>,
    num_preemptions_total: u64,
    /// CPU swap pool: free CPU block ids, total, and the CPU blocks of each swapped request.
    cpu_free: Vec<u32>,
    num_cpu_blocks: usize,
    cpu_blocks: HashMap<String, Vec<u32>>,
    /// Waiting requests that yielded their turn (time slicing) with their KV blocks kept on the
    /// GPU; their blocks are the first to go (swap or recompute) when blocks run short.
    paused: HashSet<String>,
    /// Requests swapped out / in, and blocks moved each way, since start.
    pub(crate) swap_counts: SwapCounts,
}

/// Swap traffic since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwapCounts {
    pub swaps_out: u64,
    pub swaps_in: u64,
    pub blocks_out: u64,
    pub blocks_in: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, policy: Box<dyn SchedulingPolicy>) -> Self {
        let kv = KVCacheManager::new(
            config.num_gpu_blocks,
            config.block_size,
            config.enable_prefix_caching,
        );
        Self {
            config,
            policy,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished_req_ids: Vec::new(),
            num_preemptions_total: 0,
            cpu_free: Vec::new(),
            num_cpu_blocks: 0,
            cpu_blocks: HashMap::new(),
            paused: HashSet::new(),
            swap_counts: SwapCounts::default(),
        }
    }

    /// Gives the scheduler a CPU swap pool of `n` blocks (0: swapping disabled, preemption by
    /// swap falls back to recompute).
    pub fn with_num_cpu_blocks(mut self, n: usize) -> Self {
        self.num_cpu_blocks = n;
        self.cpu_free = (0..n as u32).rev().collect();
        self
    }

    pub fn num_cpu_blocks(&self) -> usize {
        self.num_cpu_blocks
    }

    /// Whether a waiting request yielded with its KV blocks kept on the GPU.
    pub fn is_paused(&self, request_id: &str) -> bool {
        self.paused.contains(request_id)
    }

    pub fn num_free_cpu_blocks(&self) -> usize {
        self.cpu_free.len()
    }

    pub fn swap_counts(&self) -> SwapCounts {
        self.swap_counts
    }

    /// Drops the prefix cache's hashes; false (nothing dropped) while any block is in use.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.kv.reset_prefix_cache()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    pub fn kv(&self) -> &KVCacheManager {
        &self.kv
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_requests(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn num_preemptions_total(&self) -> u64 {
        self.num_preemptions_total
    }

    pub fn running(&self) -> &[Request] {
        &self.running
    }

    pub fn waiting(&self) -> impl Iterator<Item = &Request> {
        self.waiting.iter()
    }

    /// Looks a live (waiting or running) request up by id.
    pub fn get(&self, request_id: &str) -> Option<&Request> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|r| r.request_id == request_id)
    }

    /// Queues a new request; refuses ones that could never run.
    pub fn add_request(&mut self, request: Request) -> Result<(), SchedError> {
        if self.get(&request.request_id).is_some() {
            return Err(SchedError::DuplicateRequest(request.request_id));
        }
        let prompt = request.num_prompt_tokens();
        if prompt == 0 {
            return Err(SchedError::EmptyPrompt {
                request_id: request.request_id,
            });
        }
        if prompt > self.config.max_model_len {
            return Err(SchedError::TooLong {
                request_id: request.request_id,
                prompt,
                needed: prompt,
                max_model_len: self.config.max_model_len,
            });
        }
        // The last sampled token's K/V is never computed.
        let max_context = (prompt + request.sampling.max_tokens.max(1) - 1)
            .min(self.config.max_model_len)
            .max(prompt);
        let needed_blocks = self.kv.blocks_for(max_context);
        if needed_blocks > self.kv.num_blocks() {
            return Err(SchedError::ExceedsKvCapacity {
                request_id: request.request_id,
                needed_blocks,
                num_blocks: self.kv.num_blocks(),
            });
        }
        self.policy.enqueue(&mut self.waiting, request);
        Ok(())
    }

    /// Plans one step: running requests first (in order), then admits waiting ones while the
    /// token budget, `max_num_seqs` and the KV pool allow. Preempts by recompute when running
    /// requests cannot get blocks.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let now = Instant::now();
        let mut budget = self.config.max_num_batched_tokens;
        let mut planned: Vec<Planned> = Vec::new();
        let mut preempted: Vec<String> = Vec::new();
        let mut swaps = Swaps::default();

        // Time slicing: running requests that used their share yield to waiting ones (at most
        // one per request waiting at the start of the step).
        let mut may_yield = self.waiting.len();
        let mut j = 0;
        while j < self.running.len() && may_yield > 0 {
            if self.policy.should_yield(&self.running[j], &self.waiting) {
                let mut req = self.running.remove(j);
                req.mark_paused(now);
                self.paused.insert(req.request_id.clone());
                self.num_preemptions_total += 1;
                preempted.push(req.request_id.clone());
                self.policy.requeue_preempted(&mut self.waiting, req);
                may_yield -= 1;
            } else {
                j += 1;
            }
        }
        let num_yielded = preempted.len();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let req = &self.running[i];
            let num_new = (req.num_tokens() - req.num_computed_tokens).min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let mut scheduled_self = true;
            loop {
                if self
                    .kv
                    .allocate_slots(&self.running[i], num_new, &[])
                    .is_some()
                {
                    break;
                }
                if self.evict_paused(None, now, &mut swaps) {
                    continue;
                }
                let victim_idx = self.policy.select_victim(&self.running);
                let victim = self.running.remove(victim_idx);
                if let Some(pos) = planned
                    .iter()
                    .position(|p| p.request_id == victim.request_id)
                {
                    // Planned earlier this step: give its budget back.
                    let p = planned.remove(pos);
                    budget += p.num_new_tokens;
                }
                let is_self = victim_idx == i;
                if victim_idx < i {
                    i -= 1;
                }
                self.preempt(victim, now, &mut preempted, &mut swaps);
                if is_self {
                    scheduled_self = false;
                    break;
                }
            }
            if scheduled_self {
                let req = &self.running[i];
                planned.push(Planned {
                    request_id: req.request_id.clone(),
                    num_new_tokens: num_new,
                    num_computed_before: req.num_computed_tokens,
                });
                budget -= num_new;
                i += 1;
            }
        }

        // Admit waiting requests (not in a step that ran out of blocks).
        let num_short = preempted.len() - num_yielded;
        let max_running = self
            .policy
            .max_running(self.config.max_num_seqs)
            .clamp(1, self.config.max_num_seqs.max(1));
        let mut admitted = 0;
        let mut cpu_released = Vec::new();
        if num_short == 0 {
            let beyond_budget = self.policy.admits_beyond_budget();
            while (budget > 0 || beyond_budget)
                && self.running.len() < max_running
                && !self.waiting.is_empty()
                && self
                    .policy
                    .may_admit(&self.running, &self.waiting, admitted)
            {
                let req = &self.waiting[0];
                let (hits, num_hit): (Vec<BlockId>, usize) = if req.num_computed_tokens == 0 {
                    self.kv.get_computed_blocks(req)
                } else {
                    (Vec::new(), 0)
                };
                let num_new = (req.num_tokens() - req.num_computed_tokens - num_hit).min(budget);
                if self.kv.allocate_slots(req, num_new, &hits).is_none() {
                    let head = req.request_id.clone();
                    if self.evict_paused(Some(&head), now, &mut swaps) {
                        continue;
                    }
                    break;
                }
                let mut req = self.waiting.pop_front().expect("checked non-empty");
                self.paused.remove(&req.request_id);
                if let Some(cpu) = self.cpu_blocks.remove(&req.request_id) {
                    let gpu = self.kv.block_ids(&req.request_id);
                    swaps
                        .swap_in
                        .extend(cpu.iter().copied().zip(gpu.iter().copied()));
                    self.swap_counts.swaps_in += 1;
                    self.swap_counts.blocks_in += cpu.len() as u64;
                    // Free only after this step: a swap-out later in the step must not reuse
                    // a CPU block the runner still reads (it copies all outs before all ins).
                    cpu_released.extend(cpu);
                }
                admitted += 1;
                if req.stamps.first_scheduled.is_none() {
                    req.num_cached_tokens = num_hit;
                }
                req.num_computed_tokens += num_hit;
                req.mark_scheduled(now);
                if num_new > 0 {
                    planned.push(Planned {
                        request_id: req.request_id.clone(),
                        num_new_tokens: num_new,
                        num_computed_before: req.num_computed_tokens,
                    });
                }
                budget -= num_new;
                self.running.push(req);
            }
        }

        self.cpu_free.extend(cpu_released);

        // Build the output in batch order and advance the computed counts.
        self.policy.observe(&StepStats {
            kv_usage: self.kv.usage(),
            num_preempted: num_short,
            num_running: self.running.len(),
            num_waiting: self.waiting.len(),
            oldest_wait: self
                .waiting
                .iter()
                .map(|r| now.saturating_duration_since(r.arrival_time))
                .max(),
        });
        let mut out = SchedulerOutput {
            preempted_req_ids: preempted,
            blocks_to_swap_out: swaps.swap_out,
            blocks_to_swap_in: swaps.swap_in,
            finished_req_ids: std::mem::take(&mut self.finished_req_ids),
            ..Default::default()
        };
        for p in planned {
            let req = self
                .running
                .iter_mut()
                .find(|r| r.request_id == p.request_id)
                .expect("planned requests are running");
            let start = p.num_computed_before;
            let end = start + p.num_new_tokens;
            let all = crate::kv::KvRequest::all_token_ids(req);
            out.scheduled.push(ScheduledRequest {
                request_id: p.request_id.clone(),
                token_ids: all[start..end].to_vec(),
                num_computed_tokens: start,
                block_table: self.kv.block_ids(&p.request_id).to_vec(),
                sample: end == req.num_tokens(),
                sampling: req.sampling.clone(),
                num_output_tokens: req.num_output_tokens(),
            });
            out.total_num_scheduled_tokens += p.num_new_tokens;
            req.num_computed_tokens = end;
        }
        out
    }

    /// Takes `victim` off the GPU: by swap when the policy asks for it and the CPU pool has
    /// room for its computed blocks, by recompute otherwise.
    fn preempt(
        &mut self,
        mut victim: Request,
        now: Instant,
        preempted: &mut Vec<String>,
        swaps: &mut Swaps,
    ) {
        self.release_blocks(&mut victim, now, swaps);
        self.num_preemptions_total += 1;
        preempted.push(victim.request_id.clone());
        self.policy.requeue_preempted(&mut self.waiting, victim);
    }

    /// Moves the paused waiting request latest in the queue (not `except`) off the GPU, by swap
    /// or recompute; false when no paused request holds blocks.
    fn evict_paused(&mut self, except: Option<&str>, now: Instant, swaps: &mut Swaps) -> bool {
        let Some(pos) = self.waiting.iter().rposition(|r| {
            self.paused.contains(&r.request_id) && Some(r.request_id.as_str()) != except
        }) else {
            return false;
        };
        let mut victim = self.waiting.remove(pos).expect("position in range");
        self.paused.remove(&victim.request_id);
        self.release_blocks(&mut victim, now, swaps);
        self.waiting.insert(pos, victim);
        true
    }

    /// Gives `victim`'s GPU blocks up: by swap when the policy asks for it and the CPU pool has
    /// room for its computed blocks, by recompute otherwise.
    fn release_blocks(&mut self, victim: &mut Request, now: Instant, swaps: &mut Swaps) {
        let n = self.kv.blocks_for(victim.num_computed_tokens);
        if self.policy.preemption_mode() == PreemptionMode::Swap
            && n > 0
            && n <= self.cpu_free.len()
        {
            let gpu = &self.kv.block_ids(&victim.request_id)[..n];
            let cpu: Vec<u32> = (0..n)
                .map(|_| self.cpu_free.pop().expect("checked"))
                .collect();
            swaps
                .swap_out
                .extend(gpu.iter().copied().zip(cpu.iter().copied()));
            self.swap_counts.swaps_out += 1;
            self.swap_counts.blocks_out += n as u64;
            self.cpu_blocks.insert(victim.request_id.clone(), cpu);
            self.kv.free(victim);
            victim.mark_swapped(now);
        } else {
            self.kv.free(victim);
            victim.mark_preempted(now);
        }
    }

    /// Applies a step's sampled tokens (`sampled[i]` for `output.scheduled[i]`; None where no
    /// token was sampled) and finishes requests on stop tokens, `max_tokens` or `max_model_len`.
    pub fn update_from_output(
        &mut self,
        output: &SchedulerOutput,
        sampled: &[Option<u32>],
    ) -> Vec<RequestOutput> {
        let now = Instant::now();
        let mut outs = Vec::new();
        for (sr, tok) in output.scheduled.iter().zip(sampled) {
            let Some(tok) = *tok else { continue };
            let Some(idx) = self
                .running
                .iter()
                .position(|r| r.request_id == sr.request_id)
            else {
                continue; // aborted meanwhile
            };
            let req = &mut self.running[idx];
            req.append_output_token(tok, now);
            let status = if req.sampling.stop_token_ids.contains(&tok) {
                Some(RequestStatus::FinishedStopped)
            } else if req.num_output_tokens() >= req.sampling.max_tokens
                || req.num_tokens() >= self.config.max_model_len
            {
                Some(RequestStatus::FinishedLengthCapped)
            } else {
                None
            };
            let finished = status.map(|status| {
                let mut req = self.running.remove(idx);
                self.finish(&mut req, status, now);
                req
            });
            outs.push(RequestOutput {
                request_id: sr.request_id.clone(),
                new_token_ids: vec![tok],
                finish_reason: status.and_then(RequestStatus::finish_reason),
                finished,
            });
        }
        outs
    }

    fn finish(&mut self, req: &mut Request, status: RequestStatus, now: Instant) {
        self.kv.free(req);
        self.paused.remove(&req.request_id);
        if let Some(cpu) = self.cpu_blocks.remove(&req.request_id) {
            self.cpu_free.extend(cpu);
        }
        req.status = status;
        req.stamps.finished = Some(now);
        self.finished_req_ids.push(req.request_id.clone());
    }

    /// Ends requests in any state (abort, model error), freeing their blocks. Returns the
    /// finished requests (for their stats); unknown ids are ignored.
    pub fn finish_requests(&mut self, ids: &[String], status: RequestStatus) -> Vec<Request> {
        let now = Instant::now();
        let mut done = Vec::new();
        for id in ids {
            let req = if let Some(i) = self.running.iter().position(|r| &r.request_id == id) {
                Some(self.running.remove(i))
            } else if let Some(i) = self.waiting.iter().position(|r| &r.request_id == id) {
                self.waiting.remove(i)
            } else {
                None
            };
            if let Some(mut req) = req {
                self.finish(&mut req, status, now);
                done.push(req);
            }
        }
        done
    }
}
