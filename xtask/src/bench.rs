//! `cargo xtask bench`: run matscale's benchmarks, and optionally the Python reference
//! implementations they are compared against, side by side in one invocation.
//!
//! Each suite is a criterion bench of one crate plus (where one exists) a Python script that
//! measures the reference implementation (ASE, matscipy, e3nn, PyTorch, scipy) on the same input.
//! The figures go into docs/BENCHMARKS.md; the ratio is what counts on shared machines.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

/// How a suite measures its reference side by side with matscale.
#[derive(Clone, Copy)]
enum Compare {
    /// A shell script that runs the criterion bench and the Python reference back to back; it
    /// takes the interpreter as its first argument.
    Shell(&'static str),
    /// A shell script that reads the interpreter from `$PYTHON` (its arguments mean other things).
    ShellEnv(&'static str),
    /// A Python script that runs the criterion bench itself and the reference beside it.
    Python(&'static str),
}

/// One benchmark suite: criterion benches of one crate and the side-by-side comparison script.
struct Suite {
    name: &'static str,
    package: &'static str,
    benches: &'static [&'static str],
    /// Reference comparison, relative to the workspace root.
    compare: Compare,
    about: &'static str,
}

const SUITES: &[Suite] = &[
    Suite {
        name: "extxyz",
        package: "matscale-structures",
        benches: &["extxyz"],
        compare: Compare::Shell("crates/structures/benches/extxyz_compare.sh"),
        about: "extxyz reading vs ase.io.read",
    },
    Suite {
        name: "neighbors",
        package: "matscale-structures",
        benches: &["neighbors"],
        compare: Compare::Python("crates/structures/benches/bench_neighbors_reference.py"),
        about: "periodic neighbour list vs matscipy and ASE",
    },
    Suite {
        name: "emt",
        package: "matscale-structures",
        benches: &["emt"],
        compare: Compare::Python("crates/structures/benches/emt_ase.py"),
        about: "EMT labelling vs ASE's EMT",
    },
    Suite {
        name: "sh",
        package: "matscale-equivariant",
        benches: &["sh"],
        compare: Compare::Shell("crates/equivariant/benches/sh_compare.sh"),
        about: "spherical harmonics vs e3nn",
    },
    Suite {
        name: "so2",
        package: "matscale-equivariant",
        benches: &["so2"],
        compare: Compare::ShellEnv("crates/equivariant/benches/so2_compare.sh"),
        about: "rotate + SO(2) convolution + rotate back vs PyTorch dense bmm",
    },
    Suite {
        name: "gemm",
        package: "matscale-equivariant",
        benches: &["gemm"],
        compare: Compare::Python("crates/equivariant/benches/gemm_torch.py"),
        about: "the SO(2) layer's GEMMs alone (its floor) and the core's FMA peak vs torch.addmm, one thread",
    },
    Suite {
        name: "s2grid",
        package: "matscale-equivariant",
        benches: &["s2grid", "segment"],
        compare: Compare::Shell("crates/equivariant/benches/s2grid_compare.sh"),
        about: "S2 grid activation and segment ops vs PyTorch",
    },
    Suite {
        name: "train",
        package: "matscale-trainer",
        benches: &["throughput"],
        compare: Compare::ShellEnv("crates/trainer/benches/throughput_compare.sh"),
        about: "training and inference throughput (SchNet, Transformer) vs PyG / PyTorch",
    },
    Suite {
        name: "equiformer_v2",
        package: "matscale-models",
        benches: &["equiformer_v2"],
        compare: Compare::ShellEnv("crates/models/benches/equiformer_v2_compare.sh"),
        about: "EquiformerV2 forward, forward+backward and peak memory vs fairchem",
    },
    Suite {
        name: "fit",
        package: "matscale-scaling",
        benches: &["chinchilla"],
        compare: Compare::Shell("crates/scaling/benches/compare.sh"),
        about: "Chinchilla joint fit + bootstrap vs scipy",
    },
    Suite {
        name: "kernels",
        package: "xtask",
        benches: &[],
        compare: Compare::Python("crates/equivariant/benches/kernels_reference.py"),
        about: "every equivariant op at EquiformerV2 sizes, % of peak, JSON (--device cpu|cuda)",
    },
];

/// Groups of suites.
const GROUPS: &[(&str, &[&str])] = &[
    ("equivariant", &["sh", "so2", "s2grid"]),
    ("structures", &["extxyz", "neighbors", "emt"]),
];

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Suite or group to run: extxyz, neighbors, emt, sh, so2, gemm, s2grid, train, equiformer_v2,
    /// fit, kernels (every equivariant op in-process, on --device); groups: equivariant (the
    /// criterion benches of sh, so2, s2grid), structures, all. `list` prints them.
    pub suite: String,
    /// Run the side-by-side comparison instead: the criterion bench and the Python reference
    /// (ASE, matscipy, e3nn, PyTorch, scipy) in one run. Needs those packages.
    #[arg(long)]
    pub reference: bool,
    /// Python interpreter with the reference packages installed.
    #[arg(long, env = "PYTHON", default_value = "python3")]
    pub python: String,
    /// Fewer samples (criterion `--quick`); for a smoke run, not for published figures.
    #[arg(long)]
    pub quick: bool,
    /// Device of the `kernels` suite: cpu, cuda or auto (other suites run on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// JSON output of the `kernels` suite [default: bench-kernels-DEVICE.json, DEVICE as in
    /// --device].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub(crate) fn workspace_root() -> PathBuf {
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
    if args.device != "cpu" && args.suite != "kernels" {
        bail!(
            "--device {}: this build has no CUDA support (only `cpu`)",
            args.device
        );
    }
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for suite in select(&args.suite)? {
        eprintln!("== {}: {}", suite.name, suite.about);
        if suite.name == "kernels" {
            crate::bench_kernels::run(&args)?;
            continue;
        }
        let mut cmd = if args.reference {
            let mut cmd;
            match suite.compare {
                Compare::Shell(script) => {
                    cmd = Command::new("bash");
                    cmd.arg(script).arg(&args.python);
                }
                Compare::ShellEnv(script) => {
                    cmd = Command::new("bash");
                    cmd.arg(script);
                }
                Compare::Python(script) => {
                    cmd = Command::new(&args.python);
                    cmd.arg(script);
                }
            }
            cmd.env("PYTHON", &args.python);
            cmd
        } else {
            let mut cmd = Command::new(&cargo);
            cmd.args(["bench", "-p", suite.package]);
            for bench in suite.benches {
                cmd.args(["--bench", bench]);
            }
            cmd.arg("--");
            if args.quick {
                cmd.arg("--quick");
            }
            cmd
        };
        let status = cmd
            .current_dir(&root)
            .status()
            .with_context(|| format!("running the {} benchmark", suite.name))?;
        if !status.success() {
            bail!("benchmark {} failed ({status})", suite.name);
        }
    }
    Ok(())
}
