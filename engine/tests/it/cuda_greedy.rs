//! Greedy sampling on the GPU (`engine/kernels/argmax.cu`) against the host's
//! `sampling::argmax`, id for id: ties (in one thread's load, across threads and warps), NaN,
//! -inf, rows with no value above -inf, rows not 16-byte aligned; and the server's runner, greedy
//! on SmolLM2 with decode steps from CUDA graphs, against the reference answer (run on a GPU
//! machine; needs the `cuda_model` module).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use engine::core::ModelExecutor;
use engine::model::cuda_graph::{graph_counts, last_capture_error, set_cuda_graphs_on_this_thread};
use engine::model::greedy::{argmax_rows, greedy_tokens, set_argmax_kernel_on_this_thread};
use engine::model::KvCache;
use engine::runner::ModelRunner;
use engine::sampling::{self, SamplingParams};
use engine::sched::{ScheduledRequest, SchedulerOutput};
use engine::weights::{load_model, LoadFormat};

use crate::cuda_model::{smollm2_path, ANSWER_37, BLOCK_SIZE, TEMPLATE_IDS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `n` rows of `vocab` logits; every row of each group of eight holds one of the hard cases.
fn planted_rows(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<f32> {
    let mut all = Vec::with_capacity(n * vocab);
    for r in 0..n {
        let mut row: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-8.0f32..8.0)).collect();
        let last = vocab - 1;
        match r % 8 {
            // The same maximum far apart (other threads and warps) and beside each other in one
            // 16-byte load: the lowest index must win.
            1 => {
                for i in [last, vocab / 2 + 3, 4096 + 2, 9, 8] {
                    if i < vocab {
                        row[i] = 20.0;
                    }
                }
            }
            // NaN first, NaN right after the maximum, NaN beside it.
            2 => {
                row[0] = f32::NAN;
                row[vocab / 3] = 30.0;
                for i in [vocab / 3 + 1, vocab / 3 + 4, last] {
                    if i < vocab && i != vocab / 3 {
                        row[i] = f32::NAN;
                    }
                }
            }
            // -inf and NaN only: 0.
            3 => row.iter_mut().enumerate().for_each(|(i, v)| {
                *v = if i % 3 == 0 {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                }
            }),
            // All NaN: 0.
            4 => row.fill(f32::NAN),
            // -inf everywhere but the last element.
            5 => {
                row.fill(f32::NEG_INFINITY);
                row[last] = -1e30;
            }
            // One value everywhere: 0.
            6 => row.fill(1.5),
            // +inf twice: the first.
            7 => {
                row[last] = f32::INFINITY;
                row[last / 2] = f32::INFINITY;
            }
            _ => {}
        }
        all.extend(row);
    }
    all
}

fn host_ids(all: &[f32], vocab: usize) -> Vec<u32> {
    all.chunks(vocab).map(sampling::argmax).collect()
}

#[test]
fn argmax_kernel_matches_host_argmax() {
    let dev = Device::new_cuda(0).expect("this test needs a CUDA device");
    let mut rng = StdRng::seed_from_u64(11);
    set_argmax_kernel_on_this_thread(Some(true));
    // Qwen2.5's and SmolLM2's vocabularies, one past a float4 multiple, more rows than a decode
    // graph's largest bucket, one element a row.
    for (n, vocab) in [
        (1, 151_936),
        (9, 151_936),
        (8, 49_152),
        (8, 1_007),
        (300, 4_096),
        (8, 1),
        (3, 33),
    ] {
        let all = planted_rows(&mut rng, n, vocab);
        let want = host_ids(&all, vocab);
        let logits = Tensor::from_slice(&all, (n, vocab), &dev).unwrap();
        let got: Vec<u32> = argmax_rows(&logits).unwrap().to_vec1().unwrap();
        assert_eq!(got, want, "argmax_rows, {n} x {vocab}");
        assert_eq!(
            greedy_tokens(&logits).unwrap(),
            want,
            "greedy_tokens, {n} x {vocab}"
        );
        println!("{n} x {vocab}: {} ids as on the host", got.len());
    }
    // Rows that start 4 bytes past a 16-byte boundary take the scalar loads.
    let (n, vocab) = (8, 4_096);
    let all = planted_rows(&mut rng, n, vocab);
    let mut shifted = vec![0f32];
    shifted.extend(&all);
    let logits = Tensor::from_slice(&shifted, n * vocab + 1, &dev)
        .unwrap()
        .narrow(0, 1, n * vocab)
        .unwrap()
        .reshape((n, vocab))
        .unwrap();
    let got: Vec<u32> = argmax_rows(&logits).unwrap().to_vec1().unwrap();
    assert_eq!(got, host_ids(&all, vocab), "rows off 16-byte alignment");
    set_argmax_kernel_on_this_thread(None);
}

/// The runner the server uses, greedy on SmolLM2 (f32, whose GPU logits match the CPU's to ~1e-6)
/// with two copies of the France prompt in one batch and the decode steps replayed from CUDA
/// graphs: both answers are the reference one, with the argmax kernel and with candle's argmax.
#[test]
fn runner_greedy_smollm2_gives_the_reference_answer() {
    let Some(path) = smollm2_path() else { return };
    let gpu = Device::new_cuda(0).expect("this test needs a CUDA device");
    engine::gpu_memory::set_event_tracking(&gpu, false).unwrap();
    set_cuda_graphs_on_this_thread(Some(true));
    let (replays_before, _) = graph_counts();
    for kernel in [true, false] {
        set_argmax_kernel_on_this_thread(Some(kernel));
        let model = load_model(&path, LoadFormat::Auto, DType::F32, &gpu, 0).unwrap();
        let cache = KvCache::new(model.config(), 16, BLOCK_SIZE, DType::F32, &gpu).unwrap();
        let mut runner = ModelRunner::new(model, cache);
        // Never block 0, which the graphs' padding rows read.
        let tables = [vec![3u32, 1, 6, 9], vec![2, 5, 4, 8]];
        let mut known = [TEMPLATE_IDS.to_vec(), TEMPLATE_IDS.to_vec()];
        let mut computed = [0usize; 2];
        let mut answers: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        while answers[0].len() < ANSWER_37.len() {
            let scheduled: Vec<ScheduledRequest> = (0..2)
                .map(|s| ScheduledRequest {
                    request_id: format!("france-{s}"),
                    token_ids: known[s][computed[s]..].to_vec(),
                    num_computed_tokens: computed[s],
                    block_table: tables[s].clone(),
                    sample: true,
                    sampling: SamplingParams {
                        temperature: 0.0,
                        ..SamplingParams::default()
                    },
                    num_output_tokens: answers[s].len(),
                })
                .collect();
            let step = SchedulerOutput {
                total_num_scheduled_tokens: scheduled.iter().map(|r| r.token_ids.len()).sum(),
                scheduled,
                ..SchedulerOutput::default()
            };
            let ids = runner.execute(&step).unwrap();
            for s in 0..2 {
                computed[s] = known[s].len();
                let id = ids[s].expect("every request samples");
                answers[s].push(id);
                known[s].push(id);
            }
        }
        println!("argmax kernel {kernel}: runner answers {answers:?}");
        assert_eq!(
            answers,
            [ANSWER_37.to_vec(), ANSWER_37.to_vec()],
            "runner greedy answer differs from the reference (argmax kernel {kernel})"
        );
    }
    let (replays, failed) = graph_counts();
    assert_eq!(
        failed,
        0,
        "CUDA graph capture failed: {:?}",
        last_capture_error()
    );
    // Seven decode steps of each runner.
    assert!(
        replays - replays_before >= 14,
        "{} replays",
        replays - replays_before
    );
    set_argmax_kernel_on_this_thread(None);
    set_cuda_graphs_on_this_thread(None);
}
