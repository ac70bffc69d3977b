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
}
