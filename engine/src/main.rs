//! `engine` binary: parse flags, start the server (all logic lives in the library).
fn main() -> std::process::ExitCode {
    match engine::api::server::main_from_args() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line a supervisor can read (no backtrace, even with RUST_BACKTRACE set).
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
