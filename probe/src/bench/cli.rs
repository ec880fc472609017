//! Command-line flags of `probe bench` / `probe compare` (vLLM `benchmark_serving` names where it
//! has them) layered over an optional TOML config, and the entry points the CLI calls.

use super::compare::{compare, CompareError};
use super::dataset::DatasetSpec;
use super::output::{write_run, RunData};
use super::run::{ctrl_c_flag, run, BenchConfig, BenchError, Sampling};
use super::stats::Slo;
use super::summary::{text_block, RunInfo, SamplePoint};
use super::workload::{ArrivalPattern, Stage, StageArrival};
use crate::client::Api;
use crate::clock::Clock;
use crate::samplers::{Sample, SamplerConfig, SamplerTask};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// TOML file with any `BenchConfig` field; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Server root, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub base_url: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum)]
    pub api: Option<Api>,
    #[arg(long)]
    pub label: Option<String>,
    /// Requests/s (`inf` = all at once); gaps are gamma with --burstiness (1 = Poisson).
    #[arg(long)]
    pub request_rate: Option<f64>,
    #[arg(long)]
    pub burstiness: Option<f64>,
    /// Evenly spaced arrivals at this rate instead of random ones.
    #[arg(long, conflicts_with = "request_rate")]
    pub constant_rate: Option<f64>,
    /// With --request-rate inf: spread the burst over this many seconds.
    #[arg(long)]
    pub burst_window: Option<f64>,
    /// Staged load, `rate:duration_s,rate:duration_s,...`.
    #[arg(long)]
    pub stages: Option<String>,
    /// `poisson` or `constant` arrivals inside stages.
    #[arg(long)]
    pub stage_arrival: Option<String>,
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// `random`, `shared-prefix` or `file`. Shared-prefix runs one request per prompt
    /// (groups x prompts per group) unless --num-prompts is given.
    #[arg(long)]
    pub dataset_name: Option<String>,
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    #[arg(long, default_value_t = 0)]
    pub random_prefix_len: usize,
    #[arg(long, default_value_t = 10)]
    pub num_groups: usize,
    #[arg(long, default_value_t = 10)]
    pub num_prompts_per_group: usize,
    #[arg(long, default_value_t = 512)]
    pub system_prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub question_len: usize,
    /// Output length for shared-prefix and file datasets.
    #[arg(long)]
    pub output_len: Option<usize>,
    /// Local tokenizer.json for exact token counts.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Do not ask the server's /tokenize.
    #[arg(long)]
    pub no_server_tokenizer: bool,
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Per-request limit in seconds.
    #[arg(long)]
    pub request_timeout: Option<f64>,
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Let the model stop at EOS (lengths then vary).
    #[arg(long)]
    pub no_ignore_eos: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Seconds between /metrics, NVML and /proc samples.
    #[arg(long)]
    pub metrics_interval: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// SLOs for goodput, e.g. `ttft:500 tpot:50 e2el:2000` (ms).
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tera template instead of the embedded report template.
    #[arg(long)]
    pub template: Option<PathBuf>,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Run folders written by `probe bench`.
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<PathBuf>,
    #[arg(long, default_value = "compare-out")]
    pub out: PathBuf,
    #[arg(long)]
    pub template: Option<PathBuf>,
}

fn bad(message: String) -> BenchError {
    BenchError::Config {
        path: "command line".into(),
        message,
    }
}

fn parse_stages(s: &str) -> Result<Vec<Stage>, BenchError> {
    s.split(',')
        .map(|part| {
            let (r, d) = part
                .split_once(':')
                .ok_or_else(|| bad(format!("stage {part:?} is not rate:duration")))?;
            let num = |x: &str| {
                x.trim()
                    .parse::<f64>()
                    .map_err(|e| bad(format!("stage {part:?}: {e}")))
            };
            Ok(Stage {
                rate: num(r)?,
                duration_s: num(d)?,
            })
        })
        .collect()
}

fn parse_goodput(items: &[String]) -> Result<Slo, BenchError> {
    let mut slo = Slo::default();
    for it in items.iter().flat_map(|s| s.split_whitespace()) {
        let (k, v) = it
            .split_once(':')
            .ok_or_else(|| bad(format!("goodput {it:?} is not name:ms")))?;
        let v: f64 = v.parse().map_err(|e| bad(format!("goodput {it:?}: {e}")))?;
        match k {
            "ttft" => slo.ttft_ms = Some(v),
            "tpot" => slo.tpot_ms = Some(v),
            "e2el" => slo.e2el_ms = Some(v),
            _ => return Err(bad(format!("goodput metric {k:?} (use ttft, tpot, e2el)"))),
        }
    }
    Ok(slo)
}

/// The config file (or defaults) with every given flag applied.
pub fn resolve(a: &BenchArgs) -> Result<BenchConfig, BenchError> {
    let mut c = match &a.config {
        Some(p) => BenchConfig::from_toml_file(p)?,
        None => BenchConfig::default(),
    };
    macro_rules! set {
        ($field:ident, $v:expr) => {
            if let Some(v) = $v.clone() {
                c.$field = v;
            }
        };
    }
    set!(base_url, a.base_url);
    set!(model, a.model);
    set!(api, a.api);
    set!(label, a.label);
    set!(num_prompts, a.num_prompts);
    set!(request_timeout_s, a.request_timeout);
    set!(warmup, a.warmup);
    set!(temperature, a.temperature);
    set!(metrics_interval_s, a.metrics_interval);
    set!(seed, a.seed);
    set!(output_dir, a.out);
    if a.max_concurrency.is_some() {
        c.max_concurrency = a.max_concurrency;
    }
    if a.tokenizer.is_some() {
        c.tokenizer = a.tokenizer.clone();
    }
    c.server_tokenizer &= !a.no_server_tokenizer;
    c.ignore_eos &= !a.no_ignore_eos;
    c.progress &= !a.no_progress;
    if !a.goodput.is_empty() {
        c.goodput = parse_goodput(&a.goodput)?;
    }
    if let Some(s) = &a.stages {
        let arrival = match a.stage_arrival.as_deref() {
            None | Some("poisson") => StageArrival::Poisson,
            Some("constant") => StageArrival::Constant,
            Some(o) => {
                return Err(bad(format!(
                    "stage arrival {o:?} (use poisson or constant)"
                )))
            }
        };
        c.arrival = ArrivalPattern::Stages {
            stages: parse_stages(s)?,
            arrival,
        };
    } else if let Some(r) = a.constant_rate {
        c.arrival = ArrivalPattern::Constant { rate: r };
    } else if let Some(r) = a.request_rate {
        c.arrival = if r.is_infinite() {
            ArrivalPattern::Burst {
                window_s: a.burst_window.unwrap_or(0.0),
            }
        } else {
            ArrivalPattern::Gamma {
                rate: r,
                burstiness: a.burstiness.unwrap_or(1.0),
            }
        };
    } else if let Some(w) = a.burst_window {
        c.arrival = ArrivalPattern::Burst { window_s: w };
    }
    let n = c.num_prompts;
    match a.dataset_name.as_deref() {
        None => {
            if let (Some(np), DatasetSpec::Random { num_prompts, .. }) =
                (a.num_prompts, &mut c.dataset)
            {
                *num_prompts = np;
            }
        }
        Some("random") => {
            c.dataset = DatasetSpec::Random {
                num_prompts: n,
                input_len: a.random_input_len,
                output_len: a.random_output_len,
                range_ratio: a.random_range_ratio,
                prefix_len: a.random_prefix_len,
            }
        }
        Some("shared-prefix") => {
            // One request per prompt of the dataset unless --num-prompts asks for more or fewer.
            if a.num_prompts.is_none() {
                c.num_prompts = a.num_groups * a.num_prompts_per_group;
            }
            c.dataset = DatasetSpec::SharedPrefix {
                num_groups: a.num_groups,
                num_prompts_per_group: a.num_prompts_per_group,
                system_prompt_len: a.system_prompt_len,
                question_len: a.question_len,
                output_len: a.output_len.unwrap_or(a.random_output_len),
            }
        }
        Some("file") => {
            let path = a
                .dataset_path
                .clone()
                .ok_or_else(|| bad("--dataset-name file needs --dataset-path".into()))?;
            c.dataset = DatasetSpec::File {
                path,
                num_prompts: Some(n),
                output_len: a.output_len,
            };
        }
        Some(o) => {
            return Err(bad(format!(
                "dataset {o:?} (use random, shared-prefix or file)"
            )))
        }
    }
    Ok(c)
}

/// Server gauges, GPU and host memory of one sampler snapshot, as named points.
pub fn sample_points(s: &Sample) -> Vec<SamplePoint> {
    let mut out = Vec::new();
    let mut push = |metric: &str, v: Option<f64>| {
        if let Some(value) = v {
            out.push(SamplePoint {
                t_s: s.t_s,
                metric: metric.to_string(),
                value,
            });
        }
    };
    if let Some(m) = s.metrics.as_ref().and_then(|m| m.value()) {
        push("vllm:kv_cache_usage_perc", m.kv_cache_usage);
        push("vllm:num_requests_waiting", m.num_requests_waiting);
        push("vllm:num_requests_running", m.num_requests_running);
        push("vllm:num_preemptions_total", m.num_preemptions_total);
    }
    if let Some(gpus) = s.gpu.value() {
        for g in gpus {
            push(
                &format!("gpu{}:utilization_pct", g.index),
                g.utilization_pct.map(f64::from),
            );
            push(
                &format!("gpu{}:memory_used_bytes", g.index),
                g.memory_used_bytes.map(|b| b as f64),
            );
            push(&format!("gpu{}:power_w", g.index), g.power_w);
        }
    }
    if let Some(m) = s.meminfo.value() {
        push(
            "host:page_cache_bytes",
            m.page_cache_bytes().map(|b| b as f64),
        );
    }
    out
}

fn arrival_text(a: &ArrivalPattern) -> String {
    match a {
        ArrivalPattern::Burst { window_s } if *window_s == 0.0 => "burst (all at t=0)".into(),
        ArrivalPattern::Burst { window_s } => format!("burst spread over {window_s} s"),
        ArrivalPattern::Constant { rate } => format!("constant {rate} req/s"),
        ArrivalPattern::Gamma { rate, burstiness } => {
            format!("gamma arrivals {rate} req/s, burstiness {burstiness}")
        }
        ArrivalPattern::Stages { stages, arrival } => format!(
            "stages ({arrival:?}): {}",
            stages
                .iter()
                .map(|s| format!("{} req/s x {} s", s.rate, s.duration_s))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs `probe bench`: the benchmark, then its output folder; returns the report path.
pub async fn bench_main(a: &BenchArgs) -> Result<PathBuf, BenchError> {
    let http = reqwest::Client::new();
    let cfg = resolve(a)?.with_served_model(&http).await;
    let startup = crate::server::StartupFacts {
        engine_startup: crate::server::StartupFacts::fetch_engine_startup(
            &http,
            cfg.base_url.trim_end_matches('/'),
        )
        .await,
        ..Default::default()
    };
    let clock = Clock::start();
    let task = SamplerTask::new(
        clock,
        reqwest::Client::new(),
        SamplerConfig {
            interval: Duration::from_secs_f64(cfg.metrics_interval_s.max(0.05)),
            server_url: Some(cfg.base_url.trim_end_matches('/').to_string()),
            pid: None,
        },
    );
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = task.clone();
    let handle = tokio::spawn(async move {
        sampler.start_periodic();
        let _ = stop_rx.wait_for(|v| *v).await;
        sampler.stop_periodic();
        sampler
            .samples()
            .await
            .iter()
            .flat_map(sample_points)
            .collect()
    });
    let out = run(
        &cfg,
        clock,
        Some(Sampling { stop, task: handle }),
        ctrl_c_flag(),
    )
    .await?;
    let info = RunInfo {
        label: cfg.label.clone(),
        date: chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string(),
        base_url: cfg.base_url.clone(),
        endpoint: cfg.api.path().to_string(),
        model_id: cfg.model.clone(),
        num_prompts: out.planned,
        request_rate: match &cfg.arrival {
            ArrivalPattern::Constant { rate } | ArrivalPattern::Gamma { rate, .. } => Some(*rate),
            _ => None,
        },
        burstiness: match &cfg.arrival {
            ArrivalPattern::Gamma { burstiness, .. } => *burstiness,
            _ => 1.0,
        },
        max_concurrency: cfg.max_concurrency,
        arrival: arrival_text(&cfg.arrival),
        dataset: serde_json::to_string(&cfg.dataset).unwrap_or_default(),
        token_counting: out.token_counting.describe(),
        seed: cfg.seed,
        tensor_parallel_size: startup.tensor_parallel_size(),
    };
    let rates: Vec<f64> = match &cfg.arrival {
        ArrivalPattern::Stages { stages, .. } => stages.iter().map(|s| s.rate).collect(),
        _ => Vec::new(),
    };
    let data = RunData {
        info: &info,
        records: &out.records,
        samples: &out.samples,
        planned: out.planned,
        stopped: out.stopped.as_ref(),
        slo: cfg.goodput,
        stage_rates: &rates,
        template: a.template.as_deref(),
    };
    let stats = write_run(&cfg.output_dir, &data)?;
    print!("{}", text_block(&stats, &info));
    if let Some(s) = &out.stopped {
        eprintln!("run ended early: {s:?}; partial results written");
    }
    Ok(cfg.output_dir.join("report.md"))
}

/// Runs `probe compare`; returns the report path.
pub fn compare_main(a: &CompareArgs) -> Result<PathBuf, CompareError> {
    compare(&a.runs, &a.out, a.template.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_and_parse() {
        let a = BenchArgs {
            request_rate: Some(4.0),
            burstiness: Some(0.5),
            num_prompts: Some(7),
            goodput: vec!["ttft:500 tpot:50".into()],
            random_input_len: 1024,
            random_output_len: 128,
            ..Default::default()
        };
        let c = resolve(&a).unwrap();
        assert_eq!(
            c.arrival,
            ArrivalPattern::Gamma {
                rate: 4.0,
                burstiness: 0.5
            }
        );
        assert!(matches!(
            c.dataset,
            DatasetSpec::Random { num_prompts: 7, .. }
        ));
        assert_eq!(c.goodput.ttft_ms, Some(500.0));
        let shared = |num_prompts| BenchArgs {
            dataset_name: Some("shared-prefix".into()),
            num_groups: 4,
            num_prompts_per_group: 6,
            num_prompts,
            ..Default::default()
        };
        assert_eq!(resolve(&shared(None)).unwrap().num_prompts, 24);
        assert_eq!(resolve(&shared(Some(5))).unwrap().num_prompts, 5);
        let a = BenchArgs {
            stages: Some("1:10,2.5:20".into()),
            ..Default::default()
        };
        let c = resolve(&a).unwrap();
        assert!(
            matches!(c.arrival, ArrivalPattern::Stages { ref stages, .. } if stages.len() == 2 && stages[1].rate == 2.5)
        );
        assert!(resolve(&BenchArgs {
            stages: Some("1-10".into()),
            ..Default::default()
        })
        .is_err());
        assert!(resolve(&BenchArgs {
            goodput: vec!["foo:1".into()],
            ..Default::default()
        })
        .is_err());
        let a = BenchArgs {
            request_rate: Some(f64::INFINITY),
            burst_window: Some(2.0),
            ..Default::default()
        };
        assert_eq!(
            resolve(&a).unwrap().arrival,
            ArrivalPattern::Burst { window_s: 2.0 }
        );
    }

    #[test]
    fn toml_config_then_flags() {
        let dir = std::env::temp_dir().join(format!("probe-bench-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bench.toml");
        std::fs::write(
            &p,
            "base_url = \"http://h:1\"\nmax_concurrency = 8\n[arrival]\ntype = \"constant\"\nrate = 3.0\n",
        )
        .unwrap();
        let a = BenchArgs {
            config: Some(p.clone()),
            max_concurrency: Some(2),
            ..Default::default()
        };
        let c = resolve(&a).unwrap();
        assert_eq!(c.base_url, "http://h:1");
        assert_eq!(c.max_concurrency, Some(2));
        assert_eq!(c.arrival, ArrivalPattern::Constant { rate: 3.0 });
        std::fs::write(&p, "no_such_field = 1\n").unwrap();
        assert!(resolve(&BenchArgs {
            config: Some(p),
            ..Default::default()
        })
        .is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
