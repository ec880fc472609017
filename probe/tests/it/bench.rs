//! `probe bench` / `probe compare` against the scripted mock server: every summary number checked
//! against the script and the mock's own send times; failures counted by kind; output files.

use crate::mock::{Failure, MockConfig, MockServer, Script};
use probe::bench::compare::compare;
use probe::bench::dataset::DatasetSpec;
use probe::bench::output::{write_run, RunData};
use probe::bench::run::{run, BenchConfig, StopReason};
use probe::bench::stats::{compute, Slo};
use probe::bench::summary::{RunInfo, SamplePoint};
use probe::bench::workload::ArrivalPattern;
use probe::client::Api;
use probe::clock::Clock;
use probe::record::{ErrorKind, RequestRecord};
use std::time::Duration;
use tokio::sync::watch;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn config(url: &str, n: usize, arrival: ArrivalPattern) -> BenchConfig {
    BenchConfig {
        base_url: url.to_string(),
        model: "mock-model".into(),
        api: Api::Completions,
        arrival,
        num_prompts: n,
        dataset: DatasetSpec::Random {
            num_prompts: n,
            input_len: 16,
            output_len: 8,
            range_ratio: 0.0,
            prefix_len: 0,
        },
        server_tokenizer: false,
        request_timeout_s: 0.5,
        progress: false,
        ..BenchConfig::default()
    }
}

fn never() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    std::mem::forget(tx);
    rx
}

fn out_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("probe-bench-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn assert_png(path: &std::path::Path) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() > 2000, "{} too small", path.display());
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_run_matches_hand_computed_stats() {
    let m = MockServer::start(MockConfig::default()).await;
    // Sent 50 ms apart, so they reach the mock in order and take its scripts in order.
    m.push(Script::ok(ms(30), ms(10), 3)); // 0: ok, ttft 30, itl 10 10
    m.push(Script::failing(Failure::Status(503, "overloaded".into()))); // 1
    m.push(Script::failing(Failure::Malformed("{not json".into()))); // 2
    m.push(Script::ok(ms(60), ms(20), 5)); // 3: ok, ttft 60, itl 20 x4
    m.push(Script::failing(Failure::DropAfter(1))); // 4
    m.push(Script::failing(Failure::NoDone)); // 5
    m.push(Script::failing(Failure::NeverAnswer)); // 6: times out at 0.5 s
    let clock = Clock::start();
    let cfg = config(&m.url, 7, ArrivalPattern::Constant { rate: 20.0 });
    let out = run(&cfg, clock, None, never()).await.unwrap();
    assert_eq!(out.stopped, None);
    assert_eq!(out.records.len(), 7, "every issued request yields a record");
    let s = compute(&out.records, &Slo::default());
    assert_eq!((s.completed, s.failed), (2, 5));
    let kinds = &s.failures_by_kind;
    assert_eq!(kinds.get("http_status"), Some(&1));
    assert_eq!(kinds.get("protocol"), Some(&3));
    assert_eq!(kinds.get("timeout"), Some(&1));
    assert_eq!((s.total_input_tokens, s.total_output_tokens), (22, 8));
    let r = &out.records;
    assert_eq!(r[1].error.as_ref().unwrap().status, Some(503));
    assert_eq!(r[6].error.as_ref().unwrap().kind, ErrorKind::Timeout);
    // Scheduled exactly 50 ms apart.
    for (i, rec) in r.iter().enumerate() {
        assert!((rec.scheduled_s - r[0].scheduled_s - i as f64 * 0.05).abs() < 1e-9);
    }
    // Duration: exact from the records.
    let end = r.iter().map(|x| x.end_s).fold(0.0, f64::max);
    assert_eq!(s.duration, end - r[0].scheduled_s);
    assert!((s.duration - 0.8).abs() < 0.05, "duration {}", s.duration);
    assert!((s.request_throughput - 2.0 / s.duration).abs() < 1e-12);

    // Ground truth: the mock's own chunk send times. Slots go to requests that got a stream, in
    // order (0, 2, 3, 4, 5): request 3 is slot 2. The client sees each chunk after the mock sent
    // it, within loopback and scheduling lag (a few ms at most on a loaded 2-core machine).
    const LAG_S: f64 = 0.010;
    let sent = m.recorded().chunk_sent.clone();
    let at = |i: usize| -> Vec<f64> { sent[i].iter().map(|t| clock.at_s(*t)).collect() };
    let (t0, t3) = (at(0), at(2));
    assert_eq!((t0.len(), t3.len()), (3, 5));
    for (rec, truth) in [(&r[0], &t0), (&r[3], &t3)] {
        assert_eq!(rec.chunk_times_s.len(), truth.len());
        for (got, want) in rec.chunk_times_s.iter().zip(truth.iter()) {
            assert!(
                got - want >= 0.0 && got - want < LAG_S,
                "chunk seen {got}, sent {want}"
            );
        }
    }
    // The statistics, computed by hand from the records' own times.
    let (c0, c3) = (&r[0].chunk_times_s, &r[3].chunk_times_s);
    let ttft = [(c0[0] - r[0].sent_s) * 1e3, (c3[0] - r[3].sent_s) * 1e3];
    assert!((s.ttft_ms.mean - (ttft[0] + ttft[1]) / 2.0).abs() < 1e-6);
    // And the script: TTFT 30 / 60 ms plus loopback and scheduling slack.
    assert!(
        ttft[0] >= 30.0 && ttft[0] < 30.0 + 1e3 * LAG_S + 5.0,
        "{ttft:?}"
    );
    assert!(
        ttft[1] >= 60.0 && ttft[1] < 60.0 + 1e3 * LAG_S + 5.0,
        "{ttft:?}"
    );
    let gaps: Vec<f64> = c0
        .windows(2)
        .chain(c3.windows(2))
        .map(|w| (w[1] - w[0]) * 1e3)
        .collect();
    let hand_itl_mean = gaps.iter().sum::<f64>() / 6.0;
    assert!((s.itl_ms.mean - hand_itl_mean).abs() < 1e-6);
    assert!((hand_itl_mean - (10.0 * 2.0 + 20.0 * 4.0) / 6.0).abs() < 5.0);
    assert_eq!(s.itl_ms.count, 6);
    // TPOT = (e2e - ttft)/(n - 1) = (end - first chunk)/(n - 1); [DONE] follows the last chunk.
    assert!(r[0].end_s - c0[2] < LAG_S && r[3].end_s - c3[4] < LAG_S);
    let hand_tpot = [
        (r[0].end_s - c0[0]) / 2.0 * 1e3,
        (r[3].end_s - c3[0]) / 4.0 * 1e3,
    ];
    assert!((s.tpot_ms.mean - (hand_tpot[0] + hand_tpot[1]) / 2.0).abs() < 1e-6);
    assert!(
        (s.tpot_ms.mean - 15.0).abs() < 5.0,
        "tpot {}",
        s.tpot_ms.mean
    );
    assert!(s.max_concurrent_requests >= 1);

    // Output folder: every file, plots valid, report names the failures.
    let dir = out_dir("scripted");
    let info = RunInfo {
        label: "scripted".into(),
        ..Default::default()
    };
    let samples = vec![
        SamplePoint {
            t_s: 0.0,
            metric: "vllm:kv_cache_usage_perc".into(),
            value: 0.1,
        },
        SamplePoint {
            t_s: 1.0,
            metric: "vllm:kv_cache_usage_perc".into(),
            value: 0.4,
        },
        SamplePoint {
            t_s: 0.0,
            metric: "vllm:num_requests_waiting".into(),
            value: 3.0,
        },
        SamplePoint {
            t_s: 1.0,
            metric: "vllm:num_requests_waiting".into(),
            value: 0.0,
        },
    ];
    let data = RunData {
        info: &info,
        records: &out.records,
        samples: &samples,
        planned: out.planned,
        stopped: None,
        slo: Slo::default(),
        stage_rates: &[],
        template: None,
    };
    let written = write_run(&dir, &data).unwrap();
    assert_eq!(written, s);
    let summary = std::fs::read_to_string(dir.join("summary.txt")).unwrap();
    assert!(summary.starts_with("============ Serving Benchmark Result ============\n"));
    assert!(summary.contains(&format!("{:<40} {:<10}", "Successful requests:", 2)));
    assert!(summary.contains(&format!("{:<40} {:<10}", "Failed requests:", 5)));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(json["completed"], 2);
    assert_eq!(json["total_output_tokens"], 8);
    let csv = std::fs::read_to_string(dir.join("requests.csv")).unwrap();
    assert_eq!(csv.lines().count(), 8);
    assert!(csv.contains("http_status") && csv.contains("timeout"));
    for p in [
        "ttft_per_request",
        "tpot_per_request",
        "latency_percentiles",
        "kv_cache_usage",
        "queue",
    ] {
        assert_png(&dir.join("plots").join(format!("{p}.png")));
    }
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        report.contains("| 1 | http_status | 503 | overloaded |"),
        "{report}"
    );
    assert!(report.contains("![plots/ttft_per_request.png]"));
    assert!(report.contains("TPOT | (E2EL - TTFT) / (output tokens - 1)"));

    // A second run and the comparison report.
    let dir_b = out_dir("scripted-b");
    write_run(
        &dir_b,
        &RunData {
            info: &RunInfo {
                label: "b".into(),
                ..Default::default()
            },
            ..data
        },
    )
    .unwrap();
    let cmp = out_dir("compare");
    let path = compare(&[dir.clone(), dir_b.clone()], &cmp, None).unwrap();
    let md = std::fs::read_to_string(path).unwrap();
    assert!(md.contains("| Successful requests | 2.00 | 2.00 |"), "{md}");
    for p in ["compare_ttft", "compare_tpot", "compare_kv_cache_usage"] {
        assert_png(&cmp.join("plots").join(format!("{p}.png")));
    }
    assert!(compare(std::slice::from_ref(&dir), &cmp, None).is_err());
    for d in [dir, dir_b, cmp] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_cap_queues_and_latency_counts_from_send() {
    let cfg_script = MockConfig {
        default_script: Script::ok(ms(40), ms(5), 2),
        ..Default::default()
    };
    let m = MockServer::start(cfg_script).await;
    let mut cfg = config(&m.url, 4, ArrivalPattern::Burst { window_s: 0.0 });
    cfg.max_concurrency = Some(1);
    let out = run(&cfg, Clock::start(), None, never()).await.unwrap();
    let s = compute(&out.records, &Slo::default());
    assert_eq!(s.completed, 4);
    assert_eq!(s.max_concurrent_requests, 1);
    // Each waits for the previous (~45 ms each): queueing grows, and TTFT leaves it out (vLLM
    // measures from the send); the queue is its own distribution.
    let q: Vec<f64> = out
        .records
        .iter()
        .map(|r| r.sent_s - r.scheduled_s)
        .collect();
    assert!(q[0] < 0.01 && q[3] > 0.12, "queueing {q:?}");
    let r3 = &out.records[3];
    let ttft3 = r3.ttft_s().unwrap();
    assert!((0.04..0.08).contains(&ttft3), "ttft {ttft3} queue {}", q[3]);
    assert!((ttft3 + q[3] - (r3.chunk_times_s[0] - r3.scheduled_s)).abs() < 1e-9);
    assert!((s.queue_ms.max - q[3] * 1e3).abs() < 1e-6);
    // ignore_eos and min_tokens are asked for with the dataset's output length.
    let bodies = &m.recorded().bodies;
    assert_eq!(bodies[0]["ignore_eos"], true);
    assert_eq!(bodies[0]["max_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_server_ends_the_run_with_partial_results() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = config(
        &format!("http://127.0.0.1:{port}"),
        50,
        ArrivalPattern::Constant { rate: 100.0 },
    );
    let out = run(&cfg, Clock::start(), None, never()).await.unwrap();
    assert!(
        matches!(out.stopped, Some(StopReason::ServerDown(_))),
        "{:?}",
        out.stopped
    );
    assert!(
        out.records.len() >= 3 && out.records.len() < 50,
        "{}",
        out.records.len()
    );
    assert!(out
        .records
        .iter()
        .all(|r| r.error.as_ref().unwrap().kind == ErrorKind::Connect));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_cancels_in_flight_and_keeps_finished() {
    let m = MockServer::start(MockConfig {
        default_script: Script::ok(ms(400), ms(10), 2),
        ..Default::default()
    })
    .await;
    m.push(Script::ok(ms(10), ms(10), 2));
    let cfg = config(&m.url, 10, ArrivalPattern::Constant { rate: 20.0 });
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(ms(200)).await;
        let _ = tx.send(true);
    });
    let out = run(&cfg, Clock::start(), None, rx).await.unwrap();
    assert_eq!(out.stopped, Some(StopReason::Interrupted));
    let recs: &[RequestRecord] = &out.records;
    assert!(recs.len() >= 3 && recs.len() < 10, "{}", recs.len());
    assert!(recs[0].ok());
    assert!(recs[1..]
        .iter()
        .all(|r| r.error.as_ref().unwrap().kind == ErrorKind::Cancelled));
}

/// Throughput of the probe itself: a mock answering at once (one chunk), many requests.
/// Run: `cargo test -p probe --release --test it bench::probe_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a unit test"]
async fn probe_throughput() {
    let m = MockServer::start(MockConfig {
        default_script: Script::ok(Duration::ZERO, Duration::ZERO, 1),
        ..Default::default()
    })
    .await;
    // Overhead: sequential requests, TTFT/E2EL against a server that waits 0 ms.
    let mut cfg = config(&m.url, 500, ArrivalPattern::Burst { window_s: 0.0 });
    cfg.max_concurrency = Some(1);
    let out = run(&cfg, Clock::start(), None, never()).await.unwrap();
    let s = compute(&out.records, &Slo::default());
    let service: Vec<f64> = out
        .records
        .iter()
        .map(|r| (r.end_s - r.sent_s) * 1e3)
        .collect();
    let first: Vec<f64> = out
        .records
        .iter()
        .filter_map(|r| r.chunk_times_s.first().map(|t| (t - r.sent_s) * 1e3))
        .collect();
    let (sd, fd) = (
        probe::bench::stats::Distribution::of(&service),
        probe::bench::stats::Distribution::of(&first),
    );
    println!(
        "sequential (concurrency 1): {} ok; sent->first chunk mean {:.3} ms p99 {:.3} ms; \
         sent->[DONE] mean {:.3} ms p99 {:.3} ms",
        s.completed,
        fd.mean,
        fd.p(99.0),
        sd.mean,
        sd.p(99.0)
    );
    let n = 20_000;
    let mut cfg = config(&m.url, n, ArrivalPattern::Burst { window_s: 0.0 });
    cfg.max_concurrency = Some(512);
    cfg.dataset = DatasetSpec::Random {
        num_prompts: 64,
        input_len: 16,
        output_len: 1,
        range_ratio: 0.0,
        prefix_len: 0,
    };
    let t = std::time::Instant::now();
    let out = run(&cfg, Clock::start(), None, never()).await.unwrap();
    let wall = t.elapsed().as_secs_f64();
    let s = compute(&out.records, &Slo::default());
    println!(
        "burst of {n} at concurrency 512: {} ok, {} failed in {:.2} s = {:.0} streamed requests/s \
         (wall incl. planning); stats duration {:.2} s = {:.0} req/s; mean queue {:.2} ms",
        s.completed,
        s.failed,
        wall,
        s.completed as f64 / wall,
        s.duration,
        s.request_throughput,
        s.queue_ms.mean
    );
    assert_eq!(s.completed, n);
}
