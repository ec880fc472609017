//! `probe` binary: parse the subcommand and hand it to the library.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    probe::cli::run(probe::cli::Cli::parse()).await
}
