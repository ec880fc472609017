//! The engine core end to end: fake executors for the loop's contract, a tiny dummy model and the
//! real SmolLM2 for batched-equals-alone under preemption.

use crate::common::{
    collect, greedy, request, smollm2_path, spawn_cpu_engine, tiny_model_dir, wait_idle,
};
use engine::core::{
    EngineCore, EngineHandle, ExecuteError, FinishReason, ModelExecutor, RequestEvent,
};
use engine::metrics::EngineMetrics;
use engine::sched::policy::Fcfs;
use engine::sched::{SchedulerConfig, SchedulerOutput};
use engine::weights::LoadFormat;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn sched_config(blocks: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_model_len: 256,
        block_size,
        num_gpu_blocks: blocks,
        enable_prefix_caching: false,
    }
}

/// Next token = last token of the chunk + 1 (mod 1000); fails a step holding token 999.
struct CountingExecutor {
    delay: Duration,
}

impl ModelExecutor for CountingExecutor {
    fn execute(&mut self, out: &SchedulerOutput) -> Result<Vec<Option<u32>>, ExecuteError> {
        std::thread::sleep(self.delay);
        if out.scheduled.iter().any(|s| s.token_ids.contains(&999)) {
            return Err(ExecuteError("poisoned token 999".into()));
        }
        Ok(out
            .scheduled
            .iter()
            .map(|s| s.sample.then(|| (s.token_ids.last().unwrap() + 1) % 1000))
            .collect())
    }
}

fn spawn_fake(blocks: usize, delay_ms: u64) -> EngineHandle {
    let (h, _join) = EngineCore::spawn(
        sched_config(blocks, 4),
        Box::new(Fcfs),
        Box::new(CountingExecutor {
            delay: Duration::from_millis(delay_ms),
        }),
        Arc::new(EngineMetrics::new("fake")),
    )
    .unwrap();
    h
}

#[test]
fn core_streams_tokens_and_finishes_under_preemption() {
    let h = spawn_fake(12, 0);
    let rxs: Vec<_> = (0..8u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..(3 + i * 3)).map(|t| t + 10 * i).collect();
            let mut sp = greedy(5 + i as usize);
            if i == 7 {
                sp.stop_token_ids = vec![prompt.last().unwrap() + 3];
            }
            let rx = h.add_request(request(&format!("r{i}"), prompt.clone(), sp.clone()));
            (prompt, sp, rx)
        })
        .collect();
    for (prompt, sp, rx) in rxs {
        let (toks, fin) = collect(rx);
        let last = *prompt.last().unwrap();
        let n = if sp.stop_token_ids.is_empty() {
            sp.max_tokens
        } else {
            3
        };
        let expected: Vec<u32> = (1..=n as u32).map(|k| last + k).collect();
        assert_eq!(toks, expected);
        match fin {
            RequestEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                let want = if sp.stop_token_ids.is_empty() {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                assert_eq!(reason, want);
                assert_eq!(prompt_tokens, prompt.len());
                assert_eq!(completion_tokens, n);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    wait_idle(&h, Duration::from_secs(10));
    let m = h.metrics();
    assert!(
        m.num_preemptions() > 0,
        "pool of 12 blocks should force preemption"
    );
    assert_eq!(m.requests_finished(FinishReason::Length), 7);
    assert_eq!(m.requests_finished(FinishReason::Stop), 1);
    assert_eq!(m.generation_tokens(), (5..12).sum::<u64>() + 3);
    let text = m.render_prometheus();
    assert!(text.contains("vllm:num_preemptions_total{engine=\"0\",model_name=\"fake\"}"));
    assert!(text.contains("num_gpu_blocks=\"12\""));
}

#[test]
fn abort_disconnect_refusal_and_model_errors() {
    let h = spawn_fake(64, 2);
    // explicit abort
    let rx = h.add_request(request("a", vec![1, 2, 3], greedy(200)));
    std::thread::sleep(Duration::from_millis(20));
    h.abort("a");
    let (toks, fin) = collect(rx);
    assert!(toks.len() < 200);
    assert!(matches!(
        fin,
        RequestEvent::Finished {
            reason: FinishReason::Abort,
            ..
        }
    ));
    // dropped receiver: the request is aborted and its blocks freed
    drop(h.add_request(request("b", vec![1, 2, 3], greedy(200))));
    let t0 = Instant::now();
    while h.metrics().requests_finished(FinishReason::Abort) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "dropped receiver never aborted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_idle(&h, Duration::from_secs(10));
    assert_eq!(h.metrics().requests_finished(FinishReason::Abort), 2);
    // refused up front
    let (_, fin) = collect(h.add_request(request("c", vec![1; 300], greedy(1))));
    assert!(matches!(fin, RequestEvent::Error { message } if message.contains("max_model_len")));
    // a model error fails the step's requests; the loop goes on
    let bad = h.add_request(request("d", vec![5, 999, 6], greedy(3)));
    let (_, fin) = collect(bad);
    assert!(matches!(fin, RequestEvent::Error { message } if message.contains("poisoned")));
    let (toks, _) = collect(h.add_request(request("e", vec![7], greedy(3))));
    assert_eq!(toks, vec![8, 9, 10]);
    wait_idle(&h, Duration::from_secs(10));
}

fn spawn_model(
    path: &std::path::Path,
    format: LoadFormat,
    blocks: usize,
    enable_prefix_caching: bool,
) -> EngineHandle {
    let mut cfg = sched_config(blocks, 16);
    cfg.enable_prefix_caching = enable_prefix_caching;
    spawn_cpu_engine(
        path,
        format,
        cfg,
        Box::new(Fcfs),
        engine::core::DEFAULT_SWAP_SPACE_GIB,
    )
}

/// 8 concurrent greedy requests on a pool small enough to preempt produce exactly the tokens
/// each produces alone; all blocks are free afterwards.
fn batched_equals_alone(path: &std::path::Path, format: LoadFormat, vocab: u32, out_len: usize) {
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| {
            (0..(5 + i * 9))
                .map(|t| (t * 31 + i * 17 + 3) % vocab)
                .collect()
        })
        .collect();
    let alone_engine = spawn_model(path, format, 64, false);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            collect(alone_engine.add_request(request(&format!("a{i}"), p.clone(), greedy(out_len))))
                .0
        })
        .collect();
    alone_engine.shutdown();
    // the longest needs ceil((68 + out_len)/16) blocks; 8 requests need far more than 10
    let h = spawn_model(path, format, 10, false);
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| h.add_request(request(&format!("b{i}"), p.clone(), greedy(out_len))))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let (toks, fin) = collect(rx);
        assert!(matches!(fin, RequestEvent::Finished { .. }), "{fin:?}");
        assert_eq!(toks.len(), out_len);
        assert_eq!(toks, alone[i], "request {i} differs batched vs alone");
    }
    wait_idle(&h, Duration::from_secs(10));
    assert!(h.metrics().num_preemptions() > 0, "expected preemption");
    assert_eq!(h.metrics().kv_cache_usage(), 0.0);
    h.shutdown();
}

#[test]
fn dummy_model_batched_with_preemption_equals_alone() {
    let dir = tiny_model_dir("sched");
    batched_equals_alone(&dir, LoadFormat::Dummy, 256, 12);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn smollm2_batched_with_preemption_equals_alone() {
    let Some(path) = smollm2_path() else {
        eprintln!("SKIPPED smollm2_batched_with_preemption_equals_alone: set SMOLLM2_GGUF or run scripts/fetch-model.sh");
        return;
    };
    batched_equals_alone(&path, LoadFormat::Gguf, 49152, 8);
}

#[test]
fn dummy_model_prefix_caching_equals_no_caching() {
    let dir = tiny_model_dir("sched");
    let shared: Vec<u32> = (0..40).map(|t| (t * 7 + 5) % 256).collect();
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| {
            let mut p = shared.clone();
            p.extend((0..(1 + i * 5)).map(|t| (t * 13 + i) % 256));
            p
        })
        .collect();
    let run = |caching: bool, blocks: usize| {
        let h = spawn_model(&dir, LoadFormat::Dummy, blocks, caching);
        // the first request alone warms the cache, then the rest together
        let first = collect(h.add_request(request("p0", prompts[0].clone(), greedy(6)))).0;
        let rxs: Vec<_> = prompts[1..]
            .iter()
            .enumerate()
            .map(|(i, p)| h.add_request(request(&format!("p{}", i + 1), p.clone(), greedy(6))))
            .collect();
        let mut all = vec![first];
        all.extend(rxs.into_iter().map(|rx| collect(rx).0));
        wait_idle(&h, Duration::from_secs(10));
        let hits = h.metrics().prefix_cache().1;
        h.shutdown();
        (all, hits)
    };
    let (plain, no_hits) = run(false, 64);
    assert_eq!(no_hits, 0);
    let (cached, hits) = run(true, 64);
    assert!(
        hits >= 5 * 32,
        "shared 40-token prefix should hit 2 blocks per request: {hits}"
    );
    assert_eq!(cached, plain);
    // small pool: cached blocks are evicted and requests preempted, tokens still equal
    let (tight, _) = run(true, 10);
    assert_eq!(tight, plain);
    let _ = std::fs::remove_dir_all(dir);
}
