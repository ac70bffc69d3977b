//! `cargo xtask label` (not yet implemented).

/// Arguments of `cargo xtask label`.
#[derive(clap::Args)]
pub struct LabelArgs {}

/// Runs `cargo xtask label`.
pub fn run(_args: LabelArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask label` is not implemented yet")
}
