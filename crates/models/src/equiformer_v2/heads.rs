//! The OMat24 output heads of EquiformerV2: energy (fairchem `EqV2ScalarHead`), direct forces
//! (`EqV2VectorHead`, in [`super::EquiformerV2`] as one more [`GraphAttention`]) and the
//! rank-2 stress ([`StressHead`], `Rank2SymmetricTensorHead` with `decompose = True` and
//! `use_source_target_embedding = True`).
//!
//! [`GraphAttention`]: super::blocks::GraphAttention

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};
use candle_nn::{Linear, Module, VarBuilder};
use matscale_equivariant::activation::silu;
use matscale_equivariant::buffer::{contiguous_input, zeroed_vec};
use matscale_equivariant::norms::{EquivariantNorm, LayerNorm};
use matscale_equivariant::sh::{spherical_harmonics, Normalization};

use super::blocks::{linear, norm, EdgeEnds, EdgeGraph, WeightInit};
use super::config::EquiformerV2Config;
use crate::batch::{BatchTensors, Grouping};
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
            let x_edge = edge_contract(x, &sh, graph)?;
            let x_edge = self.xedge_layer_norm.forward(&x_edge)?;
            let y2 = spherical_harmonics(edge_vectors, 2, true, Normalization::Integral)?
                .narrow(1, 4, 5)?;
            let edge_irrep2 = y2.unsqueeze(2)?.broadcast_mul(&x_edge.unsqueeze(1)?)?;
            // Mean over incoming edges (torch_scatter's mean: 0 for nodes without edges).
            let counts: Vec<f64> = graph
                .segments()
                .counts()
                .iter()
                .map(|&k| 1.0 / k.max(1) as f64)
                .collect();
            let inv = Tensor::from_vec(counts, n, device)?.to_dtype(dtype)?;
            (
                graph
                    .segments()
                    .sum(&x_edge)?
                    .broadcast_mul(&inv.unsqueeze(1)?)?,
                graph
                    .segments()
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
        let summed = batch.sum_over(Grouping::NodesByStructure, &per_node)?;
        let atoms = batch.n_atoms.to_dtype(dtype)?.clamp(1.0, f64::INFINITY)?;
        let mean = summed.broadcast_div(&atoms.unsqueeze(1)?)?;
        let compose: Vec<f64> = COMPOSE.iter().flatten().copied().collect();
        let compose = Tensor::from_vec(compose, (6, 9), device)?.to_dtype(dtype)?;
        Ok(mean.matmul(&compose)?.reshape((b, 3, 3))?)
    }
}

/// `[Σ_k sh[e, k] · x[src e, k, :] ‖ Σ_k sh[e, k] · x[dst e, k, :]]`: the stress head's edge
/// features, `x` `[N, K, C]` and `sh` `[E, K]` → `[E, 2C]`.
///
/// On the CPU (f32, f64, first-order gradients) one op, [`EdgeContract`], that never builds
/// the gathered `[E, K, 2C]` message; otherwise the composed `index_select` → `cat` →
/// `broadcast_mul` → `sum`, which gradients of gradients flow through.
fn edge_contract(x: &Tensor, sh: &Tensor, graph: &EdgeGraph) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && sh.dtype() == x.dtype()
        && !matscale_equivariant::higher_order_gradients_requested();
    if !fused {
        let x_edge = Tensor::cat(&[&graph.src.gather(x)?, &graph.dst.gather(x)?], 2)?;
        return Ok(x_edge.broadcast_mul(&sh.unsqueeze(2)?)?.sum(1)?);
    }
    let op = EdgeContract {
        ends: graph.ends.clone(),
    };
    Ok(x.contiguous()?.apply_op2(&sh.contiguous()?, op)?)
}

/// The CPU op of [`edge_contract`] (args: `x` `[N, K, C]`, `sh` `[E, K]`); its backward is
/// [`EdgeContractBackward`], first order.
#[derive(Debug, Clone)]
struct EdgeContract {
    ends: EdgeEnds,
}

impl EdgeContract {
    /// Checks the shapes and indices; returns `(N, K, C)`.
    fn check(
        &self,
        lx: &Layout,
        lsh: &Layout,
        name: &str,
    ) -> candle_core::Result<(usize, usize, usize)> {
        let (n, k, c) = lx.shape().dims3()?;
        let (e, ksh) = lsh.shape().dims2()?;
        if e != self.ends.len() || ksh != k {
            candle_core::bail!(
                "{name}: sh must be [E = {}, K = {k}], got {:?}",
                self.ends.len(),
                lsh.shape()
            );
        }
        self.ends.check_below(n, name)?;
        Ok((n, k, c))
    }

    fn run<T: WithDType>(&self, x: &[T], sh: &[T], (k, c): (usize, usize)) -> Vec<T> {
        use rayon::prelude::*;
        let mut out = zeroed_vec::<T>(self.ends.len() * 2 * c);
        out.par_chunks_mut(2 * c)
            .enumerate()
            .for_each(|(edge, row)| {
                let w = &sh[edge * k..(edge + 1) * k];
                for (half, node) in row
                    .chunks_exact_mut(c)
                    .zip([self.ends.src[edge], self.ends.dst[edge]])
                {
                    let node = &x[node as usize * k * c..(node as usize + 1) * k * c];
                    for (&wk, xk) in w.iter().zip(node.chunks_exact(c)) {
                        for (o, &v) in half.iter_mut().zip(xk) {
                            *o += wk * v;
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp2 for EdgeContract {
    fn name(&self) -> &'static str {
        "stress-edge-contract"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_, k, c) = self.check(l1, l2, name)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(sh)) => CpuStorage::F32(self.run(
                contiguous_input(x, l1, name)?,
                contiguous_input(sh, l2, name)?,
                (k, c),
            )),
            (CpuStorage::F64(x), CpuStorage::F64(sh)) => CpuStorage::F64(self.run(
                contiguous_input(x, l1, name)?,
                contiguous_input(sh, l2, name)?,
                (k, c),
            )),
            _ => candle_core::bail!("{name}: x and sh must both be f32 or both f64"),
        };
        Ok((out, (self.ends.len(), 2 * c).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        sh: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k, c) = x.dims3()?;
        let e = self.ends.len();
        let back = EdgeContractBackward {
            forward: self.clone(),
        };
        let flat = x.apply_op3_no_bwd(sh, &grad_res.contiguous()?, &back)?;
        let dx = flat.narrow(0, 0, n * k * c)?.reshape((n, k, c))?;
        let dsh = flat.narrow(0, n * k * c, e * k)?.reshape((e, k))?;
        Ok((Some(dx), Some(dsh)))
    }
}

/// Backward of [`EdgeContract`] (args: `x`, `sh`, `grad` `[E, 2C]`) → `[∂x (N·K·C) ‖ ∂sh
/// (E·K)]` flat. `∂x` is summed per node over the node's edges (as source, then as target),
/// in edge order: deterministic, no atomics.
#[derive(Debug, Clone)]
struct EdgeContractBackward {
    forward: EdgeContract,
}

impl EdgeContractBackward {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        sh: &[T],
        g: &[T],
        (n, k, c): (usize, usize, usize),
    ) -> Vec<T> {
        use rayon::prelude::*;
        let (src, dst) = (&self.forward.ends.src, &self.forward.ends.dst);
        let e = src.len();
        // Edges of every node as source, then as target (counting sort, edge order kept).
        let mut offsets = vec![0usize; n + 1];
        for &i in src.iter().chain(dst.iter()) {
            offsets[i as usize + 1] += 1;
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let mut fill = offsets.clone();
        let mut slots = vec![0usize; 2 * e];
        for (slot, &i) in src.iter().chain(dst.iter()).enumerate() {
            slots[fill[i as usize]] = slot;
            fill[i as usize] += 1;
        }
        let mut out = zeroed_vec::<T>(n * k * c + e * k);
        let (dx, dsh) = out.split_at_mut(n * k * c);
        dx.par_chunks_mut(k * c)
            .enumerate()
            .for_each(|(node, rows)| {
                for &slot in &slots[offsets[node]..offsets[node + 1]] {
                    // slot < E: the edge's source half; otherwise its target half.
                    let (edge, half) = (slot % e, slot / e);
                    let ge = &g[edge * 2 * c + half * c..][..c];
                    for (&w, row) in sh[edge * k..(edge + 1) * k]
                        .iter()
                        .zip(rows.chunks_exact_mut(c))
                    {
                        for (r, &v) in row.iter_mut().zip(ge) {
                            *r += w * v;
                        }
                    }
                }
            });
        dsh.par_chunks_mut(k).enumerate().for_each(|(edge, row)| {
            for (half, node) in [src[edge], dst[edge]].into_iter().enumerate() {
                let ge = &g[edge * 2 * c + half * c..][..c];
                let xn = &x[node as usize * k * c..(node as usize + 1) * k * c];
                for (r, xk) in row.iter_mut().zip(xn.chunks_exact(c)) {
                    *r += xk
                        .iter()
                        .zip(ge)
                        .fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                }
            }
        });
        out
    }
}

impl CustomOp3 for EdgeContractBackward {
    fn name(&self) -> &'static str {
        "stress-edge-contract-backward"
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
        let (n, k, c) = self.forward.check(l1, l2, name)?;
        let e = self.forward.ends.len();
        if l3.shape().dims() != [e, 2 * c] {
            candle_core::bail!(
                "{name}: grad must be [{e}, {}], got {:?}",
                2 * c,
                l3.shape()
            );
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(sh), CpuStorage::F32(g)) => {
                CpuStorage::F32(self.run(
                    contiguous_input(x, l1, name)?,
                    contiguous_input(sh, l2, name)?,
                    contiguous_input(g, l3, name)?,
                    (n, k, c),
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(sh), CpuStorage::F64(g)) => {
                CpuStorage::F64(self.run(
                    contiguous_input(x, l1, name)?,
                    contiguous_input(sh, l2, name)?,
                    contiguous_input(g, l3, name)?,
                    (n, k, c),
                ))
            }
            _ => candle_core::bail!("{name}: x, sh and grad must share f32 or f64"),
        };
        Ok((out, (n * k * c + e * k,).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < tol, "max difference {d}");
    }

    /// The fused edge contraction and its gradients equal the composed candle ops (f64),
    /// including nodes with no edges and repeated edges.
    #[test]
    fn edge_contraction_matches_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, c) = (6, 9, 5);
        let src: Vec<u32> = vec![0, 2, 2, 5, 1, 0, 3];
        let dst: Vec<u32> = vec![1, 1, 3, 3, 3, 4, 4];
        let e = src.len();
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, k, c), &dev)?)?;
        let sh = Var::from_tensor(&Tensor::randn(0f64, 1.0, (e, k), &dev)?)?;
        let w = Tensor::randn(0f64, 1.0, (e, 2 * c), &dev)?;
        let src_t = Tensor::new(src.as_slice(), &dev)?;
        let dst_t = Tensor::new(dst.as_slice(), &dev)?;
        let fused = EdgeContract {
            ends: EdgeEnds {
                src: src.clone().into(),
                dst: dst.clone().into(),
            },
        };
        let y = x.as_tensor().apply_op2(sh.as_tensor(), fused)?;
        let composed = Tensor::cat(
            &[
                &x.as_tensor().index_select(&src_t, 0)?,
                &x.as_tensor().index_select(&dst_t, 0)?,
            ],
            2,
        )?
        .broadcast_mul(&sh.as_tensor().unsqueeze(2)?)?
        .sum(1)?;
        close(&y, &composed, 1e-12);
        let g1 = (&y * &w)?.sum_all()?.backward()?;
        let g2 = (&composed * &w)?.sum_all()?.backward()?;
        close(g1.get(&x).expect("dx"), g2.get(&x).expect("dx"), 1e-12);
        close(g1.get(&sh).expect("dsh"), g2.get(&sh).expect("dsh"), 1e-12);
        // Nodes 0, 2 and 5 are never targets, node 4 never a source (checked above); an index
        // out of range is an error, not a panic.
        let bad = EdgeContract {
            ends: EdgeEnds {
                src: vec![0, 9].into(),
                dst: vec![1, 1].into(),
            },
        };
        let sh2 = Tensor::zeros((2, k), DType::F64, &dev)?;
        assert!(x.as_tensor().apply_op2(&sh2, bad).is_err());
        Ok(())
    }
}
