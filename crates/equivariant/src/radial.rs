//! Radial (edge-length) features of EquiformerV2: Gaussian smearing of the distance and the
//! radial MLP that turns it into per-edge weights.
//!
//! * [`GaussianSmearing`] is fairchem's `GaussianSmearing(start, stop, num_gaussians,
//!   basis_width_scalar)` (`fairchem/core/models/scn/smearing.py`): centres
//!   `μ_k = linspace(start, stop, num_gaussians)`, spacing `Δ = μ_1 − μ_0`,
//!   `coeff = −0.5 / (basis_width_scalar · Δ)²`, and `out[e, k] = exp(coeff · (d_e − μ_k)²)`.
//!   EquiformerV2 always builds it as `GaussianSmearing(0, cutoff, 600, 2.0)`
//!   ([`GaussianSmearing::equiformer_v2`]), whatever `num_distance_basis` says.
//!   One fused op (the `[E, 600]` output is the largest edge tensor of the input block); its
//!   backward `∂/∂d_e = Σ_k g_ek · out_ek · 2 coeff (d_e − μ_k)` is composed of candle ops, so it
//!   can be differentiated again.
//! * [`RadialFunction`] is fairchem's `RadialFunction(channels_list)`: for channels
//!   `[c0, c1, ..., cn]`, `Linear(c0, c1) → LayerNorm → SiLU → ... → Linear(c_{n−1}, cn)` (no
//!   norm or activation after the last linear). Parameters are named like fairchem's state dict
//!   (`net.0.weight`, `net.1.weight` for the first LayerNorm, `net.3.weight`, ...), so a
//!   checkpoint converted to safetensors loads directly.
//!
//! # Example
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use matscale_equivariant::radial::{GaussianSmearing, RadialFunction};
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let smearing = GaussianSmearing::equiformer_v2(12.0)?; // 600 Gaussians on [0, 12] Å
//! let dist = Tensor::new(&[1.5f32, 3.0, 11.9], &Device::Cpu)?;
//! let basis = smearing.forward(&dist)?;
//! assert_eq!(basis.dims(), &[3, 600]);
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let radial = RadialFunction::new(&[600, 64, 64, 3 * 64], vb)?;
//! assert_eq!(radial.forward(&basis)?.dims(), &[3, 192]);
//! # Ok(())
//! # }
//! ```

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use rayon::prelude::*;

use crate::activation::{check_float, Float, Function};
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};
use crate::norms::LayerNorm;
use crate::segment::RowIndex;

/// Number of Gaussians EquiformerV2 uses (hard-coded in fairchem, whatever the config says).
pub const EQUIFORMER_V2_NUM_GAUSSIANS: usize = 600;
/// `basis_width_scalar` EquiformerV2 uses.
pub const EQUIFORMER_V2_BASIS_WIDTH: f64 = 2.0;

/// Gaussian smearing of distances (fairchem `GaussianSmearing`); see the [module docs](self).
#[derive(Debug, Clone)]
pub struct GaussianSmearing {
    offsets: Vec<f64>,
    coeff: f64,
}

impl GaussianSmearing {
    /// `num_gaussians ≥ 2` centres evenly spaced on `[start, stop]` (Å), each of width
    /// `basis_width_scalar` times the spacing.
    pub fn new(
        start: f64,
        stop: f64,
        num_gaussians: usize,
        basis_width_scalar: f64,
    ) -> Result<Self> {
        if num_gaussians < 2 {
            return Err(EquivariantError::InvalidArgument {
                name: "num_gaussians",
                reason: format!("needs at least 2 centres, got {num_gaussians}"),
            });
        }
        if !start.is_finite() || !stop.is_finite() || stop <= start {
            return Err(EquivariantError::InvalidArgument {
                name: "stop",
                reason: format!("need finite start < stop, got start {start}, stop {stop}"),
            });
        }
        if !basis_width_scalar.is_finite() || basis_width_scalar <= 0.0 {
            return Err(EquivariantError::InvalidArgument {
                name: "basis_width_scalar",
                reason: format!("must be positive and finite, got {basis_width_scalar}"),
            });
        }
        let step = (stop - start) / (num_gaussians - 1) as f64;
        let offsets: Vec<f64> = (0..num_gaussians)
            .map(|k| start + k as f64 * step)
            .collect();
        let spacing = offsets[1] - offsets[0];
        let coeff = -0.5 / (basis_width_scalar * spacing).powi(2);
        Ok(Self { offsets, coeff })
    }

    /// EquiformerV2's smearing: 600 Gaussians on `[0, cutoff]` Å, width 2 spacings.
    pub fn equiformer_v2(cutoff_angstrom: f64) -> Result<Self> {
        Self::new(
            0.0,
            cutoff_angstrom,
            EQUIFORMER_V2_NUM_GAUSSIANS,
            EQUIFORMER_V2_BASIS_WIDTH,
        )
    }

    /// Number of output features (centres).
    pub fn num_output(&self) -> usize {
        self.offsets.len()
    }

    /// The centres `μ_k` (Å).
    pub fn offsets(&self) -> &[f64] {
        &self.offsets
    }

    /// The exponent factor `coeff = −0.5 / (basis_width_scalar · Δ)²` (Å⁻²).
    pub fn coeff(&self) -> f64 {
        self.coeff
    }

    /// Distances of any shape (`E` elements, Å, f32 or f64) → `[E, num_output]`.
    pub fn forward(&self, dist: &Tensor) -> Result<Tensor> {
        check_float(dist, "dist")?;
        let flat = dist.flatten_all()?.contiguous()?;
        Ok(flat.apply_op1(SmearingOp {
            offsets: self.offsets.clone(),
            coeff: self.coeff,
        })?)
    }
}

#[derive(Debug, Clone)]
struct SmearingOp {
    offsets: Vec<f64>,
    coeff: f64,
}

fn smearing_kernel<T: Float>(dist: &[T], offsets: &[f64], coeff: f64) -> Vec<T> {
    let k = offsets.len();
    let offs: Vec<T> = offsets.iter().map(|&o| T::from_f64(o)).collect();
    let c = T::from_f64(coeff);
    let mut out = crate::buffer::zeroed_vec::<T>(dist.len() * k);
    out.par_chunks_mut(k * 64)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (r, row) in chunk.chunks_mut(k).enumerate() {
                let d = dist[task * 64 + r];
                for (o, &mu) in row.iter_mut().zip(&offs) {
                    let x = d - mu;
                    *o = (c * x * x).exp();
                }
            }
        });
    out
}

/// Input: the distances.
impl FloatKernel<1> for SmearingOp {
    fn run<T: Float>(&self, [(d, _)]: [(&[T], &Layout); 1]) -> candle_core::Result<Vec<T>> {
        Ok(smearing_kernel(d, &self.offsets, self.coeff))
    }
}

impl CustomOp1 for SmearingOp {
    fn name(&self) -> &'static str {
        "gaussian-smearing"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run_float(self.name(), [(storage, layout)], self)?;
        let distances = layout.shape().elem_count();
        Ok((out, Shape::from((distances, self.offsets.len()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::elementwise::gaussian_smearing(storage, layout, &self.offsets, self.coeff)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let offsets = Tensor::from_slice(&self.offsets, (1, self.offsets.len()), arg.device())?
            .to_dtype(arg.dtype())?;
        let diff = arg.unsqueeze(1)?.broadcast_sub(&offsets)?;
        let grad = (grad_res.mul(res)?.mul(&diff)?.sum(1)? * (2.0 * self.coeff))?;
        Ok(Some(grad))
    }
}

/// fairchem `RadialFunction`: Linear → LayerNorm → SiLU blocks and a final Linear.
#[derive(Debug, Clone)]
pub struct RadialFunction {
    hidden: Vec<(Linear, LayerNorm)>,
    last: Linear,
}

impl RadialFunction {
    /// Builds the MLP for `channels_list = [c0, c1, ..., cn]` (n ≥ 1) from `vb` (parameters
    /// `net.{3i}.weight/bias` for the linears and `net.{3i+1}.weight/bias` for the norms,
    /// LayerNorm eps 1e-5 as PyTorch's default).
    pub fn new(channels_list: &[usize], vb: VarBuilder) -> Result<Self> {
        if channels_list.len() < 2 || channels_list.contains(&0) {
            return Err(EquivariantError::InvalidArgument {
                name: "channels_list",
                reason: format!("needs at least two non-zero sizes, got {channels_list:?}"),
            });
        }
        let net = vb.pp("net");
        let n = channels_list.len() - 1;
        let mut hidden = Vec::with_capacity(n - 1);
        for i in 0..n - 1 {
            let linear = candle_nn::linear(channels_list[i], channels_list[i + 1], net.pp(3 * i))?;
            let norm = LayerNorm::new(channels_list[i + 1], 1e-5, net.pp(3 * i + 1))?;
            hidden.push((linear, norm));
        }
        let last = candle_nn::linear(channels_list[n - 1], channels_list[n], net.pp(3 * (n - 1)))?;
        Ok(Self { hidden, last })
    }

    /// `[E, c0] → [E, cn]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let first = match self.hidden.first() {
            Some((linear, _)) => linear.forward(x)?,
            None => return linear_bias_folded(&self.last, x),
        };
        self.forward_after_first(first)
    }

    /// [`Self::forward`] of `cat([dense, table₀[index₀], table₁[index₁], …], 1)` without
    /// building that `[E, c0]` input: the first linear's columns of each gathered part multiply
    /// the (small) table, and the product rows are gathered. EquiformerV2's radial input is 600
    /// distance features followed by source and target atom embeddings (tables of one row per
    /// element), so this replaces an `[E, 600 + 2·ec]` concatenation by two `[E, c1]` gathers.
    ///
    /// The indices are [`RowIndex`]es, grouped once per graph: no call copies anything from
    /// the device.
    ///
    /// # Errors
    /// The widths do not add up to `c0`, an index does not index its table's rows, or its
    /// length is not the dense input's rows.
    pub fn forward_gathered(
        &self,
        dense: &Tensor,
        gathered: &[(&Tensor, &RowIndex)],
    ) -> Result<Tensor> {
        let edges = dense.dim(0)?;
        for (table, index) in gathered {
            let n = table.dim(0)?;
            if index.rows() != n || index.len() != edges {
                return Err(EquivariantError::InvalidArgument {
                    name: "gathered index",
                    reason: format!(
                        "{} entries into {} rows, for a table of {n} rows and {edges} dense rows",
                        index.len(),
                        index.rows()
                    ),
                });
            }
        }
        let Some((linear, _)) = self.hidden.first() else {
            let mut parts = vec![dense.clone()];
            for (table, index) in gathered {
                parts.push(index.gather(table)?);
            }
            return linear_bias_folded(&self.last, &Tensor::cat(&parts, 1)?);
        };
        let w = linear.weight();
        let c0 = w.dim(1)?;
        let mut widths = dense.dim(1)?;
        for (table, _) in gathered {
            widths += table.dim(1)?;
        }
        if widths != c0 {
            return Err(EquivariantError::ShapeMismatch {
                arg: "dense and gathered",
                expected: format!("widths adding up to the first layer's {c0} inputs"),
                found: vec![widths],
            });
        }
        if let Some(out) = self.forward_gathered_fused(dense, gathered)? {
            return Ok(out);
        }
        let mut offset = dense.dim(1)?;
        let mut h = dense.matmul(&w.narrow(1, 0, offset)?.t()?.contiguous()?)?;
        for (table, index) in gathered {
            let width = table.dim(1)?;
            let projected = table.matmul(&w.narrow(1, offset, width)?.t()?.contiguous()?)?;
            h = (h + index.gather(&projected)?)?;
            offset += width;
        }
        if let Some(bias) = linear.bias() {
            h = h.broadcast_add(bias)?;
        }
        self.forward_after_first(h)
    }

    /// [`Self::forward_gathered`] as one fused CPU op ([`crate::radial_mlp`]), or `None` where
    /// it does not apply (off the CPU, not f32 / f64, a `dense` input that needs a gradient,
    /// higher-order gradients requested, a linear without bias). The widths are checked.
    fn forward_gathered_fused(
        &self,
        dense: &Tensor,
        gathered: &[(&Tensor, &RowIndex)],
    ) -> Result<Option<Tensor>> {
        let applies = dense.device().is_cpu()
            && matches!(dense.dtype(), DType::F32 | DType::F64)
            && !dense.track_op()
            && !crate::higher_order_gradients_requested()
            && self.last.bias().is_some()
            && self.hidden.iter().all(|(l, _)| l.bias().is_some());
        let Some((first, _)) = self.hidden.first().filter(|_| applies) else {
            return Ok(None);
        };
        let (edges, d0) = dense.dims2()?;
        let w = first.weight();
        let c1 = w.dim(0)?;
        let mut tables = Vec::with_capacity(gathered.len());
        let mut parts = Vec::with_capacity(gathered.len());
        let (mut offset, mut rows) = (d0, 0);
        for (table, index) in gathered {
            let width = table.dim(1)?;
            tables.push(table.matmul(&w.narrow(1, offset, width)?.t()?.contiguous()?)?);
            // Checked by `forward_gathered`: `index.len() == edges`, values below the rows.
            debug_assert_eq!(index.len(), edges);
            parts.push((rows, index.host().to_vec()));
            rows += table.dim(0)?;
            offset += width;
        }
        let dtype = dense.dtype();
        let p = if tables.is_empty() {
            Tensor::zeros((0, c1), dtype, dense.device())?
        } else {
            Tensor::cat(&tables, 0)?
        };
        let mut params = Vec::new();
        let mut widths = Vec::new();
        for (i, (linear, norm)) in self.hidden.iter().enumerate() {
            let weight = if i == 0 {
                linear.weight().narrow(1, 0, d0)?
            } else {
                linear.weight().clone()
            };
            widths.push(linear.weight().dim(0)?);
            let (gamma, beta, _) = norm.parts();
            params.push(weight.contiguous()?.flatten_all()?);
            params.extend(
                [linear.bias(), Some(gamma), Some(beta)]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        widths.push(self.last.weight().dim(0)?);
        params.push(self.last.weight().flatten_all()?);
        params.extend(self.last.bias().cloned());
        let params = Tensor::cat(&params, 0)?.to_dtype(dtype)?;
        let eps = self.hidden[0].1.parts().2;
        let op = crate::radial_mlp::RadialMlpOp {
            plan: crate::radial_mlp::Plan::new(d0, &widths, eps),
            dense: dense.contiguous()?,
            gathered: std::sync::Arc::new(crate::radial_mlp::Gathered { parts, rows }),
        };
        Ok(Some(p.apply_op2(&params, op)?))
    }

    /// The network after the first linear layer's output `first`.
    fn forward_after_first(&self, first: Tensor) -> Result<Tensor> {
        let mut h = first;
        for (i, (linear, norm)) in self.hidden.iter().enumerate() {
            if i > 0 {
                h = linear.forward(&h)?;
            }
            h = norm.forward_act(&h, Some(Function::Silu))?;
        }
        linear_bias_folded(&self.last, &h)
    }
}

/// `linear.forward(h)` for `[E, in]` rows with the bias folded into the matrix product
/// (`[h ‖ 1] · [W ‖ b]ᵀ`): the wide `[E, out]` output is one autograd node instead of a product
/// and a broadcast addition (whose backward also reduces `[E, out]` for the bias gradient).
fn linear_bias_folded(linear: &Linear, h: &Tensor) -> Result<Tensor> {
    let Some(bias) = linear.bias() else {
        return Ok(linear.forward(h)?);
    };
    let ones = Tensor::ones((h.dim(0)?, 1), h.dtype(), h.device())?;
    let h = Tensor::cat(&[h, &ones], 1)?;
    let w = Tensor::cat(&[linear.weight(), &bias.unsqueeze(1)?], 1)?;
    Ok(h.matmul(&w.t()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        assert_close_relative, assert_close_slice, check_gradient, random_tensor,
    };
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn smearing_matches_the_fairchem_definition() -> Result<()> {
        let s = GaussianSmearing::equiformer_v2(12.0)?;
        assert_eq!(s.num_output(), 600);
        let spacing = 12.0 / 599.0;
        assert!((s.coeff() - (-0.5 / (2.0 * spacing * 2.0 * spacing))).abs() < 1e-9);
        assert_eq!(s.offsets()[0], 0.0);
        assert!((s.offsets()[599] - 12.0).abs() < 1e-12);
        let d = [0.0, 0.73, 5.0, 11.99];
        let out: Vec<f64> = s
            .forward(&Tensor::new(&d, &Device::Cpu)?)?
            .flatten_all()?
            .to_vec1()?;
        let mut expected = Vec::new();
        for &di in &d {
            for k in 0..600 {
                let mu = k as f64 * spacing;
                expected.push((s.coeff() * (di - mu) * (di - mu)).exp());
            }
        }
        assert_close_slice(&out, &expected, 1e-14);
        let out32: Vec<f32> = s
            .forward(&Tensor::new(&d, &Device::Cpu)?.to_dtype(DType::F32)?)?
            .flatten_all()?
            .to_vec1()?;
        let out32: Vec<f64> = out32.into_iter().map(f64::from).collect();
        assert_close_slice(&out32, &expected, 2e-5);
        Ok(())
    }

    /// Golden values from fairchem's own `GaussianSmearing` and `RadialFunction`
    /// (`tests/data/equivariant/norms_fixtures.py`).
    #[test]
    fn smearing_and_radial_mlp_match_fairchem() -> Result<()> {
        let fx = crate::testing::Fixture::open("norms_golden");
        let load = |name: &str| {
            let (s, v) = fx.array(name);
            Tensor::from_slice(v, s.as_slice(), &Device::Cpu).expect("tensor")
        };
        let s = GaussianSmearing::equiformer_v2(12.0)?;
        crate::testing::assert_close(
            &s.forward(&load("radial.dist"))?,
            &load("radial.smearing"),
            1e-13,
        );

        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let radial = RadialFunction::new(&[8, 5, 5, 4], vb)?;
        {
            let data = varmap.data().lock().expect("varmap lock");
            for (name, var) in data.iter() {
                var.set(&load(&format!("radial.{name}")))?;
            }
        }
        crate::testing::assert_close(
            &radial.forward(&load("radial.mlp_in"))?,
            &load("radial.mlp_out"),
            1e-12,
        );
        Ok(())
    }

    #[test]
    fn smearing_gradient_matches_finite_differences() -> Result<()> {
        let s = GaussianSmearing::new(0.0, 5.0, 20, 1.0)?;
        let d = (random_tensor(&[7], DType::F64, 1)?.abs()? * 2.0)?;
        let to_c = |e: EquivariantError| candle_core::Error::Msg(e.to_string());
        check_gradient(|t| s.forward(t).map_err(to_c), &d, 1e-6)?.assert_within(1e-8);
        assert!(GaussianSmearing::new(1.0, 1.0, 10, 1.0).is_err());
        assert!(GaussianSmearing::new(0.0, 1.0, 1, 1.0).is_err());
        Ok(())
    }

    /// The fused radial MLP (`forward_gathered` with a dense input that needs no gradient)
    /// equals `forward` of the concatenated input: values, and the gradients of the tables and
    /// of every parameter, in f64 (1e-12) and f32 (1e-5 relative), over several chunks of
    /// edges and backward parts (three threads); bad indices are errors.
    #[test]
    fn fused_mlp_equals_the_composed_network() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let edges = 700;
        let index = |n: u32, seed: u32| -> Vec<u32> {
            (0..edges as u32).map(|e| (e * 7 + seed) % n).collect()
        };
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
            let radial = RadialFunction::new(&[10 + 3 + 2, 6, 5, 9], vb)?;
            let dense = random_tensor(&[edges, 10], DType::F64, 31)?.to_dtype(dtype)?;
            let a = candle_core::Var::from_tensor(&random_tensor(&[4, 3], dtype, 32)?)?;
            let b = candle_core::Var::from_tensor(&random_tensor(&[5, 2], dtype, 33)?)?;
            let ia = RowIndex::new(&Tensor::new(index(4, 1).as_slice(), &Device::Cpu)?, 4)?;
            let ib = RowIndex::new(&Tensor::new(index(5, 3).as_slice(), &Device::Cpu)?, 5)?;
            let (ta, tb) = (a.as_tensor(), b.as_tensor());
            let fused =
                pool.install(|| radial.forward_gathered(&dense, &[(ta, &ia), (tb, &ib)]))?;
            let cat = Tensor::cat(
                &[
                    &dense,
                    &ta.index_select(ia.tensor(), 0)?,
                    &tb.index_select(ib.tensor(), 0)?,
                ],
                1,
            )?;
            let reference = radial.forward(&cat)?;
            let close = |got: &Tensor, want: &Tensor, what: &str| {
                assert_close_relative(got, want, tol, &format!("{dtype:?} {what}"));
            };
            close(&fused, &reference, "value");
            let probe = random_tensor(&[edges, 9], DType::F64, 34)?.to_dtype(dtype)?;
            let g1 = pool.install(|| (&fused * &probe)?.sum_all()?.backward())?;
            let g2 = (&reference * &probe)?.sum_all()?.backward()?;
            let params = varmap.data().lock().expect("varmap lock").clone();
            assert_eq!(params.len(), 10);
            close(g1.get(ta).unwrap(), g2.get(ta).unwrap(), "table a");
            close(g1.get(tb).unwrap(), g2.get(tb).unwrap(), "table b");
            for (name, var) in &params {
                let t = var.as_tensor();
                close(g1.get(t).unwrap(), g2.get(t).unwrap(), name);
            }
            // An index into 6 rows for a table of 4; an index of another length.
            let bad = RowIndex::new(&Tensor::new(index(6, 0).as_slice(), &Device::Cpu)?, 6)?;
            let err = radial
                .forward_gathered(&dense, &[(ta, &bad), (tb, &ib)])
                .unwrap_err();
            assert!(err.to_string().contains("table of 4 rows"), "{err}");
            let short = RowIndex::new(&Tensor::new(&[0u32, 1], &Device::Cpu)?, 4)?;
            let err = radial
                .forward_gathered(&dense, &[(ta, &short), (tb, &ib)])
                .unwrap_err();
            assert!(err.to_string().contains("700 dense rows"), "{err}");
        }
        Ok(())
    }

    /// `forward_gathered` equals `forward` of the concatenated input, values and the
    /// gradients of the dense input, the tables and the first layer's weight (f64).
    #[test]
    fn gathered_input_equals_the_concatenation() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let radial = RadialFunction::new(&[6 + 2 + 3, 5, 4, 3], vb)?;
        let dense = candle_core::Var::from_tensor(&random_tensor(&[7, 6], DType::F64, 21)?)?;
        let a = candle_core::Var::from_tensor(&random_tensor(&[4, 2], DType::F64, 22)?)?;
        let b = candle_core::Var::from_tensor(&random_tensor(&[5, 3], DType::F64, 23)?)?;
        let ia = RowIndex::new(&Tensor::new(&[0u32, 3, 3, 1, 2, 0, 1], &Device::Cpu)?, 4)?;
        let ib = RowIndex::new(&Tensor::new(&[4u32, 0, 1, 1, 2, 3, 4], &Device::Cpu)?, 5)?;
        let (ta, tb, td) = (a.as_tensor(), b.as_tensor(), dense.as_tensor());
        let fast = radial.forward_gathered(td, &[(ta, &ia), (tb, &ib)])?;
        let cat = Tensor::cat(
            &[
                td,
                &ta.index_select(ia.tensor(), 0)?,
                &tb.index_select(ib.tensor(), 0)?,
            ],
            1,
        )?;
        let reference = radial.forward(&cat)?;
        let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_close_slice(&flat(&fast), &flat(&reference), 1e-12);
        let probe = random_tensor(&[7, 3], DType::F64, 24)?;
        let g1 = (&fast * &probe)?.sum_all()?.backward()?;
        let g2 = (&reference * &probe)?.sum_all()?.backward()?;
        let w = varmap.data().lock().expect("varmap lock")["net.0.weight"].clone();
        for t in [td, ta, tb, w.as_tensor()] {
            assert_close_slice(&flat(g1.get(t).unwrap()), &flat(g2.get(t).unwrap()), 1e-12);
        }
        assert!(radial
            .forward_gathered(td, &[(ta, &ia)])
            .unwrap_err()
            .to_string()
            .contains("widths"));
        Ok(())
    }

    #[test]
    fn radial_function_layers_and_gradients() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let radial = RadialFunction::new(&[6, 5, 4, 3], vb)?;
        let names: Vec<String> = {
            let data = varmap.data().lock().expect("varmap lock");
            let mut v: Vec<String> = data.keys().cloned().collect();
            v.sort();
            v
        };
        assert_eq!(
            names,
            [
                "net.0.bias",
                "net.0.weight",
                "net.1.bias",
                "net.1.weight",
                "net.3.bias",
                "net.3.weight",
                "net.4.bias",
                "net.4.weight",
                "net.6.bias",
                "net.6.weight"
            ]
        );
        let x = random_tensor(&[4, 6], DType::F64, 3)?;
        let y = radial.forward(&x)?;
        assert_eq!(y.dims(), &[4, 3]);
        // reference: the same layers written out with plain candle ops
        let data = varmap.data().lock().expect("varmap lock");
        let get = |n: &str| data[n].as_tensor().clone();
        let mut h = x.clone();
        for (lin, ln) in [(0, 1), (3, 4)] {
            h = h
                .matmul(&get(&format!("net.{lin}.weight")).t()?)?
                .broadcast_add(&get(&format!("net.{lin}.bias")))?;
            let mean = h.mean_keepdim(1)?;
            let c = h.broadcast_sub(&mean)?;
            let var = c.sqr()?.mean_keepdim(1)?;
            h = c.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
            h = h
                .broadcast_mul(&get(&format!("net.{ln}.weight")))?
                .broadcast_add(&get(&format!("net.{ln}.bias")))?;
            h = (&h * candle_nn::ops::sigmoid(&h)?)?;
        }
        let h = h
            .matmul(&get("net.6.weight").t()?)?
            .broadcast_add(&get("net.6.bias"))?;
        drop(data);
        crate::testing::assert_close(&y, &h, 1e-12);
        let to_c = |e: EquivariantError| candle_core::Error::Msg(e.to_string());
        check_gradient(|t| radial.forward(t).map_err(to_c), &x, 1e-6)?.assert_within(1e-8);
        Ok(())
    }
}
