//! Evaluation of a model on a data set: error metrics over the whole set, in the units the
//! field reports (meV/atom, meV/Å, meV/Å^3), and the predictions themselves.

use candle_core::{DType, Device, Tensor};
use matscale_models::AtomisticModel;
use matscale_structures::Structure;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::Result;
use crate::loss::{LossValues, LossWeights};

/// Error metrics over a data set. MAEs are means over labelled structures (energy, stress) or
/// labelled atoms (forces).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Structures evaluated.
    pub n_structures: usize,
    /// Energy MAE per atom, meV/atom.
    pub energy_mae_mev_per_atom: f64,
    /// Energy RMSE per atom, meV/atom.
    pub energy_rmse_mev_per_atom: f64,
    /// Force MAE over Cartesian components, meV/Å (the figure most papers quote).
    pub force_mae_mev_per_angstrom: f64,
    /// Force RMSE over Cartesian components, meV/Å.
    pub force_rmse_mev_per_angstrom: f64,
    /// Mean Euclidean norm of the force error, meV/Å (the study's force loss).
    pub force_l2_mae_mev_per_angstrom: f64,
    /// Stress MAE over the six Voigt components, meV/Å^3.
    pub stress_mae_mev_per_angstrom3: f64,
    /// The study's loss over the set, from the set-level MAEs (eV units, as in training).
    pub loss: LossValues,
}

/// Predictions of one structure, eV, eV/Å, eV/Å^3.
#[derive(Debug, Clone, PartialEq)]
pub struct StructurePrediction {
    /// Total energy.
    pub energy: f64,
    /// Forces per atom.
    pub forces: Vec<[f64; 3]>,
    /// Stress (ASE sign).
    pub stress: [[f64; 3]; 3],
}

#[derive(Default)]
struct Sums {
    structures: usize,
    e_abs: f64,
    e_sq: f64,
    e_n: usize,
    f_abs: f64,
    f_sq: f64,
    f_norm: f64,
    f_atoms: usize,
    s_abs: f64,
    s_iso: f64,
    s_dev: f64,
    s_n: usize,
}

const VOIGT: [(usize, usize); 6] = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)];

impl Sums {
    fn add(&mut self, s: &Structure, p: &StructurePrediction) {
        self.structures += 1;
        let n = s.len().max(1) as f64;
        if let Some(e) = s.energy() {
            let d = (p.energy - e) / n;
            self.e_abs += d.abs();
            self.e_sq += d * d;
            self.e_n += 1;
        }
        if let Some(f) = s.forces() {
            for (fp, fl) in p.forces.iter().zip(f) {
                let mut norm = 0.0;
                for c in 0..3 {
                    let d = fp[c] - fl[c];
                    self.f_abs += d.abs();
                    self.f_sq += d * d;
                    norm += d * d;
                }
                self.f_norm += norm.sqrt();
                self.f_atoms += 1;
            }
        }
        if let Some(m) = s.stress() {
            let voigt = |t: &[[f64; 3]; 3]| VOIGT.map(|(i, j)| t[i][j]);
            let (vp, vl) = (voigt(&p.stress), voigt(m));
            let pp = (vp[0] + vp[1] + vp[2]) / 3.0;
            let pl = (vl[0] + vl[1] + vl[2]) / 3.0;
            for k in 0..6 {
                let iso = if k < 3 { pp - pl } else { 0.0 };
                self.s_abs += (vp[k] - vl[k]).abs();
                self.s_iso += iso.abs();
                self.s_dev += (vp[k] - vl[k] - iso).abs();
            }
            self.s_n += 1;
        }
    }

    fn metrics(&self, weights: &LossWeights) -> EvalMetrics {
        let div = |a: f64, n: usize| if n == 0 { 0.0 } else { a / n as f64 };
        let energy = div(self.e_abs, self.e_n);
        let forces_l2 = div(self.f_norm, self.f_atoms);
        let iso = div(self.s_iso, 6 * self.s_n);
        let dev = div(self.s_dev, 6 * self.s_n);
        EvalMetrics {
            n_structures: self.structures,
            energy_mae_mev_per_atom: 1e3 * energy,
            energy_rmse_mev_per_atom: 1e3 * div(self.e_sq, self.e_n).sqrt(),
            force_mae_mev_per_angstrom: 1e3 * div(self.f_abs, 3 * self.f_atoms),
            force_rmse_mev_per_angstrom: 1e3 * div(self.f_sq, 3 * self.f_atoms).sqrt(),
            force_l2_mae_mev_per_angstrom: 1e3 * forces_l2,
            stress_mae_mev_per_angstrom3: 1e3 * div(self.s_abs, 6 * self.s_n),
            loss: LossValues {
                total: weights.energy * energy
                    + weights.forces * forces_l2
                    + weights.stress_isotropic * iso
                    + weights.stress_deviatoric * dev,
                energy,
                forces: forces_l2,
                stress_isotropic: iso,
                stress_deviatoric: dev,
            },
        }
    }
}

/// Predicts every structure of `data` in batches of `batch_size`.
pub fn predict_all(
    model: &AtomisticModel,
    data: &Dataset,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<StructurePrediction>> {
    let order: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.batches(&order, batch_size) {
        let batch = data.batch(chunk)?;
        let tensors = matscale_models::BatchTensors::new(&batch, model.dtype(), device)?;
        let p = model.predict(&tensors, false)?;
        let host = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(t.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
        };
        let (energy, forces, stress) = (host(&p.energy)?, host(&p.forces)?, host(&p.stress)?);
        for s in 0..batch.n_structures() {
            let (n0, n1) = (batch.node_ptr[s], batch.node_ptr[s + 1]);
            let m = &stress[9 * s..9 * s + 9];
            out.push(StructurePrediction {
                energy: energy[s],
                forces: forces[3 * n0..3 * n1]
                    .chunks_exact(3)
                    .map(|f| [f[0], f[1], f[2]])
                    .collect(),
                stress: [[m[0], m[1], m[2]], [m[3], m[4], m[5]], [m[6], m[7], m[8]]],
            });
        }
    }
    Ok(out)
}

/// Metrics of `predictions` against the labels of `structures`.
pub fn metrics(
    structures: &[Structure],
    predictions: &[StructurePrediction],
    weights: &LossWeights,
) -> EvalMetrics {
    let mut sums = Sums::default();
    for (s, p) in structures.iter().zip(predictions) {
        sums.add(s, p);
    }
    sums.metrics(weights)
}

/// Evaluates `model` on `data`: predictions and metrics.
pub fn evaluate(
    model: &AtomisticModel,
    data: &Dataset,
    batch_size: usize,
    weights: &LossWeights,
    device: &Device,
) -> Result<(EvalMetrics, Vec<StructurePrediction>)> {
    let predictions = predict_all(model, data, batch_size, device)?;
    Ok((
        metrics(data.structures(), &predictions, weights),
        predictions,
    ))
}
