//! Compiles the CUDA kernels in `kernels/*.cu` to PTX when the `cuda` feature is on.
//!
//! The PTX lands in `$OUT_DIR/<name>.ptx` and is embedded with `include_str!` by
//! `src/cuda/mod.rs`. nvcc is taken from `$CUDA_HOME/bin` (or `$CUDA_PATH/bin`, else `PATH`);
//! the virtual architecture from `CUDA_COMPUTE_CAP` (e.g. `90` for H100/H200), the variable
//! candle's own kernels need as well. Without the feature nothing happens, so the default
//! build needs no CUDA toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, compiled one PTX module each.
const KERNELS: [&str; 7] = [
    "sh",
    "rotate",
    "segment",
    "elementwise",
    "wigner",
    "norm",
    "s2fused",
];

fn nvcc() -> PathBuf {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let candidate = Path::new(&home).join("bin").join("nvcc");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["CUDA_COMPUTE_CAP", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(cap) if !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit()) => cap,
        Ok(cap) => panic!("CUDA_COMPUTE_CAP={cap:?} is not a compute capability like 90"),
        Err(_) => panic!(
            "the cuda feature needs CUDA_COMPUTE_CAP (90 for H100/H200): run `cargo xtask cuda-env` \
             and eval its output"
        ),
    };
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    for name in KERNELS {
        let src = Path::new("kernels").join(format!("{name}.cu"));
        let ptx = out_dir.join(format!("{name}.ptx"));
        let output = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-Ikernels"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): the cuda feature needs nvcc; `cargo xtask cuda-env` \
                     installs CUDA 13.0 and prints the variables to set",
                    nvcc.display()
                )
            });
        if !output.status.success() {
            panic!(
                "nvcc failed on {}:\n{}",
                src.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
