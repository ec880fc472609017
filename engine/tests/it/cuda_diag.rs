//! GPU diagnostics (feature `cuda`, `--ignored`): what in the server's warm-up changes SmolLM2's
//! bf16 first-step logits on the France prompt.

use candle_core::{DType, Device};
use engine::model::{CausalLM, ForwardBatch, KvCache, SeqInput};
use engine::weights::{load_model, LoadFormat};

const BLOCK_SIZE: usize = 16;
const TEMPLATE_IDS: [u32; 37] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
];

/// Top-3 (token, logit) of the prompt's last position through the paged forward.
fn first_step(model: &dyn CausalLM, dev: &Device) -> Vec<(usize, f32)> {
    let cfg = model.config().clone();
    let mut cache = KvCache::new(&cfg, 8, BLOCK_SIZE, DType::BF16, dev).unwrap();
    let table: Vec<u32> = vec![3, 1, 6, 0];
    let n = TEMPLATE_IDS.len();
    let batch = ForwardBatch {
        token_ids: TEMPLATE_IDS.to_vec(),
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n)
            .map(|p| table[p / BLOCK_SIZE] as i64 * BLOCK_SIZE as i64 + (p % BLOCK_SIZE) as i64)
            .collect(),
        seqs: vec![SeqInput {
            query_start: 0,
            query_len: n,
            context_len: n,
            block_table: table[..n.div_ceil(BLOCK_SIZE)].to_vec(),
            compute_logits: true,
        }],
    };
    let row: Vec<f32> = model
        .forward(&batch, &mut cache)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut top: Vec<(usize, f32)> = row.into_iter().enumerate().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(3);
    top
}

#[test]
#[ignore = "diagnostic: run on the GPU machine with --ignored --nocapture"]
fn smollm2_bf16_first_step_through_the_warmup() {
    let Some(path) = std::env::var_os("SMOLLM2_GGUF") else {
        eprintln!("SMOLLM2_GGUF not set: skipped");
        return;
    };
    let dev = Device::new_cuda(0).unwrap();
    let model = load_model(
        std::path::Path::new(&path),
        LoadFormat::Auto,
        DType::BF16,
        &dev,
        0,
    )
    .unwrap();
    let report =
        |stage: &str| eprintln!("{stage:<48} top-3 {:?}", first_step(model.as_ref(), &dev));
    report("fresh");
    report("again");
    engine::gpu_memory::keep_pool_memory(&dev).unwrap();
    report("after keep_pool_memory");
    model.forward_full(&(0..16u32).collect::<Vec<_>>()).unwrap();
    report("after a 16-token forward_full");
    model
        .forward_full(&(0..512u32).collect::<Vec<_>>())
        .unwrap();
    report("after a 512-token forward_full");
    model
        .forward_full(&(0..2048u32).map(|i| i % 49152).collect::<Vec<_>>())
        .unwrap();
    report("after a 2048-token forward_full");
    report("again");
    {
        use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let cuda = dev.as_cuda_device().unwrap();
        let stream = cuda.cuda_stream();
        let ws = stream.alloc_zeros::<u8>(32 << 20).unwrap();
        let (ptr, _g) = ws.device_ptr(&stream);
        let st = unsafe {
            cublas::cublasSetWorkspace_v2(*cuda.cublas_handle().handle(), ptr as *mut _, 32 << 20)
        };
        eprintln!("cublasSetWorkspace(32 MiB): {st:?}");
        drop(_g);
        std::mem::forget(ws);
    }
    report("after cublasSetWorkspace");
    let fresh = load_model(
        std::path::Path::new(&path),
        LoadFormat::Auto,
        DType::BF16,
        &dev,
        0,
    )
    .unwrap();
    eprintln!(
        "{:<48} top-3 {:?}",
        "a second model loaded now",
        first_step(fresh.as_ref(), &dev)
    );
}
