//! Matrix products on strided sub-matrices of slices, for the CPU kernels of this crate and of
//! `matscale-models`.
//!
//! The fused kernels keep their operands in flat per-chunk buffers: a weight block inside the
//! packed parameters, the rows of one order `m` inside an edge's coefficients. [`gemm()`] multiplies
//! such sub-matrices in place, described by a [`View`] (slice, offset, row and column stride),
//! checks that every addressed element lies inside its slice, and calls the `gemm` crate on one
//! thread (the callers parallelise over chunks of edges or nodes). For a right factor that
//! many products share (a layer's weights, multiplied by every chunk), [`PackedRhs`] packs it
//! once and [`gemm_packed`] multiplies against it with an AVX-512 f32 kernel, running one
//! level of Strassen's algorithm (seven half-size products instead of eight) on large
//! factors.
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
/// with no per-call packing. The fused SO(2) layer multiplies every 256-edge chunk by the
/// same weights: the `gemm` crate re-packs them (tens of MB at lmax 6) for every chunk,
/// which this does once per call.
///
/// A large factor (depth `k` ≥ [`STRASSEN_MIN_DEPTH`], even; `n` ≥ [`STRASSEN_MIN_COLS`], a
/// multiple of 128) is packed for one level of Strassen's algorithm instead: the seven sums
/// and differences of its `[k/2 × n/2]` blocks that Strassen's seven block products take,
/// each in panels. [`gemm_packed`] then runs 7 half-size products instead of 8, one eighth
/// fewer multiplications, for the price of five sums of the left factor's blocks per call
/// (see [`gemm_packed`]). [`PackedRhs::pack_plain`] packs without it.
///
/// Only f32 on CPUs with AVX-512, and only for `n` a multiple of 64: [`PackedRhs::pack`]
/// returns `None` otherwise, and the caller keeps [`gemm()`].
///
/// ```
/// use matscale_equivariant::linalg::{gemm, gemm_packed, view, PackedRhs};
///
/// let (m, k, n) = (10, 256, 256);
/// let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.1).sin()).collect();
/// let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.3).cos()).collect();
/// let mut want = vec![0.0f32; m * n];
/// gemm((m, n, k), &mut want, 0, n, false, view(&a, 0, k, 1), view(&b, 0, n, 1), 1.0);
/// // `None` on a CPU without AVX-512: keep `gemm` there.
/// if let Some(packed) = PackedRhs::pack(view(&b, 0, n, 1), (k, n), 1.0f32) {
///     assert!(packed.is_strassen()); // k and n are large enough
///     let mut got = vec![0.0f32; m * n];
///     for _chunk in 0..3 {
///         // Packed once, multiplied many times (here: the same rows again).
///         gemm_packed((m, n, k), &mut got, 0, n, false, view(&a, 0, k, 1), &packed);
///     }
///     for (g, w) in got.iter().zip(&want) {
///         assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()));
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct PackedRhs {
    form: Form,
    k: usize,
    n: usize,
}

/// How a [`PackedRhs`] holds its factor.
// Only the x86-64 kernels read the packed data (elsewhere `pack` returns `None`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone)]
enum Form {
    /// `[n/64][k][64]`.
    Plain(Vec<f32>),
    /// Strassen's seven right factors, each `[k/2 × n/2]` in panels, in the order of the
    /// products `M₁ … M₇` of [`strassen_avx512`]: `B₁₁ + B₂₂`, `B₁₁`, `B₁₂ − B₂₂`, `B₂₁ − B₁₁`,
    /// `B₂₂`, `B₁₁ + B₁₂`, `B₂₁ + B₂₂`.
    Strassen(Box<[Vec<f32>; 7]>),
}

/// The smallest depth `k` whose products [`PackedRhs::pack`] packs for Strassen's algorithm.
/// At 256 the SO(2) layer's products gained 3–7 % over 512 (`bench gemm`, docs/BENCHMARKS.md);
/// 128 lets the weight gradient's products (depth: a chunk of 250 edges) take it too, for
/// 1–2 % of the lmax-6 layer's forward+backward.
pub const STRASSEN_MIN_DEPTH: usize = 128;

/// The fewest columns `n` whose products [`PackedRhs::pack`] packs for Strassen's algorithm
/// (each half then holds at least two panels).
pub const STRASSEN_MIN_COLS: usize = 256;

/// A block `(row, column)` of a matrix split in 2 × 2.
type Block = (usize, usize);

/// `[k][n]` in panels of [`PANEL`] columns (`n` a multiple of it); `fill(p, j, out)` writes
/// row `p`, columns `j..j + 64`, into `out`.
fn pack_panels(k: usize, n: usize, fill: impl Fn(usize, usize, &mut [f32])) -> Vec<f32> {
    let mut data = vec![0.0f32; k * n];
    for (panel, out) in data.chunks_exact_mut(k * PANEL).enumerate() {
        for (p, row) in out.chunks_exact_mut(PANEL).enumerate() {
            fill(p, panel * PANEL, row);
        }
    }
    data
}

impl PackedRhs {
    /// Packs `scale · rhs` (`k × n`), or `None` when [`gemm_packed`] cannot use it (`T` is not
    /// f32, `n` is not a multiple of 64, or the CPU lacks AVX-512). A large factor is packed
    /// for Strassen's algorithm (see the type's docs).
    ///
    /// # Panics
    /// The matrix reaches past its slice.
    pub fn pack<T: WithDType>(rhs: View<'_, T>, (k, n): (usize, usize), scale: T) -> Option<Self> {
        Self::pack_as(rhs, (k, n), scale, Self::strassen_fits((k, n)))
    }

    /// Whether [`PackedRhs::pack`] packs a `k × n` factor for Strassen's algorithm (when it
    /// packs it at all): `k` even and ≥ [`STRASSEN_MIN_DEPTH`], `n` ≥ [`STRASSEN_MIN_COLS`]
    /// and a multiple of 128.
    pub fn strassen_fits((k, n): (usize, usize)) -> bool {
        k >= STRASSEN_MIN_DEPTH && k % 2 == 0 && n >= STRASSEN_MIN_COLS && n % (2 * PANEL) == 0
    }

    /// [`PackedRhs::pack`] without Strassen's algorithm, whatever the shape: every product
    /// against it is the plain one.
    ///
    /// # Panics
    /// The matrix reaches past its slice.
    pub fn pack_plain<T: WithDType>(
        rhs: View<'_, T>,
        (k, n): (usize, usize),
        scale: T,
    ) -> Option<Self> {
        Self::pack_as(rhs, (k, n), scale, false)
    }

    fn pack_as<T: WithDType>(
        rhs: View<'_, T>,
        (k, n): (usize, usize),
        scale: T,
        strassen: bool,
    ) -> Option<Self> {
        if T::DTYPE != DType::F32 || n % PANEL != 0 || n == 0 || k == 0 || !avx512() {
            return None;
        }
        assert_span(rhs.data.len(), rhs.off, (k, n), (rhs.rs, rhs.cs));
        let scale = scale.to_f64() as f32;
        // `out` = `scale · rhs[p][j..j + out.len()]`.
        let load = |p: usize, j: usize, out: &mut [f32]| {
            let (first, len) = (rhs.off + p * rhs.rs + j * rhs.cs, out.len());
            if rhs.cs == 1 {
                for (o, x) in out.iter_mut().zip(&rhs.data[first..first + len]) {
                    *o = x.to_f64() as f32 * scale;
                }
            } else {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = rhs.data[first + i * rhs.cs].to_f64() as f32 * scale;
                }
            }
        };
        let form = if strassen {
            // M₁ … M₇'s right factors: a block (row, column) of B, plus or minus another one.
            let combos: [(Block, Option<(f32, Block)>); 7] = [
                ((0, 0), Some((1.0, (1, 1)))),
                ((0, 0), None),
                ((0, 1), Some((-1.0, (1, 1)))),
                ((1, 0), Some((-1.0, (0, 0)))),
                ((1, 1), None),
                ((0, 0), Some((1.0, (0, 1)))),
                ((1, 0), Some((1.0, (1, 1)))),
            ];
            let (k2, n2) = (k / 2, n / 2);
            Form::Strassen(Box::new(combos.map(|((r, c), other)| {
                pack_panels(k2, n2, |p, j, out| {
                    load(r * k2 + p, c * n2 + j, out);
                    if let Some((sign, (r2, c2))) = other {
                        let mut y = [0.0f32; PANEL];
                        load(r2 * k2 + p, c2 * n2 + j, &mut y);
                        for (o, &y) in out.iter_mut().zip(&y) {
                            *o += sign * y;
                        }
                    }
                })
            })))
        } else {
            Form::Plain(pack_panels(k, n, load))
        };
        Some(Self { form, k, n })
    }

    /// `(k, n)`: the shape of the packed factor.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Whether products against this factor run one level of Strassen's algorithm.
    pub fn is_strassen(&self) -> bool {
        matches!(self.form, Form::Strassen(_))
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
/// column stride. `lhs` must have unit column stride, or unit row stride (a transposed
/// matrix, as in the weight gradient `xᵀ·g`). Single-threaded.
///
/// Register tiles of 6 rows × 64 columns run over the whole depth `k` (no depth blocking:
/// the panel, `64·k` floats, stays in L2 for every row tile, and the 6 left rows stream
/// past); measured at 94–100 % of the core's FMA peak on the SO(2) layer's shapes, against
/// 88–94 % for the `gemm` crate (`bench gemm`, docs/BENCHMARKS.md).
///
/// Against a factor packed for Strassen's algorithm ([`PackedRhs::is_strassen`]) the product
/// is one level of it: the left factor's rows split in halves (the upper one a row longer
/// when `m` is odd, the lower one read as if padded with a zero row) and its columns in
/// halves, five sums of its blocks formed in a per-thread buffer (`5 · ⌈m/2⌉ · k/2` floats,
/// kept for the thread's next call), then seven block products, each adding its register
/// tiles straight into the one or two blocks of `dst` it contributes to. The rounding
/// differs from the plain product's by a few units in the last place of the largest terms
/// (checked against f64 in the tests).
///
/// # Panics
/// `T` is not f32, `rhs` is not `k × n`, `lhs` has neither a unit column nor a unit row
/// stride, or a matrix reaches past its slice.
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
    // Row-major `lhs` (unit column stride), or a transposed one (unit row stride) against a
    // plain factor.
    let transposed = lhs.cs != 1;
    assert!(
        !transposed || lhs.rs == 1,
        "linalg::gemm_packed: lhs needs a unit column or row stride, got strides ({}, {})",
        lhs.rs,
        lhs.cs
    );
    if m == 0 || n == 0 {
        return;
    }
    assert_span(dst.len(), dst_off, (m, n), (dst_rs, 1));
    assert_span(lhs.data.len(), lhs.off, (m, k), (lhs.rs, lhs.cs));
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
        let c = Dest {
            // SAFETY: `dst_off` lies inside `dst` (checked by `assert_span` above).
            c: unsafe { dst.as_mut_ptr().add(dst_off) },
            ldc: dst_rs,
            rows: m,
            store: if accumulate { Store::Add } else { Store::Set },
        };
        // SAFETY: likewise for `lhs.off` inside `a`.
        let a = unsafe { a.as_ptr().add(lhs.off) };
        match &rhs.form {
            // SAFETY: the CPU has AVX-512F (checked just above); every matrix lies inside
            // its slice (checked above: `dst` and `lhs` by `assert_span`, `rhs` by its
            // shape), and `dst` is a unique borrow that aliases neither factor.
            Form::Plain(bp) if transposed => unsafe {
                packed_avx512::<true>((m, n, k), &[c], a, lhs.cs, bp);
            },
            // SAFETY: as just above.
            Form::Plain(bp) => unsafe { packed_avx512::<false>((m, n, k), &[c], a, lhs.rs, bp) },
            Form::Strassen(bs) => STRASSEN_LHS.with_borrow_mut(|sums| {
                let need = 5 * m.div_ceil(2) * (k / 2);
                if sums.len() < need {
                    sums.resize(need, 0.0);
                }
                // SAFETY: as for the plain product; `sums` holds the five block sums
                // (length checked just above) and is this thread's own.
                unsafe {
                    if transposed {
                        strassen_avx512::<true>((m, n, k), c, a, lhs.cs, bs, sums);
                    } else {
                        strassen_avx512::<false>((m, n, k), c, a, lhs.rs, bs, sums);
                    }
                }
            }),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, a, accumulate, transposed);
        unreachable!("PackedRhs::pack returns None without AVX-512");
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The five sums of the left factor's blocks for [`gemm_packed`]'s Strassen products,
    /// kept per thread between calls (a fresh allocation of megabytes per call would fault its
    /// pages in every time).
    static STRASSEN_LHS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a register tile is written to a destination block.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// `c = tile`.
    Set,
    /// `c += tile`.
    Add,
    /// `c −= tile`.
    Sub,
}

/// A destination of a product's register tiles: `rows` rows of stride `ldc` at `c` (a product
/// of more rows writes only the first `rows` of them here).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Dest {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    store: Store,
}

#[cfg(target_arch = "x86_64")]
impl Dest {
    /// The same destination `cols` columns and `rows_down` rows further on, holding `rows` rows.
    fn at(self, rows_down: usize, cols: usize, rows: usize) -> Self {
        Self {
            // A destination of no rows may point one block past the matrix; it is never
            // written, and `wrapping_add` forms its pointer without claiming it in bounds.
            c: self.c.wrapping_add(rows_down * self.ldc + cols),
            rows,
            ..self
        }
    }
}

/// One level of Strassen's algorithm (see [`gemm_packed`]): `c` (`m × n`, written with
/// `c.store`, Set or Add) gets `a · B` from `a` (`m × k`, row stride `lda`) and `B`'s seven
/// packed block combinations `bs` ([`Form::Strassen`]), with `sums` as scratch.
///
/// With `h = ⌈m/2⌉` upper and `l = m − h` lower rows, `k₂ = k/2`, `n₂ = n/2`:
/// `M₁ = (A₁₁ + A₂₂)(B₁₁ + B₂₂)`, `M₂ = (A₂₁ + A₂₂) B₁₁`, `M₃ = A₁₁ (B₁₂ − B₂₂)`,
/// `M₄ = A₂₂ (B₂₁ − B₁₁)`, `M₅ = (A₁₁ + A₁₂) B₂₂`, `M₆ = (A₂₁ − A₁₁)(B₁₁ + B₁₂)`,
/// `M₇ = (A₁₂ − A₂₂)(B₂₁ + B₂₂)`; `C₁₁ = M₁ + M₄ − M₅ + M₇`, `C₁₂ = M₃ + M₅`,
/// `C₂₁ = M₂ + M₄`, `C₂₂ = M₁ − M₂ + M₃ + M₆`. The lower blocks of `A` are read as if
/// padded with a zero row when `l < h`: products whose left factor is lower-only run `l` rows,
/// and the sums `A₁₁ + A₂₂`, `A₁₂ − A₂₂` copy the upper block's last row.
///
/// # Safety
/// AVX-512F is available; `c` addresses `m` rows of `n` columns, `a` `m` rows of `k` columns;
/// `k` is even and `n` a multiple of `2 · 64`; `bs` holds seven `k/2 × n/2` packed factors;
/// `sums` holds at least `5 · h · k/2` floats and aliases nothing else.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn strassen_avx512<const TRANS: bool>(
    (m, n, k): (usize, usize, usize),
    c: Dest,
    a: *const f32,
    lda: usize,
    bs: &[Vec<f32>; 7],
    sums: &mut [f32],
) {
    let (h, l, k2, n2) = (m.div_ceil(2), m / 2, k / 2, n / 2);
    // SAFETY: every pointer below addresses a block inside `a` (rows `0..m`, columns
    // `0..k`), inside `c` (rows `0..m`, columns `0..n`) or inside `sums`; the caller
    // guarantees those extents.
    unsafe {
        // Block (r, q) of A starts at element (r·h, q·k₂) (the lower blocks' pointers are
        // formed with `wrapping_add`: with m = 1 they have no rows).
        let blk = |r: usize, q: usize| {
            a.wrapping_add(if TRANS {
                r * h + q * k2 * lda
            } else {
                r * h * lda + q * k2
            })
        };
        let (a11, a12, a21, a22) = (blk(0, 0), blk(0, 1), blk(1, 0), blk(1, 1));
        let (s1, rest) = sums.split_at_mut(h * k2);
        let (s2, rest) = rest.split_at_mut(h * k2);
        let (s5, rest) = rest.split_at_mut(h * k2);
        let (s6, s7) = rest.split_at_mut(h * k2);
        let sum = |out: &mut [f32], x: &[f32], y: &[f32], sign: f32| {
            for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
                *o = x + sign * y;
            }
        };
        // The sums are stored like the left factor: row-major `[h][k₂]`, or transposed
        // `[k₂][h]` when `TRANS`; each line below is one row (or, transposed, one column) of
        // the blocks, `len` elements of the upper blocks and `low` of the lower ones.
        let (lines, len) = if TRANS { (k2, h) } else { (h, k2) };
        for t in 0..lines {
            // `wrapping_add`: a lower block with no rows may point past the matrix (never read).
            let line = |p: *const f32, len: usize| {
                std::slice::from_raw_parts(p.wrapping_add(t * lda), len)
            };
            // Elements of this line in the lower blocks: all (transposed: `l` of `h`), or in
            // row-major storage the row if it exists.
            let low = match (TRANS, t < l) {
                (true, _) => l,
                (false, true) => k2,
                (false, false) => 0,
            };
            let (x11, x12) = (line(a11, len), line(a12, len));
            let (x21, x22) = (line(a21, low), line(a22, low));
            let o = t * len..(t + 1) * len;
            sum(&mut s5[o.clone()], x11, x12, 1.0);
            sum(&mut s1[o.clone()], x11, x22, 1.0);
            sum(&mut s2[o.clone()], x21, x22, 1.0);
            sum(&mut s6[o.clone()], x21, x11, -1.0);
            sum(&mut s7[o.clone()], x12, x22, -1.0);
            // The upper-only tail (the zero-padded lower row): `A₁₁` and `A₁₂` alone.
            s1[o.start + low..o.end].copy_from_slice(&x11[low..]);
            s7[o.start + low..o.end].copy_from_slice(&x12[low..]);
        }
        // Each block's first write is `c.store` (Set, or Add onto `c`), the others add or
        // subtract.
        let c11 = c.at(0, 0, h);
        let c12 = c.at(0, n2, h);
        let c21 = c.at(h, 0, l);
        let c22 = c.at(h, n2, l);
        let with = |d: Dest, store: Store| Dest { store, ..d };
        let (add, sub) = (Store::Add, Store::Sub);
        // The sums' leading dimension.
        let ls = if TRANS { h } else { k2 };
        let products: [(*const f32, usize, usize, &[Dest]); 7] = [
            (s1.as_ptr(), ls, h, &[c11, c22]),
            (s2.as_ptr(), ls, l, &[c21, with(c22, sub)]),
            (a11, lda, h, &[c12, with(c22, add)]),
            (a22, lda, l, &[with(c11, add), with(c21, add)]),
            (s5.as_ptr(), ls, h, &[with(c11, sub), with(c12, add)]),
            (s6.as_ptr(), ls, l, &[with(c22, add)]),
            (s7.as_ptr(), ls, h, &[with(c11, add)]),
        ];
        for ((lhs, ld, rows, dests), b) in products.into_iter().zip(bs) {
            packed_avx512::<TRANS>((rows, n2, k2), dests, lhs, ld, b);
        }
    }
}

/// The driver of [`gemm_packed`]: panel by panel, tiles of [`TILE_ROWS`] rows, the last tile
/// with the remaining rows; each tile written to every destination in `dests` (one or two).
/// Element `(i, p)` of the left factor is `a[i·lda + p]`, or `a[i + p·lda]` when `TRANS`.
///
/// # Safety
/// AVX-512F is available; each destination addresses `min(m, rows)` rows of its stride and
/// `n` columns, `a` the `m × k` elements so addressed, and `bp` holds `k × n` packed
/// elements; no destination aliases `a` or `bp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn packed_avx512<const TRANS: bool>(
    (m, n, k): (usize, usize, usize),
    dests: &[Dest],
    a: *const f32,
    lda: usize,
    bp: &[f32],
) {
    // SAFETY: every pointer formed below stays inside the extents the caller guarantees
    // (panel `panel` of `bp`, rows `i..` of `a` and of the destinations), and so do the
    // tiles' accesses.
    unsafe {
        for panel in 0..n / PANEL {
            let b = bp.as_ptr().add(panel * k * PANEL);
            let mut i = 0;
            // The first element of row i.
            let row = |i: usize| a.add(if TRANS { i } else { i * lda });
            while i + TILE_ROWS <= m {
                tile_avx512::<TILE_ROWS, TRANS>(k, row(i), lda, b, dests, i, panel * PANEL);
                i += TILE_ROWS;
            }
            let t = (k, row(i), lda, b, dests, i, panel * PANEL);
            match m - i {
                0 => {}
                1 => tile_avx512::<1, TRANS>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                2 => tile_avx512::<2, TRANS>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                3 => tile_avx512::<3, TRANS>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                4 => tile_avx512::<4, TRANS>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
                _ => tile_avx512::<5, TRANS>(t.0, t.1, t.2, t.3, t.4, t.5, t.6),
            }
        }
    }
}

/// One `R × 64` register tile over the whole depth, `Σ_p a[r][p] · b[p][0..64]`, written to
/// rows `row0 + r` (those below each destination's `rows`), columns `col..col + 64` of every
/// destination.
///
/// Element `(r, p)` of the left factor is `a[r·lda + p]`, or `a[r + p·lda]` when `TRANS`.
///
/// # Safety
/// AVX-512F is available; `a` addresses the `R × k` elements so addressed, `b` `k × 64`
/// elements; every destination row written lies inside its matrix.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_avx512<const R: usize, const TRANS: bool>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    dests: &[Dest],
    row0: usize,
    col: usize,
) {
    use std::arch::x86_64::{
        _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps, _mm512_sub_ps,
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
                let x = _mm512_set1_ps(*a.add(if TRANS { r + p * lda } else { r * lda + p }));
                for (a, &bv) in acc.iter_mut().zip(&bv) {
                    *a = _mm512_fmadd_ps(x, bv, *a);
                }
            }
        }
        for d in dests {
            for (r, acc) in acc.iter().enumerate().take(d.rows.saturating_sub(row0)) {
                let row = d.c.add((row0 + r) * d.ldc + col);
                for (q, &a) in acc.iter().enumerate() {
                    let v = match d.store {
                        Store::Set => a,
                        Store::Add => _mm512_add_ps(_mm512_loadu_ps(row.add(16 * q)), a),
                        Store::Sub => _mm512_sub_ps(_mm512_loadu_ps(row.add(16 * q)), a),
                    };
                    _mm512_storeu_ps(row.add(16 * q), v);
                }
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
    /// `scale · a · b` through `packed` (`b` at offset 3 with row stride `b_rs`, `k × n`)
    /// equals the naive loop for every row count m = 1..=25 (so full 6-row tiles plus each
    /// tail, and odd and even halves for Strassen's form), with a strided left factor and
    /// destination, in both write modes, and leaves the destination's padding and the
    /// element before it alone.
    fn assert_matches_naive(packed: &PackedRhs, b: &[f32], b_rs: usize, scale: f64) {
        let (k, n) = packed.shape();
        let ld = n + 22;
        let a: Vec<f32> = (0..30 * 50).map(|i| (i as f32 * 0.37).sin()).collect();
        for m in 1..=25 {
            for accumulate in [false, true] {
                let mut dst = vec![0.5f32; m * ld + 1];
                gemm_packed(
                    (m, n, k),
                    &mut dst,
                    1,
                    ld,
                    accumulate,
                    view(&a, 2, 50, 1),
                    packed,
                );
                for i in 0..m {
                    for j in 0..ld {
                        let got = dst[1 + i * ld + j];
                        if j >= n {
                            assert_eq!(got, 0.5, "padding written (m {m}, row {i}, col {j})");
                            continue;
                        }
                        let dot: f64 = (0..k)
                            .map(|p| a[2 + i * 50 + p] as f64 * b[3 + p * b_rs + j] as f64)
                            .sum();
                        let want = scale * dot + if accumulate { 0.5 } else { 0.0 };
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

    /// The packed product equals the naive loop (see [`assert_matches_naive`]) across two
    /// panels, with a scale.
    #[test]
    fn packed_products_match_the_naive_loop() {
        let (n, k) = (128, 37);
        let b: Vec<f32> = (0..k * 140).map(|i| (i as f32 * 0.11).cos()).collect();
        let Some(packed) = PackedRhs::pack(view(&b, 3, 140, 1), (k, n), -2.0f32) else {
            // No AVX-512 here: `pack` must say so instead of packing.
            assert!(!avx512());
            return;
        };
        assert!(!packed.is_strassen());
        assert_matches_naive(&packed, &b, 140, -2.0);
    }

    /// A transposed left factor (unit row stride, as the weight gradient's `xᵀ`) equals the
    /// naive loop for every row-tile remainder, against a plain and a Strassen-packed factor
    /// (whose block sums are then formed column by column).
    #[test]
    fn packed_products_take_a_transposed_left_factor() {
        let (n, k) = (256, 30);
        let a: Vec<f32> = (0..40 * 60).map(|i| (i as f32 * 0.29).sin()).collect();
        let b: Vec<f32> = (0..k * 260).map(|i| (i as f32 * 0.13).cos()).collect();
        for strassen in [false, true] {
            let Some(packed) = PackedRhs::pack_as(view(&b, 1, 260, 1), (k, n), 0.5f32, strassen)
            else {
                assert!(!avx512());
                return;
            };
            assert_eq!(packed.is_strassen(), strassen);
            for m in 1..=25 {
                for accumulate in [false, true] {
                    let mut dst = vec![0.25f32; m * n];
                    // Element (i, p) of the left factor at 3 + i + p·60.
                    let lhs = view(&a, 3, 1, 60);
                    gemm_packed((m, n, k), &mut dst, 0, n, accumulate, lhs, &packed);
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|p| a[3 + i + p * 60] as f64 * b[1 + p * 260 + j] as f64)
                                .sum();
                            let want = 0.5 * dot + if accumulate { 0.25 } else { 0.0 };
                            let got = dst[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "strassen {strassen}, m {m}, acc {accumulate}, ({i}, {j})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One level of Strassen's algorithm equals the naive loop (see [`assert_matches_naive`]):
    /// odd row counts read a zero-padded lower half.
    #[test]
    fn strassen_products_match_the_naive_loop() {
        let (n, k) = (256, 38);
        let b: Vec<f32> = (0..k * 270).map(|i| (i as f32 * 0.11).cos()).collect();
        let Some(packed) = PackedRhs::pack_as(view(&b, 3, 270, 1), (k, n), -2.0f32, true) else {
            assert!(!avx512());
            return;
        };
        assert!(packed.is_strassen());
        assert_matches_naive(&packed, &b, 270, -2.0);
    }

    /// `pack` chooses Strassen's form exactly for large factors with even depth and whole
    /// double panels; `pack_plain` never does. A large product is as accurate as the plain
    /// one to within a small factor, against f64.
    #[test]
    fn strassen_applies_to_large_factors_only_and_keeps_the_accuracy() {
        let (m, k, n) = (37, STRASSEN_MIN_DEPTH, STRASSEN_MIN_COLS);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.731).sin()).collect();
        let b: Vec<f32> = (0..(k + 2) * (n + 128))
            .map(|i| (i as f32 * 0.193).cos())
            .collect();
        let Some(fast) = PackedRhs::pack(view(&b, 0, n, 1), (k, n), 1.0f32) else {
            assert!(!avx512());
            return;
        };
        assert!(fast.is_strassen());
        let plain = PackedRhs::pack_plain(view(&b, 0, n, 1), (k, n), 1.0f32).unwrap();
        assert!(!plain.is_strassen());
        let declined = [
            (k - 2, n),   // too shallow
            (k + 1, n),   // odd depth
            (k, n - 64),  // n/2 not whole panels
            (k, n - 128), // too narrow
        ];
        for (kk, nn) in declined {
            let p = PackedRhs::pack(view(&b, 0, nn, 1), (kk, nn), 1.0f32).unwrap();
            assert!(!p.is_strassen(), "k {kk}, n {nn}");
        }
        let run = |p: &PackedRhs| {
            let mut c = vec![0.0f32; m * n];
            gemm_packed((m, n, k), &mut c, 0, n, false, view(&a, 0, k, 1), p);
            c
        };
        let (cf, cp) = (run(&fast), run(&plain));
        let (mut err_fast, mut err_plain) = (0.0f64, 0.0f64);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                err_fast = err_fast.max((cf[i * n + j] as f64 - dot).abs());
                err_plain = err_plain.max((cp[i * n + j] as f64 - dot).abs());
            }
        }
        assert!(
            err_fast < 4.0 * err_plain.max(1e-6),
            "{err_fast} vs {err_plain}"
        );
        assert!(err_fast < 1e-3, "{err_fast}");
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
