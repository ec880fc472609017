//! Client, server lifecycle and `probe cold-warm` against the scripted mock server.

use std::time::Duration;

use probe::client::{Api, Client, ClientOptions, GenRequest};
use probe::clock::Clock;
use probe::record::ErrorKind;

use probe::coldwarm::{self, ColdWarmConfig};
use probe::progress::Progress;
use probe::report;

use crate::mock::{Failure, MockConfig, MockServer, Script};

fn client(url: &str, timeout: Option<Duration>) -> Client {
    let opts = ClientOptions {
        request_timeout: timeout,
        ..Default::default()
    };
    Client::new(url, Clock::start(), opts).unwrap()
}

fn ms(d: f64) -> f64 {
    d * 1000.0
}

#[tokio::test]
async fn client_times_match_the_scripted_stream() {
    let m = MockServer::start(MockConfig::default()).await;
    let c = client(&m.url, Some(Duration::from_secs(10)));
    assert_eq!(c.base_url(), format!("http://{}", m.addr));
    for api in [Api::Chat, Api::Completions] {
        m.push(Script {
            cached_tokens: Some(3),
            ..Script::ok(Duration::from_millis(80), Duration::from_millis(30), 5)
        });
        let now = c.clock().now_s();
        let rec = c
            .stream(
                &GenRequest::greedy(api, "mock-model", "hello", 5),
                0,
                "x",
                now,
            )
            .await;
        assert!(rec.ok(), "{:?}", rec.error);
        assert_eq!(rec.chunk_times_s.len(), 5, "{api:?}");
        assert_eq!(rec.text, "t0 t1 t2 t3 t4 ");
        assert_eq!(
            (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens),
            (Some(11), Some(5), Some(3))
        );
        let ttft = ms(rec.ttft_s().unwrap());
        assert!(
            (80.0..180.0).contains(&ttft),
            "ttft {ttft} ms vs scripted 80 ms"
        );
        for gap in rec.itl_s() {
            let gap = ms(gap);
            assert!(
                (29.0..100.0).contains(&gap),
                "gap {gap} ms vs scripted 30 ms"
            );
        }
        // Against the instants the mock actually handed each chunk over: within 1 ms.
        let sent: Vec<f64> = m
            .recorded()
            .chunk_sent
            .last()
            .unwrap()
            .iter()
            .map(|t| c.clock().at_s(*t))
            .collect();
        assert_eq!(sent.len(), rec.chunk_times_s.len());
        for (s, r) in sent.iter().zip(&rec.chunk_times_s) {
            let lag = ms(r - s);
            assert!(
                (0.0..1.0).contains(&lag),
                "chunk seen {lag:.3} ms after it was sent"
            );
        }
    }
    let bodies = &m.recorded().bodies;
    assert_eq!(bodies[0]["stream_options"]["include_usage"], true);
    assert_eq!(bodies[1]["prompt"], "hello");
}

#[tokio::test]
async fn client_turns_every_failure_into_a_record() {
    let m = MockServer::start(MockConfig::default()).await;
    let c = client(&m.url, Some(Duration::from_millis(400)));
    let req = GenRequest::greedy(Api::Chat, "mock-model", "hi", 4);
    let cases = [
        (
            Failure::Status(400, "prompt too long".into()),
            ErrorKind::HttpStatus,
        ),
        (Failure::Malformed("{oops".into()), ErrorKind::Protocol),
        (Failure::DropAfter(2), ErrorKind::Protocol),
        (Failure::NoDone, ErrorKind::Protocol),
        (Failure::NeverAnswer, ErrorKind::Timeout),
    ];
    for (i, (failure, kind)) in cases.into_iter().enumerate() {
        m.push(Script::failing(failure.clone()));
        let rec = c.stream(&req, i, "f", c.clock().now_s()).await;
        let err = rec
            .error
            .clone()
            .unwrap_or_else(|| panic!("{failure:?} gave no error"));
        assert_eq!(err.kind, kind, "{failure:?}: {}", err.message);
        assert_eq!(rec.index, i);
        if kind == ErrorKind::HttpStatus {
            assert_eq!(
                (err.status, err.message.as_str()),
                (Some(400), "prompt too long")
            );
        }
        if failure == Failure::DropAfter(2) {
            assert_eq!(
                rec.chunk_times_s.len(),
                2,
                "chunks before the drop are kept"
            );
        }
    }
    let dead = client("http://127.0.0.1:9", Some(Duration::from_secs(5)));
    let rec = dead.stream(&req, 0, "c", 0.0).await;
    assert_eq!(rec.error.unwrap().kind, ErrorKind::Connect);
}

fn out_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("probe-cw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cw_config(out: &std::path::Path) -> ColdWarmConfig {
    ColdWarmConfig {
        out: out.to_path_buf(),
        day: "day-test".into(),
        warm: 3,
        max_tokens: 4,
        sample_interval_s: 0.05,
        request_timeout_s: 5.0,
        ready_timeout_s: 20.0,
        ..Default::default()
    }
}

/// The report's table row starting with `| label |`, split into cells.
fn table_row(report: &str, label: &str) -> Vec<String> {
    let line = report
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label} in:\n{report}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[tokio::test]
async fn cold_warm_attached_to_mock_reports_scripted_latencies() {
    let startup =
        serde_json::json!({"phases": {"weights_load": 1.25, "warmup": 0.5, "total": 2.0}});
    let m = MockServer::start(MockConfig {
        metrics: std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/metrics_vllm.txt"
        ))
        .unwrap(),
        startup: Some(startup),
        ..Default::default()
    })
    .await;
    let timings = |prefill: f64| {
        Some(
            serde_json::json!({"queued_s": 0.002, "prefill_s": prefill, "decode_s": 0.01, "preempted_s": 0.0}),
        )
    };
    m.push(Script {
        timings: timings(0.12),
        ..Script::ok(Duration::from_millis(150), Duration::from_millis(10), 4)
    });
    for _ in 0..3 {
        m.push(Script {
            timings: timings(0.02),
            ..Script::ok(Duration::from_millis(30), Duration::from_millis(10), 4)
        });
    }
    let out = out_dir("attach");
    let mut cfg = cw_config(&out);
    cfg.url = Some(m.url.clone());
    let res = coldwarm::run(cfg, &Progress::quiet()).await.unwrap();
    assert_eq!(
        m.recorded().reset_prefix_cache_calls,
        1,
        "attach mode resets the prefix cache"
    );
    assert_eq!(res.records.len(), 4);
    let cold = res.records[0].ttft_s().unwrap() * 1e3;
    assert!(
        (150.0..250.0).contains(&cold),
        "cold TTFT {cold} ms vs scripted 150 ms"
    );
    for w in &res.records[1..] {
        let t = w.ttft_s().unwrap() * 1e3;
        assert!(
            (30.0..120.0).contains(&t),
            "warm TTFT {t} ms vs scripted 30 ms"
        );
    }
    assert_eq!(res.info.served_model.as_deref(), Some("mock-model"));
    let report = std::fs::read_to_string(&res.report).unwrap();
    assert!(
        !report.contains("{{") && !report.contains("{%"),
        "unrendered template:\n{report}"
    );
    let cold_row = table_row(&report, "cold_1");
    let reported: f64 = cold_row[2]
        .parse()
        .unwrap_or_else(|_| panic!("TTFT cell {:?}", cold_row[2]));
    assert!(
        (reported - cold).abs() < 0.051,
        "report {reported} vs record {cold}"
    );
    assert_eq!(
        cold_row[7], "4",
        "output tokens (after prompt and cached prompt tokens)"
    );
    assert!(table_row(&report, "warm_1")[2].parse::<f64>().is_ok());
    let variance = report
        .lines()
        .skip_while(|l| !l.starts_with("## Warm-Run Variance"))
        .nth(4)
        .unwrap();
    let cells: Vec<&str> = variance
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect();
    assert_eq!(&cells[..2], &["3", "3"]);
    for c in &cells[2..] {
        let v: f64 = c.parse().unwrap_or_else(|_| panic!("variance cell {c:?}"));
        assert!((30.0..120.0).contains(&v), "{v}");
    }
    assert!(
        report.contains("slower"),
        "cold/warm factor sentence:\n{report}"
    );
    assert!(
        report.contains("first prefill"),
        "attribution from server timings:\n{report}"
    );
    assert!(
        report.contains("reset_prefix_cache"),
        "says what was done to keep cold cold"
    );
    // Attach mode watches no process: the reason, not a number.
    assert!(
        report.contains("not available (no server process watched (attach mode))"),
        "{report}"
    );
    // GPU rows hold a value or the reason NVML is missing.
    let gpu_row = table_row(&report, "GPU memory used before server start");
    assert!(
        gpu_row[1].ends_with("GiB") || gpu_row[1].starts_with("not available ("),
        "{gpu_row:?}"
    );
    // `probe report` re-renders the same text from the stored data.
    let again = report::render_dir(&res.dir, None, report::Format::Md).unwrap();
    assert_eq!(std::fs::read_to_string(again).unwrap(), report);
    let json = report::render_dir(&res.dir, None, report::Format::Json).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(v["variance"]["ok"], 3);
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn cold_warm_keeps_going_when_requests_fail() {
    let m = MockServer::start(MockConfig::default()).await;
    m.push(Script::default());
    m.push(Script::failing(Failure::Status(
        500,
        "engine exploded".into(),
    )));
    m.push(Script::failing(Failure::NeverAnswer));
    m.push(Script::default());
    let out = out_dir("fail");
    let mut cfg = cw_config(&out);
    cfg.url = Some(m.url.clone());
    cfg.request_timeout_s = 0.3;
    let res = coldwarm::run(cfg, &Progress::quiet()).await.unwrap();
    let kinds: Vec<Option<ErrorKind>> = res
        .records
        .iter()
        .map(|r| r.error.as_ref().map(|e| e.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            None,
            Some(ErrorKind::HttpStatus),
            Some(ErrorKind::Timeout),
            None
        ]
    );
    let report = std::fs::read_to_string(&res.report).unwrap();
    assert!(report.contains("### Failed Requests"), "{report}");
    assert!(report.contains("engine exploded"), "{report}");
    assert!(report.contains("2 of 3 warm runs failed"), "{report}");
    assert_eq!(
        table_row(&report, "warm_1")[1],
        "httpstatus: engine exploded"
    );
    assert!(
        report.contains("| 3 | 1 |"),
        "variance counts the one good warm run:\n{report}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn cold_warm_server_never_ready_writes_partial_results() {
    let out = out_dir("never");
    let mut cfg = cw_config(&out);
    cfg.server_cmd = Some(
        "sh -c 'echo loading weights for port {port}; echo stuck on something >&2; sleep 30'"
            .into(),
    );
    cfg.ready_timeout_s = 1.0;
    let started = std::time::Instant::now();
    let err = coldwarm::run(cfg, &Progress::quiet())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up in time"
    );
    assert!(err.contains("not ready after 1.0 s"), "{err}");
    assert!(
        err.contains("stuck on something") && err.contains("loading weights for port"),
        "{err}"
    );
    let dir = out.join("day-test");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["finished"], false);
    let pid = info["server_pid"].as_u64().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "server process group killed"
    );
    let report = std::fs::read_to_string(dir.join("first_token_latency.md")).unwrap();
    assert!(
        report.contains("Partial results") && report.contains("stuck on something"),
        "{report}"
    );
    assert!(std::fs::read_to_string(dir.join("server.log"))
        .unwrap()
        .contains("stuck on something"));
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn cold_warm_spawns_a_server_reads_its_log_and_stops_it() {
    let exe = std::env::current_exe().unwrap();
    let out = out_dir("spawn");
    let mut cfg = cw_config(&out);
    cfg.server_cmd = Some(format!(
        "env PROBE_MOCK_PORT={{port}} PROBE_MOCK_READY_MS=300 {} --exact mock::child_server --ignored --nocapture",
        exe.display()
    ));
    let res = coldwarm::run(cfg, &Progress::quiet()).await.unwrap();
    let info = &res.info;
    assert_eq!(info.mode, "spawned");
    assert_eq!(info.startup.kv_cache_tokens, Some(23296));
    assert_eq!(
        (
            info.startup.max_concurrency_tokens,
            info.startup.max_concurrency
        ),
        (Some(2048), Some(11.38))
    );
    let ready = info.spawn_to_ready_s.unwrap();
    assert!((0.3..15.0).contains(&ready), "spawn->ready {ready}");
    assert!(res.records.iter().all(|r| r.ok()));
    let pid = info.server_pid.unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "server stopped after the run"
    );
    let report = std::fs::read_to_string(&res.report).unwrap();
    assert!(
        table_row(&report, "Server RSS after cold request")[1].ends_with("MiB"),
        "{report}"
    );
    assert!(
        table_row(&report, "Server CPU during warm runs")[1].ends_with('%'),
        "{report}"
    );
    assert!(table_row(&report, "KV cache size")[1] == "23296 tokens");
    assert!(report.contains("from spawn to ready"), "{report}");
    assert!(report.contains("PROBE_MOCK_PORT="), "launch command shown");
    let _ = std::fs::remove_dir_all(&out);
}

/// The real SmolLM2 GGUF: `$SMOLLM2_GGUF`, else the workspace's `.cache/models` copy.
fn smollm2() -> Option<std::path::PathBuf> {
    let env = std::env::var_os("SMOLLM2_GGUF").map(std::path::PathBuf::from);
    let cached = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    env.into_iter().chain([cached]).find(|p| p.is_file())
}

#[tokio::test]
async fn cold_warm_real_engine() {
    let Some(model) = smollm2() else {
        eprintln!("SKIPPED cold_warm_real_engine: SmolLM2 GGUF not found (set SMOLLM2_GGUF or run scripts/fetch-model.sh)");
        return;
    };
    // Uses $ENGINE_BIN or the engine built next to this test; builds it (release) otherwise.
    if let Err(e) = probe::server::engine_bin_or_build().await {
        panic!("engine binary unavailable: {e}");
    }
    let out = out_dir("real");
    let mut cfg = cw_config(&out);
    cfg.model = Some(model);
    cfg.engine_args = Some("--device cpu".into());
    cfg.warm = 2;
    cfg.max_tokens = 8;
    cfg.prompt = "What is the capital of France?".into();
    cfg.request_timeout_s = 120.0;
    cfg.ready_timeout_s = 300.0;
    let res = coldwarm::run(cfg, &Progress::auto()).await.unwrap();
    assert!(res.records.iter().all(|r| r.ok()), "{:?}", res.records);
    assert!(
        res.records[0].text.contains("Paris"),
        "greedy answer: {:?}",
        res.records[0].text
    );
    assert!(
        res.info.startup.kv_cache_tokens.is_some(),
        "KV cache size line parsed"
    );
    assert!(
        res.info.startup.phase("weights_load").is_some(),
        "engine startup phases fetched"
    );
    let report = std::fs::read_to_string(&res.report).unwrap();
    let cold = table_row(&report, "cold_1");
    let warm = table_row(&report, "warm_1");
    eprintln!(
        "real engine on CPU: cold TTFT {} ms, warm TTFT {} ms, spawn->ready {:.2} s",
        cold[2],
        warm[2],
        res.info.spawn_to_ready_s.unwrap()
    );
    assert!(cold[2].parse::<f64>().unwrap() > 0.0 && warm[2].parse::<f64>().unwrap() > 0.0);
    assert!(
        report.contains("weights load"),
        "startup attribution:\n{report}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `probe report DIR | head -0`: the reader is gone before the probe prints; the probe must end
/// without a panic (killed by SIGPIPE like other Unix tools, or done before it noticed).
#[test]
fn closed_stdout_ends_the_probe_without_a_panic() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../days/day-007-vllm-runtime-probes");
    let dir = std::env::temp_dir().join(format!("probe-epipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["run.json", "records.json", "samples.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_probe"))
        .arg("report")
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        dir.join("first_token_latency.md").is_file(),
        "the report is still written"
    );
    std::fs::remove_dir_all(&dir).ok();
}
