//! The CUDA kernel sources compile, and every kernel the launch code loads exists.
//!
//! Runs in the default build (no `cuda` feature, no GPU): wherever nvcc is found
//! (`$CUDA_HOME/bin`, `$CUDA_PATH/bin` or `PATH`; `cargo xtask cuda-env` installs one), each
//! `kernels/*.cu` is compiled to PTX for compute capability `$CUDA_COMPUTE_CAP` (default 90)
//! and the test fails on any compiler error. Without nvcc it prints that it compiled nothing
//! and checks only the names. The name check parses `src/cuda/*.rs` for the kernels it loads
//! (`kernel::<T>(dev, MODULE, "name")` and `launch!(dev, T, "name", ...)`) and requires an
//! `extern "C"` definition `name_f32` and `name_f64` (via `MATSCALE_F32_F64(name, …)`) in the
//! module's source.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `(module constant, file stem)` of every `kernels/*.cu`, as build.rs declares them.
fn modules() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(crate_dir().join("kernels"))
        .expect("kernels folder")
        .filter_map(|entry| {
            let path = entry.expect("entry").path();
            if path.extension()? != "cu" {
                return None;
            }
            let stem = path.file_stem()?.to_str()?.to_string();
            Some((stem.to_uppercase(), stem))
        })
        .collect();
    out.sort();
    out
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nvcc() -> Option<PathBuf> {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    Command::new("nvcc")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("nvcc"))
}

/// Kernel base names defined with `MATSCALE_F32_F64(name, …)` in a source file.
fn defined(source: &str) -> BTreeSet<String> {
    source
        .split("MATSCALE_F32_F64(")
        .skip(1)
        .filter_map(|rest| rest.split(',').next())
        .map(|name| name.trim().to_string())
        .filter(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect()
}

/// `(module constant, kernel name)` pairs loaded by the launch code.
fn loaded() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = crate_dir().join("src/cuda");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("src/cuda exists")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable source");
        let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for piece in flat.split("kernel::<").skip(1) {
            // T>(dev, MODULE, "name")
            let args: Vec<&str> = piece.splitn(4, ',').collect();
            if args.len() >= 3 {
                let module = args[1].trim().to_string();
                if let Some(name) = args[2]
                    .trim()
                    .strip_prefix('"')
                    .and_then(|s| s.split('"').next())
                {
                    out.push((module, name.to_string()));
                }
            }
        }
        for piece in flat.split("launch!(").skip(1) {
            // dev, T, "name", ...
            let args: Vec<&str> = piece.splitn(4, ',').collect();
            if args.len() >= 3 {
                if let Some(name) = args[2]
                    .trim()
                    .strip_prefix('"')
                    .and_then(|s| s.split('"').next())
                {
                    out.push(("ROTATE".into(), name.to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn every_loaded_kernel_is_defined_in_its_module() {
    let loaded = loaded();
    assert!(loaded.len() >= 15, "found only {loaded:?} in src/cuda");
    for (module, name) in loaded {
        let modules = modules();
        let Some((_, file)) = modules.iter().find(|(c, _)| *c == module) else {
            panic!("kernel {name:?} is loaded from unknown module {module:?}");
        };
        let source = std::fs::read_to_string(crate_dir().join(format!("kernels/{file}.cu")))
            .expect("kernel source");
        assert!(
            defined(&source).contains(&name),
            "src/cuda loads {name:?} from {file}.cu, which defines {:?}",
            defined(&source)
        );
    }
}

/// `src/cuda/s2grid.rs` loads `s2_fused_{forward,backward}_j{J}` by a formatted name for every
/// odd `J` up to its `FUSED_MAX_GROUPS`: all of them must be defined.
#[test]
fn fused_s2_kernels_exist_for_every_group_count_the_host_launches() {
    let launch = std::fs::read_to_string(crate_dir().join("src/cuda/s2grid.rs")).expect("source");
    let max: usize = launch
        .split("const FUSED_MAX_GROUPS: usize = ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|v| v.trim().parse().ok())
        .expect("FUSED_MAX_GROUPS in src/cuda/s2grid.rs");
    assert!(launch.contains("\"s2_fused_{pass}_j{}\""));
    assert!(launch.contains("if backward { \"backward\" } else { \"forward\" }"));
    let source = std::fs::read_to_string(crate_dir().join("kernels/s2fused.cu")).expect("source");
    let names = defined(&source);
    for j in (1..=max).step_by(2) {
        for pass in ["forward", "backward"] {
            let name = format!("s2_fused_{pass}_j{j}");
            assert!(names.contains(&name), "s2fused.cu lacks {name}: {names:?}");
        }
    }
}

#[test]
fn every_kernel_source_compiles_where_nvcc_exists() {
    let Some(nvcc) = nvcc() else {
        eprintln!(
            "nvcc not found (set CUDA_HOME; `cargo xtask cuda-env` installs CUDA 13.0): \
             the kernel sources were NOT compiled"
        );
        return;
    };
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out_dir = std::env::temp_dir().join(format!("matscale-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("temp dir");
    let modules = modules();
    assert!(modules.len() >= 7, "found only {modules:?} in kernels/");
    for (_, file) in modules {
        let src = crate_dir().join(format!("kernels/{file}.cu"));
        let ptx = out_dir.join(format!("{file}.ptx"));
        let output = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-I{}", crate_dir().join("kernels").display()))
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .output()
            .expect("nvcc runs");
        assert!(
            output.status.success(),
            "nvcc failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(&ptx).expect("PTX written");
        let source = std::fs::read_to_string(&src).expect("kernel source");
        for name in defined(&source) {
            for suffix in ["f32", "f64"] {
                assert!(
                    text.contains(&format!(".entry {name}_{suffix}(")),
                    "{file}.ptx lacks the entry {name}_{suffix}"
                );
            }
        }
        eprintln!("compiled {} with {}", src.display(), nvcc.display());
    }
    std::fs::remove_dir_all(&out_dir).ok();
}
