//! Matrix products on strided sub-matrices of slices, for the CPU kernels of this crate and of
//! `matscale-models`.
//!
//! The fused kernels keep their operands in flat per-chunk buffers: a weight block inside the
//! packed parameters, the rows of one order `m` inside an edge's coefficients. [`gemm()`] multiplies
//! such sub-matrices in place, described by a [`View`] (slice, offset, row and column stride),
//! checks that every addressed element lies inside its slice, and calls the `gemm` crate on one
//! thread (the callers parallelise over chunks of edges or nodes).
//!
//! ```
//! use matscale_equivariant::linalg::{gemm, view};
//!
//! // [[1, 2], [3, 4]] · [[5, 6], [7, 8]]
//! let (a, b) = ([1.0f64, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]);
//! let mut c = [0.0; 4];
//! gemm((2, 2, 2), &mut c, 0, 2, false, view(&a, 0, 2, 1), view(&b, 0, 2, 1), 1.0);
//! assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
//! // Accumulate the product with the transposed left factor (strides swapped), times −1.
//! gemm((2, 2, 2), &mut c, 0, 2, true, view(&a, 0, 1, 2), view(&b, 0, 2, 1), -1.0);
//! assert_eq!(c, [19.0 - 26.0, 22.0 - 30.0, 43.0 - 38.0, 50.0 - 44.0]);
//! ```

use candle_core::{DType, WithDType};

/// A strided matrix inside a slice: element `(i, j)` is `data[off + i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T> {
    data: &'a [T],
    off: usize,
    rs: usize,
    cs: usize,
}

/// The matrix at offset `off` of `data` with row stride `rs` and column stride `cs` (a
/// transposed view swaps the two strides). Its extent is checked by [`gemm()`], which knows the
/// shape.
pub fn view<T>(data: &[T], off: usize, rs: usize, cs: usize) -> View<'_, T> {
    View { data, off, rs, cs }
}

/// Panics unless a `rows × cols` matrix at `off` with strides `(rs, cs)` lies inside `len`.
fn assert_span(len: usize, off: usize, (rows, cols): (usize, usize), (rs, cs): (usize, usize)) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = off + (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last < len,
        "linalg::gemm: a {rows}×{cols} matrix at {off} with strides ({rs}, {cs}) ends past the \
         slice ({len} elements)"
    );
}

/// `dst[dst_off..][m×n] = beta · lhs[m×k] · rhs[k×n]`, or `+=` when `accumulate`; `dst` has row
/// stride `dst_rs` and unit column stride. Single-threaded.
///
/// # Panics
/// `T` is not f32 or f64, a matrix reaches past its slice, or a stride does not fit in `isize`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_off: usize,
    dst_rs: usize,
    accumulate: bool,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    beta: T,
) {
    assert!(
        matches!(T::DTYPE, DType::F32 | DType::F64),
        "linalg::gemm: f32 or f64 only, got {:?}",
        T::DTYPE
    );
    if m == 0 || n == 0 {
        return;
    }
    assert_span(dst.len(), dst_off, (m, n), (dst_rs, 1));
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[dst_off + i * dst_rs..dst_off + i * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    assert_span(lhs.data.len(), lhs.off, (m, k), (lhs.rs, lhs.cs));
    assert_span(rhs.data.len(), rhs.off, (k, n), (rhs.rs, rhs.cs));
    let signed = |v: usize| isize::try_from(v).expect("linalg::gemm: strides fit in isize");
    // SAFETY: the three matrices lie inside their slices (checked just above); `dst` is a
    // unique borrow, so it aliases neither `lhs` nor `rhs`; T is f32 or f64 (checked at the
    // top), which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_off),
            1,
            signed(dst_rs),
            accumulate,
            lhs.data.as_ptr().add(lhs.off),
            signed(lhs.cs),
            signed(lhs.rs),
            rhs.data.as_ptr().add(rhs.off),
            signed(rhs.cs),
            signed(rhs.rs),
            T::one(),
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Columns per panel of a [`PackedRhs`]: four AVX-512 registers of f32.
const PANEL: usize = 64;

/// Rows of the left factor per register tile of [`gemm_packed`]: `6 × 4` accumulators plus
/// the four panel registers and a broadcast fit the 32 `zmm` registers, and the tile reads
/// six rows of the left factor at a time (twelve rows of a 32-column panel ran ≈ 1 % slower
/// in the SO(2) layer).
const TILE_ROWS: usize = 6;

const _: () = assert!(TILE_ROWS == 6, "packed_avx512's tail covers 1..=5 rows");

/// A right-hand factor `[k × n]` packed once for many products with [`gemm_packed`]: panels
/// of 64 columns, each `[k][64]` contiguous, so that the product streams each panel from L2
/// with no per-call packing. The fused SO(2) layer multiplies every 512-edge chunk by the
/// same weights: the `gemm` crate re-packs them (tens of MB at lmax 6) for every chunk,
/// which this does once per call.
///
/// Only f32 on CPUs with AVX-512, and only for `n` a multiple of 64: [`PackedRhs::pack`]
/// returns `None` otherwise, and the caller keeps [`gemm()`].
#[derive(Debug, Clone)]
pub struct PackedRhs {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    /// Packs `scale · rhs` (`k × n`), or `None` when [`gemm_packed`] cannot use it (`T` is not
    /// f32, `n` is not a multiple of 64, or the CPU lacks AVX-512).
    ///
    /// # Panics
    /// The matrix reaches past its slice.
    pub fn pack<T: WithDType>(rhs: View<'_, T>, (k, n): (usize, usize), scale: T) -> Option<Self> {
        if T::DTYPE != DType::F32 || n % PANEL != 0 || n == 0 || k == 0 || !avx512() {
            return None;
        }
        assert_span(rhs.data.len(), rhs.off, (k, n), (rhs.rs, rhs.cs));
        let scale = scale.to_f64() as f32;
        let mut data = vec![0.0f32; k * n];
        for (panel, out) in data.chunks_exact_mut(k * PANEL).enumerate() {
            for (p, row) in out.chunks_exact_mut(PANEL).enumerate() {
                let first = rhs.off + p * rhs.rs + panel * PANEL * rhs.cs;
                for (j, o) in row.iter_mut().enumerate() {
                    *o = rhs.data[first + j * rhs.cs].to_f64() as f32 * scale;
                }
            }
        }
        Some(Self { data, k, n })
    }

    /// `(k, n)`: the shape of the packed factor.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// Whether this CPU runs [`gemm_packed`]'s AVX-512 kernel.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[dst_off..][m×n] = lhs[m×k] · rhs`, or `+=` when `accumulate`, with `rhs` packed by
/// [`PackedRhs::pack`] (its scale already applied); `dst` has row stride `dst_rs` and unit
/// column stride, `lhs` must have unit column stride. Single-threaded.
///
/// Register tiles of 6 rows × 64 columns run over the whole depth `k` (no depth blocking:
/// the panel, `64·k` floats, stays in L2 for every row tile, and the 6 left rows stream
/// past); measured at 94–100 % of the core's FMA peak on the SO(2) layer's shapes, against
/// 88–94 % for the `gemm` crate (`bench gemm`, docs/BENCHMARKS.md).
///
/// # Panics
/// `T` is not f32, `rhs` is not `k × n`, `lhs` has a column stride other than 1, or a matrix
/// reaches past its slice.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_off: usize,
    dst_rs: usize,
    accumulate: bool,
    lhs: View<'_, T>,
    rhs: &PackedRhs,
) {
    assert!(
        T::DTYPE == DType::F32,
        "linalg::gemm_packed: f32 only, got {:?}",
        T::DTYPE
    );
    assert_eq!(rhs.shape(), (k, n), "linalg::gemm_packed: rhs shape");
    assert_eq!(lhs.cs, 1, "linalg::gemm_packed: lhs column stride");
    if m == 0 || n == 0 {
        return;
    }
    assert_span(dst.len(), dst_off, (m, n), (dst_rs, 1));
    assert_span(lhs.data.len(), lhs.off, (m, k), (lhs.rs, 1));
    // SAFETY: T is f32 (checked above), so both slices reinterpret as f32 slices of the same
    // length and alignment.
    let (dst, a) = unsafe {
        (
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
            std::slice::from_raw_parts(lhs.data.as_ptr().cast::<f32>(), lhs.data.len()),
        )
    };
    #[cfg(target_arch = "x86_64")]
    {
        // `PackedRhs::pack` only builds a packed factor where AVX-512 exists.
        assert!(avx512(), "linalg::gemm_packed: needs AVX-512");
        // SAFETY: the CPU has AVX-512F (checked just above); every matrix lies inside its
        // slice (checked above: `dst` and `lhs` by `assert_span`, `rhs` by its shape), and
        // `dst` is a unique borrow that aliases neither factor.
        unsafe {
            packed_avx512(
                (m, n, k),
                dst.as_mut_ptr().add(dst_off),
                dst_rs,
                accumulate,
                a.as_ptr().add(lhs.off),
                lhs.rs,
                &rhs.data,
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, a, accumulate);
        unreachable!("PackedRhs::pack returns None without AVX-512");
    }
}

/// The driver of [`gemm_packed`]: panel by panel, tiles of [`TILE_ROWS`] rows, the last tile
/// with the remaining rows.
///
/// # Safety
/// AVX-512F is available; `c` addresses `m` rows of stride `ldc` and `n` columns, `a` `m` rows
/// of stride `lda` and `k` columns, and `bp` holds `k × n` packed elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn packed_avx512(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: *const f32,
    lda: usize,
    bp: &[f32],
) {
    // SAFETY: every pointer formed below stays inside the extents the caller guarantees
    // (panel `panel` of `bp`, rows `i..` of `a` and `c`), and so do the tiles' accesses.
    unsafe {
        for panel in 0..n / PANEL {
            let b = bp.as_ptr().add(panel * k * PANEL);
            let c = c.add(panel * PANEL);
            let mut i = 0;
            while i + TILE_ROWS <= m {
                tile_avx512::<TILE_ROWS>(
                    k,
                    a.add(i * lda),
                    lda,
                    b,
                    c.add(i * ldc),
                    ldc,
                    accumulate,
                );
                i += TILE_ROWS;
            }
            let (a, c) = (a.add(i * lda), c.add(i * ldc));
            let t = (k, a, lda, b, c, ldc, accumulate);
            match m - i {
                0 => {}
                1 => tile_avx512::<1>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                2 => tile_avx512::<2>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                3 => tile_avx512::<3>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                4 => tile_avx512::<4>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                _ => tile_avx512::<5>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
            }
        }
    }
}

/// One `R × 64` register tile over the whole depth: `c[r][0..64] (+)= Σ_p a[r][p] · b[p][0..64]`.
///
/// # Safety
/// AVX-512F is available; `a` addresses `R` rows of stride `lda` and `k` columns, `b` `k × 64`
/// elements, `c` `R` rows of stride `ldc` and 64 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_avx512<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::{
        _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps,
    };
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    // SAFETY: the loads and stores stay inside the rows and panel the caller guarantees.
    unsafe {
        for p in 0..k {
            let bv = [
                _mm512_loadu_ps(b.add(p * PANEL)),
                _mm512_loadu_ps(b.add(p * PANEL + 16)),
                _mm512_loadu_ps(b.add(p * PANEL + 32)),
                _mm512_loadu_ps(b.add(p * PANEL + 48)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r * lda + p));
                for (a, &bv) in acc.iter_mut().zip(&bv) {
                    *a = _mm512_fmadd_ps(x, bv, *a);
                }
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = c.add(r * ldc);
            for (q, a) in acc.iter_mut().enumerate() {
                if accumulate {
                    *a = _mm512_add_ps(_mm512_loadu_ps(row.add(16 * q)), *a);
                }
                _mm512_storeu_ps(row.add(16 * q), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A product of strided sub-matrices equals the naive triple loop, written into and
    /// accumulated onto a strided destination.
    #[test]
    fn strided_products_match_the_naive_loop() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..40).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..60).map(|i| (i as f64 * 0.11).cos()).collect();
        // lhs: transposed view at offset 2 (element (i, p) at 2 + p·8 + i); rhs rows of 9.
        let (lhs, rhs) = (view(&a, 2, 1, 8), view(&b, 4, 9, 1));
        let mut dst = vec![1.0; 5 * 10];
        gemm((m, n, k), &mut dst, 1, 10, true, lhs, rhs, 2.0);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| a[2 + p * 8 + i] * b[4 + p * 9 + j]).sum();
                assert!((dst[1 + i * 10 + j] - (1.0 + 2.0 * dot)).abs() < 1e-14);
            }
        }
        // Untouched: the element before the block and the padding of each row.
        assert_eq!(dst[0], 1.0);
        assert_eq!(dst[1 + 7], 1.0);
    }

    #[test]
    #[should_panic(expected = "ends past the slice")]
    fn refuses_a_view_past_its_slice() {
        let a = [1.0f32; 6];
        let mut dst = [0.0f32; 4];
        gemm(
            (2, 2, 3),
            &mut dst,
            0,
            2,
            false,
            view(&a, 1, 3, 1),
            view(&a, 0, 2, 1),
            1.0,
        );
    }
    /// The packed product equals the naive loop for every row-tile remainder (m = 1..=25,
    /// so full 6-row tiles plus each tail), several panels, a strided destination and left
    /// factor, a scale, and both write modes.
    #[test]
    fn packed_products_match_the_naive_loop() {
        let (n, k) = (128, 37);
        let a: Vec<f32> = (0..30 * 50).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * 140).map(|i| (i as f32 * 0.11).cos()).collect();
        let Some(packed) = PackedRhs::pack(view(&b, 3, 140, 1), (k, n), -2.0f32) else {
            // No AVX-512 here: `pack` must say so instead of packing.
            assert!(!avx512());
            return;
        };
        for m in 1..=25 {
            for accumulate in [false, true] {
                let mut dst = vec![0.5f32; m * 150 + 1];
                gemm_packed(
                    (m, n, k),
                    &mut dst,
                    1,
                    150,
                    accumulate,
                    view(&a, 2, 50, 1),
                    &packed,
                );
                for i in 0..m {
                    for j in 0..150 {
                        let got = dst[1 + i * 150 + j];
                        if j >= n {
                            assert_eq!(got, 0.5, "padding written (m {m}, row {i}, col {j})");
                            continue;
                        }
                        let dot: f64 = (0..k)
                            .map(|p| a[2 + i * 50 + p] as f64 * b[3 + p * 140 + j] as f64)
                            .sum();
                        let want = -2.0 * dot + if accumulate { 0.5 } else { 0.0 };
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "m {m}, acc {accumulate}, ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
                assert_eq!(dst[0], 0.5, "element before the block written");
            }
        }
    }

    /// Only f32, whole panels and (on x86-64) AVX-512 get a packed factor.
    #[test]
    fn packing_declines_what_the_kernel_cannot_run() {
        let b = vec![1.0f64; 4 * 64];
        assert!(PackedRhs::pack(view(&b, 0, 64, 1), (4, 64), 1.0).is_none());
        let b = vec![1.0f32; 4 * 96];
        assert!(PackedRhs::pack(view(&b, 0, 96, 1), (4, 96), 1.0).is_none());
        assert_eq!(
            PackedRhs::pack(view(&b, 0, 64, 1), (4, 64), 1.0).is_some(),
            avx512()
        );
    }
}
