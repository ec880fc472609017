//! The engine's CUDA kernels against f64 references on random inputs (run on a GPU machine).
//!
//! Built only with `--features cuda`; each test needs a CUDA device and fails if none is present.
//! `bench_paged_attention_decode` (ignored by default) times decode at Qwen2.5-1.5B shape against
//! the HBM floor, decode kernel on and off; set `KERNEL_BENCH_OUT=<file>` to also write its table
//! as markdown.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use engine::model::attention::SPLIT_COUNTERS_PER_SEQ;
use engine::model::attention_cuda::{
    decode_split, flash_decode_split, paged_attention_into, paged_split,
    set_decode_cluster_on_this_thread, set_decode_head_tile, set_decode_kernel_on_this_thread,
    set_decode_split, set_decode_tensor_cores_on_this_thread, set_flash_decode_split,
    set_flash_wide_tiles_on_this_thread, set_in_kernel_combine_on_this_thread, set_paged_split,
    set_prefill_kernel, write_kv_cache, PrefillKernel,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * 1.7).collect()
}

/// One test case: per sequence (query_len, context_len).
struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    seqs: Vec<(usize, usize)>,
}

/// f64 paged attention straight from the contract, over host copies of the (rounded) inputs.
#[allow(clippy::too_many_arguments)]
fn reference(
    c: &Case,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    tables: &[Vec<u32>],
    scale: f64,
) -> Vec<f64> {
    let (h, kvh, d, bs) = (c.heads, c.kv_heads, c.head_dim, c.block_size);
    let n: usize = c.seqs.iter().map(|s| s.0).sum();
    let mut out = vec![0f64; n * h * d];
    let mut t0 = 0;
    for (s, &(qlen, ctx)) in c.seqs.iter().enumerate() {
        for j in 0..qlen {
            let tok = t0 + j;
            for head in 0..h {
                let g = head / (h / kvh);
                let qv = &q[(tok * h + head) * d..][..d];
                let last = ctx - qlen + j;
                let mut scores = Vec::with_capacity(last + 1);
                for key in 0..=last {
                    let slot = tables[s][key / bs] as usize * bs + key % bs;
                    let kv = &kc[(slot * kvh + g) * d..][..d];
                    let dot: f64 = qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum();
                    scores.push(dot * scale);
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = w.iter().sum();
                let o = &mut out[(tok * h + head) * d..][..d];
                for (key, wk) in w.iter().enumerate() {
                    let slot = tables[s][key / bs] as usize * bs + key % bs;
                    let vv = &vc[(slot * kvh + g) * d..][..d];
                    for (oi, vi) in o.iter_mut().zip(vv) {
                        *oi += wk / l * *vi as f64;
                    }
                }
            }
        }
        t0 += qlen;
    }
    out
}

fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("copy to host")
}

/// One kernel run: the output (host f32) and the host copies of its (rounded) inputs.
struct Run {
    got: Vec<f32>,
    q: Vec<f32>,
    kc: Vec<f32>,
    vc: Vec<f32>,
    tables: Vec<Vec<u32>>,
    scale: f64,
}

impl Run {
    /// The f64 reference of this run's inputs.
    fn reference(&self, c: &Case) -> Vec<f64> {
        reference(c, &self.q, &self.kc, &self.vc, &self.tables, self.scale)
    }
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

/// Runs one case in one dtype on random inputs drawn from `seed` (same seed, same inputs), with
/// `extra_cols` padding columns (block 0) in the block table, as CUDA-graph buckets have.
fn run_attention(c: &Case, dtype: DType, seed: u64, extra_cols: usize) -> Run {
    run_attention_counted(c, dtype, seed, extra_cols, false)
}

/// [`run_attention`], with split counters for the paged kernel's in-kernel combine when
/// `counters` (checked to be left zeroed).
fn run_attention_counted(
    c: &Case,
    dtype: DType,
    seed: u64,
    extra_cols: usize,
    counters: bool,
) -> Run {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, kvh, d, bs) = (c.heads, c.kv_heads, c.head_dim, c.block_size);
    let n: usize = c.seqs.iter().map(|s| s.0).sum();
    let blocks_per_seq: Vec<usize> = c.seqs.iter().map(|s| s.1.div_ceil(bs)).collect();
    let num_blocks = blocks_per_seq.iter().sum::<usize>() + 3;
    // Shuffled physical blocks, so that the block table really is followed.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut tables = Vec::new();
    let mut next = 0;
    for &nb in &blocks_per_seq {
        tables.push(ids[next..next + nb].to_vec());
        next += nb;
    }
    let max_blocks = *blocks_per_seq.iter().max().unwrap() + extra_cols;
    let mut flat_tables = vec![0u32; c.seqs.len() * max_blocks];
    for (s, t) in tables.iter().enumerate() {
        flat_tables[s * max_blocks..][..t.len()].copy_from_slice(t);
    }
    let mut qsl = vec![0u32];
    for s in &c.seqs {
        qsl.push(qsl.last().unwrap() + s.0 as u32);
    }
    let ctx: Vec<u32> = c.seqs.iter().map(|s| s.1 as u32).collect();

    let cache_shape = (num_blocks, bs, kvh, d);
    let mk = |v: Vec<f32>, shape: &[usize]| {
        Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(&dev))
            .expect("upload")
    };
    let cache_elems = num_blocks * bs * kvh * d;
    let kc = mk(randn(&mut rng, cache_elems), &[num_blocks, bs, kvh, d]);
    let vc = mk(randn(&mut rng, cache_elems), &[num_blocks, bs, kvh, d]);
    let q = mk(randn(&mut rng, n * h * d), &[n, h, d]);
    assert_eq!(kc.dims4().unwrap(), cache_shape);
    let u32_tensor =
        |v: &[u32], shape: &[usize]| Tensor::from_slice(v, shape, &dev).expect("upload metadata");
    let bt = u32_tensor(&flat_tables, &[c.seqs.len(), max_blocks]);
    let cl = u32_tensor(&ctx, &[c.seqs.len()]);
    let qs = u32_tensor(&qsl, &[c.seqs.len() + 1]);
    let scale = 1.0 / (d as f64).sqrt();

    // Output poisoned with NaN: any element the kernel skips stays NaN and fails the check.
    let out = Tensor::full(f32::NAN, (n, h, d), &dev)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap();
    let split_counters = counters
        .then(|| Tensor::zeros(c.seqs.len() * SPLIT_COUNTERS_PER_SEQ, DType::U32, &dev).unwrap());
    paged_attention_into(
        &out,
        &q,
        &kc,
        &vc,
        &bt,
        &cl,
        &qs,
        None,
        scale as f32,
        split_counters.as_ref(),
    )
    .expect("paged_attention_into");
    if let Some(sc) = &split_counters {
        let left = sc.to_vec1::<u32>().unwrap();
        assert!(
            left.iter().all(|x| *x == 0),
            "split counters not left zeroed"
        );
    }
    let got = host_f32(&out);
    let nan = got.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(nan, 0, "{nan} output elements not written or not finite");
    Run {
        got,
        q: host_f32(&q),
        kc: host_f32(&kc),
        vc: host_f32(&vc),
        tables,
        scale,
    }
}

/// Runs one case in one dtype; returns the relative L2 error against the f64 reference.
fn check_attention(c: &Case, dtype: DType, seed: u64) -> f64 {
    let run = run_attention(c, dtype, seed, 0);
    rel_l2(&run.got, &run.reference(c))
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

#[test]
fn paged_attention_matches_reference() {
    let cases = [
        // Qwen2.5-1.5B shape: decode batch with ragged contexts, one crossing partitions.
        Case {
            heads: 12,
            kv_heads: 2,
            head_dim: 128,
            block_size: 16,
            seqs: vec![(1, 1), (1, 17), (1, 300), (1, 1024)],
        },
        // prefill + chunked prefill + decode mixed in one batch (SmolLM2 shape)
        Case {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            seqs: vec![(37, 37), (20, 85), (1, 64), (5, 5)],
        },
        // no GQA, head_dim 96 (Phi-3-mini shape), odd block size
        Case {
            heads: 8,
            kv_heads: 8,
            head_dim: 96,
            block_size: 8,
            seqs: vec![(3, 40), (1, 333)],
        },
        // group of 8 (CodeLlama-34B shape), head_dim 80 kernel instantiation
        Case {
            heads: 16,
            kv_heads: 2,
            head_dim: 80,
            block_size: 32,
            seqs: vec![(2, 2), (1, 129), (70, 70)],
        },
        // wide group (more heads per kv head than rows per CTA)
        Case {
            heads: 20,
            kv_heads: 1,
            head_dim: 64,
            block_size: 16,
            seqs: vec![(3, 50), (1, 7)],
        },
        // Tensor-core prefill kernel (query length >= 16): long prefill, chunked prefill after
        // 871 cached tokens, a 64-row tile plus one row, decode rows beside them (Qwen2.5 shape).
        Case {
            heads: 12,
            kv_heads: 2,
            head_dim: 128,
            block_size: 16,
            seqs: vec![(300, 300), (129, 1000), (1, 50), (65, 65)],
        },
        // query lengths 16 (first prefill-kernel length) and 15 (last paged-kernel one), d80
        Case {
            heads: 16,
            kv_heads: 2,
            head_dim: 80,
            block_size: 32,
            seqs: vec![(200, 260), (16, 16), (15, 40), (64, 64)],
        },
        // d96 without GQA and d64 with a group of 3, odd block size
        Case {
            heads: 8,
            kv_heads: 8,
            head_dim: 96,
            block_size: 8,
            seqs: vec![(100, 100), (33, 97)],
        },
        Case {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            seqs: vec![(128, 128), (17, 500), (2, 9)],
        },
        // Contexts of many key tiles whose key counts are not multiples of 64 (CodeLlama-34B
        // group of 8, d128): a 700-token prompt (five 128-row tiles and 60 rows), chunked
        // prefills of 200 tokens after 1137 cached and of 64 after 936, a short prompt.
        Case {
            heads: 16,
            kv_heads: 2,
            head_dim: 128,
            block_size: 16,
            seqs: vec![(700, 700), (200, 1337), (64, 1000), (20, 20)],
        },
        // The same at d64, group of 4, block size 32.
        Case {
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            block_size: 32,
            seqs: vec![(517, 517), (130, 901), (3, 77)],
        },
    ];
    let mut seed = 7;
    for (i, c) in cases.iter().enumerate() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            // 16-bit prefills run on the tensor-core kernel: check both of its tilings, and the
            // paged kernel on them. (The kernel choice is process-wide: other tests may run on
            // either kernel meanwhile, both correct; the tiling is this thread's.)
            for (kernel, wide, what) in [
                (PrefillKernel::TensorCore, true, "tensor-core 128x64"),
                (PrefillKernel::TensorCore, false, "tensor-core 64x32"),
                (PrefillKernel::Paged, true, "paged"),
            ] {
                if dtype == DType::F32 && kernel != PrefillKernel::Paged {
                    continue; // f32 always runs on the paged kernel
                }
                set_prefill_kernel(kernel);
                set_flash_wide_tiles_on_this_thread(Some(wide));
                seed += 1;
                let err = check_attention(c, dtype, seed);
                set_flash_wide_tiles_on_this_thread(None);
                set_prefill_kernel(PrefillKernel::TensorCore);
                println!("case {i} {dtype:?} {what}: rel L2 error {err:.3e}");
                assert!(
                    err < tolerance(dtype),
                    "case {i} {dtype:?} {what}: rel error {err:.3e}"
                );
            }
        }
    }
}

/// The decode kernel (every sequence one query token) against the f64 reference and against the
/// general paged kernel (decode kernel off), over GQA groups 1, 3, 6, 8 and 16 (two head tiles),
/// every head size, batches 1, 3, 17 and 64 with contexts of 1 to 3000 keys crossing block and
/// partition boundaries, shuffled blocks, padded block tables, and three context splits (one
/// partition; the default; many short partitions, some empty).
/// The paged kernel's split launches merging their partitions in each group's last CTA against
/// the separate combine launch: bit for bit, every output written, counters left zeroed; decode
/// steps (GQA and MHA, short to long contexts) and a mixed step with longer queries.
#[test]
fn paged_in_kernel_combine_matches_combine_launch() {
    let shapes = [(12, 2, 128, 16), (4, 4, 64, 16), (16, 2, 96, 8)];
    let batches: Vec<Vec<(usize, usize)>> = vec![
        vec![(1, 1024)],
        vec![(1, 1), (1, 33), (1, 3000)],
        (1..=9).map(|i| (1, 100 * i + 7)).collect(),
        vec![(3, 100), (1, 2000), (7, 700)],
    ];
    let default_split = paged_split();
    set_decode_kernel_on_this_thread(Some(false));
    let mut seed = 4000;
    for &(heads, kv_heads, head_dim, block_size) in &shapes {
        for seqs in &batches {
            let c = Case {
                heads,
                kv_heads,
                head_dim,
                block_size,
                seqs: seqs.clone(),
            };
            for dtype in [DType::BF16, DType::F32] {
                for (ctas, min_tiles) in [default_split, (64, 1)] {
                    seed += 1;
                    set_paged_split(ctas, min_tiles);
                    set_in_kernel_combine_on_this_thread(Some(false));
                    let launch = run_attention_counted(&c, dtype, seed, 0, true);
                    set_in_kernel_combine_on_this_thread(Some(true));
                    let fused = run_attention_counted(&c, dtype, seed, 0, true);
                    set_in_kernel_combine_on_this_thread(None);
                    set_paged_split(default_split.0, default_split.1);
                    let what = format!(
                        "{heads}/{kv_heads} heads d{head_dim}, seqs {seqs:?}, {dtype:?}, split ({ctas}, {min_tiles})"
                    );
                    assert_eq!(fused.got, launch.got, "{what}: in-kernel vs launch");
                    let err = rel_l2(&fused.got, &fused.reference(&c));
                    assert!(err < tolerance(dtype), "{what}: rel error {err:.3e}");
                }
            }
        }
    }
    set_decode_kernel_on_this_thread(None);
}

/// The decode kernel's cluster merge (partitions merged through distributed shared memory)
/// against partials and the combine launch: bit for bit, every output written; every query-head
/// tile (1, 4, 8), GQA and MHA, one sequence and several, contexts from one key to 3,000 (some
/// partitions empty), splits of 2 to 16 partitions (portable and non-portable cluster sizes) and
/// more than a cluster takes (the combine launch either way).
#[test]
fn paged_decode_cluster_matches_combine_launch() {
    cluster_matches_combine_launch(ClusterCases {
        tensor_cores: false,
        shapes: &[
            (12, 2, 128, 16),
            (4, 4, 64, 16),
            (16, 2, 96, 8),
            (6, 2, 80, 32),
        ],
        extra_batch: (1..=9).map(|i| 100 * i + 7).collect(),
        // Partitions of >= 128, >= 200 and >= 512 keys (2 to 14 per launch at these contexts),
        // and of 32 keys (up to 94: the combine launch).
        splits: &[(64, 128), (64, 200), (64, 512), (64, 32)],
        tiles: &[None, Some(1), Some(4), Some(8)],
        dtypes: &[DType::BF16, DType::F32],
        seed: 7000,
    });
}

/// The same for the tensor-core decode kernel (a whole GQA group per CTA, bf16 and f16): groups
/// of 6, 8 and 16 heads, head sizes 64 to 128, partitions of >= 64 to >= 512 keys (2 to 16 per
/// cluster) and of 32 keys (more than a cluster takes: the combine launch). Head size 80 is the one
/// whose dynamic shared memory (47.75 KiB) is below 48 KiB while its static and dynamic together
/// are above: its launches need the raised limit too.
#[test]
fn flash_decode_cluster_matches_combine_launch() {
    cluster_matches_combine_launch(ClusterCases {
        tensor_cores: true,
        shapes: &[
            (12, 2, 128, 16),
            (16, 2, 96, 8),
            (16, 1, 64, 16),
            (40, 5, 128, 16),
            (8, 2, 80, 32),
        ],
        extra_batch: vec![],
        splits: &[(64, 64), (64, 128), (64, 200), (64, 512), (64, 32)],
        tiles: &[None],
        dtypes: &[DType::BF16, DType::F16],
        seed: 9000,
    });
}

/// What [`cluster_matches_combine_launch`] runs: `(heads, kv_heads, head_dim, block_size)`
/// shapes, a batch beside the common ones, `(CTAs per SM, min keys per partition)` splits of the
/// chosen kernel, head tiles (CUDA-core kernel) and dtypes.
struct ClusterCases<'a> {
    tensor_cores: bool,
    shapes: &'a [(usize, usize, usize, usize)],
    extra_batch: Vec<usize>,
    splits: &'a [(usize, usize)],
    tiles: &'a [Option<usize>],
    dtypes: &'a [DType],
    seed: u64,
}

/// Every case with the cluster merge and with partials and the combine launch: the same bits,
/// and within tolerance of the reference. Contexts 1,024, 1,025, one to 3,000 keys (some
/// partitions empty) and three uneven ones.
fn cluster_matches_combine_launch(cases: ClusterCases) {
    let mut batches: Vec<Vec<usize>> = vec![vec![1024], vec![1025], vec![1, 33, 3000]];
    if !cases.extra_batch.is_empty() {
        batches.push(cases.extra_batch.clone());
    }
    batches.push(vec![129, 1000, 257]);
    let tc = cases.tensor_cores;
    let default_split = if tc {
        flash_decode_split()
    } else {
        decode_split()
    };
    let set_split = |(ctas, keys): (usize, usize)| match tc {
        true => set_flash_decode_split(ctas, keys),
        false => set_decode_split(ctas, keys),
    };
    set_decode_kernel_on_this_thread(Some(true));
    set_decode_tensor_cores_on_this_thread(Some(tc));
    let mut seed = cases.seed;
    for &(heads, kv_heads, head_dim, block_size) in cases.shapes {
        for ctxs in &batches {
            let c = Case {
                heads,
                kv_heads,
                head_dim,
                block_size,
                seqs: ctxs.iter().map(|&ctx| (1, ctx)).collect(),
            };
            for &tile in cases.tiles {
                for &dtype in cases.dtypes {
                    for &split in cases.splits {
                        seed += 1;
                        set_decode_head_tile(tile).unwrap();
                        set_split(split);
                        set_decode_cluster_on_this_thread(Some(false));
                        let launch = run_attention(&c, dtype, seed, 0);
                        set_decode_cluster_on_this_thread(Some(true));
                        let cluster = run_attention(&c, dtype, seed, 0);
                        set_decode_cluster_on_this_thread(None);
                        set_split(default_split);
                        set_decode_head_tile(None).unwrap();
                        let what = format!(
                            "{heads}/{kv_heads} heads d{head_dim}, contexts {ctxs:?}, tile {tile:?}, \
                             {dtype:?}, split {split:?}, tensor cores {tc}"
                        );
                        assert_eq!(cluster.got, launch.got, "{what}: cluster vs combine launch");
                        let err = rel_l2(&cluster.got, &cluster.reference(&c));
                        assert!(err < tolerance(dtype), "{what}: rel error {err:.3e}");
                    }
                }
            }
        }
    }
    set_decode_tensor_cores_on_this_thread(None);
    set_decode_kernel_on_this_thread(None);
}

#[test]
fn paged_decode_matches_reference() {
    // (heads, kv_heads, head_dim, block_size)
    let shapes = [
        (4, 4, 64, 16),
        (6, 2, 80, 32),
        (12, 2, 128, 16),
        (16, 2, 96, 8),
        (16, 1, 128, 16),
    ];
    let mut rng = StdRng::seed_from_u64(2024);
    let batches: Vec<Vec<usize>> = vec![
        vec![2999],
        vec![1],
        vec![3, 17, 2048],
        vec![
            1, 15, 16, 17, 31, 32, 33, 127, 128, 129, 255, 256, 257, 1000, 2047, 2500, 3000,
        ],
        (0..64).map(|_| rng.gen_range(1..=1500)).collect(),
    ];
    let default_split = decode_split();
    // (CTAs per SM, min keys per partition): always one partition; the default; many small ones.
    let splits = [(1, 1 << 20), default_split, (64, 32)];
    // The CUDA-core decode kernel (flash_decode_matches_reference covers the tensor-core one).
    set_decode_tensor_cores_on_this_thread(Some(false));
    let mut seed = 1000;
    for (si, &(heads, kv_heads, head_dim, block_size)) in shapes.iter().enumerate() {
        for (bi, ctxs) in batches.iter().enumerate() {
            let c = Case {
                heads,
                kv_heads,
                head_dim,
                block_size,
                seqs: ctxs.iter().map(|&ctx| (1, ctx)).collect(),
            };
            let extra_cols = (si + bi) % 3 * 2; // 0, 2 or 4 padding columns
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                seed += 1;
                set_decode_kernel_on_this_thread(Some(false));
                let off = run_attention(&c, dtype, seed, extra_cols);
                set_decode_kernel_on_this_thread(Some(true));
                let want = off.reference(&c);
                let err_off = rel_l2(&off.got, &want);
                for &(ctas, min_keys) in &splits {
                    set_decode_split(ctas, min_keys);
                    let on = run_attention(&c, dtype, seed, extra_cols);
                    set_decode_split(default_split.0, default_split.1);
                    let err = rel_l2(&on.got, &want);
                    let want_off: Vec<f64> = off.got.iter().map(|&x| x as f64).collect();
                    let diff = rel_l2(&on.got, &want_off);
                    let what = format!(
                        "{heads}/{kv_heads} heads, d{head_dim}, block {block_size}, batch {}, \
                         {dtype:?}, split ({ctas}, {min_keys})",
                        ctxs.len()
                    );
                    println!(
                        "{what}: rel L2 vs reference {err:.3e} (decode kernel off {err_off:.3e}), \
                         vs kernel off {diff:.3e}"
                    );
                    assert!(err < tolerance(dtype), "{what}: rel error {err:.3e}");
                    assert!(diff < tolerance(dtype), "{what}: on vs off {diff:.3e}");
                }
            }
        }
    }
    set_decode_tensor_cores_on_this_thread(None);
}

/// The tensor-core decode kernel (flash_decode.cu) against the f64 reference and the CUDA-core
/// decode kernel on the same inputs: GQA groups of 2 to 16 heads (Qwen2.5's 6, CodeLlama-34B's
/// 8), every head size, contexts of one key to 3,000 (partial and empty 64-key tiles, empty
/// partitions), one partition, the default split, 32-key and 200-key partitions (not whole
/// tiles), block-table padding columns; every output element written (NaN-poisoned output).
#[test]
fn flash_decode_matches_reference() {
    // (heads, kv_heads, head_dim, block_size)
    let shapes = [
        (12, 2, 128, 16),
        (64, 8, 128, 16),
        (16, 1, 128, 16),
        (16, 2, 96, 8),
        (8, 2, 64, 16),
        (6, 2, 80, 32),
        (4, 2, 64, 16),
    ];
    let mut rng = StdRng::seed_from_u64(4048);
    let batches: Vec<Vec<usize>> = vec![
        vec![1],
        vec![1025],
        vec![3, 17, 2048],
        vec![
            1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 2047, 2500, 3000,
        ],
        (0..40).map(|_| rng.gen_range(1..=1500)).collect(),
    ];
    let default_split = decode_split();
    let default_tc_split = flash_decode_split();
    let splits = [(1, 1 << 20), default_tc_split, (64, 32), (64, 200)];
    set_decode_kernel_on_this_thread(Some(true));
    let mut seed = 9000;
    for (si, &(heads, kv_heads, head_dim, block_size)) in shapes.iter().enumerate() {
        for (bi, ctxs) in batches.iter().enumerate() {
            let c = Case {
                heads,
                kv_heads,
                head_dim,
                block_size,
                seqs: ctxs.iter().map(|&ctx| (1, ctx)).collect(),
            };
            let extra_cols = (si + bi) % 3 * 2;
            for dtype in [DType::BF16, DType::F16] {
                for &(ctas, min_keys) in &splits {
                    seed += 1;
                    set_decode_split(ctas, min_keys);
                    set_flash_decode_split(ctas, min_keys);
                    set_decode_tensor_cores_on_this_thread(Some(false));
                    let cuda_cores = run_attention(&c, dtype, seed, extra_cols);
                    set_decode_tensor_cores_on_this_thread(Some(true));
                    let tc = run_attention(&c, dtype, seed, extra_cols);
                    set_decode_tensor_cores_on_this_thread(None);
                    set_decode_split(default_split.0, default_split.1);
                    set_flash_decode_split(default_tc_split.0, default_tc_split.1);
                    let want = tc.reference(&c);
                    let err = rel_l2(&tc.got, &want);
                    let err_cc = rel_l2(&cuda_cores.got, &want);
                    let cc: Vec<f64> = cuda_cores.got.iter().map(|&x| x as f64).collect();
                    let diff = rel_l2(&tc.got, &cc);
                    let what = format!(
                        "{heads}/{kv_heads} heads, d{head_dim}, block {block_size}, batch {}, \
                         {dtype:?}, split ({ctas}, {min_keys})",
                        ctxs.len()
                    );
                    println!(
                        "{what}: rel L2 vs reference {err:.3e} (CUDA cores {err_cc:.3e}), \
                         vs CUDA cores {diff:.3e}"
                    );
                    assert!(err < tolerance(dtype), "{what}: rel error {err:.3e}");
                    assert!(diff < tolerance(dtype), "{what}: vs CUDA cores {diff:.3e}");
                }
            }
        }
    }
    set_decode_kernel_on_this_thread(None);
}

#[test]
fn write_kv_cache_writes_exactly_the_mapped_slots() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(42);
    for (dtype, kvh, d, bs) in [
        (DType::BF16, 2, 128, 16),
        (DType::F16, 3, 64, 8),
        (DType::F32, 1, 96, 16),
    ] {
        let num_blocks = 9;
        let slots_total = num_blocks * bs;
        let n = 23;
        // k/v as a narrow of a wider [n, 3*kvh, d] tensor: strided token rows, as from a fused qkv.
        let wide = Tensor::from_vec(
            randn(&mut rng, n * 3 * kvh * d),
            (n, 3 * kvh, d),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(&dev)
        .unwrap();
        let k = wide.narrow(1, 0, kvh).unwrap();
        let v = wide.narrow(1, kvh, kvh).unwrap();
        let mut free: Vec<i64> = (0..slots_total as i64).collect();
        free.shuffle(&mut rng);
        let mut slots: Vec<i64> = free[..n].to_vec();
        slots[4] = -1;
        slots[11] = -1;
        let slot_t = Tensor::from_slice(&slots, n, &dev).unwrap();
        let poison = || {
            Tensor::full(f32::NAN, (num_blocks, bs, kvh, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (kc, vc) = (poison(), poison());
        write_kv_cache(&k, &v, &kc, &vc, &slot_t).expect("write_kv_cache");
        for (src, cache) in [(&k, &kc), (&v, &vc)] {
            let src = host_f32(&src.contiguous().unwrap());
            let cache = host_f32(cache);
            let row = kvh * d;
            let mut written = vec![false; slots_total];
            for (i, &s) in slots.iter().enumerate() {
                if s < 0 {
                    continue;
                }
                let s = s as usize;
                written[s] = true;
                assert_eq!(
                    &cache[s * row..][..row],
                    &src[i * row..][..row],
                    "{dtype:?} token {i}"
                );
            }
            for (s, w) in written.iter().enumerate() {
                if !w {
                    assert!(
                        cache[s * row..][..row].iter().all(|x| x.is_nan()),
                        "{dtype:?}: slot {s} touched"
                    );
                }
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB buffer.
fn copy_bandwidth(dev: &Device) -> f64 {
    let n = 1usize << 29; // bf16 elements = 1 GiB
    let a = Tensor::ones(n, DType::BF16, dev)
        .unwrap()
        .affine(0.5, 0.25)
        .unwrap();
    let mut times = Vec::new();
    for i in 0..12 {
        dev.synchronize().unwrap();
        let t = Instant::now();
        let b = a.copy().unwrap();
        dev.synchronize().unwrap();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
        drop(b);
    }
    2.0 * (n * 2) as f64 / median(times)
}

#[test]
#[ignore = "benchmark: run on the GPU machine with --ignored --nocapture"]
fn bench_paged_attention_decode() {
    let dev = gpu();
    let (h, kvh, d, bs, ctx) = (12usize, 2usize, 128usize, 16usize, 1024usize);
    let bw = copy_bandwidth(&dev);
    let mut rows = vec![format!(
        "| kernel | batch | context | KV bytes read | median us/call | floor us (KV bytes / copy bw) | achieved GB/s | x floor |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )];
    println!("copy bandwidth (read+write): {:.0} GB/s", bw / 1e9);
    let mut rng = StdRng::seed_from_u64(1);
    for batch in [1usize, 8, 32, 128] {
        let blocks_per_seq = ctx / bs;
        let kv_bytes = batch * ctx * kvh * d * 2 * 2;
        // Enough disjoint block-table sets that one pass over all of them exceeds L2 many times.
        let sets = (512usize << 20).div_ceil(kv_bytes).clamp(2, 256);
        let num_blocks = sets * batch * blocks_per_seq;
        let cache = |rng: &mut StdRng| {
            Tensor::from_vec(
                randn(rng, num_blocks * bs * kvh * d),
                (num_blocks, bs, kvh, d),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(&dev)
            .unwrap()
        };
        let (kc, vc) = (cache(&mut rng), cache(&mut rng));
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(&mut rng);
        let tables: Vec<Tensor> = ids
            .chunks(batch * blocks_per_seq)
            .map(|c| Tensor::from_slice(c, (batch, blocks_per_seq), &dev).unwrap())
            .collect();
        let cl = Tensor::from_vec(vec![ctx as u32; batch], batch, &dev).unwrap();
        let qs = Tensor::from_vec((0..=batch as u32).collect::<Vec<_>>(), batch + 1, &dev).unwrap();
        let q = Tensor::from_vec(randn(&mut rng, batch * h * d), (batch, h, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let out = Tensor::zeros((batch, h, d), DType::BF16, &dev).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let run = |i: usize| {
            paged_attention_into(
                &out,
                &q,
                &kc,
                &vc,
                &tables[i % tables.len()],
                &cl,
                &qs,
                Some(ctx),
                scale,
                None,
            )
            .unwrap()
        };
        // The decode kernel, then the general paged kernel on the same inputs.
        for (kernel, on) in [("decode", true), ("paged", false)] {
            set_decode_kernel_on_this_thread(Some(on));
            for i in 0..20 {
                run(i);
            }
            let reps = 200;
            let mut per_call = Vec::new();
            for r in 0..7 {
                dev.synchronize().unwrap();
                let t = Instant::now();
                for i in 0..reps {
                    run(r * reps + i);
                }
                dev.synchronize().unwrap();
                per_call.push(t.elapsed().as_secs_f64() / reps as f64);
            }
            set_decode_kernel_on_this_thread(None);
            let t = median(per_call);
            let floor = kv_bytes as f64 / bw;
            rows.push(format!(
                "| {kernel} | {batch} | {ctx} | {:.2} MiB | {:.1} | {:.1} | {:.0} | {:.1} |",
                kv_bytes as f64 / (1 << 20) as f64,
                t * 1e6,
                floor * 1e6,
                kv_bytes as f64 / t / 1e9,
                t / floor
            ));
        }
    }
    let table = format!(
        "Paged-attention decode, Qwen2.5-1.5B shape (12 q heads, 2 kv heads, head_dim 128, bf16, \
         block 16), host-timed back-to-back launches (launch overhead included), median of 7x200.\n\
         Copy bandwidth (1 GiB device copy, read+write): {:.0} GB/s.\n\n{}\n",
        bw / 1e9,
        rows.join("\n")
    );
    println!("{table}");
    if let Ok(path) = std::env::var("KERNEL_BENCH_OUT") {
        std::fs::write(path, &table).expect("write KERNEL_BENCH_OUT");
    }
}

/// Preemption by swap (the `fair` policy): KV blocks copied GPU -> host -> other GPU blocks come
/// back bit-exact, the destination blocks are fully overwritten and no other block is touched.
#[test]
fn swap_out_then_in_restores_block_contents_on_gpu() {
    use engine::config::{Architecture, ModelConfig};
    use engine::model::KvCache;
    let dev = gpu();
    let cfg = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 16,
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
        attention_bias: false,
        sliding_window: None,
    };
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let (blocks, bs) = (12usize, 16usize);
        let mut cache = KvCache::new(&cfg, blocks, bs, dtype, &dev).unwrap();
        let per_block = bs * cfg.num_key_value_heads * cfg.head_dim;
        // Random contents in every block of every layer, then a host snapshot (as f32 bits).
        for (k, v) in &cache.layers {
            for t in [k, v] {
                let data = Tensor::from_vec(randn(&mut rng, blocks * per_block), t.dims(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                t.slice_set(&data, 0, 0).unwrap();
            }
        }
        let snap = |c: &KvCache| -> Vec<Vec<f32>> {
            c.layers
                .iter()
                .flat_map(|(k, v)| [k, v])
                .map(|t| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect()
        };
        let before = snap(&cache);
        let (src, dst) = ([7u32, 2, 9], [1u32, 7, 4]);
        let host = cache.swap_out(&src).unwrap();
        assert_eq!(host.num_blocks(), 3);
        // Poison the destinations: every element must be overwritten by the swap-in.
        for (k, v) in &cache.layers {
            for t in [k, v] {
                for &b in &dst {
                    let nan = Tensor::full(
                        f32::NAN,
                        (1, bs, cfg.num_key_value_heads, cfg.head_dim),
                        &dev,
                    )
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                    t.slice_set(&nan, 0, b as usize).unwrap();
                }
            }
        }
        cache.swap_in(&host, &dst).unwrap();
        let after = snap(&cache);
        for (layer, (a, b)) in after.iter().zip(&before).enumerate() {
            for blk in 0..blocks {
                let got = &a[blk * per_block..(blk + 1) * per_block];
                let from = dst
                    .iter()
                    .position(|&d| d as usize == blk)
                    .map_or(blk, |i| src[i] as usize);
                let want = &b[from * per_block..(from + 1) * per_block];
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{dtype:?} tensor {layer} block {blk}: expected the contents of block {from}"
                );
            }
        }
        eprintln!(
            "{dtype:?}: swap of 3 blocks x {} tensors restored bit-exact",
            after.len()
        );
    }
}

/// Every kernel module the server loads before it reports ready: each of its `.entry` functions
/// loads on a fresh device (ours from `engine/kernels`, candle's that the engine's ops reach).
#[test]
fn every_kernel_module_and_function_loads() {
    use engine::model::kernel_modules::load_all;
    let Device::Cuda(dev) = gpu() else {
        unreachable!()
    };
    let t = Instant::now();
    let loaded = load_all(&dev).unwrap();
    let (modules, functions) = (loaded.modules, loaded.functions);
    println!(
        "{modules} modules, {functions} kernels loaded in {:.2} s; slowest: {}",
        t.elapsed().as_secs_f64(),
        loaded.slowest(5)
    );
    // engine/kernels has 10 files; candle 9 modules the engine's ops reach.
    assert!(
        modules >= 19 && functions > 5 * modules,
        "{modules} / {functions}"
    );
    // Loaded once: the second pass only looks them up.
    let again = load_all(&dev).unwrap();
    assert_eq!((again.modules, again.functions), (modules, functions));
}
