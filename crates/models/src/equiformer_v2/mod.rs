//! EquiformerV2 (Liao, Wood, Das & Smidt, *EquiformerV2: Improved Equivariant Transformer for
//! Scaling to Higher-Degree Representations*, ICLR 2024), ported from fairchem 1.x
//! `models/equiformer_v2/` with the OMat24 heads, on top of [`matscale_equivariant`].
//!
//! ## Architecture (fairchem module → matscale type)
//! * `sphere_embedding` (`nn.Embedding(Z, C)`) fills the `l = 0` row of the node embedding
//!   `[N, (lmax+1)², C]` (l-major, e3nn convention, y polar).
//! * Edge scalars: 600 Gaussians of the distance on `[0, max_radius]`
//!   ([`matscale_equivariant::radial::GaussianSmearing::equiformer_v2`]; fairchem ignores
//!   `num_distance_basis`), concatenated per module with source/target atom embeddings.
//! * Edge frames: [`matscale_equivariant::frames::edge_wigner`] (edge → +y, roll per
//!   [`FrameRoll`]), detached like fairchem's (differentiable in conservative mode, below).
//! * `EdgeDegreeEmbedding` → `blocks::EdgeDegreeEmbedding`: a radial function gives `m = 0`
//!   coefficients in the edge frame, rotated back, summed over incoming edges, `/ avg_degree`.
//! * `TransBlockV2` → `blocks::TransBlock`: `x + GA(norm_1(x))`, then `x + FFN(norm_2(x))`
//!   with drop path per structure in training.
//!   * `SO2EquivariantGraphAttention` → `blocks::GraphAttention`: `[x_src ‖ x_dst]` rotated
//!     into the edge frame, `SO2_Convolution` with radial weights and `num_heads·alpha +
//!     hidden` extra `m = 0` outputs, separable S2 activation on the grid, a second SO(2)
//!     convolution, logits `LayerNorm → SmoothLeakyReLU(0.2) → ·alpha_dot`, segment softmax
//!     over incoming edges, rotation back, sum, `SO3_LinearV2`.
//!   * `FeedForwardNetwork` → `blocks::FeedForward`: `SO3_LinearV2`, a 3-layer bias-free
//!     SiLU MLP on the sphere grid (the `l = 0` row replaced by `SiLU(Linear(x₀))`),
//!     `SO3_LinearV2`.
//! * Final `norm` (`layer_norm_sh` by default).
//! * Heads: energy `EqV2ScalarHead` (a `FeedForwardNetwork` to one channel, `l = 0` per atom,
//!   summed per structure and divided by `avg_num_nodes`); direct forces `EqV2VectorHead`
//!   (one more graph attention to one channel, its `l = 1` row = `(x, y, z)`); stress
//!   `Rank2SymmetricTensorHead` (`heads::StressHead`).
//!
//! Parameter names follow fairchem's `HydraModel` state dict (`backbone.blocks.0.ga.
//! so2_conv_1.fc_m0.weight`, `output_heads.energy.energy_block.…`,
//! `output_heads.forces.force_block.…`, `output_heads.stress.…`), so exported fairchem
//! weights can be loaded by name.
//!
//! ## Parameter counts
//! [`EquiformerV2Config::parameter_breakdown`] is exact and analytic, per component; it
//! reproduces fairchem's 31,207,434 parameters of OMat24 eqV2-S and the 20 sizes of the
//! scaling study (which excludes every parameter whose name contains `embedding`,
//! [`ParameterBreakdown::study_count`]).
//!
//! ## Presets and size ladder
//! [`EquiformerV2Config::presets`]: `eqv2-s`, `eqv2-m`, `eqv2-l` (fairchem's OMat24 models) and
//! the study's 20 sizes `study-01` … `study-20`. [`EquiformerV2Config::for_parameters`] picks
//! the shape `sphere = edge = FFN = w`, attention hidden = alpha `⌈w/2⌉`, `⌈w/16⌉` heads,
//! `⌈w/8⌉` value channels (eqV2-S's proportions), depth near `2 + ⌊2·log2(w)/3⌋`, closest in
//! ratio to the target; within 10% from about 5·10^3 to 10^8 parameters.
//!
//! ## FLOPs
//! `count_flops` replays the forward on the [`FlopCounter`]: linear layers and SO(2)
//! convolutions as matmuls (the `m > 0` orders as one `[E, 2k] × [2k, 2n]` product each, as
//! the kernels run them), rotations as `2·Σ_l (2l+1)(2 min(l, mmax)+1)` FLOPs per edge and
//! channel (block-diagonal Wigner-D, kept rows only), sphere-grid transforms as dense matmuls
//! with the `G × K` matrices, gathers/scatters of the edge messages, norms, activations and the
//! softmax as elementwise work. The count is affine in nodes and edges.
//!
//! ## Equivariance
//! Every op of the backbone is exactly equivariant except the S2 activations (SiLU on a finite
//! sphere grid is not band-limited), which also make outputs depend slightly on the frame
//! roll. Measured on the small test model (f64): energy 6e-7 / 7e-13 and forces 7e-5 / 1e-9
//! relative at grid 18 / 36 (fairchem reports 2.2e-3 on forces at grid 18 for its models).
//! The anisotropic stress is **not** equivariant, as in fairchem: its rank-2 head applies
//! Linear + SiLU to each `l = 2` component separately (kept for parity); the isotropic part
//! (pressure) is invariant to the grid level.
//!
//! ## Conservative mode
//! In [`ForceMode::Conservative`] the network returns the energy only and
//! [`crate::AtomisticModel`] differentiates it. fairchem's frames are detached (its `−∂E/∂r`
//! would miss the angular part), so here the edge frames are built differentiably from the
//! edge vectors ([`matscale_equivariant::frames_diff::zero_roll_wigner`]: the zero-roll frame,
//! with a second chart for edges within 45° of ±y) and messages are rotated by the
//! block-diagonal rotations differentiable in those blocks
//! ([`matscale_equivariant::so2::rotate_differentiable`], through `rotation::EdgeFrames`);
//! `frame_roll` is ignored. Forces and stress then equal finite differences of the energy to
//! 1e-9 (f64).
//!
//! Training on conservative forces differentiates them again (weights ← forces ← energy).
//! The fused CPU kernels have first-order backwards, so whenever higher-order gradients are
//! requested ([`crate::enable_higher_order_gradients`], which the trainer calls for
//! conservative models) every block switches to differentiable compositions of candle ops
//! (SO(2) convolutions as per-order `matmul`s, the S2 activations and grid MLP through the
//! grid products and the SiLU op, norms and attention sums composed); without it,
//! `train = true` in conservative mode is an error naming `force_mode`. The composed path is
//! several times slower and holds every intermediate, as fairchem's would.
//!
//! ## Limitations
//! * Arithmetic in f32 or f64 only: bf16/f16 weights are stored in low precision and cast to
//!   f32 on every forward pass (see [`EquiformerV2::new`]); the equivariant kernels have no
//!   bf16/f16 path.
//! * One resolution (`lmax_list` of length 1); the options listed in [`EquiformerV2Config`]
//!   are rejected by its `check`.

mod blocks;
pub mod config;
mod heads;
mod rotation;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use matscale_equivariant::frames::{edge_wigner, Roll};
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::norms::EquivariantNorm;
use matscale_equivariant::radial::GaussianSmearing;
use matscale_equivariant::segment::RowIndex;

pub use config::{EquiformerV2Config, FrameRoll, ParameterBreakdown, NUM_GAUSSIANS};

use crate::batch::{BatchShape, BatchTensors, Geometry, Grouping};
use crate::error::{ModelError, Result};
use crate::flops::{FlopCounter, LAYER_NORM, SOFTMAX, TRANSCENDENTAL};
use crate::model::{ForceMode, Model, RawOutput};
use blocks::{
    norm, EdgeDegreeEmbedding, EdgeEnds, EdgeGraph, FeedForward, GraphAttention, Grids, TransBlock,
};
use heads::StressHead;
use rotation::EdgeFrames;

/// The EquiformerV2 network with its energy head and, in [`ForceMode::Direct`], its force and
/// stress heads. See the [module docs](self).
#[derive(Debug)]
pub struct EquiformerV2 {
    config: EquiformerV2Config,
    sphere_embedding: Tensor,
    smearing: GaussianSmearing,
    edge_degree_embedding: EdgeDegreeEmbedding,
    blocks: Vec<TransBlock>,
    norm: EquivariantNorm,
    energy_block: FeedForward,
    force_block: Option<GraphAttention>,
    stress_head: Option<StressHead>,
    forward_count: AtomicU64,
    /// bf16/f16 weights: the variables, rebuilt into an f32 network on every forward pass.
    low_precision: Option<LowPrecision>,
}

/// The low-precision variables of a network built from a bf16/f16 [`VarBuilder`] (see
/// [`EquiformerV2::new`]).
#[derive(Debug)]
struct LowPrecision {
    /// Full name → the caller's variable.
    weights: HashMap<String, Tensor>,
    /// Prefix of the caller's builder.
    prefix: String,
    mode: ForceMode,
    grids: Grids,
}

/// A [`SimpleBackend`] that fetches every tensor from the caller's builder in its own dtype,
/// records it, and hands out its cast to the requested dtype.
struct Widening<'a> {
    inner: VarBuilder<'a>,
    fetched: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl Widening<'_> {
    fn record(&self, name: &str, tensor: &Tensor) {
        self.fetched
            .lock()
            .expect("the weight record is never poisoned")
            .insert(name.to_string(), tensor.clone());
    }
}

impl SimpleBackend for Widening<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hints: Init,
        dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .inner
            .get_with_hints_dtype(shape, name, hints, self.inner.dtype())?;
        self.record(name, &tensor);
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get_unchecked_dtype(name, self.inner.dtype())?;
        self.record(name, &tensor);
        tensor.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// `vb` pushed to `prefix` (a dotted path; nothing if empty).
fn with_prefix<'a>(vb: VarBuilder<'a>, prefix: &str) -> VarBuilder<'a> {
    if prefix.is_empty() {
        vb
    } else {
        vb.pp(prefix)
    }
}

impl EquiformerV2 {
    /// Builds the network from `vb`. With f32 or f64 weights the network computes in their
    /// dtype. With bf16 or f16 weights (mixed precision) it keeps the caller's low-precision
    /// variables and computes in f32 on their casts, rebuilt from their current values on
    /// every forward pass (the equivariant kernels run in f32/f64 only); gradients flow back
    /// through the casts to the low-precision variables.
    ///
    /// # Errors
    /// An invalid configuration (the field named), a weight dtype other than
    /// f32/f64/bf16/f16, candle errors.
    pub fn new(config: &EquiformerV2Config, mode: ForceMode, vb: VarBuilder) -> Result<Self> {
        config.check()?;
        let grids = Grids::new(config)?;
        match vb.dtype() {
            DType::F32 | DType::F64 => Self::build(config, mode, vb, &grids),
            DType::BF16 | DType::F16 => {
                // Build an f32 network on f32 casts of the caller's low-precision variables,
                // recording those variables to rebuild it from their current values later.
                let fetched = Arc::new(Mutex::new(HashMap::new()));
                let widening = Widening {
                    inner: vb.root(),
                    fetched: Arc::clone(&fetched),
                };
                let wide = with_prefix(
                    VarBuilder::from_backend(Box::new(widening), DType::F32, vb.device().clone()),
                    &vb.prefix(),
                );
                let mut net = Self::build(config, mode, wide, &grids)?;
                let weights = std::mem::take(
                    &mut *fetched.lock().expect("the weight record is never poisoned"),
                );
                net.low_precision = Some(LowPrecision {
                    weights,
                    prefix: vb.prefix(),
                    mode,
                    grids,
                });
                Ok(net)
            }
            other => Err(ModelError::config(
                "dtype",
                format!("is {other:?}; EquiformerV2 takes f32, f64, bf16 or f16 weights"),
            )),
        }
    }

    /// The network in the dtype of `vb` (f32 or f64).
    fn build(
        config: &EquiformerV2Config,
        mode: ForceMode,
        vb: VarBuilder,
        grids: &Grids,
    ) -> Result<Self> {
        let grids = grids.clone();
        let backbone = vb.pp("backbone");
        let sphere_embedding = backbone.pp("sphere_embedding").get_with_hints(
            (config.max_num_elements, config.sphere_channels),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let blocks = (0..config.num_layers)
            .map(|i| TransBlock::new(config, &grids, backbone.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let heads = vb.pp("output_heads");
        let (force_block, stress_head) = match mode {
            ForceMode::Direct => (
                Some(GraphAttention::new(
                    config,
                    &grids,
                    1,
                    0.0,
                    heads.pp("forces").pp("force_block"),
                )?),
                Some(StressHead::new(config, heads.pp("stress"))?),
            ),
            ForceMode::Conservative => (None, None),
        };
        Ok(Self {
            config: config.clone(),
            sphere_embedding,
            smearing: GaussianSmearing::equiformer_v2(config.max_radius)?,
            edge_degree_embedding: EdgeDegreeEmbedding::new(
                config,
                backbone.pp("edge_degree_embedding"),
            )?,
            blocks,
            norm: norm(config, config.sphere_channels, backbone.pp("norm"))?,
            energy_block: FeedForward::new(
                config,
                &grids,
                1,
                heads.pp("energy").pp("energy_block"),
            )?,
            force_block,
            stress_head,
            forward_count: AtomicU64::new(0),
            low_precision: None,
        })
    }

    /// With low-precision weights: the f32 network on f32 casts of their current values (the
    /// casts are differentiable, so gradients reach the low-precision variables).
    fn widened(&self, lp: &LowPrecision) -> Result<Self> {
        let device = self.sphere_embedding.device();
        let vb = with_prefix(
            VarBuilder::from_tensors(lp.weights.clone(), DType::F32, device),
            &lp.prefix,
        );
        let net = Self::build(&self.config, lp.mode, vb, &lp.grids)?;
        // Continue this model's stream of random frame rolls.
        let count = self.forward_count.fetch_add(1, Ordering::Relaxed);
        net.forward_count.store(count, Ordering::Relaxed);
        Ok(net)
    }

    /// The configuration.
    pub fn config(&self) -> &EquiformerV2Config {
        &self.config
    }

    /// The graph data every block reads: distance features, edge frames, segments.
    fn edge_graph(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        dtype: DType,
        helpers: Option<&Tensor>,
    ) -> Result<(EdgeGraph, Tensor)> {
        let n_edges = batch.n_edges();
        let conservative = self.force_block.is_none();
        let edge_vectors = if conservative {
            geometry.edge_vectors.to_dtype(dtype)?
        } else {
            geometry.edge_vectors.detach().to_dtype(dtype)?
        };
        let wigner = if n_edges == 0 {
            None
        } else if conservative {
            // Frames differentiable in the edge vectors (deterministic, whatever frame_roll).
            let layout = SphericalLayout::new(self.config.lmax(), self.config.mmax())?;
            Some(EdgeFrames::differentiable(&edge_vectors, layout)?)
        } else {
            let count = self.forward_count.fetch_add(1, Ordering::Relaxed);
            let roll = match (helpers, self.config.frame_roll) {
                (Some(h), _) => Roll::Helpers(h),
                (None, FrameRoll::Zero) => Roll::Zero,
                (None, FrameRoll::Random) => Roll::Random {
                    seed: self.config.frame_seed.wrapping_add(count),
                },
            };
            Some(EdgeFrames::Detached(edge_wigner(
                &edge_vectors,
                self.config.lmax(),
                &roll,
            )?))
        };
        let distance_features = self
            .smearing
            .forward(&geometry.edge_lengths.to_dtype(dtype)?)?;
        let keep = distance_features
            .ge(blocks::GAUSSIAN_FLOOR)?
            .to_dtype(distance_features.dtype())?;
        let distance_features = (distance_features * keep)?;
        // Indices from the batch's host groupings: nothing is copied back from the device.
        let (src_host, dst_host) = (
            batch.row_index(Grouping::EdgesBySource).host(),
            batch.row_index(Grouping::EdgesByTarget).host(),
        );
        let elements = self.config.max_num_elements;
        let numbers_of = |nodes: &[u32]| -> Result<RowIndex> {
            let z: Vec<u32> = nodes
                .iter()
                .map(|&i| u32::from(batch.numbers_host[i as usize]))
                .collect();
            batch.host_row_index(&z, elements)
        };
        let graph = EdgeGraph {
            n_nodes: batch.n_nodes(),
            n_edges,
            source_numbers: numbers_of(src_host)?,
            target_numbers: numbers_of(dst_host)?,
            src: batch.row_index(Grouping::EdgesBySource).clone(),
            dst: batch.row_index(Grouping::EdgesByTarget).clone(),
            distance_features,
            wigner,
            ends: EdgeEnds {
                src: src_host.into(),
                dst: dst_host.into(),
            },
        };
        Ok((graph, edge_vectors))
    }

    /// The backbone: node embeddings `[N, (lmax+1)², C]` after the final norm, the graph and
    /// the detached edge vectors in the weight dtype.
    pub(crate) fn backbone(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        train: bool,
        helpers: Option<&Tensor>,
    ) -> Result<(Tensor, EdgeGraph, Tensor)> {
        batch.check_elements(self.config.max_num_elements)?;
        let dtype = self.sphere_embedding.dtype();
        let device = self.sphere_embedding.device();
        let (graph, edge_vectors) = self.edge_graph(batch, geometry, dtype, helpers)?;
        let n = batch.n_nodes();
        let k = (self.config.lmax() + 1).pow(2);
        let c = self.config.sphere_channels;
        let l0 = self
            .sphere_embedding
            .index_select(&batch.numbers, 0)?
            .unsqueeze(1)?;
        let rest = Tensor::zeros((n, k - 1, c), dtype, device)?;
        let mut x = (Tensor::cat(&[&l0, &rest], 1)?
            + self.edge_degree_embedding.forward(&graph, dtype, device)?)?;
        for block in &self.blocks {
            x = block.forward(
                &x,
                &graph,
                &batch.node_structure,
                batch.n_structures(),
                train,
            )?;
        }
        Ok((self.norm.forward(&x)?, graph, edge_vectors))
    }
}

impl EquiformerV2 {
    /// The forward pass with the edge frames fixed by fairchem's helper vectors (`[E, 3]`,
    /// the values `torch.rand_like(edge_vec) − 0.5` fairchem drew, in the batch's edge order)
    /// instead of [`EquiformerV2Config::frame_roll`]: reproduces a fairchem run exactly.
    ///
    /// # Errors
    /// As [`Model::forward`], plus a shape error if `helpers` is not `[E, 3]`, and a
    /// configuration error in [`ForceMode::Conservative`].
    pub fn forward_with_frame_helpers(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        helpers: &Tensor,
    ) -> Result<RawOutput> {
        if self.force_block.is_none() {
            return Err(ModelError::config(
                "force_mode",
                "is `conservative`, whose frames are the deterministic differentiable ones; \
                 fairchem's frame helpers apply to direct mode only",
            ));
        }
        if helpers.dims() != [batch.n_edges(), 3] {
            return Err(ModelError::Batch(format!(
                "frame helpers have shape {:?}; expected [{}, 3]",
                helpers.dims(),
                batch.n_edges()
            )));
        }
        self.run(batch, geometry, false, Some(helpers))
    }

    fn run(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        train: bool,
        helpers: Option<&Tensor>,
    ) -> Result<RawOutput> {
        if let Some(lp) = &self.low_precision {
            return self.widened(lp)?.run(batch, geometry, train, helpers);
        }
        let (x, graph, edge_vectors) = self.backbone(batch, geometry, train, helpers)?;
        let n = batch.n_nodes();
        let per_atom = self.energy_block.forward(&x)?.narrow(1, 0, 1)?.reshape(n)?;
        let energy =
            (batch.sum_over(Grouping::NodesByStructure, &per_atom)? / self.config.avg_num_nodes)?;
        let forces = match &self.force_block {
            Some(block) => Some(
                block
                    .forward(&x, &graph, false)?
                    .narrow(1, 1, 3)?
                    .squeeze(D::Minus1)?
                    .contiguous()?,
            ),
            None => None,
        };
        let stress = match &self.stress_head {
            Some(head) => Some(head.forward(&x, &graph, &edge_vectors, batch)?),
            None => None,
        };
        Ok(RawOutput {
            energy,
            forces,
            stress,
        })
    }
}

impl Model for EquiformerV2 {
    fn forward(&self, batch: &BatchTensors, geometry: &Geometry, train: bool) -> Result<RawOutput> {
        if train
            && self.force_block.is_none()
            && !matscale_equivariant::higher_order_gradients_requested()
        {
            return Err(ModelError::config(
                "force_mode",
                "is `conservative`: training on conservative forces differentiates them again, \
                 which needs `matscale_models::enable_higher_order_gradients()` first (the \
                 trainer calls it); without it the fused kernels' first-order backward would \
                 silently miss most paths",
            ));
        }
        self.run(batch, geometry, train, None)
    }

    fn count_flops(&self, shape: &BatchShape, counter: &mut FlopCounter) {
        count_flops(&self.config, self.force_block.is_some(), shape, counter);
    }

    fn max_atomic_number(&self) -> usize {
        self.config.max_num_elements
    }
}

/// Sizes the FLOP count needs.
struct FlopShape {
    n: usize,
    e: usize,
    k: usize,
    kt: usize,
    /// `Σ_l (2l+1)(2 min(l, mmax)+1)`: multiply-adds per channel of one edge rotation.
    rot: usize,
    /// `(m_size per order m)`.
    m_sizes: Vec<usize>,
    grid_attn: usize,
    grid_ffn: usize,
}

fn grid_points(config: &EquiformerV2Config, mmax: usize) -> usize {
    let l = config.lmax();
    if config.grid_resolution > 0 {
        config.grid_resolution * config.grid_resolution
    } else if mmax == l {
        2 * (l + 1) * (2 * mmax + 3)
    } else {
        2 * (l + 1) * (2 * mmax + 1)
    }
}

/// Replays the forward pass (see [`crate::flops`]): every matmul, gather, scatter and
/// elementwise op of the backbone and heads. Rotations count `2·Σ_l (2l+1)(2min(l,mmax)+1)`
/// FLOPs per channel and edge (block-diagonal, kept rows only); the sphere-grid transforms
/// count as dense matmuls with the `G × K` matrices.
fn count_flops(
    config: &EquiformerV2Config,
    direct: bool,
    shape: &BatchShape,
    counter: &mut FlopCounter,
) {
    let (l, mm) = (config.lmax(), config.mmax());
    let layout = SphericalLayout::new(l, mm).ok();
    let kt = layout.map_or((l + 1).pow(2), |s| s.num_truncated());
    let s = FlopShape {
        n: shape.n_nodes,
        e: shape.n_edges,
        k: (l + 1).pow(2),
        kt,
        rot: (0..=l).map(|d| (2 * d + 1) * (2 * d.min(mm) + 1)).sum(),
        m_sizes: (0..=mm).map(|m| l + 1 - m).collect(),
        grid_attn: grid_points(config, mm),
        grid_ffn: grid_points(config, l),
    };
    let c = config.sphere_channels;
    let ec = config.edge_channels;
    let rad_in = config.radial_input_channels();
    // Distance features.
    counter.elementwise(s.e * NUM_GAUSSIANS, 3.0 + TRANSCENDENTAL);
    // Node embedding and edge-degree embedding.
    counter.gather(s.n, c);
    count_radial(counter, s.e, &[rad_in, ec, ec, (l + 1) * c]);
    counter.gather(2 * s.e, ec);
    counter.matmul(s.e * s.rot, 1, c);
    counter.scatter(s.e, s.k * c);
    counter.elementwise(s.n * s.k * c, 2.0);
    for _ in 0..config.num_layers {
        count_norm(counter, &s, c);
        count_attention(config, counter, &s, c);
        counter.elementwise(s.n * s.k * c, 1.0);
        count_norm(counter, &s, c);
        count_ffn(config, counter, &s, c);
        counter.elementwise(s.n * s.k * c, 1.0);
    }
    count_norm(counter, &s, c);
    count_ffn(config, counter, &s, 1);
    counter.scatter(s.n, 1);
    if direct {
        count_attention(config, counter, &s, 1);
        // Stress head: SH, norm, contraction, LayerNorm, means, two MLPs.
        let w = 2 * c;
        counter.elementwise(s.e * (s.k + 9), 4.0);
        counter.gather(2 * s.e, s.k * c);
        counter.elementwise(s.e * s.k * w, 2.0);
        counter.elementwise(s.e * w, LAYER_NORM);
        counter.elementwise(s.e * 5 * w, 1.0);
        counter.scatter(s.e, 6 * w);
        counter.linear(6 * s.n, w, w, true);
        counter.elementwise(6 * s.n * w, TRANSCENDENTAL);
        counter.linear(6 * s.n, w, 1, true);
        counter.scatter(s.n, 6);
        counter.matmul(shape.n_structures, 6, 9);
    }
}

fn count_radial(counter: &mut FlopCounter, rows: usize, channels: &[usize]) {
    let n = channels.len() - 1;
    for i in 0..n {
        counter.linear(rows, channels[i], channels[i + 1], true);
        if i + 1 < n {
            counter.elementwise(rows * channels[i + 1], LAYER_NORM + TRANSCENDENTAL);
        }
    }
}

fn count_norm(counter: &mut FlopCounter, s: &FlopShape, c: usize) {
    counter.elementwise(s.n * s.k * c, LAYER_NORM);
}

fn count_so2_conv(
    counter: &mut FlopCounter,
    s: &FlopShape,
    c_in: usize,
    c_out: usize,
    extra: usize,
) {
    counter.matmul(s.e, s.m_sizes[0] * c_in, s.m_sizes[0] * c_out + extra);
    for &size in &s.m_sizes[1..] {
        counter.matmul(s.e, 2 * size * c_in, 2 * size * c_out);
    }
}

fn count_attention(
    config: &EquiformerV2Config,
    counter: &mut FlopCounter,
    s: &FlopShape,
    out: usize,
) {
    let c = config.sphere_channels;
    let ec = config.edge_channels;
    let h = config.attn_hidden_channels;
    let heads = config.num_heads;
    let alpha = config.attn_alpha_channels;
    let value = config.attn_value_channels;
    let radial_len: usize = s.m_sizes.iter().sum::<usize>() * 2 * c;
    counter.gather(2 * s.e, ec);
    count_radial(
        counter,
        s.e,
        &[config.radial_input_channels(), ec, ec, radial_len],
    );
    counter.gather(2 * s.e, s.k * c);
    counter.matmul(s.e * s.rot, 1, 2 * c);
    counter.elementwise(s.e * s.kt * 2 * c, 1.0);
    count_so2_conv(counter, s, 2 * c, h, heads * alpha + h);
    counter.gather(2 * s.e, s.kt * h);
    counter.matmul(s.e * s.grid_attn, s.kt, h);
    counter.elementwise(s.e * s.grid_attn * h, TRANSCENDENTAL);
    counter.matmul(s.e * s.kt, s.grid_attn, h);
    count_so2_conv(counter, s, h, heads * value, 0);
    counter.matmul(s.e * s.rot, 1, heads * value);
    counter.elementwise(s.e * heads * alpha, LAYER_NORM + TRANSCENDENTAL + 2.0);
    counter.elementwise(s.e * heads, SOFTMAX);
    counter.elementwise(s.e * s.k * heads * value, 1.0);
    counter.scatter(s.e, s.k * heads * value);
    counter.matmul(s.n * s.k, heads * value, out);
}

fn count_ffn(config: &EquiformerV2Config, counter: &mut FlopCounter, s: &FlopShape, out: usize) {
    let c = config.sphere_channels;
    let f = config.ffn_hidden_channels;
    counter.linear(s.n, c, f, true);
    counter.elementwise(s.n * f, TRANSCENDENTAL);
    counter.matmul(s.n * s.k, c, f);
    counter.matmul(s.n * s.grid_ffn, s.k, f);
    for _ in 0..3 {
        counter.matmul(s.n * s.grid_ffn, f, f);
    }
    counter.elementwise(2 * s.n * s.grid_ffn * f, TRANSCENDENTAL);
    counter.matmul(s.n * s.k, s.grid_ffn, f);
    counter.matmul(s.n * s.k, f, out);
}
