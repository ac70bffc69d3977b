//! `cargo xtask bench` (not yet implemented).

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {}

/// Runs `cargo xtask bench`.
pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask bench` is not implemented yet")
}
