//! The model interface: a network ([`Model`]) wrapped with the physics every family shares
//! ([`AtomisticModel`]): energy references and scales, direct or conservative forces and stress.
//!
//! ## Contract of a [`Model`]
//! * Input: a [`BatchTensors`] and a [`Geometry`] in the *master* dtype (f32 or f64). A model
//!   whose weights are in a lower precision (bf16, f16) computes its geometric features
//!   (distances, radial bases, coordinates) in the master dtype and casts them to its weight
//!   dtype itself; [`AtomisticModel`] casts the outputs back.
//! * Output ([`RawOutput`]): per-structure energies `[B]` in normalised units, and in
//!   [`ForceMode::Direct`] per-atom forces `[N, 3]` and per-structure stress `[B, 3, 3]`
//!   (symmetric), also normalised. In [`ForceMode::Conservative`] the model returns the energy
//!   only and must read positions and cells from the [`Geometry`] alone, so that the energy is
//!   a differentiable function of them.
//! * The model never sees labels, references or scales: [`AtomisticModel`] applies them.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::batch::{BatchShape, BatchTensors, Geometry, Grouping};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::flops::{FlopCounter, Flops};

/// How forces and stress are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForceMode {
    /// From output heads of the network (cheap; not energy-conserving).
    #[default]
    Direct,
    /// `F = −∂E/∂r` and `σ = (1/V) ∂E/∂ε` by automatic differentiation (energy-conserving,
    /// usable for molecular dynamics).
    Conservative,
}

impl std::str::FromStr for ForceMode {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "direct" => Ok(Self::Direct),
            "conservative" => Ok(Self::Conservative),
            other => Err(ModelError::config(
                "force_mode",
                format!("is `{other}`; expected `direct` or `conservative`"),
            )),
        }
    }
}

impl std::fmt::Display for ForceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Conservative => "conservative",
        })
    }
}

/// What a network returns, in normalised units (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct RawOutput {
    /// Energy per structure `[B]`.
    pub energy: Tensor,
    /// Direct forces `[N, 3]` (direct mode only).
    pub forces: Option<Tensor>,
    /// Direct stress `[B, 3, 3]`, symmetric (direct mode only).
    pub stress: Option<Tensor>,
}

/// A network of the zoo. See the [module docs](self) for the contract.
pub trait Model: Send + Sync + std::fmt::Debug {
    /// The forward pass; `train` enables dropout and other training-only behaviour.
    fn forward(&self, batch: &BatchTensors, geometry: &Geometry, train: bool) -> Result<RawOutput>;

    /// Replays the forward pass on `counter` for a batch of `shape` (see [`crate::flops`]).
    fn count_flops(&self, shape: &BatchShape, counter: &mut FlopCounter);

    /// One past the largest atomic number the model embeds.
    fn max_atomic_number(&self) -> usize;
}

/// Energies, forces and stress in physical units (ASE conventions).
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Total energy per structure, eV, `[B]`.
    pub energy: Tensor,
    /// Forces, eV/Å, `[N, 3]`.
    pub forces: Tensor,
    /// Stress, eV/Å^3, ASE sign, `[B, 3, 3]` (zero for structures without a cell).
    pub stress: Tensor,
}

/// Number of per-element reference energies (atomic numbers 0..=118).
pub const N_REFERENCE_ELEMENTS: usize = 119;

/// Values of the output normalisation: `E = energy_scale·E_net + Σ_atoms reference[Z]`,
/// `F = force_scale·F_net`, `σ = stress_scale·σ_net` (the last two in direct mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormalizerValues {
    /// Per-element reference energies, eV, indexed by atomic number (length 119).
    pub reference: Vec<f64>,
    /// Scale of the network's energy output, eV.
    pub energy_scale: f64,
    /// Scale of the direct force output, eV/Å.
    pub force_scale: f64,
    /// Scale of the direct stress output, eV/Å^3.
    pub stress_scale: f64,
}

impl Default for NormalizerValues {
    fn default() -> Self {
        Self {
            reference: vec![0.0; N_REFERENCE_ELEMENTS],
            energy_scale: 1.0,
            force_scale: 1.0,
            stress_scale: 1.0,
        }
    }
}

/// The output normalisation as tensors of the master dtype, stored with the weights under the
/// prefix [`Normalizer::PREFIX`] (not trained, not counted as parameters).
#[derive(Debug, Clone)]
pub struct Normalizer {
    reference: Tensor,
    energy_scale: Tensor,
    force_scale: Tensor,
    stress_scale: Tensor,
}

impl Normalizer {
    /// Name prefix of the normaliser tensors in a weight file.
    pub const PREFIX: &'static str = "normalizer";

    /// Creates (or loads) the normaliser tensors from `vb` (already pushed to [`Self::PREFIX`]).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        use candle_nn::Init;
        Ok(Self {
            reference: vb.get_with_hints(N_REFERENCE_ELEMENTS, "reference", Init::Const(0.0))?,
            energy_scale: vb.get_with_hints(1, "energy_scale", Init::Const(1.0))?,
            force_scale: vb.get_with_hints(1, "force_scale", Init::Const(1.0))?,
            stress_scale: vb.get_with_hints(1, "stress_scale", Init::Const(1.0))?,
        })
    }

    /// Writes `values` into the variables of `varmap` that back this normaliser.
    pub fn assign(varmap: &candle_nn::VarMap, values: &NormalizerValues) -> Result<()> {
        if values.reference.len() != N_REFERENCE_ELEMENTS {
            return Err(ModelError::config(
                "normalizer.reference",
                format!(
                    "has {} entries; expected {N_REFERENCE_ELEMENTS}",
                    values.reference.len()
                ),
            ));
        }
        let data = varmap
            .data()
            .lock()
            .expect("the var map lock is never poisoned");
        let set = |name: &str, v: &[f64]| -> Result<()> {
            let key = format!("{}.{name}", Self::PREFIX);
            let var = data
                .get(&key)
                .ok_or_else(|| ModelError::config(key.clone(), "is missing from the weights"))?;
            let t = Tensor::from_slice(v, v.len(), var.device())?.to_dtype(var.dtype())?;
            var.set(&t)?;
            Ok(())
        };
        set("reference", &values.reference)?;
        set("energy_scale", &[values.energy_scale])?;
        set("force_scale", &[values.force_scale])?;
        set("stress_scale", &[values.stress_scale])?;
        Ok(())
    }

    /// Reads the current values back.
    pub fn values(&self) -> Result<NormalizerValues> {
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?[0]) };
        Ok(NormalizerValues {
            reference: self.reference.to_dtype(DType::F64)?.to_vec1()?,
            energy_scale: scalar(&self.energy_scale)?,
            force_scale: scalar(&self.force_scale)?,
            stress_scale: scalar(&self.stress_scale)?,
        })
    }

    /// `energy_scale·raw + Σ reference[Z]` per structure, eV `[B]`.
    fn energy(&self, batch: &BatchTensors, raw: &Tensor) -> Result<Tensor> {
        let per_atom = self.reference.index_select(&batch.numbers, 0)?;
        let reference = batch.sum_over(Grouping::NodesByStructure, &per_atom)?;
        Ok(raw.broadcast_mul(&self.energy_scale)?.add(&reference)?)
    }
}

/// Everything needed to build a model: the architecture and the force mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The architecture and its size.
    pub model: ModelConfig,
    /// How forces and stress are obtained.
    #[serde(default)]
    pub force_mode: ForceMode,
}

impl ModelSpec {
    /// Validates the configuration.
    pub fn check(&self) -> Result<()> {
        self.model.check()
    }

    /// Exact number of trained parameters (normaliser excluded).
    pub fn n_parameters(&self) -> usize {
        self.model.n_parameters(self.force_mode)
    }

    /// Analytic FLOPs for a batch of `shape` without allocating the weights (the network is
    /// built on broadcast zeros), so that sweeps can be costed before they run.
    pub fn flops(&self, shape: &BatchShape) -> Result<Flops> {
        self.check()?;
        let net = self
            .model
            .build(self.force_mode, crate::init::shape_only_var_builder())?;
        let mut counter = FlopCounter::new();
        net.count_flops(shape, &mut counter);
        Ok(Flops {
            forward: counter.forward(),
            backward: counter.backward(),
            conservative: self.force_mode == ForceMode::Conservative,
            n_structures: shape.n_structures,
        })
    }
}

/// A network with its normaliser and force mode: maps a batch to physical energies, forces
/// and stress. See the [module docs](self).
#[derive(Debug)]
pub struct AtomisticModel {
    spec: ModelSpec,
    net: Box<dyn Model>,
    normalizer: Normalizer,
    master_dtype: DType,
}

impl AtomisticModel {
    /// Builds the model: the network from `net_vb` (any floating dtype) and the normaliser from
    /// `normalizer_vb` (the master dtype, f32 or f64, which is also the dtype of predictions).
    /// Both builders may be the same one.
    pub fn new(spec: &ModelSpec, net_vb: VarBuilder, normalizer_vb: VarBuilder) -> Result<Self> {
        spec.check()?;
        let master_dtype = normalizer_vb.dtype();
        if !matches!(master_dtype, DType::F32 | DType::F64) {
            return Err(ModelError::config(
                "precision",
                format!("master weights must be f32 or f64, not {master_dtype:?}"),
            ));
        }
        let net = spec.model.build(spec.force_mode, net_vb)?;
        let normalizer = Normalizer::new(normalizer_vb.pp(Normalizer::PREFIX))?;
        Ok(Self {
            spec: spec.clone(),
            net,
            normalizer,
            master_dtype,
        })
    }

    /// The specification the model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The normaliser.
    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// The dtype of predictions (the master dtype).
    pub fn dtype(&self) -> DType {
        self.master_dtype
    }

    /// Exact number of trained parameters.
    pub fn n_parameters(&self) -> usize {
        self.spec.n_parameters()
    }

    /// Analytic FLOPs for a batch of `shape` (see [`crate::flops`]).
    pub fn flops(&self, shape: &BatchShape) -> Flops {
        let mut counter = FlopCounter::new();
        self.net.count_flops(shape, &mut counter);
        Flops {
            forward: counter.forward(),
            backward: counter.backward(),
            conservative: self.spec.force_mode == ForceMode::Conservative,
            n_structures: shape.n_structures,
        }
    }

    /// Predicts energies, forces and stress of `batch` (whose floating tensors must be in the
    /// master dtype). In conservative mode the forces and stress are gradients of the energy;
    /// with [`enable_higher_order_gradients`] in effect they stay differentiable, so that a loss
    /// on them can be trained.
    pub fn predict(&self, batch: &BatchTensors, train: bool) -> Result<Prediction> {
        if batch.dtype() != self.master_dtype {
            return Err(ModelError::Batch(format!(
                "batch is {:?} but the model's master dtype is {:?}",
                batch.dtype(),
                self.master_dtype
            )));
        }
        batch.check_elements(self.net.max_atomic_number().min(N_REFERENCE_ELEMENTS))?;
        match self.spec.force_mode {
            ForceMode::Direct => self.predict_direct(batch, train),
            ForceMode::Conservative => self.predict_conservative(batch, train),
        }
    }

    fn predict_direct(&self, batch: &BatchTensors, train: bool) -> Result<Prediction> {
        let geometry = Geometry::of(batch)?;
        let raw = self.net.forward(batch, &geometry, train)?;
        let energy = self
            .normalizer
            .energy(batch, &raw.energy.to_dtype(self.master_dtype)?)?;
        let forces = raw.forces.ok_or_else(|| {
            ModelError::Batch("the network returned no direct forces in direct mode".into())
        })?;
        let stress = raw.stress.ok_or_else(|| {
            ModelError::Batch("the network returned no direct stress in direct mode".into())
        })?;
        let forces = forces
            .to_dtype(self.master_dtype)?
            .broadcast_mul(&self.normalizer.force_scale)?;
        let stress = stress
            .to_dtype(self.master_dtype)?
            .broadcast_mul(&self.normalizer.stress_scale)?;
        let stress = stress.broadcast_mul(&cell_mask(batch)?)?;
        Ok(Prediction {
            energy,
            forces,
            stress,
        })
    }

    fn predict_conservative(&self, batch: &BatchTensors, train: bool) -> Result<Prediction> {
        let b = batch.n_structures();
        let n = batch.n_nodes();
        let dtype = self.master_dtype;
        let device = batch.device();
        let positions = Var::from_tensor(&batch.positions.detach())?;
        let strain = Var::zeros((b, 3, 3), dtype, device)?;
        // A symmetric strain ε deforms r → r(1 + ε) and the cell rows alike.
        let sym = ((strain.as_tensor() + strain.as_tensor().transpose(1, 2)?)? * 0.5)?;
        let eye = Tensor::eye(3, dtype, device)?.unsqueeze(0)?;
        let deformation = sym.broadcast_add(&eye)?; // [B, 3, 3]
        let node_deformation = deformation.index_select(&batch.node_structure, 0)?;
        let strained_positions = positions
            .as_tensor()
            .reshape((n, 1, 3))?
            .matmul(&node_deformation)?
            .reshape((n, 3))?;
        let strained_cells = batch.cells.matmul(&deformation)?;
        let geometry = Geometry::new(batch, &strained_positions, &strained_cells)?;
        let raw = self.net.forward(batch, &geometry, train)?;
        let energy = self
            .normalizer
            .energy(batch, &raw.energy.to_dtype(dtype)?)?;
        let grads = energy.sum_all()?.backward()?;
        let zeros_if_absent = |g: Option<&Tensor>, shape: &[usize]| -> Result<Tensor> {
            Ok(match g {
                Some(g) => g.clone(),
                None => Tensor::zeros(shape, dtype, device)?,
            })
        };
        let forces = zeros_if_absent(grads.get(positions.as_tensor()), &[n, 3])?.neg()?;
        let de_deps = zeros_if_absent(grads.get(strain.as_tensor()), &[b, 3, 3])?;
        let inv_volume: Vec<f64> = batch
            .volumes_host
            .iter()
            .map(|&v| if v > 0.0 { 1.0 / v } else { 0.0 })
            .collect();
        let inv_volume = Tensor::from_vec(inv_volume, (b, 1, 1), device)?.to_dtype(dtype)?;
        let stress = de_deps.broadcast_mul(&inv_volume)?;
        Ok(Prediction {
            energy,
            forces,
            stress,
        })
    }
}

/// `[B, 1, 1]` mask: 1 for structures with a cell, 0 otherwise.
fn cell_mask(batch: &BatchTensors) -> Result<Tensor> {
    let b = batch.n_structures();
    let mask: Vec<f64> = batch
        .volumes_host
        .iter()
        .map(|&v| if v > 0.0 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(mask, (b, 1, 1), batch.device())?.to_dtype(batch.dtype())?)
}

/// Makes candle keep the graph of gradients on threads that start after this call and on the
/// calling thread if it has not run a backward pass yet, so that conservative forces can be
/// differentiated again (training on forces of a conservative model). Returns an error if the
/// calling thread already ran a backward pass without it (candle reads the setting once per
/// thread); call it at program start.
pub fn enable_higher_order_gradients() -> Result<()> {
    // candle 0.11 reads `CANDLE_GRAD_DO_NOT_DETACH` once per thread.
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    if higher_order_gradients_work()? {
        Ok(())
    } else {
        Err(ModelError::Batch(
            "second derivatives are unavailable on this thread: call \
             enable_higher_order_gradients before the first backward pass"
                .into(),
        ))
    }
}

/// True when gradients computed on this thread can be differentiated again.
pub fn higher_order_gradients_work() -> Result<bool> {
    let x = Var::from_slice(&[0.7f64], 1, &Device::Cpu)?;
    let y = x.as_tensor().powf(3.0)?.sum_all()?;
    let g = y.backward()?;
    let dy = g.get(x.as_tensor()).expect("x is a leaf of y").sum_all()?;
    let second = dy.backward()?;
    Ok(second.get(x.as_tensor()).is_some())
}

/// Sums `values` `[N, ...]` per structure into `[B, ...]`.
pub fn sum_per_structure(batch: &BatchTensors, values: &Tensor) -> Result<Tensor> {
    batch.sum_over(Grouping::NodesByStructure, values)
}

/// Mean of `values` `[N, F]` per structure `[B, F]`.
pub fn mean_per_structure(batch: &BatchTensors, values: &Tensor) -> Result<Tensor> {
    let sums = sum_per_structure(batch, values)?;
    let counts = batch
        .n_atoms
        .to_dtype(values.dtype())?
        .unsqueeze(D::Minus1)?;
    Ok(sums.broadcast_div(&counts)?)
}
