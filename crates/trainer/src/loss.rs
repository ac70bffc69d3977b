//! The training loss of the study and the error metrics.
//!
//! `L = w_E·MAE(E/n) + w_F·mean_atoms‖ΔF‖₂ + w_iso·MAE(iso σ) + w_dev·MAE(dev σ)` with the
//! study's weights (2.5, 20, 5, 5) as default. The stress is split in Voigt order
//! (xx, yy, zz, yz, xz, xy) into its isotropic part `[p, p, p, 0, 0, 0]`, `p = tr σ / 3`, and
//! the rest; each MAE is the mean absolute error over the six Voigt components and the
//! labelled structures. A structure without a label contributes nothing to that term (a term
//! with no labels in the batch is zero).

use candle_core::{DType, Device, Tensor, D};
use matscale_models::Prediction;
use matscale_structures::batch::GraphBatch;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Weights of the loss terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossWeights {
    /// Energy-per-atom MAE weight (study: 2.5).
    pub energy: f64,
    /// Force L2-MAE weight (study: 20).
    pub forces: f64,
    /// Isotropic-stress MAE weight (study: 5).
    pub stress_isotropic: f64,
    /// Deviatoric-stress MAE weight (study: 5).
    pub stress_deviatoric: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            energy: 2.5,
            forces: 20.0,
            stress_isotropic: 5.0,
            stress_deviatoric: 5.0,
        }
    }
}

/// The labels of a batch as tensors with masks.
#[derive(Debug, Clone)]
pub struct Labels {
    /// Energy per atom, eV, `[B]`.
    energy_per_atom: Tensor,
    /// 1 where the structure has an energy, `[B]`.
    energy_mask: Tensor,
    /// Forces, eV/Å, `[N, 3]`.
    forces: Tensor,
    /// 1 for atoms of structures with forces, `[N]`.
    force_mask: Tensor,
    /// Stress, eV/Å^3, `[B, 3, 3]`.
    stress: Tensor,
    /// 1 where the structure has stress, `[B]`.
    stress_mask: Tensor,
    /// Atoms per structure, `[B]`.
    n_atoms: Tensor,
    counts: [usize; 3],
}

impl Labels {
    /// The labels of `batch` in `dtype` on `device`.
    pub fn new(batch: &GraphBatch, dtype: DType, device: &Device) -> Result<Self> {
        let b = batch.n_structures();
        let n = batch.n_nodes();
        let atoms = batch.atoms_per_structure();
        let mask = |m: &[bool]| -> Vec<f64> { m.iter().map(|&x| f64::from(u8::from(x))).collect() };
        let per_atom: Vec<f64> = batch
            .energy
            .iter()
            .zip(&atoms)
            .map(|(e, &a)| e / a.max(1) as f64)
            .collect();
        let force_mask: Vec<f64> = batch
            .node_structure
            .iter()
            .map(|&s| f64::from(u8::from(batch.has_forces[s as usize])))
            .collect();
        let t = |v: Vec<f64>, shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let counts = [
            batch.has_energy.iter().filter(|&&x| x).count(),
            force_mask.iter().filter(|&&x| x > 0.0).count(),
            batch.has_stress.iter().filter(|&&x| x).count(),
        ];
        Ok(Self {
            energy_per_atom: t(per_atom, &[b])?,
            energy_mask: t(mask(&batch.has_energy), &[b])?,
            forces: t(batch.forces.clone(), &[n, 3])?,
            force_mask: t(force_mask, &[n])?,
            stress: t(batch.stress.clone(), &[b, 3, 3])?,
            stress_mask: t(mask(&batch.has_stress), &[b])?,
            n_atoms: t(atoms.iter().map(|&a| a.max(1) as f64).collect(), &[b])?,
            counts,
        })
    }

    /// Labelled structures (energy), labelled atoms (forces), labelled structures (stress).
    pub fn counts(&self) -> [usize; 3] {
        self.counts
    }
}

/// The loss terms of a batch as differentiable scalars, with the total.
#[derive(Debug, Clone)]
pub struct LossTerms {
    /// Weighted total (scalar tensor).
    pub total: Tensor,
    /// Energy-per-atom MAE, eV/atom.
    pub energy: Tensor,
    /// Force L2-MAE (mean Euclidean norm of the error), eV/Å.
    pub forces: Tensor,
    /// Isotropic-stress MAE, eV/Å^3.
    pub stress_isotropic: Tensor,
    /// Deviatoric-stress MAE, eV/Å^3.
    pub stress_deviatoric: Tensor,
}

/// Host values of the loss terms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossValues {
    /// Weighted total.
    pub total: f64,
    /// Energy-per-atom MAE, eV/atom.
    pub energy: f64,
    /// Force L2-MAE, eV/Å.
    pub forces: f64,
    /// Isotropic-stress MAE, eV/Å^3.
    pub stress_isotropic: f64,
    /// Deviatoric-stress MAE, eV/Å^3.
    pub stress_deviatoric: f64,
}

impl LossTerms {
    /// The host values.
    pub fn values(&self) -> Result<LossValues> {
        let v = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok(LossValues {
            total: v(&self.total)?,
            energy: v(&self.energy)?,
            forces: v(&self.forces)?,
            stress_isotropic: v(&self.stress_isotropic)?,
            stress_deviatoric: v(&self.stress_deviatoric)?,
        })
    }
}

/// Masked mean: `Σ values·mask / max(Σ mask, 1)` over all elements of `values` `[B, k...]`
/// with `mask` `[B]`; `per_row` is the number of elements per row.
fn masked_mean(values: &Tensor, mask: &Tensor, per_row: usize) -> Result<Tensor> {
    let b = mask.dim(0)?;
    let rows = values.reshape((b, per_row))?.sum(D::Minus1)?;
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(((rows * mask)?.sum_all()? / (count.max(1.0) * per_row as f64))?)
}

/// Splits stress `[B, 3, 3]` into isotropic and deviatoric Voigt vectors `[B, 6]`.
fn voigt_parts(stress: &Tensor) -> Result<(Tensor, Tensor)> {
    let b = stress.dim(0)?;
    let flat = stress.reshape((b, 9))?;
    // Voigt xx, yy, zz, yz, xz, xy = flat indices 0, 4, 8, 5, 2, 1.
    let index = Tensor::new(&[0u32, 4, 8, 5, 2, 1], stress.device())?;
    let voigt = flat.index_select(&index, 1)?;
    let p = (voigt.narrow(1, 0, 3)?.sum_keepdim(1)? / 3.0)?;
    let zeros = Tensor::zeros((b, 3), stress.dtype(), stress.device())?;
    let iso = Tensor::cat(&[&p, &p, &p, &zeros], 1)?;
    let dev = (&voigt - &iso)?;
    Ok((iso, dev))
}

/// The loss of `prediction` against `labels` (see the [module docs](self)).
pub fn loss(prediction: &Prediction, labels: &Labels, weights: &LossWeights) -> Result<LossTerms> {
    let dtype = prediction.energy.dtype();
    let labels_in = |t: &Tensor| t.to_dtype(dtype);
    let e_err = (prediction
        .energy
        .broadcast_div(&labels_in(&labels.n_atoms)?)?
        - labels_in(&labels.energy_per_atom)?)?
    .abs()?;
    let energy = masked_mean(&e_err, &labels_in(&labels.energy_mask)?, 1)?;
    // ‖ΔF‖ with a tiny floor inside the root so that its gradient is finite at zero error.
    let f_err = ((&prediction.forces - labels_in(&labels.forces)?)?
        .sqr()?
        .sum(D::Minus1)?
        + 1e-12)?
        .sqrt()?;
    let forces = masked_mean(&f_err, &labels_in(&labels.force_mask)?, 1)?;
    let (iso_p, dev_p) = voigt_parts(&prediction.stress)?;
    let (iso_l, dev_l) = voigt_parts(&labels_in(&labels.stress)?)?;
    let stress_mask = labels_in(&labels.stress_mask)?;
    let stress_isotropic = masked_mean(&(iso_p - iso_l)?.abs()?, &stress_mask, 6)?;
    let stress_deviatoric = masked_mean(&(dev_p - dev_l)?.abs()?, &stress_mask, 6)?;
    let total = ((((&energy * weights.energy)? + (&forces * weights.forces)?)?
        + (&stress_isotropic * weights.stress_isotropic)?)?
        + (&stress_deviatoric * weights.stress_deviatoric)?)?;
    Ok(LossTerms {
        total,
        energy,
        forces,
        stress_isotropic,
        stress_deviatoric,
    })
}
