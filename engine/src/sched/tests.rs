//! Scheduler tests against a fake runner that keeps a simulated paged cache of token ids.

use super::policy::Fcfs;
use super::*;
use crate::kv::KvRequest;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

pub(super) fn config(
    blocks: usize,
    block_size: usize,
    budget: usize,
    seqs: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: seqs,
        max_num_batched_tokens: budget,
        max_model_len: 256,
        block_size,
        num_gpu_blocks: blocks,
        enable_prefix_caching: false,
    }
}

pub(super) fn request(id: &str, prompt: Vec<u32>, max_tokens: usize, stop: Vec<u32>) -> Request {
    let sampling = SamplingParams {
        max_tokens,
        temperature: 0.0,
        stop_token_ids: stop,
        ..Default::default()
    };
    Request::new(id.to_string(), prompt, sampling, 0, Instant::now())
}

/// The fake model's next token: a hash of the whole context.
pub(super) fn next_token(context: &[u32]) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    context.hash(&mut h);
    (h.finish() % 50) as u32
}

/// What a request generates alone: the reference every batched run must reproduce.
pub(super) fn reference(
    prompt: &[u32],
    max_tokens: usize,
    stop: &[u32],
    max_model_len: usize,
) -> Vec<u32> {
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    loop {
        let t = next_token(&ctx);
        ctx.push(t);
        out.push(t);
        if stop.contains(&t) || out.len() >= max_tokens || ctx.len() >= max_model_len {
            return out;
        }
    }
}

/// Writes each scheduled token into its slot, then samples from the context read back through the
/// block table -- so a wrong table or a block shared by mistake changes the tokens.
pub(super) struct FakeRunner {
    block_size: usize,
    slots: Vec<Option<u32>>,
    /// CPU pool contents per CPU block.
    host: HashMap<u32, Vec<Option<u32>>>,
}

impl FakeRunner {
    pub(super) fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            slots: vec![None; num_blocks * block_size],
            host: HashMap::new(),
        }
    }

    /// Copies blocks out then in, like the model runner.
    fn swap(&mut self, out: &SchedulerOutput) {
        let bs = self.block_size;
        for &(gpu, cpu) in &out.blocks_to_swap_out {
            let g = gpu as usize * bs;
            self.host.insert(cpu, self.slots[g..g + bs].to_vec());
        }
        for &(cpu, gpu) in &out.blocks_to_swap_in {
            let data = self
                .host
                .remove(&cpu)
                .expect("swap-in of an empty CPU block");
            let g = gpu as usize * bs;
            self.slots[g..g + bs].copy_from_slice(&data);
        }
    }

    fn slot(&self, sr: &ScheduledRequest, pos: usize) -> usize {
        sr.block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    pub(super) fn execute(&mut self, out: &SchedulerOutput) -> Vec<Option<u32>> {
        self.swap(out);
        for sr in &out.scheduled {
            for (j, &t) in sr.token_ids.iter().enumerate() {
                let s = self.slot(sr, sr.num_computed_tokens + j);
                self.slots[s] = Some(t);
            }
        }
        out.scheduled
            .iter()
            .map(|sr| {
                sr.sample.then(|| {
                    let n = sr.num_computed_tokens + sr.token_ids.len();
                    let ctx: Vec<u32> = (0..n)
                        .map(|p| self.slots[self.slot(sr, p)].expect("slot written"))
                        .collect();
                    next_token(&ctx)
                })
            })
            .collect()
    }
}

/// One engine step against the fake runner: plan (invariants checked), execute, apply.
pub(super) fn step(
    s: &mut Scheduler,
    runner: &mut FakeRunner,
) -> (SchedulerOutput, Vec<RequestOutput>) {
    let out = s.schedule();
    check_invariants(s, &out);
    let sampled = runner.execute(&out);
    let outputs = s.update_from_output(&out, &sampled);
    (out, outputs)
}

/// Aborts one live (running or waiting) request picked at random; its id, if any was live.
pub(super) fn abort_random(s: &mut Scheduler, rng: &mut impl Rng) -> Option<String> {
    let live: Vec<String> = s
        .running()
        .iter()
        .chain(s.waiting())
        .map(|r| r.request_id.clone())
        .collect();
    if live.is_empty() {
        return None;
    }
    let id = live[rng.gen_range(0..live.len())].clone();
    let f = s.finish_requests(std::slice::from_ref(&id), RequestStatus::FinishedAborted);
    assert_eq!(f.len(), 1);
    Some(id)
}

/// Invariants after every step: limits kept, every block owned as often as its ref count says.
pub(super) fn check_invariants(s: &Scheduler, out: &SchedulerOutput) {
    let c = s.config();
    assert!(out.total_num_scheduled_tokens <= c.max_num_batched_tokens);
    assert!(out.scheduled.len() <= c.max_num_seqs);
    assert!(s.num_running() <= c.max_num_seqs);
    let ids: HashSet<&str> = out
        .scheduled
        .iter()
        .map(|r| r.request_id.as_str())
        .collect();
    assert_eq!(ids.len(), out.scheduled.len(), "a request scheduled twice");
    let mut owners: HashMap<u32, u32> = HashMap::new();
    for id in s.kv().owners() {
        for &b in s.kv().block_ids(id) {
            *owners.entry(b).or_default() += 1;
        }
    }
    for (&b, &n) in &owners {
        assert_eq!(s.kv().pool().ref_cnt(b), n, "block {b} ref count");
        if !c.enable_prefix_caching {
            assert_eq!(n, 1, "block {b} owned twice");
        }
    }
    assert_eq!(owners.len() + s.kv().num_free_blocks(), c.num_gpu_blocks);
    for r in s.running() {
        assert_eq!(
            s.kv().block_ids(&r.request_id).len(),
            s.kv().blocks_for(r.num_computed_tokens),
            "running request's blocks cover exactly its computed tokens"
        );
    }
    for r in s.waiting() {
        if s.is_paused(&r.request_id) {
            assert_eq!(
                s.kv().block_ids(&r.request_id).len(),
                s.kv().blocks_for(r.num_computed_tokens),
                "a paused request keeps exactly the blocks of its computed tokens"
            );
        } else {
            assert!(s.kv().block_ids(&r.request_id).is_empty());
        }
    }
}

fn random_run(seed: u64, enable_prefix_caching: bool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cfg = config(24, 4, 32, 6);
    cfg.enable_prefix_caching = enable_prefix_caching;
    let max_model_len = cfg.max_model_len;
    let mut s = Scheduler::new(cfg, Box::new(Fcfs));
    let mut runner = FakeRunner::new(24, 4);
    let shared: Vec<u32> = (0..12).map(|i| 100 + i).collect();
    let mut expected: HashMap<String, Vec<u32>> = HashMap::new();
    let mut got: HashMap<String, Vec<u32>> = HashMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut aborted: HashSet<String> = HashSet::new();
    let mut next_id = 0;
    for n in 0..20_000 {
        if n < 1500 && rng.gen_bool(0.08) {
            let id = format!("r{next_id}");
            next_id += 1;
            let len = rng.gen_range(1..40);
            let mut prompt: Vec<u32> = if enable_prefix_caching && rng.gen_bool(0.5) {
                shared.clone()
            } else {
                Vec::new()
            };
            prompt.extend((0..len).map(|_| rng.gen_range(0..50)));
            let max_tokens = rng.gen_range(1..30);
            let stop = if rng.gen_bool(0.3) { vec![7] } else { vec![] };
            expected.insert(
                id.clone(),
                reference(&prompt, max_tokens, &stop, max_model_len),
            );
            s.add_request(request(&id, prompt, max_tokens, stop))
                .unwrap();
        }
        if rng.gen_bool(0.03) {
            aborted.extend(abort_random(&mut s, &mut rng));
        }
        let (out, outputs) = step(&mut s, &mut runner);
        for o in outputs {
            got.entry(o.request_id.clone())
                .or_default()
                .extend(&o.new_token_ids);
            if let Some(req) = o.finished {
                assert_eq!(req.output_token_ids(), got[&o.request_id].as_slice());
                done.insert(o.request_id);
            }
        }
        check_invariants(&s, &out);
        if n >= 1500 && !s.has_requests() {
            break;
        }
    }
    assert!(
        !s.has_requests(),
        "requests left after the run: {} running, {} waiting",
        s.num_running(),
        s.num_waiting()
    );
    assert_eq!(s.kv().num_free_blocks(), 24, "blocks leaked");
    assert!(s.num_preemptions_total() > 0, "the pool never ran out");
    for (id, exp) in &expected {
        if aborted.contains(id) {
            continue;
        }
        assert!(done.contains(id), "{id} never finished");
        assert_eq!(&got[id], exp, "{id} tokens differ from running alone");
    }
    assert_eq!(done.len() + aborted.len(), expected.len());
}

#[test]
fn random_adds_aborts_and_preemptions_keep_invariants() {
    for seed in 0..6 {
        random_run(seed, false);
    }
}

#[test]
fn random_run_with_prefix_caching_matches_reference() {
    for seed in 10..16 {
        random_run(seed, true);
    }
}

#[test]
fn chunked_prefill_splits_a_long_prompt() {
    let mut s = Scheduler::new(config(64, 4, 16, 4), Box::new(Fcfs));
    s.add_request(request("a", (0..50).collect(), 2, vec![]))
        .unwrap();
    let mut runner = FakeRunner::new(64, 4);
    let mut chunks = Vec::new();
    loop {
        let out = s.schedule();
        if out.is_empty() {
            break;
        }
        let sr = &out.scheduled[0];
        chunks.push((sr.num_computed_tokens, sr.token_ids.len(), sr.sample));
        let sampled = runner.execute(&out);
        s.update_from_output(&out, &sampled);
    }
    assert_eq!(
        chunks,
        vec![
            (0, 16, false),
            (16, 16, false),
            (32, 16, false),
            (48, 2, true),
            (50, 1, true)
        ]
    );
    assert_eq!(s.kv().num_free_blocks(), 64);
}

#[test]
fn fcfs_admits_in_arrival_order_under_max_num_seqs() {
    let mut s = Scheduler::new(config(64, 4, 100, 2), Box::new(Fcfs));
    for id in ["a", "b", "c"] {
        s.add_request(request(id, vec![1, 2, 3], 3, vec![]))
            .unwrap();
    }
    let out = s.schedule();
    let ids: Vec<&str> = out
        .scheduled
        .iter()
        .map(|r| r.request_id.as_str())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(s.num_waiting(), 1);
    let mut runner = FakeRunner::new(64, 4);
    let mut order = Vec::new();
    let mut out = out;
    while !out.is_empty() {
        let sampled = runner.execute(&out);
        for o in s.update_from_output(&out, &sampled) {
            if o.finished.is_some() {
                order.push(o.request_id);
            }
        }
        out = s.schedule();
        assert!(out.scheduled.len() <= 2);
    }
    assert_eq!(order, ["a", "b", "c"]);
}

#[test]
fn preemption_frees_the_newest_and_it_still_completes() {
    // 4 blocks of 2 tokens: a and b both fit at first, then decode needs more than the pool.
    let mut s = Scheduler::new(config(4, 2, 64, 4), Box::new(Fcfs));
    s.add_request(request("a", vec![1, 2, 3], 4, vec![]))
        .unwrap();
    s.add_request(request("b", vec![4, 5, 6], 4, vec![]))
        .unwrap();
    let mut runner = FakeRunner::new(4, 2);
    let mut got: HashMap<String, Vec<u32>> = HashMap::new();
    let mut preempted = Vec::new();
    for _ in 0..100 {
        let out = s.schedule();
        check_invariants(&s, &out);
        preempted.extend(out.preempted_req_ids.clone());
        if out.is_empty() {
            break;
        }
        let sampled = runner.execute(&out);
        for o in s.update_from_output(&out, &sampled) {
            got.entry(o.request_id).or_default().extend(o.new_token_ids);
        }
    }
    assert_eq!(preempted.first().map(String::as_str), Some("b"));
    assert!(!preempted.contains(&"a".to_string()));
    assert_eq!(got["a"], reference(&[1, 2, 3], 4, &[], 256));
    assert_eq!(got["b"], reference(&[4, 5, 6], 4, &[], 256));
    assert_eq!(s.kv().num_free_blocks(), 4);
    assert!(s.num_preemptions_total() >= 1);
}

#[test]
fn finishes_on_stop_token_and_max_model_len() {
    let mut cfg = config(64, 4, 64, 4);
    cfg.max_model_len = 6;
    let mut s = Scheduler::new(cfg, Box::new(Fcfs));
    let prompt = vec![1, 2, 3, 4];
    let first = next_token(&prompt);
    s.add_request(request("stop", prompt.clone(), 10, vec![first]))
        .unwrap();
    s.add_request(request("len", vec![9, 9, 9, 9], 10, vec![]))
        .unwrap();
    let mut runner = FakeRunner::new(64, 4);
    let mut reasons = HashMap::new();
    while s.has_requests() {
        let out = s.schedule();
        let sampled = runner.execute(&out);
        for o in s.update_from_output(&out, &sampled) {
            if let Some(r) = o.finish_reason {
                reasons.insert(
                    o.request_id.clone(),
                    (r, o.finished.unwrap().num_output_tokens()),
                );
            }
        }
    }
    assert_eq!(reasons["stop"], (crate::core::FinishReason::Stop, 1));
    assert_eq!(reasons["len"], (crate::core::FinishReason::Length, 2));
}

#[test]
fn refuses_requests_that_can_never_run() {
    let mut s = Scheduler::new(config(4, 4, 64, 4), Box::new(Fcfs));
    assert!(matches!(
        s.add_request(request("a", vec![1; 300], 1, vec![])),
        Err(SchedError::TooLong { .. })
    ));
    assert!(matches!(
        s.add_request(request("b", vec![1; 10], 20, vec![])),
        Err(SchedError::ExceedsKvCapacity { .. })
    ));
    assert!(matches!(
        s.add_request(request("c", vec![], 1, vec![])),
        Err(SchedError::EmptyPrompt { .. })
    ));
    s.add_request(request("d", vec![1; 10], 7, vec![])).unwrap();
    assert!(matches!(
        s.add_request(request("d", vec![1; 10], 7, vec![])),
        Err(SchedError::DuplicateRequest(_))
    ));
    // abort of a waiting request frees nothing and removes it
    assert_eq!(
        s.finish_requests(&["d".into()], RequestStatus::FinishedAborted)
            .len(),
        1
    );
    assert!(!s.has_requests());
    let _ = KvRequest::num_computed_tokens(&request("e", vec![1], 1, vec![]));
}
