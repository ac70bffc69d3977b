//! Real spherical harmonics in e3nn's convention, as a differentiable candle op.
//!
//! # Convention (verified against e3nn 0.6.0 `o3.spherical_harmonics` to 1e-12 in f64)
//!
//! * **y is the polar axis.** Degree `l` has `2l + 1` components ordered `m = -l, ..., l`, stored
//!   l-major: component `(l, m)` of a vector sits at index `l² + (m + l)` of a row of
//!   `(lmax + 1)²` numbers.
//! * With `r² = x² + y² + z²`, `Y_{l,0} = K_{l0} Q_l^0`, `Y_{l,+m} = K_{lm} Q_l^m Re((z + i x)^m)`
//!   and `Y_{l,-m} = K_{lm} Q_l^m Im((z + i x)^m)`, where `Q_l^m(y, r²)` is the homogeneous
//!   polynomial `r^(l-m) P_l^(m)(y / r)` (the m-th derivative of the Legendre polynomial, no
//!   Condon–Shortley phase). So degree 1 is `√3 (x, y, z)` and e.g. `Y_{2,0} = √5 (y² - (x² + z²)/2)`.
//! * Normalisations ([`Normalization`]) on unit vectors: `Component` (Σ_m Y_lm² = 2l + 1, the
//!   e3nn `'component'`), `Norm` (Σ_m Y_lm² = 1) and `Integral` (∫_{S²} Y_lm² = 1).
//! * `normalize = true` evaluates the polynomials at `v / max(|v|, 1e-12)` exactly like
//!   `torch.nn.functional.normalize` (so a zero vector gives `Y_0 = 1` and zeros elsewhere);
//!   `normalize = false` evaluates the homogeneous polynomials at `v` itself (degree `l` scales
//!   as `|v|^l`).
//!
//! The evaluation uses the recurrence on `Q_l^m` with the normalisation constants folded into
//! its coefficients, over lanes of 8 vectors at a time (vectorisable), rayon-parallel over chunks,
//! writing each output row once. The backward pass is its own op ([`ShBackward`]) with the
//! analytic derivatives `∂Q_l^m/∂y = (l + m) Q_{l-1}^m`, `∂Q_l^m/∂x = -x Q_{l-1}^{m+1}`,
//! `∂Q_l^m/∂z = -z Q_{l-1}^{m+1}`, evaluated in f64 on lanes of 8 vectors (the divisions of the
//! recurrence folded into its coefficients, so the lane loops vectorise); second derivatives
//! are not implemented.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use matscale_equivariant::sh::{spherical_harmonics, Normalization};
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let xyz = Tensor::new(&[[0.0f32, 2.0, 0.0], [1.0, 0.0, 0.0]], &Device::Cpu)?;
//! let y = spherical_harmonics(&xyz, 2, true, Normalization::Component)?;
//! assert_eq!(y.dims(), &[2, 9]);
//! // +y is the pole: only the m = 0 components are non-zero, and Y_{1,0} = √3.
//! let row: Vec<f32> = y.get(0)?.to_vec1()?;
//! assert!((row[2] - 3f32.sqrt()).abs() < 1e-6);
//! assert!(row[1].abs() < 1e-7 && row[3].abs() < 1e-7);
//! # Ok(())
//! # }
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp2, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::activation::Float;
use crate::error::{EquivariantError, Result};
use crate::so2::dispatch_kernel;

/// Largest degree supported by the spherical harmonics (e3nn ships l ≤ 12; the Wigner-D
/// construction of this crate needs l ≤ 11).
pub const SH_LMAX: usize = 11;

/// `eps` of `torch.nn.functional.normalize`: vectors shorter than this are divided by it.
const NORMALIZE_EPS: f64 = 1e-12;

/// Vectors evaluated together in one vectorised block.
const LANES: usize = 8;

/// Vectors per rayon task.
const CHUNK: usize = 2048;

/// Normalisation of the spherical harmonics (e3nn's `normalization` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalization {
    /// `Σ_m Y_lm(u)² = 2l + 1` on unit vectors (e3nn `'component'`; EquiformerV2's choice).
    #[default]
    Component,
    /// `Σ_m Y_lm(u)² = 1` on unit vectors (e3nn `'norm'`).
    Norm,
    /// `∫_{S²} Y_lm² dΩ = 1` (e3nn `'integral'`).
    Integral,
}

/// Number of coefficients of degrees `0..=lmax`, `(lmax + 1)²`.
pub const fn num_coefficients(lmax: usize) -> usize {
    (lmax + 1) * (lmax + 1)
}

/// Float types the kernels run on (f32 and f64).
pub(crate) trait Real: WithDType {
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Normalisation constants `K_lm` (unnormalised-polynomial to output), indexed `l * (lmax+1) + m`.
fn normalisation_constants(lmax: usize, normalization: Normalization) -> Vec<f64> {
    let n = lmax + 1;
    let mut k = vec![0.0; n * n];
    for l in 0..=lmax {
        let per_l = match normalization {
            Normalization::Component => 1.0,
            Normalization::Norm => 1.0 / ((2 * l + 1) as f64).sqrt(),
            Normalization::Integral => 1.0 / (4.0 * std::f64::consts::PI).sqrt(),
        };
        for m in 0..=l {
            // (l - m)! / (l + m)! as a product, exact enough for l ≤ 11.
            let ratio: f64 = ((l - m + 1)..=(l + m)).map(|i| 1.0 / i as f64).product();
            let sqrt2 = if m > 0 { std::f64::consts::SQRT_2 } else { 1.0 };
            k[l * n + m] = per_l * sqrt2 * ((2 * l + 1) as f64 * ratio).sqrt();
        }
    }
    k
}

/// Coefficients of the normalised recurrence `Q̃_l^m = α_lm y Q̃_{l-1}^m - β_lm r² Q̃_{l-2}^m`
/// with `Q̃ = K Q`, and the starting values `Q̃_m^m`.
struct Recurrence<T> {
    lmax: usize,
    start: Vec<T>,
    alpha: Vec<T>,
    beta: Vec<T>,
}

impl<T: Real> Recurrence<T> {
    fn new(lmax: usize, normalization: Normalization) -> Self {
        let n = lmax + 1;
        let k = normalisation_constants(lmax, normalization);
        let mut start = vec![T::zero(); n];
        let mut alpha = vec![T::zero(); n * n];
        let mut beta = vec![T::zero(); n * n];
        let mut double_factorial = 1.0f64; // (2m - 1)!!
        for m in 0..=lmax {
            if m > 0 {
                double_factorial *= (2 * m - 1) as f64;
            }
            start[m] = T::from_f64(k[m * n + m] * double_factorial);
            for l in (m + 1)..=lmax {
                let lf = l as f64;
                let mf = m as f64;
                let a = (2.0 * lf - 1.0) / (lf - mf) * k[l * n + m] / k[(l - 1) * n + m];
                let b = if l >= m + 2 {
                    (lf + mf - 1.0) / (lf - mf) * k[l * n + m] / k[(l - 2) * n + m]
                } else {
                    0.0
                };
                alpha[l * n + m] = T::from_f64(a);
                beta[l * n + m] = T::from_f64(b);
            }
        }
        Self {
            lmax,
            start,
            alpha,
            beta,
        }
    }

    /// Evaluates up to [`LANES`] vectors (`xyz.len() == 3 * nb`) into `out` (`nb` rows).
    ///
    /// All arithmetic runs on full lanes (vectorisable) into the lane-major scratch `tmp`
    /// (`tmp[k][lane]`), which is then transposed into the contiguous output rows.
    #[inline(always)]
    fn block(&self, xyz: &[T], normalize: bool, tmp: &mut [[T; LANES]], out: &mut [T]) {
        let nb = xyz.len() / 3;
        let lmax = self.lmax;
        let n = lmax + 1;
        let dim = n * n;
        let mut x = [T::zero(); LANES];
        let mut y = [T::zero(); LANES];
        let mut z = [T::zero(); LANES];
        for (i, v) in xyz.chunks_exact(3).enumerate() {
            x[i] = v[0];
            y[i] = v[1];
            z[i] = v[2];
        }
        if normalize {
            let eps = T::from_f64(NORMALIZE_EPS);
            for i in 0..LANES {
                let r = (x[i] * x[i] + y[i] * y[i] + z[i] * z[i]).sqrt();
                let inv = T::one() / if r > eps { r } else { eps };
                x[i] *= inv;
                y[i] *= inv;
                z[i] *= inv;
            }
        }
        let mut r2 = [T::zero(); LANES];
        for i in 0..LANES {
            r2[i] = x[i] * x[i] + y[i] * y[i] + z[i] * z[i];
        }
        // (c + i s) = (z + i x)^m
        let mut c = [T::one(); LANES];
        let mut s = [T::zero(); LANES];
        for m in 0..=lmax {
            if m > 0 {
                for i in 0..LANES {
                    let cn = z[i] * c[i] - x[i] * s[i];
                    let sn = x[i] * c[i] + z[i] * s[i];
                    c[i] = cn;
                    s[i] = sn;
                }
            }
            let mut q_prev2 = [T::zero(); LANES];
            let mut q = [self.start[m]; LANES];
            let mut l = m;
            loop {
                let centre = l * l + l;
                if m == 0 {
                    tmp[centre] = q;
                } else {
                    let mut plus = [T::zero(); LANES];
                    let mut minus = [T::zero(); LANES];
                    for i in 0..LANES {
                        plus[i] = q[i] * c[i];
                        minus[i] = q[i] * s[i];
                    }
                    tmp[centre + m] = plus;
                    tmp[centre - m] = minus;
                }
                l += 1;
                if l > lmax {
                    break;
                }
                let a = self.alpha[l * n + m];
                let b = self.beta[l * n + m];
                for i in 0..LANES {
                    let next = a * y[i] * q[i] - b * r2[i] * q_prev2[i];
                    q_prev2[i] = q[i];
                    q[i] = next;
                }
            }
        }
        for (i, row) in out.chunks_exact_mut(dim).take(nb).enumerate() {
            for (o, t) in row.iter_mut().zip(&tmp[..dim]) {
                *o = t[i];
            }
        }
    }

    /// Evaluates all rows of `xyz` (`[n, 3]` row-major) into `out` (`[n, (lmax+1)²]`).
    fn evaluate(&self, xyz: &[T], normalize: bool, out: &mut [T]) {
        let dim = num_coefficients(self.lmax);
        out.par_chunks_mut(CHUNK * dim)
            .zip(xyz.par_chunks(CHUNK * 3))
            .for_each(|(out, xyz)| self.evaluate_chunk(xyz, normalize, out));
    }

    /// One rayon task: dispatches to an AVX2 build of the same code when the CPU has it (the
    /// lane loops then run 8 f32 / 4 f64 wide instead of SSE2's 4 / 2).
    fn evaluate_chunk(&self, xyz: &[T], normalize: bool, out: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { self.evaluate_chunk_avx2(xyz, normalize, out) };
            return;
        }
        self.evaluate_chunk_portable(xyz, normalize, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn evaluate_chunk_avx2(&self, xyz: &[T], normalize: bool, out: &mut [T]) {
        self.evaluate_chunk_portable(xyz, normalize, out);
    }

    #[inline(always)]
    fn evaluate_chunk_portable(&self, xyz: &[T], normalize: bool, out: &mut [T]) {
        let dim = num_coefficients(self.lmax);
        let mut tmp = vec![[T::zero(); LANES]; dim];
        for (out, xyz) in out.chunks_mut(LANES * dim).zip(xyz.chunks(LANES * 3)) {
            self.block(xyz, normalize, &mut tmp, out);
        }
    }
}

/// Vectors per rayon task of the gradient (a quarter of the forward's [`CHUNK`]: each vector
/// costs several times more, and 10⁴ edges then split evenly over the threads).
const GRAD_CHUNK: usize = CHUNK / 4;

/// Vectors whose gradients are evaluated together (f64 lanes: one AVX-512 register, two AVX2).
const GRAD_LANES: usize = 8;

/// Tables of the gradient of `Σ_lm g_lm Y_lm(v)` with respect to `v`, evaluated in f64 on
/// [`GRAD_LANES`] vectors at a time.
///
/// With `Y_lm = K_lm Q_l^m(y, r²) · (c_m or s_m)`, where `c_m + i s_m = (z + i x)^m` and
/// `Q_l^m` is the unnormalised polynomial of the recurrence
/// `Q_l^m = ((2l−1) y Q_{l−1}^m − (l+m−1) r² Q_{l−2}^m) / (l−m)` from `Q_m^m = (2m−1)!!`:
/// `∂Q_l^m/∂x = −x Q_{l−1}^{m+1}`, `∂Q_l^m/∂y = (l+m) Q_{l−1}^m`, `∂Q_l^m/∂z = −z Q_{l−1}^{m+1}`,
/// and `∂c_m = m (c_{m−1} ∂z − s_{m−1} ∂x)`, `∂s_m = m (s_{m−1} ∂z + c_{m−1} ∂x)`.
/// The divisions of the recurrence are folded into its coefficients, so the lane loops hold
/// only multiplications and additions.
struct Gradient {
    lmax: usize,
    normalize: bool,
    /// `K_lm`, `[l·(lmax+1) + m]`.
    k: Vec<f64>,
    /// `(2l−1)/(l−m)` and `(l+m−1)/(l−m)`, `[l·(lmax+1) + m]` (zero for `l ≤ m`).
    a: Vec<f64>,
    b: Vec<f64>,
    /// `(2m−1)!!`.
    start: Vec<f64>,
}

/// Per-task scratch of [`Gradient`]: `q[l][m]` and `c_m`, `s_m` lane-major, and the output
/// gradient of a block transposed to lane-major.
struct GradientScratch {
    q: [[[f64; GRAD_LANES]; SH_LMAX + 1]; SH_LMAX + 1],
    c: [[f64; GRAD_LANES]; SH_LMAX + 1],
    s: [[f64; GRAD_LANES]; SH_LMAX + 1],
    g: [[f64; GRAD_LANES]; (SH_LMAX + 1) * (SH_LMAX + 1)],
}

impl Gradient {
    fn new(lmax: usize, normalize: bool, normalization: Normalization) -> Self {
        let n = lmax + 1;
        let mut a = vec![0.0; n * n];
        let mut b = vec![0.0; n * n];
        let mut start = vec![1.0; n];
        for m in 0..=lmax {
            if m > 0 {
                start[m] = start[m - 1] * (2 * m - 1) as f64;
            }
            for l in (m + 1)..=lmax {
                let d = (l - m) as f64;
                a[l * n + m] = (2 * l - 1) as f64 / d;
                b[l * n + m] = (l + m - 1) as f64 / d;
            }
        }
        Self {
            lmax,
            normalize,
            k: normalisation_constants(lmax, normalization),
            a,
            b,
            start,
        }
    }

    /// Gradients of the vectors `xyz` (`[n, 3]`) from the output gradient `grad`
    /// (`[n, (lmax+1)²]`) into `out` (`[n, 3]`), one rayon task per [`GRAD_CHUNK`] vectors.
    fn run<T: Float>(&self, xyz: &[T], grad: &[T], out: &mut [T]) {
        let dim = num_coefficients(self.lmax);
        out.par_chunks_mut(GRAD_CHUNK * 3)
            .zip(xyz.par_chunks(GRAD_CHUNK * 3))
            .zip(grad.par_chunks(GRAD_CHUNK * dim))
            .for_each(|((out, xyz), grad)| gradient_chunk(self, xyz, grad, out));
    }

    /// One rayon task (compiled per instruction set by [`gradient_chunk`]).
    #[inline(always)]
    fn chunk<T: Float>(&self, xyz: &[T], grad: &[T], out: &mut [T]) {
        let dim = num_coefficients(self.lmax);
        // Zeroed once per task: every entry a block reads is written by that block first,
        // and the lanes past a ragged tail keep finite values of an earlier block.
        let mut scratch = Box::new(GradientScratch {
            q: [[[0.0; GRAD_LANES]; SH_LMAX + 1]; SH_LMAX + 1],
            c: [[0.0; GRAD_LANES]; SH_LMAX + 1],
            s: [[0.0; GRAD_LANES]; SH_LMAX + 1],
            g: [[0.0; GRAD_LANES]; (SH_LMAX + 1) * (SH_LMAX + 1)],
        });
        for ((out, xyz), grad) in out
            .chunks_mut(GRAD_LANES * 3)
            .zip(xyz.chunks(GRAD_LANES * 3))
            .zip(grad.chunks(GRAD_LANES * dim))
        {
            self.block(xyz, grad, &mut scratch, out);
        }
    }

    /// Up to [`GRAD_LANES`] vectors: `xyz` `[nb, 3]`, `grad` `[nb, dim]`, `out` `[nb, 3]`.
    #[inline(always)]
    fn block<T: Float>(&self, xyz: &[T], grad: &[T], sc: &mut GradientScratch, out: &mut [T]) {
        const L: usize = GRAD_LANES;
        let lmax = self.lmax;
        let n = lmax + 1;
        let dim = n * n;
        let mut x = [0.0f64; L];
        let mut y = [0.0f64; L];
        let mut z = [0.0f64; L];
        for (i, v) in xyz.chunks_exact(3).enumerate() {
            x[i] = v[0].to_f64();
            y[i] = v[1].to_f64();
            z[i] = v[2].to_f64();
        }
        for (i, row) in grad.chunks_exact(dim).enumerate() {
            for (g, &v) in sc.g.iter_mut().zip(row) {
                g[i] = v.to_f64();
            }
        }
        let mut r = [0.0f64; L];
        let mut scale = [0.0f64; L];
        for i in 0..L {
            r[i] = (x[i] * x[i] + y[i] * y[i] + z[i] * z[i]).sqrt();
            scale[i] = if r[i] > NORMALIZE_EPS {
                r[i]
            } else {
                NORMALIZE_EPS
            };
        }
        if self.normalize {
            for i in 0..L {
                x[i] /= scale[i];
                y[i] /= scale[i];
                z[i] /= scale[i];
            }
        }
        let mut r2 = [0.0f64; L];
        for i in 0..L {
            r2[i] = x[i] * x[i] + y[i] * y[i] + z[i] * z[i];
        }
        let GradientScratch { q, c, s, g } = sc;
        c[0] = [1.0; L];
        s[0] = [0.0; L];
        for m in 0..=lmax {
            if m > 0 {
                for i in 0..L {
                    let (cp, sp) = (c[m - 1][i], s[m - 1][i]);
                    c[m][i] = z[i] * cp - x[i] * sp;
                    s[m][i] = x[i] * cp + z[i] * sp;
                }
            }
            // Q_{l−1}^m and Q_{l−2}^m stay in registers; each Q_l^m is stored once.
            let mut prev = [self.start[m]; L];
            let mut prev2 = [0.0f64; L];
            q[m][m] = prev;
            for l in (m + 1)..=lmax {
                let (a, b) = (self.a[l * n + m], self.b[l * n + m]);
                let mut next = [0.0f64; L];
                for i in 0..L {
                    next[i] = a * y[i] * prev[i] - b * r2[i] * prev2[i];
                }
                q[l][m] = next;
                prev2 = prev;
                prev = next;
            }
        }
        let zero = [0.0f64; L];
        let (mut gx, mut gy, mut gz) = ([0.0f64; L], [0.0f64; L], [0.0f64; L]);
        for l in 1..=lmax {
            let centre = l * l + l;
            for m in 0..=l {
                let kk = self.k[l * n + m];
                let lm = (l + m) as f64;
                // Q_{l−1}^{m+1} and Q_{l−1}^m, zero where the order exceeds the degree.
                // Local copies (registers): the lane loops then vectorise.
                let q_up = if m + 1 < l { q[l - 1][m + 1] } else { zero };
                let q_down = if m < l { q[l - 1][m] } else { zero };
                if m == 0 {
                    let gc = g[centre];
                    for i in 0..L {
                        let w = gc[i] * kk;
                        gx[i] -= w * x[i] * q_up[i];
                        gy[i] += w * lm * q_down[i];
                        gz[i] -= w * z[i] * q_up[i];
                    }
                } else {
                    let mf = m as f64;
                    let (gp, gm) = (g[centre + m], g[centre - m]);
                    let (cm, sm, cp, sp) = (c[m], s[m], c[m - 1], s[m - 1]);
                    let q_lm = q[l][m];
                    for i in 0..L {
                        let (wc, ws) = (gp[i] * kk, gm[i] * kk);
                        let (dx, dz) = (-x[i] * q_up[i], -z[i] * q_up[i]);
                        let mq = mf * q_lm[i];
                        gx[i] += wc * (dx * cm[i] - mq * sp[i]) + ws * (dx * sm[i] + mq * cp[i]);
                        gy[i] += (wc * cm[i] + ws * sm[i]) * lm * q_down[i];
                        gz[i] += wc * (dz * cm[i] + mq * cp[i]) + ws * (dz * sm[i] + mq * sp[i]);
                    }
                }
            }
        }
        if self.normalize {
            // Through v/|v|: (I − v̂v̂ᵀ) g / |v|, or g / eps for vectors shorter than eps.
            for i in 0..L {
                if r[i] > NORMALIZE_EPS {
                    let dot = x[i] * gx[i] + y[i] * gy[i] + z[i] * gz[i];
                    gx[i] = (gx[i] - x[i] * dot) / r[i];
                    gy[i] = (gy[i] - y[i] * dot) / r[i];
                    gz[i] = (gz[i] - z[i] * dot) / r[i];
                } else {
                    gx[i] /= scale[i];
                    gy[i] /= scale[i];
                    gz[i] /= scale[i];
                }
            }
        }
        for (i, o) in out.chunks_exact_mut(3).enumerate() {
            o[0] = T::from_f64(gx[i]);
            o[1] = T::from_f64(gy[i]);
            o[2] = T::from_f64(gz[i]);
        }
    }
}

/// [`Gradient::chunk`] as a free function, for [`dispatch_kernel!`].
#[inline(always)]
fn gradient_chunk_kernel<T: Float>(g: &Gradient, xyz: &[T], grad: &[T], out: &mut [T]) {
    g.chunk(xyz, grad, out);
}

dispatch_kernel!(gradient_chunk, gradient_chunk_kernel, (g: &Gradient, xyz: &[T], grad: &[T], out: &mut [T]));

fn check_lmax(lmax: usize) -> Result<()> {
    if lmax > SH_LMAX {
        return Err(EquivariantError::InvalidDegree {
            name: "lmax",
            value: lmax,
            limit: SH_LMAX,
        });
    }
    Ok(())
}

/// Real spherical harmonics of degrees `0..=lmax` of each vector, in plain f64.
///
/// Returns `xyz.len() * (lmax + 1)²` numbers, row-major (one l-major row per vector). Same
/// convention and kernel as [`spherical_harmonics`].
///
/// ```
/// use matscale_equivariant::sh::{spherical_harmonics_f64, Normalization};
///
/// let y = spherical_harmonics_f64(1, &[[1.0, 0.0, 0.0]], true, Normalization::Component).unwrap();
/// let s3 = 3f64.sqrt();
/// assert_eq!(y.len(), 4);
/// assert!((y[0] - 1.0).abs() < 1e-15 && (y[1] - s3).abs() < 1e-15);
/// assert!(y[2].abs() < 1e-15 && y[3].abs() < 1e-15);
/// ```
pub fn spherical_harmonics_f64(
    lmax: usize,
    xyz: &[[f64; 3]],
    normalize: bool,
    normalization: Normalization,
) -> Result<Vec<f64>> {
    check_lmax(lmax)?;
    let flat: Vec<f64> = xyz.iter().flatten().copied().collect();
    let mut out = vec![0.0; xyz.len() * num_coefficients(lmax)];
    Recurrence::<f64>::new(lmax, normalization).evaluate(&flat, normalize, &mut out);
    Ok(out)
}

/// The forward op: `[n, 3]` vectors to `[n, (lmax+1)²]` harmonics.
#[derive(Debug, Clone, Copy)]
pub struct SphericalHarmonicsOp {
    lmax: usize,
    normalize: bool,
    normalization: Normalization,
}

impl SphericalHarmonicsOp {
    fn forward<T: Real>(&self, xyz: &[T]) -> Vec<T> {
        let n = xyz.len() / 3;
        // Zeroed by the allocator (no memset pass), on huge pages (few page faults).
        let mut out = crate::buffer::zeroed_vec(n * num_coefficients(self.lmax));
        Recurrence::<T>::new(self.lmax, self.normalization).evaluate(xyz, self.normalize, &mut out);
        out
    }
}

/// The contiguous `[n, 3]` slice of a storage, or an error naming the op.
fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    crate::buffer::contiguous_input(storage.as_slice::<T>()?, layout, op)
}

impl CustomOp1 for SphericalHarmonicsOp {
    fn name(&self) -> &'static str {
        "spherical-harmonics"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, three) = layout.shape().dims2()?;
        if three != 3 {
            candle_core::bail!(
                "spherical-harmonics: expected [n, 3] input, got {:?}",
                layout.shape()
            );
        }
        let shape = Shape::from((n, num_coefficients(self.lmax)));
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward(contiguous::<f32>(storage, layout, self.name())?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward(contiguous::<f64>(storage, layout, self.name())?))
            }
            _ => candle_core::bail!(
                "spherical-harmonics: unsupported dtype {:?}",
                storage.dtype()
            ),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let r = Recurrence::<f64>::new(self.lmax, self.normalization);
        let (start, alpha, beta) = (&r.start, &r.alpha, &r.beta);
        let (lmax, normalize) = (self.lmax, self.normalize);
        let rec = crate::cuda::sh::Recurrence {
            lmax,
            normalize,
            start,
            alpha,
            beta,
        };
        crate::cuda::sh::forward(storage, layout, &rec)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad_res = grad_res.contiguous()?;
        let grad = arg.apply_op2_no_bwd(&grad_res, &ShBackward { forward: *self })?;
        Ok(Some(grad))
    }
}

/// The backward op: `(xyz [n, 3], grad_out [n, (lmax+1)²])` to `grad_xyz [n, 3]`.
///
/// Computes in f64 internally for both dtypes. It has no backward itself (no second
/// derivatives of the spherical harmonics).
#[derive(Debug, Clone, Copy)]
pub struct ShBackward {
    forward: SphericalHarmonicsOp,
}

impl ShBackward {
    fn backward<T: Float>(&self, xyz: &[T], grad: &[T]) -> Vec<T> {
        let f = self.forward;
        let mut out = vec![T::zero(); xyz.len()];
        Gradient::new(f.lmax, f.normalize, f.normalization).run(xyz, grad, &mut out);
        out
    }
}

impl CustomOp2 for ShBackward {
    fn name(&self) -> &'static str {
        "spherical-harmonics-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, _) = l1.shape().dims2()?;
        let (n2, dim) = l2.shape().dims2()?;
        if n2 != n || dim != num_coefficients(self.forward.lmax) {
            candle_core::bail!(
                "spherical-harmonics-backward: gradient shape {:?} does not match input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let name = self.name();
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.backward(
                contiguous::<f32>(s1, l1, name)?,
                contiguous::<f32>(s2, l2, name)?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.backward(
                contiguous::<f64>(s1, l1, name)?,
                contiguous::<f64>(s2, l2, name)?,
            )),
            _ => candle_core::bail!(
                "spherical-harmonics-backward: unsupported dtypes {:?}, {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let f = self.forward;
        let k = normalisation_constants(f.lmax, f.normalization);
        crate::cuda::sh::backward(s1, l1, s2, l2, f.lmax, f.normalize, &k)
    }
}

/// In-place form of the forward op: writes into an existing `[n, (lmax+1)²]` tensor.
#[derive(Debug, Clone, Copy)]
struct ShInto {
    forward: SphericalHarmonicsOp,
}

impl InplaceOp2 for ShInto {
    fn name(&self) -> &'static str {
        "spherical-harmonics-into"
    }

    fn cpu_fwd(
        &self,
        out: &mut CpuStorage,
        out_layout: &Layout,
        xyz: &CpuStorage,
        xyz_layout: &Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = out_layout.contiguous_offsets() else {
            candle_core::bail!("spherical-harmonics-into: output must be contiguous");
        };
        let (lmax, normalize, normalization) = (
            self.forward.lmax,
            self.forward.normalize,
            self.forward.normalization,
        );
        match (out, xyz) {
            (CpuStorage::F32(out), CpuStorage::F32(_)) => {
                let x = contiguous::<f32>(xyz, xyz_layout, self.name())?;
                Recurrence::<f32>::new(lmax, normalization).evaluate(
                    x,
                    normalize,
                    &mut out[start..end],
                );
            }
            (CpuStorage::F64(out), CpuStorage::F64(_)) => {
                let x = contiguous::<f64>(xyz, xyz_layout, self.name())?;
                Recurrence::<f64>::new(lmax, normalization).evaluate(
                    x,
                    normalize,
                    &mut out[start..end],
                );
            }
            (out, xyz) => candle_core::bail!(
                "spherical-harmonics-into: unsupported dtypes {:?} (output), {:?} (xyz)",
                out.dtype(),
                xyz.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        out: &mut candle_core::CudaStorage,
        out_layout: &Layout,
        xyz: &candle_core::CudaStorage,
        xyz_layout: &Layout,
    ) -> candle_core::Result<()> {
        let f = self.forward;
        let r = Recurrence::<f64>::new(f.lmax, f.normalization);
        let (start, alpha, beta) = (&r.start, &r.alpha, &r.beta);
        let (lmax, normalize) = (f.lmax, f.normalize);
        let rec = crate::cuda::sh::Recurrence {
            lmax,
            normalize,
            start,
            alpha,
            beta,
        };
        crate::cuda::sh::forward_into(out, out_layout, xyz, xyz_layout, &rec)
    }
}

/// Checks `xyz` (`[..., 3]`, f32/f64) and returns it flattened to a contiguous `[n, 3]`.
fn flat_vectors(xyz: &Tensor) -> Result<Tensor> {
    let dims = xyz.dims();
    if dims.last() != Some(&3) {
        return Err(EquivariantError::ShapeMismatch {
            arg: "xyz",
            expected: "[..., 3]".into(),
            found: dims.to_vec(),
        });
    }
    if !matches!(xyz.dtype(), DType::F32 | DType::F64) {
        return Err(EquivariantError::UnsupportedDType {
            arg: "xyz",
            found: xyz.dtype(),
        });
    }
    Ok(xyz.reshape((xyz.elem_count() / 3, 3))?.contiguous()?)
}

/// Writes the spherical harmonics of `xyz` (`[..., 3]`) into an existing tensor `out` of shape
/// `[..., (lmax + 1)²]` and the same dtype, without allocating and without gradient.
///
/// For inference loops that evaluate many batches of the same size: a fresh output of this op
/// is a large allocation whose first touch costs page faults and kernel zeroing (about as much
/// as the arithmetic at 10⁶ vectors); reusing `out` avoids both.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use matscale_equivariant::sh::{spherical_harmonics, spherical_harmonics_into, Normalization};
///
/// # fn main() -> matscale_equivariant::error::Result<()> {
/// let xyz = Tensor::randn(0f32, 1f32, (100, 3), &Device::Cpu)?;
/// let out = Tensor::zeros((100, 25), DType::F32, &Device::Cpu)?;
/// spherical_harmonics_into(&xyz, &out, 4, true, Normalization::Component)?;
/// let fresh = spherical_harmonics(&xyz, 4, true, Normalization::Component)?;
/// assert_eq!(out.to_vec2::<f32>()?, fresh.to_vec2::<f32>()?);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// As [`spherical_harmonics`], plus [`EquivariantError::ShapeMismatch`] (argument `out`) if
/// `out` does not have the expected shape or is not contiguous, and
/// [`EquivariantError::UnsupportedDType`] if its dtype differs from that of `xyz`.
pub fn spherical_harmonics_into(
    xyz: &Tensor,
    out: &Tensor,
    lmax: usize,
    normalize: bool,
    normalization: Normalization,
) -> Result<()> {
    check_lmax(lmax)?;
    let flat = flat_vectors(xyz)?;
    let mut expected = xyz.dims().to_vec();
    *expected.last_mut().expect("dims end in 3") = num_coefficients(lmax);
    if out.dims() != expected.as_slice() || !out.is_contiguous() {
        return Err(EquivariantError::ShapeMismatch {
            arg: "out",
            expected: format!("contiguous {expected:?}"),
            found: out.dims().to_vec(),
        });
    }
    if out.dtype() != xyz.dtype() {
        return Err(EquivariantError::UnsupportedDType {
            arg: "out",
            found: out.dtype(),
        });
    }
    let op = ShInto {
        forward: SphericalHarmonicsOp {
            lmax,
            normalize,
            normalization,
        },
    };
    out.inplace_op2(&flat, &op)?;
    Ok(())
}

/// Real spherical harmonics of degrees `0..=lmax` (e3nn convention, see the module docs) of
/// vectors `xyz` of shape `[..., 3]`, returning `[..., (lmax + 1)²]` in the input dtype (f32 or
/// f64), differentiable with respect to `xyz`.
///
/// Mirrors e3nn's `o3.spherical_harmonics(list(range(lmax + 1)), xyz, normalize, normalization)`.
///
/// # Errors
/// [`EquivariantError::InvalidDegree`] if `lmax > SH_LMAX`, [`EquivariantError::ShapeMismatch`]
/// if the last dimension is not 3, [`EquivariantError::UnsupportedDType`] for dtypes other than
/// f32 and f64.
pub fn spherical_harmonics(
    xyz: &Tensor,
    lmax: usize,
    normalize: bool,
    normalization: Normalization,
) -> Result<Tensor> {
    check_lmax(lmax)?;
    let flat = flat_vectors(xyz)?;
    let op = SphericalHarmonicsOp {
        lmax,
        normalize,
        normalization,
    };
    let out = flat.apply_op1(op)?;
    let mut out_dims = xyz.dims().to_vec();
    *out_dims.last_mut().expect("dims end in 3") = num_coefficients(lmax);
    Ok(out.reshape(out_dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close_slice, check_gradient, random_tensor, Fixture};
    use candle_core::{Device, Var};

    fn fixture_xyz(fx: &Fixture, n: usize) -> Vec<[f64; 3]> {
        let (_, xyz) = fx.array("sh_xyz");
        xyz.chunks(3).take(n).map(|v| [v[0], v[1], v[2]]).collect()
    }

    /// Max over elements of |a - b| / max(1, |b|).
    fn max_rel(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0.0, f64::max)
    }

    /// Max over rows and degrees of max_m |a - b| / max(1, max_m |b|): the error relative to the
    /// size of each degree's block (raw vectors scale degree l by |v|^l).
    fn max_rel_per_degree(a: &[f64], b: &[f64], lmax: usize) -> f64 {
        let dim = num_coefficients(lmax);
        let mut worst = 0.0f64;
        for (ra, rb) in a.chunks(dim).zip(b.chunks(dim)) {
            for l in 0..=lmax {
                let range = l * l..(l + 1) * (l + 1);
                let scale = rb[range.clone()].iter().fold(1.0f64, |m, v| m.max(v.abs()));
                let err = ra[range.clone()]
                    .iter()
                    .zip(&rb[range])
                    .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
                worst = worst.max(err / scale);
            }
        }
        worst
    }

    /// The CUDA backward kernel (`kernels/sh.cu` `sh_backward`), run on the host
    /// (`crate::host_kernels`), against the CPU gradient on the same inputs; returns the largest
    /// difference relative to the largest CPU value.
    fn host_backward_error<T: Float + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        (lmax, normalize, normalization): (usize, bool, Normalization),
        n: usize,
        seed: u64,
    ) -> f64 {
        use crate::host_kernels::{bytes_of, floats_from};
        let dim = num_coefficients(lmax);
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        let mut xyz = crate::testing::random_normals(3 * n, seed);
        // A zero vector and a tiny one: the normalisation's guarded branch.
        xyz[..3].fill(0.0);
        xyz[3..6].iter_mut().for_each(|v| *v *= 1e-14);
        let (xyz, grad) = (
            cast(xyz),
            cast(crate::testing::random_normals(n * dim, seed + 1)),
        );
        let op = ShBackward {
            forward: SphericalHarmonicsOp {
                lmax,
                normalize,
                normalization,
            },
        };
        let want = op.backward(&xyz, &grad);
        let width = std::mem::size_of::<T>();
        let header = [width as i64, n as i64, lmax as i64, i64::from(normalize), 0];
        let mut input = bytes_of(&header);
        input.extend(bytes_of(&xyz));
        input.extend(bytes_of(&grad));
        input.extend(bytes_of(&normalisation_constants(lmax, normalization)));
        let tag = format!("{}-{lmax}-{normalize}-{normalization:?}", T::DTYPE.as_str());
        let got = floats_from(&driver.run(&tag, &input), width);
        let want: Vec<f64> = want.iter().map(|v| v.to_f64()).collect();
        crate::host_kernels::max_relative_error(&tag, &got, &want)
    }

    /// The CUDA forward kernel (`sh_forward`: rows staged in shared memory, a barrier, then
    /// coalesced stores), run on the host, against the CPU op on the same vectors; the largest
    /// difference relative to the largest CPU value.
    fn host_forward_error<T: Real + Float + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        (lmax, normalize, normalization): (usize, bool, Normalization),
        n: usize,
        seed: u64,
    ) -> f64 {
        use crate::host_kernels::{bytes_of, floats_from};
        let mut xyz = crate::testing::random_normals(3 * n, seed);
        xyz[..3].fill(0.0);
        let xyz: Vec<T> = xyz.into_iter().map(T::from_f64).collect();
        let op = SphericalHarmonicsOp {
            lmax,
            normalize,
            normalization,
        };
        let want = op.forward(&xyz);
        let r = Recurrence::<f64>::new(lmax, normalization);
        let cast = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        let width = std::mem::size_of::<T>();
        let header = [width as i64, n as i64, lmax as i64, i64::from(normalize), 1];
        let mut input = bytes_of(&header);
        input.extend(bytes_of(&xyz));
        for table in [&r.start, &r.alpha, &r.beta] {
            input.extend(bytes_of(&cast(table)));
        }
        let tag = format!(
            "fwd-{}-{lmax}-{normalize}-{normalization:?}",
            T::DTYPE.as_str()
        );
        let got = floats_from(&driver.run(&tag, &input), width);
        let want: Vec<f64> = want.iter().map(|v| v.to_f64()).collect();
        crate::host_kernels::max_relative_error(&tag, &got, &want)
    }

    /// The CUDA forward kernel, run on the host (150 vectors: three blocks, the last one
    /// partial), agrees with the CPU op for every degree up to `SH_LMAX` (including the 32-row
    /// blocks of f64 past 48 KiB of shared memory): f64 to 1e-12, f32 to 1e-5.
    #[test]
    fn cuda_forward_kernel_matches_the_cpu_on_the_host() {
        let Some(driver) = crate::host_kernels::driver("sh_main") else {
            return;
        };
        let mut seed = 90;
        for lmax in [0, 1, 3, 6, SH_LMAX] {
            for (_, normalize, normalization) in [CASES[0], CASES[3], CASES[4]] {
                seed += 2;
                let case = (lmax, normalize, normalization);
                let e64 = host_forward_error::<f64>(driver, case, 150, seed);
                let e32 = host_forward_error::<f32>(driver, case, 150, seed);
                let what = format!("lmax {lmax} normalize {normalize} {normalization:?}");
                assert!(e64 < 1e-12, "{what}: f64 error {e64:e}");
                assert!(e32 < 1e-5, "{what}: f32 error {e32:e}");
            }
        }
    }

    /// The CUDA backward kernel, run on the host, agrees with the CPU gradient for every degree
    /// up to `SH_LMAX`, both normalisation choices and all three conventions: f64 to 1e-12
    /// and f32 to 1e-5 of the largest value.
    #[test]
    fn cuda_backward_kernel_matches_the_cpu_on_the_host() {
        let Some(driver) = crate::host_kernels::driver("sh_main") else {
            return;
        };
        let mut seed = 70;
        for lmax in [1, 2, 4, 6, SH_LMAX] {
            for (_, normalize, normalization) in CASES {
                seed += 2;
                let case = (lmax, normalize, normalization);
                let e64 = host_backward_error::<f64>(driver, case, 41, seed);
                let e32 = host_backward_error::<f32>(driver, case, 41, seed);
                let what = format!("lmax {lmax} normalize {normalize} {normalization:?}");
                assert!(e64 < 1e-12, "{what}: f64 error {e64:e}");
                assert!(e32 < 1e-5, "{what}: f32 error {e32:e}");
            }
        }
    }

    const CASES: [(&str, bool, Normalization); 6] = [
        ("sh_l8_component_normalized", true, Normalization::Component),
        ("sh_l8_component_raw", false, Normalization::Component),
        ("sh_l8_norm_normalized", true, Normalization::Norm),
        ("sh_l8_norm_raw", false, Normalization::Norm),
        ("sh_l8_integral_normalized", true, Normalization::Integral),
        ("sh_l8_integral_raw", false, Normalization::Integral),
    ];

    #[test]
    fn plain_f64_matches_e3nn_for_all_normalisations() {
        let fx = Fixture::open("sh_wigner_e3nn");
        for (name, normalize, normalization) in CASES {
            let (shape, expected) = fx.array(name);
            let xyz = fixture_xyz(&fx, shape[0]);
            let ours = spherical_harmonics_f64(8, &xyz, normalize, normalization).unwrap();
            let err = max_rel(&ours, expected);
            assert!(err < 1e-12, "{name}: max rel error {err:e}");
        }
        let (shape, expected) = fx.array("sh_l11_component_normalized");
        let xyz = fixture_xyz(&fx, shape[0]);
        let ours = spherical_harmonics_f64(11, &xyz, true, Normalization::Component).unwrap();
        assert!(max_rel(&ours, expected) < 1e-12);
    }

    #[test]
    fn candle_op_matches_e3nn_in_f64_and_f32() -> Result<()> {
        let fx = Fixture::open("sh_wigner_e3nn");
        for (name, normalize, normalization) in CASES {
            let (shape, expected) = fx.array(name);
            let xyz: Vec<f64> = fixture_xyz(&fx, shape[0]).into_iter().flatten().collect();
            let t = Tensor::from_vec(xyz, (shape[0], 3), &Device::Cpu)?;
            let y64: Vec<f64> = spherical_harmonics(&t, 8, normalize, normalization)?
                .flatten_all()?
                .to_vec1()?;
            let err64 = max_rel(&y64, expected);
            assert!(err64 < 1e-12, "{name} f64: {err64:e}");
            let y32: Vec<f64> =
                spherical_harmonics(&t.to_dtype(DType::F32)?, 8, normalize, normalization)?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1()?;
            let err32 = max_rel_per_degree(&y32, expected, 8);
            assert!(err32 < 1e-5, "{name} f32: {err32:e}");
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_e3nn_autograd() -> Result<()> {
        let fx = Fixture::open("sh_wigner_e3nn");
        let (wshape, w) = fx.array("sh_grad_weights");
        let weights = Tensor::from_slice(w, (wshape[0], wshape[1]), &Device::Cpu)?;
        let xyz: Vec<f64> = fixture_xyz(&fx, wshape[0]).into_iter().flatten().collect();
        for (name, normalize) in [("sh_grad_l6_normalized", true), ("sh_grad_l6_raw", false)] {
            let (_, expected) = fx.array(name);
            for dtype in [DType::F64, DType::F32] {
                let var = Var::from_tensor(
                    &Tensor::from_slice(&xyz, (wshape[0], 3), &Device::Cpu)?.to_dtype(dtype)?,
                )?;
                let y =
                    spherical_harmonics(var.as_tensor(), 6, normalize, Normalization::Component)?;
                let loss = (y * weights.to_dtype(dtype)?)?.sum_all()?;
                let grads = loss.backward()?;
                let g: Vec<f64> = grads
                    .get(var.as_tensor())
                    .expect("gradient")
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1()?;
                let tol = if dtype == DType::F64 { 1e-11 } else { 1e-4 };
                let err = max_rel(&g, expected);
                assert!(err < tol, "{name} {dtype:?}: {err:e}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = random_tensor(&[6, 3], DType::F64, 11)?;
        for normalize in [true, false] {
            for normalization in [Normalization::Component, Normalization::Integral] {
                let check = check_gradient(
                    |t| {
                        Ok(spherical_harmonics(t, 8, normalize, normalization)
                            .expect("valid input"))
                    },
                    &x,
                    1e-6,
                )?;
                check.assert_within(1e-7);
            }
        }
        Ok(())
    }

    /// The vectorised gradient treats its lanes independently: many vectors at once (several
    /// rayon tasks, a ragged last block, a zero and a tiny vector among them) give each
    /// vector's gradient computed alone, for every normalisation, with and without `normalize`.
    #[test]
    fn batched_gradients_equal_one_vector_at_a_time() {
        let n = 2 * GRAD_CHUNK + GRAD_LANES + 5;
        let lmax = 7;
        let dim = num_coefficients(lmax);
        let mut xyz = crate::testing::random_normals(3 * n, 21);
        xyz[3 * 17..3 * 18].fill(0.0);
        xyz[3 * 40..3 * 41].copy_from_slice(&[1e-14, -2e-14, 5e-15]);
        let grad = crate::testing::random_normals(n * dim, 22);
        for normalization in [
            Normalization::Component,
            Normalization::Norm,
            Normalization::Integral,
        ] {
            for normalize in [true, false] {
                let g = Gradient::new(lmax, normalize, normalization);
                let mut all = vec![0.0f64; 3 * n];
                g.run(&xyz, &grad, &mut all);
                assert!(all.iter().all(|v| v.is_finite()));
                for e in 0..n {
                    let mut one = [0.0f64; 3];
                    g.run(
                        &xyz[3 * e..3 * e + 3],
                        &grad[e * dim..(e + 1) * dim],
                        &mut one,
                    );
                    assert_eq!(one, all[3 * e..3 * e + 3], "vector {e}");
                }
            }
        }
    }

    #[test]
    fn unit_vectors_have_the_component_norm_and_rows_are_written_once() {
        // Many vectors (several rayon chunks plus a ragged tail) on the unit sphere.
        let n = 2 * CHUNK + 13;
        let raw = crate::testing::random_normals(3 * n, 3);
        let xyz: Vec<[f64; 3]> = raw.chunks(3).map(|v| [v[0], v[1], v[2]]).collect();
        let y = spherical_harmonics_f64(8, &xyz, true, Normalization::Component).unwrap();
        for row in y.chunks(81) {
            for l in 0..=8 {
                let s: f64 = row[l * l..(l + 1) * (l + 1)].iter().map(|v| v * v).sum();
                assert!((s - (2 * l + 1) as f64).abs() < 1e-11, "l = {l}: {s}");
            }
        }
        // Same rows as evaluated one at a time (no cross-talk between lanes or chunks).
        for i in [0, 7, 8, CHUNK - 1, CHUNK, n - 1] {
            let one =
                spherical_harmonics_f64(8, &xyz[i..i + 1], true, Normalization::Component).unwrap();
            assert_close_slice(&one, &y[i * 81..(i + 1) * 81], 0.0);
        }
    }

    #[test]
    fn into_writes_the_same_values_and_checks_its_output() -> Result<()> {
        let x = random_tensor(&[3, 7, 3], DType::F64, 2)?;
        let out = Tensor::ones((3, 7, 36), DType::F64, &Device::Cpu)?;
        spherical_harmonics_into(&x, &out, 5, false, Normalization::Norm)?;
        let fresh = spherical_harmonics(&x, 5, false, Normalization::Norm)?;
        crate::testing::assert_close(&out, &fresh, 0.0);
        let wrong = Tensor::zeros((21, 36), DType::F64, &Device::Cpu)?;
        assert!(matches!(
            spherical_harmonics_into(&x, &wrong, 5, false, Normalization::Norm),
            Err(EquivariantError::ShapeMismatch { arg: "out", .. })
        ));
        let f32_out = Tensor::zeros((3, 7, 36), DType::F32, &Device::Cpu)?;
        assert!(matches!(
            spherical_harmonics_into(&x, &f32_out, 5, false, Normalization::Norm),
            Err(EquivariantError::UnsupportedDType { arg: "out", .. })
        ));
        Ok(())
    }

    #[test]
    fn leading_dimensions_are_kept_and_errors_name_the_argument() -> Result<()> {
        let x = random_tensor(&[2, 5, 3], DType::F32, 1)?;
        let y = spherical_harmonics(&x, 3, true, Normalization::Component)?;
        assert_eq!(y.dims(), &[2, 5, 16]);
        match spherical_harmonics(&x, 12, true, Normalization::Component) {
            Err(EquivariantError::InvalidDegree {
                name: "lmax",
                value: 12,
                limit: 11,
            }) => {}
            other => panic!("expected InvalidDegree, got {other:?}"),
        }
        let bad = random_tensor(&[4, 2], DType::F32, 1)?;
        match spherical_harmonics(&bad, 2, true, Normalization::Component) {
            Err(EquivariantError::ShapeMismatch {
                arg: "xyz", found, ..
            }) => assert_eq!(found, vec![4, 2]),
            other => panic!("expected ShapeMismatch, got {other:?}"),
        }
        let ints = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
        assert!(matches!(
            spherical_harmonics(&ints, 2, true, Normalization::Component),
            Err(EquivariantError::UnsupportedDType { arg: "xyz", .. })
        ));
        Ok(())
    }
}
