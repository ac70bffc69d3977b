//! Test support: runs CUDA kernel sources (`kernels/*.cu`) on the host, compiled by the system
//! C++ compiler against `kernels/host/emu.h`, so that their arithmetic and indexing are
//! checked against the CPU ops on every test run, GPU or not.
//!
//! The emulation runs the threads one after another; it is exact for kernels in which no
//! thread reads what another thread of its block wrote (see `emu.h`), and says nothing about
//! races or speed: the GPU tests of `tests/cuda.rs` stay the check of the real thing.
//!
//! The compiler is `$CXX`, else the first of `c++`, `g++`, `clang++` that runs. Without one
//! the tests print why and pass, except under CI (`CI` set), where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The kernel sources' folder.
fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// The C++ compiler to use, if any runs.
fn compiler() -> Option<String> {
    let candidates: Vec<String> = match std::env::var("CXX") {
        Ok(cxx) if !cxx.is_empty() => vec![cxx],
        _ => ["c++", "g++", "clang++"].map(String::from).to_vec(),
    };
    candidates.into_iter().find(|cxx| {
        Command::new(cxx)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A compiled host driver.
pub(crate) struct Driver {
    exe: PathBuf,
    scratch: PathBuf,
}

/// Compiles `kernels/host/{name}.cpp` once per test process (`None`, with the reason printed,
/// when there is no C++ compiler and `CI` is unset; a panic under CI or when it fails to
/// compile).
pub(crate) fn driver(name: &'static str) -> Option<&'static Driver> {
    static DRIVERS: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static Driver)>>> =
        OnceLock::new();
    let drivers = DRIVERS.get_or_init(Default::default);
    let mut held = drivers.lock().expect("driver registry");
    if let Some((_, d)) = held.iter().find(|(n, _)| *n == name) {
        return Some(d);
    }
    let Some(cxx) = compiler() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no C++ compiler ($CXX, c++, g++ or clang++): the host kernel tests cannot run"
        );
        eprintln!("host kernel test of {name} skipped: no C++ compiler ($CXX, c++, g++, clang++)");
        return None;
    };
    let scratch = std::env::temp_dir().join(format!(
        "matscale-host-kernels-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&scratch).expect("scratch folder for the host kernels");
    let exe = scratch.join(name);
    let src = kernels_dir().join("host").join(format!("{name}.cpp"));
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{cxx} on {}: {e}", src.display()));
    assert!(
        out.status.success(),
        "{cxx} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let d: &'static Driver = Box::leak(Box::new(Driver { exe, scratch }));
    held.push((name, d));
    Some(d)
}

impl Driver {
    /// Runs the driver on `input` (the bytes of its input file) and returns its output file.
    pub(crate) fn run(&self, tag: &str, input: &[u8]) -> Vec<u8> {
        let (inp, outp) = (
            self.scratch.join(format!("{tag}.in")),
            self.scratch.join(format!("{tag}.out")),
        );
        std::fs::write(&inp, input).expect("driver input");
        let out = Command::new(&self.exe)
            .arg(&inp)
            .arg(&outp)
            .output()
            .expect("host driver runs");
        assert!(
            out.status.success(),
            "{} {tag}: {}",
            self.exe.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&outp).expect("driver output");
        let _ = std::fs::remove_file(&inp);
        let _ = std::fs::remove_file(&outp);
        bytes
    }
}

/// Little-endian bytes of a slice of plain numbers.
pub(crate) fn bytes_of<T: Copy + ToLe>(v: &[T]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le()).collect()
}

/// Numbers as little-endian bytes.
pub(crate) trait ToLe {
    /// The value's little-endian bytes.
    fn to_le(self) -> Vec<u8>;
}

macro_rules! to_le {
    ($($t:ty),*) => {$(
        impl ToLe for $t {
            fn to_le(self) -> Vec<u8> {
                self.to_le_bytes().to_vec()
            }
        }
    )*};
}

to_le!(f32, f64, i32, i64);

/// Floats from little-endian bytes, as f64.
pub(crate) fn floats_from(bytes: &[u8], width: usize) -> Vec<f64> {
    match width {
        4 => bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes(b.try_into().expect("4 bytes"))))
            .collect(),
        8 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        _ => panic!("floats are 4 or 8 bytes"),
    }
}
