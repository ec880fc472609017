//! `probe` binary: parse the subcommand and hand it to the library.
fn main() -> anyhow::Result<()> {
    Ok(())
}
