//! The fully connected net (FCN): the study's non-invariant baseline on padded atoms.
//!
//! Trikha et al. (2025, *Scaling Laws for Neural Material Models*, arXiv:2509.21811) use a
//! fully connected net as the simplest baseline (akshaytrikha/materials-scaling,
//! `omat24/models/fcn.py`). Every atom is a row of features, the structures of a batch are
//! padded to a common number of atom slots, and the same MLP runs on every slot:
//!
//! ```text
//! x_i  = [ embedding[Z_i] (E) ‖ r_i (3, Cartesian Å, raw) ]          per atom slot
//! h⁰_i = Linear(E + 3, H)(x_i)
//! hᵏ⁺¹ = hᵏ + LeakyReLU_0.01(LayerNorm(Linear(H, H)(hᵏ)))           k = 0 .. depth−1
//! E_s  = Σ_{real slots i of s} MlpHead(H → 1)(h_i)                    energy
//! F_i  = MlpHead(H → 3)(h_i)                                          direct forces
//! σ_s  = voigt_to_matrix( mean_{real slots i of s} MlpHead(H → 6)(h_i) ) direct stress
//! ```
//!
//! with `MlpHead = Linear(H, H) – SiLU – Linear(H, h) – SiLU – Linear(h, out)`, the study's
//! `MLPOutput` ([`MlpHead`], `h = head_hidden`, 128 in the study).
//!
//! ## What the model is (and is not)
//! * **Not invariant.** Positions enter as raw Cartesian coordinates, so a rotation or a
//!   translation of a structure (or a shift of an atom by a lattice vector) changes the
//!   prediction, and the cell is never read: the net does not know the structure is periodic.
//!   It is a baseline, kept because the study's scaling fits include it.
//! * **No interactions.** Every atom slot goes through the MLP alone; atoms meet only in the
//!   final sums. The energy is therefore a sum of one-body terms `ε(Z_i, r_i)`, and it is
//!   invariant to permutations of the atoms (the study's model is too). The study does not
//!   flatten the padded structure into one vector, and neither does matscale.
//! * **Padding.** As in the study, a batch is laid out as `B × M` atom slots ([`PaddedLayout`]),
//!   `M` the padded width: the largest structure of the batch
//!   (`max_atoms = None`, the default) or a fixed `max_atoms` (the study padded every batch to
//!   the largest structure of its data set; a larger structure is then an error). Padding slots
//!   hold atomic number 0 (embedding row 0 doubles as the padding token, as in the study) at
//!   the origin; they are computed like real atoms and then masked out of every sum (energy and
//!   stress) and never gathered into forces. A structure's prediction therefore does not depend
//!   on the other structures of its batch or on `M`; the padded rows still cost FLOPs.
//! * **Conservative mode.** The network reads positions only through
//!   [`Geometry::positions`], so `E` is a differentiable function of the (strained) positions
//!   and forces `−∂E/∂r` and stress `(1/V) ∂E/∂ε` come from autograd. The cell does not enter,
//!   so the stress is that of the strained positions alone. Only the energy head is built.
//!
//! ## Differences from the study's code
//! * The direct stress is the **masked mean** of the per-atom Voigt outputs; the study sums
//!   them, which makes an intensive quantity grow with the number of atoms (a supercell would
//!   get a different stress from its primitive cell).
//! * The study initialises the last layer of each head to the training-set mean (with a bias
//!   divided by 20 once per model built, a defect); matscale's normaliser
//!   ([`crate::model::NormalizerValues`]) handles references and scales instead.
//! * Embedding of `max_atomic_number` rows (100 by default; the study used 119).
//! * Initialisation otherwise follows the study: embedding `N(0, 0.01²)`, trunk linears Kaiming
//!   normal for LeakyReLU(0.01) with zero bias, LayerNorm `(1, 0)` with `ε = 1e-5`; the heads
//!   use [`MlpHead`]'s initialisation.
//!
//! ## Parameters
//! `Z·E + (E+3)·H + H + depth·(H² + 3H) + Σ_heads (H² + H + H·h + h + h·out + out)` with heads
//! `out ∈ {1, 3, 6}` in direct mode and `{1}` in conservative mode (`Z = max_atomic_number`).
//! The study's own rule excluded the embedding
//! ([`FcnConfig::study_parameter_count`]).
//!
//! ## Size ladder ([`FcnConfig::for_parameters`])
//! Widths `H = 4 ..= 8192` with `E = max(1, ⌊H/2⌋)` (the study's presets have `E ≈ H/2`),
//! `h = min(128, H)` (the study's head width, narrowed for tiny nets so that 10³ parameters are
//! reachable) and depth `d(H) = max(1, round(√H) − 2)` (which reproduces the study's presets:
//! 16 → 2, 48 → 5, 108 → 8, 192 → 12, 256 → 14 against 2, 4, 8, 12, 15) or `d(H) + 1`; of these
//! candidates the one whose parameter count is closest to the target in log scale wins (the
//! `+1` option bridges the jump in count where `d(H)` steps). The result is within 10% of every
//! target from 10³ to 10⁸ (at most 7.4% off at 10³, within 2% above 3·10⁴); a target whose
//! nearest ladder point is more than 10% away (below a few hundred parameters: the smallest
//! point has 422 in direct mode) is an error.
//!
//! ## FLOPs ([`crate::flops`] rules)
//! Every layer is counted on all `B·M` padded rows (masked work still costs): embedding and
//! position gathers and the concatenation (`B·M·(E+3)`), the input linear, per block a linear,
//! a LayerNorm (8/element), the LeakyReLU and the residual add (1/element each), every head on
//! all rows, the masking multiplies and padded-row sums, the force gather of the `N` real rows,
//! the stress mean and the Voigt expansion.

use candle_core::{DType, Module, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, Linear, VarBuilder};
use matscale_equivariant::norms::LayerNorm;
use serde::{Deserialize, Serialize};

use crate::batch::{BatchShape, BatchTensors, Geometry};
use crate::config::{Architecture, Family};
use crate::error::{ModelError, Result};
use crate::flops::{FlopCounter, LAYER_NORM};
use crate::heads::{voigt_to_matrix, MlpHead};
use crate::model::{ForceMode, Model, RawOutput, N_REFERENCE_ELEMENTS};

/// Negative slope of the LeakyReLU (PyTorch's default, as in the study).
pub const LEAKY_SLOPE: f64 = 0.01;
/// `ε` of the LayerNorms (PyTorch's default, as in the study).
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// Standard deviation of the initial atomic-number embedding (the study's value).
pub const EMBEDDING_INIT_STD: f64 = 0.01;

/// Configuration of the fully connected net (see the [module docs](self)).
///
/// The default is the study's middle preset `(E, H, depth) = (60, 108, 8)`: 187,278 parameters
/// in direct mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcnConfig {
    /// Width `E` of the atomic-number embedding.
    pub embedding_dim: usize,
    /// Width `H` of the trunk (input layer, residual blocks and head inputs).
    pub hidden_dim: usize,
    /// Number of residual blocks `Linear(H, H) – LayerNorm – LeakyReLU` (may be 0).
    pub depth: usize,
    /// Hidden width `h` of the output heads (128 in the study).
    pub head_hidden: usize,
    /// One past the largest atomic number embedded (rows of the embedding; row 0 is the
    /// padding token). At most 119.
    pub max_atomic_number: usize,
    /// Padded width `M` (atom slots per structure). `None` pads each batch to its largest
    /// structure; `Some(m)` pads every batch to `m` (as the study did with its data set's
    /// largest structure) and rejects batches with a larger structure.
    pub max_atoms: Option<usize>,
}

impl Default for FcnConfig {
    fn default() -> Self {
        Self::study(60, 108, 8)
    }
}

impl FcnConfig {
    /// A configuration with the study's head width (128) and defaults elsewhere.
    pub fn study(embedding_dim: usize, hidden_dim: usize, depth: usize) -> Self {
        Self {
            embedding_dim,
            hidden_dim,
            depth,
            head_hidden: 128,
            max_atomic_number: 100,
            max_atoms: None,
        }
    }

    /// Output widths of the heads built in `mode` (energy, then forces and stress).
    fn head_outputs(mode: ForceMode) -> &'static [usize] {
        match mode {
            ForceMode::Direct => &[1, 3, 6],
            ForceMode::Conservative => &[1],
        }
    }

    /// Parameters of the embedding (`max_atomic_number × E`).
    pub fn embedding_parameters(&self) -> usize {
        self.max_atomic_number * self.embedding_dim
    }

    /// The parameter count under the study's rule, which leaves out every parameter whose name
    /// contains "embedding" (here: the atomic-number embedding).
    pub fn study_parameter_count(&self, mode: ForceMode) -> usize {
        self.n_parameters(mode) - self.embedding_parameters()
    }

    /// The padded width `M` for a batch of `shape`, or an error when a structure exceeds a
    /// fixed `max_atoms`.
    pub fn padded_width(&self, shape: &BatchShape) -> Result<usize> {
        match self.max_atoms {
            None => Ok(shape.max_nodes),
            Some(m) if shape.max_nodes <= m => Ok(m),
            Some(m) => Err(ModelError::Batch(format!(
                "a structure has {} atoms but the FCN pads to fcn.max_atoms = {m}",
                shape.max_nodes
            ))),
        }
    }

    /// The ladder's depth rule `d(H) = max(1, round(√H) − 2)`.
    pub fn ladder_depth(hidden_dim: usize) -> usize {
        ((hidden_dim as f64).sqrt().round() as usize)
            .saturating_sub(2)
            .max(1)
    }

    /// The ladder's configuration of width `hidden_dim` and depth `depth`.
    fn ladder_point(hidden_dim: usize, depth: usize) -> Self {
        Self {
            embedding_dim: (hidden_dim / 2).max(1),
            hidden_dim,
            depth,
            head_hidden: hidden_dim.min(128),
            ..Self::study(1, 1, 0)
        }
    }
}

/// Smallest and largest trunk width the ladder considers.
const LADDER_WIDTHS: std::ops::RangeInclusive<usize> = 4..=8192;

impl Architecture for FcnConfig {
    const FAMILY: Family = Family::Fcn;

    fn check(&self) -> Result<()> {
        let positive = |field: &str, value: usize| {
            if value == 0 {
                Err(ModelError::config(
                    format!("fcn.{field}"),
                    "is 0; it must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        positive("embedding_dim", self.embedding_dim)?;
        positive("hidden_dim", self.hidden_dim)?;
        positive("head_hidden", self.head_hidden)?;
        if !(1..=N_REFERENCE_ELEMENTS).contains(&self.max_atomic_number) {
            return Err(ModelError::config(
                "fcn.max_atomic_number",
                format!(
                    "is {}; it must be between 1 and {N_REFERENCE_ELEMENTS}",
                    self.max_atomic_number
                ),
            ));
        }
        if self.max_atoms == Some(0) {
            return Err(ModelError::config(
                "fcn.max_atoms",
                "is 0; leave it out to pad to the largest structure of each batch",
            ));
        }
        Ok(())
    }

    fn n_parameters(&self, mode: ForceMode) -> usize {
        let (e, h) = (self.embedding_dim, self.hidden_dim);
        let input = (e + 3) * h + h;
        let blocks = self.depth * (h * h + h + 2 * h);
        let heads: usize = Self::head_outputs(mode)
            .iter()
            .map(|&out| MlpHead::n_parameters(h, self.head_hidden, out))
            .sum();
        self.embedding_parameters() + input + blocks + heads
    }

    fn for_parameters(target: usize, mode: ForceMode) -> Result<Self> {
        let target_f = target.max(1) as f64;
        let mut best: Option<(f64, Self)> = None;
        for hidden in LADDER_WIDTHS {
            let d = Self::ladder_depth(hidden);
            for depth in [d, d + 1] {
                let candidate = Self::ladder_point(hidden, depth);
                let miss = (candidate.n_parameters(mode) as f64 / target_f).ln().abs();
                if best.as_ref().is_none_or(|(m, _)| miss < *m) {
                    best = Some((miss, candidate));
                }
            }
        }
        let (miss, config) = best.expect("the ladder has candidates");
        if miss > 1.1f64.ln() {
            return Err(ModelError::config(
                "fcn size",
                format!(
                    "target of {target} parameters is out of the ladder's reach (closest: {})",
                    config.n_parameters(mode)
                ),
            ));
        }
        Ok(config)
    }

    fn presets() -> Vec<(&'static str, Self)> {
        vec![
            ("study-xs", Self::study(8, 16, 2)),
            ("study-s", Self::study(24, 48, 4)),
            ("study-m", Self::study(60, 108, 8)),
            ("study-l", Self::study(96, 192, 12)),
            ("study-xl", Self::study(128, 256, 15)),
        ]
    }

    fn build(&self, mode: ForceMode, vb: VarBuilder) -> Result<Box<dyn Model>> {
        self.check()?;
        Ok(Box::new(Fcn::new(self, mode, vb)?))
    }
}

/// The `B × M` slot layout of a padded batch: structure `s` owns slots `s·M .. s·M + M`, its
/// atoms fill the first `n_s` of them in order and the rest are padding.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedLayout {
    /// Structures `B`.
    pub n_structures: usize,
    /// Slots per structure `M`.
    pub width: usize,
    /// For every slot `[B·M]`, the atom it holds, or `N` (one past the last atom) for padding.
    pub source_atom: Vec<u32>,
    /// For every atom `[N]`, its slot.
    pub slot_of_atom: Vec<u32>,
    /// For every slot `[B·M]`, 1 for an atom and 0 for padding.
    pub mask: Vec<f64>,
}

impl PaddedLayout {
    /// The layout of structures with node offsets `node_ptr` (`[B + 1]`) padded to `width`.
    pub fn new(node_ptr: &[usize], width: usize) -> Result<Self> {
        let n_structures = node_ptr.len().saturating_sub(1);
        let n_atoms = node_ptr.last().copied().unwrap_or(0);
        let index = |v: usize| -> Result<u32> {
            u32::try_from(v).map_err(|_| {
                ModelError::Batch(format!("{v} padded FCN slots exceed the u32 index range"))
            })
        };
        let pad = index(n_atoms)?;
        index(n_structures * width)?;
        let mut source_atom = vec![pad; n_structures * width];
        let mut slot_of_atom = vec![0u32; n_atoms];
        let mut mask = vec![0.0; n_structures * width];
        for (s, w) in node_ptr.windows(2).enumerate() {
            let count = w[1].saturating_sub(w[0]);
            if count > width {
                return Err(ModelError::Batch(format!(
                    "structure {s} has {count} atoms, more than the padded width {width}"
                )));
            }
            for k in 0..count {
                let slot = s * width + k;
                source_atom[slot] = (w[0] + k) as u32;
                slot_of_atom[w[0] + k] = slot as u32;
                mask[slot] = 1.0;
            }
        }
        Ok(Self {
            n_structures,
            width,
            source_atom,
            slot_of_atom,
            mask,
        })
    }

    /// Total slots `B·M`.
    pub fn n_slots(&self) -> usize {
        self.n_structures * self.width
    }
}

/// One residual block's branch: `LeakyReLU(LayerNorm(Linear(H, H)(x)))`.
#[derive(Debug, Clone)]
struct Block {
    linear: Linear,
    norm: LayerNorm,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.norm.forward(&self.linear.forward(x)?)?;
        leaky_relu(&y)
    }
}

/// `LeakyReLU(x) = 0.01·x + 0.99·relu(x)`, written with `relu` whose backward is a plain
/// masked product (differentiable again, as conservative training needs).
fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok(((x * LEAKY_SLOPE)? + (x.relu()? * (1.0 - LEAKY_SLOPE))?)?)
}

/// A linear layer initialised as the study's trunk: Kaiming normal (fan-in) for
/// LeakyReLU(0.01), zero bias.
fn trunk_linear(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    let gain = (2.0 / (1.0 + LEAKY_SLOPE * LEAKY_SLOPE)).sqrt();
    let weight = vb.get_with_hints(
        (d_out, d_in),
        "weight",
        Init::Kaiming {
            dist: NormalOrUniform::Normal,
            fan: FanInOut::FanIn,
            non_linearity: NonLinearity::ExplicitGain(gain),
        },
    )?;
    let bias = vb.get_with_hints(d_out, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

/// The built network (see the [module docs](self)).
#[derive(Debug)]
struct Fcn {
    config: FcnConfig,
    embedding: Tensor,
    input: Linear,
    blocks: Vec<Block>,
    energy_head: MlpHead,
    force_head: Option<MlpHead>,
    stress_head: Option<MlpHead>,
}

impl Fcn {
    fn new(config: &FcnConfig, mode: ForceMode, vb: VarBuilder) -> Result<Self> {
        let (e, h, hh) = (config.embedding_dim, config.hidden_dim, config.head_hidden);
        let embedding = vb.get_with_hints(
            (config.max_atomic_number, e),
            "embedding.weight",
            Init::Randn {
                mean: 0.0,
                stdev: EMBEDDING_INIT_STD,
            },
        )?;
        let input = trunk_linear(e + 3, h, vb.pp("input"))?;
        let blocks = (0..config.depth)
            .map(|k| {
                let vb = vb.pp(format!("blocks.{k}"));
                Ok(Block {
                    linear: trunk_linear(h, h, vb.pp("linear"))?,
                    norm: LayerNorm::new(h, LAYER_NORM_EPS, vb.pp("norm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let energy_head = MlpHead::new(h, hh, 1, vb.pp("energy_head"))?;
        let (force_head, stress_head) = match mode {
            ForceMode::Direct => (
                Some(MlpHead::new(h, hh, 3, vb.pp("force_head"))?),
                Some(MlpHead::new(h, hh, 6, vb.pp("stress_head"))?),
            ),
            ForceMode::Conservative => (None, None),
        };
        Ok(Self {
            config: config.clone(),
            embedding,
            input,
            blocks,
            energy_head,
            force_head,
            stress_head,
        })
    }

    fn dtype(&self) -> DType {
        self.embedding.dtype()
    }
}

impl Model for Fcn {
    fn forward(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        _train: bool,
    ) -> Result<RawOutput> {
        let width = self.config.padded_width(&batch.shape)?;
        let layout = PaddedLayout::new(&batch.node_ptr, width)?;
        let (b, n, rows) = (batch.n_structures(), batch.n_nodes(), layout.n_slots());
        let dtype = self.dtype();
        let device = batch.device();
        let direct = self.force_head.is_some();
        if rows == 0 {
            return Ok(RawOutput {
                energy: Tensor::zeros(b, dtype, device)?,
                forces: direct
                    .then(|| Tensor::zeros((n, 3), dtype, device))
                    .transpose()?,
                stress: direct
                    .then(|| Tensor::zeros((b, 3, 3), dtype, device))
                    .transpose()?,
            });
        }

        // Slot features: embedding of Z (0 for padding) and the raw position (origin for
        // padding), gathered from the atoms plus one appended padding row.
        let numbers: Vec<u32> = layout
            .source_atom
            .iter()
            .map(|&a| {
                batch
                    .numbers_host
                    .get(a as usize)
                    .map_or(0, |&z| u32::from(z))
            })
            .collect();
        // Host indices (`RowIndex`): on a GPU no copy back from the device.
        let numbers = batch.host_row_index(&numbers, self.embedding.dim(0)?)?;
        let source = batch.host_row_index(&layout.source_atom, n + 1)?;
        let embedded = numbers.gather(&self.embedding)?;
        let positions = geometry.positions.to_dtype(dtype)?;
        let positions = source.gather(&Tensor::cat(
            &[&positions, &Tensor::zeros((1, 3), dtype, device)?],
            0,
        )?)?;
        let x = Tensor::cat(&[&embedded, &positions], 1)?;

        let mut x = self.input.forward(&x)?;
        for block in &self.blocks {
            x = (&x + block.forward(&x)?)?;
        }

        let mask = Tensor::from_slice(&layout.mask, (b, width), device)?.to_dtype(dtype)?;
        let energy = self
            .energy_head
            .forward(&x)?
            .reshape((b, width))?
            .mul(&mask)?
            .sum(1)?;

        let (forces, stress) = match (&self.force_head, &self.stress_head) {
            (Some(force_head), Some(stress_head)) => {
                let slots = batch.host_row_index(&layout.slot_of_atom, rows)?;
                let forces = slots.gather(&force_head.forward(&x)?)?;
                let inverse_counts: Vec<f64> = batch
                    .node_ptr
                    .windows(2)
                    .map(|w| 1.0 / (w[1] - w[0]).max(1) as f64)
                    .collect();
                let inverse_counts =
                    Tensor::from_vec(inverse_counts, (b, 1), device)?.to_dtype(dtype)?;
                let voigt = stress_head
                    .forward(&x)?
                    .reshape((b, width, 6))?
                    .broadcast_mul(&mask.unsqueeze(2)?)?
                    .sum(1)?
                    .broadcast_mul(&inverse_counts)?;
                (Some(forces), Some(voigt_to_matrix(&voigt)?))
            }
            _ => (None, None),
        };
        Ok(RawOutput {
            energy,
            forces,
            stress,
        })
    }

    fn count_flops(&self, shape: &BatchShape, counter: &mut FlopCounter) {
        let (e, h) = (self.config.embedding_dim, self.config.hidden_dim);
        let width = self.config.max_atoms.unwrap_or(0).max(shape.max_nodes);
        let b = shape.n_structures;
        let rows = b * width;
        counter.gather(rows, e);
        counter.gather(rows, 3);
        counter.elementwise(rows * (e + 3), 1.0); // concatenation
        counter.linear(rows, e + 3, h, true);
        for _ in &self.blocks {
            counter.linear(rows, h, h, true);
            counter.elementwise(rows * h, LAYER_NORM);
            counter.elementwise(rows * h, 1.0); // LeakyReLU
            counter.elementwise(rows * h, 1.0); // residual add
        }
        self.energy_head.count_flops(rows, counter);
        counter.elementwise(rows, 1.0); // mask
        counter.scatter(rows, 1); // sum over slots
        if let (Some(force_head), Some(stress_head)) = (&self.force_head, &self.stress_head) {
            force_head.count_flops(rows, counter);
            counter.gather(shape.n_nodes, 3);
            stress_head.count_flops(rows, counter);
            counter.elementwise(rows * 6, 1.0); // mask
            counter.scatter(rows, 6); // sum over slots
            counter.elementwise(b * 6, 1.0); // mean
            counter.elementwise(b * 9, 1.0); // Voigt to matrix
        }
    }

    fn max_atomic_number(&self) -> usize {
        self.config.max_atomic_number
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fills_slots_in_order_and_masks_padding() {
        let layout = PaddedLayout::new(&[0, 2, 5], 4).unwrap();
        assert_eq!(layout.n_slots(), 8);
        assert_eq!(layout.source_atom, vec![0, 1, 5, 5, 2, 3, 4, 5]);
        assert_eq!(layout.slot_of_atom, vec![0, 1, 4, 5, 6]);
        assert_eq!(layout.mask, vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn layout_rejects_a_structure_wider_than_the_padding() {
        let err = PaddedLayout::new(&[0, 2, 7], 4).unwrap_err();
        assert!(err.to_string().contains("structure 1 has 5 atoms"), "{err}");
    }

    #[test]
    fn ladder_depth_reproduces_the_study_presets_roughly() {
        let depths: Vec<usize> = [16, 48, 108, 192, 256]
            .iter()
            .map(|&h| FcnConfig::ladder_depth(h))
            .collect();
        assert_eq!(depths, vec![2, 5, 8, 12, 14]);
    }
}
