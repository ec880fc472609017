//! `probe kv-scaling`: failed starts as result rows (any server command), and the real engine on
//! CPU with SmolLM2, where predicted and measured KV capacity must agree exactly.

use std::path::PathBuf;

use probe::kvscaling::{self, table, KvScalingConfig};
use probe::progress::Progress;

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("probe-kvs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn smollm2() -> Option<PathBuf> {
    let env = std::env::var_os("SMOLLM2_GGUF").map(PathBuf::from);
    let cached = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    env.into_iter().chain([cached]).find(|p| p.is_file())
}

#[tokio::test]
async fn server_that_cannot_start_gives_failed_rows_with_its_message() {
    let out = out_dir("fail");
    let cfg = KvScalingConfig {
        lens: vec![1024, 2048],
        server_cmd: Some("sh -c 'echo INFO loading; echo \"ValueError: no room for {max_model_len} tokens\" >&2; exit 3' {port}".into()),
        model_config: Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/qwen2.5-1.5b-instruct.json"))),
        kv_cache_memory: Some(28_672 * 16 * 100),
        concurrency: vec![1],
        out: out.clone(),
        day: "d".into(),
        ..Default::default()
    };
    let res = kvscaling::run(cfg, &Progress::quiet()).await.unwrap();
    assert_eq!(res.rows.len(), 2);
    for (r, len) in res.rows.iter().zip([1024u64, 2048]) {
        assert_eq!((r.max_model_len, r.startup.as_str()), (len, "failed"));
        assert_eq!(r.error, format!("ValueError: no room for {len} tokens"));
        // Qwen2.5-1.5B in bf16 (assumed): 28,672 bytes/token, 100 blocks of 16.
        assert_eq!(r.predicted_kv_tokens, Some(1600));
        assert_eq!(r.concurrency, None);
    }
    let dir = out.join("d");
    assert_eq!(
        table::read_csv(&dir.join(table::CSV_NAME)).unwrap(),
        res.rows
    );
    let md = std::fs::read_to_string(dir.join(table::REPORT_NAME)).unwrap();
    assert!(md.contains("max-model-len 1024 did not start (predicted 1600 KV tokens, so it was expected to fit): ValueError: no room for 1024 tokens"), "{md}");
    assert!(md.contains("max-model-len 2048 did not start (predicted: only 1600 KV tokens, 0.78x of one request): ValueError: no room for 2048 tokens"), "{md}");
    assert!(dir.join("kv_scaling_logs/len1024.log").is_file());
    std::fs::remove_dir_all(&out).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_scaling_real_engine_cpu() {
    let Some(model) = smollm2() else {
        eprintln!("SKIPPED kv_scaling_real_engine_cpu: SmolLM2 GGUF not found (set SMOLLM2_GGUF or run scripts/fetch-model.sh)");
        return;
    };
    if let Err(e) = probe::server::engine_bin_or_build().await {
        panic!("engine binary unavailable: {e}");
    }
    let out = out_dir("real");
    let t = std::time::Instant::now();
    let cfg = KvScalingConfig {
        lens: vec![256, 512],
        // 20 MiB / (46,080 B/token x 16) = 28 blocks = 448 tokens: 256 fits, 512 does not.
        kv_cache_memory: Some(20 << 20),
        concurrency: vec![1, 4],
        requests_per_level: Some(4),
        max_tokens: 4,
        model: Some(model),
        engine_args: Some("--device cpu".into()),
        out: out.clone(),
        day: "d".into(),
        ready_timeout_s: 60.0,
        request_timeout_s: 60.0,
        ..Default::default()
    };
    let res = kvscaling::run(cfg, &Progress::auto()).await.unwrap();
    let ok: Vec<_> = res.rows.iter().filter(|r| r.ok()).collect();
    assert_eq!(ok.len(), 2, "{:#?}", res.rows);
    for r in &ok {
        assert_eq!(r.max_model_len, 256);
        assert_eq!(r.measured_kv_tokens, Some(448), "{r:?}");
        assert_eq!(
            r.predicted_kv_tokens, r.measured_kv_tokens,
            "prediction must be exact for our engine"
        );
        assert_eq!(r.kv_tokens_source, "metric");
        assert_eq!(r.failed, 0, "{r:?}");
        assert_eq!(r.completed, 4);
        assert!(r.ttft_p99_ms.unwrap() >= r.ttft_p50_ms.unwrap());
        assert!(
            r.gpu_memory_used_gib.starts_with("not available")
                || r.gpu_memory_used_gib.parse::<f64>().is_ok()
        );
        // 128 prompt + 4 output tokens = 9 blocks; 28 blocks hold 3 such requests.
        assert_eq!(r.tokens_per_request, 132);
        let peak = r.observed_running_peak.expect("running requests scraped");
        assert!(peak >= 1 && peak <= r.concurrency.unwrap(), "{r:?}");
    }
    assert_eq!(ok[1].predicted_running_peak, Some(3));
    let failed = res
        .rows
        .iter()
        .find(|r| r.max_model_len == 512)
        .expect("512 row");
    assert_eq!(failed.startup, "failed");
    assert!(
        failed.error.contains("only 448 tokens fit"),
        "{}",
        failed.error
    );
    assert_eq!(failed.predicted_kv_tokens, Some(448));
    let md = std::fs::read_to_string(&res.report).unwrap();
    assert!(md.contains("agree exactly"), "{md}");
    assert!(md.contains("max-model-len 512 did not start"), "{md}");
    assert!(res.dir.join("plots/kv_scaling_ttft_p99.png").is_file());
    eprintln!("kv-scaling on CPU took {:.1} s", t.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&out).ok();
}
