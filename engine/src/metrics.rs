//! Engine metrics the core updates and `/metrics` renders in Prometheus text format, vLLM's names.
//!
//! Names, types, labels and histogram buckets follow vLLM v1 (`vllm/v1/metrics/loggers.py`), so
//! dashboards and scrapers built for vLLM read this engine unchanged.

use crate::core::FinishReason;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's `vllm:inter_token_latency_seconds` buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request-latency buckets (e2e, queue, prefill, decode).
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistState>,
}

#[derive(Debug, Clone, Default)]
struct HistState {
    /// Non-cumulative count per bucket; the last is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistState {
                counts: vec![0; bounds.len() + 1],
                ..Default::default()
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.counts[i] += 1;
        s.sum += v;
        s.count += 1;
    }

    /// (count, sum) of all observations.
    pub fn count_sum(&self) -> (u64, f64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.count, s.sum)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += s.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cum}", num(*b));
        }
        cum += s.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", num(s.sum));
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.count);
    }
}

/// Prometheus number text, Python-client style (`1.0`, `0.25`).
fn num(v: f64) -> String {
    if v.is_finite() && v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Live engine numbers, shared between the core thread (writer) and HTTP handlers (readers).
#[derive(Debug)]
pub struct EngineMetrics {
    model_name: String,
    num_requests_running: AtomicU64,
    num_requests_waiting: AtomicU64,
    /// f64 bits.
    kv_cache_usage: AtomicU64,
    num_preemptions: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    prefix_cache_queries: AtomicU64,
    prefix_cache_hits: AtomicU64,
    /// stop, length, abort.
    request_success: [AtomicU64; 3],
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_prefill_time: Histogram,
    pub request_decode_time: Histogram,
    /// Time requests spent preempted (recompute or swapped out).
    pub request_preempted_time: Histogram,
    swaps_out: AtomicU64,
    swaps_in: AtomicU64,
    swap_bytes: AtomicU64,
    cache_config: Mutex<Vec<(String, String)>>,
    startup_phases: Mutex<Vec<(String, f64)>>,
    tensor_parallel_size: AtomicU64,
}

/// Server-side durations of one finished request, seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct FinishedRequestStats {
    pub e2e_s: f64,
    pub queue_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub preempted_s: f64,
}

impl EngineMetrics {
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            num_requests_running: AtomicU64::new(0),
            num_requests_waiting: AtomicU64::new(0),
            kv_cache_usage: AtomicU64::new(0f64.to_bits()),
            num_preemptions: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            request_success: Default::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(REQUEST_LATENCY_BUCKETS),
            request_queue_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            request_prefill_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            request_decode_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            request_preempted_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            swaps_out: AtomicU64::new(0),
            swaps_in: AtomicU64::new(0),
            swap_bytes: AtomicU64::new(0),
            cache_config: Mutex::new(Vec::new()),
            startup_phases: Mutex::new(Vec::new()),
            tensor_parallel_size: AtomicU64::new(1),
        }
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Scheduler state after a step.
    pub fn set_scheduler_state(&self, running: usize, waiting: usize, kv_cache_usage: f64) {
        self.num_requests_running
            .store(running as u64, Ordering::Relaxed);
        self.num_requests_waiting
            .store(waiting as u64, Ordering::Relaxed);
        self.kv_cache_usage
            .store(kv_cache_usage.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    pub fn add_preemptions(&self, n: u64) {
        self.num_preemptions.fetch_add(n, Ordering::Relaxed);
    }
    /// Requests swapped out and in, and the KV bytes the swaps moved (both directions).
    pub fn add_swaps(&self, out: u64, into: u64, bytes: u64) {
        self.swaps_out.fetch_add(out, Ordering::Relaxed);
        self.swaps_in.fetch_add(into, Ordering::Relaxed);
        self.swap_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    /// (swapped out, swapped in, bytes moved) since start.
    pub fn swaps(&self) -> (u64, u64, u64) {
        (
            self.swaps_out.load(Ordering::Relaxed),
            self.swaps_in.load(Ordering::Relaxed),
            self.swap_bytes.load(Ordering::Relaxed),
        )
    }
    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_generation_tokens(&self, n: u64) {
        self.generation_tokens.fetch_add(n, Ordering::Relaxed);
    }
    /// Prefix-cache lookups, in tokens queried and tokens hit.
    pub fn add_prefix_cache(&self, queries: u64, hits: u64) {
        self.prefix_cache_queries
            .fetch_add(queries, Ordering::Relaxed);
        self.prefix_cache_hits.fetch_add(hits, Ordering::Relaxed);
    }

    /// Counts a finished request and its latencies (aborted ones count only as `abort`).
    pub fn record_finished(&self, reason: FinishReason, stats: Option<FinishedRequestStats>) {
        let i = match reason {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
        };
        self.request_success[i].fetch_add(1, Ordering::Relaxed);
        if let Some(s) = stats {
            self.e2e_request_latency.observe(s.e2e_s);
            self.request_queue_time.observe(s.queue_s);
            self.request_prefill_time.observe(s.prefill_s);
            self.request_decode_time.observe(s.decode_s);
            self.request_preempted_time.observe(s.preempted_s);
        }
    }

    /// Key/value pairs of `vllm:cache_config_info` (block_size, num_gpu_blocks, ...).
    pub fn set_cache_config_info(&self, kv: Vec<(String, String)>) {
        *self.cache_config.lock().unwrap_or_else(|e| e.into_inner()) = kv;
    }

    /// Ranks the model runs on (`engine_tensor_parallel_size`).
    pub fn set_tensor_parallel_size(&self, n: usize) {
        self.tensor_parallel_size.store(n as u64, Ordering::Relaxed);
    }

    /// Records how long one startup phase took (`engine_startup_phase_seconds{phase=..}`).
    pub fn set_startup_phase(&self, phase: &str, seconds: f64) {
        let mut p = self
            .startup_phases
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match p.iter_mut().find(|(k, _)| k == phase) {
            Some(e) => e.1 = seconds,
            None => p.push((phase.to_string(), seconds)),
        }
    }

    pub fn num_requests_running(&self) -> u64 {
        self.num_requests_running.load(Ordering::Relaxed)
    }
    pub fn num_requests_waiting(&self) -> u64 {
        self.num_requests_waiting.load(Ordering::Relaxed)
    }
    pub fn kv_cache_usage(&self) -> f64 {
        f64::from_bits(self.kv_cache_usage.load(Ordering::Relaxed))
    }
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions.load(Ordering::Relaxed)
    }
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }
    pub fn generation_tokens(&self) -> u64 {
        self.generation_tokens.load(Ordering::Relaxed)
    }
    /// Prefix-cache (queried, hit) tokens so far.
    pub fn prefix_cache(&self) -> (u64, u64) {
        (
            self.prefix_cache_queries.load(Ordering::Relaxed),
            self.prefix_cache_hits.load(Ordering::Relaxed),
        )
    }
    pub fn requests_finished(&self, reason: FinishReason) -> u64 {
        let i = match reason {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
        };
        self.request_success[i].load(Ordering::Relaxed)
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let labels = format!("engine=\"0\",model_name=\"{}\"", escape(&self.model_name));
        let mut o = String::new();
        let scalar = |o: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}"
            );
        };
        let u = |a: &AtomicU64| num(a.load(Ordering::Relaxed) as f64);
        scalar(
            &mut o,
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            u(&self.num_requests_running),
        );
        scalar(
            &mut o,
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            u(&self.num_requests_waiting),
        );
        scalar(
            &mut o,
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            num(self.kv_cache_usage()),
        );
        scalar(
            &mut o,
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            u(&self.num_preemptions),
        );
        scalar(
            &mut o,
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            u(&self.prompt_tokens),
        );
        scalar(
            &mut o,
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            u(&self.generation_tokens),
        );
        scalar(
            &mut o,
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            u(&self.prefix_cache_queries),
        );
        scalar(
            &mut o,
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            u(&self.prefix_cache_hits),
        );
        let name = "vllm:request_success_total";
        let _ = writeln!(
            o,
            "# HELP {name} Count of successfully processed requests.\n# TYPE {name} counter"
        );
        for (i, reason) in ["stop", "length", "abort"].iter().enumerate() {
            let _ = writeln!(
                o,
                "{name}{{{labels},finished_reason=\"{reason}\"}} {}",
                u(&self.request_success[i])
            );
        }
        {
            let name = "vllm:num_swaps_total";
            let _ = writeln!(
                o,
                "# HELP {name} Cumulative number of requests swapped between GPU and CPU KV pools.\n# TYPE {name} counter"
            );
            for (dir, a) in [("out", &self.swaps_out), ("in", &self.swaps_in)] {
                let _ = writeln!(o, "{name}{{{labels},direction=\"{dir}\"}} {}", u(a));
            }
        }
        scalar(
            &mut o,
            "engine_swap_bytes_total",
            "counter",
            "KV-cache bytes copied by swaps, both directions.",
            u(&self.swap_bytes),
        );
        let hists: [(&Histogram, &str, &str); 7] = [
            (
                &self.time_to_first_token,
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
            ),
            (
                &self.inter_token_latency,
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
            ),
            (
                &self.e2e_request_latency,
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
            ),
            (
                &self.request_queue_time,
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
            ),
            (
                &self.request_prefill_time,
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
            ),
            (
                &self.request_decode_time,
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
            ),
            (
                &self.request_preempted_time,
                "engine_request_preempted_time_seconds",
                "Histogram of time requests spent preempted (recompute or swapped).",
            ),
        ];
        for (h, name, help) in hists {
            h.render(&mut o, name, help, &labels);
        }
        let cfg = self
            .cache_config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !cfg.is_empty() {
            let name = "vllm:cache_config_info";
            let kv: Vec<String> = cfg
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(
                o,
                "# HELP {name} Information of the LLMEngine CacheConfig\n# TYPE {name} gauge\n{name}{{{},{labels}}} 1.0",
                kv.join(",")
            );
        }
        let name = "engine_tensor_parallel_size";
        let _ = writeln!(
            o,
            "# HELP {name} Ranks the model is split over (tensor parallelism).\n# TYPE {name} gauge\n{name}{{{labels}}} {}",
            self.tensor_parallel_size.load(Ordering::Relaxed)
        );
        let phases = self
            .startup_phases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !phases.is_empty() {
            let name = "engine_startup_phase_seconds";
            let _ = writeln!(
                o,
                "# HELP {name} Seconds each engine startup phase took.\n# TYPE {name} gauge"
            );
            for (phase, s) in phases {
                let _ = writeln!(
                    o,
                    "{name}{{{labels},phase=\"{}\"}} {}",
                    escape(&phase),
                    num(s)
                );
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, line_start: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no line {line_start}\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn renders_vllm_names_types_and_labels() {
        let m = EngineMetrics::new("smol\"lm");
        m.set_scheduler_state(3, 2, 0.25);
        m.add_preemptions(4);
        m.add_prompt_tokens(100);
        m.add_generation_tokens(7);
        m.record_finished(FinishReason::Length, None);
        m.record_finished(FinishReason::Stop, None);
        m.record_finished(FinishReason::Stop, None);
        m.set_cache_config_info(vec![
            ("block_size".into(), "16".into()),
            ("num_gpu_blocks".into(), "512".into()),
        ]);
        m.set_tensor_parallel_size(2);
        m.set_startup_phase("weights_load", 1.5);
        m.set_startup_phase("weights_load", 2.0);
        let t = m.render_prometheus();
        let l = r#"{engine="0",model_name="smol\"lm"}"#;
        assert!(t.contains("# TYPE vllm:num_requests_running gauge\n"));
        assert_eq!(sample(&t, &format!("vllm:num_requests_running{l}")), 3.0);
        assert_eq!(sample(&t, &format!("vllm:num_requests_waiting{l}")), 2.0);
        assert_eq!(sample(&t, &format!("vllm:kv_cache_usage_perc{l}")), 0.25);
        assert!(t.contains("# TYPE vllm:num_preemptions_total counter\n"));
        assert_eq!(sample(&t, &format!("vllm:num_preemptions_total{l}")), 4.0);
        assert_eq!(sample(&t, &format!("vllm:prompt_tokens_total{l}")), 100.0);
        assert_eq!(sample(&t, &format!("vllm:generation_tokens_total{l}")), 7.0);
        let ok = r#"vllm:request_success_total{engine="0",model_name="smol\"lm",finished_reason="#;
        assert_eq!(sample(&t, &format!("{ok}\"stop\"}}")), 2.0);
        assert_eq!(sample(&t, &format!("{ok}\"length\"}}")), 1.0);
        assert_eq!(sample(&t, &format!("{ok}\"abort\"}}")), 0.0);
        assert!(t.contains(
            r#"vllm:cache_config_info{block_size="16",num_gpu_blocks="512",engine="0",model_name="smol\"lm"} 1.0"#
        ));
        assert!(t.contains(
            r#"engine_startup_phase_seconds{engine="0",model_name="smol\"lm",phase="weights_load"} 2.0"#
        ));
        assert!(t.contains(r#"engine_tensor_parallel_size{engine="0",model_name="smol\"lm"} 2"#));
        // every sample line is `name{labels} number`
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
            assert!(line.contains('{') && line.contains("} "), "{line}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = EngineMetrics::new("m");
        for v in [0.0005, 0.003, 0.003, 0.3, 5000.0] {
            m.time_to_first_token.observe(v);
        }
        m.time_to_first_token.observe(f64::NAN);
        let t = m.render_prometheus();
        let b = |le: &str| {
            sample(
                &t,
                &format!(
                    "vllm:time_to_first_token_seconds_bucket{{engine=\"0\",model_name=\"m\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(b("0.001"), 1.0);
        assert_eq!(b("0.005"), 3.0);
        assert_eq!(b("0.25"), 3.0);
        assert_eq!(b("0.5"), 4.0);
        assert_eq!(b("2560.0"), 4.0);
        assert_eq!(b("+Inf"), 5.0);
        let c = sample(&t, "vllm:time_to_first_token_seconds_count{");
        assert_eq!(c, 5.0);
        let s = sample(&t, "vllm:time_to_first_token_seconds_sum{");
        assert!((s - 5000.3065).abs() < 1e-9);
        assert!(t.contains("# TYPE vllm:request_decode_time_seconds histogram"));
        assert_eq!(m.time_to_first_token.count_sum().0, 5);
    }
}
