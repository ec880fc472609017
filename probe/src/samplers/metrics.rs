//! Scrapes a server's Prometheus `/metrics` text into the few gauges and counters reports use
//! (vLLM's `vllm:*` names, llama-server's `llamacpp:*` names).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Reading;

/// Values summed over label sets (e.g. several `model_name`s); None when the server lacks them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ServerMetrics {
    pub num_requests_running: Option<f64>,
    pub num_requests_waiting: Option<f64>,
    /// KV cache in use, 0..1 (vLLM `kv_cache_usage_perc` is a fraction despite its name).
    pub kv_cache_usage: Option<f64>,
    pub num_preemptions_total: Option<f64>,
    pub prefix_cache_queries_total: Option<f64>,
    pub prefix_cache_hits_total: Option<f64>,
    /// Every sample of a known family, by full name (`vllm:num_requests_running`...).
    pub raw: BTreeMap<String, f64>,
}

/// The metric names read, and which field each feeds (first present name wins per field).
const KNOWN: &[(&str, Field)] = &[
    ("vllm:num_requests_running", Field::Running),
    ("llamacpp:requests_processing", Field::Running),
    ("vllm:num_requests_waiting", Field::Waiting),
    ("llamacpp:requests_deferred", Field::Waiting),
    ("vllm:kv_cache_usage_perc", Field::KvUsage),
    ("vllm:gpu_cache_usage_perc", Field::KvUsage),
    ("llamacpp:kv_cache_usage_ratio", Field::KvUsage),
    ("vllm:num_preemptions_total", Field::Preemptions),
    ("vllm:prefix_cache_queries_total", Field::PrefixQueries),
    ("vllm:prefix_cache_hits_total", Field::PrefixHits),
    ("vllm:gpu_prefix_cache_queries_total", Field::PrefixQueries),
    ("vllm:gpu_prefix_cache_hits_total", Field::PrefixHits),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    Running,
    Waiting,
    KvUsage,
    Preemptions,
    PrefixQueries,
    PrefixHits,
}

/// Parses Prometheus text exposition: `name{labels} value [timestamp]` lines, `#` comments.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ', '\t']) {
            Some(i) if line.as_bytes()[i] == b'{' => match line.rfind('}') {
                Some(close) => (&line[..i], &line[close + 1..]),
                None => continue,
            },
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        let Some(value) = rest.split_whitespace().next().and_then(parse_value) else {
            continue;
        };
        *sums.entry(name.to_string()).or_insert(0.0) += value;
    }
    sums
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

impl ServerMetrics {
    pub fn from_text(text: &str) -> Self {
        let all = parse_prometheus(text);
        let mut m = Self::default();
        for (name, field) in KNOWN {
            let Some(&v) = all.get(*name) else { continue };
            m.raw.insert(name.to_string(), v);
            let slot = match field {
                Field::Running => &mut m.num_requests_running,
                Field::Waiting => &mut m.num_requests_waiting,
                Field::KvUsage => &mut m.kv_cache_usage,
                Field::Preemptions => &mut m.num_preemptions_total,
                Field::PrefixQueries => &mut m.prefix_cache_queries_total,
                Field::PrefixHits => &mut m.prefix_cache_hits_total,
            };
            slot.get_or_insert(v);
        }
        m
    }

    /// GETs `<url>/metrics` and parses it.
    pub async fn scrape(http: &reqwest::Client, url: &str) -> Reading<Self> {
        let resp = http
            .get(format!("{url}/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return Reading::NotAvailable(format!("/metrics answered {}", r.status())),
            Err(e) => return Reading::NotAvailable(format!("/metrics: {e}")),
        };
        match resp.text().await {
            Ok(t) => Reading::Value(Self::from_text(&t)),
            Err(e) => Reading::NotAvailable(format!("/metrics body: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_vllm_page() {
        let m = ServerMetrics::from_text(include_str!("../../tests/fixtures/metrics_vllm.txt"));
        assert_eq!(m.num_requests_running, Some(3.0));
        assert_eq!(m.num_requests_waiting, Some(1.0));
        assert_eq!(m.kv_cache_usage, Some(0.4375));
        assert_eq!(m.num_preemptions_total, Some(2.0));
        assert_eq!(m.prefix_cache_queries_total, Some(5120.0));
        assert_eq!(m.prefix_cache_hits_total, Some(1024.0));
    }

    #[test]
    fn recorded_llama_server_page() {
        let m = ServerMetrics::from_text(include_str!("../../tests/fixtures/metrics_llamacpp.txt"));
        assert_eq!(m.num_requests_running, Some(2.0));
        assert_eq!(m.num_requests_waiting, Some(0.0));
        assert_eq!(m.kv_cache_usage, Some(0.125));
        assert_eq!(m.num_preemptions_total, None);
    }

    #[test]
    fn older_vllm_name_labels_sum_and_junk_is_skipped() {
        let text = "vllm:gpu_cache_usage_perc{model_name=\"a b\"} 0.25\n\
                    vllm:num_requests_running{model_name=\"a\"} 2\n\
                    vllm:num_requests_running{model_name=\"b\"} 3 1700000000000\n\
                    garbage line without value\nbroken{ 1\n";
        let m = ServerMetrics::from_text(text);
        assert_eq!(m.kv_cache_usage, Some(0.25));
        assert_eq!(m.num_requests_running, Some(5.0));
        assert_eq!(ServerMetrics::from_text(""), ServerMetrics::default());
    }
}
