//! Flags of `probe kv-scaling` and their mapping onto [`KvScalingConfig`].

use std::path::PathBuf;

use clap::Args;

use super::predict::{parse_bytes, parse_len};
use super::{KvScalingConfig, KvScalingError, DEFAULT_DAY};
use crate::progress::Progress;

fn len(w: &str) -> Result<u64, String> {
    parse_len(w).ok_or_else(|| format!("bad length {w:?} (use e.g. 2k,4k,8k or 512)"))
}

fn bytes(s: &str) -> Result<u64, String> {
    parse_bytes(s).ok_or_else(|| format!("bad size {s:?} (use e.g. 20MiB, 1GiB or bytes)"))
}

#[derive(Args, Debug, Clone)]
pub struct KvScalingArgs {
    /// max-model-len values to start the server with (k = 1024).
    #[arg(long, value_parser = len, value_delimiter = ',', default_value = "2k,4k,8k")]
    pub lens: Vec<u64>,
    /// GPU memory utilizations to sweep too (default: the server's own).
    #[arg(long, value_delimiter = ',')]
    pub mem_utils: Option<Vec<f64>>,
    /// Concurrency levels of the load at each setting.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<u64>,
    /// Prompt length as a fraction of max-model-len.
    #[arg(long, default_value_t = 0.5)]
    pub fill: f64,
    /// Requests per concurrency level (default: twice the level).
    #[arg(long)]
    pub requests_per_level: Option<u64>,
    /// Output tokens per request (ignore_eos).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Model for our engine (default: SmolLM2-135M-Instruct Q4_1); a GGUF also gives the geometry.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// HF config.json with the KV geometry, when the server does not report it.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Extra flags for our engine, as shell words (e.g. '--device cpu').
    #[arg(long, allow_hyphen_values = true)]
    pub engine_args: Option<String>,
    /// Any server instead of our engine; `{max_model_len}`, `{gpu_memory_utilization}` and
    /// `{port}` are replaced (e.g. 'vllm serve M --max-model-len {max_model_len} --port {port}').
    #[arg(long, conflicts_with = "engine_args")]
    pub server_cmd: Option<String>,
    /// KV budget (e.g. 20MiB): passed to our engine as --kv-cache-memory; the CPU prediction's budget.
    #[arg(long, value_parser = bytes)]
    pub kv_cache_memory: Option<u64>,
    #[arg(long, default_value_t = 16)]
    pub block_size: u64,
    /// KV dtype when the server does not report it (float32, bfloat16, fp8...).
    #[arg(long)]
    pub kv_dtype: Option<String>,
    /// Activation peak to subtract from a GPU budget (e.g. 2GiB; default unknown = 0).
    #[arg(long, value_parser = bytes)]
    pub activation_bytes: Option<u64>,
    #[arg(long, default_value = DEFAULT_DAY)]
    pub day: String,
    /// Root of the lab notes.
    #[arg(long, default_value = "days")]
    pub out: PathBuf,
    /// Tera template to use instead of the embedded one.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Seconds to wait for /health after each start.
    #[arg(long, default_value_t = 600.0)]
    pub ready_timeout: f64,
    /// Per-request limit in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Seconds between /metrics scrapes during the load.
    #[arg(long, default_value_t = 0.05)]
    pub scrape_interval: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl From<KvScalingArgs> for KvScalingConfig {
    fn from(a: KvScalingArgs) -> Self {
        let command_line = std::env::args()
            .map(|w| shlex::try_quote(&w).map(|c| c.into_owned()).unwrap_or(w))
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            lens: a.lens,
            mem_utils: a.mem_utils.unwrap_or_default(),
            concurrency: a.concurrency,
            fill: a.fill,
            requests_per_level: a.requests_per_level,
            max_tokens: a.max_tokens,
            model: a.model,
            model_config: a.model_config,
            engine_args: a.engine_args,
            server_cmd: a.server_cmd,
            kv_cache_memory: a.kv_cache_memory,
            block_size: a.block_size,
            kv_dtype: a.kv_dtype,
            activation_bytes: a.activation_bytes.unwrap_or(0),
            day: a.day,
            out: a.out,
            template: a.template,
            ready_timeout_s: a.ready_timeout,
            request_timeout_s: a.request_timeout,
            scrape_interval_s: a.scrape_interval,
            seed: a.seed,
            command_line,
        }
    }
}

/// Runs the command; returns the report path.
pub async fn main(a: KvScalingArgs) -> Result<PathBuf, KvScalingError> {
    let out = super::run(a.into(), &Progress::auto()).await?;
    eprintln!("table: {}", out.csv.display());
    Ok(out.report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: KvScalingArgs,
    }

    #[test]
    fn flags_parse_into_the_config() {
        let t = T::try_parse_from([
            "t",
            "--lens",
            "2k,4k,8k",
            "--mem-utils",
            "0.5,0.9",
            "--kv-cache-memory",
            "20MiB",
        ])
        .unwrap();
        let c: KvScalingConfig = t.a.into();
        assert_eq!(c.lens, vec![2048, 4096, 8192]);
        assert_eq!(c.mem_utils, vec![0.5, 0.9]);
        assert_eq!(c.concurrency, vec![1, 4, 16, 64]);
        assert_eq!(c.kv_cache_memory, Some(20 << 20));
        assert_eq!(c.day, DEFAULT_DAY);
        assert!(T::try_parse_from(["t", "--lens", "2k,x"]).is_err());
        assert!(T::try_parse_from(["t", "--server-cmd", "a", "--engine-args", "b"]).is_err());
    }
}
