//! `cargo xtask bench`: run matscale's benchmarks, and optionally the Python reference
//! implementations they are compared against, side by side in one invocation.
//!
//! Each suite is a criterion bench of one crate plus (where one exists) a Python script that
//! measures the reference implementation (ASE, matscipy, e3nn, PyTorch, scipy) on the same input.
//! The figures go into docs/BENCHMARKS.md; the ratio is what counts on shared machines.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

/// One benchmark suite: a criterion bench and its optional reference script.
struct Suite {
    name: &'static str,
    package: &'static str,
    bench: &'static str,
    /// Python reference script, relative to the workspace root.
    reference: Option<&'static str>,
    about: &'static str,
}

const SUITES: &[Suite] = &[
    Suite {
        name: "extxyz",
        package: "matscale-structures",
        bench: "extxyz",
        reference: Some("crates/structures/benches/extxyz_ase.py"),
        about: "extxyz reading vs ase.io.read",
    },
    Suite {
        name: "neighbors",
        package: "matscale-structures",
        bench: "neighbors",
        reference: Some("crates/structures/benches/neighbors_ref.py"),
        about: "periodic neighbour list vs matscipy and ASE",
    },
    Suite {
        name: "emt",
        package: "matscale-structures",
        bench: "emt",
        reference: Some("crates/structures/benches/emt_ase.py"),
        about: "EMT labelling vs ASE's EMT",
    },
    Suite {
        name: "sh",
        package: "matscale-equivariant",
        bench: "sh",
        reference: Some("crates/equivariant/benches/sh_e3nn.py"),
        about: "spherical harmonics vs e3nn",
    },
    Suite {
        name: "so2",
        package: "matscale-equivariant",
        bench: "so2",
        reference: Some("crates/equivariant/benches/so2_torch.py"),
        about: "rotate + SO(2) convolution + rotate back vs PyTorch dense bmm",
    },
    Suite {
        name: "s2grid",
        package: "matscale-equivariant",
        bench: "s2grid",
        reference: Some("crates/equivariant/benches/s2grid_torch.py"),
        about: "S2 grid activation vs PyTorch",
    },
    Suite {
        name: "segment",
        package: "matscale-equivariant",
        bench: "segment",
        reference: Some("crates/equivariant/benches/segment_torch.py"),
        about: "segment softmax / sum vs PyTorch",
    },
    Suite {
        name: "fit",
        package: "matscale-scaling",
        bench: "fit",
        reference: Some("crates/scaling/benches/fit_scipy.py"),
        about: "Chinchilla joint fit + bootstrap vs scipy",
    },
];

/// Groups of suites.
const GROUPS: &[(&str, &[&str])] = &[
    ("kernels", &["sh", "so2", "s2grid", "segment"]),
    ("structures", &["extxyz", "neighbors", "emt"]),
];

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Suite or group to run: extxyz, neighbors, emt, sh, so2, s2grid, segment, fit; groups:
    /// kernels (the equivariant ops), structures, all. `list` prints them.
    pub suite: String,
    /// Also run the Python reference script of each suite (needs the packages it imports).
    #[arg(long)]
    pub reference: bool,
    /// Python interpreter for the reference scripts.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Fewer samples (criterion `--quick`); for a smoke run, not for published figures.
    #[arg(long)]
    pub quick: bool,
    /// Device for the kernel suites (only `cpu` in this build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn select(name: &str) -> anyhow::Result<Vec<&'static Suite>> {
    if name == "all" {
        return Ok(SUITES.iter().collect());
    }
    if let Some((_, members)) = GROUPS.iter().find(|(g, _)| *g == name) {
        return Ok(SUITES
            .iter()
            .filter(|s| members.contains(&s.name))
            .collect());
    }
    match SUITES.iter().find(|s| s.name == name) {
        Some(s) => Ok(vec![s]),
        None => bail!("unknown benchmark suite {name:?}; run `cargo xtask bench list`"),
    }
}

/// Runs `cargo xtask bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.suite == "list" {
        for s in SUITES {
            println!("{:<10} {:<22} {}", s.name, s.package, s.about);
        }
        for (g, members) in GROUPS {
            println!("{g:<10} group: {}", members.join(", "));
        }
        println!("{:<10} every suite", "all");
        return Ok(());
    }
    if args.device != "cpu" {
        bail!(
            "--device {}: this build has no CUDA support (only `cpu`)",
            args.device
        );
    }
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for suite in select(&args.suite)? {
        eprintln!("== {}: {}", suite.name, suite.about);
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args(["bench", "-p", suite.package, "--bench", suite.bench, "--"]);
        if args.quick {
            cmd.arg("--quick");
        }
        let status = cmd
            .status()
            .with_context(|| format!("running the {} benchmark", suite.name))?;
        if !status.success() {
            bail!("benchmark {} failed ({status})", suite.name);
        }
        if args.reference {
            let Some(script) = suite.reference else {
                continue;
            };
            let path = root.join(script);
            if !path.exists() {
                eprintln!("(no reference script at {script})");
                continue;
            }
            eprintln!("== {} reference: {} {script}", suite.name, args.python);
            let status = Command::new(&args.python)
                .current_dir(&root)
                .arg(&path)
                .status()
                .with_context(|| format!("running {} {script}", args.python))?;
            if !status.success() {
                bail!("reference script {script} failed ({status})");
            }
        }
    }
    Ok(())
}
