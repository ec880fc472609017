//! Tests of tensor parallelism: simulated TP=N (threads + `CpuCollective`) against TP=1, and sharding.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::*;
use crate::config::Architecture;
use crate::model::{CausalLM, ForwardBatch, KvCache, SeqInput};

const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 16;

fn tiny_config(arch: Architecture, heads: usize, kv_heads: usize, vocab: usize) -> ModelConfig {
    ModelConfig {
        architecture: arch,
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: arch == Architecture::Qwen2,
        bos_token_id: None,
        eos_token_ids: vec![],
        attention_bias: arch == Architecture::Qwen2,
        sliding_window: None,
    }
}

/// Full (unsharded) random weights, drawn on first request and handed out again to every rank.
#[derive(Clone)]
struct FullWeights {
    rng: rand::rngs::StdRng,
    map: HashMap<String, Tensor>,
    frozen: bool,
}

impl FullWeights {
    fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            map: HashMap::new(),
            frozen: false,
        }
    }
    fn frozen(&self) -> Self {
        Self {
            frozen: true,
            ..self.clone()
        }
    }
}

impl WeightSource for FullWeights {
    fn get(&mut self, name: &str, shape: &[usize]) -> std::result::Result<Tensor, LoadError> {
        if let Some(t) = self.map.get(name) {
            assert_eq!(t.dims(), shape, "{name}");
            return Ok(t.clone());
        }
        if self.frozen {
            return Err(LoadError::MissingWeight(name.into()));
        }
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let u: f32 = self.rng.gen_range(-1.0..1.0);
                if norm {
                    1.0 + 0.1 * u
                } else {
                    0.3 * u
                }
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
        self.map.insert(name.into(), t.clone());
        Ok(t)
    }
}

/// Sequence A: 6-token prompt in blocks [3, 7]; sequence B: 3-token prompt in blocks [5, 1].
/// Step 0 prefills both, steps 1 and 2 decode one token each.
fn paged_batches() -> Vec<ForwardBatch> {
    let tokens_a = [1u32, 5, 9, 2, 7, 3, 11, 4];
    let tokens_b = [8u32, 6, 10, 12, 0];
    let tables = [vec![3u32, 7], vec![5u32, 1]];
    let steps = [[(0, 6), (0, 3)], [(6, 1), (3, 1)], [(7, 1), (4, 1)]];
    steps
        .iter()
        .map(|step| {
            let mut b = ForwardBatch::default();
            for (s, &(start, len)) in step.iter().enumerate() {
                let toks: &[u32] = if s == 0 { &tokens_a } else { &tokens_b };
                let ctx = start + len;
                b.seqs.push(SeqInput {
                    query_start: b.token_ids.len(),
                    query_len: len,
                    context_len: ctx,
                    block_table: tables[s][..ctx.div_ceil(BLOCK_SIZE)].to_vec(),
                    compute_logits: true,
                });
                for p in start..ctx {
                    b.token_ids.push(toks[p]);
                    b.positions.push(p as u32);
                    let block = tables[s][p / BLOCK_SIZE] as usize;
                    b.slot_mapping
                        .push((block * BLOCK_SIZE + p % BLOCK_SIZE) as i64);
                }
            }
            b
        })
        .collect()
}

/// forward_full logits of sequence A, then the paged logits of each step (flattened f32).
fn run(m: &LlamaModel) -> Vec<Vec<f32>> {
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = vec![flat(m.forward_full(&[1, 5, 9, 2, 7, 3, 11, 4]).unwrap())];
    let mut cache =
        KvCache::new(m.config(), NUM_BLOCKS, BLOCK_SIZE, DType::F32, &Device::Cpu).unwrap();
    for b in paged_batches() {
        let logits = m.forward(&b, &mut cache).unwrap();
        assert_eq!(logits.dims(), &[b.seqs.len(), m.config().vocab_size]);
        out.push(flat(logits));
    }
    out
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f32 = b.iter().map(|y| y * y).sum();
    (d / n).sqrt()
}

/// TP=1 vs simulated TP=`world` (one thread per rank): every rank's logits match TP=1 within
/// 1e-4 relative L2, and all ranks agree bit for bit.
fn check_tp_matches_single(cfg: &ModelConfig, world: usize) {
    let mut full = FullWeights::new(7);
    let single = LlamaModel::load(cfg, &mut full, DType::F32, &Device::Cpu).unwrap();
    let want = run(&single);
    let ranks: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = CpuCollective::group(world)
            .into_iter()
            .map(|c| {
                let mut src = full.frozen();
                s.spawn(move || {
                    let m =
                        load_rank(cfg, &mut src, DType::F32, &Device::Cpu, Arc::new(c)).unwrap();
                    assert_eq!(
                        m.config().num_attention_heads * world,
                        cfg.num_attention_heads
                    );
                    run(&m)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The logits are far from flat, so a missing all-reduce or a misplaced shard would show.
    let spread = want[0].iter().fold(f32::MIN, |a, b| a.max(*b))
        - want[0].iter().fold(f32::MAX, |a, b| a.min(*b));
    assert!(spread > 1.0, "logit spread {spread}");
    let mut worst = 0f32;
    for (r, got) in ranks.iter().enumerate() {
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = rel_l2(g, w);
            worst = worst.max(err);
            assert!(err < 1e-4, "rank {r} output {i}: relative L2 {err:.2e}");
        }
        assert_eq!(got, &ranks[0], "rank {r} differs from rank 0");
    }
    eprintln!(
        "{:?} TP={world}: worst relative L2 {worst:.2e}",
        cfg.architecture
    );
}

#[test]
fn tp2_matches_tp1_llama_vocab_sharded_lm_head() {
    check_tp_matches_single(&tiny_config(Architecture::Llama, 4, 2, 64), 2);
}

#[test]
fn tp2_matches_tp1_qwen2_bias_tied_embeddings() {
    check_tp_matches_single(&tiny_config(Architecture::Qwen2, 4, 2, 64), 2);
}

#[test]
fn tp2_matches_tp1_phi3_fused_weights() {
    check_tp_matches_single(&tiny_config(Architecture::Phi3, 4, 2, 64), 2);
}

#[test]
fn tp2_matches_tp1_replicated_lm_head_odd_vocab() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        check_tp_matches_single(&tiny_config(arch, 4, 2, 67), 2);
    }
}

#[test]
fn tp4_matches_tp1_llama() {
    check_tp_matches_single(&tiny_config(Architecture::Llama, 8, 4, 64), 4);
}

#[test]
fn rank_config_divides_heads_and_rejects_indivisible_counts() {
    let cfg = tiny_config(Architecture::Llama, 4, 2, 64);
    let r = rank_config(&cfg, 2).unwrap();
    assert_eq!(
        (
            r.num_attention_heads,
            r.num_key_value_heads,
            r.intermediate_size
        ),
        (2, 1, 24)
    );
    assert_eq!((r.hidden_size, r.head_dim, r.vocab_size), (32, 8, 64));
    assert_eq!(rank_config(&cfg, 1).unwrap(), cfg);

    let msg = |cfg: &ModelConfig, w| rank_config(cfg, w).unwrap_err().to_string();
    let m = msg(&cfg, 4);
    assert!(
        m.contains("tensor parallel size 4") && m.contains("num_key_value_heads 2"),
        "{m}"
    );
    let m = msg(&tiny_config(Architecture::Llama, 6, 3, 64), 2);
    assert!(
        m.contains("num_attention_heads 6")
            && m.contains("num_key_value_heads 3")
            && m.contains("tensor parallel size 2"),
        "{m}"
    );
    let mut odd = tiny_config(Architecture::Llama, 4, 4, 64);
    odd.intermediate_size = 50;
    let m = msg(&odd, 4);
    assert!(m.contains("intermediate_size 50"), "{m}");
    assert!(msg(&cfg, 0).contains("at least 1"));
    // load_rank reports the same error instead of building a wrong shard.
    let c = CpuCollective::group(4).remove(0);
    let err = load_rank(
        &cfg,
        &mut FullWeights::new(1),
        DType::F32,
        &Device::Cpu,
        Arc::new(c),
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads 2"), "{err}");
}

/// Rebuild the full tensor from every rank's shard (each part's pieces in rank order).
fn unshard(shards: &[Tensor], split: &Split) -> Tensor {
    let world = shards.len();
    let mut parts = Vec::new();
    let mut offset = 0;
    for &(_, len) in &split.parts {
        let n = len / world;
        let pieces: Vec<Tensor> = shards
            .iter()
            .map(|s| s.narrow(split.dim, offset, n).unwrap())
            .collect();
        parts.push(Tensor::cat(&pieces, split.dim).unwrap());
        offset += n;
    }
    Tensor::cat(&parts, split.dim).unwrap()
}

#[test]
fn shards_have_rank_shapes_and_concatenate_to_the_full_weight() {
    for arch in [Architecture::Llama, Architecture::Qwen2, Architecture::Phi3] {
        let mut cfg = tiny_config(arch, 4, 2, 64);
        cfg.tie_word_embeddings = false;
        let mut full = FullWeights::new(3);
        LlamaModel::load(&cfg, &mut full, DType::F32, &Device::Cpu).unwrap();
        let rcfg = rank_config(&cfg, 2).unwrap();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv, inter) = (
            rcfg.num_attention_heads * hd,
            rcfg.num_key_value_heads * hd,
            rcfg.intermediate_size,
        );
        let mut split_names = 0;
        for (name, t) in &full.map {
            let Some(split) = split_for(&cfg, name, 2) else {
                assert!(
                    name.contains("norm") || name.contains("embed"),
                    "{name} replicated"
                );
                continue;
            };
            split_names += 1;
            assert_eq!(t.dims(), split.full_shape.as_slice(), "{name}");
            let shards: Vec<Tensor> = (0..2)
                .map(|r| shard_tensor(t, &split, r, 2).unwrap())
                .collect();
            let want: Vec<usize> = match name.rsplit('.').nth(1).unwrap() {
                "q_proj" if name.ends_with("bias") => vec![q],
                "k_proj" | "v_proj" if name.ends_with("bias") => vec![kv],
                "q_proj" => vec![q, h],
                "k_proj" | "v_proj" => vec![kv, h],
                "qkv_proj" => vec![q + 2 * kv, h],
                "o_proj" => vec![h, q],
                "gate_proj" | "up_proj" => vec![inter, h],
                "gate_up_proj" => vec![2 * inter, h],
                "down_proj" => vec![h, inter],
                "lm_head" => vec![32, h],
                other => panic!("unexpected split of {other} ({name})"),
            };
            for s in &shards {
                assert_eq!(s.dims(), want.as_slice(), "{name}");
            }
            let back = unshard(&shards, &split);
            let diff = (back - t).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        let per_layer = match arch {
            Architecture::Llama => 7,
            Architecture::Qwen2 => 10,
            Architecture::Phi3 => 4,
        };
        assert_eq!(
            split_names,
            per_layer * cfg.num_hidden_layers + 1,
            "{arch:?}"
        );
    }
    // An indivisible vocab keeps lm_head whole.
    assert!(split_for(
        &tiny_config(Architecture::Llama, 4, 2, 67),
        "lm_head.weight",
        2
    )
    .is_none());
    assert_eq!(vocab_shard(64, 1, 2), Some((32, 32)));
    assert_eq!(vocab_shard(64, 0, 1), None);
}

#[test]
fn cpu_collective_sums_in_rank_order_and_gathers() {
    let out: Vec<(Vec<f32>, Vec<Vec<f32>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = CpuCollective::group(3)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let r = c.rank() as f32;
                    let t = Tensor::new(&[[r, 10.0 * r]], &Device::Cpu).unwrap();
                    // Repeated calls must not mix up generations.
                    let mut sum = vec![];
                    for _ in 0..5 {
                        sum = c
                            .all_reduce_sum(&t)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                    }
                    let g = c.all_gather_last_dim(&t).unwrap().to_vec2().unwrap();
                    (sum, g)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (sum, g) in &out {
        assert_eq!(sum, &vec![3.0, 30.0]);
        assert_eq!(g, &vec![vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]]);
    }
    let one = CpuCollective::group(1).remove(0);
    assert_eq!((one.rank(), one.world_size()), (0, 1));
}

/// A collective of world size 1 that fails if the model ever calls it.
#[derive(Debug)]
struct Untouchable;

impl Collective for Untouchable {
    fn all_reduce_sum(&self, _: &Tensor) -> Result<Tensor> {
        panic!("all_reduce_sum called at world size 1")
    }
    fn all_gather_last_dim(&self, _: &Tensor) -> Result<Tensor> {
        panic!("all_gather_last_dim called at world size 1")
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
}

#[test]
fn world_size_one_never_calls_the_collective() {
    let cfg = tiny_config(Architecture::Llama, 4, 2, 64);
    let mut full = FullWeights::new(5);
    let plain = LlamaModel::load(&cfg, &mut full, DType::F32, &Device::Cpu).unwrap();
    let m = load_rank(
        &cfg,
        &mut full.frozen(),
        DType::F32,
        &Device::Cpu,
        Arc::new(Untouchable),
    )
    .unwrap();
    assert_eq!(run(&m), run(&plain));
}
