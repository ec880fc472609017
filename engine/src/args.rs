//! Command-line flags of the `engine` server, named and defaulted like `vllm serve`.

pub use crate::weights::LoadFormat;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// Flags of `engine [serve] MODEL` / `engine --model MODEL`.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "engine",
    version,
    args_override_self = true,
    about = "OpenAI-compatible LLM server: continuous batching over a paged KV cache"
)]
pub struct EngineArgs {
    /// Model file or directory (GGUF file, or a directory with config.json [+ safetensors]).
    #[arg(value_name = "MODEL", conflicts_with = "model_flag")]
    pub model_positional: Option<PathBuf>,

    /// Model file or directory (same as the positional MODEL).
    #[arg(long = "model", value_name = "MODEL")]
    pub model_flag: Option<PathBuf>,

    /// Name the API answers to in `model` fields (default: the model path as given).
    #[arg(long)]
    pub served_model_name: Option<String>,

    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Longest prompt + completion per request (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,

    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Most tokens in one step (prefill chunks + decodes).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,

    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,

    /// Weight and KV dtype; auto = float32 on CPU, bfloat16 on CUDA.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,

    /// Seed of dummy weights and of requests without their own seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Require `Authorization: Bearer <key>` on /v1/* (also env ENGINE_API_KEY).
    #[arg(long, env = "ENGINE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// How to read weights; dummy = random weights shaped by config.json.
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,

    /// tokenizer.json to use instead of the model's own (needed with dummy weights).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// KV cache budget in bytes (suffixes: KiB/MiB/GiB binary, KB/MB/GB decimal, K/M/G binary).
    /// Default on CPU: 1GiB; on CUDA: derived from --gpu-memory-utilization.
    #[arg(long, alias = "kv-cache-memory-bytes", value_parser = parse_bytes)]
    pub kv_cache_memory: Option<u64>,

    /// Fraction of GPU memory the engine may use (weights + activations + KV), CUDA only.
    #[arg(long, default_value_t = 0.9, value_parser = parse_fraction)]
    pub gpu_memory_utilization: f64,

    /// Where to run (default: cuda when built with the `cuda` feature and a GPU exists).
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,

    #[arg(long, value_enum, default_value_t = SchedulingPolicyArg::Fcfs)]
    pub scheduling_policy: SchedulingPolicyArg,

    /// Reuse KV blocks of identical prompt prefixes (on unless --no-enable-prefix-caching).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,

    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,

    /// CPU swap space for preempted sequences, GiB.
    #[arg(long, default_value_t = 4.0)]
    pub swap_space: f64,

    /// Replay decode-only steps of up to 256 sequences from CUDA graphs (captured per batch and
    /// block-table bucket on first use; one GPU, no tensor parallelism). Off: every step runs
    /// eagerly.
    #[arg(long)]
    pub cuda_graphs: bool,

    /// `fair` policy: tokens a request generates before it yields to waiting ones.
    #[arg(long, default_value_t = 16)]
    pub fair_quantum: usize,

    /// `fair` policy: tokens a running request generates before it yields to a waiting request
    /// that has not produced its first token yet (at most --fair-quantum). 1: new arrivals are
    /// prefilled as soon as the running requests have one token each.
    #[arg(long, default_value_t = 1)]
    pub fair_first_token_quantum: usize,

    /// Ranks the model is split over (Megatron-style: attention heads, KV heads and the MLP
    /// divided, one worker thread per rank; on CUDA rank r runs on GPU r). Also `-tp`.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,

    /// `adaptive` policy: queueing SLA; the batch grows while the oldest waiting request waits
    /// longer than this.
    #[arg(long, default_value_t = 2000)]
    pub adaptive_max_wait_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    #[value(alias = "float")]
    Float32,
    #[value(alias = "bf16")]
    Bfloat16,
    #[value(alias = "half", alias = "fp16")]
    Float16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchedulingPolicyArg {
    /// First come, first served.
    Fcfs,
    /// Lower `priority` first; lowest priority preempted first.
    Priority,
    /// Least-generated first, time-sliced by --fair-quantum, preemption by swap.
    Fair,
    /// Naive batching: no admission until the whole batch finished.
    Static,
    /// Running cap adjusted from KV usage and --adaptive-max-wait-ms.
    Adaptive,
}

impl SchedulingPolicyArg {
    /// The name `sched::policy::policy_from_name` knows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fcfs => "fcfs",
            Self::Priority => "priority",
            Self::Fair => "fair",
            Self::Static => "static",
            Self::Adaptive => "adaptive",
        }
    }
}

/// A flag combination clap alone cannot reject.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgsError {
    #[error("no model given: pass it as `engine MODEL` or `engine --model MODEL`")]
    MissingModel,
    #[error("--{flag} must be at least 1")]
    Zero { flag: &'static str },
    #[error("--max-num-batched-tokens ({batched}) must be >= --max-num-seqs ({seqs})")]
    BatchedBelowSeqs { batched: usize, seqs: usize },
    #[error("--swap-space must be >= 0 GiB, got {0}")]
    NegativeSwap(f64),
}

impl EngineArgs {
    /// Parse `argv`, accepting vLLM's `serve` word before the model (`engine serve MODEL`).
    pub fn parse_from_argv<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut args: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
        if args.get(1).is_some_and(|a| a == "serve") {
            args.remove(1);
        }
        // vLLM's short form of --tensor-parallel-size.
        for a in args.iter_mut() {
            if a == "-tp" {
                *a = "--tensor-parallel-size".into();
            }
        }
        Self::try_parse_from(args)
    }

    /// The model path, from the positional or the flag.
    pub fn model(&self) -> Result<&PathBuf, ArgsError> {
        self.model_positional
            .as_ref()
            .or(self.model_flag.as_ref())
            .ok_or(ArgsError::MissingModel)
    }

    /// The name `/v1/models` lists and requests must use.
    pub fn served_model_name(&self) -> Result<String, ArgsError> {
        match &self.served_model_name {
            Some(name) => Ok(name.clone()),
            None => Ok(self.model()?.to_string_lossy().into_owned()),
        }
    }

    /// Prefix caching is on by default, like vLLM's; the last of the two flags given wins.
    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    /// The scheduling policy these flags ask for, with its knobs.
    pub fn scheduling_policy(&self) -> Box<dyn crate::sched::policy::SchedulingPolicy> {
        let opts = crate::sched::policy::PolicyOptions {
            fair_quantum: self.fair_quantum,
            fair_first_token_quantum: self.fair_first_token_quantum,
            adaptive_max_wait: std::time::Duration::from_millis(self.adaptive_max_wait_ms),
        };
        crate::sched::policy::policy_with_options(self.scheduling_policy.name(), opts)
            .expect("every SchedulingPolicyArg names a known policy")
    }

    /// Checks across flags; run once at startup.
    pub fn validate(&self) -> Result<(), ArgsError> {
        self.model()?;
        for (flag, v) in [
            ("block-size", self.block_size),
            ("max-num-seqs", self.max_num_seqs),
            ("max-num-batched-tokens", self.max_num_batched_tokens),
            ("fair-quantum", self.fair_quantum),
            ("fair-first-token-quantum", self.fair_first_token_quantum),
            ("tensor-parallel-size", self.tensor_parallel_size),
        ] {
            if v == 0 {
                return Err(ArgsError::Zero { flag });
            }
        }
        if self.max_model_len == Some(0) {
            return Err(ArgsError::Zero {
                flag: "max-model-len",
            });
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(ArgsError::BatchedBelowSeqs {
                batched: self.max_num_batched_tokens,
                seqs: self.max_num_seqs,
            });
        }
        if self.swap_space < 0.0 || !self.swap_space.is_finite() {
            return Err(ArgsError::NegativeSwap(self.swap_space));
        }
        Ok(())
    }
}

/// Parse a byte count: `1073741824`, `512MiB`, `2GiB`, `1.5G`, `800MB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (e.g. 1073741824, 512MiB, 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0_f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(bytes.round() as u64)
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("must be in (0, 1], got {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<EngineArgs, clap::Error> {
        EngineArgs::parse_from_argv(std::iter::once("engine").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_vllm() {
        let a = parse(&["m.gguf"]).unwrap();
        assert_eq!(a.model().unwrap(), &PathBuf::from("m.gguf"));
        assert_eq!(a.host, "127.0.0.1");
        assert_eq!(a.port, 8000);
        assert_eq!(a.max_model_len, None);
        assert_eq!(a.max_num_seqs, 256);
        assert_eq!(a.max_num_batched_tokens, 2048);
        assert_eq!(a.block_size, 16);
        assert_eq!(a.dtype, DtypeArg::Auto);
        assert_eq!(a.seed, 0);
        assert_eq!(a.load_format, LoadFormat::Auto);
        assert_eq!(a.kv_cache_memory, None);
        assert_eq!(a.gpu_memory_utilization, 0.9);
        assert_eq!(a.device, None);
        assert_eq!(a.scheduling_policy, SchedulingPolicyArg::Fcfs);
        assert!(a.prefix_caching(), "on by default, like vLLM");
        assert_eq!(a.swap_space, 4.0);
        assert!(!a.cuda_graphs, "CUDA graphs are opt-in");
        assert_eq!(a.tensor_parallel_size, 1);
        assert_eq!(a.served_model_name().unwrap(), "m.gguf");
        a.validate().unwrap();
    }

    #[test]
    fn tensor_parallel_size_long_and_vllm_short_form() {
        assert_eq!(
            parse(&["m", "--tensor-parallel-size", "2"])
                .unwrap()
                .tensor_parallel_size,
            2
        );
        assert_eq!(
            parse(&["serve", "m", "-tp", "4"])
                .unwrap()
                .tensor_parallel_size,
            4
        );
        assert_eq!(
            parse(&["m", "-tp", "0"]).unwrap().validate(),
            Err(ArgsError::Zero {
                flag: "tensor-parallel-size"
            })
        );
    }

    #[test]
    fn model_as_flag_positional_or_after_serve() {
        let a = parse(&["--model", "x"]).unwrap();
        assert_eq!(a.model().unwrap(), &PathBuf::from("x"));
        let b = parse(&["serve", "y", "--port", "8", "--port", "9"]).unwrap();
        assert_eq!(b.model().unwrap(), &PathBuf::from("y"));
        assert_eq!(b.port, 9);
        assert!(parse(&["a", "--model", "b"]).is_err());
        let none = parse(&[]).unwrap();
        assert_eq!(none.validate(), Err(ArgsError::MissingModel));
    }

    #[test]
    fn every_flag_parses() {
        let a = parse(&[
            "--model",
            "m",
            "--served-model-name",
            "smol",
            "--host",
            "0.0.0.0",
            "--port",
            "1234",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "64",
            "--block-size",
            "32",
            "--dtype",
            "half",
            "--seed",
            "7",
            "--api-key",
            "k",
            "--load-format",
            "dummy",
            "--tokenizer",
            "t.json",
            "--kv-cache-memory",
            "512MiB",
            "--gpu-memory-utilization",
            "0.5",
            "--device",
            "cpu",
            "--scheduling-policy",
            "fcfs",
            "--enable-prefix-caching",
            "--swap-space",
            "0",
            "--cuda-graphs",
        ])
        .unwrap();
        assert_eq!(a.served_model_name().unwrap(), "smol");
        assert_eq!(a.host, "0.0.0.0");
        assert_eq!(a.port, 1234);
        assert_eq!(a.max_model_len, Some(512));
        assert_eq!(a.max_num_seqs, 8);
        assert_eq!(a.max_num_batched_tokens, 64);
        assert_eq!(a.block_size, 32);
        assert_eq!(a.dtype, DtypeArg::Float16);
        assert_eq!(a.seed, 7);
        assert_eq!(a.api_key.as_deref(), Some("k"));
        assert_eq!(a.load_format, LoadFormat::Dummy);
        assert_eq!(a.tokenizer, Some(PathBuf::from("t.json")));
        assert_eq!(a.kv_cache_memory, Some(512 << 20));
        assert_eq!(a.gpu_memory_utilization, 0.5);
        assert_eq!(a.device, Some(DeviceArg::Cpu));
        assert!(a.prefix_caching());
        assert_eq!(a.swap_space, 0.0);
        assert!(a.cuda_graphs);
        a.validate().unwrap();
    }

    #[test]
    fn prefix_caching_last_flag_wins() {
        let a = parse(&["m", "--enable-prefix-caching", "--no-enable-prefix-caching"]).unwrap();
        assert!(!a.prefix_caching());
        let b = parse(&["m", "--no-enable-prefix-caching", "--enable-prefix-caching"]).unwrap();
        assert!(b.prefix_caching());
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["m", "--dtype", "int3"]).is_err());
        assert!(parse(&["m", "--gpu-memory-utilization", "1.5"]).is_err());
        assert!(parse(&["m", "--gpu-memory-utilization", "0"]).is_err());
        assert!(parse(&["m", "--kv-cache-memory", "lots"]).is_err());
        assert!(parse(&["m", "--scheduling-policy", "lottery"]).is_err());
        for name in ["fcfs", "priority", "fair", "static", "adaptive"] {
            let a = parse(&["m", "--scheduling-policy", name, "--fair-quantum", "4"]).unwrap();
            assert_eq!(a.scheduling_policy.name(), name);
            assert_eq!(a.scheduling_policy().name(), name);
            assert_eq!(a.fair_quantum, 4);
        }
        assert!(parse(&["m", "--port", "70000"]).is_err());
        let z = parse(&["m", "--block-size", "0"]).unwrap();
        assert_eq!(z.validate(), Err(ArgsError::Zero { flag: "block-size" }));
        let z = parse(&["m", "--fair-first-token-quantum", "0"]).unwrap();
        assert_eq!(
            z.validate(),
            Err(ArgsError::Zero {
                flag: "fair-first-token-quantum"
            })
        );
        assert!(parse(&["m", "--fair-first-token-quantum", "1"])
            .unwrap()
            .validate()
            .is_ok());
        let b = parse(&["m", "--max-num-seqs", "10", "--max-num-batched-tokens", "5"]).unwrap();
        assert!(matches!(
            b.validate(),
            Err(ArgsError::BatchedBelowSeqs { .. })
        ));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("800MB"), Ok(800_000_000));
        assert_eq!(parse_bytes("64 KiB"), Ok(65536));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
