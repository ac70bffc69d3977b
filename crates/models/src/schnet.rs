//! SchNet: continuous-filter convolutions on the periodic neighbour graph.
//!
//! SchNet (Schütt et al., *SchNet: A continuous-filter convolutional neural network for
//! modeling quantum interactions*, NeurIPS 2017; *SchNet – A deep learning architecture for
//! molecules and materials*, J. Chem. Phys. 148, 241722, 2018) as implemented by PyTorch
//! Geometric's `torch_geometric.nn.models.SchNet` (PyG 2.8), with the same layers, the same
//! weight names and therefore the same parameter count:
//!
//! ```text
//! h⁰_i   = embedding[Z_i]                                   (max_atomic_number × H)
//! e_ij   = exp(−(d_ij − μ_k)² / 2Δ²),  μ_k = k·Δ, Δ = r_c/(G−1), k = 0..G−1   (Gaussian RBF)
//! C_ij   = ½ (cos(π d_ij / r_c) + 1)   for d_ij < r_c, else 0   (cosine cutoff)
//! for each of T interaction blocks t:
//!   W_ij   = Linear(F, F)(ssp(Linear(G, F)(e_ij))) · C_ij           (filter network)
//!   m_i    = Σ_{j ∈ N(i)} Linear(H, F, no bias)(hᵗ)_j ⊙ W_ij        (CFConv, sum)
//!   hᵗ⁺¹_i = hᵗ_i + Linear(H, H)(ssp(Linear(F, H)(m_i)))            (residual update)
//! E      = Σ_i Linear(H/2, 1)(ssp(Linear(H, H/2)(h_i)))              (readout "add")
//! ```
//!
//! with `ssp(x) = ln(1 + eˣ) − ln 2` (shifted softplus), evaluated as
//! `max(x, 0) + ln(1 + e^{−|x|}) − ln 2`, which never overflows. On the CPU it is one fused,
//! multi-threaded op ([`ShiftedSoftplusOp`], a branch-free vectorised f32 kernel, f64 through
//! libm) whose backward chains its own derivatives `σ(x)` and `σ(x)(1 − σ(x))`, so it is
//! differentiable any number of times (conservative training needs second derivatives); on
//! other devices it is composed of candle ops ([`shifted_softplus_composite`]).
//!
//! The radial basis is [`GaussianSmearing`] of `matscale-equivariant` with unit width (one
//! fused op on the CPU, differentiable twice). The edges come from the batch (the periodic neighbour list, built by the caller with the
//! model's cutoff); the network reads distances only through
//! [`Geometry::edge_lengths`](crate::Geometry), so it is periodic, invariant to rotations,
//! translations and permutations, and differentiable with respect to positions and strain.
//! The cosine cutoff is additionally masked to zero beyond `r_c`, so edges from a list built
//! with a larger cutoff contribute nothing (PyG's cutoff function would rise again there).
//!
//! ## Force modes
//! * [`ForceMode::Conservative`]: energy only; exactly PyG's `SchNet` (same parameter count).
//! * [`ForceMode::Direct`]: one extra *edge head* gives two invariant weights per edge,
//!   `[w_F, w_σ] = C_ij · Linear(H, 2)(ssp(A h_i + A h_j + Linear(G, H)(e_ij)))` with
//!   `A = Linear(H, H, no bias)`, turned into forces and stress by
//!   [`heads::edge_forces`] and [`heads::edge_stress`]. The weights are symmetric in the two
//!   atoms of an edge (both directions of a pair get the same weight), so direct forces obey
//!   Newton's third law: they sum to zero in every structure. The edge head adds
//!   `H² + G·H + H + 2H + 2` parameters (it equals `Linear(2H + G, H)` on the concatenation
//!   `[h_i, h_j, e_ij]` with tied weights for `h_i` and `h_j`, applied at the nodes before the
//!   gather so its cost scales with atoms, not edges).
//!
//! ## Parameter count
//! Per interaction block `G·F + F + F² + F + H·F + F·H + H + H² + H`; plus the embedding
//! `max_atomic_number·H` and the readout `H·⌊H/2⌋ + 2⌊H/2⌋ + 1`. For
//! `(H, F, T, G) = (128, 128, 6, 50)` this is 455,809, PyG's count. The study matscale
//! follows quotes 68,423 / 456,583 / 2,267,911 for (64, 64, 3, 50) / (128, 128, 6, 50) /
//! (256, 256, 8, 50): its early SchNet (Feb 2025) was PyG's plus a per-atom stress output
//! `Linear(H, 6)`, i.e. `6H + 6` more parameters (390 / 774 / 1,542); see
//! docs/ARCHITECTURE.md (SchNet).
//!
//! ## Size ladder ([`SchNetConfig::for_parameters`])
//! Gaussians `G = 50`, cutoff 5 Å; interactions `T` by the target band: `T = 1` below 3·10³
//! parameters, 2 below 10⁴, 3 below 10⁵, 6 below 10⁶, 8 below 10⁷ and 10 above (this puts
//! the study's three sizes on the ladder: 68k → 64 wide with 3 blocks, 456k → 128 with 6,
//! 2.3M → 256 with 8). The width `w = H = F` is the integer whose exact count is nearest the
//! target; if that is still more than 5% off (only below ~5·10³ parameters, where a unit of
//! width is a large step) `F` alone is re-chosen in `[⌊w/2⌋, 2w]` to land nearest. Every
//! target from 10³ to 10⁸ lands within 5%, in both force modes.
//!
//! ## FLOPs ([`crate::flops`] rules)
//! The radial basis costs `4 + exp` per element (with the floor mask), the cutoff `cos + 4`, the shifted softplus
//! `2·exp + 4` ([`SHIFTED_SOFTPLUS`]); gathers of `lin1(h)` onto edges and the scatter of the
//! messages are counted at `E·F` each, the embedding lookup at `N·H`, the readout sum at `N`.

use candle_core::{Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use matscale_equivariant::radial::GaussianSmearing;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::{BatchShape, BatchTensors, Geometry, Grouping};
use crate::config::{Architecture, Family};
use crate::error::{ModelError, Result};
use crate::flops::{FlopCounter, TRANSCENDENTAL};
use crate::heads;
use crate::model::{mean_per_structure, sum_per_structure, ForceMode, Model, RawOutput};

/// Radial-basis values below this are set to zero (they would make subnormal products).
pub const RBF_FLOOR: f64 = 1e-20;

/// FLOPs per element of the shifted softplus (two transcendentals plus abs, add, scale, shift).
pub const SHIFTED_SOFTPLUS: f64 = 2.0 * TRANSCENDENTAL + 4.0;

/// How per-atom energies become the energy of a structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// Sum over atoms (extensive energy; PyG's default `"add"`).
    #[default]
    Add,
    /// Mean over atoms (an intensive target).
    Mean,
}

/// Configuration of SchNet (field names and defaults of PyG's `SchNet`).
///
/// The default, `(H, F, T, G) = (128, 128, 6, 50)` with a 5 Å cutoff, is PyG's default and the
/// study's middle size: 455,809 parameters in conservative mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchNetConfig {
    /// Width `H` of the atom features (≥ 2; the readout halves it).
    pub hidden_channels: usize,
    /// Width `F` of the continuous filters (≥ 1).
    pub num_filters: usize,
    /// Number `T` of interaction blocks (≥ 1).
    pub num_interactions: usize,
    /// Number `G` of Gaussians of the radial basis on `[0, cutoff]` (≥ 2).
    pub num_gaussians: usize,
    /// Cutoff radius `r_c` of the cosine cutoff and of the radial basis, Å. Build the batch's
    /// neighbour list with the same cutoff.
    pub cutoff: f64,
    /// One past the largest atomic number embedded (the embedding has this many rows;
    /// 1..=119).
    pub max_atomic_number: usize,
    /// Per-structure readout of the per-atom energies.
    pub readout: Readout,
}

impl Default for SchNetConfig {
    fn default() -> Self {
        Self {
            hidden_channels: 128,
            num_filters: 128,
            num_interactions: 6,
            num_gaussians: 50,
            cutoff: 5.0,
            max_atomic_number: 100,
            readout: Readout::Add,
        }
    }
}

/// The interaction-count bands of the size ladder: `(upper target bound, T)`; above the last
/// bound `T = LADDER_MAX_INTERACTIONS`.
const LADDER_BANDS: [(f64, usize); 5] = [(3e3, 1), (1e4, 2), (1e5, 3), (1e6, 6), (1e7, 8)];
/// Interactions of the ladder above 10⁷ parameters.
const LADDER_MAX_INTERACTIONS: usize = 10;
/// Relative miss above which the ladder retunes `num_filters`.
const LADDER_RETUNE: f64 = 0.05;

impl SchNetConfig {
    /// The configuration with widths `hidden = filters = width`, `interactions` blocks and the
    /// defaults otherwise.
    pub fn with_width(width: usize, interactions: usize) -> Self {
        Self {
            hidden_channels: width,
            num_filters: width,
            num_interactions: interactions,
            ..Self::default()
        }
    }

    /// Parameters of one interaction block.
    pub fn interaction_parameters(&self) -> usize {
        let (h, f, g) = (self.hidden_channels, self.num_filters, self.num_gaussians);
        let filter_net = g * f + f + f * f + f;
        let conv = h * f + f * h + h;
        let update = h * h + h;
        filter_net + conv + update
    }

    /// Parameters of the atom-wise energy readout `Linear(H, H/2) – ssp – Linear(H/2, 1)`.
    pub fn readout_parameters(&self) -> usize {
        let h = self.hidden_channels;
        let half = h / 2;
        h * half + half + half + 1
    }

    /// Parameters of the direct force/stress edge head (zero in conservative mode).
    pub fn direct_head_parameters(&self, mode: ForceMode) -> usize {
        match mode {
            ForceMode::Conservative => 0,
            ForceMode::Direct => {
                let (h, g) = (self.hidden_channels, self.num_gaussians);
                h * h + g * h + h + 2 * h + 2
            }
        }
    }

    /// The ladder's interaction count for `target` parameters.
    fn ladder_interactions(target: usize) -> usize {
        LADDER_BANDS
            .iter()
            .find(|(bound, _)| (target as f64) < *bound)
            .map_or(LADDER_MAX_INTERACTIONS, |&(_, t)| t)
    }

    /// Relative distance of this configuration's count from `target`.
    fn miss(&self, target: usize, mode: ForceMode) -> f64 {
        (self.n_parameters(mode) as f64 - target as f64).abs() / target as f64
    }
}

impl Architecture for SchNetConfig {
    const FAMILY: Family = Family::Schnet;

    fn check(&self) -> Result<()> {
        let field = |name: &str| format!("schnet.{name}");
        if self.hidden_channels < 2 {
            return Err(ModelError::config(
                field("hidden_channels"),
                format!("is {}; must be at least 2", self.hidden_channels),
            ));
        }
        for (name, value, min) in [
            ("num_filters", self.num_filters, 1),
            ("num_interactions", self.num_interactions, 1),
            ("num_gaussians", self.num_gaussians, 2),
            ("max_atomic_number", self.max_atomic_number, 1),
        ] {
            if value < min {
                return Err(ModelError::config(
                    field(name),
                    format!("is {value}; must be at least {min}"),
                ));
            }
        }
        if self.max_atomic_number > crate::model::N_REFERENCE_ELEMENTS {
            return Err(ModelError::config(
                field("max_atomic_number"),
                format!(
                    "is {}; must be at most {}",
                    self.max_atomic_number,
                    crate::model::N_REFERENCE_ELEMENTS
                ),
            ));
        }
        if !(self.cutoff.is_finite() && self.cutoff > 0.0) {
            return Err(ModelError::config(
                field("cutoff"),
                format!("is {} Å; must be a positive number", self.cutoff),
            ));
        }
        Ok(())
    }

    fn n_parameters(&self, mode: ForceMode) -> usize {
        self.max_atomic_number * self.hidden_channels
            + self.num_interactions * self.interaction_parameters()
            + self.readout_parameters()
            + self.direct_head_parameters(mode)
    }

    fn for_parameters(target: usize, mode: ForceMode) -> Result<Self> {
        let interactions = Self::ladder_interactions(target);
        // Counts grow monotonically with the width: scan until they pass the target.
        let mut best = Self::with_width(2, interactions);
        let mut width = 2;
        loop {
            let candidate = Self::with_width(width, interactions);
            if candidate.miss(target, mode) < best.miss(target, mode) {
                best = candidate.clone();
            }
            if candidate.n_parameters(mode) >= target || width >= 1 << 20 {
                break;
            }
            width += 1;
        }
        if best.miss(target, mode) > LADDER_RETUNE {
            let w = best.hidden_channels;
            for filters in (w / 2).max(1)..=2 * w {
                let candidate = Self {
                    num_filters: filters,
                    ..best.clone()
                };
                if candidate.miss(target, mode) < best.miss(target, mode) {
                    best = candidate;
                }
            }
        }
        let miss = best.miss(target, mode);
        if miss > 0.1 {
            return Err(ModelError::config(
                "size",
                format!(
                    "asks for {target} parameters; the smallest SchNet ladder point has {} \
                     ({:.0}% off)",
                    best.n_parameters(mode),
                    100.0 * miss
                ),
            ));
        }
        Ok(best)
    }

    fn presets() -> Vec<(&'static str, Self)> {
        vec![
            ("study_small", Self::with_width(64, 3)),
            ("study_medium", Self::with_width(128, 6)),
            ("study_large", Self::with_width(256, 8)),
        ]
    }

    fn build(&self, mode: ForceMode, vb: VarBuilder) -> Result<Box<dyn Model>> {
        self.check()?;
        Ok(Box::new(SchNet::new(self, mode, vb)?))
    }
}

/// A linear layer initialised like PyG's SchNet: Xavier-uniform weights, zero bias.
fn xavier_linear(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let bound = (6.0 / (d_in + d_out) as f64).sqrt();
    let weight = vb.get_with_hints(
        (d_out, d_in),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(d_out, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// The shifted softplus `ln(1 + eˣ) − ln 2`, overflow-free and differentiable any number of
/// times. On the CPU it is one fused op ([`ShiftedSoftplusOp`]); elsewhere it is composed of
/// candle ops ([`shifted_softplus_composite`]).
pub fn shifted_softplus(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op1(ShiftedSoftplusOp { order: 0 })?)
    } else {
        shifted_softplus_composite(x)
    }
}

/// The shifted softplus from candle ops, `½(x + |x|) + ln(1 + e^{−|x|}) − ln 2`: its
/// derivative is exact at `x = 0` whichever sign candle gives `|x|'` there, and every op's
/// backward is itself differentiable. Used off the CPU; equal to [`shifted_softplus`].
pub fn shifted_softplus_composite(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let tail = abs.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok(((x + &abs)?.affine(0.5, -std::f64::consts::LN_2)? + tail)?)
}

/// `eʸ` for `y ≤ 0` in f32 without branches: `y = k ln 2 + r` with `|r| ≤ ln 2 / 2`, a
/// degree-7 Taylor polynomial for `eʳ` (truncation below 1e-8 relative) and `2ᵏ` written
/// into the exponent bits. `y` is clamped to `−87`, so the result stays a normal number.
#[inline(always)]
fn exp_nonpositive_f32(y: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 rounded to 17 bits: k · LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting rounds to an integer
    let y = y.max(-87.0);
    let k = (y * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (y - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    p * f32::from_bits((((k as i32) + 127) << 23) as u32)
}

/// `ln(1 + t)` for `t ∈ [0, 1]` in f32 without branches: `2 atanh(z)` with `z = t/(2 + t) ≤ 1/3`,
/// by its odd series to `z¹⁷` (truncation below 1e-9 relative); exact to rounding as `t → 0`.
#[inline(always)]
fn ln_1p_unit_f32(t: f32) -> f32 {
    let z = t / (2.0 + t);
    let w = z * z;
    let mut p = 1.0 / 17.0;
    for c in [
        1.0 / 15.0,
        1.0 / 13.0,
        1.0 / 11.0,
        1.0 / 9.0,
        1.0 / 7.0,
        1.0 / 5.0,
        1.0 / 3.0,
        1.0,
    ] {
        p = p * w + c;
    }
    2.0 * z * p
}

#[inline(always)]
fn ssp_f32_body(op: ShiftedSoftplusOp, xs: &mut [f32]) {
    for x in xs {
        *x = op.eval_f32(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn ssp_f32_avx2(op: ShiftedSoftplusOp, xs: &mut [f32]) {
    ssp_f32_body(op, xs);
}

/// Elements per rayon task of [`ShiftedSoftplusOp`].
const SSP_CHUNK: usize = 1 << 14;

/// The fused CPU op of the shifted softplus and its derivatives: `order` 0 is
/// `ssp(x) = max(x, 0) + ln(1 + e^{−|x|}) − ln 2`, 1 is `σ(x)`, 2 is `σ(x)(1 − σ(x))`.
/// The backward of order `k < 2` multiplies the gradient by order `k + 1`; that of order 2 is
/// composed of candle ops on order 1, so every derivative exists (conservative training needs
/// the second). f32 is evaluated in f32, f64 in f64, bf16 and f16 in f32.
#[derive(Debug, Clone, Copy)]
pub struct ShiftedSoftplusOp {
    /// 0 for the value, 1 and 2 for the derivatives.
    pub order: u8,
}

impl ShiftedSoftplusOp {
    #[inline]
    fn eval_f64(self, x: f64) -> f64 {
        match self.order {
            0 => x.max(0.0) + (-x.abs()).exp().ln_1p() - std::f64::consts::LN_2,
            1 => 1.0 / (1.0 + (-x).exp()),
            _ => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 - s)
            }
        }
    }

    #[inline(always)]
    fn eval_f32(self, x: f32) -> f32 {
        // Everything from e = e^{−|x|} ∈ (0, 1], so nothing overflows and the loop has no
        // branches (the selects compile to blends), which lets it vectorise.
        let e = exp_nonpositive_f32(-x.abs());
        match self.order {
            0 => x.max(0.0) + ln_1p_unit_f32(e) - std::f32::consts::LN_2,
            1 => {
                let s = 1.0 / (1.0 + e);
                if x >= 0.0 {
                    s
                } else {
                    e * s
                }
            }
            _ => e / ((1.0 + e) * (1.0 + e)),
        }
    }

    /// Applies the f32 evaluation to a slice, with AVX2 and FMA where the CPU has them.
    fn apply_f32(self, xs: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { ssp_f32_avx2(self, xs) };
            return;
        }
        ssp_f32_body(self, xs);
    }

    fn kernel<T: candle_core::WithDType>(self, src: &[T], eval: impl Fn(T) -> T + Sync) -> Vec<T> {
        let mut out = src.to_vec();
        out.par_chunks_mut(SSP_CHUNK).for_each(|chunk| {
            for x in chunk {
                *x = eval(*x);
            }
        });
        out
    }
}

impl candle_core::CustomOp1 for ShiftedSoftplusOp {
    fn name(&self) -> &'static str {
        match self.order {
            0 => "shifted-softplus",
            1 => "shifted-softplus-d1",
            _ => "shifted-softplus-d2",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::{CpuStorage, WithDType};
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: input must be contiguous", self.name()))
        })?;
        let op = *self;
        let out = match storage {
            CpuStorage::F32(v) => {
                let mut out = v[start..end].to_vec();
                out.par_chunks_mut(SSP_CHUNK)
                    .for_each(|chunk| op.apply_f32(chunk));
                CpuStorage::F32(out)
            }
            CpuStorage::F64(v) => CpuStorage::F64(op.kernel(&v[start..end], |x| op.eval_f64(x))),
            CpuStorage::BF16(v) => CpuStorage::BF16(op.kernel(&v[start..end], |x| {
                WithDType::from_f64(f64::from(op.eval_f32(x.to_f64() as f32)))
            })),
            CpuStorage::F16(v) => CpuStorage::F16(op.kernel(&v[start..end], |x| {
                WithDType::from_f64(f64::from(op.eval_f32(x.to_f64() as f32)))
            })),
            other => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        matscale_equivariant::cuda::shifted_softplus(storage, layout, self.order, self.name())
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let arg = arg.contiguous()?;
        let derivative = if self.order < 2 {
            arg.apply_op1(ShiftedSoftplusOp {
                order: self.order + 1,
            })?
        } else {
            // (σ(1 − σ))' = σ(1 − σ)(1 − 2σ), from order 1 so that it stays differentiable.
            let s = arg.apply_op1(ShiftedSoftplusOp { order: 1 })?;
            let one_minus = s.affine(-1.0, 1.0)?;
            ((&s * &one_minus)? * s.affine(-2.0, 1.0)?)?
        };
        Ok(Some(grad_res.mul(&derivative)?))
    }
}

/// One interaction block (PyG's `InteractionBlock` with its `CFConv`).
#[derive(Debug, Clone)]
struct Interaction {
    /// Filter network, first layer `G → F`.
    filter_in: Linear,
    /// Filter network, second layer `F → F`.
    filter_out: Linear,
    /// `CFConv.lin1`, `H → F`, no bias.
    conv_in: Linear,
    /// `CFConv.lin2`, `F → H`.
    conv_out: Linear,
    /// The block's output layer `H → H`.
    update: Linear,
}

impl Interaction {
    fn new(config: &SchNetConfig, vb: VarBuilder) -> Result<Self> {
        let (h, f, g) = (
            config.hidden_channels,
            config.num_filters,
            config.num_gaussians,
        );
        Ok(Self {
            filter_in: xavier_linear(g, f, true, vb.pp("mlp.0"))?,
            filter_out: xavier_linear(f, f, true, vb.pp("mlp.2"))?,
            conv_in: xavier_linear(h, f, false, vb.pp("conv.lin1"))?,
            conv_out: xavier_linear(f, h, true, vb.pp("conv.lin2"))?,
            update: xavier_linear(h, h, true, vb.pp("lin"))?,
        })
    }

    /// The block's update of `h` `[N, H]` (to be added to `h`).
    fn forward(&self, h: &Tensor, edges: &EdgeFeatures, batch: &BatchTensors) -> Result<Tensor> {
        let filters = self
            .filter_out
            .forward(&shifted_softplus(&self.filter_in.forward(&edges.rbf)?)?)?
            .broadcast_mul(&edges.cutoff)?;
        let x = self.conv_in.forward(h)?;
        let messages = (batch.gather_by(Grouping::EdgesBySource, &x)? * filters)?;
        let summed = batch.sum_over(Grouping::EdgesByTarget, &messages)?;
        let y = shifted_softplus(&self.conv_out.forward(&summed)?)?;
        Ok(self.update.forward(&y)?)
    }
}

/// The invariant edge features shared by the blocks, in the weight dtype.
struct EdgeFeatures {
    /// Gaussian radial basis `[E, G]`.
    rbf: Tensor,
    /// Masked cosine cutoff `[E, 1]`.
    cutoff: Tensor,
}

/// The direct-mode edge head (see the [module docs](self)).
#[derive(Debug, Clone)]
struct EdgeHead {
    /// `A`: `H → H`, no bias, applied to both atoms of an edge.
    node: Linear,
    /// `G → H` on the radial basis.
    radial: Linear,
    /// `H → 2`: force and stress weights.
    out: Linear,
}

/// SchNet (see the [module docs](self)).
#[derive(Debug)]
pub struct SchNet {
    config: SchNetConfig,
    mode: ForceMode,
    /// `[max_atomic_number, H]`.
    embedding: Tensor,
    /// The Gaussian radial basis (PyG's `GaussianSmearing(0, cutoff, G)`: unit width).
    smearing: GaussianSmearing,
    interactions: Vec<Interaction>,
    /// Readout `H → H/2`.
    readout_in: Linear,
    /// Readout `H/2 → 1`.
    readout_out: Linear,
    edge_head: Option<EdgeHead>,
}

impl SchNet {
    /// Builds SchNet with weights from `vb`, named as in PyG's `SchNet.state_dict()`
    /// (`embedding.weight`, `interactions.{t}.mlp.{0,2}`, `interactions.{t}.conv.lin{1,2}`,
    /// `interactions.{t}.lin`, `lin1`, `lin2`), plus `edge_head.{node,radial,out}` in direct
    /// mode.
    pub fn new(config: &SchNetConfig, mode: ForceMode, vb: VarBuilder) -> Result<Self> {
        config.check()?;
        let h = config.hidden_channels;
        let embedding = vb.get_with_hints(
            (config.max_atomic_number, h),
            "embedding.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let interactions = (0..config.num_interactions)
            .map(|t| Interaction::new(config, vb.pp(format!("interactions.{t}"))))
            .collect::<Result<Vec<_>>>()?;
        let edge_head = match mode {
            ForceMode::Conservative => None,
            ForceMode::Direct => {
                let vb = vb.pp("edge_head");
                Some(EdgeHead {
                    node: xavier_linear(h, h, false, vb.pp("node"))?,
                    radial: xavier_linear(config.num_gaussians, h, true, vb.pp("radial"))?,
                    out: xavier_linear(h, 2, true, vb.pp("out"))?,
                })
            }
        };
        Ok(Self {
            config: config.clone(),
            mode,
            embedding,
            smearing: GaussianSmearing::new(0.0, config.cutoff, config.num_gaussians, 1.0)?,
            interactions,
            readout_in: xavier_linear(h, h / 2, true, vb.pp("lin1"))?,
            readout_out: xavier_linear(h / 2, 1, true, vb.pp("lin2"))?,
            edge_head,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchNetConfig {
        &self.config
    }

    /// Radial basis and cutoff of every edge, computed in the geometry's dtype and cast to the
    /// weight dtype.
    fn edge_features(&self, geometry: &Geometry) -> Result<EdgeFeatures> {
        let d = &geometry.edge_lengths;
        let master = d.dtype();
        let dtype = self.embedding.dtype();
        let rc = self.config.cutoff;
        let rbf = if d.device().is_cpu() {
            self.smearing.forward(d)?
        } else {
            let g = self.smearing.num_output();
            let centres = Tensor::from_slice(self.smearing.offsets(), (1, g), d.device())?;
            d.unsqueeze(D::Minus1)?
                .broadcast_sub(&centres.to_dtype(master)?)?
                .sqr()?
                .affine(self.smearing.coeff(), 0.0)?
                .exp()?
        };
        // Gaussians far from a distance are tiny; their products with the weights are
        // subnormal floats, which slow the filter network's matrix product on x86 a hundredfold
        // (measured: 200 ms instead of 2 ms for 13,590 edges). Values below RBF_FLOOR are
        // therefore set to zero (a change far below the rounding of any output).
        let rbf = (&rbf * rbf.ge(RBF_FLOOR)?.to_dtype(master)?)?;
        let inside = d.lt(rc)?.to_dtype(master)?;
        let cutoff = (d
            .affine(std::f64::consts::PI / rc, 0.0)?
            .cos()?
            .affine(0.5, 0.5)?
            * inside)?;
        Ok(EdgeFeatures {
            rbf: rbf.to_dtype(dtype)?,
            cutoff: cutoff.unsqueeze(D::Minus1)?.to_dtype(dtype)?,
        })
    }
}

impl Model for SchNet {
    fn forward(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        _train: bool,
    ) -> Result<RawOutput> {
        let edges = self.edge_features(geometry)?;
        // Indices from host data (`RowIndex`): on a GPU no copy back from the device;
        // on the CPU `index_select`, as before.
        let numbers = batch.host_row_index(&batch.numbers_host, self.embedding.dim(0)?)?;
        let mut h = numbers.gather(&self.embedding)?;
        for block in &self.interactions {
            h = (&h + block.forward(&h, &edges, batch)?)?;
        }
        let per_atom = self
            .readout_out
            .forward(&shifted_softplus(&self.readout_in.forward(&h)?)?)?;
        let energy = match self.config.readout {
            Readout::Add => sum_per_structure(batch, &per_atom)?,
            Readout::Mean => mean_per_structure(batch, &per_atom)?,
        }
        .squeeze(D::Minus1)?;
        let (forces, stress) = match &self.edge_head {
            None => (None, None),
            // Without edges there is nothing to weigh (and candle's index_add rejects the
            // empty, non-contiguous outer products).
            Some(_) if batch.n_edges() == 0 => {
                let (n, b, dtype) = (batch.n_nodes(), batch.n_structures(), h.dtype());
                (
                    Some(Tensor::zeros((n, 3), dtype, h.device())?),
                    Some(Tensor::zeros((b, 3, 3), dtype, h.device())?),
                )
            }
            Some(head) => {
                let a = head.node.forward(&h)?;
                // `RowIndex::gather`, not `gather_by`: on the CPU candle's `index_select`,
                // whose backward adds both gathers into one gradient in place, as before
                // (separate segment sums would change the rounding of SchNet's sweeps).
                let (src, dst) = (
                    batch.row_index(Grouping::EdgesBySource),
                    batch.row_index(Grouping::EdgesByTarget),
                );
                let pre =
                    ((src.gather(&a)? + dst.gather(&a)?)? + head.radial.forward(&edges.rbf)?)?;
                let weights = head
                    .out
                    .forward(&shifted_softplus(&pre)?)?
                    .broadcast_mul(&edges.cutoff)?;
                let force_weights = weights.narrow(1, 0, 1)?.squeeze(1)?;
                let stress_weights = weights.narrow(1, 1, 1)?.squeeze(1)?;
                (
                    Some(heads::edge_forces(batch, geometry, &force_weights)?),
                    Some(heads::edge_stress(batch, geometry, &stress_weights)?),
                )
            }
        };
        Ok(RawOutput {
            energy,
            forces,
            stress,
        })
    }

    fn count_flops(&self, shape: &BatchShape, counter: &mut FlopCounter) {
        let c = &self.config;
        let (n, e) = (shape.n_nodes, shape.n_edges);
        let (h, f, g) = (c.hidden_channels, c.num_filters, c.num_gaussians);
        // Radial basis (subtract, square, scale, exp) and masked cosine cutoff.
        counter.elementwise(e * g, 4.0 + TRANSCENDENTAL); // with the floor mask
        counter.elementwise(e, TRANSCENDENTAL + 4.0);
        counter.gather(n, h); // embedding lookup
        for _ in 0..c.num_interactions {
            counter.linear(e, g, f, true);
            counter.elementwise(e * f, SHIFTED_SOFTPLUS);
            counter.linear(e, f, f, true);
            counter.elementwise(e * f, 1.0); // × cutoff
            counter.linear(n, h, f, false);
            counter.gather(e, f);
            counter.elementwise(e * f, 1.0); // x_j ⊙ W
            counter.scatter(e, f);
            counter.linear(n, f, h, true);
            counter.elementwise(n * h, SHIFTED_SOFTPLUS);
            counter.linear(n, h, h, true);
            counter.elementwise(n * h, 1.0); // residual
        }
        counter.linear(n, h, h / 2, true);
        counter.elementwise(n * (h / 2), SHIFTED_SOFTPLUS);
        counter.linear(n, h / 2, 1, true);
        counter.scatter(n, 1);
        if self.mode == ForceMode::Direct {
            counter.linear(n, h, h, false);
            counter.gather(e, h);
            counter.gather(e, h);
            counter.linear(e, g, h, true);
            counter.elementwise(e * h, 2.0); // the two adds
            counter.elementwise(e * h, SHIFTED_SOFTPLUS);
            counter.linear(e, h, 2, true);
            counter.elementwise(e * 2, 1.0); // × cutoff
            heads::count_edge_heads(e, counter);
        }
    }

    fn max_atomic_number(&self) -> usize {
        self.config.max_atomic_number
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn shifted_softplus_is_stable_and_exact() {
        let xs = [-1000.0f64, -30.0, -1.0, 0.0, 0.5, 30.0, 1000.0];
        let t = Tensor::new(&xs, &Device::Cpu).unwrap();
        let y = shifted_softplus(&t).unwrap().to_vec1::<f64>().unwrap();
        for (x, y) in xs.iter().zip(y) {
            let want = if *x > 30.0 {
                x - std::f64::consts::LN_2
            } else {
                x.exp().ln_1p() - std::f64::consts::LN_2
            };
            assert!((y - want).abs() < 1e-12, "ssp({x}) = {y}, want {want}");
        }
    }

    /// The fused op equals the composite one, in value and in first, second and third
    /// derivatives (the last through the composite backward of order 2).
    #[test]
    fn fused_shifted_softplus_matches_composite_to_third_derivative() {
        use candle_core::Var;
        let xs = [-40.0f64, -3.0, -0.7, 0.0, 0.2, 2.5, 40.0];
        let derivatives = |f: fn(&Tensor) -> Result<Tensor>| -> Vec<Vec<f64>> {
            let x = Var::from_slice(&xs, xs.len(), &Device::Cpu).unwrap();
            let mut out = Vec::new();
            let mut y = f(x.as_tensor()).unwrap();
            for _ in 0..4 {
                out.push(y.to_vec1::<f64>().unwrap());
                let g = y.sum_all().unwrap().backward().unwrap();
                y = g.get(x.as_tensor()).expect("differentiable").clone();
            }
            out
        };
        crate::enable_higher_order_gradients().unwrap();
        let fused = derivatives(shifted_softplus);
        let composite = derivatives(shifted_softplus_composite);
        for (order, (a, b)) in fused.iter().zip(&composite).enumerate() {
            for (k, (a, b)) in a.iter().zip(b).enumerate() {
                assert!(
                    (a - b).abs() < 1e-12,
                    "order {order} at {}: {a} vs {b}",
                    xs[k]
                );
            }
        }
        // σ'(0) = 1/4, σ''(0) = 0.
        assert!((fused[2][3] - 0.25).abs() < 1e-15 && fused[3][3].abs() < 1e-15);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = Tensor::new(&xs, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y = shifted_softplus(&x).unwrap().to_dtype(DType::F64).unwrap();
            let y = y.to_vec1::<f64>().unwrap();
            for (k, (a, b)) in y.iter().zip(&fused[0]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-2 * b.abs().max(1.0),
                    "{dtype:?} {}",
                    xs[k]
                );
            }
        }
    }

    /// The branch-free f32 kernels agree with the f64 evaluation to f32 precision.
    #[test]
    fn f32_kernels_are_accurate() {
        let xs: Vec<f32> = (-20_000..=20_000)
            .map(|k| k as f32 * 0.005)
            .chain([-1e4, 1e4])
            .collect();
        for order in 0..3 {
            let op = ShiftedSoftplusOp { order };
            let mut ys = xs.clone();
            op.apply_f32(&mut ys);
            for (x, y) in xs.iter().zip(ys) {
                let want = op.eval_f64(f64::from(*x));
                let err = (f64::from(y) - want).abs() / want.abs().max(1.0);
                assert!(err < 1e-6, "order {order} at {x}: {y} vs {want}");
            }
        }
    }

    #[test]
    fn ladder_bands_are_increasing() {
        for pair in LADDER_BANDS.windows(2) {
            assert!(pair[0].0 < pair[1].0 && pair[0].1 <= pair[1].1);
        }
    }

    #[test]
    fn data_type_of_features_follows_weights() {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::BF16, &Device::Cpu);
        let config = SchNetConfig::with_width(4, 1);
        let model = SchNet::new(&config, ForceMode::Conservative, vb).unwrap();
        assert_eq!(model.embedding.dtype(), DType::BF16);
    }
}
