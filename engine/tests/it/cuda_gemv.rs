//! The skinny-matmul kernel (`model::gemv`) on the GPU against an f64 CPU reference, the model's
//! logits with it on and off, and (ignored) its bandwidth next to candle's matmul.

use super::cuda_model::{rel_l2, tiny_qwen2_dir, two_steps};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{DType, Device, Tensor};
use engine::model::fused::silu_mul;
use engine::model::gemv::{
    gate_up_silu, matmul_t, set_gemv_kernel_on_this_thread,
    set_gemv_long_rows_one_step_on_this_thread, set_gemv_silu_epilogue_on_this_thread,
    set_gemv_silu_one_step_on_this_thread, set_gemv_warp_rows_on_this_thread,
};
use engine::model::gemv_cuda::{gemv, gemv_into, gemv_silu};
use engine::model::KvCache;
use engine::weights::{load_model, LoadFormat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];
const BLOCK_SIZE: usize = 16;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// `v` as a `dtype` tensor `[rows, cols]` on `dev`, rounded on the CPU.
fn upload(v: Vec<f32>, rows: usize, cols: usize, dtype: DType, dev: &Device) -> Tensor {
    Tensor::from_vec(v, (rows, cols), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(dev))
        .expect("upload")
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("copy to host")
}

/// Relative error allowed per output element beyond the f32 accumulation: the final rounding.
fn output_rounding(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-7),
        DType::F16 => 2f64.powi(-10),
        _ => 1e-6,
    }
}

/// Relative L2 allowed over a whole output.
fn rel_l2_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-5,
    }
}

/// `got` against `x W^T` in f64 over the same (rounded) values: every element finite and within
/// its own bound (output rounding of |y|, f32 accumulation of sum |x w|, f16 subnormal spacing),
/// and the relative L2.
fn check(what: &str, dtype: DType, got: &[f32], x: &[f32], w: &[f32], [m, n, k]: [usize; 3]) {
    assert_eq!(got.len(), m * n, "{what}: output size");
    let (mut err2, mut norm2) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..n {
            let (xr, wr) = (&x[i * k..][..k], &w[j * k..][..k]);
            let want: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = xr
                .iter()
                .zip(wr)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let g = got[i * n + j] as f64;
            assert!(g.is_finite(), "{what}: y[{i}, {j}] = {g} (not written?)");
            let bound = output_rounding(dtype) * want.abs() + 1e-5 * mag + 1e-7;
            assert!(
                (g - want).abs() <= bound,
                "{what}: y[{i}, {j}] = {g}, want {want} (bound {bound:.3e})"
            );
            err2 += (g - want).powi(2);
            norm2 += want.powi(2);
        }
    }
    let rel = (err2 / norm2.max(1e-30)).sqrt();
    assert!(
        rel < rel_l2_tolerance(dtype),
        "{what}: relative L2 {rel:.3e}"
    );
}

/// One case: x `[m, k]`, W `[n, k]`, each optionally a view that starts `offset` rows into a
/// larger tensor (a start that is not 16-byte aligned when `k * elem` is not).
fn run_case(rng: &mut StdRng, dtype: DType, [m, n, k]: [usize; 3], offset: usize) {
    let dev = gpu();
    let (xv, wv) = (
        uniform(rng, (m + offset) * k),
        uniform(rng, (n + offset) * k),
    );
    let x = upload(xv, m + offset, k, dtype, &dev)
        .narrow(0, offset, m)
        .unwrap();
    let w = upload(wv, n + offset, k, dtype, &dev)
        .narrow(0, offset, n)
        .unwrap();
    assert!(x.is_contiguous() && w.is_contiguous());
    let (xh, wh) = (host(&x), host(&w));
    let what = format!("gemv {dtype:?} m={m} n={n} k={k} offset={offset}");

    // Into a NaN-filled output: every element must be written.
    let out = Tensor::full(f32::NAN, (m, n), &dev)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap();
    gemv_into(&out, &x, &w).expect("gemv_into");
    let poisoned = host(&out);
    check(
        &format!("{what} (into NaN)"),
        dtype,
        &poisoned,
        &xh,
        &wh,
        [m, n, k],
    );

    // A fresh output, and the dispatch: the same kernel, bit for bit.
    let y = gemv(&x, &w).expect("gemv");
    assert_eq!((y.dims2().unwrap(), y.dtype()), ((m, n), dtype));
    assert_eq!(host(&y), poisoned, "{what}: gemv vs gemv_into");
    set_gemv_kernel_on_this_thread(Some(true));
    let dispatched = matmul_t(&x, &w).expect("matmul_t");
    set_gemv_kernel_on_this_thread(None);
    assert_eq!(
        host(&dispatched),
        poisoned,
        "{what}: matmul_t did not take the kernel"
    );
}

#[test]
fn gemv_matches_f64_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    // (n, k): model-like sizes; n not a multiple of the CTA's 2 or 4 rows; k not a multiple of 8
    // (element-wise kernel for f16/bf16) or of 4 (f32 too); a single row and a tiny k.
    let shapes = [
        (2048, 1536),
        (1001, 1536),
        (37, 8960),
        (130, 1000),
        (67, 100),
        (33, 13),
        (5, 7),
        (1, 1),
        (3, 4100),
    ];
    for dtype in DTYPES {
        for m in [1, 2, 3, 4, 5, 8] {
            for (n, k) in shapes {
                run_case(&mut rng, dtype, [m, n, k], 0);
            }
        }
        // One row on the CTA-per-rows kernel too (the warp-per-row kernel is the default), and
        // the warp-per-row kernel at sizes that take two rows per warp and several rounds.
        set_gemv_warp_rows_on_this_thread(Some(false));
        for (n, k) in shapes {
            run_case(&mut rng, dtype, [1, n, k], 0);
        }
        set_gemv_warp_rows_on_this_thread(None);
        // Rows of 1,025-1,152 chunks on the one-step variant (the default) and on the
        // three-step kernel: the same bits (Qwen2.5-1.5B's down projection; the longest row).
        let dev = gpu();
        for (n, k) in [(1536, 8960), (37, 1152 * 16 / dtype.size_in_bytes())] {
            let x = upload(uniform(&mut rng, k), 1, k, dtype, &dev);
            let w = upload(uniform(&mut rng, n * k), n, k, dtype, &dev);
            let mut outs = Vec::new();
            for one_step in [true, false] {
                set_gemv_long_rows_one_step_on_this_thread(Some(one_step));
                outs.push(host(&gemv(&x, &w).unwrap()));
            }
            set_gemv_long_rows_one_step_on_this_thread(None);
            assert_eq!(outs[0], outs[1], "{dtype:?} n={n} k={k}: m1_v9 vs m1_v");
            run_case(&mut rng, dtype, [1, n, k], 0);
        }
        for (n, k) in [(17920, 1536), (17921, 64), (9001, 8)] {
            run_case(&mut rng, dtype, [1, n, k], 0);
        }
        // Views whose start breaks 16-byte alignment (k = 1004: rows of 2008 / 4016 bytes): the
        // element-wise kernel; k = 1536 stays aligned: the 16-byte kernel.
        for m in [1, 3, 8] {
            run_case(&mut rng, dtype, [m, 77, 1004], 1);
            run_case(&mut rng, dtype, [m, 77, 1536], 1);
        }
    }
}

#[test]
fn gemv_off_or_out_of_range_is_candle_matmul() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(22);
    for dtype in DTYPES {
        let w = upload(uniform(&mut rng, 96 * 64), 96, 64, dtype, &dev);
        for (m, on) in [(9, true), (3, false)] {
            let x = upload(uniform(&mut rng, m * 64), m, 64, dtype, &dev);
            set_gemv_kernel_on_this_thread(Some(on));
            let got = matmul_t(&x, &w).unwrap();
            set_gemv_kernel_on_this_thread(None);
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(host(&got), host(&want), "{dtype:?} m={m} kernel {on}");
        }
    }
}

#[test]
fn gate_up_silu_epilogue_is_gemv_then_silu_mul_bit_for_bit() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(23);
    // (inter, k): Qwen2.5-1.5B's MLP, an odd count of pairs, fewer pairs than warps, the longest
    // rows the warp-per-row kernel takes, the shortest 16-byte row of f32.
    for dtype in DTYPES {
        for (inter, k) in [(8960, 1536), (1537, 64), (5, 8), (3000, 2048), (7, 4)] {
            if k * dtype.size_in_bytes() % 16 != 0 {
                continue;
            }
            let what = format!("gate_up_silu {dtype:?} inter={inter} k={k}");
            let (xv, wv) = (uniform(&mut rng, k), uniform(&mut rng, 2 * inter * k));
            let x = upload(xv, 1, k, dtype, &dev);
            let w = upload(wv, 2 * inter, k, dtype, &dev);
            // The two launches the epilogue replaces: bit for bit where the plain projection
            // runs on the warp-per-row kernel too (rows of at most 256 16-byte chunks; f32 rows
            // of 1,536 take the CTA kernel, whose sums run in another order).
            let two = host(&silu_mul(&gemv(&x, &w).unwrap(), inter).unwrap());
            // Both kernel variants: the one-step w2u6 (default) and the two-step w2u4.
            let mut variants = Vec::new();
            for one_step in [true, false] {
                set_gemv_silu_one_step_on_this_thread(Some(one_step));
                variants.push(gemv_silu(&x, &w, inter).expect("gemv_silu"));
            }
            set_gemv_silu_one_step_on_this_thread(None);
            let fused = variants.remove(0);
            assert_eq!(fused.dims2().unwrap(), (1, inter), "{what}: shape");
            let fused = host(&fused);
            assert!(fused.iter().all(|v| v.is_finite()), "{what}: not finite");
            assert_eq!(host(&variants[0]), fused, "{what}: w2u4 vs w2u6");
            let warp_rows = k * dtype.size_in_bytes() / 16 <= 256;
            if warp_rows {
                assert_eq!(fused, two, "{what}: epilogue vs two launches");
            }
            // The model's entry point takes the kernel by default, the two launches when off.
            assert_eq!(
                host(&gate_up_silu(&x, &w, inter).unwrap()),
                two,
                "{what}: dispatch"
            );
            set_gemv_silu_epilogue_on_this_thread(Some(false));
            assert_eq!(
                host(&gate_up_silu(&x, &w, inter).unwrap()),
                two,
                "{what}: off"
            );
            set_gemv_silu_epilogue_on_this_thread(None);
            // And silu(g) * u in f64 over the same rounded inputs.
            let (xh, wh) = (host(&x), host(&w));
            let dot = |r: usize| -> f64 {
                let row = &wh[r * k..][..k];
                xh.iter().zip(row).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            let (mut err2, mut norm2) = (0f64, 0f64);
            for (i, got) in fused.iter().enumerate() {
                let (g, u) = (dot(i), dot(inter + i));
                let want = g / (1.0 + (-g).exp()) * u;
                err2 += (*got as f64 - want).powi(2);
                norm2 += want.powi(2);
            }
            let rel = (err2 / norm2.max(1e-30)).sqrt();
            assert!(
                rel < 2.0 * rel_l2_tolerance(dtype),
                "{what}: relative L2 {rel:.3e}"
            );
        }
    }
}

// ------------------------------------------------------------------------------ the model

/// Paged logits of both steps, dense logits of a 6-token prompt, and the decode step replayed
/// from a CUDA graph (the kernel captured), with the kernel `on` or off on this thread.
fn model_logits(model: &dyn engine::model::CausalLM, dtype: DType, on: bool) -> Vec<Tensor> {
    use engine::model::cuda_graph::set_cuda_graphs_on_this_thread;
    set_gemv_kernel_on_this_thread(Some(on));
    let cfg = model.config().clone();
    let dev = model.device().clone();
    let mut cache = KvCache::new(&cfg, 8, BLOCK_SIZE, dtype, &dev).unwrap();
    let mut out = Vec::new();
    set_cuda_graphs_on_this_thread(Some(false));
    for batch in two_steps(cfg.vocab_size as u32) {
        out.push(model.forward(&batch, &mut cache).unwrap());
    }
    out.push(model.forward_full(&[3, 14, 15, 92, 65, 35]).unwrap());
    if dev.is_cuda() {
        // The same decode step again (same K/V written), from a graph.
        set_cuda_graphs_on_this_thread(Some(true));
        let dec = &two_steps(cfg.vocab_size as u32)[1];
        out.push(model.forward(dec, &mut cache).unwrap());
    }
    set_cuda_graphs_on_this_thread(None);
    set_gemv_kernel_on_this_thread(None);
    out
}

/// bf16 logits with the kernel on against off (cuBLAS) and against the CPU f32 model; f32 on
/// against off. The projections of the decode rows (eager and captured in a graph) and of the
/// 6-token dense prompt take the kernel when it is on; those of the 57-token prefill do not.
#[test]
fn model_logits_with_gemv_on_and_off() {
    use engine::model::cuda_graph::{graph_counts, last_capture_error};
    let dir = tiny_qwen2_dir(5);
    let gpu = gpu();
    engine::gpu_memory::set_event_tracking(&gpu, false).unwrap();
    let cpu_model = load_model(&dir, LoadFormat::Safetensors, DType::F32, &Device::Cpu, 0).unwrap();
    let reference = model_logits(cpu_model.as_ref(), DType::F32, false);
    let names = ["prefill", "decode", "dense 6 tokens", "decode from graph"];
    for (dtype, on_off_tol, cpu_tol) in [(DType::BF16, 1e-2, 2e-2), (DType::F32, 1e-4, 1e-3)] {
        let model = load_model(&dir, LoadFormat::Safetensors, dtype, &gpu, 0).unwrap();
        let on = model_logits(model.as_ref(), dtype, true);
        let off = model_logits(model.as_ref(), dtype, false);
        let (_, failed) = graph_counts();
        assert_eq!(
            failed,
            0,
            "graph capture failed: {:?}",
            last_capture_error()
        );
        for (i, name) in names.iter().enumerate() {
            let cpu = &reference[[0, 1, 2, 1][i]];
            let (e_off, e_cpu) = (rel_l2(&on[i], &off[i]), rel_l2(&on[i], cpu));
            eprintln!("{dtype:?} {name}: gemv on vs off {e_off:.2e}, on vs CPU f32 {e_cpu:.2e}");
            assert!(
                e_off < on_off_tol,
                "{dtype:?} {name}: on vs off {e_off:.3e}"
            );
            assert!(
                e_cpu < cpu_tol,
                "{dtype:?} {name}: on vs CPU f32 {e_cpu:.3e}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------------------ bandwidth

/// Runs timed back to back per sample (the host queues them while the GPU works on `busy`).
const BATCH: usize = 10;

/// Median GPU time in µs of one `f` over 50 samples, each the time between two CUDA events around
/// `BATCH` runs divided by `BATCH`. A large matmul queued before each sample keeps the GPU busy
/// while the host queues the runs, so that host-side launch cost does not count.
fn median_us(dev: &Device, busy: &Tensor, mut f: impl FnMut(usize)) -> f64 {
    const SAMPLES: usize = 50;
    let stream = dev.as_cuda_device().unwrap().cuda_stream();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    (0..BATCH).for_each(&mut f);
    let mut times: Vec<f64> = (0..SAMPLES)
        .map(|s| {
            drop(busy.matmul(busy).unwrap());
            let start = stream.record_event(flags).unwrap();
            (0..BATCH).for_each(|j| f(s * BATCH + j));
            let end = stream.record_event(flags).unwrap();
            start.elapsed_ms(&end).unwrap() as f64 * 1e3 / BATCH as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[SAMPLES / 2]
}

/// GB/s of the kernel and of candle's matmul (cuBLAS) at Qwen2.5-1.5B's projection shapes, bf16,
/// and its LM head in f32 and in bf16, 1 and 8 rows. Weights rotate over copies totalling past the L2 cache so
/// that each run reads from HBM.
#[test]
#[ignore = "benchmark: ./engine-it --ignored --nocapture gemv_bandwidth"]
fn gemv_bandwidth_qwen2_5_1_5b() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(23);
    let busy = Tensor::ones((8192, 8192), DType::BF16, &dev).unwrap();
    let shapes = [
        ("qkv_proj", 2048, 1536, DType::BF16),
        ("o_proj", 1536, 1536, DType::BF16),
        ("gate_up_proj", 17920, 1536, DType::BF16),
        ("down_proj", 1536, 8960, DType::BF16),
        ("lm_head", 151936, 1536, DType::F32),
        ("lm_head", 151936, 1536, DType::BF16),
    ];
    eprintln!(
        "shape          dtype  m  weight MB | gemv us   GB/s | candle us   GB/s | speedup | 1 row, CTA-per-rows kernel us   GB/s"
    );
    for (name, n, k, dtype) in shapes {
        let bytes = n * k * dtype.size_in_bytes();
        let copies = (512usize << 20).div_ceil(bytes).min(64);
        let ws: Vec<Tensor> = (0..copies)
            .map(|_| {
                Tensor::rand(-1f32, 1f32, (n, k), &dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap()
            })
            .collect();
        for m in [1, 8] {
            let x = upload(uniform(&mut rng, m * k), m, k, dtype, &dev);
            let ours = median_us(&dev, &busy, |i| drop(gemv(&x, &ws[i % copies]).unwrap()));
            let theirs = median_us(&dev, &busy, |i| {
                drop(x.matmul(&ws[i % copies].t().unwrap()).unwrap())
            });
            let gbs = |us: f64| bytes as f64 / us / 1e3;
            let older = if m == 1 {
                set_gemv_warp_rows_on_this_thread(Some(false));
                let us = median_us(&dev, &busy, |i| drop(gemv(&x, &ws[i % copies]).unwrap()));
                set_gemv_warp_rows_on_this_thread(None);
                format!("{us:>7.1} {:>6.0}", gbs(us))
            } else {
                "-".to_string()
            };
            eprintln!(
                "{name:<14} {dtype:<5?} {m}  {:>9.1} | {ours:>7.1} {:>6.0} | {theirs:>9.1} {:>6.0} | {:.2}x | {older}",
                bytes as f64 / 1e6,
                gbs(ours),
                gbs(theirs),
                theirs / ours
            );
        }
    }
}

/// Programmatic dependent launch on a chain shaped like Qwen2.5-1.5B's decode layers at batch 1
/// (o_proj GEMV, add + RMSNorm, gate/up GEMV with the SiLU epilogue, down GEMV, add + RMSNorm; 28
/// layers of distinct weights, 2.4 GB, so every GEMV reads HBM), queued behind a large matmul so
/// that the host's launch gaps stay out: GPU microseconds per layer with and without PDL,
/// alternating, median of 15 each.
#[test]
#[ignore = "benchmark: ./engine-it --ignored --nocapture pdl_chain"]
fn pdl_chain_qwen2_5_1_5b_layers() {
    use engine::model::fused::add_rms_norm;
    use engine::model::pdl::set_pdl_on_this_thread;
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(29);
    let busy = Tensor::ones((8192, 8192), DType::BF16, &dev).unwrap();
    let (h, inter, layers) = (1536usize, 8960usize, 28usize);
    let w = |n: usize, k: usize| {
        Tensor::rand(-0.05f32, 0.05f32, (n, k), &dev)
            .and_then(|t| t.to_dtype(DType::BF16))
            .unwrap()
    };
    let weights: Vec<[Tensor; 3]> = (0..layers)
        .map(|_| [w(h, h), w(2 * inter, h), w(h, inter)])
        .collect();
    let norm = upload(vec![1.0; h], 1, h, DType::BF16, &dev)
        .squeeze(0)
        .unwrap();
    let x0 = upload(uniform(&mut rng, h), 1, h, DType::BF16, &dev);
    let chain = || {
        let (mut x, mut r) = (x0.clone(), x0.clone());
        for [wo, wgu, wd] in &weights {
            let o = gemv(&x, wo).unwrap();
            (x, r) = add_rms_norm(&o, &r, &norm, 1e-6).unwrap();
            let gu = gemv_silu(&x, wgu, inter).unwrap();
            let d = gemv(&gu, wd).unwrap();
            (x, r) = add_rms_norm(&d, &r, &norm, 1e-6).unwrap();
        }
        x
    };
    let stream = dev.as_cuda_device().unwrap().cuda_stream();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = [Vec::new(), Vec::new()];
    let mut outs: [Option<Vec<f32>>; 2] = [None, None];
    for rep in 0..32 {
        let pdl = rep % 2 == 1;
        set_pdl_on_this_thread(Some(pdl));
        drop(busy.matmul(&busy).unwrap());
        let start = stream.record_event(flags).unwrap();
        let x = chain();
        let end = stream.record_event(flags).unwrap();
        let us = start.elapsed_ms(&end).unwrap() as f64 * 1e3 / layers as f64;
        if rep >= 2 {
            times[pdl as usize].push(us);
        }
        let v: Vec<f32> = x
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        match &outs[pdl as usize] {
            Some(prev) => assert_eq!(prev, &v, "the chain's output changed between runs"),
            None => outs[pdl as usize] = Some(v),
        }
    }
    set_pdl_on_this_thread(None);
    assert_eq!(outs[0], outs[1], "PDL changed the chain's output");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (med(&mut times[0]), med(&mut times[1]));
    let bytes = (h * h + 2 * inter * h + h * inter) * 2;
    eprintln!(
        "pdl chain: {off:.2} us per layer without PDL, {on:.2} with ({:.3}x); weights {:.1} MB per layer = {:.2} us at 4.2 TB/s",
        on / off,
        bytes as f64 / 1e6,
        bytes as f64 / 4.2e6
    );
}
