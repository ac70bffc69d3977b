//! LayerNorm over the last dimension fused with a pointwise activation, as one candle op.
//!
//! `y = act((x − mean) / √(var + eps) · weight + bias)` per row (biased variance), the
//! `Linear → LayerNorm → SiLU` step of EquiformerV2's radial MLPs (fairchem `RadialFunction`).
//! Composed from candle ops ([`LayerNorm::forward`](crate::norms::LayerNorm::forward) then the
//! activation) this is about a dozen row-sized tensors in the autograd graph, each of which
//! candle's backward pass zero-fills and accumulates into; here it is one node whose backward is
//! one pass over the rows:
//!
//! ```text
//! n = (x − μ) · r,  r = 1/√(σ² + eps),  y = n w + b,  dy = g · act'(y)
//! dx = r · (dy w − mean(dy w) − n · mean(dy w · n)),  dw = Σ_rows dy n,  db = Σ_rows dy
//! ```
//!
//! The weight and bias gradients are summed over fixed row blocks and the block sums added in
//! order, so results do not depend on the number of threads.
//!
//! The CPU kernel serves f32 and f64. Elsewhere (CUDA, half precision), and whenever
//! higher-order gradients are requested (`CANDLE_GRAD_DO_NOT_DETACH` set, as
//! `matscale_models::enable_higher_order_gradients` does), [`layer_norm_act`] composes the same
//! function from differentiable candle ops instead, because the fused backward is first order.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use matscale_equivariant::activation::Function;
//! use matscale_equivariant::norm_act::layer_norm_act;
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 6.0]], &dev)?;
//! let (w, b) = (Tensor::ones(4, x.dtype(), &dev)?, Tensor::zeros(4, x.dtype(), &dev)?);
//! let y: Vec<f64> = layer_norm_act(&x, &w, &b, 1e-5, None)?.flatten_all()?.to_vec1()?;
//! assert!(y.iter().sum::<f64>().abs() < 1e-12); // zero mean
//! let silu = layer_norm_act(&x, &w, &b, 1e-5, Some(Function::Silu))?;
//! assert_eq!(silu.dims(), &[1, 4]);
//! # Ok(())
//! # }
//! ```

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::activation::{dispatch_float, Elementwise, Float, Function};
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};

/// Rows per block of the weight-gradient sums (fixed, so the summation order is too).
const ROWS_PER_BLOCK: usize = 256;

/// `act(LayerNorm(x) · weight + bias)` over the last dimension of `x` (`weight`, `bias`: that
/// dimension's size); `act = None` is the plain affine LayerNorm. Differentiable in all three
/// inputs; see the [module docs](self) for when the fused kernel runs.
pub fn layer_norm_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    act: Option<Function>,
) -> Result<Tensor> {
    check_affine(x, weight, bias)?;
    if !fused_applies(x) {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(weight)?
            .broadcast_add(bias)?;
        return Ok(match act {
            None => y,
            Some(function) => y.apply_op1(Elementwise { function, order: 0 })?,
        });
    }
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormAct { eps, act },
    )?)
}

/// Checks that `weight` and `bias` are `[A]` for `x` `[.., A]`, of `x`'s dtype.
fn check_affine(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let a = x.dim(D::Minus1)?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [a] || t.dtype() != x.dtype() {
            return Err(EquivariantError::ShapeMismatch {
                arg: name,
                expected: format!("[{a}] with the dtype of `x`"),
                found: t.dims().to_vec(),
            });
        }
    }
    Ok(())
}

/// Whether the fused CPU kernels apply to `x` (see the [module docs](self)).
fn fused_applies(x: &Tensor) -> bool {
    (x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda()))
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && !crate::higher_order_gradients_requested()
}

/// The fused op (args `x`, `weight`, `bias`).
#[derive(Debug, Clone, Copy)]
struct LayerNormAct {
    eps: f64,
    act: Option<Function>,
}

impl LayerNormAct {
    /// The kernels' parameters for rows of `width` values.
    #[cfg(feature = "cuda")]
    fn cuda_params(&self, width: usize) -> crate::cuda::norm::NormAct {
        crate::cuda::norm::NormAct {
            width,
            act: self.act,
            eps: self.eps,
        }
    }
}

/// Independent partial sums in [`lane_sum_by`]: reductions in one chain cannot vectorise
/// (float addition is not reassociated), sixteen chains do.
const LANES: usize = 16;

/// `Σ_i f(a[i], b[i])` over equal-length slices, in [`LANES`] interleaved partial sums.
#[inline(always)]
fn lane_sum_by<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (ca, cb) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l]);
        }
    }
    let mut total = T::ZERO;
    for (&x, &y) in at.iter().zip(bt) {
        total += f(x, y);
    }
    acc.iter().fold(total, |t, &v| t + v)
}

/// `(mean, 1/√(var + eps))` of one row.
#[inline(always)]
fn row_stats<T: Float>(row: &[T], eps: T) -> (T, T) {
    let inv = T::ONE / T::from_f64(row.len() as f64);
    let mean = lane_sum_by(row, row, |v, _| v) * inv;
    let var = lane_sum_by(row, row, |v, _| (v - mean) * (v - mean)) * inv;
    (mean, T::ONE / T::from_f64((var + eps).to_f64().sqrt()))
}

dispatch_float! {
    /// Forward of one block of rows of width `w.len()`.
    pub(crate) fn forward_block(x: &[T], w: &[T], b: &[T], eps: T, act: Option<Function>, out: &mut [T]) {
        let a = w.len();
        for (o, row) in out.chunks_mut(a).zip(x.chunks(a)) {
            let (mean, r) = row_stats(row, eps);
            for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                *o = (v - mean) * r * w + b;
            }
            match act {
                None => {}
                Some(Function::Silu) => T::silu_in_place(o),
                Some(Function::SmoothLeakyRelu(slope)) => {
                    let (ca, cb) = smooth_leaky_relu_coefficients::<T>(slope);
                    for v in o.iter_mut() {
                        let t = (T::ONE + T::ONE) * v.sigmoid() - T::ONE;
                        *v = ca * *v + cb * *v * t;
                    }
                }
                Some(f) => o.iter_mut().for_each(|v| *v = f.eval(0, *v)),
            }
        }
    }
}

/// `(a, b)` of fairchem's smooth leaky ReLU `f(x) = a x + b x tanh(x/2)`:
/// `a = (1 + slope)/2`, `b = (1 − slope)/2` (see [`Function::SmoothLeakyRelu`]).
#[inline(always)]
fn smooth_leaky_relu_coefficients<T: Float>(slope: f64) -> (T, T) {
    (
        T::from_f64((1.0 + slope) / 2.0),
        T::from_f64((1.0 - slope) / 2.0),
    )
}

fn forward_kernel<T: Float>(x: &[T], w: &[T], b: &[T], op: LayerNormAct) -> Vec<T> {
    let a = w.len();
    let eps = T::from_f64(op.eps);
    let mut out = crate::buffer::zeroed_vec::<T>(x.len());
    if a == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_BLOCK * a)
        .zip(x.par_chunks(ROWS_PER_BLOCK * a))
        .for_each(|(out, x)| forward_block(x, w, b, eps, op.act, out));
    out
}

/// The read-only inputs of one backward block: rows `x`, their output gradient `g`, the
/// affine weight `w` and bias `b`.
#[derive(Clone, Copy)]
pub(crate) struct BlockInputs<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) g: &'a [T],
    pub(crate) w: &'a [T],
    pub(crate) b: &'a [T],
}

dispatch_float! {
    /// Backward of one block of rows: writes `dx`, adds the block's `[dw | db]` to `acc`;
    /// `scratch` holds two rows.
    pub(crate) fn backward_block(
        inputs: BlockInputs<'_, T>,
        eps: T,
        act: Option<Function>,
        dx: &mut [T],
        acc: &mut [T],
        scratch: &mut [T]
    ) {
        let BlockInputs { x, g, w, b } = inputs;
        let a = w.len();
        let (n, dn) = scratch.split_at_mut(a);
        let inv_a = T::ONE / T::from_f64(a as f64);
        for ((dx, row), g) in dx.chunks_mut(a).zip(x.chunks(a)).zip(g.chunks(a)) {
            let (mean, r) = row_stats(row, eps);
            for (nj, &v) in n.iter_mut().zip(row) {
                *nj = (v - mean) * r;
            }
            // dn ← ∂loss/∂(normalised · w + b), the gradient through the activation; the
            // SiLU derivative runs over the whole row in the vectorised slice loop.
            match act {
                None => dn.copy_from_slice(g),
                Some(Function::Silu) => {
                    for ((d, &nj), (&wj, &bj)) in dn.iter_mut().zip(&*n).zip(w.iter().zip(b)) {
                        *d = nj * wj + bj;
                    }
                    T::silu_backward_in_place(dn, g);
                }
                Some(Function::SmoothLeakyRelu(slope)) => {
                    let (ca, cb) = smooth_leaky_relu_coefficients::<T>(slope);
                    let (one, two) = (T::ONE, T::ONE + T::ONE);
                    for (((d, &nj), (&wj, &bj)), &gj) in
                        dn.iter_mut().zip(&*n).zip(w.iter().zip(b)).zip(g)
                    {
                        let y = nj * wj + bj;
                        let t = two * y.sigmoid() - one;
                        *d = gj * (ca + cb * t + cb * y * (one - t * t) / two);
                    }
                }
                Some(f) => {
                    for (j, d) in dn.iter_mut().enumerate() {
                        *d = g[j] * f.eval(1, n[j] * w[j] + b[j]);
                    }
                }
            }
            let (dw, db) = acc.split_at_mut(a);
            for j in 0..a {
                dw[j] += dn[j] * n[j];
                db[j] += dn[j];
                dn[j] *= w[j];
            }
            let mean_dn = lane_sum_by(dn, dn, |d, _| d) * inv_a;
            let mean_dn_n = lane_sum_by(dn, n, |d, nj| d * nj) * inv_a;
            for j in 0..a {
                dx[j] = r * (dn[j] - mean_dn - n[j] * mean_dn_n);
            }
        }
    }
}

/// `[dx (rows·A) | dw (A) | db (A)]`.
fn backward_kernel<T: Float>(x: &[T], w: &[T], b: &[T], g: &[T], op: LayerNormAct) -> Vec<T> {
    let a = w.len();
    let eps = T::from_f64(op.eps);
    let mut out = crate::buffer::zeroed_vec::<T>(x.len() + 2 * a);
    if a == 0 {
        return out;
    }
    let (dx, dwb) = out.split_at_mut(x.len());
    // One `[dw | db]` partial per fixed block of rows, summed in block order: deterministic.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(ROWS_PER_BLOCK * a)
        .zip(x.par_chunks(ROWS_PER_BLOCK * a))
        .zip(g.par_chunks(ROWS_PER_BLOCK * a))
        .map(|((dx, x), g)| {
            let (mut acc, mut scratch) = (vec![T::ZERO; 2 * a], vec![T::ZERO; 2 * a]);
            let inputs = BlockInputs { x, g, w, b };
            backward_block(inputs, eps, op.act, dx, &mut acc, &mut scratch);
            acc
        })
        .collect();
    for p in partials {
        for (d, v) in dwb.iter_mut().zip(p) {
            *d += v;
        }
    }
    out
}

impl FloatKernel<3> for LayerNormAct {
    fn run<T: Float>(
        &self,
        [(x, _), (w, _), (b, _)]: [(&[T], &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        Ok(forward_kernel(x, w, b, *self))
    }
}

impl CustomOp3 for LayerNormAct {
    fn name(&self) -> &'static str {
        "layer-norm-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run_float(self.name(), [(s1, l1), (s2, l2), (s3, l3)], self)?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let p = self.cuda_params(l2.shape().elem_count());
        let out = crate::cuda::norm::forward([(s1, l1), (s2, l2), (s3, l3)], p, 0)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let a = weight.elem_count();
        let wb = Tensor::cat(&[weight, bias], 0)?;
        let back = LayerNormActBackward { op: *self };
        let flat = x.apply_op3_no_bwd(&grad_res.contiguous()?, &wb, &back)?;
        let n = x.elem_count();
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = flat.narrow(0, n, a)?;
        let db = flat.narrow(0, n + a, a)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward kernel as an op of (`x`, `grad`, `[weight ‖ bias]`) returning the flat
/// `[dx | dw | db]`.
#[derive(Debug, Clone, Copy)]
struct LayerNormActBackward {
    op: LayerNormAct,
}

/// Inputs `(x, grad, [weight ‖ bias])`.
impl FloatKernel<3> for LayerNormActBackward {
    fn run<T: Float>(
        &self,
        [(x, _), (g, _), (wb, _)]: [(&[T], &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        let (w, b) = wb.split_at(wb.len() / 2);
        Ok(backward_kernel(x, w, b, g, self.op))
    }
}

impl CustomOp3 for LayerNormActBackward {
    fn name(&self) -> &'static str {
        "layer-norm-act-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let len = l1.shape().elem_count() + l3.shape().elem_count();
        let out = run_float(self.name(), [(s1, l1), (s2, l2), (s3, l3)], self)?;
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let len = l1.shape().elem_count() + l3.shape().elem_count();
        let p = self.op.cuda_params(l3.shape().elem_count() / 2);
        let out = crate::cuda::norm::backward([(s1, l1), (s2, l2), (s3, l3)], p, 0)?;
        Ok((out, Shape::from(len)))
    }
}

/// `Σ_a act(LayerNorm(x) · weight + bias)[.., h, a] · dot[h, a]`: LayerNorm over the last
/// dimension of `x` (`[.., H, A]`), the activation, then one dot product per row with the
/// row's `dot[h]` (`dot`: `[H, A]`), giving `[.., H]`. EquiformerV2's attention logits
/// (fairchem: `alpha_norm`, `SmoothLeakyReLU`, `einsum("bik, ik -> bi", ·, alpha_dot)`).
///
/// Fused on the CPU like [`layer_norm_act`] (one node, no `[.., H, A]` intermediate in the
/// autograd graph: the backward pass recomputes the activations of a block of rows in
/// scratch); composed of differentiable candle ops elsewhere and for higher-order gradients.
pub fn layer_norm_act_dot(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    act: Option<Function>,
    dot: &Tensor,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || dot.dims() != &dims[dims.len() - 2..] || dot.dtype() != x.dtype() {
        return Err(EquivariantError::ShapeMismatch {
            arg: "dot",
            expected: "[H, A] for x of shape [.., H, A], with the dtype of `x`".into(),
            found: dot.dims().to_vec(),
        });
    }
    if !fused_applies(x) {
        let y = layer_norm_act(x, weight, bias, eps, act)?;
        return Ok(y.broadcast_mul(dot)?.sum(D::Minus1)?);
    }
    check_affine(x, weight, bias)?;
    let wb = Tensor::cat(&[weight, bias], 0)?;
    Ok(x.contiguous()?.apply_op3(
        &wb,
        &dot.contiguous()?,
        LayerNormActDot {
            op: LayerNormAct { eps, act },
        },
    )?)
}

/// The fused op of [`layer_norm_act_dot`] (args `x`, `[weight ‖ bias]`, `dot`).
#[derive(Debug, Clone, Copy)]
struct LayerNormActDot {
    op: LayerNormAct,
}

/// `(A, H)` of the dot op's inputs, checked.
fn dot_dims(
    x: &Layout,
    wb: &Layout,
    dot: &Layout,
    name: &str,
) -> candle_core::Result<(usize, usize)> {
    let a = wb.shape().elem_count() / 2;
    let dd = dot.shape().dims();
    let xd = x.shape().dims();
    if dd.len() != 2 || xd.len() < 2 || dd != &xd[xd.len() - 2..] || dd[1] != a {
        candle_core::bail!(
            "{name}: x {:?}, weight+bias {:?}, dot {:?}",
            xd,
            wb.shape(),
            dd
        );
    }
    Ok((a, dd[0]))
}

fn dot_forward_kernel<T: Float>(x: &[T], w: &[T], b: &[T], dot: &[T], op: LayerNormAct) -> Vec<T> {
    let a = w.len();
    let eps = T::from_f64(op.eps);
    let rows = x.len().checked_div(a).unwrap_or(0);
    let h = dot.len().checked_div(a).unwrap_or(0);
    let mut out = vec![T::ZERO; rows];
    if a == 0 || h == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_BLOCK)
        .zip(x.par_chunks(ROWS_PER_BLOCK * a))
        .enumerate()
        .for_each_init(
            || vec![T::ZERO; ROWS_PER_BLOCK * a],
            |y, (block, (out, x))| {
                let y = &mut y[..x.len()];
                forward_block(x, w, b, eps, op.act, y);
                for (i, (o, yr)) in out.iter_mut().zip(y.chunks(a)).enumerate() {
                    let head = (block * ROWS_PER_BLOCK + i) % h;
                    *o = lane_sum_by(yr, &dot[head * a..(head + 1) * a], |u, v| u * v);
                }
            },
        );
    out
}

/// `[dx (rows·A) | dw (A) | db (A) | ddot (H·A)]` from the output gradient `g` (`rows`).
fn dot_backward_kernel<T: Float>(
    x: &[T],
    (w, b, dot): (&[T], &[T], &[T]),
    g: &[T],
    op: LayerNormAct,
) -> Vec<T> {
    let a = w.len();
    let eps = T::from_f64(op.eps);
    let h = dot.len().checked_div(a).unwrap_or(0);
    let mut out = crate::buffer::zeroed_vec::<T>(x.len() + 2 * a + h * a);
    if a == 0 || h == 0 {
        return out;
    }
    let (dx, acc_out) = out.split_at_mut(x.len());
    // One `[dw | db | ddot]` partial per fixed block of rows, summed in block order.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(ROWS_PER_BLOCK * a)
        .zip(x.par_chunks(ROWS_PER_BLOCK * a))
        .zip(g.par_chunks(ROWS_PER_BLOCK))
        .enumerate()
        .map(|(block, ((dx, x), g))| {
            let mut acc = vec![T::ZERO; 2 * a + h * a];
            let (mut y, mut scratch) = (vec![T::ZERO; x.len()], vec![T::ZERO; 2 * a]);
            // Recompute the activations, then ∂y = g · dot[h] (into y) and ∂dot += g · y.
            forward_block(x, w, b, eps, op.act, &mut y);
            let ddot = &mut acc[2 * a..];
            for (i, (yr, &gi)) in y.chunks_mut(a).zip(g).enumerate() {
                let head = (block * ROWS_PER_BLOCK + i) % h;
                let (dd, dr) = (
                    &mut ddot[head * a..(head + 1) * a],
                    &dot[head * a..(head + 1) * a],
                );
                for ((yv, d), &dv) in yr.iter_mut().zip(dd).zip(dr) {
                    *d += gi * *yv;
                    *yv = gi * dv;
                }
            }
            let inputs = BlockInputs { x, g: &y, w, b };
            backward_block(inputs, eps, op.act, dx, &mut acc[..2 * a], &mut scratch);
            acc
        })
        .collect();
    for p in partials {
        for (d, v) in acc_out.iter_mut().zip(p) {
            *d += v;
        }
    }
    out
}

/// Inputs `(x, [weight ‖ bias], dot)`.
impl FloatKernel<3> for LayerNormActDot {
    fn run<T: Float>(
        &self,
        [(x, _), (wb, _), (dot, _)]: [(&[T], &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        let (w, b) = wb.split_at(wb.len() / 2);
        Ok(dot_forward_kernel(x, w, b, dot, self.op))
    }
}

impl CustomOp3 for LayerNormActDot {
    fn name(&self) -> &'static str {
        "layer-norm-act-dot"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dot_dims(l1, l2, l3, self.name())?;
        let out = run_float(self.name(), [(s1, l1), (s2, l2), (s3, l3)], self)?;
        let dims = l1.shape().dims();
        Ok((out, Shape::from(&dims[..dims.len() - 1])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (a, heads) = dot_dims(l1, l2, l3, self.name())?;
        let out = crate::cuda::norm::forward(
            [(s1, l1), (s2, l2), (s3, l3)],
            self.op.cuda_params(a),
            heads,
        )?;
        let dims = l1.shape().dims();
        Ok((out, Shape::from(&dims[..dims.len() - 1])))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        dot: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = Tensor::cat(&[wb, &dot.flatten_all()?], 0)?;
        let back = LayerNormActDotBackward {
            op: self.op,
            heads: dot.dim(0)?,
        };
        let flat = x.apply_op3_no_bwd(&grad_res.contiguous()?, &packed, &back)?;
        let (n, lw, ld) = (x.elem_count(), wb.elem_count(), dot.elem_count());
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dwb = flat.narrow(0, n, lw)?;
        let ddot = flat.narrow(0, n + lw, ld)?.reshape(dot.shape())?;
        Ok((Some(dx), Some(dwb), Some(ddot)))
    }
}

/// The backward kernel of [`LayerNormActDot`] as an op of (`x`, `grad`,
/// `[weight ‖ bias ‖ dot]`) returning the flat `[dx | dw | db | ddot]`.
#[derive(Debug, Clone, Copy)]
struct LayerNormActDotBackward {
    op: LayerNormAct,
    heads: usize,
}

/// Inputs `(x, grad, [weight ‖ bias ‖ dot])`.
impl FloatKernel<3> for LayerNormActDotBackward {
    fn run<T: Float>(
        &self,
        [(x, _), (g, _), (packed, _)]: [(&[T], &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        let a = packed.len() / (2 + self.heads);
        let (w, rest) = packed.split_at(a);
        let (b, dot) = rest.split_at(a);
        Ok(dot_backward_kernel(x, (w, b, dot), g, self.op))
    }
}

impl CustomOp3 for LayerNormActDotBackward {
    fn name(&self) -> &'static str {
        "layer-norm-act-dot-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let a = l3.shape().elem_count() / (2 + self.heads);
        let rows = l1.shape().elem_count().checked_div(a).unwrap_or(0);
        if l2.shape().elem_count() != rows {
            candle_core::bail!("{name}: gradient {:?} for x {:?}", l2.shape(), l1.shape());
        }
        let len = l1.shape().elem_count() + l3.shape().elem_count();
        let out = run_float(name, [(s1, l1), (s2, l2), (s3, l3)], self)?;
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let a = l3.shape().elem_count() / (2 + self.heads);
        let rows = l1.shape().elem_count().checked_div(a).unwrap_or(0);
        if l2.shape().elem_count() != rows {
            candle_core::bail!(
                "{}: gradient {:?} for x {:?}",
                self.name(),
                l2.shape(),
                l1.shape()
            );
        }
        let len = l1.shape().elem_count() + l3.shape().elem_count();
        let p = self.op.cuda_params(a);
        let out = crate::cuda::norm::backward([(s1, l1), (s2, l2), (s3, l3)], p, self.heads)?;
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::norms::LayerNorm;
    use crate::testing::{
        assert_close_relative, assert_close_slice, check_gradient, random_tensor,
    };
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// The activation code and slope the CUDA kernels take (`cuda/norm.rs` `act_code`).
    fn act_code(act: Option<Function>) -> (i64, f64) {
        match act {
            None => (-1, 0.0),
            Some(Function::Silu) => (0, 0.0),
            Some(Function::Sigmoid) => (1, 0.0),
            Some(Function::SmoothLeakyRelu(slope)) => (2, slope),
        }
    }

    /// One launch of the CUDA LayerNorm-activation kernels (`kernels/norm.cu`) on the host
    /// (`crate::host_kernels`) against the CPU kernel of the same mode (0 forward, 1 dot
    /// forward, 2 backward with `heads` = 0 plain or > 0 dot); the largest difference relative
    /// to the largest CPU value.
    fn host_norm_error<T: Float + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        (mode, rows, a, heads): (i64, usize, usize, usize),
        act: Option<Function>,
        seed: u64,
    ) -> f64 {
        use crate::host_kernels::{bytes_of, floats_from};
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        let normals = |n: usize, s: u64| cast(crate::testing::random_normals(n, s));
        let op = LayerNormAct { eps: 1e-5, act };
        let (code, slope) = act_code(act);
        let x = normals(rows * a, seed);
        let (w, b) = (normals(a, seed + 1), normals(a, seed + 2));
        let dot = normals(heads * a, seed + 3);
        let rows_per_warp = 3;
        let header = [
            std::mem::size_of::<T>() as i64,
            mode,
            rows as i64,
            a as i64,
            heads as i64,
            code,
            rows_per_warp,
        ];
        let mut input = bytes_of(&header);
        input.extend(bytes_of(&[T::from_f64(slope), T::from_f64(op.eps)]));
        input.extend(bytes_of(&x));
        let want = match mode {
            0 => {
                input.extend(bytes_of(&w));
                input.extend(bytes_of(&b));
                forward_kernel(&x, &w, &b, op)
            }
            1 => {
                input.extend(bytes_of(&w));
                input.extend(bytes_of(&b));
                input.extend(bytes_of(&dot));
                dot_forward_kernel(&x, &w, &b, &dot, op)
            }
            _ => {
                let g = normals(if heads > 0 { rows } else { rows * a }, seed + 4);
                input.extend(bytes_of(&g));
                input.extend(bytes_of(&w));
                input.extend(bytes_of(&b));
                input.extend(bytes_of(&dot));
                if heads > 0 {
                    dot_backward_kernel(&x, (&w, &b, &dot), &g, op)
                } else {
                    backward_kernel(&x, &w, &b, &g, op)
                }
            }
        };
        let tag = format!("{}-{mode}-{rows}-{a}-{heads}-{code}", T::DTYPE.as_str());
        let got = floats_from(&driver.run(&tag, &input), std::mem::size_of::<T>());
        let want: Vec<f64> = want.iter().map(|v| v.to_f64()).collect();
        crate::host_kernels::max_relative_error(&tag, &got, &want)
    }

    /// The CUDA LayerNorm-activation kernels, run on the host, agree with the CPU kernels:
    /// forward, dot forward and both backwards (whose per-warp parameter-gradient partials are
    /// zeroed and summed by different lanes when the width is not a multiple of 32), for
    /// every activation; f64 to 1e-12 and f32 to 1e-5 of the largest value.
    #[test]
    fn cuda_kernels_match_the_cpu_on_the_host() {
        let Some(driver) = crate::host_kernels::driver("norm_main") else {
            return;
        };
        let acts = [
            None,
            Some(Function::Silu),
            Some(Function::Sigmoid),
            Some(Function::SmoothLeakyRelu(0.2)),
        ];
        let mut seed = 500;
        for (rows, a) in [(11, 6), (7, 40)] {
            for (mode, heads) in [(0, 0), (1, 3), (2, 0), (2, 3)] {
                for act in acts {
                    seed += 5;
                    let case = (mode, rows, a, heads);
                    let e64 = host_norm_error::<f64>(driver, case, act, seed);
                    let e32 = host_norm_error::<f32>(driver, case, act, seed);
                    let what = format!("mode {mode} rows {rows} a {a} heads {heads} {act:?}");
                    assert!(e64 < 1e-12, "{what}: f64 error {e64:e}");
                    assert!(e32 < 1e-5, "{what}: f32 error {e32:e}");
                }
            }
        }
    }

    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, act: Option<Function>) -> Tensor {
        let centred = x
            .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
            .broadcast_add(b)
            .unwrap();
        match act {
            None => y,
            Some(function) => y.apply_op1(Elementwise { function, order: 0 }).unwrap(),
        }
    }

    /// Values and the gradients of all three inputs equal the composed ops' (f64, 1e-12), for
    /// each activation, with more rows than one weight-gradient block.
    #[test]
    fn fused_equals_composed_with_gradients() -> Result<()> {
        let (rows, a) = (ROWS_PER_BLOCK + 37, 12);
        for act in [
            None,
            Some(Function::Silu),
            Some(Function::SmoothLeakyRelu(0.2)),
        ] {
            let x = Var::from_tensor(&random_tensor(&[rows, a], DType::F64, 1)?)?;
            let w = Var::from_tensor(&(random_tensor(&[a], DType::F64, 2)? + 1.0)?)?;
            let b = Var::from_tensor(&random_tensor(&[a], DType::F64, 3)?)?;
            let probe = random_tensor(&[rows, a], DType::F64, 4)?;
            let fused = layer_norm_act(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, act)?;
            let reference = composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), act);
            let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
            assert_close_slice(&flat(&fused), &flat(&reference), 1e-12);
            let gf = (&fused * &probe)?.sum_all()?.backward()?;
            let gc = (&reference * &probe)?.sum_all()?.backward()?;
            for var in [&x, &w, &b] {
                let f = gf.get(var.as_tensor()).expect("fused gradient");
                let c = gc.get(var.as_tensor()).expect("composed gradient");
                assert_close_slice(&flat(f), &flat(c), 1e-11);
            }
        }
        Ok(())
    }

    /// The fused LayerNorm → activation → per-head dot product equals the composed ops, values
    /// and the gradients of all four inputs (f64 to 1e-12, f32 to 1e-5 relative), with more
    /// rows than one block and heads that straddle block boundaries; a `dot` of the wrong
    /// shape is an error.
    #[test]
    fn fused_dot_equals_composed_with_gradients() -> Result<()> {
        let (e, h, a) = (ROWS_PER_BLOCK / 3 + 11, 3, 12);
        for act in [
            None,
            Some(Function::Silu),
            Some(Function::SmoothLeakyRelu(0.2)),
        ] {
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                let x = Var::from_tensor(&random_tensor(&[e, h, a], DType::F64, 11)?)?;
                let w = Var::from_tensor(&(random_tensor(&[a], DType::F64, 12)? + 1.0)?)?;
                let b = Var::from_tensor(&random_tensor(&[a], DType::F64, 13)?)?;
                let dot = Var::from_tensor(&random_tensor(&[h, a], DType::F64, 14)?)?;
                let probe = random_tensor(&[e, h], DType::F64, 15)?.to_dtype(dtype)?;
                let [xd, wd, bd, dd] = [&x, &w, &b, &dot].map(|v| v.as_tensor().to_dtype(dtype));
                let (xd, wd, bd, dd) = (xd?, wd?, bd?, dd?);
                let fused = layer_norm_act_dot(&xd, &wd, &bd, 1e-5, act, &dd)?;
                assert_eq!(fused.dims(), &[e, h]);
                let reference = composed(&xd, &wd, &bd, act)
                    .broadcast_mul(&dd)?
                    .sum(D::Minus1)?;
                let close = |got: &Tensor, want: &Tensor, what: &str| {
                    assert_close_relative(got, want, tol, &format!("{act:?} {dtype:?} {what}"));
                };
                close(&fused, &reference, "value");
                let gf = (&fused * &probe)?.sum_all()?.backward()?;
                let gc = (&reference * &probe)?.sum_all()?.backward()?;
                for (name, var) in [("x", &x), ("weight", &w), ("bias", &b), ("dot", &dot)] {
                    let f = gf.get(var.as_tensor()).expect("fused gradient");
                    let c = gc.get(var.as_tensor()).expect("composed gradient");
                    close(f, c, name);
                }
            }
        }
        let x = random_tensor(&[4, 3, 5], DType::F64, 16)?;
        let (w, b) = (
            Tensor::ones(5, DType::F64, &Device::Cpu)?,
            Tensor::zeros(5, DType::F64, &Device::Cpu)?,
        );
        let bad = random_tensor(&[2, 5], DType::F64, 17)?;
        assert!(layer_norm_act_dot(&x, &w, &b, 1e-5, None, &bad).is_err());
        Ok(())
    }

    /// The input gradient agrees with finite differences (f64).
    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let a = 7;
        let w = (random_tensor(&[a], DType::F64, 5)? + 1.0)?;
        let b = random_tensor(&[a], DType::F64, 6)?;
        let x = random_tensor(&[3, 2, a], DType::F64, 7)?;
        let check = check_gradient(
            |x| {
                layer_norm_act(x, &w, &b, 1e-5, Some(Function::Silu))
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
            &x,
            1e-6,
        )?;
        check.assert_within(1e-8);
        Ok(())
    }

    /// f32 agrees with f64 to f32 precision, and with `LayerNorm::forward` + SiLU.
    #[test]
    fn f32_matches_f64_and_the_layer_norm_module() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let norm = LayerNorm::new(16, 1e-5, vb)?;
        let x = random_tensor(&[50, 16], DType::F32, 8)?;
        let module = crate::activation::silu(&norm.forward(&x)?)?;
        let fused = norm.forward_act(&x, Some(Function::Silu))?;
        let flat = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_close_slice(&flat(&fused), &flat(&module), 1e-5);
        Ok(())
    }

    #[test]
    fn mismatched_parameters_are_reported() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
        let w = Tensor::ones(4, DType::F64, &dev).unwrap();
        let b = Tensor::zeros(3, DType::F64, &dev).unwrap();
        let err = layer_norm_act(&x, &w, &b, 1e-5, None).unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }
}
