//! The OMat24 output heads of EquiformerV2: energy (fairchem `EqV2ScalarHead`), direct forces
//! (`EqV2VectorHead`, in [`super::EquiformerV2`] as one more [`GraphAttention`]) and the
//! rank-2 stress ([`StressHead`], `Rank2SymmetricTensorHead` with `decompose = True` and
//! `use_source_target_embedding = True`).
//!
//! [`GraphAttention`]: super::blocks::GraphAttention

use candle_core::{Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};
use matscale_equivariant::activation::silu;
use matscale_equivariant::norms::{EquivariantNorm, LayerNorm};
use matscale_equivariant::sh::{spherical_harmonics, Normalization};

use super::blocks::{linear, norm, EdgeGraph, WeightInit};
use super::config::EquiformerV2Config;
use crate::batch::BatchTensors;
use crate::error::Result;

/// `1/√2`, `1/√3`, `1/√6` of fairchem's `change_mat`.
const S2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const S3: f64 = 0.577_350_269_189_625_8;
const S6: f64 = 0.408_248_290_463_863;

/// Rows of fairchem's orthogonal `change_mat` (Cartesian 3×3, row-major, ↔ irreps) for the
/// isotropic part and the five `l = 2` components in e3nn order (y polar:
/// `xz, xy, (2y² − x² − z²)/√6·…, yz, (z² − x²)`): `σ = iso·T₀ + Σ_k aniso_k·T_{4+k}`.
const COMPOSE: [[f64; 9]; 6] = [
    [S3, 0.0, 0.0, 0.0, S3, 0.0, 0.0, 0.0, S3],
    [0.0, 0.0, S2, 0.0, 0.0, 0.0, S2, 0.0, 0.0],
    [0.0, S2, 0.0, S2, 0.0, 0.0, 0.0, 0.0, 0.0],
    [-S6, 0.0, 0.0, 0.0, 2.0 * S6, 0.0, 0.0, 0.0, -S6],
    [0.0, 0.0, 0.0, 0.0, 0.0, S2, 0.0, S2, 0.0],
    [-S2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, S2],
];

/// fairchem `Rank2SymmetricTensorHead` (`decompose`, `use_source_target_embedding`, node-level
/// MLPs, intensive): per edge, `[x_src ‖ x_dst]` contracted with the layer-normalised
/// unnormalised spherical harmonics of the edge vector, LayerNorm; the mean over incoming
/// edges of that vector and of its product with `Y²(r̂)` feed two 2-layer MLPs; structure
/// means give the isotropic part and the five `l = 2` components, composed into a symmetric
/// 3×3 tensor.
#[derive(Debug, Clone)]
pub(crate) struct StressHead {
    sphharm_norm: EquivariantNorm,
    xedge_layer_norm: LayerNorm,
    scalar_mlp: [Linear; 2],
    irrep2_mlp: [Linear; 2],
    lmax: usize,
}

impl StressHead {
    pub(crate) fn new(config: &EquiformerV2Config, vb: VarBuilder) -> Result<Self> {
        let width = 2 * config.sphere_channels;
        let init = WeightInit::Uniform;
        let block = vb.pp("block");
        let (s, i) = (block.pp("scalar_MLP"), block.pp("irrep2_MLP"));
        Ok(Self {
            sphharm_norm: norm(config, 1, vb.pp("sphharm_norm"))?,
            xedge_layer_norm: LayerNorm::new(width, 1e-5, vb.pp("xedge_layer_norm"))?,
            scalar_mlp: [
                linear(width, width, true, init, s.pp(0))?,
                linear(width, 1, true, init, s.pp(2))?,
            ],
            irrep2_mlp: [
                linear(width, width, true, init, i.pp(0))?,
                linear(width, 1, true, init, i.pp(2))?,
            ],
            lmax: config.lmax(),
        })
    }

    /// Stress `[B, 3, 3]` from the final node embeddings `x` and the detached edge vectors
    /// (weight dtype).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        graph: &EdgeGraph,
        edge_vectors: &Tensor,
        batch: &BatchTensors,
    ) -> Result<Tensor> {
        let (n, _, c) = x.dims3()?;
        let b = batch.n_structures();
        let (dtype, device) = (x.dtype(), x.device());
        let (node_scalar, node_irrep2) = if graph.n_edges == 0 {
            (
                Tensor::zeros((n, 2 * c), dtype, device)?,
                Tensor::zeros((n, 5, 2 * c), dtype, device)?,
            )
        } else {
            let sh = spherical_harmonics(edge_vectors, self.lmax, false, Normalization::Integral)?;
            let sh = self.sphharm_norm.forward(&sh.unsqueeze(2)?)?.squeeze(2)?;
            let x_edge = Tensor::cat(
                &[
                    &x.index_select(&graph.src, 0)?,
                    &x.index_select(&graph.dst, 0)?,
                ],
                2,
            )?;
            let x_edge = x_edge.broadcast_mul(&sh.unsqueeze(2)?)?.sum(1)?;
            let x_edge = self.xedge_layer_norm.forward(&x_edge)?;
            let y2 = spherical_harmonics(edge_vectors, 2, true, Normalization::Integral)?
                .narrow(1, 4, 5)?;
            let edge_irrep2 = y2.unsqueeze(2)?.broadcast_mul(&x_edge.unsqueeze(1)?)?;
            // Mean over incoming edges (torch_scatter's mean: 0 for nodes without edges).
            let counts: Vec<f64> = graph
                .segments
                .counts()
                .iter()
                .map(|&k| 1.0 / k.max(1) as f64)
                .collect();
            let inv = Tensor::from_vec(counts, n, device)?.to_dtype(dtype)?;
            (
                graph
                    .segments
                    .sum(&x_edge)?
                    .broadcast_mul(&inv.unsqueeze(1)?)?,
                graph
                    .segments
                    .sum(&edge_irrep2)?
                    .broadcast_mul(&inv.reshape((n, 1, 1))?)?,
            )
        };
        let mlp = |layers: &[Linear; 2], h: &Tensor| -> Result<Tensor> {
            Ok(layers[1].forward(&silu(&layers[0].forward(h)?.contiguous()?)?)?)
        };
        let scalar = mlp(&self.scalar_mlp, &node_scalar)?; // [N, 1]
        let irrep2 = mlp(&self.irrep2_mlp, &node_irrep2)?.squeeze(D::Minus1)?; // [N, 5]
        let per_node = Tensor::cat(&[&scalar, &irrep2], 1)?; // [N, 6]
        let summed =
            Tensor::zeros((b, 6), dtype, device)?.index_add(&batch.node_structure, &per_node, 0)?;
        let atoms = batch.n_atoms.to_dtype(dtype)?.clamp(1.0, f64::INFINITY)?;
        let mean = summed.broadcast_div(&atoms.unsqueeze(1)?)?;
        let compose: Vec<f64> = COMPOSE.iter().flatten().copied().collect();
        let compose = Tensor::from_vec(compose, (6, 9), device)?.to_dtype(dtype)?;
        Ok(mean.matmul(&compose)?.reshape((b, 3, 3))?)
    }
}
