//! The head-weighted segment sum ([`Segments::head_weighted_sum`]): EquiformerV2's
//! attention-weighted sum of the values over each node's incoming edges, one fused op forward
//! and backward on the CPU and on a GPU.
//!
//! Composed from candle ops it is a `broadcast_mul` making the weighted `[E, K, H·V]` tensor
//! and a segment sum; in the backward pass that tensor, the gathered output gradient and the
//! broadcast weights' gradient are each edge-sized, zero-filled and accumulated by candle. The
//! fused op never builds them: forward each node's row sums its edges' rows in place, and the
//! first-order backward writes `∂values` and `∂weights` from each edge's row of `∂out` in one
//! pass. With higher-order gradients requested the backward is composed of differentiable
//! ops instead.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{to_candle, Csr, Segments};
use crate::activation::{check_float, Float};
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};

impl Segments {
    /// `out[s, k, h·V + v] = Σ_{items i of s} weights[i, h] · values[i, k, h·V + v]`: the sum
    /// over each segment's items of the values `[E, K, H·V]`, each of its `H` channel groups
    /// (heads) scaled by the item's weight `[E, H]`, giving `[S, K, H·V]`. EquiformerV2's
    /// attention output (fairchem: `x_message * alpha`, then `index_add` over the targets).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use matscale_equivariant::segment::Segments;
    ///
    /// # fn main() -> matscale_equivariant::error::Result<()> {
    /// let dev = Device::Cpu;
    /// let seg = Segments::new(&Tensor::new(&[0u32, 0, 1], &dev)?, 2)?;
    /// // 3 items, K = 1, two heads of one channel each.
    /// let values = Tensor::new(&[[[1f32, 10.]], [[2., 20.]], [[3., 30.]]], &dev)?;
    /// let weights = Tensor::new(&[[1f32, 0.5], [2., 0.], [1., 1.]], &dev)?;
    /// let out = seg.head_weighted_sum(&values, &weights)?;
    /// assert_eq!(out.to_vec3::<f32>()?, vec![vec![vec![5., 5.]], vec![vec![3., 30.]]]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`EquivariantError::ShapeMismatch`] naming `values` (not `[E, K, C]` with `E` this
    /// grouping's items) or `weights` (not `[E, H]` with `H` dividing `C`), or an unsupported
    /// dtype (f32 and f64; the two must agree).
    pub fn head_weighted_sum(&self, values: &Tensor, weights: &Tensor) -> Result<Tensor> {
        check_float(values, "values")?;
        let e = self.num_items();
        let c = match values.dims() {
            &[ev, _, c] if ev == e => c,
            _ => {
                return Err(EquivariantError::ShapeMismatch {
                    arg: "values",
                    expected: format!("[num_items = {e}, K, H·V]"),
                    found: values.dims().to_vec(),
                })
            }
        };
        let heads = match weights.dims() {
            &[ew, h] if ew == e && h > 0 && c.is_multiple_of(h) => h,
            _ => {
                return Err(EquivariantError::ShapeMismatch {
                    arg: "weights",
                    expected: format!("[num_items = {e}, H] with H dividing {c} channels"),
                    found: weights.dims().to_vec(),
                })
            }
        };
        if weights.dtype() != values.dtype() {
            return Err(EquivariantError::UnsupportedDType {
                arg: "weights",
                found: weights.dtype(),
            });
        }
        let op = WeightedSum {
            csr: self.csr.clone(),
            heads,
        };
        Ok(values.contiguous()?.apply_op2(&weights.contiguous()?, op)?)
    }
}

/// The op (args: values `[E, K, H·V]`, weights `[E, H]`).
#[derive(Debug, Clone)]
struct WeightedSum {
    csr: Arc<Csr>,
    heads: usize,
}

/// `(K, H·V)` of the values, checked against the weights and the grouping.
fn dims(
    csr: &Csr,
    heads: usize,
    values: &Layout,
    weights: &Layout,
    name: &str,
) -> candle_core::Result<(usize, usize)> {
    let d = values.shape().dims();
    let e = csr.num_items();
    if d.len() != 3
        || d[0] != e
        || weights.shape().dims() != [e, heads]
        || !d[2].is_multiple_of(heads)
    {
        candle_core::bail!(
            "{name}: values {:?}, weights {:?}, {heads} heads, {e} items",
            values.shape(),
            weights.shape()
        );
    }
    Ok((d[1], d[2]))
}

fn forward_kernel<T: Float>(
    csr: &Csr,
    heads: usize,
    values: &[T],
    weights: &[T],
    (k, hv): (usize, usize),
) -> Vec<T> {
    let v = hv / heads;
    let row = k * hv;
    let mut out = crate::buffer::zeroed_vec::<T>(csr.num_segments * row);
    if row == 0 {
        return out;
    }
    out.par_chunks_mut(row)
        .enumerate()
        .for_each(|(s, out_row)| {
            for pos in csr.offsets[s]..csr.offsets[s + 1] {
                let item = csr.item(pos);
                let val = &values[item * row..(item + 1) * row];
                let w = &weights[item * heads..(item + 1) * heads];
                for (out_k, val_k) in out_row.chunks_exact_mut(hv).zip(val.chunks_exact(hv)) {
                    for ((o, x), &wh) in out_k.chunks_exact_mut(v).zip(val_k.chunks_exact(v)).zip(w)
                    {
                        for (o, &x) in o.iter_mut().zip(x) {
                            *o += wh * x;
                        }
                    }
                }
            }
        });
    out
}

impl FloatKernel<2> for WeightedSum {
    fn run<T: Float>(
        &self,
        [(values, lv), (weights, lw)]: [(&[T], &Layout); 2],
    ) -> candle_core::Result<Vec<T>> {
        let kc = dims(&self.csr, self.heads, lv, lw, "segment-weighted-sum")?;
        Ok(forward_kernel(&self.csr, self.heads, values, weights, kc))
    }
}

impl CustomOp2 for WeightedSum {
    fn name(&self) -> &'static str {
        "segment-weighted-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, hv) = dims(&self.csr, self.heads, l1, l2, self.name())?;
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
        Ok((out, (self.csr.num_segments, k, hv).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (k, hv) = dims(&self.csr, self.heads, l1, l2, self.name())?;
        let csr = self.csr.cuda();
        let out = crate::cuda::segment::weighted_sum((s1, l1), (s2, l2), &csr, self.heads, k, hv)?;
        Ok((out, (self.csr.num_segments, k, hv).into()))
    }

    fn bwd(
        &self,
        values: &Tensor,
        weights: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (e, k, hv) = values.dims3()?;
        let h = self.heads;
        if !crate::higher_order_gradients_requested() {
            // One pass: both gradients from each item's row of `∂out`, no gathered copy.
            let flat = values.contiguous()?.apply_op3_no_bwd(
                &weights.contiguous()?,
                &grad_res.contiguous()?,
                &WeightedSumBackward { sum: self.clone() },
            )?;
            let d_values = flat.narrow(0, 0, e * k * hv)?.reshape((e, k, hv))?;
            let d_weights = flat.narrow(0, e * k * hv, e * h)?.reshape((e, h))?;
            return Ok((Some(d_values), Some(d_weights)));
        }
        // Differentiable composition (gradients of gradients).
        let seg = Segments {
            csr: self.csr.clone(),
        };
        let v = hv / h;
        let grad = seg
            .gather(grad_res)
            .map_err(to_candle)?
            .reshape((e, k, h, v))?;
        let d_values = grad
            .broadcast_mul(&weights.reshape((e, 1, h, 1))?)?
            .reshape((e, k, hv))?;
        let d_weights = (grad * values.reshape((e, k, h, v))?)?.sum(3)?.sum(1)?;
        Ok((Some(d_values), Some(d_weights)))
    }
}

/// First-order backward of [`WeightedSum`] (args: values, weights, `∂out`), the flat
/// `[∂values (E·K·H·V) | ∂weights (E·H)]`: `∂values[i] = weights[i] · ∂out[segment of i]` per
/// head and `∂weights[i, h] = Σ_{k,v} values[i, k, h, v] · ∂out[segment of i, k, h, v]`.
#[derive(Debug, Clone)]
struct WeightedSumBackward {
    sum: WeightedSum,
}

fn backward_kernel<T: Float>(
    csr: &Csr,
    heads: usize,
    (values, weights, grad): (&[T], &[T], &[T]),
    (k, hv): (usize, usize),
) -> Vec<T> {
    let e = csr.num_items();
    let (h, v) = (heads, hv / heads);
    let row = k * hv;
    let mut out = crate::buffer::zeroed_vec::<T>(e * row + e * h);
    if row == 0 {
        return out;
    }
    let (d_values, d_weights) = out.split_at_mut(e * row);
    d_values
        .par_chunks_mut(row)
        .zip(d_weights.par_chunks_mut(h))
        .enumerate()
        .for_each_init(
            || vec![T::ZERO; hv],
            |dots, (item, (dv, dw))| {
                let s = csr.index[item] as usize;
                let g = &grad[s * row..(s + 1) * row];
                let val = &values[item * row..(item + 1) * row];
                let w = &weights[item * h..(item + 1) * h];
                // `g · x` summed over k channel by channel (independent sums that
                // vectorise), then over each head's V channels.
                dots.iter_mut().for_each(|d| *d = T::ZERO);
                for ((dv_k, g_k), val_k) in dv
                    .chunks_exact_mut(hv)
                    .zip(g.chunks_exact(hv))
                    .zip(val.chunks_exact(hv))
                {
                    for (dot, (&g, &x)) in dots.iter_mut().zip(g_k.iter().zip(val_k)) {
                        *dot += g * x;
                    }
                    for ((dv, g), &wh) in dv_k.chunks_exact_mut(v).zip(g_k.chunks_exact(v)).zip(w) {
                        for (d, &g) in dv.iter_mut().zip(g) {
                            *d = wh * g;
                        }
                    }
                }
                for (d, head) in dw.iter_mut().zip(dots.chunks_exact(v)) {
                    *d = head.iter().fold(T::ZERO, |s, &x| s + x);
                }
            },
        );
    out
}

/// `(K, H·V)`, with the gradient checked to be `[S, K, H·V]`.
fn backward_dims(
    sum: &WeightedSum,
    (lv, lw, lg): (&Layout, &Layout, &Layout),
    name: &str,
) -> candle_core::Result<(usize, usize)> {
    let (k, hv) = dims(&sum.csr, sum.heads, lv, lw, name)?;
    if lg.shape().dims() != [sum.csr.num_segments, k, hv] {
        candle_core::bail!(
            "{name}: gradient {:?} for values {:?}",
            lg.shape(),
            lv.shape()
        );
    }
    Ok((k, hv))
}

impl FloatKernel<3> for WeightedSumBackward {
    fn run<T: Float>(
        &self,
        [(values, lv), (weights, lw), (grad, lg)]: [(&[T], &Layout); 3],
    ) -> candle_core::Result<Vec<T>> {
        let kc = backward_dims(&self.sum, (lv, lw, lg), "segment-weighted-sum-backward")?;
        Ok(backward_kernel(
            &self.sum.csr,
            self.sum.heads,
            (values, weights, grad),
            kc,
        ))
    }
}

impl CustomOp3 for WeightedSumBackward {
    fn name(&self) -> &'static str {
        "segment-weighted-sum-backward"
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
        backward_dims(&self.sum, (l1, l2, l3), self.name())?;
        let out = run_float(self.name(), [(s1, l1), (s2, l2), (s3, l3)], self)?;
        Ok((
            out,
            Shape::from(l1.shape().elem_count() + l2.shape().elem_count()),
        ))
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
        let (k, hv) = backward_dims(&self.sum, (l1, l2, l3), self.name())?;
        let csr = self.sum.csr.cuda();
        let out = crate::cuda::segment::weighted_sum_backward(
            [(s1, l1), (s2, l2), (s3, l3)],
            &csr,
            self.sum.heads,
            k,
            hv,
        )?;
        Ok((
            out,
            Shape::from(l1.shape().elem_count() + l2.shape().elem_count()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::segment::Segments;
    use crate::testing::random_tensor;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// The composed reference: `broadcast_mul` then an `index_add` over the targets.
    fn composed(values: &Tensor, weights: &Tensor, index: &Tensor, n: usize) -> Tensor {
        let (e, k, c) = values.dims3().unwrap();
        let h = weights.dim(1).unwrap();
        let weighted = values
            .reshape((e, k, h, c / h))
            .unwrap()
            .broadcast_mul(&weights.reshape((e, 1, h, 1)).unwrap())
            .unwrap()
            .reshape((e, k, c))
            .unwrap();
        Tensor::zeros((n, k, c), values.dtype(), values.device())
            .unwrap()
            .index_add(index, &weighted, 0)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and both gradients equal the composed ops, with sorted and unsorted items and an
    /// empty segment.
    #[test]
    fn head_weighted_sum_matches_the_composed_ops() -> TestResult {
        let dev = Device::Cpu;
        for index in [vec![0u32, 0, 1, 1, 1, 3], vec![3u32, 0, 1, 0, 3, 1]] {
            let (e, n, k, heads, v) = (index.len(), 4, 3, 2, 5);
            let idx = Tensor::new(index.as_slice(), &dev)?;
            let seg = Segments::new(&idx, n)?;
            let values = Var::from_tensor(&random_tensor(&[e, k, heads * v], DType::F64, 1)?)?;
            let weights = Var::from_tensor(&random_tensor(&[e, heads], DType::F64, 2)?)?;
            let probe = random_tensor(&[n, k, heads * v], DType::F64, 3)?;
            let fused = seg.head_weighted_sum(&values, &weights)?;
            let reference = composed(&values, &weights, &idx, n);
            assert!(max_diff(&fused, &reference) < 1e-13);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gr = (reference * &probe)?.sum_all()?.backward()?;
            for var in [&values, &weights] {
                let (a, b) = (gf.get(var).unwrap(), gr.get(var).unwrap());
                assert!(
                    max_diff(a, b) < 1e-13,
                    "gradient differs: {}",
                    max_diff(a, b)
                );
            }
        }
        Ok(())
    }

    #[test]
    fn head_weighted_sum_rejects_bad_shapes() -> TestResult {
        let dev = Device::Cpu;
        let seg = Segments::new(&Tensor::new(&[0u32, 1], &dev)?, 2)?;
        let values = Tensor::zeros((2, 3, 6), DType::F32, &dev)?;
        let err = seg
            .head_weighted_sum(&values, &Tensor::zeros((2, 4), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("weights"), "{err}");
        let err = seg
            .head_weighted_sum(
                &values.narrow(0, 0, 1)?,
                &Tensor::zeros((1, 2), DType::F32, &dev)?,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("weights") || err.to_string().contains("values"),
            "{err}"
        );
        Ok(())
    }
}
