//! `probe` binary: parse the subcommand and hand it to the library.
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match probe::cli::run(probe::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error chain on one line, without a backtrace even when RUST_BACKTRACE is set.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
