//! Helpers shared by the engine-core integration tests: requests, event collection, idle wait,
//! the tiny dummy model and the SmolLM2 GGUF path.

use candle_core::{DType, Device};
use engine::core::{EngineCore, EngineHandle, EngineRequest, RequestEvent};
use engine::metrics::EngineMetrics;
use engine::model::KvCache;
use engine::runner::ModelRunner;
use engine::sampling::SamplingParams;
use engine::sched::policy::SchedulingPolicy;
use engine::sched::SchedulerConfig;
use engine::weights::{load_model, LoadFormat};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    }
}

pub fn request(id: &str, prompt: Vec<u32>, sampling: SamplingParams) -> EngineRequest {
    EngineRequest {
        request_id: id.into(),
        prompt_token_ids: prompt,
        sampling,
        priority: 0,
        arrival_time: Instant::now(),
    }
}

/// An engine core on the CPU over a real model (f32, dummy seed 7) with a paged cache of
/// `config.num_gpu_blocks` blocks and a CPU swap pool of `swap_space_gib`.
pub fn spawn_cpu_engine(
    path: &Path,
    format: LoadFormat,
    config: SchedulerConfig,
    policy: Box<dyn SchedulingPolicy>,
    swap_space_gib: f64,
) -> EngineHandle {
    let model = load_model(path, format, DType::F32, &Device::Cpu, 7).unwrap();
    let cache = KvCache::new(
        model.config(),
        config.num_gpu_blocks,
        config.block_size,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (h, _join) = EngineCore::spawn_with_swap_space(
        config,
        policy,
        Box::new(ModelRunner::new(model, cache)),
        Arc::new(EngineMetrics::new("m")),
        swap_space_gib,
    )
    .unwrap();
    h
}

/// Collects a request's events: its tokens and the final event.
pub fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<RequestEvent>,
) -> (Vec<u32>, RequestEvent) {
    let mut toks = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            RequestEvent::Tokens { token_ids } => toks.extend(token_ids),
            other => return (toks, other),
        }
    }
    panic!("channel closed without a final event");
}

/// Waits until nothing runs or waits and every KV block is free (at most `limit`).
pub fn wait_idle(h: &EngineHandle, limit: Duration) {
    let m = h.metrics();
    let t0 = Instant::now();
    while m.num_requests_running() + m.num_requests_waiting() > 0 || m.kv_cache_usage() > 0.0 {
        assert!(t0.elapsed() < limit, "engine never went idle");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A tiny llama config.json (vocab 256, 2 layers, 4/2 heads) in a fresh directory.
pub fn tiny_model_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "engine-{tag}-tiny-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

/// The SmolLM2 GGUF: `SMOLLM2_GGUF`, else the cache of scripts/fetch-model.sh, if present.
pub fn smollm2_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}
