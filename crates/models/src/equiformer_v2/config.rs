//! [`EquiformerV2Config`]: the hyper-parameters of fairchem's `EquiformerV2Backbone` and its
//! OMat24 heads, their validation, and the exact analytic parameter count per component
//! ([`ParameterBreakdown`]).

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::model::ForceMode;

/// Number of Gaussian distance centres EquiformerV2 uses whatever `num_distance_basis` says
/// (fairchem hard-codes `GaussianSmearing(0, cutoff, 600, 2.0)`).
pub const NUM_GAUSSIANS: usize = 600;

/// How the roll of each edge frame about its edge is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameRoll {
    /// A fresh uniformly random roll per edge and forward pass, as fairchem does (the stream
    /// is seeded by `frame_seed` and advanced on every forward, so runs are reproducible).
    #[default]
    Random,
    /// A deterministic zero roll (exactly reproducible outputs; the model is then a
    /// deterministic function of the geometry).
    Zero,
}

/// Configuration of EquiformerV2 (Liao, Wood, Das & Smidt, *EquiformerV2: Improved Equivariant
/// Transformer for Scaling to Higher-Degree Representations*, ICLR 2024) as fairchem 1.x
/// `models/equiformer_v2` builds it, with the OMat24 heads.
///
/// Field names are fairchem's constructor arguments. The default is fairchem's OMat24
/// **eqV2-S** configuration (`eqV2_31M_omat`): 8 layers, 128 sphere channels, `lmax 4`,
/// `mmax 2`, grid 18, 20 neighbours within 12 Å, 96 elements; 31,207,434 parameters in
/// [`ForceMode::Direct`] (backbone 27,795,584 + energy 148,353 + force 3,130,881 + stress
/// 132,616).
///
/// Options fairchem offers but this port does not implement yet (they are validated and
/// rejected by [`EquiformerV2Config::check`] with the field named): several resolutions
/// (`lmax_list` of length ≠ 1), `share_atom_edge_embedding`, `use_m_share_rad`,
/// `use_s2_act_attn`, `use_gate_act`, `use_grid_mlp = false`, `use_sep_s2_act = false`,
/// activations other than `silu`, distance functions other than `gaussian`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EquiformerV2Config {
    /// Number of `TransBlockV2` layers (default 8).
    pub num_layers: usize,
    /// Channels per spherical-harmonic coefficient of the node embeddings (default 128).
    pub sphere_channels: usize,
    /// Hidden channels of the SO(2) graph attention (default 64).
    pub attn_hidden_channels: usize,
    /// Attention heads (default 8).
    pub num_heads: usize,
    /// Channels of the attention logit (alpha) vector per head (default 64).
    pub attn_alpha_channels: usize,
    /// Channels of the value vector per head (default 16).
    pub attn_value_channels: usize,
    /// Hidden channels of the feed-forward grid MLP (default 128).
    pub ffn_hidden_channels: usize,
    /// Normalisation: `layer_norm`, `layer_norm_sh` (default) or `rms_norm_sh`.
    pub norm_type: String,
    /// Largest degree `l` per resolution (default `[4]`; one resolution supported).
    pub lmax_list: Vec<usize>,
    /// Largest order `|m|` kept in the edge frame per resolution (default `[2]`).
    pub mmax_list: Vec<usize>,
    /// Resolution of the sphere grid of the S2 activations (default 18).
    pub grid_resolution: usize,
    /// fairchem's `num_sphere_samples` (default 128; unused by the energy/force/stress heads,
    /// kept for config compatibility).
    pub num_sphere_samples: usize,
    /// Hidden channels of the radial functions and of the atom-edge embeddings (default 128).
    pub edge_channels: usize,
    /// Concatenate source and target atom embeddings to the distance features (default true).
    pub use_atom_edge_embedding: bool,
    /// Share the atom-edge embeddings across blocks (default false; `true` not supported).
    pub share_atom_edge_embedding: bool,
    /// Share radial weights over the orders of a degree (default false; `true` not
    /// supported).
    pub use_m_share_rad: bool,
    /// Distance basis (default `gaussian`, the only one fairchem accepts).
    pub distance_function: String,
    /// fairchem's `num_distance_basis` (default 512). **Ignored by fairchem**, which always
    /// uses [`NUM_GAUSSIANS`] = 600 centres; kept for config compatibility.
    pub num_distance_basis: usize,
    /// Activation of the attention (default `silu`).
    pub attn_activation: String,
    /// Attention from S2-activated features (default false; `true` not supported).
    pub use_s2_act_attn: bool,
    /// LayerNorm on the attention logit vectors (default true).
    pub use_attn_renorm: bool,
    /// Activation of the feed-forward network (default `silu`).
    pub ffn_activation: String,
    /// Gate activation instead of S2 activation (default false; `true` not supported).
    pub use_gate_act: bool,
    /// Feed-forward as an MLP on sphere-grid values (default true; `false` not supported).
    pub use_grid_mlp: bool,
    /// Separable S2 activation (default true; `false` not supported).
    pub use_sep_s2_act: bool,
    /// Dropout on attention weights during training (default 0.1).
    pub alpha_drop: f64,
    /// Drop-path (stochastic depth per structure) rate during training (default 0.1).
    pub drop_path_rate: f64,
    /// Dropout on block outputs (default 0; must be 0, not implemented).
    pub proj_drop: f64,
    /// Weight initialisation of linear layers: `uniform` (default, OMat24) or `normal`.
    pub weight_init: String,
    /// Neighbours kept per atom when the graph is built (default 20; used by the data
    /// pipeline, not by the network).
    pub max_neighbors: usize,
    /// Cutoff radius, Å (default 12): the range of the Gaussian distance basis.
    pub max_radius: f64,
    /// One past the largest atomic number embedded (default 96, as eqV2-S).
    pub max_num_elements: usize,
    /// The energy head's sum over atoms is divided by this (fairchem's "average atoms per
    /// structure"). Default **1**: matscale's trainer already scales energies per atom (its
    /// normaliser predicts `E = s·raw + Σ ref[Z]` with `s` the per-atom spread), so any other
    /// value makes the per-atom outputs grow by that factor before the energy can fit, and
    /// small models then barely learn energies in practical budgets. fairchem's OMat24 models
    /// and the scaling study use 31.17: set it to reproduce their raw outputs or to use their
    /// weights with their own normalisation.
    pub avg_num_nodes: f64,
    /// Average in-degree; the edge-degree embedding is divided by it (default 61.95).
    pub avg_degree: f64,
    /// Roll of the edge frames in direct mode (default `random`, as fairchem); conservative
    /// mode always uses its deterministic differentiable frames.
    pub frame_roll: FrameRoll,
    /// Seed of the random frame rolls (default 0).
    pub frame_seed: u64,
}

impl Default for EquiformerV2Config {
    fn default() -> Self {
        Self {
            num_layers: 8,
            sphere_channels: 128,
            attn_hidden_channels: 64,
            num_heads: 8,
            attn_alpha_channels: 64,
            attn_value_channels: 16,
            ffn_hidden_channels: 128,
            norm_type: "layer_norm_sh".into(),
            lmax_list: vec![4],
            mmax_list: vec![2],
            grid_resolution: 18,
            num_sphere_samples: 128,
            edge_channels: 128,
            use_atom_edge_embedding: true,
            share_atom_edge_embedding: false,
            use_m_share_rad: false,
            distance_function: "gaussian".into(),
            num_distance_basis: 512,
            attn_activation: "silu".into(),
            use_s2_act_attn: false,
            use_attn_renorm: true,
            ffn_activation: "silu".into(),
            use_gate_act: false,
            use_grid_mlp: true,
            use_sep_s2_act: true,
            alpha_drop: 0.1,
            drop_path_rate: 0.1,
            proj_drop: 0.0,
            weight_init: "uniform".into(),
            max_neighbors: 20,
            max_radius: 12.0,
            max_num_elements: 96,
            avg_num_nodes: 1.0,
            avg_degree: 61.95,
            frame_roll: FrameRoll::Random,
            frame_seed: 0,
        }
    }
}

fn field(name: &str) -> String {
    format!("equiformer_v2.{name}")
}

fn positive(name: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(ModelError::config(field(name), "must be at least 1, got 0"));
    }
    Ok(())
}

fn fixed_bool(name: &str, value: bool, supported: bool) -> Result<()> {
    if value != supported {
        return Err(ModelError::config(
            field(name),
            format!("is {value}; only {supported} is implemented"),
        ));
    }
    Ok(())
}

fn one_of(name: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if !allowed.contains(&value) {
        return Err(ModelError::config(
            field(name),
            format!("is `{value}`; expected one of {}", allowed.join(", ")),
        ));
    }
    Ok(())
}

fn probability(name: &str, value: f64) -> Result<()> {
    if !(0.0..1.0).contains(&value) {
        return Err(ModelError::config(
            field(name),
            format!("is {value}; expected a probability in [0, 1)"),
        ));
    }
    Ok(())
}

fn positive_finite(name: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(ModelError::config(
            field(name),
            format!("is {value}; expected a finite positive number"),
        ));
    }
    Ok(())
}

impl EquiformerV2Config {
    /// Checks every field; the error names the field (`equiformer_v2.<name>`).
    pub fn check(&self) -> Result<()> {
        positive("num_layers", self.num_layers)?;
        positive("sphere_channels", self.sphere_channels)?;
        positive("attn_hidden_channels", self.attn_hidden_channels)?;
        positive("num_heads", self.num_heads)?;
        positive("attn_alpha_channels", self.attn_alpha_channels)?;
        positive("attn_value_channels", self.attn_value_channels)?;
        positive("ffn_hidden_channels", self.ffn_hidden_channels)?;
        positive("edge_channels", self.edge_channels)?;
        positive("max_num_elements", self.max_num_elements)?;
        positive("max_neighbors", self.max_neighbors)?;
        one_of(
            "norm_type",
            &self.norm_type,
            &["layer_norm", "layer_norm_sh", "rms_norm_sh"],
        )?;
        if self.lmax_list.len() != 1 {
            return Err(ModelError::config(
                field("lmax_list"),
                format!(
                    "has {} entries; exactly one resolution is implemented",
                    self.lmax_list.len()
                ),
            ));
        }
        if self.mmax_list.len() != self.lmax_list.len() {
            return Err(ModelError::config(
                field("mmax_list"),
                format!(
                    "has {} entries; expected one per entry of lmax_list ({})",
                    self.mmax_list.len(),
                    self.lmax_list.len()
                ),
            ));
        }
        let (lmax, mmax) = (self.lmax(), self.mmax());
        if !(1..=matscale_equivariant::mapping::SphericalLayout::MAX_LMAX).contains(&lmax) {
            return Err(ModelError::config(
                field("lmax_list"),
                format!(
                    "holds lmax {lmax}; expected 1..={}",
                    matscale_equivariant::mapping::SphericalLayout::MAX_LMAX
                ),
            ));
        }
        if mmax > lmax {
            return Err(ModelError::config(
                field("mmax_list"),
                format!("holds mmax {mmax} > lmax {lmax}"),
            ));
        }
        if self.grid_resolution != 0 && self.grid_resolution <= 2 * lmax {
            return Err(ModelError::config(
                field("grid_resolution"),
                format!(
                    "is {}; the sphere grid needs more than 2·lmax = {} points per axis",
                    self.grid_resolution,
                    2 * lmax
                ),
            ));
        }
        fixed_bool(
            "use_atom_edge_embedding",
            self.use_atom_edge_embedding,
            true,
        )?;
        fixed_bool(
            "share_atom_edge_embedding",
            self.share_atom_edge_embedding,
            false,
        )?;
        fixed_bool("use_m_share_rad", self.use_m_share_rad, false)?;
        fixed_bool("use_s2_act_attn", self.use_s2_act_attn, false)?;
        fixed_bool("use_gate_act", self.use_gate_act, false)?;
        fixed_bool("use_grid_mlp", self.use_grid_mlp, true)?;
        fixed_bool("use_sep_s2_act", self.use_sep_s2_act, true)?;
        one_of("distance_function", &self.distance_function, &["gaussian"])?;
        one_of("attn_activation", &self.attn_activation, &["silu"])?;
        one_of("ffn_activation", &self.ffn_activation, &["silu"])?;
        one_of("weight_init", &self.weight_init, &["uniform", "normal"])?;
        probability("alpha_drop", self.alpha_drop)?;
        probability("drop_path_rate", self.drop_path_rate)?;
        if self.proj_drop != 0.0 {
            return Err(ModelError::config(
                field("proj_drop"),
                format!("is {}; only 0 is implemented", self.proj_drop),
            ));
        }
        positive_finite("max_radius", self.max_radius)?;
        positive_finite("avg_num_nodes", self.avg_num_nodes)?;
        positive_finite("avg_degree", self.avg_degree)?;
        Ok(())
    }

    /// The largest degree (the single entry of `lmax_list`; 0 if it is empty).
    pub fn lmax(&self) -> usize {
        self.lmax_list.first().copied().unwrap_or(0)
    }

    /// The largest order kept in the edge frame (the single entry of `mmax_list`).
    pub fn mmax(&self) -> usize {
        self.mmax_list.first().copied().unwrap_or(0)
    }

    /// Input width of every radial function: the 600 Gaussians plus, with atom-edge
    /// embeddings, the source and target embeddings (`600 + 2·edge_channels`).
    pub fn radial_input_channels(&self) -> usize {
        NUM_GAUSSIANS
            + if self.use_atom_edge_embedding {
                2 * self.edge_channels
            } else {
                0
            }
    }

    /// Exact parameter count per component (see [`ParameterBreakdown`]).
    pub fn parameter_breakdown(&self) -> ParameterBreakdown {
        let (l, m) = (self.lmax(), self.mmax());
        let c = self.sphere_channels;
        let ec = self.edge_channels;
        let z = self.max_num_elements;
        let f = self.ffn_hidden_channels;
        let rad_in = self.radial_input_channels();
        let atom_edge = if self.use_atom_edge_embedding {
            2 * z * ec
        } else {
            0
        };
        let norm = norm_parameters(&self.norm_type, l, c);
        let edge_degree_radial = radial_parameters(&[rad_in, ec, ec, (l + 1) * c]);
        let attention =
            |out: usize| attention_parameters(self, AttentionShape { l, m, out, rad_in });
        let block_ffn = ffn_parameters(l, c, f, c);
        let block_attention = attention(c);
        let rank2_width = 2 * c;
        let stress = norm_parameters(&self.norm_type, l, 1)
            + 2 * rank2_width
            + 2 * (linear(rank2_width, rank2_width, true) + linear(rank2_width, 1, true));
        ParameterBreakdown {
            sphere_embedding: z * c,
            edge_degree_atom_embeddings: atom_edge,
            edge_degree_radial,
            block_norms: 2 * norm,
            block_attention,
            block_attention_atom_embeddings: atom_edge,
            block_ffn,
            num_layers: self.num_layers,
            final_norm: norm,
            energy_head: ffn_parameters(l, c, f, 1),
            force_head: attention(1),
            force_head_atom_embeddings: atom_edge,
            stress_head: stress,
        }
    }

    /// fairchem's OMat24 eqV2-S (31,207,434 parameters in [`ForceMode::Direct`]); as every
    /// preset, with `avg_num_nodes = 1` for matscale's normaliser (fairchem: 31.17).
    pub fn eqv2_s() -> Self {
        Self::default()
    }

    /// fairchem's OMat24 eqV2-M: eqV2-S with 10 layers, `lmax 6`, `mmax 4` (86,589,068).
    pub fn eqv2_m() -> Self {
        Self {
            num_layers: 10,
            lmax_list: vec![6],
            mmax_list: vec![4],
            ..Self::default()
        }
    }

    /// fairchem's OMat24 eqV2-L: eqV2-S with 20 layers, `lmax 6`, `mmax 3` (153,769,868).
    pub fn eqv2_l() -> Self {
        Self {
            num_layers: 20,
            lmax_list: vec![6],
            mmax_list: vec![3],
            ..Self::default()
        }
    }

    /// The scaling study's shape (Trikha et al.): `layers`, sphere = edge channels `sphere`,
    /// `ffn` hidden channels, attention hidden = alpha channels `attn`, `heads`, `value`
    /// channels; everything else as eqV2-S (`lmax 4`, `mmax 2`, grid 18, 12 Å, 96 elements).
    pub fn study(
        layers: usize,
        sphere: usize,
        ffn: usize,
        attn: usize,
        heads: usize,
        value: usize,
    ) -> Self {
        Self {
            num_layers: layers,
            sphere_channels: sphere,
            edge_channels: sphere,
            ffn_hidden_channels: ffn,
            attn_hidden_channels: attn,
            attn_alpha_channels: attn,
            num_heads: heads,
            attn_value_channels: value,
            ..Self::default()
        }
    }

    /// Named sizes: `eqv2-s`, `eqv2-m`, `eqv2-l` and the study's 20 sizes `study-01` …
    /// `study-20` (from 1,926 to 10,970,586 parameters by the study's count, which excludes
    /// parameters named `embedding`; see [`ParameterBreakdown::study_count`]).
    pub fn presets() -> Vec<(String, Self)> {
        let grid: [[usize; 6]; 20] = [
            [1, 1, 1, 1, 1, 1],
            [2, 1, 1, 2, 1, 1],
            [2, 2, 2, 4, 1, 1],
            [2, 3, 3, 4, 1, 1],
            [2, 3, 3, 8, 1, 2],
            [3, 3, 3, 8, 1, 2],
            [3, 4, 4, 8, 1, 2],
            [4, 5, 5, 8, 1, 2],
            [4, 10, 6, 8, 1, 2],
            [4, 12, 8, 10, 1, 2],
            [4, 12, 10, 12, 1, 3],
            [4, 16, 12, 12, 1, 3],
            [4, 16, 16, 16, 1, 4],
            [4, 18, 18, 20, 1, 5],
            [4, 24, 24, 24, 2, 6],
            [5, 36, 36, 32, 3, 8],
            [6, 48, 48, 32, 4, 8],
            [6, 64, 64, 32, 5, 8],
            [6, 72, 72, 32, 6, 8],
            [6, 96, 96, 40, 7, 10],
        ];
        let mut out = vec![
            ("eqv2-s".to_string(), Self::eqv2_s()),
            ("eqv2-m".to_string(), Self::eqv2_m()),
            ("eqv2-l".to_string(), Self::eqv2_l()),
        ];
        for (k, [l, s, f, a, h, v]) in grid.into_iter().enumerate() {
            out.push((format!("study-{:02}", k + 1), Self::study(l, s, f, a, h, v)));
        }
        out
    }

    /// The shape of the size ladder at width `w` and depth `layers`: sphere = edge = FFN
    /// channels `w`, attention hidden = alpha channels `⌈w/2⌉`, `⌈w/16⌉` heads, `⌈w/8⌉` value
    /// channels, everything else as eqV2-S (at `w = 128`, 8 layers this is eqV2-S).
    pub fn ladder_shape(w: usize, layers: usize) -> Self {
        let w = w.max(1);
        Self::study(
            layers.max(1),
            w,
            w,
            w.div_ceil(2),
            w.div_ceil(16),
            w.div_ceil(8),
        )
    }

    /// The size ladder: the [`Self::ladder_shape`] whose parameter count in `mode` is closest
    /// (in ratio) to `target`, over widths `1..=1024` and depths `1..=16`, preferring the rule `layers(w) = clamp(2 + ⌊2·log2(w)/3⌋, 1, 12)` (each layer away
    /// from it costs 2% in the fit) and edge channels `w` or `2w` (the latter costing 1%). Lands within 10% of targets from
    /// about 5·10^3 (Direct; the smallest model has 3,217 parameters because the 96-element
    /// tables and the 600-Gaussian radial inputs set a floor, and single layers are coarse steps there)
    /// to 10^8.
    ///
    /// # Errors
    /// A target below the smallest ladder model (named `target` with the minimum).
    pub fn for_parameters(target: usize, mode: ForceMode) -> Result<Self> {
        let smallest = Self::ladder_shape(1, 1).n_parameters(mode);
        if target < smallest {
            return Err(ModelError::config(
                "target",
                format!(
                    "is {target} parameters; the smallest EquiformerV2 of the ladder has {smallest}"
                ),
            ));
        }
        let rule =
            |w: usize| (2 + 2 * (usize::BITS - 1 - w.leading_zeros()) as usize / 3).clamp(1, 12);
        let mut best: Option<(f64, Self)> = None;
        for w in 1..=1024usize {
            let centre = rule(w);
            for layers in 1..=16 {
                for edge_factor in [1, 2] {
                    let config = Self {
                        edge_channels: edge_factor * w,
                        ..Self::ladder_shape(w, layers)
                    };
                    let n = config.n_parameters(mode) as f64;
                    // Ratio miss plus 2% per layer away from the rule and 1% for doubled edge
                    // channels: the shape leaves the rule only where width steps are too
                    // coarse (the smallest models).
                    let miss = (n / target as f64).ln().abs()
                        + 0.02 * layers.abs_diff(centre) as f64
                        + 0.01 * (edge_factor - 1) as f64;
                    if best.as_ref().is_none_or(|(m, _)| miss < *m) {
                        best = Some((miss, config));
                    }
                }
            }
        }
        Ok(best.expect("the ladder is not empty").1)
    }

    /// Builds the network with weights from `vb` (what `Architecture::build` will return once
    /// EquiformerV2 is a [`crate::Family`]).
    ///
    /// # Errors
    /// As [`super::EquiformerV2::new`].
    pub fn build(
        &self,
        mode: ForceMode,
        vb: candle_nn::VarBuilder,
    ) -> Result<Box<dyn crate::model::Model>> {
        Ok(Box::new(super::EquiformerV2::new(self, mode, vb)?))
    }

    /// Exact number of trained parameters in `mode`: backbone + energy head, plus the
    /// direct-force and rank-2 stress heads in [`ForceMode::Direct`].
    pub fn n_parameters(&self, mode: ForceMode) -> usize {
        self.parameter_breakdown().total(mode)
    }
}

/// fairchem's `nn.Linear` parameter count.
fn linear(d_in: usize, d_out: usize, bias: bool) -> usize {
    d_in * d_out + if bias { d_out } else { 0 }
}

/// `RadialFunction(channels)`: Linear + LayerNorm between hidden sizes, a final Linear.
fn radial_parameters(channels: &[usize]) -> usize {
    let n = channels.len() - 1;
    (0..n)
        .map(|i| {
            linear(channels[i], channels[i + 1], true)
                + if i + 1 < n { 2 * channels[i + 1] } else { 0 }
        })
        .sum()
}

/// Parameters of fairchem's `get_normalization_layer(norm_type, lmax, channels)`.
fn norm_parameters(norm_type: &str, lmax: usize, channels: usize) -> usize {
    match norm_type {
        // affine_weight [lmax+1, C] + affine_bias [C]
        "layer_norm" => (lmax + 1) * channels + channels,
        // norm_l0 LayerNorm(C) + affine_weight [lmax, C]
        "layer_norm_sh" => 2 * channels + lmax * channels,
        // affine_weight [lmax+1, C] + affine_bias [C] (centering)
        _ => (lmax + 1) * channels + channels,
    }
}

/// `SO3_LinearV2(d_in, d_out, lmax)`: weight `[lmax+1, d_out, d_in]` + bias `[d_out]`.
fn so3_linear(lmax: usize, d_in: usize, d_out: usize) -> usize {
    (lmax + 1) * d_out * d_in + d_out
}

/// `FeedForwardNetwork` with the grid MLP and separable S2 activation.
fn ffn_parameters(lmax: usize, c: usize, f: usize, out: usize) -> usize {
    so3_linear(lmax, c, f) + linear(c, f, true) + 3 * f * f + so3_linear(lmax, f, out)
}

/// `SO2_Convolution(c_in, c_out, extra)` without its radial function; also returns the
/// radial function's output width.
fn so2_conv_parameters(
    l: usize,
    m: usize,
    c_in: usize,
    c_out: usize,
    extra: usize,
) -> (usize, usize) {
    let mut n = linear((l + 1) * c_in, (l + 1) * c_out + extra, true);
    let mut radial = (l + 1) * c_in;
    for order in 1..=m {
        let size = l - order + 1;
        n += linear(size * c_in, 2 * c_out * size, false);
        radial += size * c_in;
    }
    (n, radial)
}

struct AttentionShape {
    l: usize,
    m: usize,
    out: usize,
    rad_in: usize,
}

/// `SO2EquivariantGraphAttention` without its atom-edge embeddings.
fn attention_parameters(c: &EquiformerV2Config, s: AttentionShape) -> usize {
    let h = c.attn_hidden_channels;
    let heads = c.num_heads;
    let alpha = c.attn_alpha_channels;
    let value = c.attn_value_channels;
    let ec = c.edge_channels;
    let (conv1, radial_len) =
        so2_conv_parameters(s.l, s.m, 2 * c.sphere_channels, h, heads * alpha + h);
    let rad = radial_parameters(&[s.rad_in, ec, ec, radial_len]);
    let alpha_norm = if c.use_attn_renorm { 2 * alpha } else { 0 };
    let (conv2, _) = so2_conv_parameters(s.l, s.m, h, heads * value, 0);
    conv1 + rad + alpha_norm + heads * alpha + conv2 + so3_linear(s.l, heads * value, s.out)
}

/// Exact parameter counts of the components of EquiformerV2 with the OMat24 heads, as
/// fairchem 1.x builds them (`HydraModel` with `EquiformerV2Backbone`,
/// `EqV2ScalarHead`, `EqV2VectorHead` and `Rank2SymmetricTensorHead` with `decompose` and
/// `use_source_target_embedding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterBreakdown {
    /// `sphere_embedding.weight` `[Z, C]`.
    pub sphere_embedding: usize,
    /// `edge_degree_embedding.{source,target}_embedding.weight`.
    pub edge_degree_atom_embeddings: usize,
    /// `edge_degree_embedding.rad_func.*`.
    pub edge_degree_radial: usize,
    /// `norm_1` + `norm_2` of one block.
    pub block_norms: usize,
    /// `ga.*` of one block except its atom-edge embeddings.
    pub block_attention: usize,
    /// `ga.{source,target}_embedding.weight` of one block.
    pub block_attention_atom_embeddings: usize,
    /// `ffn.*` of one block.
    pub block_ffn: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// The final `norm.*`.
    pub final_norm: usize,
    /// `EqV2ScalarHead` (`energy_block.*`).
    pub energy_head: usize,
    /// `EqV2VectorHead` (`force_block.*`) except its atom-edge embeddings.
    pub force_head: usize,
    /// `force_block.{source,target}_embedding.weight`.
    pub force_head_atom_embeddings: usize,
    /// `Rank2SymmetricTensorHead` (`sphharm_norm`, `xedge_layer_norm`, `block.*`).
    pub stress_head: usize,
}

impl ParameterBreakdown {
    /// One `TransBlockV2`.
    pub fn block(&self) -> usize {
        self.block_norms
            + self.block_attention
            + self.block_attention_atom_embeddings
            + self.block_ffn
    }

    /// The backbone: embeddings, edge-degree embedding, blocks, final norm.
    pub fn backbone(&self) -> usize {
        self.sphere_embedding
            + self.edge_degree_atom_embeddings
            + self.edge_degree_radial
            + self.num_layers * self.block()
            + self.final_norm
    }

    /// The direct-force head.
    pub fn force(&self) -> usize {
        self.force_head + self.force_head_atom_embeddings
    }

    /// Everything built in `mode`: backbone and energy head, plus force and stress heads in
    /// [`ForceMode::Direct`].
    pub fn total(&self, mode: ForceMode) -> usize {
        let direct = match mode {
            ForceMode::Direct => self.force() + self.stress_head,
            ForceMode::Conservative => 0,
        };
        self.backbone() + self.energy_head + direct
    }

    /// The parameters whose fairchem name contains `embedding`: the sphere embedding, every
    /// atom-edge embedding and the whole edge-degree embedding (its radial function too).
    pub fn named_embedding(&self, mode: ForceMode) -> usize {
        let force = match mode {
            ForceMode::Direct => self.force_head_atom_embeddings,
            ForceMode::Conservative => 0,
        };
        self.sphere_embedding
            + self.edge_degree_atom_embeddings
            + self.edge_degree_radial
            + self.num_layers * self.block_attention_atom_embeddings
            + force
    }

    /// The count the scaling study (Trikha et al.) reports: every parameter of the model in
    /// `mode` except those whose name contains `embedding` (see [`Self::named_embedding`]).
    pub fn study_count(&self, mode: ForceMode) -> usize {
        self.total(mode) - self.named_embedding(mode)
    }
}

/// Names of [`EquiformerV2Config::presets`], in order (static for [`Architecture::presets`]).
const PRESET_NAMES: [&str; 23] = [
    "eqv2-s", "eqv2-m", "eqv2-l", "study-01", "study-02", "study-03", "study-04", "study-05",
    "study-06", "study-07", "study-08", "study-09", "study-10", "study-11", "study-12", "study-13",
    "study-14", "study-15", "study-16", "study-17", "study-18", "study-19", "study-20",
];

impl crate::config::Architecture for EquiformerV2Config {
    const FAMILY: crate::config::Family = crate::config::Family::EquiformerV2;

    fn check(&self) -> Result<()> {
        EquiformerV2Config::check(self)
    }

    fn n_parameters(&self, mode: ForceMode) -> usize {
        EquiformerV2Config::n_parameters(self, mode)
    }

    fn for_parameters(target: usize, mode: ForceMode) -> Result<Self> {
        EquiformerV2Config::for_parameters(target, mode)
    }

    fn presets() -> Vec<(&'static str, Self)> {
        let presets = EquiformerV2Config::presets();
        debug_assert!(presets
            .iter()
            .zip(PRESET_NAMES)
            .all(|((name, _), expected)| name == expected));
        PRESET_NAMES
            .into_iter()
            .zip(presets.into_iter().map(|(_, c)| c))
            .collect()
    }

    fn build(
        &self,
        mode: ForceMode,
        vb: candle_nn::VarBuilder,
    ) -> Result<Box<dyn crate::model::Model>> {
        EquiformerV2Config::build(self, mode, vb)
    }
}
