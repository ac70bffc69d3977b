//! Equivariant normalisations and the degree-wise linear layer of EquiformerV2 (fairchem 1.x
//! `equiformer_v2/layer_norm.py` and `so3.py`).
//!
//! All layers act on node embeddings `x[N, (lmax + 1)², C]` (l-major, component `(l, m)` at
//! row `l² + m + l`) and are exactly SO(3)-equivariant: they only use rotation-invariant
//! statistics (sums of squares over whole degrees) and act identically on the `2l + 1`
//! components of a degree. Parameters are named like fairchem's state dict.
//!
//! * [`EquivariantLayerNormArray`] (`norm_type = "layer_norm"`): every degree separately. For
//!   `l = 0` the channel mean is removed first; then `x_l / √(mean_c ‖x_l‖² + eps)` where `‖·‖²`
//!   is the mean (`component`) or the sum (`norm`) over the `2l + 1` components; affine
//!   `affine_weight [lmax+1, C]`, `affine_bias [C]` on `l = 0` only.
//! * [`EquivariantLayerNormArraySphericalHarmonics`] (`"layer_norm_sh"`, EquiformerV2's
//!   default): `l = 0` by a standard LayerNorm over the channels (`norm_l0.weight/bias`); all
//!   `l > 0` share one scale `1 / √(mean_c σ² + eps)` with, for `component` normalisation and
//!   `std_balance_degrees` (the default), `σ² = (1/lmax) Σ_{l≥1} (1/(2l+1)) Σ_m x_lm²` (each degree
//!   weighs the same), otherwise the mean (`component`) or sum (`norm`) over all `l > 0` rows;
//!   affine `affine_weight [lmax, C]` per degree `l ≥ 1` and channel, no bias.
//! * [`EquivariantRmsNormArraySphericalHarmonicsV2`] (`"rms_norm_sh"`): one scale for all
//!   degrees, `1 / √(mean_c σ² + eps)` with `σ² = (1/(lmax+1)) Σ_{l≥0} (1/(2l+1)) Σ_m x_lm²`
//!   (balanced) or the plain mean/sum; with `centering` (default) the channel mean of the
//!   `l = 0` row is removed first and `affine_bias [C]` is added to it afterwards;
//!   `affine_weight [lmax+1, C]`.
//! * [`So3LinearV2`]: fairchem `SO3_LinearV2`, `y[n, (l, m), o] = Σ_i W[l, o, i] x[n, (l, m), i]`
//!   (+ `bias[o]` on `l = 0` only), weight `[lmax + 1, C_out, C_in]` initialised
//!   `U(−1/√C_in, 1/√C_in)`, bias zeros.
//! * [`LayerNorm`]: a plain LayerNorm over the last dimension built from differentiable ops
//!   (candle-nn's `LayerNorm` takes a fused path without a backward for contiguous inputs).
//!
//! These run on nodes, not edges, so they are compositions of candle ops (differentiable to
//! any order) rather than custom kernels.
//!
//! # Example
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use matscale_equivariant::norms::{EquivariantNorm, NormConfig, NormType, So3LinearV2};
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let (lmax, channels) = (4, 8);
//! let norm = EquivariantNorm::new(NormType::LayerNormSh, lmax, channels, NormConfig::default(), vb.pp("norm"))?;
//! let linear = So3LinearV2::new(channels, 16, lmax, vb.pp("linear"))?;
//! let x = Tensor::randn(0f32, 1.0, (10, 25, channels), &Device::Cpu)?;
//! let y = linear.forward(&norm.forward(&x)?)?;
//! assert_eq!(y.dims(), &[10, 25, 16]);
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Device, Layout, Tensor, D};
use candle_nn::{Init, VarBuilder};

use rayon::prelude::*;

use crate::activation::{check_float, Float, Function};
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};
use crate::norm_act::{
    backward_block, forward_block, layer_norm_act, layer_norm_act_dot, BlockInputs,
};

/// How the squared size of a degree is measured (fairchem's `normalization` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeatureNormalization {
    /// Mean over the components (`'component'`, the default).
    #[default]
    Component,
    /// Sum over the components (`'norm'`).
    Norm,
}

/// Options shared by the equivariant norms (fairchem's constructor arguments and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormConfig {
    /// Added to the mean square before the inverse square root (default 1e-5).
    pub eps: f64,
    /// Whether the norm has learnable affine parameters (default true).
    pub affine: bool,
    /// `component` (default) or `norm`.
    pub normalization: FeatureNormalization,
    /// Weigh every degree equally in the shared statistic (`layer_norm_sh`, `rms_norm_sh`;
    /// default true, as `get_normalization_layer` leaves it).
    pub std_balance_degrees: bool,
    /// `rms_norm_sh` only: remove the channel mean of the `l = 0` row and learn a bias for it
    /// (default true).
    pub centering: bool,
}

impl Default for NormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            affine: true,
            normalization: FeatureNormalization::Component,
            std_balance_degrees: true,
            centering: true,
        }
    }
}

/// Which normalisation (fairchem `norm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormType {
    /// `"layer_norm"`: [`EquivariantLayerNormArray`].
    LayerNorm,
    /// `"layer_norm_sh"`: [`EquivariantLayerNormArraySphericalHarmonics`].
    LayerNormSh,
    /// `"rms_norm_sh"`: [`EquivariantRmsNormArraySphericalHarmonicsV2`].
    RmsNormSh,
}

impl std::str::FromStr for NormType {
    type Err = EquivariantError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "layer_norm" => Ok(Self::LayerNorm),
            "layer_norm_sh" => Ok(Self::LayerNormSh),
            "rms_norm_sh" => Ok(Self::RmsNormSh),
            other => Err(EquivariantError::InvalidArgument {
                name: "norm_type",
                reason: format!("`{other}` is not one of layer_norm, layer_norm_sh, rms_norm_sh"),
            }),
        }
    }
}

/// Checks `x` is `[N, (lmax+1)², C]` and returns `N`.
fn check_embedding(x: &Tensor, lmax: usize, channels: usize) -> Result<usize> {
    check_float(x, "x")?;
    let k = (lmax + 1) * (lmax + 1);
    match x.dims() {
        &[n, kk, c] if kk == k && c == channels => Ok(n),
        dims => Err(EquivariantError::ShapeMismatch {
            arg: "x",
            expected: format!("[N, {k}, {channels}]"),
            found: dims.to_vec(),
        }),
    }
}

/// Degree of every l-major row `0..(lmax+1)²`.
fn degree_of_rows(lmax: usize) -> Vec<u32> {
    (0..=lmax)
        .flat_map(|l| std::iter::repeat_n(l as u32, 2 * l + 1))
        .collect()
}

/// Per-row weights of the balanced mean square over degrees `lmin..=lmax`:
/// `1 / ((2l+1) · num_degrees)` for each of the `2l + 1` rows of degree `l`.
fn balance_coefficients(lmin: usize, lmax: usize) -> Vec<f64> {
    let degrees = (lmax + 1 - lmin) as f64;
    (lmin..=lmax)
        .flat_map(|l| std::iter::repeat_n(1.0 / ((2 * l + 1) as f64 * degrees), 2 * l + 1))
        .collect()
}

/// [`balance_coefficients`] as a `[1, rows, 1]` tensor.
fn balance_weights(
    lmin: usize,
    lmax: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let w = balance_coefficients(lmin, lmax);
    Ok(Tensor::from_vec(w.clone(), (1, w.len(), 1), device)?.to_dtype(dtype)?)
}

/// `[N, rows, C]` → `[N, 1, C]` mean square of the rows under the chosen normalisation.
fn squared_size(
    feature: &Tensor,
    lmin: usize,
    lmax: usize,
    normalization: FeatureNormalization,
    balanced: bool,
) -> Result<Tensor> {
    let sq = feature.sqr()?;
    Ok(match (normalization, balanced) {
        (FeatureNormalization::Norm, _) => sq.sum_keepdim(1)?,
        (FeatureNormalization::Component, false) => sq.mean_keepdim(1)?,
        (FeatureNormalization::Component, true) => {
            let w = balance_weights(lmin, lmax, feature.dtype(), feature.device())?;
            sq.broadcast_mul(&w)?.sum_keepdim(1)?
        }
    })
}

/// `[N, 1, C]` → `[N, 1, 1]` factor `1 / √(mean_c(size) + eps)`.
fn inverse_rms(size: &Tensor, eps: f64) -> Result<Tensor> {
    Ok((size.mean_keepdim(2)? + eps)?.sqrt()?.recip()?)
}

/// A LayerNorm over the last dimension (`weight`, `bias` of size `C`), differentiable.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight` (init 1) and `bias` (init 0) of size `size` from `vb`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// `(x − mean) / √(var + eps) · weight + bias` over the last dimension (biased variance).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }

    /// The affine weight, bias and epsilon.
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, self.eps)
    }

    /// `act(self.forward(x))` as one fused op ([`crate::norm_act::layer_norm_act`]); `None`
    /// is [`Self::forward`] itself.
    pub fn forward_act(&self, x: &Tensor, act: Option<Function>) -> Result<Tensor> {
        layer_norm_act(x, &self.weight, &self.bias, self.eps, act)
    }

    /// `Σ_a act(self.forward(x))[.., h, a] · dot[h, a]` for `x` `[.., H, A]` and `dot`
    /// `[H, A]`, as one fused op ([`crate::norm_act::layer_norm_act_dot`]): `[.., H]`.
    pub fn forward_act_dot(
        &self,
        x: &Tensor,
        act: Option<Function>,
        dot: &Tensor,
    ) -> Result<Tensor> {
        layer_norm_act_dot(x, &self.weight, &self.bias, self.eps, act, dot)
    }
}

/// fairchem `EquivariantLayerNormArray` (`"layer_norm"`); see the [module docs](self).
#[derive(Debug, Clone)]
pub struct EquivariantLayerNormArray {
    lmax: usize,
    channels: usize,
    config: NormConfig,
    /// `[lmax + 1, C]`
    weight: Option<Tensor>,
    /// `[C]`
    bias: Option<Tensor>,
}

impl EquivariantLayerNormArray {
    /// Parameters `affine_weight [lmax+1, C]` (ones) and `affine_bias [C]` (zeros) if affine.
    pub fn new(lmax: usize, channels: usize, config: NormConfig, vb: VarBuilder) -> Result<Self> {
        let (weight, bias) = if config.affine {
            (
                Some(vb.get_with_hints((lmax + 1, channels), "affine_weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(channels, "affine_bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            lmax,
            channels,
            config,
            weight,
            bias,
        })
    }

    /// `[N, (lmax+1)², C]` → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_embedding(x, self.lmax, self.channels)?;
        let mut out = Vec::with_capacity(self.lmax + 1);
        for l in 0..=self.lmax {
            let mut feature = x.narrow(1, l * l, 2 * l + 1)?;
            if l == 0 {
                feature = feature.broadcast_sub(&feature.mean_keepdim(2)?)?;
            }
            let size = squared_size(&feature, l, l, self.config.normalization, false)?;
            let mut scale = inverse_rms(&size, self.config.eps)?;
            if let Some(w) = &self.weight {
                scale = scale.broadcast_mul(&w.narrow(0, l, 1)?.unsqueeze(0)?)?;
            }
            let mut feature = feature.broadcast_mul(&scale)?;
            if let (0, Some(b)) = (l, &self.bias) {
                feature = feature.broadcast_add(b)?;
            }
            out.push(feature);
        }
        Ok(Tensor::cat(&out, 1)?)
    }
}

/// fairchem `EquivariantLayerNormArraySphericalHarmonics` (`"layer_norm_sh"`); see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct EquivariantLayerNormArraySphericalHarmonics {
    lmax: usize,
    channels: usize,
    config: NormConfig,
    norm_l0: LayerNormL0,
    /// `[lmax, C]`
    weight: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LayerNormL0 {
    Affine(LayerNorm),
    Plain(f64),
}

impl EquivariantLayerNormArraySphericalHarmonics {
    /// Parameters `norm_l0.weight/bias [C]` and `affine_weight [lmax, C]` if affine.
    pub fn new(lmax: usize, channels: usize, config: NormConfig, vb: VarBuilder) -> Result<Self> {
        let (norm_l0, weight) = if config.affine {
            (
                LayerNormL0::Affine(LayerNorm::new(channels, config.eps, vb.pp("norm_l0"))?),
                if lmax > 0 {
                    Some(vb.get_with_hints((lmax, channels), "affine_weight", Init::Const(1.0))?)
                } else {
                    None
                },
            )
        } else {
            (LayerNormL0::Plain(config.eps), None)
        };
        Ok(Self {
            lmax,
            channels,
            config,
            norm_l0,
            weight,
        })
    }

    /// `[N, (lmax+1)², C]` → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_embedding(x, self.lmax, self.channels)?;
        match self.forward_fused(x)? {
            Some(out) => Ok(out),
            None => self.forward_composed(x),
        }
    }

    /// [`Self::forward`] composed of differentiable candle ops.
    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let l0 = x.narrow(1, 0, 1)?;
        let l0 = match &self.norm_l0 {
            LayerNormL0::Affine(ln) => ln.forward(&l0)?,
            LayerNormL0::Plain(eps) => {
                let c = l0.broadcast_sub(&l0.mean_keepdim(2)?)?;
                c.broadcast_div(&(c.sqr()?.mean_keepdim(2)? + *eps)?.sqrt()?)?
            }
        };
        if self.lmax == 0 {
            return Ok(l0);
        }
        let k = (self.lmax + 1) * (self.lmax + 1);
        let rest = x.narrow(1, 1, k - 1)?;
        let balanced = self.config.std_balance_degrees
            && self.config.normalization == FeatureNormalization::Component;
        let size = squared_size(&rest, 1, self.lmax, self.config.normalization, balanced)?;
        let mut scale = inverse_rms(&size, self.config.eps)?; // [N, 1, 1]
        if let Some(w) = &self.weight {
            // per-row weights [1, k-1, C] from the per-degree [lmax, C]
            let rows: Vec<u32> = degree_of_rows(self.lmax)[1..]
                .iter()
                .map(|l| l - 1)
                .collect();
            let index = Tensor::from_vec(rows, k - 1, x.device())?;
            scale = scale.broadcast_mul(&w.index_select(&index, 0)?.unsqueeze(0)?)?;
        }
        let rest = rest.broadcast_mul(&scale)?;
        Ok(Tensor::cat(&[&l0, &rest], 1)?)
    }
}

impl EquivariantLayerNormArraySphericalHarmonics {
    /// [`Self::forward`] as one CPU op ([`LayerNormShOp`]) for the affine norm with `lmax > 0`
    /// in f32 / f64 and first-order gradients; `None` elsewhere (the composed ops run).
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (LayerNormL0::Affine(ln), Some(w)) = (&self.norm_l0, &self.weight) else {
            return Ok(None);
        };
        let device_ok = x.device().is_cpu() || (x.device().is_cuda() && cuda_op_enabled());
        if !device_ok
            || !matches!(x.dtype(), DType::F32 | DType::F64)
            || crate::higher_order_gradients_requested()
        {
            return Ok(None);
        }
        let (g0, b0, _) = ln.parts();
        let packed = Tensor::cat(&[g0, b0, &w.flatten_all()?], 0)?.to_dtype(x.dtype())?;
        let lmax = self.lmax;
        let row_coef: Vec<f64> = match (self.config.normalization, self.config.std_balance_degrees)
        {
            (FeatureNormalization::Norm, _) => vec![1.0; (lmax + 1) * (lmax + 1) - 1],
            (FeatureNormalization::Component, true) => balance_coefficients(1, lmax),
            (FeatureNormalization::Component, false) => {
                let rows = (lmax + 1) * (lmax + 1) - 1;
                vec![1.0 / rows as f64; rows]
            }
        };
        let op = LayerNormShOp {
            lmax,
            eps: self.config.eps,
            row_coef,
            weight_row: degree_of_rows(lmax)[1..]
                .iter()
                .map(|&l| l as usize - 1)
                .collect(),
        };
        Ok(Some(x.contiguous()?.apply_op2(&packed, op)?))
    }
}

/// `layer_norm_sh` as one CPU op: `(x [N, K, C], [γ₀ | β₀ | w [lmax, C]])` → `[N, K, C]`.
///
/// Per node: LayerNorm of the `l = 0` row over channels (`γ₀`, `β₀`); the other rows scaled by
/// `s = 1/√(m + eps)`, `m = mean_c Σ_r a_r x[r, c]²` (`a_r`: the row's weight in the shared
/// statistic: balanced by degree, a plain mean, or 1 for `norm`), and by `w[l(r) − 1, c]`.
/// Backward per node: `∂x[r, c] = s·w·g − (Σ x·w·g)·s³/C · a_r·x[r, c]`, `∂w[l − 1, c] +=
/// Σ_{r ∈ l} x·s·g`, the `l = 0` row through the LayerNorm kernel's backward. Parameter
/// gradients are summed over fixed node blocks, in order (deterministic).
#[derive(Debug, Clone)]
struct LayerNormShOp {
    lmax: usize,
    eps: f64,
    /// `a_r` for rows `1..K`.
    row_coef: Vec<f64>,
    /// Row of `w` (degree − 1) for rows `1..K`.
    weight_row: Vec<usize>,
}

/// Nodes per block of the parameter-gradient sums.
const NORM_SH_BLOCK: usize = 16;

impl LayerNormShOp {
    fn dims(
        &self,
        x: &candle_core::Layout,
        p: &candle_core::Layout,
    ) -> candle_core::Result<(usize, usize)> {
        let (_, k, c) = x.shape().dims3()?;
        if k != (self.lmax + 1) * (self.lmax + 1) || p.shape().elem_count() != (2 + self.lmax) * c {
            candle_core::bail!(
                "layer_norm_sh: x {:?} and parameters {:?} for lmax {}",
                x.shape(),
                p.shape(),
                self.lmax
            );
        }
        Ok((k, c))
    }

    /// The CUDA kernels' view of this op for rows of `k` × `c`.
    #[cfg(feature = "cuda")]
    fn cuda_shape(&self, k: usize, c: usize) -> crate::cuda::norm::NormSh<'_> {
        crate::cuda::norm::NormSh {
            k,
            c,
            eps: self.eps,
            row_coef: &self.row_coef,
            weight_row: &self.weight_row,
        }
    }

    /// The scale `s` of one node from its rows `1..K`.
    fn scale<T: Float>(&self, rest: &[T], c: usize) -> T {
        let mut m = T::ZERO;
        for (row, &a) in rest.chunks_exact(c).zip(&self.row_coef) {
            let mut acc = T::ZERO;
            for &v in row {
                acc += v * v;
            }
            m += T::from_f64(a) * acc;
        }
        let m = m / T::from_f64(c as f64);
        T::ONE / T::from_f64((m + T::from_f64(self.eps)).to_f64().sqrt())
    }

    fn forward<T: Float>(&self, x: &[T], p: &[T], (k, c): (usize, usize)) -> Vec<T> {
        let (g0, rest_p) = p.split_at(c);
        let (b0, w) = rest_p.split_at(c);
        let eps = T::from_f64(self.eps);
        let mut out = vec![T::ZERO; x.len()];
        out.par_chunks_mut(k * c)
            .zip(x.par_chunks(k * c))
            .for_each(|(o, xn)| {
                let (o0, orest) = o.split_at_mut(c);
                let (x0, xrest) = xn.split_at(c);
                forward_block(x0, g0, b0, eps, None, o0);
                let s = self.scale(xrest, c);
                for (r, (orow, xrow)) in orest
                    .chunks_exact_mut(c)
                    .zip(xrest.chunks_exact(c))
                    .enumerate()
                {
                    let i = self.weight_row[r];
                    let wl = &w[i * c..(i + 1) * c];
                    for ((o, &v), &wv) in orow.iter_mut().zip(xrow).zip(wl) {
                        *o = v * s * wv;
                    }
                }
            });
        out
    }

    /// `[dx | dγ₀ | dβ₀ | dw]`.
    fn backward<T: Float>(&self, x: &[T], g: &[T], p: &[T], (k, c): (usize, usize)) -> Vec<T> {
        let (g0, rest_p) = p.split_at(c);
        let (b0, w) = rest_p.split_at(c);
        let eps = T::from_f64(self.eps);
        let inv_c = T::ONE / T::from_f64(c as f64);
        let mut out = vec![T::ZERO; x.len() + p.len()];
        let (dx, dp_out) = out.split_at_mut(x.len());
        let partials: Vec<Vec<T>> = dx
            .par_chunks_mut(NORM_SH_BLOCK * k * c)
            .zip(x.par_chunks(NORM_SH_BLOCK * k * c))
            .zip(g.par_chunks(NORM_SH_BLOCK * k * c))
            .map(|((dxb, xb), gb)| {
                let mut acc = vec![T::ZERO; p.len()];
                let mut scratch = vec![T::ZERO; 2 * c];
                for ((dxn, xn), gn) in dxb
                    .chunks_exact_mut(k * c)
                    .zip(xb.chunks_exact(k * c))
                    .zip(gb.chunks_exact(k * c))
                {
                    let (dx0, dxrest) = dxn.split_at_mut(c);
                    let (x0, xrest) = xn.split_at(c);
                    let (gr0, grest) = gn.split_at(c);
                    let (acc0, accw) = acc.split_at_mut(2 * c);
                    let inputs = BlockInputs {
                        x: x0,
                        g: gr0,
                        w: g0,
                        b: b0,
                    };
                    backward_block(inputs, eps, None, dx0, acc0, &mut scratch);
                    let s = self.scale(xrest, c);
                    let mut ds = T::ZERO;
                    for (r, (xrow, grow)) in
                        xrest.chunks_exact(c).zip(grest.chunks_exact(c)).enumerate()
                    {
                        let i = self.weight_row[r];
                        let wl = &w[i * c..(i + 1) * c];
                        let dwl = &mut accw[i * c..(i + 1) * c];
                        for (((&v, &gv), &wv), dw) in xrow.iter().zip(grow).zip(wl).zip(dwl) {
                            ds += v * wv * gv;
                            *dw += v * s * gv;
                        }
                    }
                    let coef = ds * s * s * s * inv_c;
                    for (r, ((dxrow, xrow), grow)) in dxrest
                        .chunks_exact_mut(c)
                        .zip(xrest.chunks_exact(c))
                        .zip(grest.chunks_exact(c))
                        .enumerate()
                    {
                        let i = self.weight_row[r];
                        let wl = &w[i * c..(i + 1) * c];
                        let a = coef * T::from_f64(self.row_coef[r]);
                        for (((d, &v), &gv), &wv) in dxrow.iter_mut().zip(xrow).zip(grow).zip(wl) {
                            *d = s * wv * gv - a * v;
                        }
                    }
                }
                acc
            })
            .collect();
        for partial in &partials {
            for (o, &v) in dp_out.iter_mut().zip(partial) {
                *o += v;
            }
        }
        out
    }
}

/// Inputs `(x [N, K, C], parameters)`.
impl FloatKernel<2> for LayerNormShOp {
    fn run<T: Float>(
        &self,
        [(x, lx), (p, lp)]: [(&[T], &Layout); 2],
    ) -> candle_core::Result<Vec<T>> {
        Ok(self.forward(x, p, self.dims(lx, lp)?))
    }
}

impl candle_core::CustomOp2 for LayerNormShOp {
    fn name(&self) -> &'static str {
        "layer-norm-sh"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (k, c) = self.dims(l1, l2)?;
        let out = crate::cuda::norm::sh_forward((s1, l1), (s2, l2), self.cuda_shape(k, c))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let back = LayerNormShBackward { op: self.clone() };
        let flat = x.apply_op3_no_bwd(&grad_res.contiguous()?, p, &back)?;
        let n = x.elem_count();
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dp = flat.narrow(0, n, p.elem_count())?;
        Ok((Some(dx), Some(dp)))
    }
}

/// The backward of [`LayerNormShOp`]: `(x, ∂out, parameters)` → `[∂x | ∂parameters]`.
struct LayerNormShBackward {
    op: LayerNormShOp,
}

/// Inputs `(x [N, K, C], ∂out, parameters)`.
impl FloatKernel<3> for LayerNormShBackward {
    fn run<T: Float>(
        &self,
        [(x, lx), (g, lg), (p, lp)]: [(&[T], &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        let dims = self.dims(lx, lg, lp)?;
        Ok(self.op.backward(x, g, p, dims))
    }
}

impl LayerNormShBackward {
    /// `(K, C)` of the inputs, checking that `∂out` has `x`'s shape.
    fn dims(&self, lx: &Layout, lg: &Layout, lp: &Layout) -> candle_core::Result<(usize, usize)> {
        if lg.shape() != lx.shape() {
            candle_core::bail!(
                "layer-norm-sh-backward: gradient {:?} for x {:?}",
                lg.shape(),
                lx.shape()
            );
        }
        self.op.dims(lx, lp)
    }
}

impl candle_core::CustomOp3 for LayerNormShBackward {
    fn name(&self) -> &'static str {
        "layer-norm-sh-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let out = run_float(self.name(), [(s1, l1), (s2, l2), (s3, l3)], self)?;
        let len = l1.shape().elem_count() + l3.shape().elem_count();
        Ok((out, candle_core::Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (k, c) = self.dims(l1, l2, l3)?;
        let out = crate::cuda::norm::sh_backward(
            [(s1, l1), (s2, l2), (s3, l3)],
            self.op.cuda_shape(k, c),
        )?;
        let len = l1.shape().elem_count() + l3.shape().elem_count();
        Ok((out, candle_core::Shape::from(len)))
    }
}

/// fairchem `EquivariantRMSNormArraySphericalHarmonicsV2` (`"rms_norm_sh"`); see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct EquivariantRmsNormArraySphericalHarmonicsV2 {
    lmax: usize,
    channels: usize,
    config: NormConfig,
    /// `[lmax + 1, C]`
    weight: Option<Tensor>,
    /// `[C]`, only with `affine` and `centering`.
    bias: Option<Tensor>,
}

impl EquivariantRmsNormArraySphericalHarmonicsV2 {
    /// Parameters `affine_weight [lmax+1, C]` if affine, `affine_bias [C]` if also centering.
    ///
    /// # Errors
    /// `normalization = Norm` together with `std_balance_degrees` (fairchem asserts against it).
    pub fn new(lmax: usize, channels: usize, config: NormConfig, vb: VarBuilder) -> Result<Self> {
        if config.normalization == FeatureNormalization::Norm && config.std_balance_degrees {
            return Err(EquivariantError::InvalidArgument {
                name: "std_balance_degrees",
                reason: "rms_norm_sh with `norm` normalisation needs std_balance_degrees = false"
                    .into(),
            });
        }
        let weight = if config.affine {
            Some(vb.get_with_hints((lmax + 1, channels), "affine_weight", Init::Const(1.0))?)
        } else {
            None
        };
        let bias = if config.affine && config.centering {
            Some(vb.get_with_hints(channels, "affine_bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            lmax,
            channels,
            config,
            weight,
            bias,
        })
    }

    /// `[N, (lmax+1)², C]` → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_embedding(x, self.lmax, self.channels)?;
        let k = (self.lmax + 1) * (self.lmax + 1);
        let feature = if self.config.centering {
            let l0 = x.narrow(1, 0, 1)?;
            let l0 = l0.broadcast_sub(&l0.mean_keepdim(2)?)?;
            if k > 1 {
                Tensor::cat(&[&l0, &x.narrow(1, 1, k - 1)?], 1)?
            } else {
                l0
            }
        } else {
            x.clone()
        };
        let balanced = self.config.std_balance_degrees
            && self.config.normalization == FeatureNormalization::Component;
        let size = squared_size(&feature, 0, self.lmax, self.config.normalization, balanced)?;
        let mut scale = inverse_rms(&size, self.config.eps)?;
        if let Some(w) = &self.weight {
            let index = Tensor::from_vec(degree_of_rows(self.lmax), k, x.device())?;
            scale = scale.broadcast_mul(&w.index_select(&index, 0)?.unsqueeze(0)?)?;
        }
        let out = feature.broadcast_mul(&scale)?;
        match &self.bias {
            Some(b) if k > 1 => {
                let l0 = out.narrow(1, 0, 1)?.broadcast_add(b)?;
                Ok(Tensor::cat(&[&l0, &out.narrow(1, 1, k - 1)?], 1)?)
            }
            Some(b) => Ok(out.broadcast_add(b)?),
            None => Ok(out),
        }
    }
}

/// Any of the three normalisations, chosen by [`NormType`] (fairchem `get_normalization_layer`).
#[derive(Debug, Clone)]
pub enum EquivariantNorm {
    /// `"layer_norm"`.
    LayerNorm(EquivariantLayerNormArray),
    /// `"layer_norm_sh"`.
    LayerNormSh(EquivariantLayerNormArraySphericalHarmonics),
    /// `"rms_norm_sh"`.
    RmsNormSh(EquivariantRmsNormArraySphericalHarmonicsV2),
}

impl EquivariantNorm {
    /// Builds the normalisation `norm_type` for degrees `0..=lmax` and `channels` channels.
    pub fn new(
        norm_type: NormType,
        lmax: usize,
        channels: usize,
        config: NormConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(match norm_type {
            NormType::LayerNorm => {
                Self::LayerNorm(EquivariantLayerNormArray::new(lmax, channels, config, vb)?)
            }
            NormType::LayerNormSh => Self::LayerNormSh(
                EquivariantLayerNormArraySphericalHarmonics::new(lmax, channels, config, vb)?,
            ),
            NormType::RmsNormSh => Self::RmsNormSh(
                EquivariantRmsNormArraySphericalHarmonicsV2::new(lmax, channels, config, vb)?,
            ),
        })
    }

    /// `[N, (lmax+1)², C]` → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::LayerNorm(n) => n.forward(x),
            Self::LayerNormSh(n) => n.forward(x),
            Self::RmsNormSh(n) => n.forward(x),
        }
    }
}

/// fairchem `SO3_LinearV2`: one `C_in → C_out` matrix per degree, bias on `l = 0` only.
#[derive(Debug, Clone)]
pub struct So3LinearV2 {
    lmax: usize,
    in_features: usize,
    out_features: usize,
    /// `[lmax + 1, C_out, C_in]`
    weight: Tensor,
    /// `[C_out]`
    bias: Tensor,
    /// One-hot `[(lmax+1)², lmax+1]`: row `l² + j` has its 1 in column `l` (weight dtype).
    degree_of_coefficient: Tensor,
}

/// The one-hot `[(lmax+1)², lmax+1]` matrix mapping each coefficient to its degree.
fn degree_one_hot(lmax: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let l1 = lmax + 1;
    let mut one_hot = vec![0f32; l1 * l1 * l1];
    for l in 0..l1 {
        for j in l * l..(l + 1) * (l + 1) {
            one_hot[j * l1 + l] = 1.0;
        }
    }
    Ok(Tensor::from_vec(one_hot, (l1 * l1, l1), device)?.to_dtype(dtype)?)
}

impl So3LinearV2 {
    /// Parameters `weight [lmax+1, C_out, C_in]` (`U(±1/√C_in)`) and `bias [C_out]` (zeros).
    pub fn new(
        in_features: usize,
        out_features: usize,
        lmax: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if in_features == 0 || out_features == 0 {
            return Err(EquivariantError::InvalidArgument {
                name: "in_features",
                reason: format!(
                    "feature sizes must be positive, got {in_features} → {out_features}"
                ),
            });
        }
        let bound = 1.0 / (in_features as f64).sqrt();
        let weight = vb.get_with_hints(
            (lmax + 1, out_features, in_features),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = vb.get_with_hints(out_features, "bias", Init::Const(0.0))?;
        let degree_of_coefficient = degree_one_hot(lmax, weight.dtype(), weight.device())?;
        Ok(Self {
            lmax,
            in_features,
            out_features,
            weight,
            bias,
            degree_of_coefficient,
        })
    }

    /// Builds the layer from given tensors (`weight [lmax+1, C_out, C_in]`, `bias [C_out]`).
    pub fn from_tensors(weight: Tensor, bias: Tensor) -> Result<Self> {
        let (l1, out_features, in_features) =
            weight
                .dims3()
                .map_err(|_| EquivariantError::ShapeMismatch {
                    arg: "weight",
                    expected: "[lmax + 1, C_out, C_in]".into(),
                    found: weight.dims().to_vec(),
                })?;
        if l1 == 0 || bias.dims() != [out_features] {
            return Err(EquivariantError::ShapeMismatch {
                arg: "bias",
                expected: format!("[{out_features}] with lmax + 1 ≥ 1"),
                found: bias.dims().to_vec(),
            });
        }
        let degree_of_coefficient = degree_one_hot(l1 - 1, weight.dtype(), weight.device())?;
        Ok(Self {
            lmax: l1 - 1,
            in_features,
            out_features,
            weight,
            bias,
            degree_of_coefficient,
        })
    }

    /// `[N, (lmax+1)², C_in]` → `[N, (lmax+1)², C_out]`.
    ///
    /// On the CPU a matmul per degree; elsewhere one batched matmul over all coefficients
    /// (same values to rounding; about 12 autograd nodes at any lmax instead of 8 per degree).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            self.forward_per_degree(x)
        } else {
            self.forward_batched(x)
        }
    }

    /// A matmul per degree: narrow, copy, matmul, reshape (8 autograd nodes per degree), then
    /// one `cat`. The fastest form on the CPU, where the batched form's transposed copies
    /// cost more than the extra nodes.
    fn forward_per_degree(&self, x: &Tensor) -> Result<Tensor> {
        let n = check_embedding(x, self.lmax, self.in_features)?;
        let mut out = Vec::with_capacity(self.lmax + 1);
        for l in 0..=self.lmax {
            let rows = 2 * l + 1;
            let xl = x
                .narrow(1, l * l, rows)?
                .contiguous()?
                .reshape((n * rows, self.in_features))?;
            let wl = self.weight.get(l)?; // [C_out, C_in]
            let mut yl = xl.matmul(&wl.t()?)?;
            if l == 0 {
                yl = yl.broadcast_add(&self.bias)?;
            }
            out.push(yl.reshape((n, rows, self.out_features))?);
        }
        Ok(Tensor::cat(&out, 1)?)
    }

    /// One batched matmul over the `(lmax+1)²` coefficients, each with its degree's matrix
    /// (expanded from `weight` by a matmul with a one-hot `[(lmax+1)², lmax+1]` matrix, which
    /// copies the values exactly), then the `l = 0` bias: about a dozen autograd nodes
    /// whatever `lmax`, against `8 (lmax + 1) + 1` per degree. On a GPU each node is a kernel
    /// launch forward and backward (plus candle's gradient bookkeeping), and node-sized
    /// tensors (a few hundred atoms) make those launches, not the arithmetic, the cost.
    fn forward_batched(&self, x: &Tensor) -> Result<Tensor> {
        check_embedding(x, self.lmax, self.in_features)?;
        let (l1, c_in, c_out) = (self.lmax + 1, self.in_features, self.out_features);
        let k = l1 * l1;
        let (dtype, device) = (self.weight.dtype(), self.weight.device());
        // [K, C_out·C_in] → [K, C_in, C_out], contiguous (small) so that every backend's
        // batched matmul takes it as it is.
        let w = self
            .degree_of_coefficient
            .matmul(&self.weight.reshape((l1, c_out * c_in))?)?
            .reshape((k, c_out, c_in))?
            .transpose(1, 2)?
            .contiguous()?;
        // [K, N, C_in] · [K, C_in, C_out] → [K, N, C_out] → [N, K, C_out]
        let y = x
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&w)?
            .transpose(0, 1)?;
        let bias = Tensor::cat(
            &[
                self.bias.reshape((1, c_out))?,
                Tensor::zeros((k - 1, c_out), dtype, device)?,
            ],
            0,
        )?;
        // The broadcast add also makes the output contiguous in `[N, K, C_out]` order.
        Ok(y.broadcast_add(&bias)?)
    }
}

/// Whether `layer_norm_sh` runs as one op on a CUDA device ([`crate::switch::LAYER_NORM_SH`],
/// on unless `MATSCALE_LN_SH_CUDA=0`); always false without the `cuda` feature.
fn cuda_op_enabled() -> bool {
    cfg!(feature = "cuda") && crate::switch::LAYER_NORM_SH.enabled()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EquiformerV2's `layer_norm_sh` kernels (`kernels/norm.cu` `ln_sh_forward`,
    /// `ln_sh_backward_rows` + `ln_act_reduce`) run on the host (`crate::host_kernels`), against
    /// the CPU op; the largest difference relative to the largest CPU value.
    fn host_norm_sh_error<T: crate::activation::Float + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        (nodes, lmax, c, backward): (usize, usize, usize, bool),
        seed: u64,
    ) -> f64 {
        use crate::host_kernels::{bytes_of, floats_from};
        let k = (lmax + 1) * (lmax + 1);
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        let normals = |n: usize, s: u64| cast(crate::testing::random_normals(n, s));
        let op = LayerNormShOp {
            lmax,
            eps: 1e-5,
            row_coef: balance_coefficients(1, lmax),
            weight_row: degree_of_rows(lmax)[1..]
                .iter()
                .map(|&l| l as usize - 1)
                .collect(),
        };
        let (x, g, p) = (
            normals(nodes * k * c, seed),
            normals(nodes * k * c, seed + 1),
            normals((2 + lmax) * c, seed + 2),
        );
        let want = if backward {
            op.backward(&x, &g, &p, (k, c))
        } else {
            op.forward(&x, &p, (k, c))
        };
        let header = [
            std::mem::size_of::<T>() as i64,
            if backward { 4 } else { 3 },
            nodes as i64,
            c as i64,
            k as i64,
            -1,
            3, // nodes per warp
        ];
        let mut input = bytes_of(&header);
        input.extend(bytes_of(&[T::ZERO, T::from_f64(op.eps)]));
        input.extend(bytes_of(&x));
        if backward {
            input.extend(bytes_of(&g));
        }
        input.extend(bytes_of(&p));
        input.extend(bytes_of(&op.row_coef));
        let rows: Vec<i32> = op.weight_row.iter().map(|&r| r as i32).collect();
        input.extend(bytes_of(&rows));
        let tag = format!("sh-{}-{nodes}-{lmax}-{c}-{backward}", T::DTYPE.as_str());
        let got = floats_from(&driver.run(&tag, &input), std::mem::size_of::<T>());
        let want: Vec<f64> = want.iter().map(|v| v.to_f64()).collect();
        crate::host_kernels::max_relative_error(&tag, &got, &want)
    }

    /// The CUDA `layer_norm_sh` kernels, run on the host, agree with the CPU op, forward and
    /// backward (dx and the per-warp parameter-gradient partials), for channel counts below,
    /// at and above one warp; f64 to 1e-12 and f32 to 1e-5 of the largest value.
    #[test]
    fn cuda_layer_norm_sh_kernels_match_the_cpu_on_the_host() {
        let Some(driver) = crate::host_kernels::driver("norm_main") else {
            return;
        };
        let mut seed = 800;
        for (nodes, lmax, c) in [(7, 2, 6), (5, 4, 32), (4, 3, 45)] {
            for backward in [false, true] {
                seed += 3;
                let case = (nodes, lmax, c, backward);
                let e64 = host_norm_sh_error::<f64>(driver, case, seed);
                let e32 = host_norm_sh_error::<f32>(driver, case, seed);
                let what = format!("nodes {nodes} lmax {lmax} c {c} backward {backward}");
                assert!(e64 < 1e-12, "{what}: f64 error {e64:e}");
                assert!(e32 < 1e-5, "{what}: f32 error {e32:e}");
            }
        }
    }

    use crate::testing::{
        assert_close, assert_close_relative, check_gradient, random_rotation, random_tensor,
        Fixture,
    };
    use crate::wigner::wigner_d;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn to_c(e: EquivariantError) -> candle_core::Error {
        candle_core::Error::Msg(e.to_string())
    }

    /// The fused `layer_norm_sh` op equals the composed ops, values and the gradients of the
    /// input and of every parameter (f64 1e-12, f32 1e-5 relative), for each normalisation,
    /// balanced or not, over more nodes than one parameter-gradient block.
    #[test]
    fn fused_layer_norm_sh_equals_composed() -> Result<()> {
        let (n, lmax, c) = (NORM_SH_BLOCK * 2 + 5, 3, 6);
        let k = (lmax + 1) * (lmax + 1);
        for (normalization, balanced) in [
            (FeatureNormalization::Component, true),
            (FeatureNormalization::Component, false),
            (FeatureNormalization::Norm, false),
        ] {
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                let config = NormConfig {
                    normalization,
                    std_balance_degrees: balanced,
                    ..NormConfig::default()
                };
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
                let norm = EquivariantLayerNormArraySphericalHarmonics::new(lmax, c, config, vb)?;
                // Non-trivial affine parameters.
                for (i, var) in varmap.all_vars().iter().enumerate() {
                    var.set(&(random_tensor(var.dims(), dtype, 40 + i as u64)? + 1.0)?)?;
                }
                let x = candle_core::Var::from_tensor(&random_tensor(&[n, k, c], dtype, 50)?)?;
                let fused = norm.forward(x.as_tensor())?;
                let composed = norm.forward_composed(x.as_tensor())?;
                let close = |a: &Tensor, b: &Tensor, what: &str| {
                    let what = format!("{normalization:?} {balanced} {dtype:?} {what}");
                    assert_close_relative(a, b, tol, &what);
                };
                close(&fused, &composed, "value");
                let probe = random_tensor(&[n, k, c], dtype, 51)?;
                let gf = (&fused * &probe)?.sum_all()?.backward()?;
                let gc = (&composed * &probe)?.sum_all()?.backward()?;
                close(
                    gf.get(x.as_tensor()).unwrap(),
                    gc.get(x.as_tensor()).unwrap(),
                    "x",
                );
                let vars = varmap.data().lock().unwrap().clone();
                assert_eq!(vars.len(), 3);
                for (name, var) in &vars {
                    let t = var.as_tensor();
                    close(gf.get(t).unwrap(), gc.get(t).unwrap(), name);
                }
            }
        }
        Ok(())
    }

    /// Dense block-diagonal D(R) for degrees 0..=lmax, `[(lmax+1)², (lmax+1)²]`.
    fn dense_wigner(lmax: usize, seed: u64) -> Tensor {
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
        Tensor::from_vec(d, (k, k), &Device::Cpu).expect("tensor")
    }

    /// `D x` for `x [N, K, C]`.
    fn rotate(d: &Tensor, x: &Tensor) -> Tensor {
        let n = x.dim(0).expect("dims");
        d.unsqueeze(0)
            .and_then(|d| d.broadcast_as((n, d.dim(1)?, d.dim(2)?)))
            .and_then(|d| d.contiguous())
            .and_then(|d| d.matmul(x))
            .expect("rotate")
    }

    /// Random (non-trivial) parameters for every layer of `varmap`.
    fn randomise(varmap: &VarMap, seed: u64) {
        let data = varmap.data().lock().expect("lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for (i, name) in names.into_iter().enumerate() {
            let var = &data[name];
            let t = random_tensor(var.dims(), DType::F64, seed + i as u64).expect("random");
            var.set(&((t * 0.5).expect("scale") + 1.0).expect("shift"))
                .expect("set");
        }
    }

    fn all_norms(lmax: usize, c: usize) -> Vec<(String, EquivariantNorm, VarMap)> {
        let mut out = Vec::new();
        let configs = [
            ("default", NormConfig::default()),
            (
                "unbalanced",
                NormConfig {
                    std_balance_degrees: false,
                    centering: false,
                    ..NormConfig::default()
                },
            ),
            (
                "norm",
                NormConfig {
                    normalization: FeatureNormalization::Norm,
                    std_balance_degrees: false,
                    ..NormConfig::default()
                },
            ),
        ];
        for (name, config) in configs {
            for ty in [
                NormType::LayerNorm,
                NormType::LayerNormSh,
                NormType::RmsNormSh,
            ] {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
                let norm = EquivariantNorm::new(ty, lmax, c, config, vb).expect("norm");
                randomise(&varmap, 11);
                out.push((format!("{ty:?}/{name}"), norm, varmap));
            }
        }
        out
    }

    #[test]
    fn norms_and_linear_commute_with_rotations() -> Result<()> {
        let (lmax, c, n) = (4, 6, 5);
        let x = random_tensor(&[n, 25, c], DType::F64, 1)?;
        for seed in 0..3 {
            let d = dense_wigner(lmax, seed);
            let dx = rotate(&d, &x);
            for (name, norm, _) in all_norms(lmax, c) {
                let lhs = norm.forward(&dx)?;
                let rhs = rotate(&d, &norm.forward(&x)?);
                let err = (lhs - rhs)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-10, "{name}: equivariance error {err:e}");
            }
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            let lin = So3LinearV2::new(c, 3, lmax, vb)?;
            randomise(&varmap, 5);
            let err = (lin.forward(&dx)? - rotate(&d, &lin.forward(&x)?))?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(err < 1e-10, "SO3_LinearV2 equivariance error {err:e}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (lmax, c, n) = (2, 4, 3);
        let x = random_tensor(&[n, 9, c], DType::F64, 2)?;
        for (name, norm, _) in all_norms(lmax, c) {
            let check = check_gradient(|t| norm.forward(t).map_err(to_c), &x, 1e-6)?;
            assert!(check.max_rel < 1e-7, "{name}: {check:?}");
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let lin = So3LinearV2::new(c, 3, lmax, vb)?;
        check_gradient(|t| lin.forward(t).map_err(to_c), &x, 1e-6)?.assert_within(1e-8);
        Ok(())
    }

    /// The batched form (used off the CPU) equals the per-degree form: values and the
    /// gradients of the input, weight and bias, f64 to 1e-12 and f32 to 1e-5 relative, for
    /// lmax 0 (bias only on the single row), 3 and 6; a non-contiguous input works.
    #[test]
    fn so3_linear_batched_equals_per_degree() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (lmax, cin, cout, n) in [(0, 3, 2, 4), (3, 5, 7, 6), (6, 4, 3, 3)] {
                let k = (lmax + 1) * (lmax + 1);
                let w = candle_core::Var::from_tensor(&random_tensor(
                    &[lmax + 1, cout, cin],
                    dtype,
                    11,
                )?)?;
                let b = candle_core::Var::from_tensor(&random_tensor(&[cout], dtype, 12)?)?;
                let lin = So3LinearV2::from_tensors(w.as_tensor().clone(), b.as_tensor().clone())?;
                // [N, K, C_in] as a transposed view of [N, C_in, K].
                let x = candle_core::Var::from_tensor(&random_tensor(&[n, cin, k], dtype, 13)?)?;
                let xt = x.as_tensor().transpose(1, 2)?;
                let probe = random_tensor(&[n, k, cout], dtype, 14)?;
                let batched = lin.forward_batched(&xt)?;
                let per_degree = lin.forward_per_degree(&xt)?;
                let what = format!("{dtype:?} lmax {lmax}");
                assert_close_relative(&batched, &per_degree, tol, &what);
                let g1 = (&batched * &probe)?.sum_all()?.backward()?;
                let g2 = (&per_degree * &probe)?.sum_all()?.backward()?;
                for (t, name) in [
                    (x.as_tensor(), "x"),
                    (w.as_tensor(), "w"),
                    (b.as_tensor(), "b"),
                ] {
                    let (a, c) = (g1.get(t), g2.get(t));
                    let (Some(a), Some(c)) = (a, c) else {
                        panic!("{what}: no gradient for {name}");
                    };
                    assert_close_relative(a, c, tol, &format!("{what} d{name}"));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn so3_linear_matches_its_definition() -> Result<()> {
        let (lmax, cin, cout, n) = (2, 3, 2, 2);
        let w = random_tensor(&[lmax + 1, cout, cin], DType::F64, 3)?;
        let b = random_tensor(&[cout], DType::F64, 4)?;
        let lin = So3LinearV2::from_tensors(w.clone(), b.clone())?;
        let x = random_tensor(&[n, 9, cin], DType::F64, 5)?;
        let y: Vec<f64> = lin.forward(&x)?.flatten_all()?.to_vec1()?;
        let (wv, bv, xv): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            w.flatten_all()?.to_vec1()?,
            b.to_vec1()?,
            x.flatten_all()?.to_vec1()?,
        );
        let deg = degree_of_rows(lmax);
        for i in 0..n {
            for r in 0..9 {
                let l = deg[r] as usize;
                for o in 0..cout {
                    let mut v: f64 = (0..cin)
                        .map(|c| wv[(l * cout + o) * cin + c] * xv[(i * 9 + r) * cin + c])
                        .sum();
                    if r == 0 {
                        v += bv[o];
                    }
                    assert!((y[(i * 9 + r) * cout + o] - v).abs() < 1e-14);
                }
            }
        }
        Ok(())
    }

    /// Golden values from `tests/data/equivariant/norms_fairchem.py` (formulas of fairchem
    /// 1.x layer_norm.py / so3.py re-implemented in PyTorch).
    #[test]
    fn norms_match_pytorch_golden_values() -> Result<()> {
        let fx = Fixture::open("norms_golden");
        let (xs, xv) = fx.array("x");
        let x = Tensor::from_slice(xv, xs.as_slice(), &Device::Cpu)?;
        let (lmax, c) = (((xs[1] as f64).sqrt() as usize) - 1, xs[2]);
        let load = |name: &str| {
            let (s, v) = fx.array(name);
            Tensor::from_slice(v, s.as_slice(), &Device::Cpu).expect("tensor")
        };
        let cases = [
            ("layer_norm", NormType::LayerNorm),
            ("layer_norm_sh", NormType::LayerNormSh),
            ("rms_norm_sh", NormType::RmsNormSh),
        ];
        for (name, ty) in cases {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            let norm = EquivariantNorm::new(ty, lmax, c, NormConfig::default(), vb)?;
            {
                let data = varmap.data().lock().expect("lock");
                for (param, var) in data.iter() {
                    var.set(&load(&format!("{name}.{param}")))?;
                }
            }
            let y = norm.forward(&x)?;
            assert_close(&y, &load(&format!("{name}.out")), 1e-12);
        }
        let lin = So3LinearV2::from_tensors(load("so3_linear.weight"), load("so3_linear.bias"))?;
        assert_close(&lin.forward(&x)?, &load("so3_linear.out"), 1e-12);
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_argument() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let norm = EquivariantNorm::new(
            NormType::LayerNormSh,
            2,
            4,
            NormConfig::default(),
            vb.pp("a"),
        )?;
        let bad = Tensor::zeros((2, 8, 4), DType::F32, &Device::Cpu)?;
        let err = norm.forward(&bad).unwrap_err();
        assert!(
            err.to_string().contains("`x`") && err.to_string().contains("[N, 9, 4]"),
            "{err}"
        );
        let bad_cfg = NormConfig {
            normalization: FeatureNormalization::Norm,
            ..NormConfig::default()
        };
        assert!(EquivariantNorm::new(NormType::RmsNormSh, 2, 4, bad_cfg, vb.pp("b")).is_err());
        assert!("rms_norm".parse::<NormType>().is_err());
        Ok(())
    }
}
