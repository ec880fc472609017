//! `engine` binary: parse flags, start the server (all logic lives in the library).
fn main() -> anyhow::Result<()> {
    engine::api::server::main_from_args()
}
