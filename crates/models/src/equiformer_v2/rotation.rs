//! Edge frames of one forward pass and the rotations into and out of them.
//!
//! [`EdgeFrames::Detached`] holds fairchem's detached Wigner-D blocks, rotated by the fused
//! kernels of [`matscale_equivariant::so2`] (direct forces: nothing differentiates the frames).
//! [`EdgeFrames::Differentiable`] holds the blocks of
//! [`matscale_equivariant::frames_diff::zero_roll_wigner`], built from the edge vectors with
//! plain candle ops, and rotates with the same block-diagonal kernels in their form that is
//! differentiable in the blocks ([`so2::rotate_differentiable`]), so that `−∂E/∂r` includes
//! every path through the frames (conservative forces and stress) and training on those forces
//! differentiates it again. The blocks read the frames only through [`EdgeFrames`]' methods,
//! which pick the path.

use candle_core::Tensor;
use matscale_equivariant::frames_diff::zero_roll_wigner;
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::so2;
use matscale_equivariant::so2::So2Convolution;
use matscale_equivariant::wigner::WignerBlocks;

use crate::error::Result;

/// The edge frames of one forward pass (see the [module docs](self)).
#[derive(Debug, Clone)]
pub(crate) enum EdgeFrames {
    /// Detached blocks, fused rotations.
    Detached(WignerBlocks),
    /// Blocks with their graph back to the edge vectors.
    Differentiable {
        /// The blocks `[E, blocks_len(lmax)]` ([`WignerBlocks`]' layout).
        blocks: Tensor,
        /// The layout the rotations map between.
        layout: SphericalLayout,
    },
}

impl EdgeFrames {
    /// Differentiable zero-roll frames of `edge_vectors` (`[E, 3]`, E ≥ 1, with their graph)
    /// for `layout`.
    pub(crate) fn differentiable(edge_vectors: &Tensor, layout: SphericalLayout) -> Result<Self> {
        let blocks = zero_roll_wigner(edge_vectors, layout.lmax())?;
        let flat = Tensor::cat(
            &blocks
                .iter()
                .map(|b| b.flatten_from(1))
                .collect::<candle_core::Result<Vec<_>>>()?,
            1,
        )?;
        Ok(Self::Differentiable {
            blocks: flat,
            layout,
        })
    }

    /// The blocks `[E, blocks_len(lmax)]` (layout of [`WignerBlocks`]): detached, or with
    /// their graph back to the edge vectors.
    pub(crate) fn blocks(&self) -> &Tensor {
        match self {
            Self::Detached(blocks) => blocks.blocks(),
            Self::Differentiable { blocks, .. } => blocks,
        }
    }

    /// fairchem's `rotate` + `_m_primary` + `SO2_Convolution`: l-major `x`
    /// `[E, (lmax+1)², C_in]` → m-major `[E, n_truncated, C_out]` and the extra `m = 0`
    /// outputs (see [`So2Convolution::forward_rotate_in`]).
    pub(crate) fn conv_rotate_in(
        &self,
        conv: &So2Convolution,
        x: &Tensor,
        radial: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Self::Detached(blocks) => Ok(conv.forward_rotate_in(x, blocks, radial)?),
            Self::Differentiable { blocks, layout } => {
                Ok(conv.forward(&so2::rotate_differentiable(x, blocks, *layout)?, radial)?)
            }
        }
    }

    /// `SO2_Convolution` + `_l_primary` + `rotate_inv` (with its rescale): m-major `y`
    /// `[E, n_truncated, C_in]` → l-major `[E, (lmax+1)², C_out]` (see
    /// [`So2Convolution::forward_rotate_out`]).
    pub(crate) fn conv_rotate_out(
        &self,
        conv: &So2Convolution,
        y: &Tensor,
        radial: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Self::Detached(blocks) => Ok(conv.forward_rotate_out(y, blocks, radial)?),
            Self::Differentiable { blocks, layout } => {
                let (out, extra) = conv.forward(y, radial)?;
                Ok((
                    so2::rotate_inv_differentiable(&out, blocks, *layout)?,
                    extra,
                ))
            }
        }
    }

    /// fairchem's `rotate` + `_m_primary` alone (tests compare the two variants with it).
    #[cfg(test)]
    fn rotate(&self, x: &Tensor, layout: SphericalLayout) -> Result<Tensor> {
        match self {
            Self::Detached(blocks) => Ok(so2::rotate(x, blocks, layout)?),
            Self::Differentiable { blocks, .. } => {
                Ok(so2::rotate_differentiable(x, blocks, layout)?)
            }
        }
    }

    /// `_l_primary` + `rotate_inv` alone.
    #[cfg(test)]
    fn rotate_inv(&self, y: &Tensor, layout: SphericalLayout) -> Result<Tensor> {
        match self {
            Self::Detached(blocks) => Ok(so2::rotate_inv(y, blocks, layout)?),
            Self::Differentiable { blocks, .. } => {
                Ok(so2::rotate_inv_differentiable(y, blocks, layout)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use matscale_equivariant::frames::{edge_wigner, Roll};

    fn host(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn differentiable_frames_are_zero_roll_frames_and_rotate_as_the_detached_ones() {
        let v = [
            1.0f64, 2.0, -0.5, 0.3, -0.2, 2.2, -1.5, 0.4, 0.9, 2.0, 0.1, -0.3,
        ];
        let r = Tensor::from_slice(&v, (4, 3), &Device::Cpu).unwrap();
        for (lmax, mmax) in [(4, 2), (2, 1), (3, 3)] {
            let layout = SphericalLayout::new(lmax, mmax).unwrap();
            let diff = EdgeFrames::differentiable(&r, layout).unwrap();
            // The same blocks (the first edge is in the second chart, so not edge_wigner's).
            let fused =
                EdgeFrames::Detached(WignerBlocks::new(diff.blocks().detach(), lmax).unwrap());
            let zero_roll = edge_wigner(&r, lmax, &Roll::Zero).unwrap();
            let tail = |t: &Tensor| host(&t.narrow(0, 1, 3).unwrap());
            let err = tail(diff.blocks())
                .iter()
                .zip(tail(zero_roll.blocks()))
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err < 1e-12,
                "first-chart edges have the zero-roll frames: {err:e}"
            );
            let k = layout.num_coefficients();
            let x: Vec<f64> = (0..4 * k * 3)
                .map(|i| ((i * 37 % 11) as f64) - 5.0)
                .collect();
            let x = Tensor::from_vec(x, (4, k, 3), &Device::Cpu).unwrap();
            let a = diff.rotate(&x, layout).unwrap();
            let b = fused.rotate(&x, layout).unwrap();
            let err = host(&(a.clone() - b).unwrap())
                .iter()
                .fold(0.0f64, |m, d| m.max(d.abs()));
            assert!(err < 1e-12, "rotate ({lmax}, {mmax}): {err:e}");
            let a = diff.rotate_inv(&a, layout).unwrap();
            let b = fused
                .rotate_inv(&fused.rotate(&x, layout).unwrap(), layout)
                .unwrap();
            let err = host(&(a - b).unwrap())
                .iter()
                .fold(0.0f64, |m, d| m.max(d.abs()));
            assert!(err < 1e-12, "rotate_inv ({lmax}, {mmax}): {err:e}");
        }
    }
}
