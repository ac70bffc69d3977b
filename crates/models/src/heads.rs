//! Output heads shared by the families.
//!
//! * [`MlpHead`]: the study's head for the non-equivariant models,
//!   `Linear(d, d) – SiLU – Linear(d, h) – SiLU – Linear(h, out)` (the study fixes `h = 128`).
//! * [`edge_forces`] and [`edge_stress`]: direct forces and stress that are exactly
//!   rotation-equivariant, built from per-edge invariant weights `w_e` and the edge vectors:
//!   `F_i = Σ_{e → i} w_e r̂_e` and `σ_s = (1/V_s) Σ_{e ∈ s} w_e r̂_e ⊗ r̂_e` (symmetric by
//!   construction). Invariant graph models (SchNet, the distance-biased Transformer) use them so
//!   that their direct outputs transform like forces and stress.
//! * [`voigt_to_matrix`]: six Voigt components `[B, 6]` (xx, yy, zz, yz, xz, xy) to a
//!   symmetric `[B, 3, 3]`, for heads that predict stress components directly.

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::batch::{BatchTensors, Geometry, Grouping};
use crate::error::Result;
use crate::flops::{FlopCounter, TRANSCENDENTAL};

/// The study's output MLP: `Linear(d, d) – SiLU – Linear(d, h) – SiLU – Linear(h, out)`.
#[derive(Debug, Clone)]
pub struct MlpHead {
    layers: [Linear; 3],
    sizes: (usize, usize, usize),
}

impl MlpHead {
    /// A head from width `d` through hidden width `h` to `out` outputs.
    pub fn new(d: usize, h: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            layers: [
                candle_nn::linear(d, d, vb.pp("0"))?,
                candle_nn::linear(d, h, vb.pp("2"))?,
                candle_nn::linear(h, out, vb.pp("4"))?,
            ],
            sizes: (d, h, out),
        })
    }

    /// Parameters of a head with these sizes.
    pub fn n_parameters(d: usize, h: usize, out: usize) -> usize {
        d * d + d + d * h + h + h * out + out
    }

    /// Applies the head to `[rows, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.layers[0].forward(x)?.silu()?;
        let x = self.layers[1].forward(&x)?.silu()?;
        Ok(self.layers[2].forward(&x)?)
    }

    /// Counts the FLOPs of [`Self::forward`] on `rows` rows.
    pub fn count_flops(&self, rows: usize, counter: &mut FlopCounter) {
        let (d, h, out) = self.sizes;
        counter.linear(rows, d, d, true);
        counter.elementwise(rows * d, TRANSCENDENTAL);
        counter.linear(rows, d, h, true);
        counter.elementwise(rows * h, TRANSCENDENTAL);
        counter.linear(rows, h, out, true);
    }
}

/// Unit edge vectors `[E, 3]` (edges of zero length, which a neighbour list never yields, would
/// give NaN).
fn unit_vectors(geometry: &Geometry) -> Result<Tensor> {
    Ok(geometry
        .edge_vectors
        .broadcast_div(&geometry.edge_lengths.unsqueeze(D::Minus1)?)?)
}

/// Equivariant direct forces `F_i = Σ_{e → i} w_e r̂_e` from invariant edge weights `[E]`.
/// Returns `[N, 3]` in the dtype of `weights`.
pub fn edge_forces(batch: &BatchTensors, geometry: &Geometry, weights: &Tensor) -> Result<Tensor> {
    let dtype = weights.dtype();
    let unit = unit_vectors(geometry)?.to_dtype(dtype)?;
    let per_edge = unit
        .broadcast_mul(&weights.unsqueeze(D::Minus1)?)?
        .contiguous()?;
    batch.sum_over(Grouping::EdgesByTarget, &per_edge)
}

/// Equivariant direct stress `σ_s = (1/V_s) Σ_{e ∈ s} w_e r̂_e ⊗ r̂_e` from invariant edge
/// weights `[E]`; `[B, 3, 3]`, symmetric, zero for structures without a cell.
pub fn edge_stress(batch: &BatchTensors, geometry: &Geometry, weights: &Tensor) -> Result<Tensor> {
    let dtype = weights.dtype();
    let e = batch.n_edges();
    let unit = unit_vectors(geometry)?.to_dtype(dtype)?;
    let outer = unit
        .reshape((e, 3, 1))?
        .broadcast_mul(&unit.reshape((e, 1, 3))?)?
        .broadcast_mul(&weights.reshape((e, 1, 1))?)?
        .contiguous()?;
    let summed = batch.sum_over(Grouping::EdgesByStructure, &outer)?;
    let inv_volume: Vec<f64> = batch
        .volumes_host
        .iter()
        .map(|&v| if v > 0.0 { 1.0 / v } else { 0.0 })
        .collect();
    let inv_volume = Tensor::from_vec(inv_volume, (batch.n_structures(), 1, 1), weights.device())?
        .to_dtype(dtype)?;
    Ok(summed.broadcast_mul(&inv_volume)?)
}

/// FLOPs of [`edge_forces`] plus [`edge_stress`] on `edges` edges.
pub fn count_edge_heads(edges: usize, counter: &mut FlopCounter) {
    counter.elementwise(edges * 3, 1.0); // unit vectors
    counter.elementwise(edges * 3, 1.0); // weighted
    counter.scatter(edges, 3);
    counter.elementwise(edges * 9, 2.0); // weighted outer products
    counter.scatter(edges, 9);
}

/// Six Voigt components `[B, 6]` (xx, yy, zz, yz, xz, xy) to symmetric matrices `[B, 3, 3]`.
pub fn voigt_to_matrix(voigt: &Tensor) -> Result<Tensor> {
    let b = voigt.dim(0)?;
    let c = |k: usize| voigt.narrow(1, k, 1);
    let (xx, yy, zz, yz, xz, xy) = (c(0)?, c(1)?, c(2)?, c(3)?, c(4)?, c(5)?);
    let rows = Tensor::cat(&[&xx, &xy, &xz, &xy, &yy, &yz, &xz, &yz, &zz], 1)?;
    Ok(rows.reshape((b, 3, 3))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn voigt_order_is_ase() {
        let v = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
        let m = voigt_to_matrix(&v).unwrap().to_vec3::<f64>().unwrap();
        assert_eq!(
            m[0],
            vec![
                vec![1.0, 6.0, 5.0],
                vec![6.0, 2.0, 4.0],
                vec![5.0, 4.0, 3.0]
            ]
        );
    }

    #[test]
    fn edge_heads_accept_a_batch_without_edges() {
        use matscale_structures::batch::{GraphBatch, GraphOptions};
        let s = matscale_structures::Structure::new(
            vec![29],
            vec![[0.0; 3]],
            [[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]],
            [true; 3],
        )
        .unwrap();
        let batch = GraphBatch::new(&[s], &GraphOptions::new(3.0)).unwrap();
        let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
        let geometry = Geometry::of(&tensors).unwrap();
        let w = Tensor::zeros(0, DType::F64, &Device::Cpu).unwrap();
        let f = edge_forces(&tensors, &geometry, &w).unwrap();
        let sigma = edge_stress(&tensors, &geometry, &w).unwrap();
        assert_eq!(f.to_vec2::<f64>().unwrap(), vec![vec![0.0; 3]]);
        assert_eq!(sigma.dims(), &[1, 3, 3]);
    }

    #[test]
    fn mlp_head_parameter_count_matches_built_head() {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let _head = MlpHead::new(7, 11, 3, vb).unwrap();
        let built: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(built, MlpHead::n_parameters(7, 11, 3));
    }
}
