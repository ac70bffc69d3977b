//! Test support: runs CUDA kernel sources (`kernels/*.cu`) on the host, compiled by the system
//! C++ compiler against `kernels/host/emu.h`, so that their arithmetic and indexing are
//! checked against the CPU ops on every test run, GPU or not.
//!
//! The emulation runs the blocks one after another and the threads of a block concurrently
//! (barriers, warp shuffles and shared memory as on the device, see `emu.h`); it checks
//! results, not speed, and finds a race only if the race changes a result: the GPU tests of
//! `tests/cuda.rs` stay the check of the real thing.
//!
//! The compiler is `$CXX`, else the first of `c++`, `g++`, `clang++` that runs. Without one
//! the tests print why and pass, except under CI (`CI` set), where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

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
///
/// Only the lookup of the driver's cell holds the registry lock: drivers of different tests
/// compile in parallel, and tests sharing one driver wait for its single compilation.
pub(crate) fn driver(name: &'static str) -> Option<&'static Driver> {
    type Cell = OnceLock<Option<Driver>>;
    static CELLS: Mutex<Vec<(&'static str, &'static Cell)>> = Mutex::new(Vec::new());
    let cell: &'static Cell = {
        let mut cells = CELLS.lock().expect("driver registry");
        match cells.iter().find(|(n, _)| *n == name) {
            Some(&(_, cell)) => cell,
            None => {
                let cell: &'static Cell = Box::leak(Box::default());
                cells.push((name, cell));
                cell
            }
        }
    };
    cell.get_or_init(|| compile(name)).as_ref()
}

/// Stages the kernel sources and compiles the driver `name` (see [`driver`]).
fn compile(name: &str) -> Option<Driver> {
    let Some(cxx) = compiler() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no C++ compiler ($CXX, c++, g++ or clang++): the host kernel tests cannot run"
        );
        eprintln!("host kernel test of {name} skipped: no C++ compiler ($CXX, c++, g++, clang++)");
        return None;
    };
    remove_stale_scratch();
    let scratch =
        std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}-{name}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch folder for the host kernels");
    stage_sources(&scratch);
    let exe = scratch.join(name);
    let src = kernels_dir().join("host").join(format!("{name}.cpp"));
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-Wall",
            "-Wno-unknown-pragmas",
        ])
        .arg(format!("-I{}", scratch.display()))
        .arg("-o")
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
    Some(Driver { exe, scratch })
}

/// Prefix of the per-process scratch folders in the temporary directory.
const SCRATCH_PREFIX: &str = "matscale-host-kernels-";

/// Removes scratch folders of earlier test runs (older than an hour; a test process lives
/// seconds), so that the temporary directory does not fill up run by run.
fn remove_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let hour = std::time::Duration::from_secs(3600);
    for entry in entries.flatten() {
        let stale = entry
            .file_name()
            .to_string_lossy()
            .starts_with(SCRATCH_PREFIX)
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > hour);
        if stale {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Copies `kernels/host/emu.h` and every kernel source (`kernels/*.cu`, `*.cuh`), rewritten by
/// [`emulable`], into `dir`, where the drivers include them by name.
fn stage_sources(dir: &Path) {
    let emu = kernels_dir().join("host").join("emu.h");
    std::fs::copy(&emu, dir.join("emu.h")).expect("emu.h");
    let entries = std::fs::read_dir(kernels_dir()).expect("kernels folder");
    for path in entries.flatten().map(|e| e.path()) {
        let is_source = path
            .extension()
            .is_some_and(|ext| ext == "cu" || ext == "cuh");
        if is_source {
            let text = std::fs::read_to_string(&path).expect("kernel source");
            let name = path.file_name().expect("file name");
            std::fs::write(dir.join(name), emulable(&text)).expect("staged kernel source");
        }
    }
}

/// A kernel source rewritten for `emu.h`: each `extern __shared__ TYPE NAME[];` becomes
/// `EMU_DYNAMIC_SHARED(TYPE, NAME);` (a pointer to the block's dynamic shared buffer), and
/// every other `__shared__` becomes `static` (one copy, used by one block at a time).
pub(crate) fn emulable(source: &str) -> String {
    const EXTERN: &str = "extern __shared__";
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find(EXTERN) {
        out.push_str(&rest[..at]);
        let after = &rest[at + EXTERN.len()..];
        let end = after
            .find(';')
            .expect("an extern __shared__ declaration ends with ';'");
        let decl = after[..end].trim();
        let decl = decl
            .strip_suffix("[]")
            .expect("extern __shared__ declares an unsized array")
            .trim();
        let split = decl
            .rfind(char::is_whitespace)
            .expect("extern __shared__ TYPE NAME[]");
        let (ty, name) = (decl[..split].trim(), decl[split..].trim());
        out.push_str(&format!("EMU_DYNAMIC_SHARED({ty}, {name})"));
        rest = &after[end..];
    }
    out.push_str(rest);
    out.replace("__shared__", "static")
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

/// `max |got − want| / max |want|`: the error of a kernel's output relative to the largest
/// value of the CPU result (panics on a length mismatch or an all-zero reference, which
/// would make the comparison meaningless).
pub(crate) fn max_relative_error(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: the CPU result is all zero");
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / scale)
        .fold(0.0, f64::max)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_declarations_are_rewritten_for_the_host() {
        let src = "extern __shared__ unsigned char smem_raw[];\n  __shared__ double s[256];\n\
                   extern __shared__ float  tile [] ;";
        let out = emulable(src);
        assert_eq!(
            out,
            "EMU_DYNAMIC_SHARED(unsigned char, smem_raw);\n  static double s[256];\n\
             EMU_DYNAMIC_SHARED(float, tile);"
        );
    }

    /// Tensor sizes for the multi-tensor kernels: empty ones, one element, sizes that do not
    /// divide the launch, 121 in all.
    const SIZES: [usize; 6] = [7, 0, 1, 64, 0, 49];

    fn adamw_case<T: crate::activation::Float + ToLe>(driver: &Driver, seed: u64) {
        let scalars = [
            0.37,
            0.9,
            0.1,
            0.999,
            0.001,
            1e-3,
            1.0 - 1e-5,
            1.0 / 0.271,
            1.0 / 0.0019,
            1e-8,
        ];
        let mut header = vec![std::mem::size_of::<T>() as i64, 0, SIZES.len() as i64];
        header.extend(SIZES.iter().map(|&n| n as i64));
        let mut input = bytes_of(&header);
        let cast = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        input.extend(bytes_of(&cast(&scalars)));
        // The update in f64 from the same (rounded) inputs: every θ, then every [m' | v'].
        let (mut want_theta, mut want_mv) = (Vec::new(), Vec::new());
        for (t, &n) in SIZES.iter().enumerate() {
            let k = seed + 3 * t as u64;
            let theta = cast(&crate::testing::random_normals(n, k));
            let mut mv = cast(&crate::testing::random_normals(2 * n, k + 1));
            mv[n..].iter_mut().for_each(|v| *v = *v * *v); // v ≥ 0
            let g = cast(&crate::testing::random_normals(n, k + 2));
            input.extend(bytes_of(&theta));
            input.extend(bytes_of(&mv));
            input.extend(bytes_of(&g));
            let (mut ms, mut vs) = (Vec::new(), Vec::new());
            for j in 0..n {
                let gi = g[j].to_f64() * scalars[0];
                let m = mv[j].to_f64() * scalars[1] + gi * scalars[2];
                let v = mv[n + j].to_f64() * scalars[3] + gi * gi * scalars[4];
                let step = (m * scalars[7]) / ((v * scalars[8]).sqrt() + scalars[9]) * scalars[5];
                want_theta.push(theta[j].to_f64() * scalars[6] - step);
                ms.push(m);
                vs.push(v);
            }
            want_mv.extend(ms.into_iter().chain(vs));
        }
        let want: Vec<f64> = want_theta.into_iter().chain(want_mv).collect();
        let tag = format!("adamw-{}", T::DTYPE.as_str());
        let got = floats_from(&driver.run(&tag, &input), std::mem::size_of::<T>());
        let (multi, per_tensor) = got.split_at(got.len() / 2);
        assert_eq!(
            multi, per_tensor,
            "{tag}: the multi-tensor update differs from the per-tensor kernels"
        );
        let tol = if std::mem::size_of::<T>() == 4 {
            1e-6
        } else {
            1e-14
        };
        let err = max_relative_error(&tag, multi, &want);
        assert!(err < tol, "{tag}: error {err:e} against the f64 update");
    }

    fn sum_squares_case<T: crate::activation::Float + ToLe>(driver: &Driver, seed: u64) {
        let mut header = vec![std::mem::size_of::<T>() as i64, 1, SIZES.len() as i64];
        header.extend(SIZES.iter().map(|&n| n as i64));
        let mut input = bytes_of(&header);
        let mut want = 0.0;
        for (t, &n) in SIZES.iter().enumerate() {
            let x: Vec<T> = crate::testing::random_normals(n, seed + t as u64)
                .iter()
                .map(|&v| T::from_f64(v))
                .collect();
            want += x.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>();
            input.extend(bytes_of(&x));
        }
        let tag = format!("sumsq-{}", T::DTYPE.as_str());
        let partials = floats_from(&driver.run(&tag, &input), 8);
        assert_eq!(partials.len(), 5, "{tag}: one partial per block");
        let got: f64 = partials.iter().sum();
        assert!((got - want).abs() <= 1e-12 * want, "{tag}: {got} vs {want}");
    }

    /// One single-tensor launch of `elementwise_main` (modes 2–8) over `n` elements: header,
    /// extra i64, floats.
    fn elementwise_run<T: crate::activation::Float + ToLe>(
        driver: &Driver,
        (mode, n): (i64, usize),
        ints: &[i64],
        floats: &[&[f64]],
    ) -> Vec<u8> {
        let mut input = bytes_of(&[std::mem::size_of::<T>() as i64, mode, 1, n as i64]);
        input.extend(bytes_of(ints));
        for f in floats {
            let t: Vec<T> = f.iter().map(|&v| T::from_f64(v)).collect();
            input.extend(bytes_of(&t));
        }
        let tag = format!("elementwise-{mode}-{}-{ints:?}", T::DTYPE.as_str());
        driver.run(&tag, &input)
    }

    fn activation_cases<T: crate::activation::Float + ToLe>(driver: &Driver) {
        use crate::activation::Function;
        let n = 203;
        let x: Vec<f64> = crate::testing::random_normals(n, 5)
            .iter()
            .map(|v| 4.0 * v)
            .collect();
        let x: Vec<f64> = x.iter().map(|&v| T::from_f64(v).to_f64()).collect();
        let tol = if std::mem::size_of::<T>() == 4 {
            1e-5
        } else {
            1e-14
        };
        let functions = [
            (0, 0.0, Function::Silu),
            (1, 0.0, Function::Sigmoid),
            (2, 0.2, Function::SmoothLeakyRelu(0.2)),
        ];
        for (code, slope, function) in functions {
            for order in 0u8..3 {
                let bytes = elementwise_run::<T>(
                    driver,
                    (2, x.len()),
                    &[code, i64::from(order)],
                    &[&[slope], &x],
                );
                let got = floats_from(&bytes, std::mem::size_of::<T>());
                let want: Vec<f64> = x.iter().map(|&v| function.eval(order, v)).collect();
                let what = format!("{function:?} order {order} ({})", T::DTYPE.as_str());
                let err = max_relative_error(&what, &got, &want);
                assert!(err < tol, "{what}: error {err:e}");
            }
        }
        let g: Vec<f64> = crate::testing::random_normals(n, 6);
        let g: Vec<f64> = g.iter().map(|&v| T::from_f64(v).to_f64()).collect();
        for zero in [0, 1] {
            let bytes = elementwise_run::<T>(driver, (3, x.len()), &[zero], &[&x, &g]);
            let got = floats_from(&bytes, std::mem::size_of::<T>());
            let what = format!("silu backward zero_grad {zero} ({})", T::DTYPE.as_str());
            if zero == 1 {
                assert!(got.iter().all(|&v| v == 0.0), "{what}: not all zero");
                continue;
            }
            let want: Vec<f64> = x
                .iter()
                .zip(&g)
                .map(|(&v, &gi)| gi * Function::Silu.eval(1, v))
                .collect();
            let err = max_relative_error(&what, &got, &want);
            assert!(err < tol, "{what}: error {err:e}");
        }
    }

    /// The per-tensor sum of squares writes partial `b` = Σ x_i² over the elements with
    /// `(i mod (64·256)) / 256 == b` (the partition the trainer's CPU side mirrors).
    fn sum_squares_partials_case<T: crate::activation::Float + ToLe>(driver: &Driver) {
        let n = 40_000;
        let x: Vec<f64> = crate::testing::random_normals(n, 8)
            .iter()
            .map(|&v| T::from_f64(v).to_f64())
            .collect();
        let got = floats_from(&elementwise_run::<T>(driver, (4, x.len()), &[], &[&x]), 8);
        let mut want = vec![0.0; 64];
        for (i, v) in x.iter().enumerate() {
            want[(i % (64 * 256)) / 256] += v * v;
        }
        let what = format!("sum_squares_partials ({})", T::DTYPE.as_str());
        let err = max_relative_error(&what, &got, &want);
        assert!(err < 1e-13, "{what}: error {err:e}");
    }

    /// Shifted softplus (orders 0–2), the Gaussian smearing (against
    /// `radial::GaussianSmearing`) and `silu_rows` (row 0 of the separable S2 activation).
    fn remaining_cases<T: crate::activation::Float + ToLe>(driver: &Driver) {
        use crate::activation::Function;
        let width = std::mem::size_of::<T>();
        let tol = if width == 4 { 1e-5 } else { 1e-14 };
        let round =
            |v: Vec<f64>| -> Vec<f64> { v.iter().map(|&x| T::from_f64(x).to_f64()).collect() };
        let x = round(
            crate::testing::random_normals(150, 31)
                .iter()
                .map(|v| 6.0 * v)
                .collect(),
        );
        for order in 0u8..3 {
            let got = floats_from(
                &elementwise_run::<T>(driver, (5, x.len()), &[i64::from(order)], &[&x]),
                width,
            );
            let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
            let want: Vec<f64> = x
                .iter()
                .map(|&v| match order {
                    0 => v.max(0.0) + (-v.abs()).exp().ln_1p() - std::f64::consts::LN_2,
                    1 => sig(v),
                    _ => sig(v) * (1.0 - sig(v)),
                })
                .collect();
            let what = format!("shifted softplus order {order} ({})", T::DTYPE.as_str());
            let err = max_relative_error(&what, &got, &want);
            assert!(err < tol, "{what}: error {err:e}");
        }
        let got = floats_from(
            &elementwise_run::<T>(driver, (8, x.len()), &[], &[&x]),
            width,
        );
        let want: Vec<f64> = x.iter().map(|&v| Function::Silu.eval(0, v)).collect();
        let what = format!("silu_inplace ({})", T::DTYPE.as_str());
        let err = max_relative_error(&what, &got, &want);
        assert!(err < tol, "{what}: error {err:e}");
        let smearing = crate::radial::GaussianSmearing::new(0.0, 6.0, 9, 2.0).expect("smearing");
        let d: Vec<f64> = round((0..13).map(|e| 0.47 * e as f64).collect());
        let k = smearing.num_output();
        let want: Vec<f64> = smearing
            .forward(
                &candle_core::Tensor::from_slice(&d, d.len(), &candle_core::Device::Cpu)
                    .expect("d"),
            )
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f64>()?))
            .expect("CPU smearing");
        let mu = round(smearing.offsets().to_vec());
        let coeff = round(vec![smearing.coeff()]);
        let bytes = elementwise_run::<T>(driver, (6, d.len() * k), &[k as i64], &[&coeff, &d, &mu]);
        let what = format!("gaussian smearing ({})", T::DTYPE.as_str());
        let err = max_relative_error(&what, &floats_from(&bytes, width), &want);
        assert!(err < tol, "{what}: error {err:e}");
        let (rows, c, stride) = (7, 5, 12);
        let sc = round(crate::testing::random_normals(rows * c, 33));
        let bytes = elementwise_run::<T>(driver, (7, sc.len()), &[c as i64, stride as i64], &[&sc]);
        let mut want = vec![0.0; rows * stride];
        for r in 0..rows {
            for j in 0..c {
                want[r * stride + j] = Function::Silu.eval(0, sc[r * c + j]);
            }
        }
        let what = format!("silu_rows ({})", T::DTYPE.as_str());
        let err = max_relative_error(&what, &floats_from(&bytes, width), &want);
        assert!(err < tol, "{what}: error {err:e}");
    }

    /// The activation kernel (SiLU, sigmoid, smooth leaky ReLU, orders 0–2), the S2 SiLU
    /// forward and backward steps, the per-tensor sums of squares, shifted softplus, the
    /// Gaussian smearing and `silu_rows` agree with the CPU functions.
    #[test]
    fn elementwise_kernels_match_the_cpu_on_the_host() {
        let Some(driver) = driver("elementwise_main") else {
            return;
        };
        activation_cases::<f64>(driver);
        activation_cases::<f32>(driver);
        sum_squares_partials_case::<f64>(driver);
        sum_squares_partials_case::<f32>(driver);
        remaining_cases::<f64>(driver);
        remaining_cases::<f32>(driver);
    }

    /// The multi-tensor AdamW kernel gives exactly what the per-tensor `adamw_param` +
    /// `adamw_moments` give (and the f64 update to rounding), across tensor boundaries, empty
    /// tensors and grid-stride rounds; the multi-tensor sum of squares gives the f64 sum.
    #[test]
    fn multi_tensor_kernels_match_the_per_tensor_ones_on_the_host() {
        let Some(driver) = driver("elementwise_main") else {
            return;
        };
        adamw_case::<f64>(driver, 11);
        adamw_case::<f32>(driver, 11);
        sum_squares_case::<f64>(driver, 21);
        sum_squares_case::<f32>(driver, 21);
    }

    /// One launch of `rows_main` (header `[width, mode, edges]`, then i64 parameters, floats
    /// and i32 tables in the order the driver reads them); its output as f64.
    fn rows_run<T: crate::activation::Float + ToLe>(
        driver: &Driver,
        (mode, edges): (i64, usize),
        ints: &[i64],
        floats: &[&[f64]],
        tables: &[&[i32]],
    ) -> Vec<f64> {
        let width = std::mem::size_of::<T>();
        let mut input = bytes_of(&[width as i64, mode, edges as i64]);
        input.extend(bytes_of(ints));
        for f in floats {
            let t: Vec<T> = f.iter().map(|&v| T::from_f64(v)).collect();
            input.extend(bytes_of(&t));
        }
        for t in tables {
            input.extend(bytes_of(t));
        }
        let tag = format!("rows-{mode}-{}-{ints:?}", T::DTYPE.as_str());
        floats_from(&driver.run(&tag, &input), width)
    }

    fn row_kernel_cases<T: crate::activation::Float + ToLe>(driver: &Driver) {
        let what = |k: &str| format!("{k} ({})", T::DTYPE.as_str());
        let round =
            |v: Vec<f64>| -> Vec<f64> { v.iter().map(|&x| T::from_f64(x).to_f64()).collect() };
        let tol = if std::mem::size_of::<T>() == 4 {
            1e-6
        } else {
            1e-15
        };
        let (e, c, trunc, nr) = (5usize, 7usize, 6usize, 4usize);
        // The m-major slots of each radial row (as so2_fused.rs pairs ±m): rows 0 and 1 one
        // slot, rows 2 and 3 two.
        let rows: [i32; 6] = [0, 1, 2, 3, 2, 3];
        let slots: [i32; 8] = [0, -1, 1, -1, 2, 4, 3, 5];
        let src = round(crate::testing::random_normals(e * trunc * c, 41));
        let g = round(crate::testing::random_normals(e * trunc * c, 42));
        let rad = round(crate::testing::random_normals(e * nr * c, 43));
        let dims = [c as i64, trunc as i64, nr as i64];

        // radial_scale: dst[e, s, ch] = src[e, s, ch] · rad[e, rows[s], ch].
        let got = rows_run::<T>(driver, (0, e), &dims, &[&src, &rad], &[&rows]);
        let mut want = vec![0.0; e * trunc * c];
        for ei in 0..e {
            for (s, &r) in rows.iter().enumerate() {
                for ch in 0..c {
                    want[(ei * trunc + s) * c + ch] =
                        src[(ei * trunc + s) * c + ch] * rad[(ei * nr + r as usize) * c + ch];
                }
            }
        }
        let err = max_relative_error(&what("radial_scale"), &got, &want);
        assert!(err < tol, "radial_scale: error {err:e}");

        // radial_backward: grad_rad[e, q, ch] = Σ_{s ∈ slots(q)} g x; gx = g · rad[e, q].
        let got = rows_run::<T>(driver, (1, e), &dims, &[&g, &src, &rad], &[&slots]);
        let mut want = vec![0.0; e * nr * c + e * trunc * c];
        let (grad_rad, gx) = want.split_at_mut(e * nr * c);
        for ei in 0..e {
            for q in 0..nr {
                for &s in slots[2 * q..2 * q + 2].iter().filter(|&&s| s >= 0) {
                    for ch in 0..c {
                        let at = (ei * trunc + s as usize) * c + ch;
                        grad_rad[(ei * nr + q) * c + ch] += g[at] * src[at];
                        gx[at] = g[at] * rad[(ei * nr + q) * c + ch];
                    }
                }
            }
        }
        let err = max_relative_error(&what("radial_backward"), &got, &want);
        assert!(err < 4.0 * tol, "radial_backward: error {err:e}");

        // add_rows: dst[e, j] = a[e·rs + off1 + j] + a[e·rs + off2 + j].
        let (n, off1, off2, rs) = (9usize, 3usize, 14usize, 25usize);
        let a = round(crate::testing::random_normals(e * rs, 44));
        let got = rows_run::<T>(
            driver,
            (2, e),
            &[n as i64, off1 as i64, off2 as i64, rs as i64],
            &[&a],
            &[],
        );
        let want: Vec<f64> = (0..e)
            .flat_map(|ei| (0..n).map(move |j| (ei, j)))
            .map(|(ei, j)| a[ei * rs + off1 + j] + a[ei * rs + off2 + j])
            .collect();
        let err = max_relative_error(&what("add_rows"), &got, &want);
        assert!(err < tol, "add_rows: error {err:e}");

        // copy_rows and broadcast_rows write n values into each row of drs at doff, nothing
        // else (the driver marks unwritten entries −12345).
        let (soff, srs, doff, drs) = (2usize, 13usize, 5usize, 17usize);
        let srcs = round(crate::testing::random_normals(e * srs, 45));
        let bias = round(crate::testing::random_normals(n, 46));
        let ints = [n, soff, srs, doff, drs].map(|v| v as i64);
        for (mode, name) in [(3, "copy_rows"), (4, "broadcast_rows")] {
            let got = if mode == 3 {
                rows_run::<T>(driver, (3, e), &ints, &[&srcs], &[])
            } else {
                rows_run::<T>(driver, (4, e), &[ints[0], ints[3], ints[4]], &[&bias], &[])
            };
            let mut want = vec![-12345.0; e * drs];
            for ei in 0..e {
                for j in 0..n {
                    want[ei * drs + doff + j] = if mode == 3 {
                        srcs[ei * srs + soff + j]
                    } else {
                        bias[j]
                    };
                }
            }
            assert_eq!(got, want, "{}", what(name));
        }

        // fill.
        let got = rows_run::<T>(driver, (5, 0), &[211], &[&[0.625]], &[]);
        assert!(
            got.len() == 211 && got.iter().all(|&v| v == 0.625),
            "{}",
            what("fill")
        );
    }

    /// The small row kernels of `rotate.cu` that the fused SO(2) layer runs between its GEMMs
    /// (radial scale and its backward, row sums, copies, bias broadcast, fill) do what their
    /// comments say, written here as plain loops over (edge, row, channel).
    #[test]
    fn row_kernels_match_their_definitions_on_the_host() {
        let Some(driver) = driver("rows_main") else {
            return;
        };
        row_kernel_cases::<f64>(driver);
        row_kernel_cases::<f32>(driver);
    }
}
