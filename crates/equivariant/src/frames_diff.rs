//! Differentiable edge frames: Wigner-D blocks of deterministic edge frames built from the
//! edge vectors with plain candle ops, so that gradients (and gradients of gradients) flow
//! from the blocks back into the edge vectors.
//!
//! [`crate::frames::edge_wigner`] builds the blocks from detached values, as fairchem does:
//! then `−∂E/∂r` misses every path through the frames, and a model that rotates messages into
//! edge frames cannot give conservative forces. This module builds the same matrices as a
//! differentiable function of the edge vector.
//!
//! # Construction
//! For an edge `r = (x, y, z)` with `ρ = √(x² + z²)`, the e3nn angles of its direction are
//! `cos α = z/ρ`, `sin α = x/ρ`, `cos β = y/|r|`, `sin β = ρ/|r|`; the zero-roll frame is
//! `R = (R_y(α) R_x(β))ᵀ` ([`crate::frames::Roll::Zero`]) and its blocks are
//! `D^l(R) = (Z(α) J_l Z(β) J_l)ᵀ` with `Z(θ) = diag(cos kᵢθ) + diag(sin kᵢθ)·P`
//! (`kᵢ = l − i`, `P` the order-reversing permutation) and `J_l` from
//! [`crate::wigner::j_matrix`]. The multiples `cos kθ, sin kθ` come from `cos θ, sin θ` by the
//! complex-power recursion; everything is elementwise products, constant-matrix products and
//! index selections, all of which candle differentiates any number of times.
//!
//! # Two charts
//! No frame field is smooth on the whole sphere (the zero-roll frame turns abruptly about the
//! edge where the edge passes through ±y, where `α` is undefined), and crystals often have
//! edges exactly along y. So edges with `|ŷ| > 1/√2` use a second chart: the zero-roll frame
//! of `Q r` composed with `Q`, where `Q = R_x(π/2)` maps y to z, so that
//! `D^l = D^l(R₀(Q r)) D^l(Q)`; `Q r` is at least 45° from ±y there. Both charts give proper
//! edge frames (`R r̂ = +y`); they differ by a roll about the edge, to which an equivariant
//! network is blind. Within each chart the blocks are smooth functions of the edge vector.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use matscale_equivariant::frames_diff::zero_roll_wigner;
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let r = Var::from_slice(&[1.0f64, 2.0, -0.5, 0.0, 3.0, 0.1], (2, 3), &Device::Cpu)?;
//! let blocks = zero_roll_wigner(r.as_tensor(), 2)?;
//! assert_eq!(blocks[2].dims(), &[2, 5, 5]);
//! // D^1 is the frame rotation itself: its middle row is the unit edge vector.
//! let row: Vec<f64> = blocks[1].get(0)?.get(1)?.to_vec1()?;
//! let n = (1.0f64 + 4.0 + 0.25).sqrt();
//! assert!((row[1] - 2.0 / n).abs() < 1e-12);
//! // Gradients reach the edge vectors.
//! let grads = blocks[2].sqr()?.sum_all()?.backward()?;
//! assert!(grads.get(r.as_tensor()).is_some());
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Device, Tensor};

use crate::error::{EquivariantError, Result};
use crate::wigner::{j_matrix, matrix_x, wigner_d, WIGNER_LMAX};

/// `|ŷ|²` above which an edge uses the second chart (45° from ±y).
const SECOND_CHART_Y2: f64 = 0.5;

/// The Wigner-D blocks `D^0 … D^lmax` (`[E, 2l+1, 2l+1]` each, row-major as
/// [`crate::wigner`]) of deterministic edge frames of `edge_vec` (`[E, 3]`, f32 or f64), as a
/// differentiable function of `edge_vec`. Edges with `|ŷ| ≤ 1/√2` get exactly the frames of
/// [`crate::frames::edge_wigner`] with [`crate::frames::Roll::Zero`]; the others get the
/// second chart (see the [module docs](self)).
///
/// # Errors
/// [`EquivariantError::ShapeMismatch`] if `edge_vec` is not `[E, 3]`,
/// [`EquivariantError::UnsupportedDType`] for a dtype other than f32/f64,
/// [`EquivariantError::InvalidDegree`] if `lmax > WIGNER_LMAX`,
/// [`EquivariantError::DegenerateEdge`] for a zero or non-finite edge vector.
pub fn zero_roll_wigner(edge_vec: &Tensor, lmax: usize) -> Result<Vec<Tensor>> {
    let e = check_edges(edge_vec)?;
    if lmax > WIGNER_LMAX {
        return Err(EquivariantError::InvalidDegree {
            name: "lmax",
            value: lmax,
            limit: WIGNER_LMAX,
        });
    }
    let (dtype, device) = (edge_vec.dtype(), edge_vec.device());
    // Which chart each edge uses (decided on detached values; a piecewise choice).
    let host: Vec<f64> = edge_vec
        .detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let mut first = Vec::with_capacity(e);
    let mut second = Vec::new();
    for (index, v) in host.chunks_exact(3).enumerate() {
        let n2 = v[0] * v[0] + v[1] * v[1] + v[2] * v[2];
        if !(n2.is_finite() && n2 > 0.0) {
            return Err(EquivariantError::DegenerateEdge {
                index,
                reason: format!(
                    "edge vector {v:?} has length {}; a frame needs a finite non-zero vector",
                    n2.sqrt()
                ),
            });
        }
        if v[1] * v[1] > SECOND_CHART_Y2 * n2 {
            second.push(index as u32);
        } else {
            first.push(index as u32);
        }
    }
    if second.is_empty() {
        return chart_blocks(edge_vec, lmax);
    }
    let q = matrix_x(std::f64::consts::FRAC_PI_2);
    let q_t: Vec<f64> = (0..3).flat_map(|i| (0..3).map(move |j| q[j][i])).collect();
    let q_t = Tensor::from_vec(q_t, (3, 3), device)?.to_dtype(dtype)?;
    let second_index = Tensor::from_vec(second.clone(), second.len(), device)?;
    let rotated = edge_vec.index_select(&second_index, 0)?.matmul(&q_t)?;
    let mut second_blocks = chart_blocks(&rotated, lmax)?;
    for (l, block) in second_blocks.iter_mut().enumerate() {
        let dq =
            Tensor::from_vec(wigner_d(l, &q)?, (2 * l + 1, 2 * l + 1), device)?.to_dtype(dtype)?;
        *block = block.broadcast_matmul(&dq)?;
    }
    if first.is_empty() {
        return Ok(second_blocks);
    }
    let first_index = Tensor::from_vec(first.clone(), first.len(), device)?;
    let first_blocks = chart_blocks(&edge_vec.index_select(&first_index, 0)?, lmax)?;
    // Back to edge order: position of each edge in [first ‖ second].
    let mut order = vec![0u32; e];
    for (k, &i) in first.iter().chain(second.iter()).enumerate() {
        order[i as usize] = k as u32;
    }
    let order = Tensor::from_vec(order, e, device)?;
    first_blocks
        .iter()
        .zip(&second_blocks)
        .map(|(a, b)| Ok(Tensor::cat(&[a, b], 0)?.index_select(&order, 0)?))
        .collect()
}

/// The blocks as one block-diagonal matrix per edge, `[E, (lmax+1)², (lmax+1)²]`, l-major
/// (differentiable, like the blocks).
///
/// # Errors
/// [`EquivariantError::InvalidArgument`] for an empty list; candle errors for blocks of
/// inconsistent shapes.
pub fn block_diagonal(blocks: &[Tensor]) -> Result<Tensor> {
    if blocks.is_empty() {
        return Err(EquivariantError::InvalidArgument {
            name: "blocks",
            reason: "needs at least the l = 0 block".into(),
        });
    }
    let k = blocks.len() * blocks.len();
    let rows = blocks
        .iter()
        .enumerate()
        .map(|(l, b)| Ok(b.pad_with_zeros(2, l * l, k - (l + 1) * (l + 1))?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 1)?)
}

fn check_edges(edge_vec: &Tensor) -> Result<usize> {
    let e = match edge_vec.dims() {
        [e, 3] => *e,
        found => {
            return Err(EquivariantError::ShapeMismatch {
                arg: "edge_vec",
                expected: "[num_edges, 3]".into(),
                found: found.to_vec(),
            })
        }
    };
    if !matches!(edge_vec.dtype(), DType::F32 | DType::F64) {
        return Err(EquivariantError::UnsupportedDType {
            arg: "edge_vec",
            found: edge_vec.dtype(),
        });
    }
    Ok(e)
}

/// `[cos kθ, sin kθ]` for `k = 0..=l` (each `[E]`) from `cos θ`, `sin θ` by complex powers.
fn multiples(c: &Tensor, s: &Tensor, l: usize) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let mut cos = vec![c.ones_like()?];
    let mut sin = vec![c.zeros_like()?];
    for k in 1..=l {
        let (pc, ps) = (&cos[k - 1], &sin[k - 1]);
        let nc = ((pc * c)? - (ps * s)?)?;
        let ns = ((pc * s)? + (ps * c)?)?;
        cos.push(nc);
        sin.push(ns);
    }
    Ok((cos, sin))
}

/// `(cos kᵢθ, sin kᵢθ)` for `i = 0..2l` (`kᵢ = l − i`), each `[E, 2l+1]`.
fn z_vectors(cos: &[Tensor], sin: &[Tensor], l: usize) -> Result<(Tensor, Tensor)> {
    let mut c = Vec::with_capacity(2 * l + 1);
    let mut s = Vec::with_capacity(2 * l + 1);
    for i in 0..=2 * l {
        if i <= l {
            c.push(cos[l - i].clone());
            s.push(sin[l - i].clone());
        } else {
            c.push(cos[i - l].clone());
            s.push(sin[i - l].neg()?);
        }
    }
    Ok((Tensor::stack(&c, 1)?, Tensor::stack(&s, 1)?))
}

/// `Z(θ) M` for `M` `[E, n, n]` (or a constant `[1, n, n]`) given `M` with its rows reversed:
/// rows scaled by `cos kᵢθ` plus reversed rows scaled by `sin kᵢθ`.
fn z_left(c: &Tensor, s: &Tensor, m: &Tensor, flipped: &Tensor) -> Result<Tensor> {
    Ok((m.broadcast_mul(&c.unsqueeze(2)?)? + flipped.broadcast_mul(&s.unsqueeze(2)?)?)?)
}

/// The zero-roll blocks of every edge of `edge_vec` (the caller keeps edges off the ±y axis).
fn chart_blocks(edge_vec: &Tensor, lmax: usize) -> Result<Vec<Tensor>> {
    let (dtype, device) = (edge_vec.dtype(), edge_vec.device());
    let e = edge_vec.dim(0)?;
    let x = edge_vec.narrow(1, 0, 1)?.squeeze(1)?;
    let y = edge_vec.narrow(1, 1, 1)?.squeeze(1)?;
    let z = edge_vec.narrow(1, 2, 1)?.squeeze(1)?;
    let rho = (x.sqr()? + z.sqr()?)?.sqrt()?;
    let norm = (rho.sqr()? + y.sqr()?)?.sqrt()?;
    let (cos_a, sin_a) = (z.div(&rho)?, x.div(&rho)?);
    let (cos_b, sin_b) = (y.div(&norm)?, rho.div(&norm)?);
    let (ca, sa) = multiples(&cos_a, &sin_a, lmax)?;
    let (cb, sb) = multiples(&cos_b, &sin_b, lmax)?;
    let mut out = Vec::with_capacity(lmax + 1);
    for l in 0..=lmax {
        let n = 2 * l + 1;
        if l == 0 {
            out.push(Tensor::ones((e, 1, 1), dtype, device)?);
            continue;
        }
        let j = constant(j_matrix(l)?, n, dtype, device)?;
        let reverse = Tensor::from_vec((0..n as u32).rev().collect::<Vec<_>>(), n, device)?;
        let (c_beta, s_beta) = z_vectors(&cb, &sb, l)?;
        let (c_alpha, s_alpha) = z_vectors(&ca, &sa, l)?;
        // M = Z(α) J Z(β) J, D = Mᵀ.
        let j_flipped = j.index_select(&reverse, 0)?.unsqueeze(0)?;
        let a = z_left(&c_beta, &s_beta, &j.unsqueeze(0)?, &j_flipped)?;
        let b = j.broadcast_matmul(&a)?;
        let b_flipped = b.index_select(&reverse, 1)?;
        let m = z_left(&c_alpha, &s_alpha, &b, &b_flipped)?;
        out.push(m.transpose(1, 2)?.contiguous()?);
    }
    Ok(out)
}

fn constant(values: &[f64], n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, (n, n), device)?.to_dtype(dtype)?)
}

/// `Σ_l (2l+1)²`-long rows of the blocks, for comparison with [`crate::wigner::WignerBlocks`].
#[cfg(test)]
fn flatten_rows(blocks: &[Tensor]) -> Result<Tensor> {
    let rows = blocks
        .iter()
        .map(|b| Ok(b.flatten_from(1)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{edge_wigner, Roll};
    use candle_core::Var;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_edges(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..3 * n).map(|_| rng.gen_range(-3.0..3.0)).collect()
    }

    fn host(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn first_chart_equals_the_zero_roll_frames() {
        let lmax = 6;
        // Random edges, kept off the second chart's cone.
        let v: Vec<f64> = random_edges(200, 1)
            .chunks(3)
            .filter(|r| r[1] * r[1] <= 0.45 * (r[0] * r[0] + r[1] * r[1] + r[2] * r[2]))
            .flatten()
            .copied()
            .collect();
        let n = v.len() / 3;
        assert!(n > 100);
        let r = Tensor::from_vec(v, (n, 3), &Device::Cpu).unwrap();
        let ours = flatten_rows(&zero_roll_wigner(&r, lmax).unwrap()).unwrap();
        let reference = edge_wigner(&r, lmax, &Roll::Zero).unwrap();
        let err = max_diff(&host(&ours), &host(reference.blocks()));
        assert!(err < 1e-12, "max difference {err:e}");
    }

    #[test]
    fn every_edge_gets_a_proper_frame_and_a_representation() {
        // Edges in both charts, exactly along ±y and ±x too (common in crystals).
        let mut v = random_edges(60, 2);
        v.extend([0.0, 2.5, 0.0, 0.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.1, 4.0, -0.2]);
        let n = v.len() / 3;
        let r = Tensor::from_vec(v.clone(), (n, 3), &Device::Cpu).unwrap();
        let blocks = zero_roll_wigner(&r, 4).unwrap();
        let d1 = host(&blocks[1]);
        for (k, e) in v.chunks(3).enumerate() {
            let norm = (e[0] * e[0] + e[1] * e[1] + e[2] * e[2]).sqrt();
            let m = &d1[9 * k..9 * k + 9];
            // R r̂ = +y.
            for (i, target) in [0.0, 1.0, 0.0].iter().enumerate() {
                let ri: f64 = (0..3).map(|j| m[3 * i + j] * e[j] / norm).sum();
                assert!((ri - target).abs() < 1e-12, "edge {k}: {ri} vs {target}");
            }
        }
        // Every block is orthogonal and D^l of the frame (compare with the quadrature
        // reference of the rotation D^1 holds).
        for (l, block) in blocks.iter().enumerate() {
            let nn = 2 * l + 1;
            let b = host(block);
            let d1_k = |k: usize| -> [[f64; 3]; 3] {
                let m = &d1[9 * k..9 * k + 9];
                [[m[0], m[1], m[2]], [m[3], m[4], m[5]], [m[6], m[7], m[8]]]
            };
            for k in 0..n {
                let expected = wigner_d(l, &d1_k(k)).unwrap();
                let err = max_diff(&b[nn * nn * k..nn * nn * (k + 1)], &expected);
                assert!(err < 1e-11, "l {l}, edge {k}: {err:e}");
            }
        }
    }

    /// `Σ w ⊙ D(r)` over every block: a scalar function of the edge vectors.
    fn weighted(r: &Tensor, lmax: usize, w: &Tensor) -> Tensor {
        let blocks = zero_roll_wigner(r, lmax).unwrap();
        let flat = flatten_rows(&blocks).unwrap();
        flat.mul(w).unwrap().sum_all().unwrap()
    }

    #[test]
    fn gradients_match_finite_differences_in_both_charts() {
        let lmax = 4;
        let mut v = random_edges(6, 3);
        v.extend([0.05, 2.0, -0.1, 1.0, 0.3, 0.0]); // one near +y (second chart), one near x
        let n = v.len() / 3;
        let len = crate::wigner::blocks_len(lmax);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let w: Vec<f64> = (0..n * len).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let w = Tensor::from_vec(w, (n, len), &Device::Cpu).unwrap();
        let r = Var::from_slice(&v, (n, 3), &Device::Cpu).unwrap();
        let grads = weighted(r.as_tensor(), lmax, &w).backward().unwrap();
        let g = host(grads.get(r.as_tensor()).unwrap());
        let h = 1e-6;
        for i in 0..v.len() {
            let at = |d: f64| {
                let mut p = v.clone();
                p[i] += d;
                let t = Tensor::from_vec(p, (n, 3), &Device::Cpu).unwrap();
                weighted(&t, lmax, &w).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                "component {i}: autograd {} vs finite differences {fd}",
                g[i]
            );
        }
    }
}
