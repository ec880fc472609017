//! Tensor parallelism on the GPU (feature `cuda`, run on the GPU machine): two ranks of the tiny
//! Qwen2 model sharing one GPU (host-memory collective) against one rank, and NCCL's collectives
//! on a one-GPU group (the most one GPU allows; two-GPU runs need a machine with two).

use super::cuda_model::{rel_l2, tiny_qwen2_dir, two_steps, BLOCK_SIZE};
use candle_core::{DType, Device, Tensor};
use engine::model::nccl::NcclCollective;
use engine::model::tp::{Collective, CpuCollective};
use engine::model::KvCache;
use engine::weights::{load_model, load_model_rank, LoadFormat};
use std::sync::Arc;

fn cuda() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test module runs on the GPU machine)")
}

#[test]
fn cuda_tp2_ranks_on_one_gpu_match_one_rank() {
    let dir = tiny_qwen2_dir(11);
    let gpu = cuda();
    let one = load_model(&dir, LoadFormat::Safetensors, DType::BF16, &gpu, 0).unwrap();
    let cfg = one.config().clone();
    let steps = two_steps(cfg.vocab_size as u32);
    let mut cache = KvCache::new(&cfg, 8, BLOCK_SIZE, DType::BF16, &gpu).unwrap();
    let want: Vec<Tensor> = steps
        .iter()
        .map(|b| one.forward(b, &mut cache).unwrap())
        .collect();
    let got: Vec<Vec<Tensor>> = std::thread::scope(|s| {
        let handles: Vec<_> = CpuCollective::group(2)
            .into_iter()
            .map(|c| {
                let (dir, gpu, steps) = (&dir, gpu.clone(), &steps);
                s.spawn(move || {
                    let tp: Arc<dyn Collective> = Arc::new(c);
                    let m = load_model_rank(dir, LoadFormat::Safetensors, DType::BF16, &gpu, 0, tp)
                        .unwrap();
                    assert_eq!(m.config().num_key_value_heads, 1, "KV heads split");
                    let mut cache =
                        KvCache::new(m.config(), 8, BLOCK_SIZE, DType::BF16, &gpu).unwrap();
                    steps
                        .iter()
                        .map(|b| m.forward(b, &mut cache).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (step, w) in want.iter().enumerate() {
        for (rank, g) in got.iter().enumerate() {
            let err = rel_l2(&g[step], w);
            eprintln!("step {step}, rank {rank}: TP=2 vs TP=1 bf16 logits, relative L2 {err:.2e}");
            assert!(err < 2e-2, "step {step} rank {rank}: relative L2 {err:.3e}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cuda_nccl_one_rank_group_reduces_and_gathers() {
    let gpu = cuda();
    let group = NcclCollective::group(std::slice::from_ref(&gpu)).unwrap_or_else(|e| panic!("{e}"));
    let c = &group[0];
    assert_eq!((c.rank(), c.world_size()), (0, 1));
    for dtype in [DType::F32, DType::BF16] {
        let t = Tensor::arange(0f32, 24.0, &gpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let sum = c.all_reduce_sum(&t).unwrap();
        let gathered = c.all_gather_last_dim(&t).unwrap();
        assert_eq!(sum.dims(), t.dims());
        assert_eq!(gathered.dims(), t.dims());
        for out in [sum, gathered] {
            let diff = (out.to_dtype(DType::F32).unwrap() - t.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{dtype:?}");
        }
    }
}
