//! Scheduling policies end to end on real models (CPU): `fair` swaps KV blocks to the CPU pool
//! and back without changing any greedy token; the prefix cache resets for cold runs.

use crate::common::{collect, greedy, smollm2_path, spawn_cpu_engine, tiny_model_dir, wait_idle};
use engine::core::{EngineHandle, EngineRequest, RequestEvent};
use engine::sched::policy::{policy_from_name, Fair};
use engine::sched::SchedulerConfig;
use engine::weights::LoadFormat;

fn request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> EngineRequest {
    crate::common::request(id, prompt, greedy(max_tokens))
}
use std::path::Path;
use std::time::Duration;

fn spawn(
    path: &Path,
    format: LoadFormat,
    policy: Box<dyn engine::sched::policy::SchedulingPolicy>,
    max_num_seqs: usize,
    enable_prefix_caching: bool,
    num_gpu_blocks: usize,
) -> EngineHandle {
    let cfg = SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: 256,
        max_model_len: 256,
        block_size: 16,
        num_gpu_blocks,
        enable_prefix_caching,
    };
    spawn_cpu_engine(path, format, cfg, policy, 0.05)
}

/// 6 concurrent greedy requests under `fair` with quantum 2 and 2 running at a time: the same
/// tokens as each alone, preempted time is reported. With 10 GPU blocks the yielded requests'
/// KV cannot all stay resident (6 x up to 4 blocks): swaps really happen. With 64 they stay on
/// the GPU: time slicing without any swap.
fn fair_swap_equals_alone(path: &Path, format: LoadFormat, vocab: u32, out_len: usize) {
    for (blocks, expect_swaps) in [(10, true), (64, false)] {
        fair_run_equals_alone(path, format, vocab, out_len, blocks, expect_swaps);
    }
}

fn fair_run_equals_alone(
    path: &Path,
    format: LoadFormat,
    vocab: u32,
    out_len: usize,
    gpu_blocks: usize,
    expect_swaps: bool,
) {
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| {
            (0..(4 + i * 7))
                .map(|t| (t * 31 + i * 17 + 3) % vocab)
                .collect()
        })
        .collect();
    let solo = spawn(
        path,
        format,
        policy_from_name("fcfs").unwrap(),
        8,
        false,
        64,
    );
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| collect(solo.add_request(request(&format!("a{i}"), p.clone(), out_len))).0)
        .collect();
    solo.shutdown();

    let h = spawn(path, format, Box::new(Fair::new(2)), 2, false, gpu_blocks);
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| h.add_request(request(&format!("f{i}"), p.clone(), out_len)))
        .collect();
    let mut preempted_s = 0.0;
    for (i, rx) in rxs.into_iter().enumerate() {
        let (toks, fin) = collect(rx);
        match fin {
            RequestEvent::Finished { timings, .. } => {
                assert!(
                    timings.prefill_s > 0.0 && timings.decode_s > 0.0,
                    "{timings:?}"
                );
                preempted_s += timings.preempted_s;
            }
            other => panic!("request {i}: {other:?}"),
        }
        assert_eq!(
            toks, alone[i],
            "request {i} differs under fair+swap vs alone"
        );
    }
    wait_idle(&h, Duration::from_secs(20));
    let (out, into, bytes) = h.metrics().swaps();
    if expect_swaps {
        assert!(out > 0, "no swap happened with {gpu_blocks} blocks");
        assert!(bytes > 0);
    } else {
        assert_eq!(
            (out, bytes),
            (0, 0),
            "swapped although {gpu_blocks} blocks hold everything"
        );
    }
    assert_eq!(out, into);
    assert!(h.metrics().num_preemptions() > 0, "time slicing happened");
    assert!(
        preempted_s > 0.0,
        "preempted requests report preempted time"
    );
    let text = h.metrics().render_prometheus();
    assert!(text.contains("vllm:num_swaps_total{engine=\"0\",model_name=\"m\",direction=\"out\"}"));
    assert!(text.contains("engine_request_preempted_time_seconds_count"));
    h.shutdown();
}

#[test]
fn dummy_model_fair_swap_equals_alone() {
    let dir = tiny_model_dir("policies");
    fair_swap_equals_alone(&dir, LoadFormat::Dummy, 256, 12);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn smollm2_fair_swap_equals_alone() {
    let Some(path) = smollm2_path() else {
        eprintln!("SKIPPED smollm2_fair_swap_equals_alone: set SMOLLM2_GGUF or run scripts/fetch-model.sh");
        return;
    };
    fair_swap_equals_alone(&path, LoadFormat::Gguf, 49152, 8);
}

#[test]
fn reset_prefix_cache_makes_the_next_run_cold() {
    let dir = tiny_model_dir("policies");
    let h = spawn(
        &dir,
        LoadFormat::Dummy,
        policy_from_name("fcfs").unwrap(),
        4,
        true,
        64,
    );
    let prompt: Vec<u32> = (0..40).map(|t| (t * 7 + 5) % 256).collect();
    let cached = |id: &str| match collect(h.add_request(request(id, prompt.clone(), 2))).1 {
        RequestEvent::Finished { cached_tokens, .. } => cached_tokens,
        other => panic!("{other:?}"),
    };
    assert_eq!(cached("x0"), 0);
    wait_idle(&h, Duration::from_secs(20));
    assert_eq!(cached("x1"), 32, "two full blocks hit");
    wait_idle(&h, Duration::from_secs(20));
    assert!(h.reset_prefix_cache());
    assert_eq!(cached("x2"), 0, "cold after the reset");
    h.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
