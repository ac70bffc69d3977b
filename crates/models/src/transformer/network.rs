//! The Transformer network: embedding, padded masked self-attention blocks and heads.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use matscale_equivariant::norms::LayerNorm;
use matscale_equivariant::segment::Segments;

use super::TransformerConfig;
use crate::batch::{BatchShape, BatchTensors, Geometry, Grouping};
use crate::error::Result;
use crate::flops::{FlopCounter, LAYER_NORM, SOFTMAX, TRANSCENDENTAL};
use crate::heads::{count_edge_heads, edge_forces, edge_stress, voigt_to_matrix, MlpHead};
use crate::model::{mean_per_structure, sum_per_structure, ForceMode, Model, RawOutput};

/// Added to the logits of padded keys before the row maximum is taken, so that the maximum is
/// one of the structure's own logits (representable in f16).
const MASKED_LOGIT: f64 = -3.0e4;
/// ADiT's `max_len` of the sinusoidal index embedding.
const INDEX_EMBEDDING_MAX_LEN: f64 = 2048.0;
/// `√(2/π)` of the tanh form of GELU.
const GELU_SCALE: f64 = 0.797_884_560_802_865_4;

/// The Transformer network (see the [module docs](super)).
#[derive(Debug)]
pub struct Transformer {
    config: TransformerConfig,
    mode: ForceMode,
    atom_embedding: Embedding,
    coordinate_embedders: Option<[CoordinateEmbedder; 2]>,
    blocks: Vec<EncoderBlock>,
    norm: LayerNorm,
    energy_head: MlpHead,
    direct: Option<DirectHeads>,
    dtype: DType,
}

/// `Linear(3, d, no bias) – SiLU – Linear(d, d)`.
#[derive(Debug)]
struct CoordinateEmbedder {
    first: Linear,
    second: Linear,
}

impl CoordinateEmbedder {
    fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            first: candle_nn::linear_no_bias(3, d, vb.pp("0"))?,
            second: candle_nn::linear(d, d, vb.pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(&self.second, &linear(&self.first, x)?.silu()?)
    }
}

#[derive(Debug)]
struct EncoderBlock {
    norm1: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
    distance_bias: Option<Linear>,
    norm2: LayerNorm,
    linear1: Linear,
    linear2: Linear,
}

#[derive(Debug)]
enum DirectHeads {
    /// Per-atom force head and per-atom stress head (mean-pooled): the plain variant.
    Atom { forces: MlpHead, stress: MlpHead },
    /// Per-edge force and stress weights: the distance variant.
    Edge(EdgeHead),
}

/// `Linear(2d + K, d) – SiLU – Linear(d, 2)` on `[h_src, h_dst, rbf]`; the first layer is
/// applied to node features before the gather (same result, `N` instead of `E` rows).
#[derive(Debug)]
struct EdgeHead {
    first_weight: Tensor,
    first_bias: Tensor,
    second: Linear,
}

/// Per-batch index tensors of the padded attention layout.
struct Padding {
    /// Padded width `M`.
    width: usize,
    /// `[B·M]`: node of each slot, `N` (a zero row) for padding.
    gather: Tensor,
    /// `[N]`: slot of each node.
    scatter: Tensor,
    /// `gather` and `scatter` as host groupings (for [`Segments::select_rows`]).
    gather_groups: Segments,
    scatter_groups: Segments,
    /// `[B, 1, 1, M]`: 1 for real keys, 0 for padding.
    key_mask: Tensor,
    /// `[B, 1, 1, M]`: 0 for real keys, [`MASKED_LOGIT`] for padding.
    key_bias: Tensor,
}

impl Padding {
    fn new(batch: &BatchTensors, dtype: DType) -> Result<Self> {
        let (b, n) = (batch.n_structures(), batch.n_nodes());
        let width = batch.shape.max_nodes.max(1);
        let device = batch.device();
        let mut gather = vec![n as u32; b * width];
        let mut scatter = vec![0u32; n];
        let mut mask = vec![0f32; b * width];
        for s in 0..b {
            for (k, node) in (batch.node_ptr[s]..batch.node_ptr[s + 1]).enumerate() {
                let slot = s * width + k;
                gather[slot] = node as u32;
                scatter[node] = slot as u32;
                mask[slot] = 1.0;
            }
        }
        let key_mask = Tensor::from_vec(mask, (b, 1, 1, width), device)?.to_dtype(dtype)?;
        let key_bias = ((&key_mask - 1.0)? * -MASKED_LOGIT)?;
        Ok(Self {
            width,
            gather_groups: Segments::from_indices(&gather, n + 1)?,
            scatter_groups: Segments::from_indices(&scatter, b * width)?,
            gather: Tensor::from_vec(gather, b * width, device)?,
            scatter: Tensor::from_vec(scatter, n, device)?,
            key_mask,
            key_bias,
        })
    }

    /// `[N, w]` → `[B·M, w]` with zero rows for padding.
    fn pad(&self, x: &Tensor) -> Result<Tensor> {
        let zero = Tensor::zeros((1, x.dim(1)?), x.dtype(), x.device())?;
        let padded = Tensor::cat(&[x, &zero], 0)?;
        Ok(self.gather_groups.select_rows(&padded, &self.gather)?)
    }

    /// `[B·M, w]` → `[N, w]`.
    fn unpad(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.scatter_groups.select_rows(x, &self.scatter)?)
    }
}

/// Radial features of the distance variant, in the weight dtype.
struct Radial {
    /// Gaussian radial basis `[E, K]`.
    basis: Tensor,
    /// Cosine envelope `[E, 1]`.
    envelope: Tensor,
    /// Slot pair `(s·M + i)·M + j` of each edge `j → i`, `[E]` u32.
    pair: Tensor,
    /// The edges grouped by slot pair (host CSR), for the scatter of the attention bias.
    pair_groups: Segments,
}

/// GELU in its tanh form, `½x(1 + tanh u) = x·σ(2u)` with `u = √(2/π)(x + 0.044715 x³)`,
/// from differentiable pieces so that it can be differentiated to any order exactly: candle's
/// fused GELU has a backward with constants rounded to six digits (and evaluates two `powf`
/// and a `tanh` per element), and `tanh` itself costs seven times a sigmoid on the CPU.
/// candle-nn's sigmoid is stable for large `|u|` and its backward `σ(1 − σ)` is built from its
/// output, hence differentiable again.
fn gelu(x: &Tensor) -> Result<Tensor> {
    // x³ as a product: `powf` costs a libm call per element, forward and backward.
    let cube = x.sqr()?.mul(x)?;
    let inner = ((x + (cube * 0.044_715)?)? * (2.0 * GELU_SCALE))?;
    Ok(x.mul(&candle_nn::ops::sigmoid(&inner)?)?)
}

/// `x Wᵀ + b` on `[rows, in]`, with the bias added as the rank-one product `1·bᵀ` so that its
/// gradient is a matrix product too: candle sums a broadcast bias gradient over the rows with
/// a strided loop about fifty times slower than the equivalent `1ᵀ·G`.
fn linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = x.matmul(&layer.weight().t()?)?;
    match layer.bias() {
        Some(bias) => {
            let ones = Tensor::ones((x.dim(0)?, 1), x.dtype(), x.device())?;
            Ok((y + ones.matmul(&bias.unsqueeze(0)?)?)?)
        }
        None => Ok(y),
    }
}

/// FLOPs of [`linear`]: the product, the rank-one bias product and the add.
fn count_linear(counter: &mut FlopCounter, rows: usize, d_in: usize, d_out: usize, bias: bool) {
    counter.matmul(rows, d_in, d_out);
    if bias {
        counter.matmul(rows, 1, d_out);
        counter.elementwise(rows * d_out, 1.0);
    }
}

fn dropout(x: &Tensor, rate: f64, train: bool) -> Result<Tensor> {
    if train && rate > 0.0 {
        Ok(candle_nn::ops::dropout(x, rate as f32)?)
    } else {
        Ok(x.clone())
    }
}

/// `f − ⌊f⌋` along the periodic directions of each structure (`floor` has a zero gradient, so
/// derivatives are those of `f`).
fn wrap_periodic(batch: &BatchTensors, fractional: &Tensor) -> Result<Tensor> {
    let n = batch.n_nodes();
    let mut periodic = vec![0f64; n * 3];
    for s in 0..batch.n_structures() {
        for node in batch.node_ptr[s]..batch.node_ptr[s + 1] {
            for c in 0..3 {
                if batch.pbc[s][c] {
                    periodic[3 * node + c] = 1.0;
                }
            }
        }
    }
    let periodic =
        Tensor::from_vec(periodic, (n, 3), batch.device())?.to_dtype(fractional.dtype())?;
    // Twice, as ASE does: `f − ⌊f⌋` rounds to exactly 1 for a tiny negative `f`.
    let once = (fractional - fractional.floor()?.mul(&periodic)?)?;
    Ok((&once - once.floor()?.mul(&periodic)?)?)
}

/// ADiT's sinusoidal embedding of each atom's index within its structure, `[N, d]`.
fn index_embedding(batch: &BatchTensors, d: usize, dtype: DType) -> Result<Tensor> {
    let n = batch.n_nodes();
    let half = d / 2;
    let frequencies: Vec<f64> = (0..half)
        .map(|k| std::f64::consts::PI / INDEX_EMBEDDING_MAX_LEN.powf(2.0 * k as f64 / d as f64))
        .collect();
    let mut values = vec![0f64; n * d];
    for s in 0..batch.n_structures() {
        for (t, node) in (batch.node_ptr[s]..batch.node_ptr[s + 1]).enumerate() {
            let row = &mut values[node * d..(node + 1) * d];
            for (k, frequency) in frequencies.iter().enumerate() {
                let angle = t as f64 * frequency;
                row[k] = angle.sin();
                row[half + k] = angle.cos();
            }
        }
    }
    Ok(Tensor::from_vec(values, (n, d), batch.device())?.to_dtype(dtype)?)
}

impl Transformer {
    /// Builds the network of `config` in `mode` with weights from `vb`.
    pub fn new(config: &TransformerConfig, mode: ForceMode, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let (d, f, h) = (c.d_model, c.ff_width(), c.head_hidden);
        let distance = c.is_distance();
        let atom_embedding = candle_nn::embedding(c.max_atomic_number, d, vb.pp("atom_embedding"))?;
        let coordinate_embedders = if distance {
            None
        } else {
            Some([
                CoordinateEmbedder::new(d, vb.pp("pos_embedder"))?,
                CoordinateEmbedder::new(d, vb.pp("frac_embedder"))?,
            ])
        };
        let blocks = (0..c.depth)
            .map(|l| {
                let vb = vb.pp(format!("blocks.{l}"));
                Ok(EncoderBlock {
                    norm1: LayerNorm::new(d, c.layer_norm_eps, vb.pp("norm1"))?,
                    in_proj: candle_nn::linear(d, 3 * d, vb.pp("attn.in_proj"))?,
                    out_proj: candle_nn::linear(d, d, vb.pp("attn.out_proj"))?,
                    distance_bias: if distance {
                        Some(candle_nn::linear(
                            c.num_radial,
                            c.heads,
                            vb.pp("attn.distance_bias"),
                        )?)
                    } else {
                        None
                    },
                    norm2: LayerNorm::new(d, c.layer_norm_eps, vb.pp("norm2"))?,
                    linear1: candle_nn::linear(d, f, vb.pp("ff.linear1"))?,
                    linear2: candle_nn::linear(f, d, vb.pp("ff.linear2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, c.layer_norm_eps, vb.pp("norm"))?;
        let energy_head = MlpHead::new(d, h, 1, vb.pp("energy_head"))?;
        let direct = match (mode, distance) {
            (ForceMode::Conservative, _) => None,
            (ForceMode::Direct, false) => Some(DirectHeads::Atom {
                forces: MlpHead::new(d, h, 3, vb.pp("force_head"))?,
                stress: MlpHead::new(d, h, 6, vb.pp("stress_head"))?,
            }),
            (ForceMode::Direct, true) => {
                let first = candle_nn::linear(2 * d + c.num_radial, d, vb.pp("edge_head.0"))?;
                let first_bias = first
                    .bias()
                    .expect("candle_nn::linear always has a bias")
                    .clone();
                Some(DirectHeads::Edge(EdgeHead {
                    first_weight: first.weight().clone(),
                    first_bias,
                    second: candle_nn::linear(d, 2, vb.pp("edge_head.2"))?,
                }))
            }
        };
        Ok(Self {
            config: c.clone(),
            mode,
            atom_embedding,
            coordinate_embedders,
            blocks,
            norm,
            energy_head,
            direct,
            dtype: vb.dtype(),
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// The input tokens `[N, d]`.
    fn embed(&self, batch: &BatchTensors, geometry: &Geometry) -> Result<Tensor> {
        let mut x = self.atom_embedding.forward(&batch.numbers)?;
        if let Some([pos, frac]) = &self.coordinate_embedders {
            let positions = geometry.positions.to_dtype(self.dtype)?;
            let mut fractional = geometry.fractional(batch)?;
            if self.config.wrap_fractional {
                fractional = wrap_periodic(batch, &fractional)?;
            }
            let fractional = fractional.to_dtype(self.dtype)?;
            x = ((x + pos.forward(&positions)?)? + frac.forward(&fractional)?)?;
            if self.config.index_embedding {
                x = (x + index_embedding(batch, self.config.d_model, self.dtype)?)?;
            }
        }
        Ok(x)
    }

    /// Radial basis, envelope and slot pairs of the edges (distance variant).
    fn radial(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        padding: &Padding,
    ) -> Result<Radial> {
        let c = &self.config;
        let r = &geometry.edge_lengths; // [E], master dtype
        let e = batch.n_edges();
        let k = c.num_radial;
        let spacing = if k > 1 {
            c.cutoff / (k - 1) as f64
        } else {
            c.cutoff
        };
        let centres: Vec<f64> = (0..k).map(|i| i as f64 * spacing).collect();
        let centres = Tensor::from_vec(centres, (1, k), batch.device())?.to_dtype(r.dtype())?;
        let r2 = r.reshape((e, 1))?;
        let basis = (r2.broadcast_sub(&centres)?.sqr()? * (-0.5 / (spacing * spacing)))?.exp()?;
        let inside = r2.lt(c.cutoff)?.to_dtype(r.dtype())?;
        let envelope =
            ((((&r2 * (std::f64::consts::PI / c.cutoff))?.cos()? + 1.0)? * 0.5)? * inside)?;
        // Slot pair of each edge, on the host from the batch's offsets.
        let m = padding.width;
        let n = batch.n_nodes();
        let mut slot = vec![0u32; n];
        let mut row = vec![0u32; n];
        for s in 0..batch.n_structures() {
            for (local, node) in (batch.node_ptr[s]..batch.node_ptr[s + 1]).enumerate() {
                slot[node] = local as u32;
                row[node] = ((s * m + local) * m) as u32;
            }
        }
        let groups = &batch.groups;
        let pair: Vec<u32> = groups
            .edges_by_target
            .host()
            .iter()
            .zip(groups.edges_by_source.host())
            .map(|(&dst, &src)| row[dst as usize] + slot[src as usize])
            .collect();
        let pair_groups = Segments::from_indices(&pair, batch.n_structures() * m * m)?;
        let pair = Tensor::from_vec(pair, e, batch.device())?;
        Ok(Radial {
            basis: basis.to_dtype(self.dtype)?,
            envelope: envelope.to_dtype(self.dtype)?,
            pair,
            pair_groups,
        })
    }

    /// The per-head attention bias `[B, H, M, M]` of one block (distance variant).
    fn attention_bias(
        &self,
        layer: &Linear,
        radial: &Radial,
        batch: &BatchTensors,
        padding: &Padding,
    ) -> Result<Tensor> {
        let (b, m, heads) = (batch.n_structures(), padding.width, self.config.heads);
        // [E, H] summed into the slot pairs [B·M·M, H].
        let per_edge = linear(layer, &radial.basis)?.broadcast_mul(&radial.envelope)?;
        let dense = radial.pair_groups.scatter_sum(&per_edge, &radial.pair)?;
        Ok(dense
            .reshape((b, m, m, heads))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// Masked multi-head self-attention inside each structure: `[N, d]` → `[N, d]`.
    fn attention(
        &self,
        block: &EncoderBlock,
        x: &Tensor,
        padding: &Padding,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, m, heads) = (padding.key_mask.dim(0)?, padding.width, c.heads);
        let dh = c.d_model / heads;
        let qkv = padding
            .pad(&linear(&block.in_proj, x)?)?
            .reshape((b, m, 3, heads, dh))?;
        let part = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?) // [B, H, M, dh]
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let mut logits =
            (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * (1.0 / (dh as f64).sqrt()))?;
        if let Some(bias) = bias {
            logits = (logits + bias)?;
        }
        let logits = logits.broadcast_add(&padding.key_bias)?;
        // Softmax from differentiable primitives; the shift is a constant of the result.
        let shift = logits.max_keepdim(D::Minus1)?.detach();
        let weights = logits
            .broadcast_sub(&shift)?
            .exp()?
            .broadcast_mul(&padding.key_mask)?;
        let weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        let weights = dropout(&weights, c.dropout, train)?;
        let out = weights
            .matmul(&v)? // [B, H, M, dh]
            .transpose(1, 2)?
            .reshape((b * m, c.d_model))?;
        linear(&block.out_proj, &padding.unpad(&out)?)
    }

    /// The encoder: tokens `[N, d]` → features `[N, d]` after the final LayerNorm.
    fn encode(
        &self,
        batch: &BatchTensors,
        geometry: &Geometry,
        radial: Option<&Radial>,
        padding: &Padding,
        train: bool,
    ) -> Result<Tensor> {
        let rate = self.config.dropout;
        let mut x = self.embed(batch, geometry)?;
        for block in &self.blocks {
            let bias = match (&block.distance_bias, radial) {
                // A batch without edges has no pair biases.
                (Some(linear), Some(radial)) if batch.n_edges() > 0 => {
                    Some(self.attention_bias(linear, radial, batch, padding)?)
                }
                _ => None,
            };
            let a = self.attention(
                block,
                &block.norm1.forward(&x)?,
                padding,
                bias.as_ref(),
                train,
            )?;
            x = (x + dropout(&a, rate, train)?)?;
            let hidden = gelu(&linear(&block.linear1, &block.norm2.forward(&x)?)?)?;
            let ff = linear(&block.linear2, &dropout(&hidden, rate, train)?)?;
            x = (x + dropout(&ff, rate, train)?)?;
        }
        Ok(self.norm.forward(&x)?)
    }
}

impl EdgeHead {
    /// Per-edge `(w_F, w_σ)` `[E, 2]`.
    fn forward(&self, x: &Tensor, batch: &BatchTensors, radial: &Radial) -> Result<Tensor> {
        let d = x.dim(1)?;
        let k = radial.basis.dim(1)?;
        let w_src = self.first_weight.narrow(1, 0, d)?.contiguous()?;
        let w_dst = self.first_weight.narrow(1, d, d)?.contiguous()?;
        let w_rbf = self.first_weight.narrow(1, 2 * d, k)?.contiguous()?;
        let src = batch.gather_by(Grouping::EdgesBySource, &x.matmul(&w_src.t()?)?)?;
        let dst = batch.gather_by(Grouping::EdgesByTarget, &x.matmul(&w_dst.t()?)?)?;
        let ones = Tensor::ones((radial.basis.dim(0)?, 1), x.dtype(), x.device())?;
        let rbf =
            (radial.basis.matmul(&w_rbf.t()?)? + ones.matmul(&self.first_bias.unsqueeze(0)?)?)?;
        let hidden = ((src + dst)? + rbf)?.silu()?;
        Ok(linear(&self.second, &hidden)?.broadcast_mul(&radial.envelope)?)
    }
}

impl Model for Transformer {
    fn forward(&self, batch: &BatchTensors, geometry: &Geometry, train: bool) -> Result<RawOutput> {
        let padding = Padding::new(batch, self.dtype)?;
        let radial = if self.config.is_distance() {
            Some(self.radial(batch, geometry, &padding)?)
        } else {
            None
        };
        let x = self.encode(batch, geometry, radial.as_ref(), &padding, train)?;
        let energy = sum_per_structure(batch, &self.energy_head.forward(&x)?)?.squeeze(1)?;
        let (forces, stress) = match (&self.direct, self.mode) {
            (Some(DirectHeads::Atom { forces, stress }), ForceMode::Direct) => {
                let f = forces.forward(&x)?;
                let s = voigt_to_matrix(&mean_per_structure(batch, &stress.forward(&x)?)?)?;
                (Some(f), Some(s))
            }
            (Some(DirectHeads::Edge(_)), ForceMode::Direct) if batch.n_edges() == 0 => {
                // No edges, no edge forces (and candle's index_add rejects empty sources).
                let device = batch.device();
                let f = Tensor::zeros((batch.n_nodes(), 3), self.dtype, device)?;
                let s = Tensor::zeros((batch.n_structures(), 3, 3), self.dtype, device)?;
                (Some(f), Some(s))
            }
            (Some(DirectHeads::Edge(head)), ForceMode::Direct) => {
                let radial = radial
                    .as_ref()
                    .expect("the distance variant always computes radial features");
                let w = head.forward(&x, batch, radial)?;
                let column = |i: usize| w.narrow(1, i, 1)?.squeeze(1)?.contiguous();
                let f = edge_forces(batch, geometry, &column(0)?)?;
                let s = edge_stress(batch, geometry, &column(1)?)?;
                (Some(f), Some(s))
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
        count_flops(&self.config, self.mode, shape, counter);
    }

    fn max_atomic_number(&self) -> usize {
        self.config.max_atomic_number
    }
}

/// Replays the forward pass of `config` in `mode` on `counter` (see the module docs).
pub(super) fn count_flops(
    config: &TransformerConfig,
    mode: ForceMode,
    shape: &BatchShape,
    counter: &mut FlopCounter,
) {
    let c = config;
    let (n, b, e) = (shape.n_nodes, shape.n_structures, shape.n_edges);
    let m = shape.max_nodes;
    let (d, f, h, heads, k) = (
        c.d_model,
        c.ff_width(),
        c.head_hidden,
        c.heads,
        c.num_radial,
    );
    let dh = d / heads;
    let slots = b * m;
    let logits = b * heads * m * m;
    let dropout = c.dropout > 0.0;
    let distance = c.is_distance();

    // Input tokens.
    counter.gather(n, d);
    if distance {
        counter.elementwise(e * k, TRANSCENDENTAL + 3.0); // Gaussians
        counter.elementwise(e, TRANSCENDENTAL + 4.0); // cosine envelope
    } else {
        counter.gather(n, 9); // inverse cell per atom
        counter.matmul(n, 3, 3); // fractional coordinates
        if c.wrap_fractional {
            counter.elementwise(n * 3, 6.0); // twice floor, mask, subtract
        }
        for _ in 0..2 {
            count_linear(counter, n, 3, d, false);
            counter.elementwise(n * d, TRANSCENDENTAL);
            count_linear(counter, n, d, d, true);
            counter.elementwise(n * d, 1.0); // sum into the tokens
        }
        if c.index_embedding {
            counter.elementwise(n * d, 1.0);
        }
    }
    // Encoder blocks.
    for _ in 0..c.depth {
        counter.elementwise(n * d, LAYER_NORM);
        count_linear(counter, n, d, 3 * d, true);
        counter.gather(slots, 3 * d); // padding
        counter.elementwise(slots * 3 * d, 1.0); // head-major copies of q, k, v
        counter.matmul(b * heads * m, dh, m); // Q Kᵀ
        counter.elementwise(logits, 1.0); // scaling
        if distance {
            count_linear(counter, e, k, heads, true);
            counter.elementwise(e * heads, 1.0); // envelope
            counter.scatter(e, heads);
            counter.elementwise(logits, 2.0); // head-major copy and add
        }
        counter.elementwise(logits, 2.0); // key bias and key mask
        counter.elementwise(logits, SOFTMAX);
        if dropout {
            counter.elementwise(logits, 1.0);
        }
        counter.matmul(b * heads * m, m, dh); // A V
        counter.elementwise(slots * d, 1.0); // token-major copy
        counter.gather(n, d); // unpadding
        count_linear(counter, n, d, d, true);
        if dropout {
            counter.elementwise(n * d, 1.0);
        }
        counter.elementwise(n * d, 1.0); // residual
        counter.elementwise(n * d, LAYER_NORM);
        count_linear(counter, n, d, f, true);
        counter.elementwise(n * f, TRANSCENDENTAL + 9.0); // GELU: exp and nine mul/add/recip
        count_linear(counter, n, f, d, true);
        if dropout {
            counter.elementwise(n * f, 1.0);
            counter.elementwise(n * d, 1.0);
        }
        counter.elementwise(n * d, 1.0); // residual
    }
    counter.elementwise(n * d, LAYER_NORM);
    // Heads.
    let energy_head = MlpHeadShape { d, h };
    energy_head.count(n, 1, counter);
    counter.scatter(n, 1);
    if mode == ForceMode::Direct {
        if distance {
            counter.matmul(n, d, d);
            counter.matmul(n, d, d);
            counter.gather(e, d);
            counter.gather(e, d);
            count_linear(counter, e, k, d, true);
            counter.elementwise(e * d, 2.0); // sum of the three parts
            counter.elementwise(e * d, TRANSCENDENTAL);
            count_linear(counter, e, d, 2, true);
            counter.elementwise(e * 2, 1.0); // envelope
            count_edge_heads(e, counter);
        } else {
            energy_head.count(n, 3, counter);
            energy_head.count(n, 6, counter);
            counter.scatter(n, 6);
            counter.elementwise(b * 6, 1.0); // mean
            counter.gather(b, 9); // Voigt to matrix
        }
    }
}

/// The FLOPs of an [`MlpHead`] without building one.
struct MlpHeadShape {
    d: usize,
    h: usize,
}

impl MlpHeadShape {
    fn count(&self, rows: usize, out: usize, counter: &mut FlopCounter) {
        counter.linear(rows, self.d, self.d, true);
        counter.elementwise(rows * self.d, TRANSCENDENTAL);
        counter.linear(rows, self.d, self.h, true);
        counter.elementwise(rows * self.h, TRANSCENDENTAL);
        counter.linear(rows, self.h, out, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let xs = [-3.0f64, -0.5, 0.0, 0.7, 2.5];
        let t = Tensor::new(&xs, &Device::Cpu).unwrap();
        let y: Vec<f64> = gelu(&t).unwrap().to_vec1().unwrap();
        let fused: Vec<f64> = t.gelu().unwrap().to_vec1().unwrap();
        for ((x, y), f) in xs.iter().zip(y).zip(fused) {
            let expected = 0.5 * x * (1.0 + (GELU_SCALE * (x + 0.044715 * x.powi(3))).tanh());
            assert!((y - expected).abs() < 1e-15);
            assert!((y - f).abs() < 1e-15, "candle's GELU is the same function");
        }
    }

    #[test]
    fn wrapping_follows_ase_on_periodic_directions_only() {
        use matscale_structures::batch::{GraphBatch, GraphOptions};
        use matscale_structures::Structure;
        let cell = [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]];
        let s = Structure::new(vec![1, 1], vec![[0.0; 3]; 2], cell, [true, true, false]).unwrap();
        let batch = GraphBatch::new(&[s], &GraphOptions::new(1.0)).unwrap();
        let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
        let f = Tensor::new(&[[-1e-17, 1.25, -0.5], [2.5, -0.25, 1.5]], &Device::Cpu).unwrap();
        let wrapped: Vec<Vec<f64>> = wrap_periodic(&tensors, &f).unwrap().to_vec2().unwrap();
        // ASE: `f % 1.0` twice on periodic axes (so −1e-17 becomes 0, not 1).
        assert_eq!(wrapped, vec![vec![0.0, 0.25, -0.5], vec![0.5, 0.75, 1.5]]);
    }
}
