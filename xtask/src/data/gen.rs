//! `cargo xtask data gen` (not yet implemented).

/// Arguments of `cargo xtask data gen`.
#[derive(clap::Args)]
pub struct GenArgs {}

/// Runs `cargo xtask data gen`.
pub fn run(_args: GenArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask data gen` is not implemented yet")
}
