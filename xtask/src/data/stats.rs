//! `cargo xtask data stats` (not yet implemented).

/// Arguments of `cargo xtask data stats`.
#[derive(clap::Args)]
pub struct StatsArgs {}

/// Runs `cargo xtask data stats`.
pub fn run(_args: StatsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask data stats` is not implemented yet")
}
