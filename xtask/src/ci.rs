//! `cargo xtask ci`: the checks CI runs, in CI's order.

use std::process::Command;

use anyhow::{bail, Context};

/// Arguments of `cargo xtask ci`.
#[derive(clap::Args)]
pub struct CiArgs {
    /// Skip `cargo fmt --check` and clippy; run the tests only.
    #[arg(long)]
    pub tests_only: bool,
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo fmt --check`, clippy with warnings denied, and the workspace tests.
pub fn run(args: CiArgs) -> anyhow::Result<()> {
    if !args.tests_only {
        cargo(&["fmt", "--all", "--check"])?;
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    cargo(&["test", "--workspace"])
}
