//! `cargo xtask fit` (not yet implemented).

/// Arguments of `cargo xtask fit`.
#[derive(clap::Args)]
pub struct FitArgs {}

/// Runs `cargo xtask fit`.
pub fn run(_args: FitArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask fit` is not implemented yet")
}
