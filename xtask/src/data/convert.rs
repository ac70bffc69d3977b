//! `cargo xtask data convert` (not yet implemented).

/// Arguments of `cargo xtask data convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {}

/// Runs `cargo xtask data convert`.
pub fn run(_args: ConvertArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask data convert` is not implemented yet")
}
