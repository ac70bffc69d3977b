//! Coefficient layouts of spherical-harmonic embeddings: l-major and the truncated m-major
//! order of the SO(2) convolutions.
//!
//! An embedding with degrees `0..=lmax` stores its `(lmax+1)^2` coefficients **l-major**:
//! coefficient `(l, m)` (with `-l <= m <= l`) sits at index `l^2 + (m + l)`.
//!
//! In the edge frame, EquiformerV2 keeps only the orders `|m| <= mmax` and reorders them
//! **m-major** (fairchem 1.x `CoefficientMappingModule` with `lmax_list = [lmax]`,
//! `mmax_list = [mmax]`, its `to_m` permutation and `m_size`):
//!
//! ```text
//! m = 0 : (l=0,0) (l=1,0) ... (l=lmax,0)                       m_size(0) = lmax + 1
//! m = 1 : (l=1,+1) ... (l=lmax,+1)   then (l=1,-1) ... (l=lmax,-1)  2 * m_size(1)
//! ...
//! m = mmax : (+mmax for l = mmax..=lmax) then (-mmax for l = mmax..=lmax)
//! ```
//!
//! with `m_size(m) = lmax - m + 1`. fairchem calls the `+m` coefficients the "real" part and
//! the `-m` coefficients the "imaginary" part of order `m` (`SO2_m_Convolution`).
//!
//! fairchem also has a *truncated l-major* order (its `coefficient_idx(lmax, mmax)`: the
//! l-major coefficients with `|m| <= mmax`, in l-major order) which its `rotate` produces and
//! `_m_primary` then permutes; matscale's [`rotate`](crate::so2::rotate) goes straight to the
//! m-major order, so that intermediate layout only appears in
//! [`SphericalLayout::truncated_l_major`] and [`SphericalLayout::to_m`], for cross-checks.
//!
//! ```
//! use matscale_equivariant::mapping::SphericalLayout;
//!
//! let layout = SphericalLayout::new(2, 1)?;
//! assert_eq!(layout.num_coefficients(), 9);
//! assert_eq!(layout.num_truncated(), 7);
//! // (l, m) of each m-major slot.
//! let lm: Vec<(usize, i32)> = layout.m_major_degrees_orders();
//! assert_eq!(lm, [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (1, -1), (2, -1)]);
//! // Where each m-major slot lives in the full l-major embedding, l^2 + m + l.
//! assert_eq!(layout.m_major_to_l_major(), [0, 2, 6, 3, 7, 1, 5]);
//! # Ok::<(), matscale_equivariant::error::EquivariantError>(())
//! ```

use crate::error::{EquivariantError, Result};

/// A validated single-resolution layout `(lmax, mmax)` with `mmax <= lmax <= MAX_LMAX`.
///
/// All index maps are computed on demand (they are tiny); the hot kernels walk the layout
/// with [`SphericalLayout::m_major_degrees_orders`]-like loops instead of index tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SphericalLayout {
    lmax: usize,
    mmax: usize,
}

impl SphericalLayout {
    /// Largest supported degree (the Wigner-D matrices of this crate go up to l = 11).
    pub const MAX_LMAX: usize = 11;

    /// Checks `lmax <= MAX_LMAX` and `mmax <= lmax`.
    ///
    /// # Errors
    /// [`EquivariantError::InvalidDegree`] naming `lmax` or `mmax`.
    pub fn new(lmax: usize, mmax: usize) -> Result<Self> {
        if lmax > Self::MAX_LMAX {
            return Err(EquivariantError::InvalidDegree {
                name: "lmax",
                value: lmax,
                limit: Self::MAX_LMAX,
            });
        }
        if mmax > lmax {
            return Err(EquivariantError::InvalidDegree {
                name: "mmax",
                value: mmax,
                limit: lmax,
            });
        }
        Ok(Self { lmax, mmax })
    }

    /// Largest degree l.
    pub fn lmax(&self) -> usize {
        self.lmax
    }

    /// Largest order |m| kept in the edge frame.
    pub fn mmax(&self) -> usize {
        self.mmax
    }

    /// Number of coefficients of the full l-major embedding, `(lmax+1)^2`.
    pub fn num_coefficients(&self) -> usize {
        (self.lmax + 1) * (self.lmax + 1)
    }

    /// Number of coefficients with `|m| <= mmax`, `sum_l (2 min(l, mmax) + 1)`.
    pub fn num_truncated(&self) -> usize {
        (0..=self.lmax).map(|l| 2 * l.min(self.mmax) + 1).sum()
    }

    /// Number of degrees carrying order `m` (fairchem's `m_size[m]`): `lmax - m + 1` for
    /// `m <= mmax`, 0 above.
    pub fn m_size(&self, m: usize) -> usize {
        if m <= self.mmax {
            self.lmax - m + 1
        } else {
            0
        }
    }

    /// Start of the `+m` block in the m-major layout (the `-m` block follows at
    /// `m_offset(m) + m_size(m)`). For `m > mmax` this is `num_truncated()`.
    pub fn m_offset(&self, m: usize) -> usize {
        if m == 0 {
            return 0;
        }
        self.m_size(0)
            + (1..m.min(self.mmax + 1))
                .map(|k| 2 * self.m_size(k))
                .sum::<usize>()
    }

    /// Position in the m-major layout of coefficient `(l, m)`, or `None` when `|m| > mmax`,
    /// `|m| > l` or `l > lmax`.
    pub fn m_major_index(&self, l: usize, m: i32) -> Option<usize> {
        let am = m.unsigned_abs() as usize;
        if l > self.lmax || am > l || am > self.mmax {
            return None;
        }
        let base = self.m_offset(am) + (l - am);
        Some(if m < 0 { base + self.m_size(am) } else { base })
    }

    /// `(l, m)` of every m-major slot, in m-major order.
    pub fn m_major_degrees_orders(&self) -> Vec<(usize, i32)> {
        let mut out = Vec::with_capacity(self.num_truncated());
        out.extend((0..=self.lmax).map(|l| (l, 0)));
        for m in 1..=self.mmax {
            let mi = i32::try_from(m).expect("m <= MAX_LMAX fits in i32");
            out.extend((m..=self.lmax).map(|l| (l, mi)));
            out.extend((m..=self.lmax).map(|l| (l, -mi)));
        }
        out
    }

    /// For each m-major slot, its index `l^2 + m + l` in the full l-major embedding.
    pub fn m_major_to_l_major(&self) -> Vec<usize> {
        self.m_major_degrees_orders()
            .into_iter()
            .map(|(l, m)| l_major_index(l, m))
            .collect()
    }

    /// fairchem's `coefficient_idx(lmax, mmax)`: the full l-major indices with `|m| <= mmax`,
    /// in increasing order (the truncated l-major layout).
    pub fn truncated_l_major(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.num_truncated());
        for l in 0..=self.lmax {
            let mm = l.min(self.mmax);
            out.extend((l * l + l - mm)..=(l * l + l + mm));
        }
        out
    }

    /// fairchem's `to_m` as an index map: `to_m()[i]` is the position in the truncated
    /// l-major layout of m-major slot `i` (the dense `to_m` matrix has a 1 at `[i, to_m()[i]]`).
    pub fn to_m(&self) -> Vec<usize> {
        let trunc = self.truncated_l_major();
        self.m_major_to_l_major()
            .into_iter()
            .map(|full| {
                trunc
                    .binary_search(&full)
                    .expect("every m-major slot is a truncated l-major coefficient")
            })
            .collect()
    }

    /// Rescale fairchem's `rotate_inv` applies to degree `l` when rotating back from the edge
    /// frame: `sqrt((2l+1) / (2 mmax + 1))` for `l > mmax`, 1 otherwise (so all ones when
    /// `mmax == lmax`).
    pub fn rotate_inv_rescale(&self, l: usize) -> f64 {
        if l > self.mmax {
            ((2 * l + 1) as f64 / (2 * self.mmax + 1) as f64).sqrt()
        } else {
            1.0
        }
    }

    /// Length of the block-diagonal Wigner-D storage, `sum_l (2l+1)^2`
    /// ([`crate::wigner::blocks_len`]).
    pub fn wigner_len(&self) -> usize {
        crate::wigner::blocks_len(self.lmax)
    }
}

/// Index `l^2 + m + l` of coefficient `(l, m)` in an l-major embedding (`|m| <= l`).
pub fn l_major_index(l: usize, m: i32) -> usize {
    let lm = (l * l + l) as i64 + i64::from(m);
    usize::try_from(lm).expect("|m| <= l keeps the l-major index non-negative")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_invalid_degrees_with_named_argument() {
        let err = SphericalLayout::new(12, 2).unwrap_err();
        assert!(err.to_string().contains("`lmax` = 12"), "{err}");
        let err = SphericalLayout::new(3, 4).unwrap_err();
        assert!(err.to_string().contains("`mmax` = 4"), "{err}");
        assert!(SphericalLayout::new(11, 11).is_ok());
        assert!(SphericalLayout::new(0, 0).is_ok());
    }

    #[test]
    fn counts_match_definitions() {
        for lmax in 0..=SphericalLayout::MAX_LMAX {
            for mmax in 0..=lmax {
                let layout = SphericalLayout::new(lmax, mmax).unwrap();
                let lm = layout.m_major_degrees_orders();
                assert_eq!(lm.len(), layout.num_truncated());
                let by_m: usize = (0..=mmax)
                    .map(|m| {
                        if m == 0 {
                            layout.m_size(0)
                        } else {
                            2 * layout.m_size(m)
                        }
                    })
                    .sum();
                assert_eq!(by_m, layout.num_truncated());
                assert_eq!(layout.m_offset(mmax + 1), layout.num_truncated());
                if mmax == lmax {
                    assert_eq!(layout.num_truncated(), layout.num_coefficients());
                }
                // Every slot maps back through m_major_index.
                for (i, &(l, m)) in lm.iter().enumerate() {
                    assert_eq!(layout.m_major_index(l, m), Some(i));
                }
                // The map into the full embedding is injective and ends in range.
                let mut full = layout.m_major_to_l_major();
                full.sort_unstable();
                full.dedup();
                assert_eq!(full.len(), layout.num_truncated());
                assert!(full.iter().all(|&i| i < layout.num_coefficients()));
                assert_eq!(full, layout.truncated_l_major());
            }
        }
    }

    /// The index maps against an independent transcription of fairchem's construction:
    /// enumerate the truncated l-major list, then for each m take the `+m` entries in list
    /// order followed by the `-m` entries.
    #[test]
    fn to_m_matches_fairchem_construction() {
        for (lmax, mmax) in [(4, 2), (6, 4), (3, 3), (6, 3), (2, 0)] {
            let layout = SphericalLayout::new(lmax, mmax).unwrap();
            let mut list = Vec::new(); // (l, m) in truncated l-major order
            for l in 0..=lmax as i32 {
                let mm = l.min(mmax as i32);
                for m in -mm..=mm {
                    list.push((l, m));
                }
            }
            let mut to_m = Vec::new();
            let mut m_size = Vec::new();
            for m in 0..=mmax as i32 {
                let plus: Vec<usize> = (0..list.len()).filter(|&i| list[i].1 == m).collect();
                m_size.push(plus.len());
                to_m.extend(&plus);
                if m > 0 {
                    to_m.extend((0..list.len()).filter(|&i| list[i].1 == -m));
                }
            }
            assert_eq!(layout.to_m(), to_m, "lmax {lmax} mmax {mmax}");
            for (m, &s) in m_size.iter().enumerate() {
                assert_eq!(layout.m_size(m), s);
            }
        }
    }

    #[test]
    fn rescale_only_above_mmax() {
        let layout = SphericalLayout::new(6, 4).unwrap();
        for l in 0..=4 {
            assert_eq!(layout.rotate_inv_rescale(l), 1.0);
        }
        assert!((layout.rotate_inv_rescale(6) - (13.0f64 / 9.0).sqrt()).abs() < 1e-15);
        let full = SphericalLayout::new(4, 4).unwrap();
        assert!((0..=4).all(|l| full.rotate_inv_rescale(l) == 1.0));
    }

    #[test]
    fn wigner_len_counts_blocks() {
        assert_eq!(SphericalLayout::new(0, 0).unwrap().wigner_len(), 1);
        assert_eq!(SphericalLayout::new(2, 1).unwrap().wigner_len(), 1 + 9 + 25);
        assert_eq!(SphericalLayout::new(4, 2).unwrap().wigner_len(), 165);
    }
}
