//! Shared test helpers: random rotations, finite-difference gradient checks, tensor comparison.
//!
//! Only compiled for tests (`#[cfg(test)] pub(crate)`).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A standard normal sample (Box–Muller), so that the helpers need no `rand_distr`.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A rotation matrix drawn uniformly (Haar measure) from SO(3), reproducible from `seed`.
///
/// Built from a uniformly random unit quaternion (four normal samples, normalised), so the
/// determinant is +1 and the matrix is orthogonal to rounding.
pub(crate) fn random_rotation(seed: u64) -> [[f64; 3]; 3] {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut q = [0.0f64; 4];
    loop {
        for v in q.iter_mut() {
            *v = normal(&mut rng);
        }
        let n = q.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n > 1e-6 {
            q.iter_mut().for_each(|v| *v /= n);
            break;
        }
    }
    let [w, x, y, z] = q;
    [
        [
            1.0 - 2.0 * (y * y + z * z),
            2.0 * (x * y - w * z),
            2.0 * (x * z + w * y),
        ],
        [
            2.0 * (x * y + w * z),
            1.0 - 2.0 * (x * x + z * z),
            2.0 * (y * z - w * x),
        ],
        [
            2.0 * (x * z - w * y),
            2.0 * (y * z + w * x),
            1.0 - 2.0 * (x * x + y * y),
        ],
    ]
}

/// `n` standard-normal f64 samples, reproducible from `seed`.
pub(crate) fn random_normals(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| normal(&mut rng)).collect()
}

/// A tensor of standard-normal samples with the given shape and dtype, on the CPU.
pub(crate) fn random_tensor(shape: &[usize], dtype: DType, seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(random_normals(n, seed), shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Result of [`check_gradient`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct GradCheck {
    /// Largest absolute difference between the autograd and the finite-difference gradient.
    pub(crate) max_abs: f64,
    /// `max_abs / max(1, ‖finite-difference gradient‖_∞)`.
    pub(crate) max_rel: f64,
}

impl GradCheck {
    /// Panics with both errors in the message unless `max_rel <= tol`.
    pub(crate) fn assert_within(&self, tol: f64) {
        assert!(
            self.max_rel <= tol,
            "gradient check failed: max abs error {:.3e}, max rel error {:.3e} > {tol:.1e}",
            self.max_abs,
            self.max_rel
        );
    }
}

/// Compares the autograd gradient of `sum(f(x) * w)` (with fixed random weights `w`) with
/// central finite differences of step `eps`, element by element. `input` must be f64.
pub(crate) fn check_gradient<F>(f: F, input: &Tensor, eps: f64) -> Result<GradCheck>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    assert_eq!(
        input.dtype(),
        DType::F64,
        "check_gradient needs an f64 input"
    );
    let var = Var::from_tensor(input)?;
    let out = f(var.as_tensor())?;
    let weights = random_tensor(out.dims(), DType::F64, 0x5eed)?;
    let loss = (&out * &weights)?.sum_all()?;
    let grads = loss.backward()?;
    let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all()?.to_vec1()?,
        None => vec![0.0; input.elem_count()],
    };

    let x0: Vec<f64> = input.flatten_all()?.to_vec1()?;
    let scalar = |x: &[f64]| -> Result<f64> {
        let t = Tensor::from_slice(x, input.dims(), input.device())?;
        (f(&t)? * &weights)?.sum_all()?.to_scalar::<f64>()
    };
    let mut max_abs = 0.0f64;
    let mut max_numeric = 0.0f64;
    let mut x = x0.clone();
    for i in 0..x0.len() {
        x[i] = x0[i] + eps;
        let plus = scalar(&x)?;
        x[i] = x0[i] - eps;
        let minus = scalar(&x)?;
        x[i] = x0[i];
        let numeric = (plus - minus) / (2.0 * eps);
        max_numeric = max_numeric.max(numeric.abs());
        max_abs = max_abs.max((numeric - analytic[i]).abs());
    }
    Ok(GradCheck {
        max_abs,
        max_rel: max_abs / max_numeric.max(1.0),
    })
}

/// Panics unless `a` and `b` have the same shape and all elements differ by at most `tol`
/// (compared in f64; the message names the first offending flat index).
pub(crate) fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "assert_close: shapes differ");
    let va: Vec<f64> = a
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("assert_close: tensor a readable as f64");
    let vb: Vec<f64> = b
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("assert_close: tensor b readable as f64");
    assert_close_slice(&va, &vb, tol);
}

/// Panics unless `got` and `want` (same shape) differ by at most `tol · max(1, max|want|)`
/// everywhere: a relative tolerance for f32 results (`what` names the compared quantity).
pub(crate) fn assert_close_relative(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let want_max = want
        .to_dtype(DType::F64)
        .and_then(|t| t.abs())
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f64>())
        .expect("assert_close_relative: tensor readable as f64");
    let scale = want_max.max(1.0);
    let rescale = |t: &Tensor| t.to_dtype(DType::F64)? / scale;
    let (g, w) = (
        rescale(got).expect("assert_close_relative: got readable as f64"),
        rescale(want).expect("assert_close_relative: want readable as f64"),
    );
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (vg, vw): (Vec<f64>, Vec<f64>) = (
        g.flatten_all().and_then(|t| t.to_vec1()).expect("readable"),
        w.flatten_all().and_then(|t| t.to_vec1()).expect("readable"),
    );
    for (i, (x, y)) in vg.iter().zip(&vw).enumerate() {
        assert!(
            (x - y).abs() <= tol,
            "{what}: element {i}: {} vs {} (scale {scale:e}, tolerance {tol:e})",
            x * scale,
            y * scale
        );
    }
}

/// Slice version of [`assert_close`].
pub(crate) fn assert_close_slice(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "assert_close: lengths differ");
    let mut worst = (0usize, 0.0f64);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        if d > worst.1 || d.is_nan() {
            worst = (i, if d.is_nan() { f64::INFINITY } else { d });
        }
    }
    assert!(
        worst.1 <= tol,
        "assert_close: element {} differs by {:.3e} > {tol:.1e} ({} vs {})",
        worst.0,
        worst.1,
        a[worst.0],
        b[worst.0]
    );
}

/// 3×3 matrix product.
pub(crate) fn matmul3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut c = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

/// 3×3 matrix times vector.
pub(crate) fn matvec3(a: &[[f64; 3]; 3], v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| a[i][0] * v[0] + a[i][1] * v[1] + a[i][2] * v[2])
}

/// A fixture made of a JSON manifest (`{"arrays": [{"name", "shape", "offset"}], ...}`) and a
/// binary file of little-endian f64 values (`offset` counts values), both in
/// `tests/data/equivariant/` under the names `<stem>.json` and `<stem>.bin`.
pub(crate) struct Fixture {
    manifest: serde_json::Value,
    values: Vec<f64>,
    stem: String,
}

impl Fixture {
    /// Reads `tests/data/equivariant/<stem>.{json,bin}`; panics with the path if unreadable.
    pub(crate) fn open(stem: &str) -> Self {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/equivariant/");
        let json_path = format!("{dir}{stem}.json");
        let bin_path = format!("{dir}{stem}.bin");
        let text =
            std::fs::read_to_string(&json_path).unwrap_or_else(|e| panic!("{json_path}: {e}"));
        let manifest: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{json_path}: {e}"));
        let bytes = std::fs::read(&bin_path).unwrap_or_else(|e| panic!("{bin_path}: {e}"));
        assert_eq!(bytes.len() % 8, 0, "{bin_path}: length not a multiple of 8");
        let values = bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8 bytes")))
            .collect();
        Self {
            manifest,
            values,
            stem: stem.to_string(),
        }
    }

    /// The array `name`: its shape and its values (row-major).
    pub(crate) fn array(&self, name: &str) -> (Vec<usize>, &[f64]) {
        let entry = self.manifest["arrays"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name))
            .unwrap_or_else(|| panic!("fixture {}: no array named {name}", self.stem));
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .expect("shape is an array")
            .iter()
            .map(|d| d.as_u64().expect("shape entries are integers") as usize)
            .collect();
        let offset = entry["offset"].as_u64().expect("offset is an integer") as usize;
        let len: usize = shape.iter().product();
        (shape, &self.values[offset..offset + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_rotations_are_proper_and_orthogonal() {
        for seed in 0..20 {
            let r = random_rotation(seed);
            let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
                - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
                + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
            assert!((det - 1.0).abs() < 1e-12);
            let rt = [0, 1, 2].map(|i| [0, 1, 2].map(|j| r[j][i]));
            let id = matmul3(&r, &rt);
            for i in 0..3 {
                for j in 0..3 {
                    let e = if i == j { 1.0 } else { 0.0 };
                    assert!((id[i][j] - e).abs() < 1e-12);
                }
            }
        }
        assert_ne!(random_rotation(1), random_rotation(2));
    }

    #[test]
    fn gradient_checker_detects_right_and_wrong_gradients() -> Result<()> {
        let x = random_tensor(&[4, 3], DType::F64, 7)?;
        let good = check_gradient(|t| t.sqr()?.sin(), &x, 1e-6)?;
        good.assert_within(1e-8);
        // A closure whose forward and backward disagree: detach hides a factor from autograd.
        let bad = check_gradient(|t| t.mul(&t.detach()), &x, 1e-6)?;
        assert!(bad.max_rel > 1e-2, "{bad:?}");
        Ok(())
    }
}
