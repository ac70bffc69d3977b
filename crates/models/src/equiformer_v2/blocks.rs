//! The building blocks of EquiformerV2, one per fairchem module: [`EdgeDegreeEmbedding`]
//! (`input_block.py`), [`GraphAttention`] (`SO2EquivariantGraphAttention`),
//! [`FeedForward`] (`FeedForwardNetwork`), [`TransBlock`] (`TransBlockV2`).
//!
//! Embeddings are `[rows, (lmax+1)², C]` l-major; messages in the edge frame are m-major and
//! truncated to `|m| ≤ mmax` (see [`matscale_equivariant::mapping`]).

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, Linear, Module, VarBuilder};
use matscale_equivariant::activation::{silu, smooth_leaky_relu};
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::norms::{EquivariantNorm, LayerNorm, NormConfig, NormType, So3LinearV2};
use matscale_equivariant::radial::RadialFunction;
use matscale_equivariant::s2grid::S2Grid;
use matscale_equivariant::segment::Segments;
use matscale_equivariant::so2::{rotate, rotate_inv, So2ConvConfig, So2Convolution, So2Init};
use matscale_equivariant::wigner::WignerBlocks;

use super::config::EquiformerV2Config;
use crate::error::{ModelError, Result};

/// fairchem's `negative_slope` of the attention's `SmoothLeakyReLU`.
const ALPHA_NEGATIVE_SLOPE: f64 = 0.2;
/// LayerNorm epsilon (PyTorch's default).
const LN_EPS: f64 = 1e-5;

/// Initialisation of linear weights (`weight_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightInit {
    /// `U(±1/√fan_in)`, bias 0.
    Uniform,
    /// `N(0, 1/fan_in)`, bias 0.
    Normal,
}

impl WeightInit {
    pub(crate) fn of(config: &EquiformerV2Config) -> Self {
        if config.weight_init == "normal" {
            Self::Normal
        } else {
            Self::Uniform
        }
    }

    fn so2(self) -> So2Init {
        match self {
            Self::Uniform => So2Init::Eqv2Uniform,
            Self::Normal => So2Init::Eqv2Normal,
        }
    }
}

/// An `nn.Linear` as `eqv2_init_weights` initialises it (weights by `init`, bias 0).
pub(crate) fn linear(
    d_in: usize,
    d_out: usize,
    bias: bool,
    init: WeightInit,
    vb: VarBuilder,
) -> Result<Linear> {
    let bound = 1.0 / (d_in as f64).sqrt();
    let hint = match init {
        WeightInit::Uniform => Init::Uniform {
            lo: -bound,
            up: bound,
        },
        WeightInit::Normal => Init::Randn {
            mean: 0.0,
            stdev: bound,
        },
    };
    let weight = vb.get_with_hints((d_out, d_in), "weight", hint)?;
    let bias = if bias {
        Some(vb.get_with_hints(d_out, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// The normalisation named by `config.norm_type`.
pub(crate) fn norm(
    config: &EquiformerV2Config,
    channels: usize,
    vb: VarBuilder,
) -> Result<EquivariantNorm> {
    let norm_type: NormType = config
        .norm_type
        .parse()
        .map_err(|_| ModelError::config("equiformer_v2.norm_type", "is not a known norm"))?;
    Ok(EquivariantNorm::new(
        norm_type,
        config.lmax(),
        channels,
        NormConfig::default(),
        vb,
    )?)
}

/// Source/target atom embeddings of a module (`source_embedding`, `target_embedding`,
/// `U(±0.001)` as fairchem initialises them).
#[derive(Debug, Clone)]
pub(crate) struct AtomEdgeEmbedding {
    source: Tensor,
    target: Tensor,
}

impl AtomEdgeEmbedding {
    fn new(config: &EquiformerV2Config, vb: &VarBuilder) -> Result<Self> {
        let shape = (config.max_num_elements, config.edge_channels);
        let init = Init::Uniform {
            lo: -0.001,
            up: 0.001,
        };
        Ok(Self {
            source: vb
                .pp("source_embedding")
                .get_with_hints(shape, "weight", init)?,
            target: vb
                .pp("target_embedding")
                .get_with_hints(shape, "weight", init)?,
        })
    }

    /// `[distance features ‖ source embedding ‖ target embedding]`, `[E, 600 + 2·ec]`.
    fn edge_features(&self, graph: &EdgeGraph) -> Result<Tensor> {
        Ok(Tensor::cat(
            &[
                &graph.distance_features,
                &self.source.index_select(&graph.source_numbers, 0)?,
                &self.target.index_select(&graph.target_numbers, 0)?,
            ],
            1,
        )?)
    }
}

/// What every block reads about the graph of one forward pass.
#[derive(Debug, Clone)]
pub(crate) struct EdgeGraph {
    /// Nodes `N`.
    pub n_nodes: usize,
    /// Edges `E`.
    pub n_edges: usize,
    /// Source node per edge `[E]`, u32.
    pub src: Tensor,
    /// Target node per edge `[E]`, u32.
    pub dst: Tensor,
    /// Atomic number of each edge's source `[E]`, u32.
    pub source_numbers: Tensor,
    /// Atomic number of each edge's target `[E]`, u32.
    pub target_numbers: Tensor,
    /// Gaussian distance features `[E, 600]` in the weight dtype.
    pub distance_features: Tensor,
    /// Edge-frame Wigner-D blocks (detached); `None` without edges.
    pub wigner: Option<WignerBlocks>,
    /// Edges grouped by target node.
    pub segments: Segments,
}

/// fairchem `EdgeDegreeEmbedding`: a radial function of each edge gives `m = 0` coefficients
/// in the edge frame, rotated back and summed over incoming edges, divided by `avg_degree`.
#[derive(Debug, Clone)]
pub(crate) struct EdgeDegreeEmbedding {
    atom_edge: AtomEdgeEmbedding,
    rad_func: RadialFunction,
    layout: SphericalLayout,
    channels: usize,
    avg_degree: f64,
}

impl EdgeDegreeEmbedding {
    pub(crate) fn new(config: &EquiformerV2Config, vb: VarBuilder) -> Result<Self> {
        let l = config.lmax();
        let ec = config.edge_channels;
        let c = config.sphere_channels;
        Ok(Self {
            atom_edge: AtomEdgeEmbedding::new(config, &vb)?,
            rad_func: RadialFunction::new(
                &[config.radial_input_channels(), ec, ec, (l + 1) * c],
                vb.pp("rad_func"),
            )?,
            layout: SphericalLayout::new(l, config.mmax())?,
            channels: c,
            avg_degree: config.avg_degree,
        })
    }

    /// `[N, (lmax+1)², C]`.
    pub(crate) fn forward(
        &self,
        graph: &EdgeGraph,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let k = self.layout.num_coefficients();
        let Some(wigner) = &graph.wigner else {
            return Ok(Tensor::zeros(
                (graph.n_nodes, k, self.channels),
                dtype,
                device,
            )?);
        };
        let e = graph.n_edges;
        let l1 = self.layout.lmax() + 1;
        let m0 = self
            .rad_func
            .forward(&self.atom_edge.edge_features(graph)?)?
            .reshape((e, l1, self.channels))?;
        let pad = Tensor::zeros(
            (e, self.layout.num_truncated() - l1, self.channels),
            dtype,
            device,
        )?;
        let m_major = Tensor::cat(&[&m0, &pad], 1)?;
        let l_major = rotate_inv(&m_major, wigner, self.layout)?;
        Ok((graph.segments.sum(&l_major)? / self.avg_degree)?)
    }
}

/// fairchem `SO2EquivariantGraphAttention` (without `use_s2_act_attn`, with the separable S2
/// activation): SO(2) convolution of `[x_src ‖ x_dst]` in the edge frame with radial weights,
/// attention logits from extra `m = 0` outputs, separable S2 activation, second SO(2)
/// convolution, segment softmax over incoming edges, rotation back, sum, `SO3_LinearV2`.
#[derive(Debug, Clone)]
pub(crate) struct GraphAttention {
    atom_edge: AtomEdgeEmbedding,
    rad_func: RadialFunction,
    conv_1: So2Convolution,
    conv_2: So2Convolution,
    alpha_norm: Option<LayerNorm>,
    alpha_dot: Tensor,
    proj: So3LinearV2,
    grid: S2Grid,
    /// m-major slot of each truncated l-major coefficient (fairchem `_l_primary`).
    to_l: Tensor,
    /// truncated l-major coefficient of each m-major slot (fairchem `_m_primary`).
    to_m: Tensor,
    layout: SphericalLayout,
    num_heads: usize,
    alpha_channels: usize,
    value_channels: usize,
    hidden_channels: usize,
    alpha_drop: f64,
}

impl GraphAttention {
    pub(crate) fn new(
        config: &EquiformerV2Config,
        grids: &Grids,
        out: usize,
        alpha_drop: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (l, m) = (config.lmax(), config.mmax());
        let layout = SphericalLayout::new(l, m)?;
        let init = WeightInit::of(config);
        let h = config.attn_hidden_channels;
        let heads = config.num_heads;
        let alpha = config.attn_alpha_channels;
        let value = config.attn_value_channels;
        let conv_1_config = So2ConvConfig::new(layout, 2 * config.sphere_channels, h)
            .with_extra_m0_outputs(heads * alpha + h)
            .with_init(init.so2());
        let conv_1 = So2Convolution::new(&conv_1_config, vb.pp("so2_conv_1"))?;
        let ec = config.edge_channels;
        let rad_func = RadialFunction::new(
            &[config.radial_input_channels(), ec, ec, conv_1.radial_len()],
            vb.pp("so2_conv_1").pp("rad_func"),
        )?;
        let conv_2_config = So2ConvConfig::new(layout, h, heads * value).with_init(init.so2());
        let conv_2 = So2Convolution::new(&conv_2_config, vb.pp("so2_conv_2"))?;
        let alpha_norm = if config.use_attn_renorm {
            Some(LayerNorm::new(alpha, LN_EPS, vb.pp("alpha_norm"))?)
        } else {
            None
        };
        let bound = 1.0 / (alpha as f64).sqrt();
        let alpha_dot = vb.get_with_hints(
            (heads, alpha),
            "alpha_dot",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let proj = So3LinearV2::new(heads * value, out, l, vb.pp("proj"))?;
        let grid = grids.attention.clone();
        let to_m_host = layout.to_m();
        let mut to_l_host = vec![0u32; to_m_host.len()];
        for (slot, &coefficient) in to_m_host.iter().enumerate() {
            to_l_host[coefficient] = slot as u32;
        }
        let to_m_host: Vec<u32> = to_m_host.iter().map(|&i| i as u32).collect();
        let n = to_m_host.len();
        Ok(Self {
            atom_edge: AtomEdgeEmbedding::new(config, &vb)?,
            rad_func,
            conv_1,
            conv_2,
            alpha_norm,
            alpha_dot,
            proj,
            grid,
            to_l: Tensor::from_vec(to_l_host, n, vb.device())?,
            to_m: Tensor::from_vec(to_m_host, n, vb.device())?,
            layout,
            num_heads: heads,
            alpha_channels: alpha,
            value_channels: value,
            hidden_channels: h,
            alpha_drop,
        })
    }

    /// `[N, (lmax+1)², C]` → `[N, (lmax+1)², out]`.
    pub(crate) fn forward(&self, x: &Tensor, graph: &EdgeGraph, train: bool) -> Result<Tensor> {
        let (n, k, _) = x.dims3()?;
        let (heads, value) = (self.num_heads, self.value_channels);
        let Some(wigner) = &graph.wigner else {
            let zeros = Tensor::zeros((n, k, heads * value), x.dtype(), x.device())?;
            return Ok(self.proj.forward(&zeros)?);
        };
        let e = graph.n_edges;
        let radial = self
            .rad_func
            .forward(&self.atom_edge.edge_features(graph)?)?;
        let message = Tensor::cat(
            &[
                &x.index_select(&graph.src, 0)?,
                &x.index_select(&graph.dst, 0)?,
            ],
            2,
        )?;
        // fairchem `_rotate` + `_m_primary` + `SO2_Convolution` (the fused
        // `forward_rotate_in` of newer matscale-equivariant computes the same).
        let rotated = rotate(&message, wigner, self.layout)?;
        let (hidden, extra) = self.conv_1.forward(&rotated, Some(&radial))?;
        let extra = extra.ok_or_else(|| {
            ModelError::Batch("the first SO(2) convolution returned no attention scalars".into())
        })?;
        let alpha_width = heads * self.alpha_channels;
        let logits_in = extra.narrow(1, 0, alpha_width)?;
        let gating = extra
            .narrow(1, alpha_width, self.hidden_channels)?
            .contiguous()?;
        // Separable S2 activation on the truncated l-major layout, then back to m-major.
        let hidden_l = hidden.index_select(&self.to_l, 1)?;
        let activated = self.grid.separable_s2_activation(&gating, &hidden_l)?;
        let hidden = activated.index_select(&self.to_m, 1)?;
        let (values, _) = self.conv_2.forward(&hidden, None)?;
        let values = rotate_inv(&values, wigner, self.layout)?;
        // Attention weights: LayerNorm → SmoothLeakyReLU → dot with alpha_dot → softmax.
        let mut logits = logits_in.reshape((e, heads, self.alpha_channels))?;
        if let Some(norm) = &self.alpha_norm {
            logits = norm.forward(&logits)?;
        }
        logits = smooth_leaky_relu(&logits, ALPHA_NEGATIVE_SLOPE)?;
        let logits = logits
            .broadcast_mul(&self.alpha_dot.unsqueeze(0)?)?
            .sum(D::Minus1)?;
        let mut alpha = graph.segments.softmax(&logits)?;
        if train && self.alpha_drop > 0.0 {
            alpha = candle_nn::ops::dropout(&alpha, self.alpha_drop as f32)?;
        }
        // Rotation back is linear per channel, so the per-edge, per-head weights commute with
        // it and are applied to the l-major values.
        let weighted = values
            .reshape((e, k, heads, value))?
            .broadcast_mul(&alpha.reshape((e, 1, heads, 1))?)?
            .reshape((e, k, heads * value))?;
        let summed = graph.segments.sum(&weighted)?;
        Ok(self.proj.forward(&summed)?)
    }
}

/// The sphere grids, built once per model and shared by every block (`S2Grid` clones share
/// their matrices): the attention's `(lmax, mmax)` grid and the feed-forward's `(lmax, lmax)`
/// grid, as fairchem's `SO3_grid[lmax][mmax]` and `SO3_grid[lmax][lmax]`.
#[derive(Debug, Clone)]
pub(crate) struct Grids {
    attention: S2Grid,
    ffn: S2Grid,
}

impl Grids {
    pub(crate) fn new(config: &EquiformerV2Config) -> Result<Self> {
        let l = config.lmax();
        Ok(Self {
            attention: S2Grid::equiformer_v2(l, config.mmax(), resolution(config))?,
            ffn: S2Grid::equiformer_v2(l, l, resolution(config))?,
        })
    }
}

/// The grid resolution (`None` lets the grid pick fairchem's default).
fn resolution(config: &EquiformerV2Config) -> Option<usize> {
    (config.grid_resolution > 0).then_some(config.grid_resolution)
}

/// fairchem `FeedForwardNetwork` with `use_grid_mlp` and `use_sep_s2_act`: `SO3_LinearV2`,
/// a bias-free 3-layer SiLU MLP applied pointwise on the sphere grid (`l = 0` row replaced by
/// `SiLU(Linear(x₀))`), `SO3_LinearV2`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    so3_linear_1: So3LinearV2,
    scalar_mlp: Linear,
    grid_mlp: [Linear; 3],
    so3_linear_2: So3LinearV2,
    grid: S2Grid,
}

impl FeedForward {
    pub(crate) fn new(
        config: &EquiformerV2Config,
        grids: &Grids,
        out: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let l = config.lmax();
        let (c, f) = (config.sphere_channels, config.ffn_hidden_channels);
        let init = WeightInit::of(config);
        let g = vb.pp("grid_mlp");
        Ok(Self {
            so3_linear_1: So3LinearV2::new(c, f, l, vb.pp("so3_linear_1"))?,
            scalar_mlp: linear(c, f, true, init, vb.pp("scalar_mlp").pp(0))?,
            grid_mlp: [
                linear(f, f, false, init, g.pp(0))?,
                linear(f, f, false, init, g.pp(2))?,
                linear(f, f, false, init, g.pp(4))?,
            ],
            so3_linear_2: So3LinearV2::new(f, out, l, vb.pp("so3_linear_2"))?,
            grid: grids.ffn.clone(),
        })
    }

    /// `[N, (lmax+1)², C]` → `[N, (lmax+1)², out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.dim(1)?;
        let gating = silu(&self.scalar_mlp.forward(&x.narrow(1, 0, 1)?)?)?;
        let hidden = self.so3_linear_1.forward(x)?;
        let mut grid = self.grid.to_grid(&hidden)?;
        grid = silu(&self.grid_mlp[0].forward(&grid)?)?;
        grid = silu(&self.grid_mlp[1].forward(&grid)?)?;
        grid = self.grid_mlp[2].forward(&grid)?;
        let back = self.grid.from_grid(&grid.contiguous()?)?;
        let hidden = Tensor::cat(&[&gating, &back.narrow(1, 1, k - 1)?], 1)?;
        Ok(self.so3_linear_2.forward(&hidden)?)
    }
}

/// fairchem `TransBlockV2` (pre-norm; `sphere_channels == output_channels`, so no shortcut).
#[derive(Debug, Clone)]
pub(crate) struct TransBlock {
    norm_1: EquivariantNorm,
    ga: GraphAttention,
    norm_2: EquivariantNorm,
    ffn: FeedForward,
    drop_path_rate: f64,
}

impl TransBlock {
    pub(crate) fn new(config: &EquiformerV2Config, grids: &Grids, vb: VarBuilder) -> Result<Self> {
        let c = config.sphere_channels;
        Ok(Self {
            norm_1: norm(config, c, vb.pp("norm_1"))?,
            ga: GraphAttention::new(config, grids, c, config.alpha_drop, vb.pp("ga"))?,
            norm_2: norm(config, c, vb.pp("norm_2"))?,
            ffn: FeedForward::new(config, grids, c, vb.pp("ffn"))?,
            drop_path_rate: config.drop_path_rate,
        })
    }

    /// `[N, (lmax+1)², C]` → same; `node_structure` (`[N]`, u32) and `n_structures` feed
    /// the per-structure drop path in training.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        graph: &EdgeGraph,
        node_structure: &Tensor,
        n_structures: usize,
        train: bool,
    ) -> Result<Tensor> {
        let drop = |h: Tensor| -> Result<Tensor> {
            if train && self.drop_path_rate > 0.0 {
                drop_path(&h, node_structure, n_structures, self.drop_path_rate)
            } else {
                Ok(h)
            }
        };
        let attn = self.ga.forward(&self.norm_1.forward(x)?, graph, train)?;
        let x = (x + drop(attn)?)?;
        let ffn = self.ffn.forward(&self.norm_2.forward(&x)?)?;
        Ok((&x + drop(ffn)?)?)
    }
}

/// fairchem `GraphDropPath`: zero the update of whole structures with probability `rate`,
/// scale the kept ones by `1/(1−rate)`.
fn drop_path(
    h: &Tensor,
    node_structure: &Tensor,
    n_structures: usize,
    rate: f64,
) -> Result<Tensor> {
    let keep = 1.0 - rate;
    let u = Tensor::rand(0f32, 1f32, n_structures, h.device())?;
    let mask = (u.ge(rate as f32)?.to_dtype(h.dtype())? / keep)?;
    let per_node = mask.index_select(node_structure, 0)?;
    Ok(h.broadcast_mul(&per_node.reshape((h.dim(0)?, 1, 1))?)?)
}
