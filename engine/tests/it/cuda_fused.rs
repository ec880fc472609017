//! The fused decoder-layer ops (`model::fused`) on CUDA against the plain candle ops in f32 on the
//! CPU, over the same (dtype-rounded) random inputs (run on a GPU machine).
//!
//! Built only with `--features cuda`; each test needs a CUDA device and fails if none is present.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use engine::model::fused::{
    add_rms_norm, qkv_proj_rope_cache, qkv_rope_cache, silu_mul, RopeCache,
};
use engine::model::fused_cuda::qkv_gemv_rope_cache;
use engine::model::gemv::set_gemv_rope_epilogue_on_this_thread;
use engine::model::gemv_cuda::gemv;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];
const TOKENS: [usize; 3] = [1, 7, 64];
const BLOCK_SIZE: usize = 16;
/// Fill of cache slots that no token maps to: must survive the op bit for bit.
const SENTINEL: f32 = 1000.0;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// Relative L2 error allowed for outputs rounded once to `dtype`.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-5,
    }
}

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

/// `v` as a `dtype` tensor on `dev`, rounded on the CPU.
fn upload(v: Vec<f32>, shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(dev))
        .expect("upload")
}

/// The same values as an f32 CPU tensor.
fn cpu_f32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .expect("copy to host")
}

fn host(t: &Tensor) -> Vec<f32> {
    cpu_f32(t)
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("copy to host")
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let (mut err, mut norm) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        err += (*g as f64 - *w as f64).powi(2);
        norm += (*w as f64).powi(2);
    }
    (err / norm.max(1e-30)).sqrt()
}

fn check(what: &str, dtype: DType, got: &[f32], want: &[f32]) {
    let err = rel_l2(got, want);
    eprintln!("{what} {dtype:?}: relative L2 {err:.2e}");
    assert!(
        err < tolerance(dtype),
        "{what} {dtype:?}: relative L2 {err:.3e} over {:.0e}",
        tolerance(dtype)
    );
}

#[test]
fn add_rms_norm_matches_cpu_f32() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    let eps = 1e-6;
    for hidden in [1536, 5120, 100] {
        // 100: the element-wise (not 8-wide) kernel
        for n in TOKENS {
            for dtype in DTYPES {
                let x = upload(
                    uniform(&mut rng, n * hidden, 3.0),
                    &[n, hidden],
                    dtype,
                    &dev,
                );
                let r = upload(
                    uniform(&mut rng, n * hidden, 1.0),
                    &[n, hidden],
                    dtype,
                    &dev,
                );
                let w: Vec<f32> = uniform(&mut rng, hidden, 0.2)
                    .iter()
                    .map(|v| 1.0 + v)
                    .collect();
                let w = upload(w, &[hidden], dtype, &dev);
                let (normed, sum) = add_rms_norm(&x, &r, &w, eps).expect("add_rms_norm");
                assert_eq!(normed.dims2().unwrap(), (n, hidden));
                assert_eq!((normed.dtype(), sum.dtype()), (dtype, dtype));

                // The sum rounds exactly like candle's add in the dtype.
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
                let want_sum = (cpu(&x) + cpu(&r)).unwrap();
                assert_eq!(
                    host(&sum),
                    host(&want_sum),
                    "sum {dtype:?} n={n} h={hidden}"
                );
                // The norm in f32 over that (rounded) sum.
                let want = candle_nn::ops::rms_norm(&cpu_f32(&want_sum), &cpu_f32(&w), eps)
                    .expect("reference rms_norm");
                let what = format!("add_rms_norm n={n} hidden={hidden}");
                check(&what, dtype, &host(&normed), &host(&want));
            }
        }
    }
}

#[test]
fn silu_mul_matches_cpu_f32() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(12);
    for inter in [8960, 13824, 100] {
        for n in TOKENS {
            for dtype in DTYPES {
                let gu = upload(
                    uniform(&mut rng, n * 2 * inter, 6.0),
                    &[n, 2 * inter],
                    dtype,
                    &dev,
                );
                let got = silu_mul(&gu, inter).expect("silu_mul");
                assert_eq!((got.dims2().unwrap(), got.dtype()), ((n, inter), dtype));
                let gu = cpu_f32(&gu);
                let gate = gu.narrow(1, 0, inter).unwrap();
                let up = gu.narrow(1, inter, inter).unwrap();
                let want = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
                let what = format!("silu_mul n={n} inter={inter}");
                check(&what, dtype, &host(&got), &host(&want));
            }
        }
    }
}

/// One qkv_rope_cache case: heads, kv heads, head dim, tokens, with QKV bias.
struct QkvCase {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    n: usize,
    bias: bool,
}

/// cos/sin rows `[n, hd/2]` of random positions (rotary base 1e6).
fn rotary_rows(rng: &mut StdRng, n: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let pos = rng.gen_range(0..8192) as f64;
        for i in 0..hd / 2 {
            let angle = pos / 1e6f64.powf(2.0 * i as f64 / hd as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// Slot per token: distinct random slots; for n > 1 token 1 is -1 and token 2 (n > 2) lies past
/// the cache (both skipped). Returns (slots for the GPU, slots for the CPU reference: -1 for both).
fn slot_mapping(rng: &mut StdRng, n: usize, num_slots: usize) -> (Vec<i64>, Vec<i64>) {
    let mut all: Vec<i64> = (0..num_slots as i64).collect();
    all.shuffle(rng);
    let mut gpu = all[..n].to_vec();
    if n > 1 {
        gpu[1] = -1;
    }
    if n > 2 {
        gpu[2] = num_slots as i64 + 5;
    }
    let cpu = gpu
        .iter()
        .map(|&s| if s >= num_slots as i64 { -1 } else { s })
        .collect();
    (gpu, cpu)
}

fn check_qkv_rope_cache(c: &QkvCase, dtype: DType, seed: u64) {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, kvh, hd, n) = (c.heads, c.kv_heads, c.head_dim, c.n);
    let width = (h + 2 * kvh) * hd;
    let num_blocks = n.div_ceil(BLOCK_SIZE) + 3;
    let num_slots = num_blocks * BLOCK_SIZE;
    let cache_shape = [num_blocks, BLOCK_SIZE, kvh, hd];

    let qkv = upload(uniform(&mut rng, n * width, 2.0), &[n, width], dtype, &dev);
    let bias = c
        .bias
        .then(|| upload(uniform(&mut rng, width, 0.5), &[width], dtype, &dev));
    let (cos, sin) = rotary_rows(&mut rng, n, hd);
    let cos = upload(cos, &[n, hd / 2], dtype, &dev);
    let sin = upload(sin, &[n, hd / 2], dtype, &dev);
    let (gpu_slots, cpu_slots) = slot_mapping(&mut rng, n, num_slots);
    let poisoned = |d: &Device| {
        let t = Tensor::full(SENTINEL, cache_shape.as_slice(), &Device::Cpu).unwrap();
        let t = if d.is_cuda() {
            t.to_dtype(dtype).unwrap()
        } else {
            t
        };
        t.to_device(d).unwrap()
    };
    let (kc, vc) = (poisoned(&dev), poisoned(&dev));
    let slots = Tensor::new(gpu_slots.as_slice(), &dev).unwrap();
    let q = qkv_rope_cache(
        &qkv,
        &RopeCache {
            bias: bias.as_ref(),
            cos: &cos,
            sin: &sin,
            key_cache: &kc,
            value_cache: &vc,
            slot_mapping: &slots,
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: hd,
        },
    )
    .expect("qkv_rope_cache");
    assert_eq!((q.dims3().unwrap(), q.dtype()), ((n, h, hd), dtype));
    assert!(q.is_contiguous());

    // Reference: the plain candle ops (bias add, rope_thd, write_kv_cache) in f32 on the CPU.
    let (kc0, vc0) = (poisoned(&Device::Cpu), poisoned(&Device::Cpu));
    let slots0 = Tensor::new(cpu_slots.as_slice(), &Device::Cpu).unwrap();
    let bias0 = bias.as_ref().map(cpu_f32);
    let q0 = qkv_rope_cache(
        &cpu_f32(&qkv),
        &RopeCache {
            bias: bias0.as_ref(),
            cos: &cpu_f32(&cos),
            sin: &cpu_f32(&sin),
            key_cache: &kc0,
            value_cache: &vc0,
            slot_mapping: &slots0,
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: hd,
        },
    )
    .expect("reference");
    let what = format!("qkv_rope_cache {h}/{kvh}x{hd} n={n} bias={}", c.bias);
    check(&format!("{what} q"), dtype, &host(&q), &host(&q0));

    // Mapped slots hold the reference k/v; every other slot keeps the sentinel bit for bit.
    let row = kvh * hd;
    for (name, got, want) in [("k", &kc, &kc0), ("v", &vc, &vc0)] {
        let (got, want) = (host(got), host(want));
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for slot in 0..num_slots {
            let (a, b) = (&got[slot * row..][..row], &want[slot * row..][..row]);
            if cpu_slots.contains(&(slot as i64)) {
                g.extend_from_slice(a);
                w.extend_from_slice(b);
            } else {
                assert!(
                    a.iter().all(|x| *x == SENTINEL),
                    "{what}: {name} cache slot {slot} (not mapped) was written"
                );
            }
        }
        let mapped = cpu_slots.iter().filter(|s| **s >= 0).count();
        assert_eq!(g.len(), mapped * row);
        check(&format!("{what} {name} cache"), dtype, &g, &w);
    }
}

#[test]
fn qkv_rope_cache_matches_cpu_f32() {
    let mut seed = 100;
    for (heads, kv_heads, bias) in [(12, 2, true), (8, 8, false)] {
        for head_dim in [64, 128, 40] {
            // 40: hd/2 = 20, the element-wise kernel
            for n in TOKENS {
                for dtype in DTYPES {
                    let c = QkvCase {
                        heads,
                        kv_heads,
                        head_dim,
                        n,
                        bias,
                    };
                    seed += 1;
                    check_qkv_rope_cache(&c, dtype, seed);
                }
            }
        }
    }
}

/// The bias settings the main test does not cover: GQA 12/2 without bias, 8/8 with it.
#[test]
fn qkv_rope_cache_other_bias_settings() {
    for (heads, kv_heads, bias) in [(12, 2, false), (8, 8, true)] {
        for dtype in DTYPES {
            let c = QkvCase {
                heads,
                kv_heads,
                head_dim: 128,
                n: 7,
                bias,
            };
            check_qkv_rope_cache(&c, dtype, 7 + heads as u64);
        }
    }
}

/// The rotary epilogue of the one-token q/k/v projection against its two launches (the
/// projection on the warp-per-row kernel, then `qkv_rope_cache`): q and both caches bit for bit,
/// unmapped slots untouched; and the model's entry point takes it, or the two launches when off.
#[test]
fn qkv_rope_epilogue_is_projection_then_qkv_rope_cache_bit_for_bit() {
    let dev = gpu();
    let mut seed = 300;
    // (heads, kv heads, hd, hidden, bias, slot): Qwen2.5-1.5B; MHA without bias; hd/2 = 40 (not
    // a multiple of 8: qkv_rope_cache's element-wise kernel); the token unmapped (-1) and past the
    // cache. Rows of at most 256 16-byte chunks for every dtype (the warp-per-row kernel).
    let cases = [
        (12, 2, 128, 1024, true, 5i64),
        (4, 4, 64, 512, false, 17),
        (3, 1, 80, 256, true, -1),
        (2, 2, 128, 64, true, 1_000_000),
    ];
    for (h, kvh, hd, k, with_bias, slot) in cases {
        for dtype in DTYPES {
            seed += 1;
            let mut rng = StdRng::seed_from_u64(seed);
            let what = format!(
                "rope epilogue {dtype:?} {h}/{kvh}x{hd} k={k} bias={with_bias} slot={slot}"
            );
            let width = (h + 2 * kvh) * hd;
            let num_blocks = 4;
            let cache_shape = [num_blocks, BLOCK_SIZE, kvh, hd];
            let x = upload(uniform(&mut rng, k, 1.0), &[1, k], dtype, &dev);
            let w = upload(uniform(&mut rng, width * k, 0.1), &[width, k], dtype, &dev);
            let bias =
                with_bias.then(|| upload(uniform(&mut rng, width, 0.5), &[width], dtype, &dev));
            let (cos, sin) = rotary_rows(&mut rng, 1, hd);
            let cos = upload(cos, &[1, hd / 2], dtype, &dev);
            let sin = upload(sin, &[1, hd / 2], dtype, &dev);
            let slots = Tensor::new(&[slot], &dev).unwrap();
            let poisoned = || {
                Tensor::full(SENTINEL, cache_shape.as_slice(), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.to_device(&dev))
                    .unwrap()
            };
            // Fresh caches per path; everything else shared.
            let caches: Vec<(Tensor, Tensor)> = (0..4).map(|_| (poisoned(), poisoned())).collect();
            let rope = |i: usize| RopeCache {
                bias: bias.as_ref(),
                cos: &cos,
                sin: &sin,
                key_cache: &caches[i].0,
                value_cache: &caches[i].1,
                slot_mapping: &slots,
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: hd,
            };
            let ((kc0, vc0), (kc1, vc1), (kc2, vc2)) = (&caches[0], &caches[1], &caches[2]);
            // The two launches.
            let q0 = qkv_rope_cache(&gemv(&x, &w).unwrap(), &rope(0)).unwrap();
            // The epilogue, called directly and through the model's entry point.
            let q1 = qkv_gemv_rope_cache(&x, &w, &rope(1)).expect("qkv_gemv_rope_cache");
            assert_eq!(q1.dims3().unwrap(), (1, h, hd), "{what}: q shape");
            let q2 = qkv_proj_rope_cache(&x, &w, &rope(2)).unwrap();
            let want = [host(&q0), host(kc0), host(vc0)];
            for (path, got) in [("direct", [&q1, kc1, vc1]), ("dispatch", [&q2, kc2, vc2])] {
                for ((name, g), w) in ["q", "key cache", "value cache"].iter().zip(got).zip(&want) {
                    assert_eq!(&host(g), w, "{what}: {path} {name}");
                }
            }
            assert!(
                want[0].iter().all(|v| v.is_finite() && *v != SENTINEL),
                "{what}: q"
            );
            // The caches changed exactly where the slot is mapped.
            let written = (0..num_blocks as i64 * BLOCK_SIZE as i64).contains(&slot);
            let untouched = want[1].iter().chain(&want[2]).all(|v| *v == SENTINEL);
            assert_eq!(untouched, !written, "{what}: cache rows");
            // Off: the two launches.
            set_gemv_rope_epilogue_on_this_thread(Some(false));
            let q3 = qkv_proj_rope_cache(&x, &w, &rope(3)).unwrap();
            set_gemv_rope_epilogue_on_this_thread(None);
            assert_eq!(host(&q3), want[0], "{what}: off");
            assert_eq!(host(&caches[3].0), want[1], "{what}: off, key cache");
        }
    }
}

/// Uniform values in `offset` +- `scale` of `shape`, rounded to `dtype`, on `dev`.
fn randu(
    rng: &mut StdRng,
    shape: &[usize],
    [scale, offset]: [f32; 2],
    dtype: DType,
    dev: &Device,
) -> Tensor {
    let n = shape.iter().product();
    let v = uniform(rng, n, scale).iter().map(|x| x + offset).collect();
    upload(v, shape, dtype, dev)
}

/// The RMSNorm folded into the one-token q/k/v projection (rotary epilogue) and into the gate/up
/// projection (SiLU-gate epilogue) against their two launches, `add_rms_norm` then the projection
/// with its epilogue: q, the written cache rows and the activation within the dtype's rounding
/// (the fold does not round the normed row to the dtype), the unmapped cache slots untouched and
/// the new residual bit for bit, called directly and through the model's entry points, and the
/// entry points with the fold off bit for bit. Hidden sizes: Qwen2.5-1.5B's 1,536 and SmolLM2's
/// 576; 2,048 (256 16-bit chunks, the longest row the fold takes); 1,000 (125 16-bit / 250 f32
/// chunks, not a multiple of the warp); 1,020 (f32: 255 chunks; 16-bit: not a whole number of
/// chunks, the two launches); 1,024 (f32: 256 chunks). Rows past 256 chunks (f32 at 1,536 and
/// 2,048) take the two launches through the entry points. Enough q/k/v pairs and gate/up rows that
/// warps take several row groups (the sum of squares taken again for each).
#[test]
fn norm_fold_is_add_rms_norm_then_the_projection_within_rounding() {
    use engine::model::fused::add_rms_norm_qkv_proj_rope_cache;
    use engine::model::fused_cuda::qkv_gemv_rope_cache_norm;
    use engine::model::gemv::{
        add_rms_norm_gate_up_silu, gate_up_silu, set_gemv_norm_fold_on_this_thread,
    };
    use engine::model::gemv_cuda::gemv_silu_norm;
    let dev = gpu();
    let eps = 1e-6;
    // (hidden, heads, kv heads, hd, bias, slot, inter)
    let cases = [
        (1536, 12, 2, 128, true, 5i64, 8960),
        (576, 9, 3, 64, false, 17, 1536),
        (2048, 40, 8, 128, true, -1, 4231),
        (1000, 3, 1, 80, true, 1_000_000, 300),
        (1020, 4, 2, 64, false, 3, 4500),
        (1024, 2, 2, 64, true, 40, 7),
    ];
    let mut seed = 500;
    for (k, h, kvh, hd, with_bias, slot, inter) in cases {
        for dtype in DTYPES {
            seed += 1;
            let mut rng = StdRng::seed_from_u64(seed);
            let what = format!(
                "norm fold {dtype:?} k={k} {h}/{kvh}x{hd} bias={with_bias} slot={slot} \
                 inter={inter}"
            );
            let chunk = 16 / dtype.size_in_bytes();
            let fold = k % chunk == 0 && k / chunk <= 256;
            // The layer output (the addend), the residual stream and the norm weight.
            let addend = randu(&mut rng, &[1, k], [2.0, 0.0], dtype, &dev);
            let residual = randu(&mut rng, &[1, k], [4.0, 0.0], dtype, &dev);
            let norm_w = randu(&mut rng, &[k], [0.2, 1.0], dtype, &dev);
            let width = (h + 2 * kvh) * hd;
            let rand_w = |rows: usize| {
                Tensor::rand(-0.1f32, 0.1f32, (rows, k), &dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap()
            };
            let (w_qkv, w_gu) = (rand_w(width), rand_w(2 * inter));
            let bias = with_bias.then(|| randu(&mut rng, &[width], [0.5, 0.0], dtype, &dev));
            let (cos, sin) = rotary_rows(&mut rng, 1, hd);
            let cos = upload(cos, &[1, hd / 2], dtype, &dev);
            let sin = upload(sin, &[1, hd / 2], dtype, &dev);
            let slots = Tensor::new(&[slot], &dev).unwrap();
            let num_blocks = 4;
            let poisoned = || {
                Tensor::full(SENTINEL, &[num_blocks, BLOCK_SIZE, kvh, hd], &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.to_device(&dev))
                    .unwrap()
            };
            // Fresh caches per path; everything else shared.
            let caches: Vec<(Tensor, Tensor)> = (0..4).map(|_| (poisoned(), poisoned())).collect();
            let rope = |i: usize| RopeCache {
                bias: bias.as_ref(),
                cos: &cos,
                sin: &sin,
                key_cache: &caches[i].0,
                value_cache: &caches[i].1,
                slot_mapping: &slots,
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: hd,
            };

            // The two launches each: add_rms_norm, then the projection (with its epilogue where
            // the rows fit it, as the fold's kernel does).
            let (normed, sum) = add_rms_norm(&addend, &residual, &norm_w, eps).unwrap();
            let q0 = qkv_proj_rope_cache(&normed, &w_qkv, &rope(0)).unwrap();
            let act0 = host(&gate_up_silu(&normed, &w_gu, inter).unwrap());
            let want = [host(&q0), host(&caches[0].0), host(&caches[0].1)];
            let sum0 = host(&sum);
            assert!(
                want[0].iter().all(|v| v.is_finite() && *v != SENTINEL),
                "{what}: q"
            );
            let written = (0..num_blocks as i64 * BLOCK_SIZE as i64).contains(&slot);
            let untouched = want[1].iter().chain(&want[2]).all(|v| *v == SENTINEL);
            assert_eq!(untouched, !written, "{what}: cache rows");

            // exact: the two launches (fold off); else within rounding, sentinels untouched.
            let same = |name: &str, path: &str, exact: bool, got: &[f32], want: &[f32]| {
                let label = format!("{what}: {path} {name}");
                if exact {
                    assert_eq!(got, want, "{label}");
                    return;
                }
                let kept: Vec<usize> = (0..want.len()).filter(|i| want[*i] != SENTINEL).collect();
                assert!(
                    (0..want.len()).all(|i| (want[i] == SENTINEL) == (got[i] == SENTINEL)),
                    "{label}: slots written or left"
                );
                let pick = |v: &[f32]| kept.iter().map(|i| v[*i]).collect::<Vec<f32>>();
                check(&label, dtype, &pick(got), &pick(want));
            };
            let check_rope = |path: &str, exact: bool, (q, s): (Tensor, Tensor), i: usize| {
                assert_eq!(q.dims3().unwrap(), (1, h, hd), "{what}: {path} q shape");
                assert_eq!(s.dims2().unwrap(), (1, k), "{what}: {path} sum shape");
                let got = [host(&q), host(&caches[i].0), host(&caches[i].1)];
                for ((name, g), w) in ["q", "key cache", "value cache"]
                    .iter()
                    .zip(&got)
                    .zip(&want)
                {
                    same(name, path, exact, g, w);
                }
                assert_eq!(host(&s), sum0, "{what}: {path} sum");
            };
            let check_silu = |path: &str, exact: bool, (act, s): (Tensor, Tensor)| {
                assert_eq!(act.dims2().unwrap(), (1, inter), "{what}: {path} act shape");
                same("act", path, exact, &host(&act), &act0);
                assert_eq!(host(&s), sum0, "{what}: {path} sum");
            };
            if fold {
                let direct =
                    qkv_gemv_rope_cache_norm(&addend, &residual, &norm_w, eps, &w_qkv, &rope(1));
                check_rope(
                    "direct",
                    false,
                    direct.expect("qkv_gemv_rope_cache_norm"),
                    1,
                );
                let direct = gemv_silu_norm(&addend, &residual, &norm_w, eps, &w_gu, inter);
                check_silu("direct", false, direct.expect("gemv_silu_norm"));
            }
            let entry = |i: usize| {
                add_rms_norm_qkv_proj_rope_cache(&addend, &residual, &norm_w, eps, &w_qkv, &rope(i))
                    .unwrap()
            };
            let entry_silu = || {
                add_rms_norm_gate_up_silu(&addend, &residual, &norm_w, eps, &w_gu, inter).unwrap()
            };
            set_gemv_norm_fold_on_this_thread(Some(true));
            check_rope("dispatch", !fold, entry(2), 2);
            check_silu("dispatch", !fold, entry_silu());
            set_gemv_norm_fold_on_this_thread(Some(false));
            check_rope("off", true, entry(3), 3);
            check_silu("off", true, entry_silu());
            set_gemv_norm_fold_on_this_thread(None);
            // The inputs are read only: the residual stream is not the sum.
            assert_ne!(host(&residual), sum0, "{what}: residual changed");
        }
    }
}
