//! Wigner-D matrices of real spherical harmonics, from scratch, and their per-edge block storage.
//!
//! # Convention (verified against e3nn 0.6.0 `o3.wigner_D` / `o3.matrix_to_angles`)
//!
//! * `D^l(R)` is the `(2l+1)×(2l+1)` matrix with `Y^l(R r) = D^l(R) Y^l(r)` for the spherical
//!   harmonics of [`crate::sh`] (any normalisation), row-major, rows and columns ordered
//!   `m = -l..=l`. It is a representation, `D(R₁R₂) = D(R₁) D(R₂)`, and orthogonal.
//! * **`D^1(R) = R` exactly**: the l = 1 harmonics are `√3 (x, y, z)`, so the l = 1 basis is
//!   the Cartesian one and no permutation is involved (e3nn's
//!   `o3.Irrep("1o").D_from_matrix(R)` equals `R` to 3e-15).
//! * Euler angles are e3nn's: `R = R_y(α) R_x(β) R_y(γ)` ([`angles_to_matrix`]), recovered by
//!   [`matrix_to_angles`] (`α, β` from `R e_y`, `γ` from the remaining roll about y).
//! * `D^l(α, β, γ) = Z(α) J_l Z(β) J_l Z(γ)` (fairchem's `wigner_D`), where `Z(θ)` is the
//!   rotation by θ about the polar y axis in this basis (`Z[i][i] = cos((l-i)θ)`,
//!   `Z[i][2l-i] = sin((l-i)θ)`) and `J_l = (-1)^l D^l(π/2, π/2, π/2)` (fairchem's `Jd.pt`),
//!   which is symmetric and an involution. The `J_l` are computed here, once, by projecting the
//!   rotated spherical harmonics onto the unrotated ones with a quadrature that is exact for
//!   polynomials of these degrees (Gauss–Legendre in y times a uniform azimuthal grid).
//!
//! # Example
//!
//! ```
//! use matscale_equivariant::wigner::{angles_to_matrix, wigner_d};
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let r = angles_to_matrix(0.3, 1.1, -0.7);
//! let d1 = wigner_d(1, &r)?;
//! for i in 0..3 {
//!     for j in 0..3 {
//!         assert!((d1[3 * i + j] - r[i][j]).abs() < 1e-12);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{EquivariantError, Result};
use crate::sh::{spherical_harmonics_f64, Normalization};

/// Largest degree of the Wigner-D matrices.
pub const WIGNER_LMAX: usize = 11;

/// Offset of block `l` in a row of [`WignerBlocks`]: `Σ_{k<l} (2k+1)² = l(2l-1)(2l+1)/3`.
pub const fn block_offset(l: usize) -> usize {
    if l == 0 {
        0
    } else {
        l * (2 * l - 1) * (2 * l + 1) / 3
    }
}

/// Length of a row of [`WignerBlocks`] for degrees `0..=lmax`: `Σ_{l≤lmax} (2l+1)²`.
pub const fn blocks_len(lmax: usize) -> usize {
    block_offset(lmax + 1)
}

fn check_l(name: &'static str, l: usize) -> Result<()> {
    if l > WIGNER_LMAX {
        return Err(EquivariantError::InvalidDegree {
            name,
            value: l,
            limit: WIGNER_LMAX,
        });
    }
    Ok(())
}

/// Rotation by `angle` about the x axis (e3nn `matrix_x`).
pub fn matrix_x(angle: f64) -> [[f64; 3]; 3] {
    let (s, c) = angle.sin_cos();
    [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
}

/// Rotation by `angle` about the y axis (e3nn `matrix_y`).
pub fn matrix_y(angle: f64) -> [[f64; 3]; 3] {
    let (s, c) = angle.sin_cos();
    [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]
}

fn mul3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut c = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            c[i][j] = a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j];
        }
    }
    c
}

/// `R_y(α) R_x(β) R_y(γ)` (e3nn `angles_to_matrix`).
pub fn angles_to_matrix(alpha: f64, beta: f64, gamma: f64) -> [[f64; 3]; 3] {
    mul3(&mul3(&matrix_y(alpha), &matrix_x(beta)), &matrix_y(gamma))
}

/// Euler angles `(α, β, γ)` with `R = R_y(α) R_x(β) R_y(γ)` (e3nn `matrix_to_angles`).
///
/// `α, β` are the azimuth and polar angle of `R e_y`; `β` is computed with `atan2` (not
/// `acos` as e3nn does) so that it stays accurate near the poles. At the poles `α = 0` and
/// `γ` carries the whole roll, so `angles_to_matrix` of the result reproduces `R`.
pub fn matrix_to_angles(rotation: &[[f64; 3]; 3]) -> (f64, f64, f64) {
    let r = rotation;
    let (x, y, z) = (r[0][1], r[1][1], r[2][1]);
    let beta = (x * x + z * z).sqrt().atan2(y);
    let alpha = if x == 0.0 && z == 0.0 {
        0.0
    } else {
        x.atan2(z)
    };
    let (sa, ca) = alpha.sin_cos();
    // Row 0 of (R_y(α) R_x(β))ᵀ R: the first column of R_y(α) R_x(β) is (cos α, 0, -sin α).
    let gamma = (ca * r[0][2] - sa * r[2][2]).atan2(ca * r[0][0] - sa * r[2][0]);
    (alpha, beta, gamma)
}

/// `(cos(kθ), sin(kθ))` for `k = 0..=l`, by complex multiplication.
fn multiple_angles(l: usize, theta: f64, out: &mut [(f64, f64)]) {
    let (s, c) = theta.sin_cos();
    out[0] = (1.0, 0.0);
    for k in 1..=l {
        let (pc, ps) = out[k - 1];
        out[k] = (pc * c - ps * s, pc * s + ps * c);
    }
}

/// `M ← Z(θ) M` for a row-major `(2l+1)×(2l+1)` matrix.
fn z_left(l: usize, cs: &[(f64, f64)], m: &mut [f64]) {
    let n = 2 * l + 1;
    for i in 0..l {
        // Row i has frequency f = l - i; row 2l - i has -f.
        let (c, s) = cs[l - i];
        let k = 2 * l - i;
        for j in 0..n {
            let (a, b) = (m[i * n + j], m[k * n + j]);
            m[i * n + j] = c * a + s * b;
            m[k * n + j] = c * b - s * a;
        }
    }
}

/// `M ← M Z(θ)` for a row-major `(2l+1)×(2l+1)` matrix.
fn z_right(l: usize, cs: &[(f64, f64)], m: &mut [f64]) {
    let n = 2 * l + 1;
    for row in m.chunks_mut(n) {
        for j in 0..l {
            let (c, s) = cs[l - j];
            let k = 2 * l - j;
            let (a, b) = (row[j], row[k]);
            row[j] = c * a - s * b;
            row[k] = s * a + c * b;
        }
    }
}

/// Gauss–Legendre nodes and weights on [-1, 1] (Newton iteration on P_n).
fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let mut t = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
            let mut dp = 1.0;
            for _ in 0..100 {
                let (mut p0, mut p1) = (1.0, t);
                for k in 2..=n {
                    let p2 = ((2 * k - 1) as f64 * t * p1 - (k - 1) as f64 * p0) / k as f64;
                    p0 = p1;
                    p1 = p2;
                }
                dp = n as f64 * (t * p1 - p0) / (t * t - 1.0);
                let dt = p1 / dp;
                t -= dt;
                if dt.abs() < 1e-16 {
                    break;
                }
            }
            (t, 2.0 / ((1.0 - t * t) * dp * dp))
        })
        .collect()
}

/// `D^l(R)` for all `l ≤ lmax` by exact quadrature: `D_ij = (1/4π) ∫ Y_i(R r) Y_j(r) dΩ`
/// (component normalisation, `∫ Y_i Y_j = 4π δ_ij`). Slow; used once for the `J` matrices and
/// as an independent reference in tests.
pub(crate) fn wigner_d_by_projection(lmax: usize, rotation: &[[f64; 3]; 3]) -> Vec<Vec<f64>> {
    let n_polar = lmax + 2;
    let n_azimuth = 2 * lmax + 3;
    let mut points = Vec::new();
    let mut weights = Vec::new();
    for (t, w) in gauss_legendre(n_polar) {
        let s = (1.0 - t * t).sqrt();
        for k in 0..n_azimuth {
            let phi = std::f64::consts::TAU * k as f64 / n_azimuth as f64;
            points.push([s * phi.sin(), t, s * phi.cos()]);
            weights.push(w * std::f64::consts::TAU / n_azimuth as f64);
        }
    }
    let rotated: Vec<[f64; 3]> = points
        .iter()
        .map(|p| {
            [0, 1, 2].map(|i| rotation[i][0] * p[0] + rotation[i][1] * p[1] + rotation[i][2] * p[2])
        })
        .collect();
    let dim = (lmax + 1) * (lmax + 1);
    let y = spherical_harmonics_f64(lmax, &points, false, Normalization::Component)
        .expect("lmax ≤ WIGNER_LMAX ≤ SH_LMAX");
    let yr = spherical_harmonics_f64(lmax, &rotated, false, Normalization::Component)
        .expect("lmax ≤ WIGNER_LMAX ≤ SH_LMAX");
    (0..=lmax)
        .map(|l| {
            let n = 2 * l + 1;
            let o = l * l;
            let mut d = vec![0.0; n * n];
            for (p, w) in weights.iter().enumerate() {
                let w = w / (4.0 * std::f64::consts::PI);
                for i in 0..n {
                    let a = w * yr[p * dim + o + i];
                    for j in 0..n {
                        d[i * n + j] += a * y[p * dim + o + j];
                    }
                }
            }
            d
        })
        .collect()
}

/// The matrices `J_l = (-1)^l D^l(π/2, π/2, π/2)` for `l ≤ WIGNER_LMAX`, computed on first use.
fn j_matrices() -> &'static [Vec<f64>] {
    static J: OnceLock<Vec<Vec<f64>>> = OnceLock::new();
    J.get_or_init(|| {
        let half = std::f64::consts::FRAC_PI_2;
        let r = angles_to_matrix(half, half, half);
        let mut d = wigner_d_by_projection(WIGNER_LMAX, &r);
        for (l, block) in d.iter_mut().enumerate() {
            // Entries of J are exact algebraic numbers; the quadrature leaves ~1e-16 noise,
            // which is cleaned where the entry should be 0. Odd l picks up the sign.
            let sign = if l % 2 == 1 { -1.0 } else { 1.0 };
            for v in block.iter_mut() {
                *v = if v.abs() < 1e-13 { 0.0 } else { sign * *v };
            }
        }
        d
    })
}

/// `J_l = (-1)^l D^l(π/2, π/2, π/2)` (fairchem's `Jd[l]`), row-major `(2l+1)²`.
///
/// # Errors
/// [`EquivariantError::InvalidDegree`] if `l > WIGNER_LMAX`.
pub fn j_matrix(l: usize) -> Result<&'static [f64]> {
    check_l("l", l)?;
    Ok(&j_matrices()[l])
}

/// Scratch space for [`wigner_d_blocks_into`].
struct Scratch {
    cos_sin: [Vec<(f64, f64)>; 3],
    tmp: Vec<f64>,
}

impl Scratch {
    fn new(lmax: usize) -> Self {
        let n = 2 * lmax + 1;
        Self {
            cos_sin: std::array::from_fn(|_| vec![(0.0, 0.0); lmax + 1]),
            tmp: vec![0.0; n * n],
        }
    }
}

/// Writes `D^l(α, β, γ)` for `l = 0..=lmax` into `out` (length [`blocks_len`]`(lmax)`).
fn wigner_d_blocks_into(
    lmax: usize,
    angles: (f64, f64, f64),
    scratch: &mut Scratch,
    out: &mut [f64],
) {
    let j = j_matrices();
    let (alpha, beta, gamma) = angles;
    let [ca, cb, cg] = &mut scratch.cos_sin;
    multiple_angles(lmax, alpha, ca);
    multiple_angles(lmax, beta, cb);
    multiple_angles(lmax, gamma, cg);
    for l in 0..=lmax {
        let n = 2 * l + 1;
        let jl = &j[l];
        let tmp = &mut scratch.tmp[..n * n];
        // tmp = Z(β) J Z(γ) ... built right to left: start from J, apply Z(γ) on the right,
        // Z(β) on the left, then J on the left (the one dense product) and Z(α) on the left.
        tmp.copy_from_slice(jl);
        z_right(l, cg, tmp);
        z_left(l, cb, tmp);
        let block = &mut out[block_offset(l)..block_offset(l) + n * n];
        for i in 0..n {
            let row = &mut block[i * n..(i + 1) * n];
            row.fill(0.0);
            for k in 0..n {
                let a = jl[i * n + k];
                if a != 0.0 {
                    for (r, t) in row.iter_mut().zip(&tmp[k * n..(k + 1) * n]) {
                        *r += a * t;
                    }
                }
            }
        }
        z_left(l, ca, block);
    }
}

/// Edges evaluated together by [`blocks_lanes`].
const EDGE_LANES: usize = 8;

/// Lane-major scratch of [`blocks_lanes`]: `[value index][lane]`.
struct LaneScratch {
    cos: [Vec<[f64; EDGE_LANES]>; 3],
    sin: [Vec<[f64; EDGE_LANES]>; 3],
    a: Vec<[f64; EDGE_LANES]>,
    b: Vec<[f64; EDGE_LANES]>,
}

impl LaneScratch {
    fn new(lmax: usize) -> Self {
        let n = 2 * lmax + 1;
        let zero = [0.0; EDGE_LANES];
        Self {
            cos: std::array::from_fn(|_| vec![zero; lmax + 1]),
            sin: std::array::from_fn(|_| vec![zero; lmax + 1]),
            a: vec![zero; n * n],
            b: vec![zero; n * n],
        }
    }
}

/// `M ← Z(θ) M` on lanes, with `cos[f]`, `sin[f]` the multiples of θ.
#[inline(always)]
fn z_left_lanes(
    l: usize,
    cos: &[[f64; EDGE_LANES]],
    sin: &[[f64; EDGE_LANES]],
    m: &mut [[f64; EDGE_LANES]],
) {
    let n = 2 * l + 1;
    for i in 0..l {
        let (c, s) = (cos[l - i], sin[l - i]);
        let k = 2 * l - i;
        for j in 0..n {
            let (a, b) = (m[i * n + j], m[k * n + j]);
            let (mut top, mut bottom) = ([0.0; EDGE_LANES], [0.0; EDGE_LANES]);
            for e in 0..EDGE_LANES {
                top[e] = c[e] * a[e] + s[e] * b[e];
                bottom[e] = c[e] * b[e] - s[e] * a[e];
            }
            m[i * n + j] = top;
            m[k * n + j] = bottom;
        }
    }
}

/// The blocks of up to [`EDGE_LANES`] edges at once: the same products as
/// [`wigner_d_blocks_into`], with every operation running across the edges (vectorisable),
/// zero entries of `J` skipped, and the results written straight into `out` in `T`.
fn blocks_lanes<T: WithDType>(
    lmax: usize,
    angles: &[(f64, f64, f64)],
    s: &mut LaneScratch,
    out: &mut [T],
) {
    let j = j_matrices();
    let len = blocks_len(lmax);
    for w in 0..3 {
        let (mut c1, mut s1) = ([1.0; EDGE_LANES], [0.0; EDGE_LANES]);
        for (e, a) in angles.iter().enumerate() {
            let t = [a.0, a.1, a.2][w];
            (s1[e], c1[e]) = t.sin_cos();
        }
        let (cos, sin) = (&mut s.cos[w], &mut s.sin[w]);
        cos[0] = [1.0; EDGE_LANES];
        sin[0] = [0.0; EDGE_LANES];
        for k in 1..=lmax {
            let (pc, ps) = (cos[k - 1], sin[k - 1]);
            for e in 0..EDGE_LANES {
                cos[k][e] = pc[e] * c1[e] - ps[e] * s1[e];
                sin[k][e] = pc[e] * s1[e] + ps[e] * c1[e];
            }
        }
    }
    let [cos_a, cos_b, cos_g] = &s.cos;
    let [sin_a, sin_b, sin_g] = &s.sin;
    for l in 0..=lmax {
        let n = 2 * l + 1;
        let jl = &j[l];
        let a = &mut s.a[..n * n];
        // a = J Z(γ)
        for i in 0..n {
            a[i * n + l] = [jl[i * n + l]; EDGE_LANES];
            for jj in 0..l {
                let k = 2 * l - jj;
                let (c, sn) = (cos_g[l - jj], sin_g[l - jj]);
                let (p, q) = (jl[i * n + jj], jl[i * n + k]);
                for e in 0..EDGE_LANES {
                    a[i * n + jj][e] = p * c[e] - q * sn[e];
                    a[i * n + k][e] = p * sn[e] + q * c[e];
                }
            }
        }
        // a = Z(β) a
        z_left_lanes(l, cos_b, sin_b, a);
        // b = J a
        let b = &mut s.b[..n * n];
        for i in 0..n {
            for jj in 0..n {
                b[i * n + jj] = [0.0; EDGE_LANES];
            }
            for k in 0..n {
                let w = jl[i * n + k];
                if w == 0.0 {
                    continue;
                }
                for jj in 0..n {
                    let src = a[k * n + jj];
                    let dst = &mut b[i * n + jj];
                    for e in 0..EDGE_LANES {
                        dst[e] += w * src[e];
                    }
                }
            }
        }
        // b = Z(α) b
        z_left_lanes(l, cos_a, sin_a, b);
        let off = block_offset(l);
        for (e, row) in out.chunks_exact_mut(len).take(angles.len()).enumerate() {
            for (o, v) in row[off..off + n * n].iter_mut().zip(b.iter()) {
                *o = T::from_f64(v[e]);
            }
        }
    }
}

/// The blocks of all `angles`, row-major `[E, blocks_len(lmax)]`, rayon over chunks of edges.
fn blocks_batch<T: WithDType>(lmax: usize, angles: &[(f64, f64, f64)]) -> Vec<T> {
    const CHUNK_EDGES: usize = 256;
    let len = blocks_len(lmax);
    let mut data = crate::buffer::zeroed_vec(angles.len() * len);
    data.par_chunks_mut(len * CHUNK_EDGES)
        .zip(angles.par_chunks(CHUNK_EDGES))
        .for_each_init(
            || LaneScratch::new(lmax),
            |scratch, (out, angles)| {
                for (out, a) in out
                    .chunks_mut(len * EDGE_LANES)
                    .zip(angles.chunks(EDGE_LANES))
                {
                    blocks_lanes(lmax, a, scratch, out);
                }
            },
        );
    data
}

/// `D^l(α, β, γ)` in e3nn's convention (`R = R_y(α) R_x(β) R_y(γ)`), row-major `(2l+1)²`.
///
/// # Errors
/// [`EquivariantError::InvalidDegree`] if `l > WIGNER_LMAX`.
pub fn wigner_d_from_angles(l: usize, alpha: f64, beta: f64, gamma: f64) -> Result<Vec<f64>> {
    check_l("l", l)?;
    let mut all = vec![0.0; blocks_len(l)];
    wigner_d_blocks_into(l, (alpha, beta, gamma), &mut Scratch::new(l), &mut all);
    Ok(all[block_offset(l)..].to_vec())
}

/// `D^l(R)` of a rotation matrix, row-major `(2l+1)²`: `Y^l(R r) = D^l(R) Y^l(r)`.
///
/// `rotation` must be a proper rotation (orthogonal, det +1); this is not checked.
///
/// # Errors
/// [`EquivariantError::InvalidDegree`] if `l > WIGNER_LMAX`.
pub fn wigner_d(l: usize, rotation: &[[f64; 3]; 3]) -> Result<Vec<f64>> {
    let (a, b, g) = matrix_to_angles(rotation);
    wigner_d_from_angles(l, a, b, g)
}

/// Per-edge block-diagonal Wigner-D matrices for degrees `0..=lmax`.
///
/// Layout: a contiguous f32 or f64 tensor `[E, blocks_len(lmax)]`; row `e` holds the blocks
/// `D^0, D^1, ..., D^lmax` of edge `e`'s rotation, block `l` starting at [`block_offset`]`(l)`
/// as a row-major `(2l+1)×(2l+1)` matrix. Acting on an l-major embedding `x[e, l² + m + l, c]`,
/// the rotated embedding is `x'[l² + i] = Σ_j D^l[i][j] x[l² + j]`. The tensor is detached (no
/// gradient flows into it). For `mmax < lmax`, rotation ops select the rows with `|m| ≤ mmax`
/// of each block (fairchem's `rotate` with `coefficient_idx(lmax, mmax)`).
#[derive(Debug, Clone)]
pub struct WignerBlocks {
    lmax: usize,
    blocks: Tensor,
}

impl WignerBlocks {
    /// Wraps an existing `[E, blocks_len(lmax)]` tensor.
    ///
    /// # Errors
    /// [`EquivariantError::InvalidDegree`] or [`EquivariantError::ShapeMismatch`].
    pub fn new(blocks: Tensor, lmax: usize) -> Result<Self> {
        check_l("lmax", lmax)?;
        match blocks.dims() {
            [_, len] if *len == blocks_len(lmax) => Ok(Self {
                lmax,
                blocks: blocks.detach(),
            }),
            found => Err(EquivariantError::ShapeMismatch {
                arg: "blocks",
                expected: format!("[num_edges, {}]", blocks_len(lmax)),
                found: found.to_vec(),
            }),
        }
    }

    /// The blocks of a batch of rotation matrices (rayon-parallel, computed in f64).
    ///
    /// # Errors
    /// [`EquivariantError::InvalidDegree`] if `lmax > WIGNER_LMAX`,
    /// [`EquivariantError::UnsupportedDType`] unless `dtype` is f32 or f64.
    pub fn from_rotations(
        rotations: &[[[f64; 3]; 3]],
        lmax: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let angles: Vec<(f64, f64, f64)> = rotations.iter().map(matrix_to_angles).collect();
        Self::from_angles(&angles, lmax, dtype, device)
    }

    /// The blocks of a batch of e3nn Euler angles `(α, β, γ)`.
    ///
    /// # Errors
    /// As [`WignerBlocks::from_rotations`].
    pub fn from_angles(
        angles: &[(f64, f64, f64)],
        lmax: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_l("lmax", lmax)?;
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(EquivariantError::UnsupportedDType {
                arg: "dtype",
                found: dtype,
            });
        }
        let blocks = match dtype {
            DType::F32 => Tensor::from_vec(
                blocks_batch::<f32>(lmax, angles),
                (angles.len(), blocks_len(lmax)),
                device,
            )?,
            _ => Tensor::from_vec(
                blocks_batch::<f64>(lmax, angles),
                (angles.len(), blocks_len(lmax)),
                device,
            )?,
        };
        Ok(Self { lmax, blocks })
    }

    /// Largest degree.
    pub fn lmax(&self) -> usize {
        self.lmax
    }

    /// Number of edges (rows).
    pub fn num_edges(&self) -> usize {
        self.blocks.dims()[0]
    }

    /// The `[E, blocks_len(lmax)]` tensor.
    pub fn blocks(&self) -> &Tensor {
        &self.blocks
    }

    /// The blocks of the inverse rotations (each block transposed).
    ///
    /// # Errors
    /// Candle errors only.
    pub fn inverse(&self) -> Result<Self> {
        let parts = (0..=self.lmax)
            .map(|l| {
                let n = 2 * l + 1;
                let e = self.num_edges();
                self.blocks
                    .narrow(1, block_offset(l), n * n)?
                    .reshape((e, n, n))?
                    .transpose(1, 2)?
                    .reshape((e, n * n))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            lmax: self.lmax,
            blocks: Tensor::cat(&parts, 1)?.contiguous()?,
        })
    }

    /// The dense `[E, (lmax+1)², (lmax+1)²]` block-diagonal matrices (reference and tests only:
    /// never used on a fast path).
    ///
    /// # Errors
    /// Candle errors only.
    pub fn to_dense(&self) -> Result<Tensor> {
        let dim = (self.lmax + 1) * (self.lmax + 1);
        let e = self.num_edges();
        let src: Vec<f64> = self.blocks.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let len = blocks_len(self.lmax);
        let mut dense = vec![0.0f64; e * dim * dim];
        for k in 0..e {
            for l in 0..=self.lmax {
                let n = 2 * l + 1;
                let o = l * l;
                for i in 0..n {
                    for j in 0..n {
                        dense[k * dim * dim + (o + i) * dim + o + j] =
                            src[k * len + block_offset(l) + i * n + j];
                    }
                }
            }
        }
        Ok(
            Tensor::from_vec(dense, (e, dim, dim), self.blocks.device())?
                .to_dtype(self.blocks.dtype())?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sh::{num_coefficients, spherical_harmonics_f64};
    use crate::testing::{assert_close_slice, matmul3, random_normals, random_rotation, Fixture};

    fn transpose3(r: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
        [0, 1, 2].map(|i| [0, 1, 2].map(|j| r[j][i]))
    }

    fn matmul(n: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for k in 0..n {
                for j in 0..n {
                    c[i * n + j] += a[i * n + k] * b[k * n + j];
                }
            }
        }
        c
    }

    fn transpose(n: usize, a: &[f64]) -> Vec<f64> {
        (0..n * n).map(|k| a[(k % n) * n + k / n]).collect()
    }

    fn identity(n: usize) -> Vec<f64> {
        (0..n * n)
            .map(|k| if k / n == k % n { 1.0 } else { 0.0 })
            .collect()
    }

    #[test]
    fn j_matrices_match_e3nn_and_are_symmetric_involutions() {
        let fx = Fixture::open("sh_wigner_e3nn");
        let (_, expected) = fx.array("wigner_j_l11");
        for l in 0..=WIGNER_LMAX {
            let n = 2 * l + 1;
            let j = j_matrix(l).unwrap();
            assert_close_slice(
                j,
                &expected[block_offset(l)..block_offset(l) + n * n],
                1e-12,
            );
            assert_close_slice(j, &transpose(n, j), 1e-13);
            assert_close_slice(&matmul(n, j, j), &identity(n), 1e-12);
        }
        assert!(j_matrix(12).is_err());
    }

    #[test]
    fn blocks_match_e3nn_from_angles_and_from_matrices() {
        let fx = Fixture::open("sh_wigner_e3nn");
        let (shape, rots) = fx.array("wigner_rotations");
        let (_, angles) = fx.array("wigner_angles");
        let (_, blocks) = fx.array("wigner_blocks_l11");
        let len = blocks_len(WIGNER_LMAX);
        for k in 0..shape[0] {
            let r: [[f64; 3]; 3] =
                std::array::from_fn(|i| std::array::from_fn(|j| rots[9 * k + 3 * i + j]));
            let (a, b, g) = matrix_to_angles(&r);
            let e = &angles[3 * k..3 * k + 3];
            let wrap = |x: f64| (x + std::f64::consts::PI).rem_euclid(std::f64::consts::TAU);
            assert!(
                (wrap(a) - wrap(e[0])).abs() < 1e-12,
                "alpha {a} vs {}",
                e[0]
            );
            assert!((b - e[1]).abs() < 1e-7, "beta {b} vs {}", e[1]); // e3nn's acos loses digits
            assert!((wrap(g) - wrap(e[2])).abs() < 1e-7, "gamma {g} vs {}", e[2]);
            for l in 0..=WIGNER_LMAX {
                let n = 2 * l + 1;
                let want = &blocks[k * len + block_offset(l)..k * len + block_offset(l) + n * n];
                assert_close_slice(
                    &wigner_d_from_angles(l, e[0], e[1], e[2]).unwrap(),
                    want,
                    1e-12,
                );
                assert_close_slice(&wigner_d(l, &r).unwrap(), want, 1e-10);
            }
        }
    }

    #[test]
    fn d1_is_the_rotation_itself() {
        for seed in 0..50 {
            let r = random_rotation(seed);
            let d = wigner_d(1, &r).unwrap();
            let flat: Vec<f64> = r.iter().flatten().copied().collect();
            assert_close_slice(&d, &flat, 1e-12);
        }
        // At the poles of the angle parametrisation (R e_y = ±e_y).
        for r in [
            angles_to_matrix(0.0, 0.0, 0.4),
            angles_to_matrix(1.0, std::f64::consts::PI, -2.0),
        ] {
            let flat: Vec<f64> = r.iter().flatten().copied().collect();
            assert_close_slice(&wigner_d(1, &r).unwrap(), &flat, 1e-12);
        }
    }

    #[test]
    fn harmonics_of_rotated_vectors_are_rotated_harmonics() {
        let raw = random_normals(3 * 8, 5);
        let xyz: Vec<[f64; 3]> = raw.chunks(3).map(|v| [v[0], v[1], v[2]]).collect();
        let lmax = WIGNER_LMAX;
        let dim = num_coefficients(lmax);
        let y = spherical_harmonics_f64(lmax, &xyz, false, Normalization::Component).unwrap();
        for seed in 0..5 {
            let r = random_rotation(100 + seed);
            let rotated: Vec<[f64; 3]> = xyz
                .iter()
                .map(|v| crate::testing::matvec3(&r, *v))
                .collect();
            let yr =
                spherical_harmonics_f64(lmax, &rotated, false, Normalization::Component).unwrap();
            for l in 0..=lmax {
                let n = 2 * l + 1;
                let d = wigner_d(l, &r).unwrap();
                for p in 0..xyz.len() {
                    let yl = &y[p * dim + l * l..p * dim + l * l + n];
                    let dy: Vec<f64> = (0..n)
                        .map(|i| (0..n).map(|j| d[i * n + j] * yl[j]).sum())
                        .collect();
                    // |v| is O(1) here; allow for |v|^l growth of the raw polynomials.
                    let scale = yl.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                    let got = &yr[p * dim + l * l..p * dim + l * l + n];
                    for (a, b) in dy.iter().zip(got) {
                        assert!((a - b).abs() <= 1e-12 * scale, "l = {l}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn representation_is_orthogonal_and_composes() {
        for seed in 0..4 {
            let r1 = random_rotation(2 * seed);
            let r2 = random_rotation(2 * seed + 1);
            let r12 = matmul3(&r1, &r2);
            for l in 0..=WIGNER_LMAX {
                let n = 2 * l + 1;
                let d1 = wigner_d(l, &r1).unwrap();
                let d2 = wigner_d(l, &r2).unwrap();
                assert_close_slice(&wigner_d(l, &r12).unwrap(), &matmul(n, &d1, &d2), 1e-12);
                assert_close_slice(&matmul(n, &d1, &transpose(n, &d1)), &identity(n), 1e-12);
                assert_close_slice(
                    &wigner_d(l, &transpose3(&r1)).unwrap(),
                    &transpose(n, &d1),
                    1e-12,
                );
            }
        }
    }

    #[test]
    fn euler_construction_agrees_with_direct_projection() {
        let r = random_rotation(77);
        let projected = wigner_d_by_projection(WIGNER_LMAX, &r);
        for (l, want) in projected.iter().enumerate() {
            assert_close_slice(&wigner_d(l, &r).unwrap(), want, 1e-12);
        }
    }

    #[test]
    fn wigner_blocks_layout_dense_and_inverse() -> Result<()> {
        let rots: Vec<_> = (0..70).map(random_rotation).collect();
        let lmax = 4;
        let w = WignerBlocks::from_rotations(&rots, lmax, DType::F64, &Device::Cpu)?;
        assert_eq!(w.blocks().dims(), &[70, blocks_len(lmax)]);
        assert_eq!(blocks_len(4), 1 + 9 + 25 + 49 + 81);
        let data: Vec<Vec<f64>> = w.blocks().to_vec2()?;
        for (k, r) in rots.iter().enumerate() {
            for l in 0..=lmax {
                let n = 2 * l + 1;
                let want = wigner_d(l, r).unwrap();
                assert_close_slice(
                    &data[k][block_offset(l)..block_offset(l) + n * n],
                    &want,
                    1e-13,
                );
            }
        }
        let inv = w.inverse()?;
        let inv_data: Vec<Vec<f64>> = inv.blocks().to_vec2()?;
        for (k, r) in rots.iter().enumerate().take(5) {
            for l in 0..=lmax {
                let n = 2 * l + 1;
                let want = wigner_d(l, &transpose3(r)).unwrap();
                assert_close_slice(
                    &inv_data[k][block_offset(l)..block_offset(l) + n * n],
                    &want,
                    1e-12,
                );
            }
        }
        let dense = w.to_dense()?;
        assert_eq!(dense.dims(), &[70, 25, 25]);
        let d: Vec<Vec<Vec<f64>>> = dense.to_vec3()?;
        assert_eq!(d[3][1][4], 0.0); // off-diagonal block
        assert_eq!(d[3][5][6], data[3][block_offset(2) + 5 + 2]);
        let w32 = WignerBlocks::from_rotations(&rots, lmax, DType::F32, &Device::Cpu)?;
        assert_eq!(w32.blocks().dtype(), DType::F32);
        assert!(WignerBlocks::from_rotations(&rots, 12, DType::F32, &Device::Cpu).is_err());
        assert!(matches!(
            WignerBlocks::new(w.blocks().clone(), 3),
            Err(EquivariantError::ShapeMismatch { arg: "blocks", .. })
        ));
        Ok(())
    }
}
