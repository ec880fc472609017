//! Paged attention and cache writes checked against a dense causal attention reference.

use super::*;
use crate::model::SeqInput;
use candle_core::{Device, D};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

/// Dense reference: q `[qlen, heads, hd]`, k/v `[ctx, kvh, hd]`, the last qlen positions are
/// the queries.
fn dense(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let (qlen, heads, _) = q.dims3().unwrap();
    let (ctx, kvh, _) = k.dims3().unwrap();
    let group = heads / kvh;
    let expand = |t: &Tensor| {
        // [ctx, kvh, hd] -> [heads, ctx, hd] with each kv head repeated `group` times.
        let t = t.transpose(0, 1).unwrap(); // [kvh, ctx, hd]
        let (kvh, ctx, hd) = t.dims3().unwrap();
        t.unsqueeze(1)
            .unwrap()
            .expand((kvh, group, ctx, hd))
            .unwrap()
            .reshape((kvh * group, ctx, hd))
            .unwrap()
    };
    let (k, v) = (expand(k), expand(v));
    let q = q.transpose(0, 1).unwrap().contiguous().unwrap(); // [heads, qlen, hd]
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let mask: Vec<f32> = (0..qlen)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j <= ctx - qlen + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, qlen, ctx), &Device::Cpu).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
    p.matmul(&v.contiguous().unwrap())
        .unwrap()
        .transpose(0, 1)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `seqs`: (cached tokens, new tokens) per sequence.
fn check(
    heads: usize,
    kvh: usize,
    hd: usize,
    block_size: usize,
    seqs: &[(usize, usize)],
    seed: u64,
) {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks_needed: usize = seqs.iter().map(|(c, q)| (c + q).div_ceil(block_size)).sum();
    let num_blocks = blocks_needed + 3;
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    free.shuffle(&mut rng);
    let kc = Tensor::zeros((num_blocks, block_size, kvh, hd), DType::F32, &dev).unwrap();
    let vc = kc.zeros_like().unwrap();
    let mut inputs = Vec::new();
    let (mut qs, mut new_k, mut new_v, mut new_slots) = (vec![], vec![], vec![], vec![]);
    let mut full = Vec::new();
    for &(cached, qlen) in seqs {
        let ctx = cached + qlen;
        let table: Vec<u32> = (0..ctx.div_ceil(block_size))
            .map(|_| free.pop().unwrap())
            .collect();
        let slot = |p: usize| (table[p / block_size] as usize * block_size + p % block_size) as i64;
        let k = Tensor::randn(0f32, 1.0, (ctx, kvh, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (ctx, kvh, hd), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (qlen, heads, hd), &dev).unwrap();
        if cached > 0 {
            // The cached part is written in an earlier step.
            let slots: Vec<i64> = (0..cached).map(slot).collect();
            write_kv_cache(
                &k.narrow(0, 0, cached).unwrap(),
                &v.narrow(0, 0, cached).unwrap(),
                &kc,
                &vc,
                &Tensor::new(slots.as_slice(), &dev).unwrap(),
            )
            .unwrap();
        }
        new_k.push(k.narrow(0, cached, qlen).unwrap());
        new_v.push(v.narrow(0, cached, qlen).unwrap());
        new_slots.extend((cached..ctx).map(slot));
        inputs.push(SeqInput {
            query_start: qs.iter().map(|q: &Tensor| q.dim(0).unwrap()).sum(),
            query_len: qlen,
            context_len: ctx,
            block_table: table,
            compute_logits: true,
        });
        qs.push(q.clone());
        full.push((q, k, v));
    }
    // A padding token whose slot is -1 must not be written anywhere.
    new_k.push(Tensor::full(1e6f32, (1, kvh, hd), &dev).unwrap());
    new_v.push(Tensor::full(1e6f32, (1, kvh, hd), &dev).unwrap());
    new_slots.push(-1);
    write_kv_cache(
        &Tensor::cat(&new_k, 0).unwrap(),
        &Tensor::cat(&new_v, 0).unwrap(),
        &kc,
        &vc,
        &Tensor::new(new_slots.as_slice(), &dev).unwrap(),
    )
    .unwrap();
    assert!(kc.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e5);
    let meta = AttentionMetadata::new(&inputs, &dev).unwrap();
    let scale = 1.0 / (hd as f64).sqrt();
    let out =
        paged_attention(&Tensor::cat(&qs, 0).unwrap(), &kc, &vc, &meta, scale as f32).unwrap();
    for (s, (q, k, v)) in full.iter().enumerate() {
        let want = dense(q, k, v, scale);
        let got = out
            .narrow(0, inputs[s].query_start, inputs[s].query_len)
            .unwrap();
        let diff = max_abs_diff(&want, &got);
        assert!(diff < 1e-4, "seq {s} of {seqs:?}: max diff {diff}");
    }
}

#[test]
fn paged_matches_dense_prefill_decode_and_chunks() {
    // MHA, prefill only.
    check(4, 4, 16, 4, &[(0, 7), (0, 1), (0, 9)], 1);
    // GQA 3:1 (SmolLM2's ratio), decode steps with cached context of various lengths.
    check(
        9,
        3,
        64,
        16,
        &[(36, 1), (0, 1), (15, 1), (16, 1), (100, 1)],
        2,
    );
    // GQA 8:1, chunked prefill (query_len > 1 over cached context), mixed with decodes.
    check(8, 1, 32, 8, &[(24, 5), (3, 1), (0, 13), (40, 17)], 3);
    // block_size 1 and odd head_dim.
    check(2, 2, 6, 1, &[(5, 3), (2, 2)], 4);
}

#[test]
fn random_shapes_match_dense() {
    let mut rng = StdRng::seed_from_u64(7);
    for seed in 0..6 {
        let kvh = rng.gen_range(1..4);
        let heads = kvh * rng.gen_range(1..4);
        let seqs: Vec<(usize, usize)> = (0..rng.gen_range(1..6))
            .map(|_| (rng.gen_range(0..40), rng.gen_range(1..12)))
            .collect();
        check(
            heads,
            kvh,
            8 * rng.gen_range(1..5),
            rng.gen_range(1..20),
            &seqs,
            100 + seed,
        );
    }
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let kc = Tensor::zeros((2, 4, 1, 8), DType::F32, &dev).unwrap();
    let vc = kc.zeros_like().unwrap();
    let k = Tensor::ones((1, 1, 8), DType::F32, &dev).unwrap();
    // Slot past the cache.
    let slots = Tensor::new(&[8i64], &dev).unwrap();
    assert!(write_kv_cache(&k, &k, &kc, &vc, &slots).is_err());
    // Dtype mismatch.
    let kb = k.to_dtype(DType::BF16).unwrap();
    let ok = Tensor::new(&[0i64], &dev).unwrap();
    assert!(write_kv_cache(&kb, &kb, &kc, &vc, &ok).is_err());
    // Block table too short for the context.
    let seq = SeqInput {
        query_start: 0,
        query_len: 1,
        context_len: 9,
        block_table: vec![0, 1],
        compute_logits: true,
    };
    let meta = AttentionMetadata::new(&[seq], &dev).unwrap();
    assert!(paged_attention(&k, &kc, &vc, &meta, 1.0).is_err());
}

#[test]
fn bf16_cache_is_accumulated_in_f32() {
    let dev = Device::Cpu;
    let kc = Tensor::zeros((1, 4, 1, 4), DType::BF16, &dev).unwrap();
    let vc = kc.zeros_like().unwrap();
    let k = Tensor::ones((3, 1, 4), DType::BF16, &dev).unwrap();
    let v = Tensor::new(&[[[1f32; 4]], [[2.0; 4]], [[3.0; 4]]], &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    write_kv_cache(&k, &v, &kc, &vc, &Tensor::new(&[0i64, 1, 2], &dev).unwrap()).unwrap();
    let seq = SeqInput {
        query_start: 0,
        query_len: 1,
        context_len: 3,
        block_table: vec![0],
        compute_logits: true,
    };
    let meta = AttentionMetadata::new(&[seq], &dev).unwrap();
    let q = Tensor::ones((1, 1, 4), DType::BF16, &dev).unwrap();
    let out = paged_attention(&q, &kc, &vc, &meta, 0.5).unwrap();
    // Equal scores: the mean of 1, 2, 3.
    let out: Vec<f32> = out
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(out, vec![2.0; 4]);
}

#[test]
fn l2_byte_ranges_keep_whole_aligned_units() {
    let w = Tensor::zeros((4, 10), DType::BF16, &Device::Cpu).unwrap(); // 80 bytes
    let row = |offset, len| L2Range {
        tensor: &w,
        offset,
        len,
    };
    let got = |r: &[L2Range]| -> Vec<(usize, usize)> {
        l2_byte_ranges(r, 3)
            .unwrap()
            .into_iter()
            .map(|(_, first, bytes)| (first, bytes))
            .collect()
    };
    // All 80 bytes; elements 3..13 (bytes 6..26) -> 16..26 trimmed to 16..16: dropped; 8..24 ->
    // bytes 16..48.
    assert_eq!(got(&[row(0, 40)]), vec![(0, 80)]);
    assert_eq!(got(&[row(3, 10)]), vec![]);
    assert_eq!(got(&[row(8, 16), row(0, 8)]), vec![(16, 32), (0, 16)]);
    // A view starting at element 10 (byte 20): offsets count from the view's start.
    let tail = w.flatten_all().unwrap().narrow(0, 10, 30).unwrap();
    let r = l2_byte_ranges(
        &[L2Range {
            tensor: &tail,
            offset: 0,
            len: 30,
        }],
        3,
    )
    .unwrap();
    // Bytes 32..80 of the storage.
    assert_eq!((r[0].1, r[0].2), (12, 48));
    // Past the tensor, too many ranges, a non-contiguous tensor: errors.
    assert!(l2_byte_ranges(&[row(30, 20)], 3).is_err());
    assert!(l2_byte_ranges(&[row(0, 1), row(0, 1)], 1).is_err());
    let t = w.t().unwrap();
    let err = l2_byte_ranges(
        &[L2Range {
            tensor: &t,
            offset: 0,
            len: 4,
        }],
        3,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("contiguous: false"), "{err}");
}
