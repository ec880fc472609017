//! engine-bench end to end on the CPU: the real binary times a tiny dummy model and writes its
//! report (decode rows per batch, prefill rows per length, each against its floor).

use super::common::tiny_model_dir;
use std::process::Command;

/// The numeric cells of the markdown table row that starts with `| <first> |`.
fn row_cells(md: &str, first: &str) -> Vec<String> {
    let start = format!("| {first} |");
    let line = md
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("no row {start:?} in:\n{md}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn engine_bench_times_decode_and_prefill_against_their_floors_on_the_cpu() {
    let dir = tiny_model_dir("engine-bench");
    let out = dir.join("bench.md");
    let run = Command::new(env!("CARGO_BIN_EXE_engine-bench"))
        .args(["--model", dir.join("config.json").to_str().unwrap()])
        .args(["--device", "cpu", "--batch-sizes", "1,3", "--context", "40"])
        .args([
            "--prefill",
            "16,24",
            "--iters",
            "2",
            "--matmul-size",
            "64",
            "--copy-mib",
            "16",
        ])
        .args(["--without", "silu", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "engine-bench failed:\n{stderr}");
    let md = std::fs::read_to_string(&out).unwrap();
    assert!(md.contains("(2 layers,"), "{md}");
    assert!(md.contains("Run without: silu."), "{md}");
    // Decode: runner step, forward, (no events on the CPU), floor, ratio, tok/s.
    for batch in ["1", "3"] {
        let c = row_cells(&md, batch);
        let step: f64 = c[1].parse().unwrap();
        let floor: f64 = c[5].parse().unwrap();
        let ratio: f64 = c[6].trim_end_matches('x').parse().unwrap();
        assert!(step > 0.0 && floor > 0.0, "{c:?}");
        assert_eq!((c[3].as_str(), c[4].as_str()), ("-", "-"), "{c:?}");
        assert!((ratio - step / floor).abs() <= 0.01 + 0.01 * ratio, "{c:?}");
    }
    // Prefill: a row per length with a positive forward time and matmul floor.
    for tokens in ["16", "24"] {
        let c = row_cells(&md, tokens);
        let forward: f64 = c[1].parse().unwrap();
        assert!(forward > 0.0, "{c:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn engine_bench_names_the_paths_it_can_run_without() {
    let dir = tiny_model_dir("engine-bench-without");
    let run = Command::new(env!("CARGO_BIN_EXE_engine-bench"))
        .args(["--model", dir.join("config.json").to_str().unwrap()])
        .args(["--device", "cpu", "--without", "turbo"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("--without turbo: not one of silu, rope,")
            && stderr.contains("tensor-cores"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
