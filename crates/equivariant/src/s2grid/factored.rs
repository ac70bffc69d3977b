//! The S2 grid matrices factored over the two angles, and the S2 activation kernels on them.
//!
//! Every column of the dense `[G, K]` grid matrices (one spherical harmonic `Y_l^m` sampled at
//! the `res_beta × res_alpha` points) is a product of a β factor (the associated Legendre part,
//! times the normalisation and, for the from-grid matrix, the quadrature weight of the ring)
//! and an α factor that depends on `m` only (`cos mα`, `sin |m|α` or 1). With `J = 2·mmax + 1`
//! distinct α factors, a grid transform of one row `[K, C]` becomes
//! 1. `t[β, j, :] = Σ_{c in group j} u[β, c] · x[c, :]` (`B·K·C` multiply-adds), then
//! 2. `grid[β, α, :] = Σ_j v[α, j] · t[β, j, :]` (`B·A·J·C`),
//!
//! instead of the dense `B·A·K·C`: at EquiformerV2's attention grid (lmax 4, mmax 2, 18 × 18
//! points, K = 19, J = 5) about 3× fewer operations. The S2 activation then runs ring by ring
//! (one β at a time): the ring's `A × C` grid values are built, passed through SiLU and
//! projected back while they are in the L1 cache.
//!
//! The factors are found numerically from the dense f64 matrices (a rank-one split of every
//! column over (β, α), columns grouped by their α profile), so they follow whatever convention
//! the dense matrices have; [`Factored::new`] refuses (and the kernels fall back to the dense
//! products) if some column is not separable to 1e-12.

use crate::activation::{dispatch_float, Float};

/// The grid matrices of one float type as β factors, α factors and the coefficient groups.
#[derive(Debug)]
pub(crate) struct Factored<T> {
    /// Number of β rings B.
    b: usize,
    /// Points per ring A.
    a: usize,
    /// Number of coefficients K.
    k: usize,
    /// Number of distinct α profiles J.
    j: usize,
    /// β factors of the to-grid matrix, `[B, K]` row-major.
    u_to: Vec<T>,
    /// β factors of the from-grid matrix (quadrature weights included), `[B, K]`.
    u_from: Vec<T>,
    /// α profiles, `[A, J]` row-major.
    v: Vec<T>,
    /// α profile of every coefficient.
    group: Vec<usize>,
    /// The coefficients of every α profile, ascending.
    members: Vec<Vec<usize>>,
}

/// Profiles closer than this (max abs difference, unit-norm vectors) are the same group.
const SAME_PROFILE: f64 = 1e-9;

/// Largest accepted reconstruction error, relative to the largest matrix entry.
const SEPARABLE_TOLERANCE: f64 = 1e-12;

impl Factored<f64> {
    /// Factors the dense row-major `[B·A, K]` matrices `to` and `from` (point `β·A + α`), or
    /// `None` if some column is not a product of a β and an α factor to 1e-12 relative.
    pub(super) fn new(to: &[f64], from: &[f64], b: usize, a: usize, k: usize) -> Option<Self> {
        if b == 0 || a == 0 || k == 0 || to.len() != b * a * k || from.len() != to.len() {
            return None;
        }
        let at = |m: &[f64], bi: usize, ai: usize, c: usize| m[(bi * a + ai) * k + c];
        let mut profiles: Vec<Vec<f64>> = Vec::new();
        let (mut group, mut u_to, mut u_from) = (vec![0; k], vec![0.0; b * k], vec![0.0; b * k]);
        for c in 0..k {
            // The α profile: the ring with the largest norm, normalised, sign fixed by its
            // first clearly non-zero entry.
            let norm = |bi: usize| (0..a).map(|ai| at(to, bi, ai, c).powi(2)).sum::<f64>();
            let best = (0..b).max_by(|&x, &y| norm(x).total_cmp(&norm(y)))?;
            let scale = norm(best).sqrt();
            let mut p: Vec<f64> = if scale > 0.0 {
                (0..a).map(|ai| at(to, best, ai, c) / scale).collect()
            } else {
                let mut e = vec![0.0; a];
                e[0] = 1.0;
                e
            };
            if p.iter().find(|v| v.abs() > 1e-6).is_some_and(|&v| v < 0.0) {
                p.iter_mut().for_each(|v| *v = -*v);
            }
            group[c] = match profiles
                .iter()
                .position(|q| q.iter().zip(&p).all(|(x, y)| (x - y).abs() < SAME_PROFILE))
            {
                Some(j) => j,
                None => {
                    profiles.push(p.clone());
                    profiles.len() - 1
                }
            };
            for bi in 0..b {
                u_to[bi * k + c] = (0..a).map(|ai| at(to, bi, ai, c) * p[ai]).sum();
                u_from[bi * k + c] = (0..a).map(|ai| at(from, bi, ai, c) * p[ai]).sum();
            }
        }
        let j = profiles.len();
        let mut v = vec![0.0; a * j];
        for (jj, p) in profiles.iter().enumerate() {
            for ai in 0..a {
                v[ai * j + jj] = p[ai];
            }
        }
        let mut members = vec![Vec::new(); j];
        for (c, &g) in group.iter().enumerate() {
            members[g].push(c);
        }
        let f = Self {
            b,
            a,
            k,
            j,
            u_to,
            u_from,
            v,
            group,
            members,
        };
        let max_abs = |m: &[f64]| m.iter().fold(0.0f64, |acc, x| acc.max(x.abs()));
        let tolerance = SEPARABLE_TOLERANCE * max_abs(to).max(max_abs(from)).max(1e-300);
        for bi in 0..b {
            for ai in 0..a {
                for c in 0..k {
                    let profile = f.v[ai * j + f.group[c]];
                    let dto = (f.u_to[bi * k + c] * profile - at(to, bi, ai, c)).abs();
                    let dfrom = (f.u_from[bi * k + c] * profile - at(from, bi, ai, c)).abs();
                    if dto > tolerance || dfrom > tolerance {
                        return None;
                    }
                }
            }
        }
        Some(f)
    }

    /// The same factors rounded to f32.
    pub(super) fn to_f32(&self) -> Factored<f32> {
        let round = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        Factored {
            b: self.b,
            a: self.a,
            k: self.k,
            j: self.j,
            u_to: round(&self.u_to),
            u_from: round(&self.u_from),
            v: round(&self.v),
            group: self.group.clone(),
            members: self.members.clone(),
        }
    }
}

/// The factors in the layout of the fused CUDA kernels (`kernels/s2fused.cu`): the
/// coefficients grouped by α profile, and the β factors' columns in that order.
#[cfg(any(test, feature = "cuda"))]
#[derive(Debug, Clone)]
pub(crate) struct Grouped<T> {
    /// Number of β rings B.
    pub(crate) b: usize,
    /// Points per ring A.
    pub(crate) a: usize,
    /// `[B, K]`: the to-grid β factor of coefficient `order[q]` at `β·K + q`.
    pub(crate) u_to: Vec<T>,
    /// `[B, K]`: the from-grid β factor of coefficient `order[q]` at `β·K + q`.
    pub(crate) u_from: Vec<T>,
    /// `[A, J]`: the α profiles (as [`Factored`]'s).
    pub(crate) v: Vec<T>,
    /// The coefficients, profile by profile, ascending within a profile.
    pub(crate) order: Vec<i32>,
    /// Profile `j` holds `order[offsets[j]..offsets[j + 1]]` (`J + 1` entries).
    pub(crate) offsets: Vec<i32>,
}

#[cfg(any(test, feature = "cuda"))]
impl<T: Copy> Factored<T> {
    /// Number of distinct α profiles J.
    pub(crate) fn groups(&self) -> usize {
        self.j
    }

    /// The factors in the fused CUDA kernels' layout ([`Grouped`]).
    pub(crate) fn grouped(&self) -> Grouped<T> {
        let order: Vec<usize> = self.members.iter().flatten().copied().collect();
        let mut offsets = Vec::with_capacity(self.j + 1);
        offsets.push(0);
        for m in &self.members {
            offsets.push(offsets.last().copied().unwrap_or(0) + m.len());
        }
        let permute = |u: &[T]| -> Vec<T> {
            (0..self.b)
                .flat_map(|bi| order.iter().map(move |&c| u[bi * self.k + c]))
                .collect()
        };
        let as_i32 = |v: usize| i32::try_from(v).expect("at most (SH_LMAX + 1)² coefficients");
        Grouped {
            b: self.b,
            a: self.a,
            u_to: permute(&self.u_to),
            u_from: permute(&self.u_from),
            v: self.v.clone(),
            order: order.iter().map(|&c| as_i32(c)).collect(),
            offsets: offsets.into_iter().map(as_i32).collect(),
        }
    }
}

/// Task-local buffers of the factored kernels for `C` channels.
pub(super) struct Scratch<T> {
    /// `[B, J, C]`: the β-projected input.
    t: Vec<T>,
    /// `[B, J, C]`: the β-projected output gradient (backward only).
    s: Vec<T>,
    /// `[B, J, C]`: the α-projected activations (or their gradients), before the β sum.
    t2: Vec<T>,
    /// `[A, C]`: one ring of grid values.
    ring: Vec<T>,
    /// `[A, C]`: one ring of grid gradients (backward only).
    ring_grad: Vec<T>,
}

impl<T: Float> Factored<T> {
    /// Multiply-adds per channel of one grid transform of one row: `B·K` (β) + `B·A·J` (α).
    pub(super) fn transform_macs(&self) -> usize {
        self.b * self.k + self.b * self.a * self.j
    }

    /// Zeroed buffers for rows of `c` channels.
    pub(super) fn scratch(&self, c: usize, backward: bool) -> Scratch<T> {
        let per_beta = self.b * self.j * c;
        let when = |len: usize| {
            if backward {
                vec![T::ZERO; len]
            } else {
                Vec::new()
            }
        };
        Scratch {
            t: vec![T::ZERO; per_beta],
            s: when(per_beta),
            t2: vec![T::ZERO; per_beta],
            ring: vec![T::ZERO; self.a * c],
            ring_grad: when(self.a * c),
        }
    }
}

/// Channels [`lincomb`] accumulates at once: four AVX-512 registers of f32 per accumulator.
const WIDE: usize = 64;

/// Channels of [`lincomb`]'s narrower tail blocks.
const NARROW: usize = 16;

/// `dst[:] = Σ_{i < n} w_i · src_i[:]` with `(w_i, src_i) = term(i)` (each `src_i` at least
/// `dst.len()` long). The sum over the terms runs for [`WIDE`] channels at a time in
/// registers, so `dst` is written once and never re-read (a plain axpy per term would wait on
/// the store of the previous one).
#[inline(always)]
fn lincomb<'a, T: Float + 'a>(dst: &mut [T], n: usize, term: impl Fn(usize) -> (T, &'a [T])) {
    let c = dst.len();
    let mut cb = 0;
    while cb + WIDE <= c {
        // Even and odd terms in separate accumulators: eight independent FMA chains.
        let (mut even, mut odd) = ([T::ZERO; WIDE], [T::ZERO; WIDE]);
        let mut i = 0;
        while i + 1 < n {
            let ((w0, s0), (w1, s1)) = (term(i), term(i + 1));
            let (s0, s1) = (&s0[cb..cb + WIDE], &s1[cb..cb + WIDE]);
            for l in 0..WIDE {
                even[l] = w0.mul_add(s0[l], even[l]);
                odd[l] = w1.mul_add(s1[l], odd[l]);
            }
            i += 2;
        }
        if i < n {
            let (w, src) = term(i);
            let src = &src[cb..cb + WIDE];
            for l in 0..WIDE {
                even[l] = w.mul_add(src[l], even[l]);
            }
        }
        for (l, d) in dst[cb..cb + WIDE].iter_mut().enumerate() {
            *d = even[l] + odd[l];
        }
        cb += WIDE;
    }
    while cb + NARROW <= c {
        let mut acc = [T::ZERO; NARROW];
        for i in 0..n {
            let (w, src) = term(i);
            let src = &src[cb..cb + NARROW];
            for l in 0..NARROW {
                acc[l] = w.mul_add(src[l], acc[l]);
            }
        }
        dst[cb..cb + NARROW].copy_from_slice(&acc);
        cb += NARROW;
    }
    for ch in cb..c {
        let mut acc = T::ZERO;
        for i in 0..n {
            let (w, src) = term(i);
            acc = w.mul_add(src[ch], acc);
        }
        dst[ch] = acc;
    }
}

/// `t[β, j, :] = Σ_{c ≥ skip, group c = j} u[β, c] · x[c, :]` (`t` is `[B, J, C]`).
#[inline(always)]
fn project_beta<T: Float>(f: &Factored<T>, u: &[T], x: &[T], c: usize, skip: usize, t: &mut [T]) {
    for bi in 0..f.b {
        let u_row = &u[bi * f.k..(bi + 1) * f.k];
        for (jj, members) in f.members.iter().enumerate() {
            let members = &members[members.partition_point(|&col| col < skip)..];
            let dst = &mut t[(bi * f.j + jj) * c..(bi * f.j + jj + 1) * c];
            lincomb(dst, members.len(), |i| {
                let col = members[i];
                (u_row[col], &x[col * c..(col + 1) * c])
            });
        }
    }
}

/// `y[c, :] = Σ_β u[β, c] · t[β, group c, :]` for the rows `c ≥ skip` of `y` (`[K, C]`); the
/// rows below `skip` are left as they are.
#[inline(always)]
fn unproject_beta<T: Float>(f: &Factored<T>, u: &[T], t: &[T], c: usize, skip: usize, y: &mut [T]) {
    for col in skip..f.k {
        let g = f.group[col];
        lincomb(&mut y[col * c..(col + 1) * c], f.b, |bi| {
            (u[bi * f.k + col], &t[(bi * f.j + g) * c..])
        });
    }
}

/// One ring of grid values: `ring[α, :] = Σ_j v[α, j] · t_beta[j, :]` (`t_beta` is `[J, C]`).
#[inline(always)]
fn expand_ring<T: Float>(f: &Factored<T>, t_beta: &[T], c: usize, ring: &mut [T]) {
    for ai in 0..f.a {
        let v_row = &f.v[ai * f.j..(ai + 1) * f.j];
        lincomb(&mut ring[ai * c..(ai + 1) * c], f.j, |jj| {
            (v_row[jj], &t_beta[jj * c..])
        });
    }
}

/// The adjoint of [`expand_ring`]: `t_beta[j, :] = Σ_α v[α, j] · ring[α, :]`.
#[inline(always)]
fn contract_ring<T: Float>(f: &Factored<T>, ring: &[T], c: usize, t_beta: &mut [T]) {
    for jj in 0..f.j {
        lincomb(&mut t_beta[jj * c..(jj + 1) * c], f.a, |ai| {
            (f.v[ai * f.j + jj], &ring[ai * c..])
        });
    }
}

/// S2 activation of one row: `out[c ≥ skip] = fromᵀ · SiLU(to · x)` (`x`, `out`: `[K, C]`).
#[inline(always)]
fn forward_row_body<T: Float>(
    f: &Factored<T>,
    x: &[T],
    c: usize,
    skip: usize,
    out: &mut [T],
    sc: &mut Scratch<T>,
) {
    project_beta(f, &f.u_to, x, c, 0, &mut sc.t);
    let per_beta = f.j * c;
    for bi in 0..f.b {
        expand_ring(
            f,
            &sc.t[bi * per_beta..(bi + 1) * per_beta],
            c,
            &mut sc.ring,
        );
        T::silu_in_place(&mut sc.ring);
        contract_ring(
            f,
            &sc.ring,
            c,
            &mut sc.t2[bi * per_beta..(bi + 1) * per_beta],
        );
    }
    unproject_beta(f, &f.u_from, &sc.t2, c, skip, out);
}

/// Backward of one row: `dx = toᵀ · (SiLU'(to · x) ⊙ (from_{≥skip} · dy_{≥skip}))`.
#[inline(always)]
fn backward_row_body<T: Float>(
    f: &Factored<T>,
    x: &[T],
    dy: &[T],
    c: usize,
    skip: usize,
    dx: &mut [T],
    sc: &mut Scratch<T>,
) {
    project_beta(f, &f.u_to, x, c, 0, &mut sc.t);
    project_beta(f, &f.u_from, dy, c, skip, &mut sc.s);
    let per_beta = f.j * c;
    for bi in 0..f.b {
        let beta = bi * per_beta..(bi + 1) * per_beta;
        expand_ring(f, &sc.t[beta.clone()], c, &mut sc.ring);
        expand_ring(f, &sc.s[beta.clone()], c, &mut sc.ring_grad);
        T::silu_backward_in_place(&mut sc.ring, &sc.ring_grad);
        contract_ring(f, &sc.ring, c, &mut sc.t2[beta]);
    }
    unproject_beta(f, &f.u_to, &sc.t2, c, 0, dx);
}

dispatch_float! {
    /// [`forward_row_body`] for consecutive rows: `x` and `out` hold whole `[K, C]` rows.
    pub(super) fn forward_rows(
        f: &Factored<T>,
        x: &[T],
        c: usize,
        skip: usize,
        out: &mut [T],
        sc: &mut Scratch<T>
    ) {
        let row = f.k * c;
        for (x_row, out_row) in x.chunks_exact(row).zip(out.chunks_exact_mut(row)) {
            forward_row_body(f, x_row, c, skip, out_row, sc);
        }
    }
}

dispatch_float! {
    /// [`backward_row_body`] for consecutive rows.
    pub(super) fn backward_rows(
        f: &Factored<T>,
        x: &[T],
        dy: &[T],
        c: usize,
        skip: usize,
        dx: &mut [T],
        sc: &mut Scratch<T>
    ) {
        let row = f.k * c;
        for ((x_row, dy_row), dx_row) in x
            .chunks_exact(row)
            .zip(dy.chunks_exact(row))
            .zip(dx.chunks_exact_mut(row))
        {
            backward_row_body(f, x_row, dy_row, c, skip, dx_row, sc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense pair of matrices whose columns are separable (random factors, 3 profiles) and
    /// one that is not.
    #[test]
    fn separable_matrices_are_factored_exactly_and_others_refused() {
        let (b, a, k) = (4, 5, 6);
        let profile = |j: usize, ai: usize| ((j + 1) as f64 * 0.7 * ai as f64 + 0.3).cos();
        let group = [0, 1, 2, 1, 0, 2];
        let ub = |bi: usize, c: usize| ((bi * 7 + c * 3) % 5) as f64 - 1.7;
        let mut to = vec![0.0; b * a * k];
        let mut from = vec![0.0; b * a * k];
        for bi in 0..b {
            for ai in 0..a {
                for c in 0..k {
                    to[(bi * a + ai) * k + c] = ub(bi, c) * profile(group[c], ai);
                    from[(bi * a + ai) * k + c] = 0.5 * (bi + 1) as f64 * to[(bi * a + ai) * k + c];
                }
            }
        }
        let f = Factored::new(&to, &from, b, a, k).expect("separable");
        assert_eq!(f.j, 3);
        assert_eq!(f.transform_macs(), b * k + b * a * 3);
        for bi in 0..b {
            for ai in 0..a {
                for c in 0..k {
                    let v = f.v[ai * f.j + f.group[c]];
                    assert!((f.u_to[bi * k + c] * v - to[(bi * a + ai) * k + c]).abs() < 1e-13);
                    assert!((f.u_from[bi * k + c] * v - from[(bi * a + ai) * k + c]).abs() < 1e-13);
                }
            }
        }
        to[(a + 2) * k + 1] += 1e-3; // column 1 no longer separable
        assert!(Factored::new(&to, &from, b, a, k).is_none());
    }
}
