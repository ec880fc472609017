//! Policy tests against the fake runner: priority order and victims, fair time slicing with
//! swap, static batches, adaptive caps, and no leaked GPU/CPU blocks under random aborts.

use super::policy::{policy_from_name, Adaptive, Fair, Priority, SchedulingPolicy, StepStats};
use super::tests::{abort_random, check_invariants, config, reference, request, step, FakeRunner};
use super::*;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

fn with_priority(mut r: Request, p: i32) -> Request {
    r.priority = p;
    r
}

/// Runs until idle; returns the tokens of each request and the per-step generating sets.
fn drain(
    s: &mut Scheduler,
    runner: &mut FakeRunner,
    got: &mut HashMap<String, Vec<u32>>,
) -> Vec<Vec<String>> {
    let mut steps = Vec::new();
    for _ in 0..100_000 {
        if !s.has_requests() {
            break;
        }
        let mut gen = Vec::new();
        for o in step(s, runner).1 {
            gen.push(o.request_id.clone());
            got.entry(o.request_id).or_default().extend(o.new_token_ids);
        }
        steps.push(gen);
    }
    assert!(!s.has_requests(), "did not drain");
    steps
}

#[test]
fn priority_admits_lower_value_first_with_arrival_ties() {
    let mut s = Scheduler::new(config(64, 4, 100, 1), Box::new(Priority));
    let t0 = Instant::now();
    for (id, p, dt) in [("c", 5, 0), ("a2", 1, 2), ("a1", 1, 1), ("z", -3, 3)] {
        let mut r = with_priority(request(id, vec![1, 2, 3], 2, vec![]), p);
        r.arrival_time = t0 + Duration::from_millis(dt);
        s.add_request(r).unwrap();
    }
    let mut runner = FakeRunner::new(64, 4);
    let mut order = Vec::new();
    while s.has_requests() {
        let out = s.schedule();
        for sr in &out.scheduled {
            if sr.num_computed_tokens == 0 {
                order.push(sr.request_id.clone());
            }
        }
        let sampled = runner.execute(&out);
        s.update_from_output(&out, &sampled);
    }
    assert_eq!(order, ["z", "a1", "a2", "c"]);
}

#[test]
fn priority_preempts_the_lowest_priority_not_the_newest() {
    // 4 blocks of 2 tokens; "low" arrives first, "high" second: FCFS would preempt "high".
    let mut s = Scheduler::new(config(4, 2, 64, 4), Box::new(Priority));
    let t0 = Instant::now();
    let mut low = with_priority(request("low", vec![1, 2, 3], 4, vec![]), 9);
    low.arrival_time = t0;
    let mut high = with_priority(request("high", vec![4, 5, 6], 4, vec![]), 0);
    high.arrival_time = t0 + Duration::from_millis(1);
    s.add_request(low).unwrap();
    s.add_request(high).unwrap();
    let mut runner = FakeRunner::new(4, 2);
    let mut got = HashMap::new();
    let mut preempted = Vec::new();
    while s.has_requests() {
        let out = s.schedule();
        check_invariants(&s, &out);
        preempted.extend(out.preempted_req_ids.clone());
        let sampled = runner.execute(&out);
        for o in s.update_from_output(&out, &sampled) {
            got.entry(o.request_id)
                .or_insert_with(Vec::new)
                .extend(o.new_token_ids);
        }
    }
    assert_eq!(preempted.first().map(String::as_str), Some("low"));
    assert!(!preempted.contains(&"high".to_string()));
    assert_eq!(got["high"], reference(&[4, 5, 6], 4, &[], 256));
    assert_eq!(got["low"], reference(&[1, 2, 3], 4, &[], 256));
}

/// Longest run of steps a request went without a token while others generated, from step 0.
fn max_starvation(steps: &[Vec<String>], ids: &[String]) -> usize {
    ids.iter()
        .map(|id| {
            let mut last = 0usize;
            let mut worst = 0usize;
            let mut finished_at = steps.len();
            for (i, g) in steps.iter().enumerate() {
                if g.contains(id) {
                    worst = worst.max(i - last);
                    last = i;
                    finished_at = i;
                }
            }
            let _ = finished_at;
            worst
        })
        .max()
        .unwrap_or(0)
}

fn run_fair_like(policy: Box<dyn SchedulingPolicy>, cpu_blocks: usize) -> (usize, Scheduler) {
    run_fair_like_on(policy, 24, cpu_blocks)
}

fn run_fair_like_on(
    policy: Box<dyn SchedulingPolicy>,
    gpu_blocks: usize,
    cpu_blocks: usize,
) -> (usize, Scheduler) {
    // 8 requests, 2 at a time: each needs ceil((4 + 40) / 4) = 11 blocks (24 blocks: pressure).
    let mut s =
        Scheduler::new(config(gpu_blocks, 4, 64, 2), policy).with_num_cpu_blocks(cpu_blocks);
    let mut runner = FakeRunner::new(gpu_blocks, 4);
    let mut ids = Vec::new();
    let mut expected = HashMap::new();
    for i in 0..8u32 {
        let id = format!("r{i}");
        let prompt = vec![i, i + 1, i + 2, i + 3];
        expected.insert(id.clone(), reference(&prompt, 40, &[], 256));
        s.add_request(request(&id, prompt, 40, vec![])).unwrap();
        ids.push(id);
    }
    let mut got = HashMap::new();
    let steps = drain(&mut s, &mut runner, &mut got);
    for id in &ids {
        assert_eq!(got[id], expected[id], "{id} differs from running alone");
    }
    assert_eq!(s.kv().num_free_blocks(), gpu_blocks, "GPU blocks leaked");
    assert_eq!(s.num_free_cpu_blocks(), cpu_blocks, "CPU blocks leaked");
    (max_starvation(&steps, &ids), s)
}

#[test]
fn fair_bounds_starvation_and_swaps_instead_of_recomputing() {
    let (fair_gap, s) = run_fair_like(Box::new(Fair::new(4)), 64);
    let c = s.swap_counts();
    assert!(c.swaps_out > 0 && c.swaps_in == c.swaps_out, "{c:?}");
    assert_eq!(c.blocks_out, c.blocks_in);
    // A round gives each of 8 requests a quantum of 4 tokens, 2 at a time: 16 steps.
    assert!(
        fair_gap <= 24,
        "fair: a request starved for {fair_gap} steps"
    );
    let (fcfs_gap, s) = run_fair_like(policy_from_name("fcfs").unwrap(), 64);
    assert_eq!(s.swap_counts().swaps_out, 0);
    assert!(
        fcfs_gap > 100,
        "fcfs makes the last request wait: {fcfs_gap}"
    );
}

#[test]
fn fair_keeps_kv_resident_when_blocks_are_plentiful() {
    // 8 x 11 blocks fit in 100: requests yield their turn (max-num-seqs 2) but keep their KV.
    let (gap, s) = run_fair_like_on(Box::new(Fair::new(4)), 100, 64);
    assert!(gap <= 24, "fair: a request starved for {gap} steps");
    assert!(s.num_preemptions_total() > 8, "time slicing happened");
    assert_eq!(
        s.swap_counts(),
        SwapCounts::default(),
        "nothing swapped without pressure"
    );
}

#[test]
fn fair_falls_back_to_recompute_when_the_cpu_pool_is_full() {
    let (gap, s) = run_fair_like(Box::new(Fair::new(4)), 2);
    assert!(gap <= 24, "{gap}");
    assert!(s.num_preemptions_total() > s.swap_counts().swaps_out);
    let (_, s) = run_fair_like(Box::new(Fair::new(4)), 0);
    assert_eq!(s.swap_counts().swaps_out, 0);
    assert!(s.num_preemptions_total() > 0);
}

#[test]
fn static_admits_nothing_until_the_batch_is_done() {
    let mut s = Scheduler::new(config(64, 4, 100, 3), policy_from_name("static").unwrap());
    for (i, n) in [2usize, 9, 4, 3, 6].iter().enumerate() {
        s.add_request(request(&format!("r{i}"), vec![1, 2, i as u32], *n, vec![]))
            .unwrap();
    }
    let mut runner = FakeRunner::new(64, 4);
    let mut batches: Vec<Vec<String>> = Vec::new();
    while s.has_requests() {
        let running_before = s.num_running();
        let out = s.schedule();
        let new: Vec<String> = out
            .scheduled
            .iter()
            .filter(|r| r.num_computed_tokens == 0)
            .map(|r| r.request_id.clone())
            .collect();
        if !new.is_empty() {
            assert_eq!(running_before, 0, "admitted {new:?} while a batch ran");
            batches.push(new);
        }
        let sampled = runner.execute(&out);
        s.update_from_output(&out, &sampled);
    }
    assert_eq!(batches, [vec!["r0", "r1", "r2"], vec!["r3", "r4"]]);
}

#[test]
fn adaptive_grows_past_the_sla_and_shrinks_under_kv_pressure() {
    let mut s = Scheduler::new(
        config(256, 4, 1000, 8),
        Box::new(Adaptive::new(Duration::from_millis(50))),
    );
    let old = Instant::now() - Duration::from_secs(5);
    for i in 0..12 {
        let mut r = request(&format!("r{i}"), vec![1, 2, 3], 30, vec![]);
        r.arrival_time = old;
        s.add_request(r).unwrap();
    }
    let mut runner = FakeRunner::new(256, 4);
    let mut most = Vec::new();
    for _ in 0..8 {
        let out = s.schedule();
        most.push(s.num_running());
        let sampled = runner.execute(&out);
        s.update_from_output(&out, &sampled);
    }
    // Starts at 8/4 = 2 and grows by one a step while the queue is past its SLA.
    assert_eq!(most[0], 2);
    assert!(most.windows(2).all(|w| w[1] >= w[0]), "{most:?}");
    assert_eq!(*most.last().unwrap(), 8, "{most:?}");

    let mut a = Adaptive::new(Duration::from_millis(50));
    assert_eq!(a.max_running(16), 4);
    let past_sla = StepStats {
        kv_usage: 0.5,
        oldest_wait: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    a.observe(&past_sla);
    assert_eq!(a.max_running(16), 5);
    a.observe(&StepStats {
        kv_usage: 0.5,
        oldest_wait: Some(Duration::from_millis(10)),
        ..Default::default()
    });
    assert_eq!(a.max_running(16), 5, "within the SLA: unchanged");
    a.observe(&StepStats {
        kv_usage: 0.92,
        ..past_sla
    });
    assert_eq!(a.max_running(16), 5, "KV between 0.9 and 0.95: unchanged");
    a.observe(&StepStats {
        kv_usage: 0.97,
        ..past_sla
    });
    assert_eq!(a.max_running(16), 4, "KV above 0.95 shrinks");
    for _ in 0..10 {
        a.observe(&StepStats {
            num_preempted: 1,
            ..past_sla
        });
    }
    assert_eq!(a.max_running(16), 1, "preemptions shrink down to 1");
}

fn random_aborts(name: &str, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = Scheduler::new(config(24, 4, 32, 6), policy_from_name(name).unwrap())
        .with_num_cpu_blocks(12);
    let mut runner = FakeRunner::new(24, 4);
    let mut expected = HashMap::new();
    let mut got: HashMap<String, Vec<u32>> = HashMap::new();
    let mut aborted = HashSet::new();
    for n in 0..50_000 {
        if n < 1200 && rng.gen_bool(0.08) {
            let id = format!("r{n}");
            let prompt: Vec<u32> = (0..rng.gen_range(1..30))
                .map(|_| rng.gen_range(0..50))
                .collect();
            let max_tokens = rng.gen_range(1..30);
            expected.insert(id.clone(), reference(&prompt, max_tokens, &[], 256));
            let r = with_priority(
                request(&id, prompt, max_tokens, vec![]),
                rng.gen_range(0..4),
            );
            s.add_request(r).unwrap();
        }
        if rng.gen_bool(0.03) {
            aborted.extend(abort_random(&mut s, &mut rng));
        }
        for o in step(&mut s, &mut runner).1 {
            got.entry(o.request_id).or_default().extend(o.new_token_ids);
        }
        if n >= 1200 && !s.has_requests() {
            break;
        }
    }
    assert!(!s.has_requests(), "{name}: requests left");
    assert_eq!(s.kv().num_free_blocks(), 24, "{name}: GPU blocks leaked");
    assert_eq!(s.num_free_cpu_blocks(), 12, "{name}: CPU blocks leaked");
    for (id, exp) in &expected {
        if !aborted.contains(id) {
            assert_eq!(
                got.get(id),
                Some(exp),
                "{name}: {id} differs from running alone"
            );
        }
    }
}

#[test]
fn no_leaked_blocks_after_random_aborts_under_every_policy() {
    for name in ["fcfs", "priority", "fair", "static", "adaptive"] {
        for seed in 0..3 {
            random_aborts(name, seed);
        }
    }
}

#[test]
fn static_forms_the_whole_batch_even_when_prompts_exceed_the_step_budget() {
    // Budget 8 tokens a step, prompts of 6: the batch of 3 forms in the first step anyway and
    // its prefills run chunked over the next steps; the 4th request waits for the whole batch.
    let mut s = Scheduler::new(config(64, 4, 8, 3), policy_from_name("static").unwrap());
    let mut expected = HashMap::new();
    for i in 0..4u32 {
        let prompt: Vec<u32> = (0..6).map(|t| t * 3 + i).collect();
        expected.insert(format!("r{i}"), reference(&prompt, 5, &[], 256));
        s.add_request(request(&format!("r{i}"), prompt, 5, vec![]))
            .unwrap();
    }
    let mut runner = FakeRunner::new(64, 4);
    let mut got: HashMap<String, Vec<u32>> = HashMap::new();
    let mut step = 0;
    while s.has_requests() {
        let out = s.schedule();
        check_invariants(&s, &out);
        if step == 0 {
            assert_eq!(s.num_running(), 3, "the batch forms in one step");
            assert!(out.total_num_scheduled_tokens <= 8);
        }
        if s.running().iter().any(|r| r.request_id == "r3") {
            assert!(
                s.running().iter().all(|r| r.request_id == "r3"),
                "r3 joined a running batch"
            );
        }
        let sampled = runner.execute(&out);
        for o in s.update_from_output(&out, &sampled) {
            got.entry(o.request_id).or_default().extend(o.new_token_ids);
        }
        step += 1;
        assert!(step < 200, "static batching did not finish");
    }
    assert_eq!(got, expected);
}

/// A burst of 12 prompts (20..64 tokens), 4 running at most, 48 tokens a step: runs `fair` to
/// the end and returns (decode-only steps before the last first token, steps until it).
fn fair_burst(first_token_quantum: usize) -> (usize, usize) {
    let policy = Fair::new(8).with_first_token_quantum(first_token_quantum);
    let mut s = Scheduler::new(config(400, 4, 48, 4), Box::new(policy)).with_num_cpu_blocks(64);
    let mut runner = FakeRunner::new(400, 4);
    let mut expected = HashMap::new();
    for i in 0..12u32 {
        let prompt: Vec<u32> = (0..20 + 4 * i).map(|t| (t * 7 + i) % 50).collect();
        expected.insert(format!("r{i}"), reference(&prompt, 24, &[], 256));
        s.add_request(request(&format!("r{i}"), prompt, 24, vec![]))
            .unwrap();
    }
    let mut got: HashMap<String, Vec<u32>> = HashMap::new();
    let (mut decode_only, mut steps) = (0, 0);
    while s.has_requests() {
        let out = s.schedule();
        check_invariants(&s, &out);
        let first_tokens_left = got.len() < 12;
        if first_tokens_left {
            steps += 1;
            if out.scheduled.iter().all(|r| r.num_output_tokens > 0) {
                decode_only += 1;
            }
        }
        let sampled = runner.execute(&out);
        for o in s.update_from_output(&out, &sampled) {
            got.entry(o.request_id).or_default().extend(o.new_token_ids);
        }
        assert!(steps < 1000, "did not finish");
    }
    assert_eq!(got, expected, "time slicing changed a greedy output");
    assert_eq!(s.kv().num_free_blocks(), 400);
    (decode_only, steps)
}

#[test]
fn fair_first_token_quantum_prefills_a_burst_back_to_back() {
    // 12 prompts of 20..64 tokens: 504 prompt tokens need at least 11 steps of 48.
    let (decode_only, steps) = fair_burst(1);
    assert_eq!(decode_only, 0, "a decode-only step while prompts waited");
    assert_eq!(
        steps,
        504usize.div_ceil(48),
        "steps to the last first token"
    );
    // With the plain quantum (8) running requests keep generating while prompts wait.
    let (decode_only, later) = fair_burst(8);
    assert!(
        decode_only > 0 && later > steps,
        "{decode_only} decode-only, {later} steps"
    );
}
