//! `probe` binary: parse the subcommand and hand it to the library.
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A closed stdout (`probe bench ... | head`) ends the process quietly, as it does other Unix
    // tools, instead of a panic in println!. Sockets are unaffected: Rust sends with MSG_NOSIGNAL.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread is spawned.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match probe::cli::run(probe::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error chain on one line, without a backtrace even when RUST_BACKTRACE is set.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
