//! The building blocks of EquiformerV2, one per fairchem module: [`EdgeDegreeEmbedding`]
//! (`input_block.py`), [`GraphAttention`] (`SO2EquivariantGraphAttention`),
//! [`FeedForward`] (`FeedForwardNetwork`), [`TransBlock`] (`TransBlockV2`).
//!
//! Embeddings are `[rows, (lmax+1)², C]` l-major; messages in the edge frame are m-major and
//! truncated to `|m| ≤ mmax` (see [`matscale_equivariant::mapping`]).
//!
//! On the CPU the per-edge and per-grid-point work runs in fused ops that keep their
//! temporaries in per-task scratch and store only their inputs for the backward pass: the
//! gathered SO(2) convolutions of `matscale_equivariant::so2`, the separable S2 activation, the
//! attention-weighted segment sum (`Segments::head_weighted_sum`, fused on a GPU too), the
//! message gather for differentiable frames (`GatherPair`) and the feed-forward grid MLP
//! ([`grid_mlp`]); each has a composed fallback and a test against it. See docs/ARCHITECTURE.md ("EquiformerV2 on the CPU: what is fused and why").

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, Linear, Module, VarBuilder};
use matscale_equivariant::activation::{silu, smooth_leaky_relu, Function};
use matscale_equivariant::buffer::{contiguous_input, split_pieces, with_cpu_slice, zeroed_vec};
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::norms::{EquivariantNorm, LayerNorm, NormConfig, NormType, So3LinearV2};
use matscale_equivariant::radial::RadialFunction;
use matscale_equivariant::s2grid::S2Grid;
use matscale_equivariant::segment::{RowIndex, Segments};
use matscale_equivariant::so2::{MessageGather, So2ConvConfig, So2Convolution, So2Init};
use matscale_equivariant::wigner::block_offset;

use super::config::EquiformerV2Config;
use grid_mlp::{GridMatrices, GridMlpOp};

mod grid_mlp;
use super::rotation::EdgeFrames;
use crate::error::{ModelError, Result};

/// fairchem's `negative_slope` of the attention's `SmoothLeakyReLU`.
const ALPHA_NEGATIVE_SLOPE: f64 = 0.2;
/// Gaussian distance features below this are set to zero before the radial MLPs. Most of the
/// 600 Gaussians of an edge are far from its length and tiny; their products with the weights
/// are subnormal floats, which slow the radial MLP's matrix products (its forward and its
/// weight gradient) on x86 by orders of magnitude. The change is far below the rounding of
/// any output (as SchNet's `RBF_FLOOR`).
pub(crate) const GAUSSIAN_FLOOR: f64 = 1e-20;
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

    /// `rad_func` of `[distance features ‖ source embedding ‖ target embedding]` (fairchem's
    /// `x_edge`), without building that `[E, 600 + 2·ec]` input
    /// ([`RadialFunction::forward_gathered`]).
    fn radial(&self, rad_func: &RadialFunction, graph: &EdgeGraph) -> Result<Tensor> {
        Ok(rad_func.forward_gathered(
            &graph.distance_features,
            &[
                (&self.source, &graph.source_numbers),
                (&self.target, &graph.target_numbers),
            ],
        )?)
    }
}

/// What every block reads about the graph of one forward pass.
///
/// Every index is a [`RowIndex`] made from the batch's host groupings, so no layer copies an
/// index from the device (on a GPU each such copy waits for all queued kernels).
#[derive(Debug, Clone)]
pub(crate) struct EdgeGraph {
    /// Nodes `N`.
    pub n_nodes: usize,
    /// Edges `E`.
    pub n_edges: usize,
    /// Source node per edge `[E]`.
    pub src: RowIndex,
    /// Target node per edge `[E]` (sorted): its grouping is the edges of every node.
    pub dst: RowIndex,
    /// Atomic number of each edge's source `[E]`, rows of the element embeddings.
    pub source_numbers: RowIndex,
    /// Atomic number of each edge's target `[E]`, rows of the element embeddings.
    pub target_numbers: RowIndex,
    /// Gaussian distance features `[E, 600]` in the weight dtype, those below
    /// [`GAUSSIAN_FLOOR`] set to zero.
    pub distance_features: Tensor,
    /// Edge frames (detached, or differentiable for conservative forces); `None` without edges.
    pub wigner: Option<EdgeFrames>,
    /// `src` and `dst` on the host, for the CPU ops that index node rows by edge.
    pub ends: EdgeEnds,
}

impl EdgeGraph {
    /// Edges grouped by target node.
    pub(crate) fn segments(&self) -> &Segments {
        self.dst.segments()
    }

    /// fairchem's message `[x_src ‖ x_dst]` as a gather of node rows.
    pub(crate) fn message(&self) -> MessageGather {
        MessageGather::Pair {
            source: self.src.clone(),
            target: self.dst.clone(),
        }
    }
}

/// Source and target node of every edge, on the host (cheap to clone into an op).
#[derive(Debug, Clone)]
pub(crate) struct EdgeEnds {
    pub src: Arc<[u32]>,
    pub dst: Arc<[u32]>,
}

impl EdgeEnds {
    /// Number of edges.
    pub(crate) fn len(&self) -> usize {
        self.src.len()
    }

    /// An error naming the op `name` unless every index is below `n` nodes.
    pub(crate) fn check_below(&self, n: usize, name: &str) -> candle_core::Result<()> {
        if self
            .src
            .iter()
            .chain(self.dst.iter())
            .any(|&i| i as usize >= n)
        {
            candle_core::bail!("{name}: an edge index is not below {n} nodes");
        }
        Ok(())
    }
}

/// fairchem `EdgeDegreeEmbedding`: a radial function of each edge gives `m = 0` coefficients
/// in the edge frame, rotated back and summed over incoming edges, divided by `avg_degree`.
///
/// Only the `m = 0` row of each degree is non-zero in the edge frame, so the rotation back is
/// a per-edge scaling: coefficient `(l, j)` of the l-major output is
/// `D^l[m=0 row][j] · rescale_l · m0[l]`. The `[E, (lmax+1)²]` weights are gathered from the
/// Wigner blocks once (`m0_row`), instead of zero-padding the message to the full m-major
/// layout and running a rotation on it.
#[derive(Debug, Clone)]
pub(crate) struct EdgeDegreeEmbedding {
    atom_edge: AtomEdgeEmbedding,
    rad_func: RadialFunction,
    layout: SphericalLayout,
    channels: usize,
    avg_degree: f64,
    /// Column of the Wigner blocks holding `D^l[l][j]` for each l-major coefficient `l² + j`.
    m0_row: Tensor,
    /// Degree of each l-major coefficient (u32), to spread `m0[l]` over `2l + 1` rows.
    degree: Tensor,
    /// `rotate_inv` rescale of each l-major coefficient's degree (f64 host copy).
    rescale: Vec<f64>,
}

impl EdgeDegreeEmbedding {
    pub(crate) fn new(config: &EquiformerV2Config, vb: VarBuilder) -> Result<Self> {
        let l = config.lmax();
        let ec = config.edge_channels;
        let c = config.sphere_channels;
        let layout = SphericalLayout::new(l, config.mmax())?;
        let (mut m0_row, mut degree, mut rescale) = (Vec::new(), Vec::new(), Vec::new());
        for d in 0..=l {
            let n = 2 * d + 1;
            for j in 0..n {
                m0_row.push((block_offset(d) + d * n + j) as u32);
                degree.push(d as u32);
                rescale.push(layout.rotate_inv_rescale(d));
            }
        }
        let k = layout.num_coefficients();
        Ok(Self {
            atom_edge: AtomEdgeEmbedding::new(config, &vb)?,
            rad_func: RadialFunction::new(
                &[config.radial_input_channels(), ec, ec, (l + 1) * c],
                vb.pp("rad_func"),
            )?,
            layout,
            channels: c,
            avg_degree: config.avg_degree,
            m0_row: Tensor::from_vec(m0_row, k, vb.device())?,
            degree: Tensor::from_vec(degree, k, vb.device())?,
            rescale,
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
            .atom_edge
            .radial(&self.rad_func, graph)?
            .reshape((e, l1, self.channels))?;
        // Rescale and 1/avg_degree folded into the per-coefficient weights.
        let scale: Vec<f64> = self.rescale.iter().map(|r| r / self.avg_degree).collect();
        let scale = Tensor::from_vec(scale, (1, k), device)?.to_dtype(dtype)?;
        let weights = wigner
            .blocks()
            .index_select(&self.m0_row, 1)?
            .broadcast_mul(&scale)?;
        let fused = m0.device().is_cpu()
            && matches!(m0.dtype(), DType::F32 | DType::F64)
            && !weights.track_op()
            && graph.segments().is_sorted()
            && !matscale_equivariant::higher_order_gradients_requested();
        if fused {
            // One pass per node: the `[E, (lmax+1)², C]` spread message never exists.
            let op = DegreeSpread {
                segments: graph.segments().clone(),
                weights: weights.contiguous()?,
                degree: (0..=self.layout.lmax())
                    .flat_map(|d| std::iter::repeat_n(d, 2 * d + 1))
                    .collect(),
            };
            return Ok(m0.contiguous()?.apply_op1(op)?);
        }
        let spread = m0
            .index_select(&self.degree, 1)?
            .broadcast_mul(&weights.unsqueeze(2)?)?;
        Ok(graph.segments().sum(&spread)?)
    }
}

/// The CPU op of the edge-degree embedding's sum (arg: `m0` `[E, lmax+1, C]`, edges sorted by
/// target): `out[n, k, :] = Σ_{e → n} weights[e, k] · m0[e, degree(k), :]` for the detached
/// per-edge weights `[E, K]`. Its backward (`∂m0[e, l, :] = Σ_{degree(k) = l} weights[e, k] ·
/// ∂out[target(e), k, :]`) writes each edge's row once, so it is deterministic; first order
/// only (the caller composes the same sum from candle ops for higher orders).
#[derive(Debug, Clone)]
struct DegreeSpread {
    segments: Segments,
    /// `[E, K]`, contiguous, without a gradient.
    weights: Tensor,
    /// Degree `l` of each l-major coefficient `k`.
    degree: Vec<usize>,
}

impl DegreeSpread {
    fn forward<T: candle_core::WithDType>(&self, m0: &[T], w: &[T], c: usize) -> Vec<T> {
        use rayon::prelude::*;
        let offsets = self.segments.offsets();
        let (k, l1) = (self.degree.len(), self.degree.last().map_or(0, |&l| l + 1));
        let mut out = zeroed_vec::<T>((offsets.len() - 1) * k * c);
        out.par_chunks_mut(k * c)
            .enumerate()
            .for_each(|(node, out_row)| {
                for edge in offsets[node]..offsets[node + 1] {
                    let m = &m0[edge * l1 * c..(edge + 1) * l1 * c];
                    let we = &w[edge * k..(edge + 1) * k];
                    for ((o, &l), &wk) in out_row.chunks_exact_mut(c).zip(&self.degree).zip(we) {
                        for (o, &x) in o.iter_mut().zip(&m[l * c..(l + 1) * c]) {
                            *o += wk * x;
                        }
                    }
                }
            });
        out
    }

    fn backward<T: candle_core::WithDType>(&self, g: &[T], w: &[T], c: usize) -> Vec<T> {
        use rayon::prelude::*;
        let offsets = self.segments.offsets();
        let (k, l1) = (self.degree.len(), self.degree.last().map_or(0, |&l| l + 1));
        let edges = offsets[offsets.len() - 1];
        let mut dm = zeroed_vec::<T>(edges * l1 * c);
        let lens: Vec<usize> = offsets.windows(2).map(|o| (o[1] - o[0]) * l1 * c).collect();
        split_pieces(&mut dm, &lens)
            .into_par_iter()
            .enumerate()
            .for_each(|(node, dm_node)| {
                let g_row = &g[node * k * c..(node + 1) * k * c];
                for (i, dm_edge) in dm_node.chunks_exact_mut(l1 * c).enumerate() {
                    let we = &w[(offsets[node] + i) * k..(offsets[node] + i + 1) * k];
                    for ((gk, &l), &wk) in g_row.chunks_exact(c).zip(&self.degree).zip(we) {
                        for (d, &v) in dm_edge[l * c..(l + 1) * c].iter_mut().zip(gk) {
                            *d += wk * v;
                        }
                    }
                }
            });
        dm
    }

    /// Checks `m0`'s layout against the weights and segments: `C`.
    fn channels(&self, m0: &candle_core::Layout, name: &str) -> candle_core::Result<usize> {
        let (e, l1, c) = m0.shape().dims3()?;
        let edges = self.segments.offsets().last().copied().unwrap_or(0);
        let expected_l1 = self.degree.last().map_or(0, |&l| l + 1);
        if l1 != expected_l1 || e != edges || self.weights.dims() != [e, self.degree.len()] {
            candle_core::bail!(
                "{name}: m0 {:?}, weights {:?}, {edges} edges in the segments",
                m0.shape(),
                self.weights.shape()
            );
        }
        Ok(c)
    }
}

impl candle_core::CustomOp1 for DegreeSpread {
    fn name(&self) -> &'static str {
        "edge-degree-spread"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let name = self.name();
        let c = self.channels(l, name)?;
        let out = match s {
            S::F32(m) => S::F32(with_cpu_slice(&self.weights, name, |w| {
                Ok(self.forward(contiguous_input(m, l, name)?, w, c))
            })?),
            S::F64(m) => S::F64(with_cpu_slice(&self.weights, name, |w| {
                Ok(self.forward(contiguous_input(m, l, name)?, w, c))
            })?),
            _ => candle_core::bail!("{name}: m0 must be f32 or f64"),
        };
        let n = self.segments.offsets().len() - 1;
        Ok((out, (n, self.degree.len(), c).into()))
    }

    fn bwd(
        &self,
        m0: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(m0.apply_op1_no_bwd(&DegreeSpreadBackward {
            spread: self.clone(),
            grad: g,
        })?))
    }
}

/// The backward of [`DegreeSpread`] as an op on `m0` (for its shape) holding `∂out`.
struct DegreeSpreadBackward {
    spread: DegreeSpread,
    grad: Tensor,
}

impl candle_core::CustomOp1 for DegreeSpreadBackward {
    fn name(&self) -> &'static str {
        "edge-degree-spread-backward"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let name = self.name();
        let sp = &self.spread;
        let c = sp.channels(l, name)?;
        let n = sp.segments.offsets().len() - 1;
        if self.grad.dims() != [n, sp.degree.len(), c] {
            candle_core::bail!("{name}: gradient {:?}", self.grad.shape());
        }
        fn run<T: candle_core::WithDType>(
            b: &DegreeSpreadBackward,
            name: &str,
            c: usize,
        ) -> candle_core::Result<Vec<T>> {
            with_cpu_slice(&b.grad, name, |g| {
                with_cpu_slice(&b.spread.weights, name, |w| Ok(b.spread.backward(g, w, c)))
            })
        }
        let out = match s {
            S::F32(_) => S::F32(run(self, name, c)?),
            S::F64(_) => S::F64(run(self, name, c)?),
            _ => candle_core::bail!("{name}: m0 must be f32 or f64"),
        };
        Ok((out, l.shape().clone()))
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
        Ok(Self {
            atom_edge: AtomEdgeEmbedding::new(config, &vb)?,
            rad_func,
            conv_1,
            conv_2,
            alpha_norm,
            alpha_dot,
            proj,
            grid,
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
        let radial = self.atom_edge.radial(&self.rad_func, graph)?;
        // fairchem's message `[x_src ‖ x_dst]`, `_rotate`, `_m_primary` and `SO2_Convolution`.
        // With detached frames one fused op: neither the gathered message `[E, K, 2C]` nor its
        // rotation exist outside a chunk of edges inside the kernel, and the input gradient is
        // node-sized. Differentiable frames rotate a gathered message by matmuls.
        let (hidden, extra) = match wigner {
            EdgeFrames::Detached(blocks) => {
                let message = graph.message();
                self.conv_1
                    .forward_gather_rotate_in(x, &message, blocks, Some(&radial))?
            }
            frames => {
                frames.conv_rotate_in(&self.conv_1, &gather_pair(x, graph)?, Some(&radial))?
            }
        };
        let extra = extra.ok_or_else(|| {
            ModelError::Batch("the first SO(2) convolution returned no attention scalars".into())
        })?;
        let alpha_width = heads * self.alpha_channels;
        let logits_in = extra.narrow(1, 0, alpha_width)?;
        let gating = extra
            .narrow(1, alpha_width, self.hidden_channels)?
            .contiguous()?;
        // Separable S2 activation, on the m-major layout (the grid's columns are permuted).
        let hidden = self.grid.separable_s2_activation(&gating, &hidden)?;
        // Second `SO2_Convolution` + `_l_primary` + `rotate_inv`, fused likewise.
        let (values, _) = wigner.conv_rotate_out(&self.conv_2, &hidden, None)?;
        // Attention weights: LayerNorm → SmoothLeakyReLU → dot with alpha_dot → softmax.
        let logits = logits_in.reshape((e, heads, self.alpha_channels))?;
        let logits = match &self.alpha_norm {
            // One fused LayerNorm + activation + dot node instead of a dozen `[E, H, A]` ones.
            Some(norm) => norm.forward_act_dot(
                &logits,
                Some(Function::SmoothLeakyRelu(ALPHA_NEGATIVE_SLOPE)),
                &self.alpha_dot,
            )?,
            None => smooth_leaky_relu(&logits, ALPHA_NEGATIVE_SLOPE)?
                .broadcast_mul(&self.alpha_dot.unsqueeze(0)?)?
                .sum(D::Minus1)?,
        };
        let mut alpha = graph.segments().softmax(&logits)?;
        if train && self.alpha_drop > 0.0 {
            alpha = candle_nn::ops::dropout(&alpha, self.alpha_drop as f32)?;
        }
        // Rotation back is linear per channel, so the per-edge, per-head weights commute with
        // it and are applied to the l-major values, fused with the sum over incoming edges.
        let summed = attention_sum(&values, &alpha, graph, heads)?;
        Ok(self.proj.forward(&summed)?)
    }
}

/// The message `[x[src] ‖ x[dst]]` (channels concatenated), `[N, K, C]` → `[E, K, 2C]`.
///
/// On the CPU one gather op ([`GatherPair`]) writes it directly; the composed
/// `index_select` + `cat` would keep both `[E, K, C]` halves alive in the autograd graph.
fn gather_pair(x: &Tensor, graph: &EdgeGraph) -> Result<Tensor> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        // Segment gathers on a GPU (a CSR segment sum as backward, not candle's index_add).
        let message = graph.message();
        return Ok(message.message(x)?);
    }
    let op = GatherPair {
        ends: graph.ends.clone(),
        src_index: graph.src.tensor().clone(),
        dst_index: graph.dst.tensor().clone(),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// The CPU op of [`gather_pair`]; its backward (`index_add` of the two channel halves) is
/// composed of differentiable ops.
#[derive(Debug, Clone)]
struct GatherPair {
    ends: EdgeEnds,
    src_index: Tensor,
    dst_index: Tensor,
}

impl GatherPair {
    fn run<T: candle_core::WithDType>(&self, x: &[T], (n, k, c): (usize, usize, usize)) -> Vec<T> {
        use rayon::prelude::*;
        let e = self.ends.len();
        let mut out = zeroed_vec::<T>(e * k * 2 * c);
        out.par_chunks_mut(k * 2 * c)
            .enumerate()
            .for_each(|(edge, row)| {
                let (s, d) = (self.ends.src[edge] as usize, self.ends.dst[edge] as usize);
                debug_assert!(s < n && d < n);
                for (kk, r) in row.chunks_exact_mut(2 * c).enumerate() {
                    r[..c].copy_from_slice(&x[(s * k + kk) * c..][..c]);
                    r[c..].copy_from_slice(&x[(d * k + kk) * c..][..c]);
                }
            });
        out
    }
}

impl candle_core::CustomOp1 for GatherPair {
    fn name(&self) -> &'static str {
        "gather-pair"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let (n, k, c) = layout.shape().dims3()?;
        self.ends.check_below(n, self.name())?;
        let out = match storage {
            S::F32(v) => S::F32(self.run(contiguous_input(v, layout, self.name())?, (n, k, c))),
            S::F64(v) => S::F64(self.run(contiguous_input(v, layout, self.name())?, (n, k, c))),
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        Ok((out, (self.ends.len(), k, 2 * c).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let c = x.dim(2)?;
        let dx = x
            .zeros_like()?
            .index_add(&self.src_index, &grad_res.narrow(2, 0, c)?.contiguous()?, 0)?
            .index_add(&self.dst_index, &grad_res.narrow(2, c, c)?.contiguous()?, 0)?;
        Ok(Some(dx))
    }
}

/// `out[n, k, h·V + v] = Σ_{e → n} alpha[e, h] · values[e, k, h·V + v]`: the attention-weighted
/// sum of the l-major values over the incoming edges of each node, `[E, K, H·V]` and `[E, H]`
/// → `[N, K, H·V]`.
///
/// For f32 and f64 one fused op on every device ([`Segments::head_weighted_sum`]) that never
/// materialises the weighted `[E, K, H·V]` tensor; otherwise the composed `broadcast_mul` +
/// segment sum.
fn attention_sum(
    values: &Tensor,
    alpha: &Tensor,
    graph: &EdgeGraph,
    heads: usize,
) -> Result<Tensor> {
    let (e, k, hv) = values.dims3()?;
    if matches!(values.dtype(), DType::F32 | DType::F64) && alpha.dtype() == values.dtype() {
        return Ok(graph.segments().head_weighted_sum(values, alpha)?);
    }
    let weighted = values
        .reshape((e, k, heads, hv / heads))?
        .broadcast_mul(&alpha.reshape((e, 1, heads, 1))?)?
        .reshape((e, k, hv))?;
    Ok(graph.segments().sum(&weighted)?)
}

/// The sphere grids, built once per model and shared by every block (`S2Grid` clones share
/// their matrices): the attention's `(lmax, mmax)` grid and the feed-forward's `(lmax, lmax)`
/// grid, as fairchem's `SO3_grid[lmax][mmax]` and `SO3_grid[lmax][lmax]`. The attention grid's
/// coefficients are in the m-major order of the edge messages (`S2Grid::permuted` with
/// `to_m`: fairchem's `_l_primary` before and `_m_primary` after the activation are folded into
/// the grid matrices).
#[derive(Debug, Clone)]
pub(crate) struct Grids {
    attention: S2Grid,
    ffn: S2Grid,
    /// The feed-forward grid's matrices for the fused grid MLP.
    ffn_matrices: Arc<GridMatrices>,
}

impl Grids {
    pub(crate) fn new(config: &EquiformerV2Config) -> Result<Self> {
        let l = config.lmax();
        let ffn = S2Grid::equiformer_v2(l, l, resolution(config))?;
        let host = |m: Tensor| -> Result<Vec<f64>> { Ok(m.flatten_all()?.to_vec1::<f64>()?) };
        let ffn_matrices = GridMatrices::new(
            ffn.num_points(),
            ffn.num_coefficients(),
            host(ffn.to_grid_matrix(DType::F64, &Device::Cpu)?)?,
            host(ffn.from_grid_matrix(DType::F64, &Device::Cpu)?)?,
        );
        Ok(Self {
            attention: S2Grid::equiformer_v2(l, config.mmax(), resolution(config))?
                .permuted(&SphericalLayout::new(l, config.mmax())?.to_m())?,
            ffn,
            ffn_matrices: Arc::new(ffn_matrices),
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
    grid_matrices: Arc<GridMatrices>,
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
            grid_matrices: grids.ffn_matrices.clone(),
        })
    }

    /// `[N, (lmax+1)², C]` → `[N, (lmax+1)², out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.dim(1)?;
        // On `[N, C]`: candle_nn's `Linear` on a rank-3 input broadcasts its weight to
        // `[N, C, F]` for a batched matmul, whose weight gradient is then summed over nodes.
        let n = x.dim(0)?;
        let scalars = x.narrow(1, 0, 1)?.reshape((n, x.dim(2)?))?;
        let gating = silu(&self.scalar_mlp.forward(&scalars)?)?.unsqueeze(1)?;
        let hidden = self.so3_linear_1.forward(x)?;
        let fused = hidden.device().is_cpu()
            && matches!(hidden.dtype(), DType::F32 | DType::F64)
            && !matscale_equivariant::higher_order_gradients_requested();
        let back = if fused {
            // One fused op (see `grid_mlp`): no `[N, G, F]` grid signal outlives a node chunk.
            let weights = self
                .grid_mlp
                .iter()
                .map(|l| l.weight().flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let weights = Tensor::cat(&weights, 0)?.to_dtype(hidden.dtype())?;
            hidden.contiguous()?.apply_op2(
                &weights,
                GridMlpOp {
                    mats: self.grid_matrices.clone(),
                },
            )?
        } else {
            // Composed, with the first and the last linear on the K coefficient rows instead
            // of the G grid points (they commute with the grid projections, see `grid_mlp`)
            // and every linear one 2-D matmul: candle_nn's `Linear` on a rank-3 input
            // broadcasts its weight to a batched matmul and sums an `[N, F, F]` weight
            // gradient over the nodes.
            let lin = |t: &Tensor, l: &Linear| -> Result<Tensor> {
                let (a, b, f) = t.dims3()?;
                let w = l.weight();
                let y = t.reshape((a * b, f))?.matmul(&w.t()?)?;
                Ok(y.reshape((a, b, w.dim(0)?))?)
            };
            let grid = silu(&self.grid.to_grid(&lin(&hidden, &self.grid_mlp[0])?)?)?;
            let grid = silu(&lin(&grid, &self.grid_mlp[1])?)?;
            lin(&self.grid.from_grid(&grid)?, &self.grid_mlp[2])?
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The fused attention sum against `broadcast_mul` + segment sum: values and gradients
    /// (f64), with an empty node and unequal in-degrees.
    /// The fused edge-degree spread against `index_select` + `broadcast_mul` + segment sum:
    /// values and the gradient of `m0` (f64), a node without edges included.
    #[test]
    fn fused_degree_spread_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let (e, lmax, c) = (9, 2, 3);
        let k = (lmax + 1) * (lmax + 1);
        let dst = [0u32, 0, 0, 1, 1, 3, 3, 3, 3];
        let segments = Segments::from_indices(&dst, 4).unwrap();
        assert!(segments.is_sorted());
        let m0 = Var::randn(0f64, 1.0, (e, lmax + 1, c), &dev).unwrap();
        let weights = Tensor::randn(0f64, 1.0, (e, k), &dev).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (4, k, c), &dev).unwrap();
        let degree: Vec<usize> = (0..=lmax)
            .flat_map(|d| std::iter::repeat_n(d, 2 * d + 1))
            .collect();
        let op = DegreeSpread {
            segments: segments.clone(),
            weights: weights.clone(),
            degree: degree.clone(),
        };
        let fused = m0.as_tensor().apply_op1(op).unwrap();
        let index = Tensor::from_vec(
            degree.iter().map(|&d| d as u32).collect::<Vec<_>>(),
            k,
            &dev,
        )
        .unwrap();
        let spread = m0
            .as_tensor()
            .index_select(&index, 1)
            .unwrap()
            .broadcast_mul(&weights.unsqueeze(2).unwrap())
            .unwrap();
        let composed = segments.sum(&spread).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-12);
        let empty = fused
            .narrow(0, 2, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(empty.to_scalar::<f64>().unwrap(), 0.0);
        let grad = |out: &Tensor| {
            let g = (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(m0.as_tensor()).unwrap().clone()
        };
        assert!(max_abs_diff(&grad(&fused), &grad(&composed)) < 1e-12);
    }

    /// The fused message gather against `index_select` + `cat`: values and the input gradient.
    #[test]
    fn fused_gather_pair_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let (n, k, c) = (4, 3, 2);
        let (src, dst) = (vec![1u32, 3, 0, 2, 2], vec![0u32, 0, 1, 3, 3]);
        let src_index = Tensor::new(src.as_slice(), &dev).unwrap();
        let dst_index = Tensor::new(dst.as_slice(), &dev).unwrap();
        let x = Var::randn(0f64, 1.0, (n, k, c), &dev).unwrap();
        let op = GatherPair {
            ends: EdgeEnds {
                src: src.into(),
                dst: dst.into(),
            },
            src_index: src_index.clone(),
            dst_index: dst_index.clone(),
        };
        let fused = x.as_tensor().apply_op1(op).unwrap();
        let composed = Tensor::cat(
            &[
                &x.as_tensor().index_select(&src_index, 0).unwrap(),
                &x.as_tensor().index_select(&dst_index, 0).unwrap(),
            ],
            2,
        )
        .unwrap();
        assert_eq!(max_abs_diff(&fused, &composed), 0.0);
        let probe = Tensor::randn(0f64, 1.0, (5, k, 2 * c), &dev).unwrap();
        let grad = |out: &Tensor| {
            let g = (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(x.as_tensor()).unwrap().clone()
        };
        assert!(max_abs_diff(&grad(&fused), &grad(&composed)) < 1e-14);
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fused grid MLP against `to_grid` → 3 × Linear (SiLU) → `from_grid` composed of
    /// candle ops: outputs and gradients of the input and of the three weights, in f64 (to
    /// 1e-12) and f32 (its polynomial `exp`, to 1e-5 relative).
    #[test]
    fn fused_grid_mlp_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let grid = S2Grid::equiformer_v2(3, 3, Some(8)).unwrap();
        let (n, k, f) = (5, grid.num_coefficients(), 6);
        let host = |m: Tensor| m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mats = Arc::new(GridMatrices::new(
            grid.num_points(),
            k,
            host(grid.to_grid_matrix(DType::F64, &dev).unwrap()),
            host(grid.from_grid_matrix(DType::F64, &dev).unwrap()),
        ));
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = Var::randn(0f64, 1.0, (n, k, f), &dev).unwrap();
            let ws: Vec<Var> = (0..3)
                .map(|_| Var::randn(0f64, 0.5, (f, f), &dev).unwrap())
                .collect();
            let probe = Tensor::randn(0f64, 1.0, (n, k, f), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let xd = x.as_tensor().to_dtype(dtype).unwrap();
            let wd: Vec<Tensor> = ws
                .iter()
                .map(|w| w.as_tensor().to_dtype(dtype).unwrap())
                .collect();
            let packed = Tensor::cat(
                &wd.iter()
                    .map(|w| w.flatten_all().unwrap())
                    .collect::<Vec<_>>(),
                0,
            )
            .unwrap();
            let fused = xd
                .apply_op2(&packed, GridMlpOp { mats: mats.clone() })
                .unwrap();
            let mut g = grid.to_grid(&xd).unwrap();
            for (i, w) in wd.iter().enumerate() {
                g = Linear::new(w.clone(), None).forward(&g).unwrap();
                if i < 2 {
                    g = silu(&g).unwrap();
                }
            }
            let composed = grid.from_grid(&g.contiguous().unwrap()).unwrap();
            let scale = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let err = max_abs_diff(&fused, &composed) / scale(&composed);
            assert!(err < tol, "{dtype:?} output: relative error {err:e}");
            let grads = |out: &Tensor| {
                let gs = (out * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let mut v = vec![gs.get(x.as_tensor()).unwrap().clone()];
                v.extend(ws.iter().map(|w| gs.get(w.as_tensor()).unwrap().clone()));
                v
            };
            for (i, (a, b)) in grads(&fused).iter().zip(grads(&composed)).enumerate() {
                let err = max_abs_diff(a, &b) / scale(&b);
                assert!(err < tol, "{dtype:?} gradient {i}: relative error {err:e}");
            }
        }
    }
}
