//! Command-line interface of `probe`: clap subcommands mapped onto the library's runs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::client::Api;
use crate::coldwarm::{self, ColdWarmConfig};
use crate::progress::Progress;
use crate::report::{self, Format};

#[derive(Parser, Debug)]
#[command(
    name = "probe",
    version,
    about = "Lab instrument for OpenAI-compatible LLM servers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Time the first request after server start (cold) against repeats (warm).
    ColdWarm(ColdWarmArgs),
    /// Re-render a run folder's report from its stored JSON, without re-running.
    Report(ReportArgs),
    /// Fetch the default model (SmolLM2-135M-Instruct Q4_1) into the cache and print its path.
    FetchModel,
    /// Serving benchmark (vLLM benchmark_serving metrics): arrivals, datasets, report, plots.
    Bench(Box<crate::bench::cli::BenchArgs>),
    /// Put several `probe bench` runs side by side with overlaid plots.
    Compare(crate::bench::cli::CompareArgs),
    /// KV cache capacity, concurrency and TTFT across --max-model-len (and memory) settings.
    KvScaling(Box<crate::kvscaling::cli::KvScalingArgs>),
}

#[derive(Args, Debug)]
pub struct ColdWarmArgs {
    /// Model for our engine (default: SmolLM2-135M-Instruct Q4_1, fetched when not cached).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Extra flags for our engine, as shell words (e.g. '--max-model-len 2048').
    #[arg(long, allow_hyphen_values = true)]
    pub engine_args: Option<String>,
    /// Start this server instead of our engine (shell words; `{port}` is replaced).
    #[arg(long, conflicts_with_all = ["model", "engine_args"])]
    pub server_cmd: Option<String>,
    /// Attach to a running server at this URL instead of starting one.
    #[arg(long, conflicts_with_all = ["model", "engine_args", "server_cmd"])]
    pub url: Option<String>,
    /// Warm runs after the cold one.
    #[arg(long, default_value_t = 5)]
    pub warm: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    #[arg(long, default_value = coldwarm::DEFAULT_PROMPT)]
    pub prompt: String,
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
    /// Lab-notes folder name under --out.
    #[arg(long, default_value = coldwarm::DEFAULT_DAY)]
    pub day: String,
    /// Root of the lab notes.
    #[arg(long, default_value = "days")]
    pub out: PathBuf,
    /// Tera template to use instead of the embedded one.
    #[arg(long)]
    pub template: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Md)]
    pub format: Format,
    /// Per-request limit in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Seconds to wait for /health after starting the server.
    #[arg(long, default_value_t = 600.0)]
    pub ready_timeout: f64,
    /// Seconds between background samples.
    #[arg(long, default_value_t = 0.5)]
    pub sample_interval: f64,
}

impl From<ColdWarmArgs> for ColdWarmConfig {
    fn from(a: ColdWarmArgs) -> Self {
        Self {
            model: a.model,
            engine_args: a.engine_args,
            server_cmd: a.server_cmd,
            url: a.url,
            warm: a.warm,
            max_tokens: a.max_tokens,
            prompt: a.prompt,
            api: a.api,
            day: a.day,
            out: a.out,
            template: a.template,
            format: a.format,
            request_timeout_s: a.request_timeout,
            ready_timeout_s: a.ready_timeout,
            sample_interval_s: a.sample_interval,
        }
    }
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run folder holding run.json, records.json and samples.json.
    pub dir: PathBuf,
    #[arg(long)]
    pub template: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Md)]
    pub format: Format,
}

/// Runs the parsed command; returns what to print on success.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::ColdWarm(args) => {
            let out = coldwarm::run(args.into(), &Progress::auto()).await?;
            println!("{}", out.report.display());
        }
        Command::Report(a) => {
            let p = report::render_dir(&a.dir, a.template.as_deref(), a.format)?;
            println!("{}", p.display());
        }
        Command::Bench(a) => println!("{}", crate::bench::cli::bench_main(&a).await?.display()),
        Command::Compare(a) => println!("{}", crate::bench::cli::compare_main(&a)?.display()),
        Command::KvScaling(a) => println!("{}", crate::kvscaling::cli::main(*a).await?.display()),
        Command::FetchModel => {
            let p = tokio::task::spawn_blocking(|| crate::fetch::ensure(&crate::fetch::SMOLLM2))
                .await??;
            println!("{}", p.display());
        }
    }
    Ok(())
}
