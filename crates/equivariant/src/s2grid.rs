//! Spherical-harmonic coefficients ↔ signals on a sphere grid, and the (separable) S2
//! activation of EquiformerV2, as fused custom ops.
//!
//! # Grid and matrices (e3nn 0.6.0 `ToS2Grid` / `FromS2Grid`, fairchem 1.x `SO3_Grid`)
//!
//! The grid has `res_beta × res_alpha` points `x_ba = (sin β_b sin α_a, cos β_b, sin β_b cos α_a)`
//! (y is the pole) with `β_b = π (b + ½) / res_beta` and `α_a = 2π a / res_alpha`; point
//! `(b, a)` is row `g = b · res_alpha + a` of a grid signal. With `Y_i` the spherical harmonics
//! of [`crate::sh`] in `Integral` normalisation (`∫ Y_i² = 1`):
//!
//! * `to[g, i] = Y_i(x_g) · n_l` and `from[g, i] = Y_i(x_g) · n'_l · w_b`, where `w_b` are the
//!   SOFT quadrature weights (Kostelec–Rockmore, e3nn's `_quadrature_weights(res_beta/2)`
//!   times `res_beta² / res_alpha`, so that `Σ_g w_b(g) f(x_g) ≈ (1/4π) ∫ f`), and for
//!   [`Normalization::Component`] `n_l = √(4π) / √((2l+1)(lmax+1))`, `n'_l = √(4π (2l+1)(lmax+1))`;
//!   `Norm`: `n_l = √(4π/(lmax+1))`, `n'_l = √(4π (lmax+1))`; `Integral`: `n_l = 1`, `n'_l = 4π`.
//!   `Σ_g from[g, i] to[g, j] = δ_ij` whenever the quadrature is exact (`lmax < res_beta / 2`
//!   and `2 lmax < res_alpha`), so `from_grid(to_grid(x)) = x`.
//! * fairchem's `SO3_Grid(lmax, mmax)` keeps only the coefficients with `|m| ≤ mmax` (the
//!   l-major truncated layout, `K = Σ_l min(2l+1, 2 mmax+1)` rows) and, when `mmax < lmax`,
//!   multiplies the columns of degrees `l > mmax` of **both** matrices by `√((2l+1)/(2mmax+1))`
//!   (so a round trip then scales those degrees by `(2l+1)/(2mmax+1)`; this mirrors fairchem).
//!   EquiformerV2 uses `Component` normalisation and the grid `resolution × resolution`
//!   (18 × 18 in the study), or by default `2(lmax+1) × (2 mmax + 1)` (`+2` when
//!   `mmax = lmax`): [`S2Grid::equiformer_v2`].
//!
//! The matrices are built in f64 from the spherical harmonics at construction and kept in f64
//! and f32; they are small (`G × K`, e.g. 324 × 25).
//!
//! # Ops (layouts: coefficients `[N, K, C]`, grid signals `[N, G, C]`, row-major, channels last)
//!
//! * [`S2Grid::to_grid`] `y[n] = to · x[n]` and [`S2Grid::from_grid`] `x[n] = fromᵀ · y[n]`,
//!   linear ops whose backwards are the transposed products (per-row GEMMs, rayon over rows).
//! * [`S2Grid::s2_activation`]: fairchem `S2Activation`, `fromᵀ · SiLU(to · x[n])`, fused per
//!   row so the `G × C` grid block never leaves the cache, with a hand-written fused backward
//!   (recompute `to · x`, `dx = toᵀ · (SiLU'(to · x) ⊙ (from · dy))`).
//! * [`S2Grid::separable_s2_activation`]: fairchem `SeparableS2Activation`: row 0 of the
//!   output is `SiLU(scalars)` from a separate `[N, C]` input; rows `1..K` are those of the S2
//!   activation of `x` (row 0 of the grid product is never computed).
//!
//! The S2 activation is only approximately equivariant (SiLU is not band-limited): see
//! `docs/ARCHITECTURE.md` for the measured error at grid 18 and 36. The fused
//! backward is first order only (no gradients of gradients through the S2 activation);
//! `to_grid` / `from_grid` are differentiable to any order.
//!
//! # Example
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use matscale_equivariant::s2grid::S2Grid;
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let grid = S2Grid::equiformer_v2(4, 4, Some(18))?; // lmax 4, mmax 4, 18 × 18 points
//! assert_eq!((grid.num_coefficients(), grid.num_points()), (25, 324));
//! let x = Tensor::randn(0f64, 1.0, (3, 25, 8), &Device::Cpu)?;
//! // band-limited round trip is exact
//! let back = grid.from_grid(&grid.to_grid(&x)?)?;
//! let err = (back - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
//! assert!(err < 1e-12);
//! let y = grid.s2_activation(&x.to_dtype(DType::F32)?)?;
//! assert_eq!(y.dims(), &[3, 25, 8]);
//! # Ok(())
//! # }
//! ```

use std::any::Any;
use std::f64::consts::PI;
use std::sync::Arc;

pub(crate) mod factored;
use factored::Factored;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::{check_float, silu, Elementwise, Float, Function};
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};
use crate::linalg::{gemm, view};
pub use crate::sh::Normalization;
use crate::sh::{spherical_harmonics_f64, SH_LMAX};

/// A pair of grid matrices `[G, K]`, row-major, in one float type.
#[derive(Debug, Clone)]
struct Matrices<T> {
    to: Vec<T>,
    from: Vec<T>,
}

struct GridInner {
    lmax: usize,
    mmax: usize,
    res_beta: usize,
    res_alpha: usize,
    normalization: Normalization,
    /// Number of coefficients K.
    k: usize,
    /// Number of grid points G.
    g: usize,
    /// Degree of every kept coefficient.
    degrees: Vec<usize>,
    f64: Matrices<f64>,
    f32: Matrices<f32>,
    /// The matrices factored over β and α (the S2 activations' CPU kernels use them), unless
    /// some column is not separable.
    factored_f64: Option<Factored<f64>>,
    factored_f32: Option<Factored<f32>>,
}

impl GridInner {
    /// The grid with these matrices and their β/α factors.
    fn with_matrices(
        (lmax, mmax): (usize, usize),
        (res_beta, res_alpha): (usize, usize),
        normalization: Normalization,
        degrees: Vec<usize>,
        f64: Matrices<f64>,
        f32: Matrices<f32>,
    ) -> Self {
        let k = degrees.len();
        let factored_f64 = Factored::new(&f64.to, &f64.from, res_beta, res_alpha, k);
        let factored_f32 = factored_f64.as_ref().map(Factored::to_f32);
        Self {
            lmax,
            mmax,
            res_beta,
            res_alpha,
            normalization,
            k,
            g: res_beta * res_alpha,
            degrees,
            f64,
            f32,
            factored_f64,
            factored_f32,
        }
    }
}

/// Float types with grid matrices: the grid holds them in f32 and in f64, and every
/// [`Float`] is one of the two.
trait GridFloat: Float {
    fn matrices(inner: &GridInner) -> &Matrices<Self>;
    fn factored(inner: &GridInner) -> Option<&Factored<Self>>;
}

impl<T: Float> GridFloat for T {
    fn matrices(inner: &GridInner) -> &Matrices<T> {
        let held: &dyn Any = match T::DTYPE {
            DType::F32 => &inner.f32,
            _ => &inner.f64,
        };
        held.downcast_ref()
            .expect("a Float is f32 or f64, whose matrices the grid holds")
    }
    fn factored(inner: &GridInner) -> Option<&Factored<T>> {
        let held: &dyn Any = match T::DTYPE {
            DType::F32 => &inner.factored_f32,
            _ => &inner.factored_f64,
        };
        held.downcast_ref::<Option<Factored<T>>>()
            .expect("a Float is f32 or f64, whose matrices the grid holds")
            .as_ref()
    }
}

#[cfg(feature = "cuda")]
impl GridInner {
    /// The grid matrices as borrowed by the CUDA kernels.
    fn cuda(&self) -> crate::cuda::s2grid::Grid<'_> {
        let (g, k) = (self.g, self.k);
        let (to_f32, from_f32) = (&self.f32.to[..], &self.f32.from[..]);
        let (to_f64, from_f64) = (&self.f64.to[..], &self.f64.from[..]);
        crate::cuda::s2grid::Grid {
            g,
            k,
            to_f32,
            from_f32,
            to_f64,
            from_f64,
            factored_f32: self.factored_f32.as_ref(),
            factored_f64: self.factored_f64.as_ref(),
        }
    }
}

/// e3nn's `_quadrature_weights(b)`: the SOFT (Kostelec–Rockmore) weights of the `2b` β rings,
/// `w_j = (2/b) sin(π(2j+1)/(4b)) Σ_{k<b} sin((2j+1)(2k+1)π/(4b)) / (2k+1)` divided by
/// `2 (2b)²` (they sum to `1/(2b)²`; [`S2Grid`] multiplies them by `res_beta² / res_alpha`).
pub fn soft_quadrature_weights(b: usize) -> Vec<f64> {
    let bf = b as f64;
    (0..2 * b)
        .map(|j| {
            let jj = (2 * j + 1) as f64;
            let sum: f64 = (0..b)
                .map(|k| {
                    let kk = (2 * k + 1) as f64;
                    (jj * kk * PI / (4.0 * bf)).sin() / kk
                })
                .sum();
            (2.0 / bf) * (PI * jj / (4.0 * bf)).sin() * sum / (2.0 * (2.0 * bf).powi(2))
        })
        .collect()
}

/// Number of l-major coefficients with `l ≤ lmax`, `|m| ≤ mmax`.
pub fn num_truncated_coefficients(lmax: usize, mmax: usize) -> usize {
    (0..=lmax).map(|l| (2 * l + 1).min(2 * mmax + 1)).sum()
}

/// Conversion matrices between coefficients and a sphere grid; see the [module docs](self).
#[derive(Clone)]
pub struct S2Grid {
    inner: Arc<GridInner>,
}

impl std::fmt::Debug for S2Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("S2Grid")
            .field("lmax", &i.lmax)
            .field("mmax", &i.mmax)
            .field("res_beta", &i.res_beta)
            .field("res_alpha", &i.res_alpha)
            .field("normalization", &i.normalization)
            .finish()
    }
}

impl S2Grid {
    /// A grid for degrees `0..=lmax` and orders `|m| ≤ mmax ≤ lmax`, `res_beta × res_alpha`
    /// points, with e3nn normalisation `normalization`.
    ///
    /// # Errors
    /// `lmax > SH_LMAX`, `mmax > lmax`, `res_beta` odd or `< 2(lmax+1)` (e3nn's requirement for
    /// the β quadrature), `res_alpha = 0`.
    pub fn new(
        lmax: usize,
        mmax: usize,
        res_beta: usize,
        res_alpha: usize,
        normalization: Normalization,
    ) -> Result<Self> {
        if lmax > SH_LMAX {
            return Err(EquivariantError::InvalidDegree {
                name: "lmax",
                value: lmax,
                limit: SH_LMAX,
            });
        }
        if mmax > lmax {
            return Err(EquivariantError::InvalidDegree {
                name: "mmax",
                value: mmax,
                limit: lmax,
            });
        }
        if !res_beta.is_multiple_of(2) || res_beta < 2 * (lmax + 1) {
            return Err(EquivariantError::InvalidArgument {
                name: "res_beta",
                reason: format!(
                    "must be even and at least 2(lmax + 1) = {}, got {res_beta}",
                    2 * (lmax + 1)
                ),
            });
        }
        if res_alpha == 0 {
            return Err(EquivariantError::InvalidArgument {
                name: "res_alpha",
                reason: "must be positive".into(),
            });
        }
        let g = res_beta * res_alpha;
        let mut points = Vec::with_capacity(g);
        for b in 0..res_beta {
            let beta = PI * (b as f64 + 0.5) / res_beta as f64;
            for a in 0..res_alpha {
                let alpha = 2.0 * PI * a as f64 / res_alpha as f64;
                points.push([
                    beta.sin() * alpha.sin(),
                    beta.cos(),
                    beta.sin() * alpha.cos(),
                ]);
            }
        }
        let full = (lmax + 1) * (lmax + 1);
        let y = spherical_harmonics_f64(lmax, &points, true, Normalization::Integral)?;
        let qw: Vec<f64> = soft_quadrature_weights(res_beta / 2)
            .into_iter()
            .map(|w| w * (res_beta * res_beta) as f64 / res_alpha as f64)
            .collect();
        let lm1 = (lmax + 1) as f64;
        let (mut columns, mut degrees) = (Vec::new(), Vec::new());
        for l in 0..=lmax {
            for m in -(l as i64)..=(l as i64) {
                if m.unsigned_abs() as usize <= mmax {
                    columns.push(l * l + (m + l as i64) as usize);
                    degrees.push(l);
                }
            }
        }
        let k = columns.len();
        let (mut to, mut from) = (vec![0.0; g * k], vec![0.0; g * k]);
        for (c, (&col, &l)) in columns.iter().zip(&degrees).enumerate() {
            let two_l1 = (2 * l + 1) as f64;
            let (n_to, n_from) = match normalization {
                Normalization::Component => (
                    (4.0 * PI).sqrt() / (two_l1 * lm1).sqrt(),
                    (4.0 * PI * two_l1 * lm1).sqrt(),
                ),
                Normalization::Norm => ((4.0 * PI / lm1).sqrt(), (4.0 * PI * lm1).sqrt()),
                Normalization::Integral => (1.0, 4.0 * PI),
            };
            let rescale = if l > mmax {
                (two_l1 / (2 * mmax + 1) as f64).sqrt()
            } else {
                1.0
            };
            for p in 0..g {
                let v = y[p * full + col];
                to[p * k + c] = v * n_to * rescale;
                from[p * k + c] = v * n_from * qw[p / res_alpha] * rescale;
            }
        }
        let f32 = Matrices {
            to: to.iter().map(|&v| v as f32).collect(),
            from: from.iter().map(|&v| v as f32).collect(),
        };
        Ok(Self {
            inner: Arc::new(GridInner::with_matrices(
                (lmax, mmax),
                (res_beta, res_alpha),
                normalization,
                degrees,
                Matrices { to, from },
                f32,
            )),
        })
    }

    /// The same grid with its coefficients re-ordered: coefficient `i` of the new grid is
    /// coefficient `order[i]` of this one (the matrices' columns and [`Self::degrees`]
    /// permuted). EquiformerV2 uses it to run the S2 activation directly on the m-major layout
    /// of its edge messages (`order` = [`SphericalLayout::to_m`](crate::mapping::SphericalLayout::to_m)),
    /// with no re-indexing of the messages before and after.
    ///
    /// # Errors
    /// `order` is not a permutation of `0..K`, or moves coefficient 0 (the `l = 0` row that
    /// [`Self::separable_s2_activation`] replaces must stay first).
    pub fn permuted(&self, order: &[usize]) -> Result<Self> {
        let k = self.inner.k;
        let mut seen = vec![false; k];
        let valid = order.len() == k
            && order.first() == Some(&0)
            && order
                .iter()
                .all(|&c| c < k && !std::mem::replace(&mut seen[c], true));
        if !valid {
            return Err(EquivariantError::InvalidArgument {
                name: "order",
                reason: format!(
                    "must be a permutation of 0..{k} that keeps coefficient 0 first, got {order:?}"
                ),
            });
        }
        fn permute<T: Copy>(m: &Matrices<T>, k: usize, order: &[usize]) -> Matrices<T> {
            let columns = |m: &[T]| -> Vec<T> {
                m.chunks(k)
                    .flat_map(|row| order.iter().map(move |&c| row[c]))
                    .collect()
            };
            Matrices {
                to: columns(&m.to),
                from: columns(&m.from),
            }
        }
        let inner = &self.inner;
        Ok(Self {
            inner: Arc::new(GridInner::with_matrices(
                (inner.lmax, inner.mmax),
                (inner.res_beta, inner.res_alpha),
                inner.normalization,
                order.iter().map(|&c| inner.degrees[c]).collect(),
                permute(&inner.f64, k, order),
                permute(&inner.f32, k, order),
            )),
        })
    }

    /// The grid fairchem's EquiformerV2 builds as `SO3_Grid(lmax, mmax, normalization =
    /// "component", resolution)`: `resolution × resolution` points if given, else
    /// `2(lmax+1) × (2 mmax + 1)`, or `2(lmax+1) × (2 mmax + 3)` when `mmax = lmax`.
    pub fn equiformer_v2(lmax: usize, mmax: usize, resolution: Option<usize>) -> Result<Self> {
        let (rb, ra) = match resolution {
            Some(r) => (r, r),
            None if lmax == mmax => (2 * (lmax + 1), 2 * (mmax + 1) + 1),
            None => (2 * (lmax + 1), 2 * mmax + 1),
        };
        Self::new(lmax, mmax, rb, ra, Normalization::Component)
    }

    /// Largest degree.
    pub fn lmax(&self) -> usize {
        self.inner.lmax
    }
    /// Largest order kept.
    pub fn mmax(&self) -> usize {
        self.inner.mmax
    }
    /// Number of β (polar) rings.
    pub fn res_beta(&self) -> usize {
        self.inner.res_beta
    }
    /// Number of α (azimuth) points per ring.
    pub fn res_alpha(&self) -> usize {
        self.inner.res_alpha
    }
    /// Number of grid points `G = res_beta · res_alpha`.
    pub fn num_points(&self) -> usize {
        self.inner.g
    }
    /// Number of coefficients `K` (l-major, `|m| ≤ mmax`).
    pub fn num_coefficients(&self) -> usize {
        self.inner.k
    }
    /// Multiply-adds per channel of one grid transform of one row (`to` or `from`, `K → G` or
    /// `G → K`) as the CPU kernels of the S2 activations run it: `B·K + B·A·J` with the
    /// matrices factored over β and α (`J = 2·mmax + 1` α profiles, see the `factored`
    /// module), else the dense `G·K` (also what the CUDA kernels run). A model for benchmark
    /// reports (`cargo xtask bench kernels`), not a measurement.
    ///
    /// ```
    /// use matscale_equivariant::s2grid::S2Grid;
    /// let grid = S2Grid::equiformer_v2(4, 2, Some(18))?;
    /// assert!(grid.cpu_transform_macs() < grid.num_points() * grid.num_coefficients());
    /// # Ok::<(), matscale_equivariant::error::EquivariantError>(())
    /// ```
    pub fn cpu_transform_macs(&self) -> usize {
        self.inner
            .factored_f64
            .as_ref()
            .map_or(self.inner.g * self.inner.k, Factored::transform_macs)
    }

    /// Degree `l` of every coefficient row.
    pub fn degrees(&self) -> &[usize] {
        &self.inner.degrees
    }
    /// The normalisation.
    pub fn normalization(&self) -> Normalization {
        self.inner.normalization
    }

    /// The `to` matrix `[G, K]` (fairchem's `to_grid_mat` `[res_beta, res_alpha, K]` flattened).
    pub fn to_grid_matrix(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let i = &self.inner;
        Ok(Tensor::from_slice(&i.f64.to, (i.g, i.k), device)?.to_dtype(dtype)?)
    }

    /// The `from` matrix `[G, K]` (fairchem's `from_grid_mat` flattened; quadrature included).
    pub fn from_grid_matrix(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let i = &self.inner;
        Ok(Tensor::from_slice(&i.f64.from, (i.g, i.k), device)?.to_dtype(dtype)?)
    }

    fn check(
        &self,
        x: &Tensor,
        arg: &'static str,
        rows: usize,
        what: &str,
    ) -> Result<(usize, usize)> {
        check_float(x, arg)?;
        match x.dims() {
            &[n, r, c] if r == rows => Ok((n, c)),
            dims => Err(EquivariantError::ShapeMismatch {
                arg,
                expected: format!("[N, {rows} ({what}), C]"),
                found: dims.to_vec(),
            }),
        }
    }

    fn linear(&self, x: &Tensor, kind: LinearKind) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(GridLinear {
            grid: self.inner.clone(),
            kind,
        })?)
    }

    /// Coefficients `[N, K, C]` → grid signal `[N, G, C]`.
    pub fn to_grid(&self, x: &Tensor) -> Result<Tensor> {
        self.check(x, "x", self.inner.k, "coefficients")?;
        self.linear(x, LinearKind::To)
    }

    /// Grid signal `[N, G, C]` → coefficients `[N, K, C]` (quadrature projection).
    pub fn from_grid(&self, grid: &Tensor) -> Result<Tensor> {
        self.check(grid, "grid", self.inner.g, "grid points")?;
        self.linear(grid, LinearKind::From)
    }

    /// `from_grid(SiLU(to_grid(x)))` from the grid products and the SiLU op, each with a
    /// backward of its own: differentiable to any order, used when higher-order gradients are
    /// requested (the fused ops' backward is first order).
    fn s2_activation_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.from_grid(&silu(&self.to_grid(x)?)?)
    }

    /// fairchem `S2Activation`: `from_grid(SiLU(to_grid(x)))`, `[N, K, C]` → `[N, K, C]`, fused
    /// (composed from differentiable ops when higher-order gradients are requested).
    pub fn s2_activation(&self, x: &Tensor) -> Result<Tensor> {
        self.check(x, "x", self.inner.k, "coefficients")?;
        if crate::higher_order_gradients_requested() {
            return self.s2_activation_composed(x);
        }
        Ok(x.contiguous()?.apply_op1(S2Act {
            grid: self.inner.clone(),
        })?)
    }

    /// fairchem `SeparableS2Activation`: row 0 = `SiLU(scalars)` (`[N, C]`), rows `1..K` = those of
    /// [`Self::s2_activation`]`(x)`; `[N, K, C]` out.
    pub fn separable_s2_activation(&self, scalars: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (n, c) = self.check(x, "x", self.inner.k, "coefficients")?;
        check_float(scalars, "scalars")?;
        if scalars.dims() != [n, c] || scalars.dtype() != x.dtype() {
            return Err(EquivariantError::ShapeMismatch {
                arg: "scalars",
                expected: format!("[{n}, {c}] with the dtype of `x`"),
                found: scalars.dims().to_vec(),
            });
        }
        if crate::higher_order_gradients_requested() {
            let rows = self.s2_activation_composed(x)?;
            let k = self.inner.k;
            return Ok(Tensor::cat(
                &[&silu(scalars)?.unsqueeze(1)?, &rows.narrow(1, 1, k - 1)?],
                1,
            )?);
        }
        Ok(x.contiguous()?.apply_op2(
            &scalars.contiguous()?,
            SeparableS2Act {
                grid: self.inner.clone(),
            },
        )?)
    }
}

/// Which of the four grid products `[N, rows_in, C] → [N, rows_out, C]` a [`GridLinear`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinearKind {
    /// `to · x` (K → G).
    To,
    /// `toᵀ · y` (G → K), backward of `To`.
    ToAdjoint,
    /// `fromᵀ · y` (G → K).
    From,
    /// `from · x` (K → G), backward of `From`.
    FromAdjoint,
}

impl LinearKind {
    fn adjoint(self) -> Self {
        match self {
            Self::To => Self::ToAdjoint,
            Self::ToAdjoint => Self::To,
            Self::From => Self::FromAdjoint,
            Self::FromAdjoint => Self::From,
        }
    }
    /// Whether the product maps coefficients to grid points.
    fn to_points(self) -> bool {
        matches!(self, Self::To | Self::FromAdjoint)
    }
}

/// A per-row product with one of the grid matrices (custom op behind `to_grid` / `from_grid`).
#[derive(Clone)]
struct GridLinear {
    grid: Arc<GridInner>,
    kind: LinearKind,
}

/// Rows per rayon task for per-row grid kernels.
fn rows_per_task(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (n / (8 * threads)).clamp(1, 16)
}

fn grid_linear_kernel<T: GridFloat>(
    grid: &GridInner,
    kind: LinearKind,
    x: &[T],
    n: usize,
    c: usize,
) -> Vec<T> {
    let (g, k) = (grid.g, grid.k);
    let mats = T::matrices(grid);
    let matrix = match kind {
        LinearKind::To | LinearKind::ToAdjoint => &mats.to,
        LinearKind::From | LinearKind::FromAdjoint => &mats.from,
    };
    // [G, K] row-major: as a G×K lhs strides (K, 1); transposed K×G lhs strides (1, K)
    let (rows_in, rows_out, strides) = match kind {
        LinearKind::To | LinearKind::FromAdjoint => (k, g, (k, 1)),
        LinearKind::ToAdjoint | LinearKind::From => (g, k, (1, k)),
    };
    let mut out = crate::buffer::zeroed_vec::<T>(n * rows_out * c);
    if c == 0 {
        return out;
    }
    let block = rows_per_task(n);
    out.par_chunks_mut(block * rows_out * c)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (r, out_row) in chunk.chunks_mut(rows_out * c).enumerate() {
                let row = task * block + r;
                let x_row = &x[row * rows_in * c..(row + 1) * rows_in * c];
                gemm(
                    (rows_out, c, rows_in),
                    out_row,
                    0,
                    c,
                    false,
                    view(matrix, 0, strides.0, strides.1),
                    view(x_row, 0, c, 1),
                    T::ONE,
                );
            }
        });
    out
}

/// Input `[N, rows, C]`.
impl FloatKernel<1> for GridLinear {
    fn run<T: Float>(&self, [(v, l)]: [(&[T], &Layout); 1]) -> candle_core::Result<Vec<T>> {
        let (n, _, c) = l.shape().dims3()?;
        Ok(grid_linear_kernel(&self.grid, self.kind, v, n, c))
    }
}

impl CustomOp1 for GridLinear {
    fn name(&self) -> &'static str {
        match self.kind {
            LinearKind::To => "s2-to-grid",
            LinearKind::ToAdjoint => "s2-to-grid-adjoint",
            LinearKind::From => "s2-from-grid",
            LinearKind::FromAdjoint => "s2-from-grid-adjoint",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, _, c) = layout.shape().dims3()?;
        let rows_out = if self.kind.to_points() {
            self.grid.g
        } else {
            self.grid.k
        };
        let out = run_float(self.name(), [(storage, layout)], self)?;
        Ok((out, Shape::from((n, rows_out, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::s2grid::GridMap;
        let map = match self.kind {
            LinearKind::To => GridMap::To,
            LinearKind::ToAdjoint => GridMap::ToAdjoint,
            LinearKind::From => GridMap::From,
            LinearKind::FromAdjoint => GridMap::FromAdjoint,
        };
        crate::cuda::s2grid::grid_linear(storage, layout, &self.grid.cuda(), map, self.name())
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let adjoint = GridLinear {
            grid: self.grid.clone(),
            kind: self.kind.adjoint(),
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(adjoint)?))
    }
}

/// Forward of the (separable) S2 activation for all rows. With `scalars`, output row 0 is
/// `SiLU(scalars[n])` and only rows `1..K` come from the grid.
fn s2_act_forward<T: GridFloat>(
    grid: &GridInner,
    x: &[T],
    scalars: Option<&[T]>,
    n: usize,
    c: usize,
) -> Vec<T> {
    let (g, k) = (grid.g, grid.k);
    let mats = T::matrices(grid);
    let mut out = crate::buffer::zeroed_vec::<T>(n * k * c);
    if c == 0 {
        return out;
    }
    let skip = usize::from(scalars.is_some());
    let block = rows_per_task(n);
    if let Some(f) = T::factored(grid) {
        out.par_chunks_mut(block * k * c)
            .enumerate()
            .with_min_len(crate::buffer::min_task_len(n.div_ceil(block)))
            .for_each_init(
                || f.scratch(c, false),
                |sc, (task, chunk)| {
                    let rows = task * block * k * c..task * block * k * c + chunk.len();
                    factored::forward_rows(f, &x[rows], c, skip, chunk, sc);
                },
            );
    } else {
        out.par_chunks_mut(block * k * c)
            .enumerate()
            .with_min_len(crate::buffer::min_task_len(n.div_ceil(block)))
            .for_each_init(
                || vec![T::ZERO; g * c],
                |values, (task, chunk)| {
                    for (r, out_row) in chunk.chunks_mut(k * c).enumerate() {
                        let row = task * block + r;
                        let x_row = &x[row * k * c..(row + 1) * k * c];
                        gemm(
                            (g, c, k),
                            values,
                            0,
                            c,
                            false,
                            view(&mats.to, 0, k, 1),
                            view(x_row, 0, c, 1),
                            T::ONE,
                        );
                        T::silu_in_place(values);
                        gemm(
                            (k - skip, c, g),
                            out_row,
                            skip * c,
                            c,
                            false,
                            view(&mats.from, skip, 1, k),
                            view(values, 0, c, 1),
                            T::ONE,
                        );
                    }
                },
            );
    }
    // Row 0 of the separable activation: SiLU of the scalars (the grid kernels skip it).
    if let Some(s) = scalars {
        out.par_chunks_mut(k * c)
            .zip(s.par_chunks(c))
            .for_each(|(out_row, s)| {
                for (o, &v) in out_row[..c].iter_mut().zip(s) {
                    *o = v / (T::ONE + (-v).exp());
                }
            });
    }
    out
}

/// Backward of the S2 activation w.r.t. `x`: `dx[n] = toᵀ · (SiLU'(to · x[n]) ⊙ (from · dy[n]))`,
/// with row 0 of `dy` ignored when `separable`.
fn s2_act_backward<T: GridFloat>(
    grid: &GridInner,
    x: &[T],
    dy: &[T],
    separable: bool,
    n: usize,
    c: usize,
) -> Vec<T> {
    let (g, k) = (grid.g, grid.k);
    let mats = T::matrices(grid);
    let mut dx = crate::buffer::zeroed_vec::<T>(n * k * c);
    if c == 0 {
        return dx;
    }
    let skip = usize::from(separable);
    let block = rows_per_task(n);
    if let Some(f) = T::factored(grid) {
        dx.par_chunks_mut(block * k * c)
            .enumerate()
            .with_min_len(crate::buffer::min_task_len(n.div_ceil(block)))
            .for_each_init(
                || f.scratch(c, true),
                |sc, (task, chunk)| {
                    let rows = task * block * k * c..task * block * k * c + chunk.len();
                    factored::backward_rows(f, &x[rows.clone()], &dy[rows], c, skip, chunk, sc);
                },
            );
        return dx;
    }
    dx.par_chunks_mut(block * k * c)
        .enumerate()
        .with_min_len(crate::buffer::min_task_len(n.div_ceil(block)))
        .for_each_init(
            || (vec![T::ZERO; g * c], vec![T::ZERO; g * c]),
            |(values, grads), (task, chunk)| {
                for (r, dx_row) in chunk.chunks_mut(k * c).enumerate() {
                    let row = task * block + r;
                    let x_row = &x[row * k * c..(row + 1) * k * c];
                    let dy_row = &dy[row * k * c..(row + 1) * k * c];
                    gemm(
                        (g, c, k),
                        values,
                        0,
                        c,
                        false,
                        view(&mats.to, 0, k, 1),
                        view(x_row, 0, c, 1),
                        T::ONE,
                    );
                    gemm(
                        (g, c, k - skip),
                        grads,
                        0,
                        c,
                        false,
                        view(&mats.from, skip, k, 1),
                        view(dy_row, skip * c, c, 1),
                        T::ONE,
                    );
                    if k == skip {
                        grads.iter_mut().for_each(|v| *v = T::ZERO);
                    }
                    T::silu_backward_in_place(values, grads);
                    gemm(
                        (k, c, g),
                        dx_row,
                        0,
                        c,
                        false,
                        view(&mats.to, 0, 1, k),
                        view(values, 0, c, 1),
                        T::ONE,
                    );
                }
            },
        );
    dx
}

/// Custom op of [`S2Grid::s2_activation`].
#[derive(Clone)]
struct S2Act {
    grid: Arc<GridInner>,
}

/// Input `[N, K, C]`.
impl FloatKernel<1> for S2Act {
    fn run<T: Float>(&self, [(x, l)]: [(&[T], &Layout); 1]) -> candle_core::Result<Vec<T>> {
        let (n, _, c) = l.shape().dims3()?;
        Ok(s2_act_forward(&self.grid, x, None, n, c))
    }
}

impl CustomOp1 for S2Act {
    fn name(&self) -> &'static str {
        "s2-activation"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run_float(self.name(), [(storage, layout)], self)?;
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let grid = self.grid.cuda();
        crate::cuda::s2grid::activation((storage, layout), None, &grid, self.name())
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let back = S2ActBackward {
            grid: self.grid.clone(),
            separable: false,
        };
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad_res.contiguous()?, &back)?,
        ))
    }
}

/// Custom op of [`S2Grid::separable_s2_activation`] (args: `x`, `scalars`).
#[derive(Clone)]
struct SeparableS2Act {
    grid: Arc<GridInner>,
}

/// Inputs `(x [N, K, C], scalars)`.
impl FloatKernel<2> for SeparableS2Act {
    fn run<T: Float>(
        &self,
        [(x, l), (scalars, _)]: [(&[T], &Layout); 2],
    ) -> candle_core::Result<Vec<T>> {
        let (n, _, c) = l.shape().dims3()?;
        Ok(s2_act_forward(&self.grid, x, Some(scalars), n, c))
    }
}

impl CustomOp2 for SeparableS2Act {
    fn name(&self) -> &'static str {
        "separable-s2-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
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
        let grid = self.grid.cuda();
        crate::cuda::s2grid::activation((s1, l1), Some((s2, l2)), &grid, self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        scalars: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let back = S2ActBackward {
            grid: self.grid.clone(),
            separable: true,
        };
        let grad = grad_res.contiguous()?;
        let dx = x.contiguous()?.apply_op2_no_bwd(&grad, &back)?;
        let silu_grad = scalars.contiguous()?.apply_op1(Elementwise {
            function: Function::Silu,
            order: 1,
        })?;
        let dscalars = grad.narrow(1, 0, 1)?.squeeze(1)?.mul(&silu_grad)?;
        Ok((Some(dx), Some(dscalars)))
    }
}

/// Fused backward of the S2 activations (args: `x`, `grad_out`); first order only.
#[derive(Clone)]
struct S2ActBackward {
    grid: Arc<GridInner>,
    separable: bool,
}

/// Inputs `(x [N, K, C], grad)`.
impl FloatKernel<2> for S2ActBackward {
    fn run<T: Float>(&self, [(x, l), (g, _)]: [(&[T], &Layout); 2]) -> candle_core::Result<Vec<T>> {
        let (n, _, c) = l.shape().dims3()?;
        Ok(s2_act_backward(&self.grid, x, g, self.separable, n, c))
    }
}

impl CustomOp2 for S2ActBackward {
    fn name(&self) -> &'static str {
        "s2-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
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
        let grid = self.grid.cuda();
        let (x, dy, name) = ((s1, l1), (s2, l2), self.name());
        crate::cuda::s2grid::activation_backward(x, dy, &grid, self.separable, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        assert_close, assert_close_slice, check_gradient, random_rotation, random_tensor, Fixture,
    };
    use crate::wigner::wigner_d;

    fn to_c(e: EquivariantError) -> candle_core::Error {
        candle_core::Error::Msg(e.to_string())
    }

    fn fixture_tensor(fx: &Fixture, name: &str) -> Tensor {
        let (s, v) = fx.array(name);
        Tensor::from_slice(v, s.as_slice(), &Device::Cpu).expect("tensor")
    }

    /// One launch of the fused CUDA S2 kernels (`kernels/s2fused.cu`) on the host emulation
    /// (`crate::host_kernels`) against the CPU activation or its backward on the same inputs;
    /// returns the largest difference relative to the largest CPU value.
    fn host_fused_error<T: GridFloat + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        grid: &S2Grid,
        (n, c, backward, skip): (usize, usize, bool, bool),
        seed: u64,
    ) -> f64 {
        use crate::host_kernels::{bytes_of, floats_from};
        let inner = &grid.inner;
        let f = T::factored(inner).expect("EquiformerV2 grids are separable");
        let tables = f.grouped();
        let k = tables.order.len();
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        let x = cast(crate::testing::random_normals(n * k * c, seed));
        let second = if backward {
            cast(crate::testing::random_normals(n * k * c, seed + 1))
        } else if skip {
            cast(crate::testing::random_normals(n * c, seed + 2))
        } else {
            Vec::new()
        };
        let want = if backward {
            s2_act_backward(inner, &x, &second, skip, n, c)
        } else {
            s2_act_forward(inner, &x, skip.then_some(&second[..]), n, c)
        };
        let width = std::mem::size_of::<T>();
        let header = [
            width as i64,
            i64::from(backward),
            n as i64,
            c as i64,
            k as i64,
            tables.b as i64,
            tables.a as i64,
            (tables.offsets.len() - 1) as i64,
            i64::from(skip),
            8, // threads per block: the driver caps the grid at 3 blocks
        ];
        let mut input = bytes_of(&header);
        for part in [&x, &second, &tables.u_to, &tables.u_from, &tables.v] {
            input.extend(bytes_of(part));
        }
        input.extend(bytes_of(&tables.order));
        input.extend(bytes_of(&tables.offsets));
        let tag = format!("{}-{n}-{c}-{backward}-{skip}-{seed}", T::DTYPE.as_str());
        let got = floats_from(&driver.run(&tag, &input), width);
        let want: Vec<f64> = want.iter().map(|v| v.to_f64()).collect();
        crate::host_kernels::max_relative_error(&tag, &got, &want)
    }

    /// The fused CUDA S2 activation kernels, run on the host, agree with the CPU activations
    /// (forward with and without the separable scalars, backward): EquiformerV2's attention
    /// grid in the m-major order the model uses, two more shapes, and one grid for each other
    /// `J` the kernels are instantiated for (every odd J ≤ 13); f64 to 1e-12 and f32 to 1e-5
    /// of the largest value.
    #[test]
    fn fused_cuda_s2_kernels_match_the_cpu_on_the_host() -> Result<()> {
        let Some(driver) = crate::host_kernels::driver("s2fused_main") else {
            return Ok(());
        };
        let grids = [
            S2Grid::equiformer_v2(4, 2, Some(18))?
                .permuted(&crate::mapping::SphericalLayout::new(4, 2)?.to_m())?,
            S2Grid::equiformer_v2(3, 3, Some(8))?,
            S2Grid::equiformer_v2(6, 4, Some(14))?,
            // The other J = 2·mmax + 1 kernels, one small shape each.
            S2Grid::equiformer_v2(2, 0, Some(6))?,
            S2Grid::equiformer_v2(3, 1, Some(8))?,
            S2Grid::equiformer_v2(6, 5, Some(14))?,
            S2Grid::equiformer_v2(6, 6, Some(14))?,
        ];
        let mut seed = 40;
        for (i, grid) in grids.iter().enumerate() {
            let shapes: &[(usize, usize)] = if i < 3 { &[(5, 7), (2, 33)] } else { &[(3, 5)] };
            for &(n, c) in shapes {
                for backward in [false, true] {
                    for skip in [false, true] {
                        seed += 3;
                        let shape = (n, c, backward, skip);
                        let e64 = host_fused_error::<f64>(driver, grid, shape, seed);
                        let e32 = host_fused_error::<f32>(driver, grid, shape, seed);
                        let what = format!(
                            "lmax {} mmax {} res {}: n {n} c {c} backward {backward} skip {skip}",
                            grid.lmax(),
                            grid.mmax(),
                            grid.res_beta()
                        );
                        assert!(e64 < 1e-12, "{what}: f64 error {e64:e}");
                        assert!(e32 < 1e-5, "{what}: f32 error {e32:e}");
                    }
                }
            }
        }
        Ok(())
    }

    /// EquiformerV2's grids are separable: `J = 2·mmax + 1` α profiles, so one transform is
    /// `B·K + B·A·J` multiply-adds per channel, not the dense `G·K`.
    #[test]
    fn cpu_transform_macs_count_the_factored_products() -> Result<()> {
        for (lmax, mmax, res) in [(4, 2, 18), (6, 4, 18), (4, 4, 18)] {
            let grid = S2Grid::equiformer_v2(lmax, mmax, Some(res))?;
            let (k, j) = (grid.num_coefficients(), 2 * mmax + 1);
            assert_eq!(grid.cpu_transform_macs(), res * k + res * res * j);
            assert!(grid.cpu_transform_macs() < grid.num_points() * k);
        }
        Ok(())
    }

    /// Matrices and activations against e3nn `ToS2Grid`/`FromS2Grid` and fairchem `SO3_Grid`,
    /// `S2Activation`, `SeparableS2Activation` (`tests/data/equivariant/s2grid_fixtures.py`).
    #[test]
    fn matches_e3nn_and_fairchem_golden_values() -> Result<()> {
        let fx = Fixture::open("s2grid_golden");
        let cases = [
            (
                "fairchem_l4_m4_r18x18",
                4,
                4,
                18,
                18,
                Normalization::Component,
            ),
            (
                "fairchem_l4_m2_r18x18",
                4,
                2,
                18,
                18,
                Normalization::Component,
            ),
            (
                "fairchem_l6_m6_r14x15",
                6,
                6,
                14,
                15,
                Normalization::Component,
            ),
            (
                "fairchem_l6_m4_r18x18",
                6,
                4,
                18,
                18,
                Normalization::Component,
            ),
            ("e3nn_l3_r8x9_integral", 3, 3, 8, 9, Normalization::Integral),
            ("e3nn_l3_r8x9_norm", 3, 3, 8, 9, Normalization::Norm),
        ];
        for (name, lmax, mmax, rb, ra, norm) in cases {
            let grid = S2Grid::new(lmax, mmax, rb, ra, norm)?;
            if name.starts_with("fairchem") {
                let default =
                    S2Grid::equiformer_v2(lmax, mmax, if rb == 18 { Some(18) } else { None })?;
                assert_eq!(
                    (default.res_beta(), default.res_alpha()),
                    (rb, ra),
                    "{name}"
                );
            }
            // [3, K] coefficients as [3, K, 1]
            let coeffs = fixture_tensor(&fx, &format!("{name}.coeffs")).unsqueeze(2)?;
            let expected = fixture_tensor(&fx, &format!("{name}.to_grid")).unsqueeze(2)?;
            assert_close(&grid.to_grid(&coeffs)?, &expected, 1e-12);
            let signal = fixture_tensor(&fx, &format!("{name}.signal")).unsqueeze(2)?;
            let expected = fixture_tensor(&fx, &format!("{name}.from_grid")).unsqueeze(2)?;
            assert_close(&grid.from_grid(&signal)?, &expected, 1e-12);
            if name.starts_with("fairchem") {
                let x = fixture_tensor(&fx, &format!("{name}.act_x"));
                let s = fixture_tensor(&fx, &format!("{name}.act_scalars"));
                assert_close(
                    &grid.s2_activation(&x)?,
                    &fixture_tensor(&fx, &format!("{name}.s2_act")),
                    1e-12,
                );
                assert_close(
                    &grid.separable_s2_activation(&s, &x)?,
                    &fixture_tensor(&fx, &format!("{name}.sep_s2_act")),
                    1e-12,
                );
                // f32 kernels (fast exp) agree to single precision
                let y32 = grid.s2_activation(&x.to_dtype(DType::F32)?)?;
                assert_close(&y32, &fixture_tensor(&fx, &format!("{name}.s2_act")), 1e-5);
            }
        }
        let (_, w) = fx.array("quadrature_weights_b9");
        assert_close_slice(&soft_quadrature_weights(9), w, 1e-16);
        Ok(())
    }

    #[test]
    fn round_trip_is_identity_for_band_limited_signals() -> Result<()> {
        for (lmax, rb, ra) in [
            (4, 10, 9),
            (4, 18, 18),
            (6, 14, 13),
            (6, 18, 18),
            (8, 18, 17),
        ] {
            for norm in [
                Normalization::Component,
                Normalization::Norm,
                Normalization::Integral,
            ] {
                let grid = S2Grid::new(lmax, lmax, rb, ra, norm)?;
                let x = random_tensor(&[3, grid.num_coefficients(), 4], DType::F64, lmax as u64)?;
                let back = grid.from_grid(&grid.to_grid(&x)?)?;
                let err = (back - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-10, "lmax {lmax} grid {rb}x{ra} {norm:?}: {err:e}");
            }
        }
        // with mmax < lmax, degrees above mmax come back scaled by (2l+1)/(2 mmax+1) (fairchem)
        let grid = S2Grid::new(4, 2, 18, 18, Normalization::Component)?;
        let x = random_tensor(&[2, grid.num_coefficients(), 3], DType::F64, 9)?;
        let back: Vec<f64> = grid
            .from_grid(&grid.to_grid(&x)?)?
            .flatten_all()?
            .to_vec1()?;
        let xv: Vec<f64> = x.flatten_all()?.to_vec1()?;
        let k = grid.num_coefficients();
        for (idx, (&b, &v)) in back.iter().zip(&xv).enumerate() {
            let l = grid.degrees()[(idx / 3) % k];
            let factor = if l > 2 { (2 * l + 1) as f64 / 5.0 } else { 1.0 };
            assert!((b - factor * v).abs() < 1e-10);
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let grid = S2Grid::new(3, 2, 8, 7, Normalization::Component)?;
        let k = grid.num_coefficients();
        let x = random_tensor(&[3, k, 2], DType::F64, 1)?;
        let s = random_tensor(&[3, 2], DType::F64, 2)?;
        check_gradient(|t| grid.to_grid(t).map_err(to_c), &x, 1e-6)?.assert_within(1e-8);
        let y = random_tensor(&[3, grid.num_points(), 2], DType::F64, 3)?;
        check_gradient(|t| grid.from_grid(t).map_err(to_c), &y, 1e-6)?.assert_within(1e-8);
        check_gradient(|t| grid.s2_activation(t).map_err(to_c), &x, 1e-6)?.assert_within(1e-8);
        check_gradient(
            |t| grid.separable_s2_activation(&s, t).map_err(to_c),
            &x,
            1e-6,
        )?
        .assert_within(1e-8);
        check_gradient(
            |t| grid.separable_s2_activation(t, &x).map_err(to_c),
            &s,
            1e-6,
        )?
        .assert_within(1e-8);
        // to_grid / from_grid are differentiable twice (their backwards are grid products too)
        let second = |t: &Tensor| -> candle_core::Result<Tensor> {
            let g = grid.to_grid(t).map_err(to_c)?;
            grid.from_grid(&g.sqr()?).map_err(to_c)
        };
        check_gradient(second, &x, 1e-6)?.assert_within(1e-8);
        Ok(())
    }

    /// The same grid without its β/α factors: the activations take the dense products.
    fn dense_only(grid: &S2Grid) -> S2Grid {
        let inner = &grid.inner;
        let mut dense = GridInner::with_matrices(
            (inner.lmax, inner.mmax),
            (inner.res_beta, inner.res_alpha),
            inner.normalization,
            inner.degrees.clone(),
            inner.f64.clone(),
            inner.f32.clone(),
        );
        dense.factored_f64 = None;
        dense.factored_f32 = None;
        S2Grid {
            inner: Arc::new(dense),
        }
    }

    #[test]
    fn grids_factor_over_beta_and_alpha_and_match_the_dense_kernels() -> Result<()> {
        let permuted = S2Grid::equiformer_v2(4, 2, Some(18))?
            .permuted(&crate::mapping::SphericalLayout::new(4, 2)?.to_m())?;
        for grid in [
            S2Grid::equiformer_v2(4, 2, Some(18))?,
            S2Grid::equiformer_v2(4, 4, Some(18))?,
            S2Grid::equiformer_v2(6, 4, None)?,
            S2Grid::new(3, 1, 8, 5, Normalization::Norm)?,
            permuted,
        ] {
            let f = grid.inner.factored_f64.as_ref().expect("separable grid");
            assert_eq!(f.groups(), 2 * grid.mmax() + 1, "{grid:?}");
            assert!(grid.inner.factored_f32.is_some());
            let dense = dense_only(&grid);
            let k = grid.num_coefficients();
            // 6 channels: the scalar tail of the kernels' channel blocks; 21: a 16-wide block
            // and a tail; 80: a 64-wide block and a 16-wide one.
            for (c, separable) in [(6, false), (6, true), (21, true), (80, false)] {
                let x = candle_core::Var::from_tensor(&random_tensor(&[23, k, c], DType::F64, 7)?)?;
                let s = candle_core::Var::from_tensor(&random_tensor(&[23, c], DType::F64, 8)?)?;
                let w = random_tensor(&[23, k, c], DType::F64, 9)?;
                let run = |g: &S2Grid| -> Result<(Tensor, Tensor)> {
                    let y = if separable {
                        g.separable_s2_activation(&s, &x)?
                    } else {
                        g.s2_activation(&x)?
                    };
                    let grads = (&y * &w)?.sum_all()?.backward()?;
                    Ok((y, grads.get(&x).expect("dx").clone()))
                };
                let (y, dx) = run(&grid)?;
                let (y_dense, dx_dense) = run(&dense)?;
                assert_close(&y, &y_dense, 1e-12);
                assert_close(&dx, &dx_dense, 1e-12);
            }
        }
        Ok(())
    }

    #[test]
    fn fused_activation_equals_the_unfused_composition() -> Result<()> {
        let grid = S2Grid::equiformer_v2(4, 2, Some(18))?;
        let x = random_tensor(&[37, grid.num_coefficients(), 5], DType::F64, 4)?;
        let unfused = grid.from_grid(&crate::activation::silu(&grid.to_grid(&x)?)?)?;
        assert_close(&grid.s2_activation(&x)?, &unfused, 1e-13);
        let x32 = x.to_dtype(DType::F32)?;
        assert_close(&grid.s2_activation(&x32)?, &unfused, 2e-5);
        Ok(())
    }

    /// `D x` for `x [N, (lmax+1)², C]` with the block-diagonal Wigner-D of a random rotation.
    fn rotate(x: &Tensor, lmax: usize, seed: u64) -> Tensor {
        let r = random_rotation(seed);
        let k = (lmax + 1) * (lmax + 1);
        let mut d = vec![0.0; k * k];
        for l in 0..=lmax {
            let block = wigner_d(l, &r).expect("wigner");
            let (o, w) = (l * l, 2 * l + 1);
            for i in 0..w {
                for j in 0..w {
                    d[(o + i) * k + o + j] = block[i * w + j];
                }
            }
        }
        let n = x.dim(0).expect("n");
        Tensor::from_vec(d, (1, k, k), &Device::Cpu)
            .and_then(|d| d.broadcast_as((n, k, k))?.contiguous()?.matmul(x))
            .expect("rotate")
    }

    /// The S2 activation is equivariant only up to the grid's aliasing error; it shrinks fast
    /// with the resolution (figures in docs/ARCHITECTURE.md).
    #[test]
    fn s2_activation_is_approximately_equivariant() -> Result<()> {
        let lmax = 4;
        let x = random_tensor(&[4, 25, 3], DType::F64, 5)?;
        let mut errors = Vec::new();
        for res in [18, 36] {
            let grid = S2Grid::equiformer_v2(lmax, lmax, Some(res))?;
            let mut worst = 0.0f64;
            for seed in 0..3 {
                let lhs = grid.s2_activation(&rotate(&x, lmax, seed))?;
                let rhs = rotate(&grid.s2_activation(&x)?, lmax, seed);
                let rel = ((lhs - &rhs)?.sqr()?.sum_all()?.to_scalar::<f64>()?
                    / rhs.sqr()?.sum_all()?.to_scalar::<f64>()?)
                .sqrt();
                worst = worst.max(rel);
            }
            errors.push(worst);
        }
        assert!(
            errors[0] < 0.05,
            "grid 18: relative equivariance error {:e}",
            errors[0]
        );
        assert!(
            errors[1] < errors[0] / 10.0,
            "grid 36 ({:e}) not much better than 18 ({:e})",
            errors[1],
            errors[0]
        );
        Ok(())
    }

    /// A permuted grid on permuted coefficients equals the original grid (separable S2
    /// activation, values and input gradients), and bad orders are refused.
    #[test]
    fn permuted_grid_acts_on_permuted_coefficients() -> Result<()> {
        let grid = S2Grid::equiformer_v2(4, 2, Some(18))?;
        let k = grid.num_coefficients();
        let layout = crate::mapping::SphericalLayout::new(4, 2)?;
        let order = layout.to_m();
        let permuted = grid.permuted(&order)?;
        let index = Tensor::from_vec(
            order.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            k,
            &Device::Cpu,
        )?;
        let x = candle_core::Var::from_tensor(&random_tensor(&[3, k, 5], DType::F64, 11)?)?;
        let scalars = random_tensor(&[3, 5], DType::F64, 12)?;
        let reference = grid
            .separable_s2_activation(&scalars, x.as_tensor())?
            .index_select(&index, 1)?;
        let x_m = x.as_tensor().index_select(&index, 1)?;
        let out = permuted.separable_s2_activation(&scalars, &x_m)?;
        let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_close_slice(&flat(&out), &flat(&reference), 1e-12);
        let probe = random_tensor(&[3, k, 5], DType::F64, 13)?;
        let g1 = (&out * &probe)?.sum_all()?.backward()?;
        let g2 = (&reference * &probe)?.sum_all()?.backward()?;
        let (g1, g2) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert_close_slice(&flat(g1), &flat(g2), 1e-12);
        let degrees: Vec<usize> = order.iter().map(|&c| grid.degrees()[c]).collect();
        assert_eq!(permuted.degrees(), &degrees[..]);
        assert!(grid.permuted(&[1, 0]).is_err());
        let mut swapped = order.clone();
        swapped.swap(0, 1);
        assert!(grid.permuted(&swapped).is_err());
        let mut repeated = order.clone();
        repeated[2] = repeated[1];
        assert!(grid.permuted(&repeated).is_err());
        Ok(())
    }

    #[test]
    fn invalid_configurations_and_shapes_are_reported() -> Result<()> {
        assert!(matches!(
            S2Grid::new(4, 5, 18, 18, Normalization::Component),
            Err(EquivariantError::InvalidDegree { name: "mmax", .. })
        ));
        assert!(matches!(
            S2Grid::new(4, 4, 17, 18, Normalization::Component),
            Err(EquivariantError::InvalidArgument {
                name: "res_beta",
                ..
            })
        ));
        assert!(S2Grid::new(8, 8, 16, 18, Normalization::Component).is_err());
        let grid = S2Grid::equiformer_v2(2, 2, None)?;
        let bad = Tensor::zeros((2, 8, 3), DType::F32, &Device::Cpu)?;
        let err = grid.s2_activation(&bad).unwrap_err();
        assert!(
            err.to_string().contains("[N, 9 (coefficients), C]"),
            "{err}"
        );
        let x = Tensor::zeros((2, 9, 3), DType::F32, &Device::Cpu)?;
        let s = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        assert!(matches!(
            grid.separable_s2_activation(&s, &x),
            Err(EquivariantError::ShapeMismatch { arg: "scalars", .. })
        ));
        Ok(())
    }
}
