//! `cargo xtask neighbors` (not yet implemented).

/// Arguments of `cargo xtask neighbors`.
#[derive(clap::Args)]
pub struct NeighborsArgs {}

/// Runs `cargo xtask neighbors`.
pub fn run(_args: NeighborsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask neighbors` is not implemented yet")
}
