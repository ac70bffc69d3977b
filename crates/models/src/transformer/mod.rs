//! The all-atom Transformer: the study's ADiT-style encoder and a distance-biased variant.
//!
//! # Architecture
//!
//! The plain variant ([`AttentionBias::None`], label `transformer`) follows the encoder of the
//! All-atom Diffusion Transformer (Joshi et al. 2025, "All-atom Diffusion Transformers:
//! Unified generative modelling of molecules and materials", arXiv:2503.03965) as the study
//! (Trikha et al. 2025, `omat24/models/adit.py`) used it for energies, forces and stress:
//!
//! 1. **Input tokens**, one per atom, of width `d = d_model`: the sum of
//!    * an atom-type embedding `Embedding(max_atomic_number, d)`;
//!    * a Cartesian position embedding `Linear(3, d, no bias) – SiLU – Linear(d, d)` of the raw
//!      positions (Å);
//!    * a fractional-coordinate embedding of the same shape of `r · cell⁻¹`
//!      ([`Geometry::fractional`](crate::Geometry::fractional)), wrapped into `[0, 1)` along
//!      periodic directions like the study's ASE `get_scaled_positions()`
//!      ([`TransformerConfig::wrap_fractional`]);
//!    * when [`TransformerConfig::index_embedding`] is set (the study's default), ADiT's
//!      parameter-free sinusoidal embedding of the atom's index inside its structure,
//!      `[sin(t·π / 2048^(2k/d)), cos(t·π / 2048^(2k/d))]` for `k < d/2` (a zero column pads
//!      an odd `d`).
//!
//!    The study's embedders are two-layer MLPs rather than single linear maps; matscale keeps
//!    them so that parameter counts and FLOPs match the study.
//! 2. **`depth` pre-LayerNorm encoder blocks** (PyTorch `TransformerEncoderLayer` with
//!    `norm_first = true`): `x += Dropout(MHA(LN₁(x)))`, `x += Dropout(W₂ Dropout(GELU(W₁ LN₂(x))))`
//!    with `heads` heads of width `d / heads`, a fused input projection `Linear(d, 3d)`, an
//!    output projection `Linear(d, d)`, a feed-forward width `ff_multiplier · d` and GELU in
//!    its tanh form (the study's `approximate = "tanh"`). Self-attention is restricted to the
//!    atoms of one structure: the batch is padded per structure to `M = max_nodes` tokens and
//!    padded keys are masked out of the softmax (multiplied by zero after the exponential, so
//!    they contribute exactly nothing and a structure predicts the same in any batch). The
//!    softmax is written with plain differentiable operations (subtract the detached row
//!    maximum, exponential, sum, divide) so that conservative forces can be differentiated
//!    again. Dropout (rate [`TransformerConfig::dropout`], study 0.1, default 0) acts on the
//!    attention weights, after the attention, inside and after the feed-forward block, only
//!    when training.
//! 3. **A final LayerNorm** and the study's heads ([`MlpHead`],
//!    `Linear(d, d) – SiLU – Linear(d, h) – SiLU – Linear(h, out)`, `h = head_hidden`):
//!    energy = Σ over the atoms of a per-atom head (out 1); in direct mode also forces = a
//!    per-atom head (out 3) and stress = the per-structure mean of a per-atom head (out 6,
//!    Voigt order xx, yy, zz, yz, xz, xy, turned into a symmetric matrix by
//!    [`voigt_to_matrix`](crate::heads::voigt_to_matrix)). Averaging per-atom stress outputs is
//!    what the study does.
//!
//! This variant reads absolute Cartesian and fractional coordinates and atom indices: it is
//! neither rotation- nor translation- nor permutation-invariant (a test shows it), like the
//! study's model.
//!
//! The distance-biased variant ([`AttentionBias::Distance`], label `transformer_distance`,
//! beyond the study) makes the encoder exactly invariant to rotations, translations and atom
//! permutations under periodic boundary conditions:
//! * the input tokens are the atom-type embeddings only (no coordinates, no index embedding);
//! * every attention logit gets a learned bias from the periodic neighbour list,
//!   `b^h_ij = Σ_{edges e: j → i} f_c(r_e) (W^h · rbf(r_e) + c^h)`, summed over all periodic
//!   images `j + n·cell` of atom `j` within the cutoff (minimum image is not enough for small
//!   cells); `rbf` are `num_radial` Gaussians `exp(−(r − μ_k)² / (2Δ²))` with centres `μ_k`
//!   evenly spaced on `[0, cutoff]` and `Δ` their spacing, `f_c(r) = ½(cos(π r / r_c) + 1)` for
//!   `r < r_c` and 0 beyond, so the bias goes smoothly to zero at the cutoff. `W, c` are a
//!   per-layer `Linear(num_radial, heads)`. Pairs without an edge get no bias;
//! * direct forces and stress come from invariant per-edge weights
//!   `(w_F, w_σ) = f_c(r_e) · MLP([h_src, h_dst, rbf(r_e)])` (MLP `Linear(2d + K, d) – SiLU –
//!   Linear(d, 2)`, one hidden layer because it runs on every edge) through
//!   [`edge_forces`](crate::heads::edge_forces) and [`edge_stress`](crate::heads::edge_stress),
//!   so they are exactly equivariant.
//!
//! The batch's neighbour list must be built with a cutoff of at least
//! [`TransformerConfig::cutoff`] (longer edges are ignored by the envelope; shorter lists
//! silently drop pairs).
//!
//! # Parameters
//!
//! With `d`, depth `L`, heads `H`, feed-forward width `f = ff_multiplier·d`, head hidden
//! width `h`, `Z = max_atomic_number`, `K = num_radial` and `mlp(o) = d² + d + d·h + h + h·o + o`:
//!
//! ```text
//! plain:    Z·d + 2·(3d + d² + d) + L·(4d + 4d² + 4d + 2·d·f + f + d) + 2d
//!           + mlp(1) [+ mlp(3) + mlp(6) in direct mode]
//! distance: Z·d + L·(4d + 4d² + 4d + 2·d·f + f + d + K·H + H) + 2d
//!           + mlp(1) [+ (2d + K)·d + d + 2d + 2 in direct mode]
//! ```
//!
//! [`TransformerConfig::n_parameters_study_rule`] gives the study's count, which leaves out
//! every embedder (`atom_type_embedder`, `pos_embedder`, `frac_coords_embedder`); with it the
//! presets (`adit-d{d}-l{depth}`, the study's nine sizes) have the study's counts from 0.015M
//! to 9.064M (checked against the same layout built in PyTorch). One comment in the study's
//! source is stale: d = 128, 4 layers has 0.894M parameters, not the 0.695M quoted (which is
//! the count at 3 layers).
//!
//! # Size ladder
//!
//! The study's ADiT sizes (d / heads / layers: 16/1/2, 64/1/2, 64/1/3, 96/1/3, 128/2/4,
//! 192/3/5, 192/4/6, 256/4/6, 320/5/7) follow `heads = max(1, ⌊d/64⌋)` (64-wide heads) and
//! roughly `depth = 2 + ⌊d/64⌋`. [`TransformerConfig::ladder`] turns this into a rule that
//! lands within 10% of any target from 10^3 to 10^8 parameters:
//! 1. depth: start at `L = 2` and increase `L` while the smallest model of depth `L + 1`
//!    under the rule (`d = 64·(L − 1)`, `h = 128`) has at most the target count, so that
//!    depth grows with the target exactly where the rule `2 + ⌊d/64⌋` would deepen it;
//! 2. width: the largest `d` (with `heads | d`) whose model with head width
//!    `h = min(128, 8d)` stays at or below the target;
//! 3. head width: for small models (`8d < 128`) `h` is then raised (up to 128) to meet the
//!    target, as the study's fixed `h = 128` would dwarf a 10^3-parameter encoder;
//! 4. of that model and the model of the next admissible width, the one nearer the target
//!    (in log ratio) is taken.
//!
//! For example (plain, direct): 10^3 → d 2, depth 2, h 31; 10^5 → d 50, depth 2; 10^6 →
//! d 132, depth 4, 2 heads; 10^7 → d 330, depth 7, 5 heads; 10^8 → d 792, depth 13, 12 heads.
//! Asked for the exact count of one of the study's sizes that follows the rule (seven of
//! nine), the ladder returns that size.
//!
//! Every other field keeps its default (`ff_multiplier = 4`, `max_atomic_number = 100`, ...).
//!
//! # FLOPs
//!
//! [`Model::count_flops`] replays the forward pass with the rules of
//! [`crate::flops`] and counts what is computed, padding included: attention scores `QKᵀ` and
//! `AV` as `B·H` matmuls of `[M, d/H]·[d/H, M]` and `[M, M]·[M, d/H]` (`M = max_nodes`, so a
//! batch of unequal structures pays for its padding), scaling, masking and the softmax on
//! `B·H·M²` logits, the copies of the head-major permutations, the padding gathers, every
//! linear layer, LayerNorm, GELU/SiLU, residual add and dropout mask (when `dropout > 0`), the
//! fractional coordinates, the sinusoidal index embedding, and for the distance variant the
//! radial basis, the envelope, the per-layer bias projection and its scatter into the logits,
//! and the edge heads.

mod network;

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::config::{Architecture, Family};
use crate::error::{ModelError, Result};
use crate::heads::MlpHead;
use crate::model::{ForceMode, Model};

pub use network::Transformer;

/// How attention logits are biased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionBias {
    /// No bias: the study's ADiT encoder with coordinate embeddings (not invariant).
    #[default]
    None,
    /// A learned bias from interatomic distances under periodic boundary conditions, and no
    /// coordinate embeddings (exactly invariant). See the [module docs](self).
    Distance,
}

impl std::str::FromStr for AttentionBias {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "distance" => Ok(Self::Distance),
            other => Err(ModelError::config(
                "transformer.attention_bias",
                format!("is `{other}`; expected `none` or `distance`"),
            )),
        }
    }
}

/// Configuration of the Transformer (see the [module docs](self)).
///
/// The default is the study's 0.402M-parameter ADiT model (`d_model = 96`, one head, three
/// layers), without dropout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformerConfig {
    /// Token width `d`.
    pub d_model: usize,
    /// Number of encoder blocks.
    pub depth: usize,
    /// Attention heads; must divide `d_model`.
    pub heads: usize,
    /// Feed-forward width as a multiple of `d_model` (the study: 4).
    pub ff_multiplier: usize,
    /// Hidden width `h` of the output heads (the study: 128).
    pub head_hidden: usize,
    /// Dropout rate during training, in `[0, 1)` (the study: 0.1).
    pub dropout: f64,
    /// One past the largest atomic number embedded.
    pub max_atomic_number: usize,
    /// Add ADiT's sinusoidal embedding of the atom index within its structure (plain variant
    /// only; the distance variant never uses it, as it would break permutation invariance).
    pub index_embedding: bool,
    /// Wrap fractional coordinates into `[0, 1)` along periodic directions before embedding
    /// them, as the study's data pipeline does (ASE `get_scaled_positions()`); plain variant
    /// only. The wrap is piecewise constant, so gradients are those of the unwrapped
    /// coordinates, but the energy jumps when an atom crosses a cell face.
    pub wrap_fractional: bool,
    /// Attention bias: `none` (the study's encoder) or `distance` (invariant variant).
    pub attention_bias: AttentionBias,
    /// Cutoff radius of the distance bias and edge heads, Å (distance variant only).
    pub cutoff: f64,
    /// Number of Gaussian radial basis functions of the distance variant.
    pub num_radial: usize,
    /// Epsilon of the LayerNorms.
    pub layer_norm_eps: f64,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            d_model: 96,
            depth: 3,
            heads: 1,
            ff_multiplier: 4,
            head_hidden: 128,
            dropout: 0.0,
            max_atomic_number: 100,
            index_embedding: true,
            wrap_fractional: true,
            attention_bias: AttentionBias::None,
            cutoff: 5.0,
            num_radial: 16,
            layer_norm_eps: 1e-5,
        }
    }
}

/// Largest width the ladder considers.
const LADDER_MAX_WIDTH: usize = 16_384;
/// The head hidden width of the study.
const STUDY_HEAD_HIDDEN: usize = 128;

impl TransformerConfig {
    /// The study's ADiT configuration `d_model / heads / depth` (dropout 0, as matscale
    /// defaults; set `dropout = 0.1` for the study's value).
    pub fn adit(d_model: usize, heads: usize, depth: usize) -> Self {
        Self {
            d_model,
            heads,
            depth,
            ..Self::default()
        }
    }

    /// The distance-biased variant of this configuration.
    pub fn with_distance_bias(mut self) -> Self {
        self.attention_bias = AttentionBias::Distance;
        self
    }

    /// True for the distance-biased variant.
    pub fn is_distance(&self) -> bool {
        self.attention_bias == AttentionBias::Distance
    }

    /// Feed-forward width.
    pub fn ff_width(&self) -> usize {
        self.ff_multiplier * self.d_model
    }

    /// Parameters of the embedders (atom type and, in the plain variant, the two coordinate
    /// MLPs): what the study's parameter count leaves out.
    pub fn n_embedding_parameters(&self) -> usize {
        let d = self.d_model;
        let mut p = self.max_atomic_number * d;
        if !self.is_distance() {
            p += 2 * (3 * d + d * d + d);
        }
        p
    }

    /// Parameters of one encoder block.
    pub fn n_block_parameters(&self) -> usize {
        let (d, f) = (self.d_model, self.ff_width());
        let norms = 4 * d;
        let attention = 3 * d * d + 3 * d + d * d + d;
        let feed_forward = d * f + f + f * d + d;
        let bias = if self.is_distance() {
            self.num_radial * self.heads + self.heads
        } else {
            0
        };
        norms + attention + feed_forward + bias
    }

    /// Parameters of the edge head of the distance variant (direct mode).
    pub fn n_edge_head_parameters(&self) -> usize {
        let (d, k) = (self.d_model, self.num_radial);
        (2 * d + k) * d + d + d * 2 + 2
    }

    /// The study's parameter count: everything but the embedders.
    pub fn n_parameters_study_rule(&self, mode: ForceMode) -> usize {
        self.n_parameters(mode) - self.n_embedding_parameters()
    }

    /// The size-ladder configuration of `attention_bias` for about `target` parameters in
    /// `mode` (see the [module docs](self) for the rule). Fails when `target` is below the
    /// smallest admissible model or beyond the largest width considered.
    pub fn ladder(target: usize, mode: ForceMode, attention_bias: AttentionBias) -> Result<Self> {
        let make = |d: usize, depth: usize, head_hidden: usize| Self {
            d_model: d,
            depth,
            heads: ladder_heads(d),
            head_hidden,
            attention_bias,
            ..Self::default()
        };
        let count = |c: &Self| c.n_parameters(mode) as f64;
        let t = target as f64;
        let smallest = make(1, 2, 4);
        if t < count(&smallest) {
            return Err(ModelError::config(
                "transformer.target_parameters",
                format!(
                    "is {target}, below the smallest ladder model ({} parameters)",
                    count(&smallest)
                ),
            ));
        }
        let mut depth = 2;
        while count(&make(64 * (depth - 1), depth + 1, STUDY_HEAD_HIDDEN)) <= t {
            depth += 1;
        }
        let h_floor = |d: usize| (8 * d).min(STUDY_HEAD_HIDDEN);
        let admissible = |d: usize| d.is_multiple_of(ladder_heads(d));
        let mut best = 1;
        let mut next = None;
        for d in (1..=LADDER_MAX_WIDTH).filter(|&d| admissible(d)) {
            if count(&make(d, depth, h_floor(d))) <= t {
                best = d;
            } else {
                next = Some(d);
                break;
            }
        }
        let Some(next) = next else {
            return Err(ModelError::config(
                "transformer.target_parameters",
                format!("is {target}, beyond the ladder's widest model (d = {LADDER_MAX_WIDTH})"),
            ));
        };
        let mut candidate = make(best, depth, h_floor(best));
        if candidate.head_hidden < STUDY_HEAD_HIDDEN {
            // The count is affine in the head width: solve for it.
            let base = count(&make(best, depth, 0));
            let slope = count(&make(best, depth, 1)) - base;
            let h = ((t - base) / slope).round() as usize;
            candidate.head_hidden = h.clamp(h_floor(best), STUDY_HEAD_HIDDEN);
        }
        let wider = make(next, depth, h_floor(next));
        let miss = |c: &Self| (count(c) / t).ln().abs();
        let chosen = if miss(&wider) < miss(&candidate) {
            wider
        } else {
            candidate
        };
        if miss(&chosen) > 1.1f64.ln() {
            return Err(ModelError::config(
                "transformer.target_parameters",
                format!(
                    "is {target}; the ladder's nearest model has {} parameters",
                    count(&chosen)
                ),
            ));
        }
        Ok(chosen)
    }
}

/// The ladder's number of heads for width `d`: 64-wide heads.
fn ladder_heads(d: usize) -> usize {
    (d / 64).max(1)
}

impl Architecture for TransformerConfig {
    const FAMILY: Family = Family::Transformer;

    fn check(&self) -> Result<()> {
        let positive = |field: &str, value: usize| -> Result<()> {
            if value == 0 {
                Err(ModelError::config(
                    format!("transformer.{field}"),
                    "must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        positive("d_model", self.d_model)?;
        positive("depth", self.depth)?;
        positive("heads", self.heads)?;
        positive("ff_multiplier", self.ff_multiplier)?;
        positive("head_hidden", self.head_hidden)?;
        positive("max_atomic_number", self.max_atomic_number)?;
        positive("num_radial", self.num_radial)?;
        if !self.d_model.is_multiple_of(self.heads) {
            return Err(ModelError::config(
                "transformer.heads",
                format!(
                    "is {}, which does not divide d_model = {}",
                    self.heads, self.d_model
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::config(
                "transformer.dropout",
                format!("is {}; expected a rate in [0, 1)", self.dropout),
            ));
        }
        if !(self.cutoff.is_finite() && self.cutoff > 0.0) {
            return Err(ModelError::config(
                "transformer.cutoff",
                format!("is {} Å; expected a positive length", self.cutoff),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(ModelError::config(
                "transformer.layer_norm_eps",
                format!("is {}; expected a positive number", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    fn n_parameters(&self, mode: ForceMode) -> usize {
        let (d, h) = (self.d_model, self.head_hidden);
        let mut p = self.n_embedding_parameters()
            + self.depth * self.n_block_parameters()
            + 2 * d
            + MlpHead::n_parameters(d, h, 1);
        if mode == ForceMode::Direct {
            p += if self.is_distance() {
                self.n_edge_head_parameters()
            } else {
                MlpHead::n_parameters(d, h, 3) + MlpHead::n_parameters(d, h, 6)
            };
        }
        p
    }

    fn for_parameters(target: usize, mode: ForceMode) -> Result<Self> {
        Self::ladder(target, mode, AttentionBias::None)
    }

    fn presets() -> Vec<(&'static str, Self)> {
        let adit = Self::adit;
        vec![
            ("adit-d16-l2", adit(16, 1, 2)),
            ("adit-d64-l2", adit(64, 1, 2)),
            ("adit-d64-l3", adit(64, 1, 3)),
            ("adit-d96-l3", adit(96, 1, 3)),
            ("adit-d128-l4", adit(128, 2, 4)),
            ("adit-d192-l5", adit(192, 3, 5)),
            ("adit-d192-l6", adit(192, 4, 6)),
            ("adit-d256-l6", adit(256, 4, 6)),
            ("adit-d320-l7", adit(320, 5, 7)),
            ("distance-d96-l3", adit(96, 1, 3).with_distance_bias()),
            ("distance-d192-l5", adit(192, 3, 5).with_distance_bias()),
        ]
    }

    fn build(&self, mode: ForceMode, vb: VarBuilder) -> Result<Box<dyn Model>> {
        self.check()?;
        Ok(Box::new(Transformer::new(self, mode, vb)?))
    }

    fn label(&self) -> String {
        match self.attention_bias {
            AttentionBias::None => Self::FAMILY.to_string(),
            AttentionBias::Distance => format!("{}_distance", Self::FAMILY),
        }
    }
}
