//! `cargo xtask data` (not yet implemented).

/// Arguments of `cargo xtask data`.
#[derive(clap::Args)]
pub struct DataArgs {}

/// Runs `cargo xtask data`.
pub fn run(_args: DataArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask data` is not implemented yet")
}
