//! Fused CPU kernels of the SO(2) layer: (rotate into the edge frame) → radial scaling →
//! per-order linear maps → (rotate back), forward and backward, over chunks of edges.
//!
//! The public entry points are the `forward*` methods of [`crate::so2::So2Convolution`] and
//! [`crate::so2::So2Linear`]; this module holds the candle custom ops behind them.
//!
//! ## Why fused
//! Composed from separate ops, one layer writes and re-reads four edge-sized tensors (rotated,
//! radially scaled, convolved, rotated back) and candle accumulates a gradient for each in the
//! backward pass. Here every rayon task takes a chunk of 128 or 256 edges (by the layer's size),
//! rotates it into a task-local scratch buffer, scales it by the radial weights, runs the GEMMs
//! of every order on the chunk (single-threaded `gemm`, the threads work on different chunks)
//! and rotates the result straight into the output. The backward pass is one op as well: it recomputes
//! the rotated input of the chunk instead of storing it, and writes the gradients of the
//! input and of the radial weights (each written once, never read first: fresh output pages
//! are touched once) and accumulates those of the packed weights.
//!
//! ## Gathered messages
//! The `forward_gather_*` variants ([`MessageGather`]) take node rows `[N, (lmax+1)², C]`
//! and rotate each edge's message (`x[i]`, or `cat(x[src], x[dst])` along channels) into the
//! frame reading its channel halves straight from the node rows: the `[E, (lmax+1)², C_in]`
//! message tensor never exists, not even one edge at a time. Their backward pass rotates each
//! edge's input gradient back and adds it straight into the node rows of a node-sized gradient.
//!
//! ## Deterministic backward
//! The backward pass splits the chunks into one contiguous part per rayon thread. Each part
//! runs its chunks in edge order and accumulates the weight gradient (and, for the gathered
//! variants, the node gradient) in its own buffer, the first part straight into the output;
//! the parts are then added in part order. No atomics and no scheduling-order sums: the
//! gradients are bit-for-bit reproducible for a given thread count.
//!
//! ## Complex products with three multiplications
//! For `m > 0` a convolution computes `y₊ = x₊A − x₋B`, `y₋ = x₋A + x₊B` (`A = W_rᵀ`,
//! `B = W_iᵀ` of fairchem's `fc` weight). With `S = x₊ + x₋` this is
//! `y₊ = S·P₁ − x₋·P₂`, `y₋ = S·P₁ + x₊·P₃` for the packed `P₁ = A`, `P₂ = A + B`, `P₃ = B − A`:
//! three GEMMs instead of four (Gauss's trick), and likewise in the backward pass
//! (`∂S = (g₊ + g₋)P₁ᵀ`, `∂x₊ = ∂S + g₋P₃ᵀ`, `∂x₋ = ∂S − g₊P₂ᵀ`; `∂P₁ = Sᵀ(g₊ + g₋)`,
//! `∂P₂ = −x₋ᵀg₊`, `∂P₃ = x₊ᵀg₋`). The packed weights are built from the fairchem-shaped
//! parameters with differentiable candle ops, so parameter gradients follow automatically.
//!
//! ## Packed weight vector (`LayerShape::weight_len`)
//! `W₀` row-major `[k₀, extra + n₀]` (fairchem's `fc_m0.weight` transposed, extra outputs
//! first), the bias `[extra + n₀]`, then per order `m ≥ 1` the row-major `[k_m, n_m]` matrices
//! `P₁, P₂, P₃` (convolution) or `Wᵀ` (linear), `k_m = (lmax−m+1)·C_in`, `n_m = (lmax−m+1)·C_out`.
//!
//! ## Products
//! On f32 with AVX-512, every forward product and every input-gradient product whose output
//! width is whole 64-column panels multiplies a factor packed once per call
//! ([`crate::linalg::gemm_packed`], `Inputs::pack_products`); the rest, and all weight
//! gradients, go through [`crate::linalg::gemm`].

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::activation::Float;
use crate::buffer::{
    assume_init, split_pieces, uninit_vec, with_cpu_slice, zero_init, zeroed_vec, Overwrite,
};
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};
use crate::linalg::{gemm, gemm_packed, view, PackedRhs, View};
use crate::mapping::SphericalLayout;
use crate::segment::RowIndex;
use crate::so2::{
    contiguous_slice, dispatch_kernel, from_edge_add, from_edge_uninit, to_edge, to_edge_rows,
    EdgeRows, RotatePlan,
};
use crate::wigner::WignerBlocks;

/// Shapes and options of one fused SO(2) layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerShape {
    pub(crate) layout: SphericalLayout,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    /// Extra `m = 0` outputs (convolution only).
    pub(crate) extra: usize,
    /// Complex `m > 0` products (convolution) or one real map for `±m` (linear).
    pub(crate) complex: bool,
    /// The input is l-major and rotated into the edge frames first.
    pub(crate) rotate_in: bool,
    /// The output is rotated back (with fairchem's rescale) to l-major.
    pub(crate) rotate_out: bool,
    /// Radial weights multiply the (rotated) input.
    pub(crate) radial: bool,
}

/// One order `m ≥ 1` in the packed weights.
#[derive(Debug, Clone, Copy)]
struct OrderBlock {
    /// First m-major slot of `+m` (`−m` follows after `n_l` slots).
    slot: usize,
    /// Degrees carrying the order, `lmax − m + 1`.
    n_l: usize,
    /// Offset of the first packed matrix.
    weight: usize,
}

impl LayerShape {
    fn trunc(&self) -> usize {
        self.layout.num_truncated()
    }

    fn rows_in(&self) -> usize {
        if self.rotate_in {
            self.layout.num_coefficients()
        } else {
            self.trunc()
        }
    }

    fn rows_out(&self) -> usize {
        if self.rotate_out {
            self.layout.num_coefficients()
        } else {
            self.trunc()
        }
    }

    fn k0(&self) -> usize {
        self.layout.m_size(0) * self.c_in
    }

    fn n0(&self) -> usize {
        self.layout.m_size(0) * self.c_out
    }

    /// Columns of `W₀`: the extra outputs, then the `m = 0` outputs.
    fn w0_cols(&self) -> usize {
        self.extra + self.n0()
    }

    fn bias_offset(&self) -> usize {
        self.k0() * self.w0_cols()
    }

    fn matrices_per_order(&self) -> usize {
        if self.complex {
            3
        } else {
            1
        }
    }

    fn order_blocks(&self) -> Vec<OrderBlock> {
        let mut offset = self.bias_offset() + self.w0_cols();
        (1..=self.layout.mmax())
            .map(|m| {
                let n_l = self.layout.m_size(m);
                let block = OrderBlock {
                    slot: self.layout.m_offset(m),
                    n_l,
                    weight: offset,
                };
                offset += self.matrices_per_order() * n_l * self.c_in * n_l * self.c_out;
                block
            })
            .collect()
    }

    /// Length of the packed weight vector.
    pub(crate) fn weight_len(&self) -> usize {
        let orders: usize = (1..=self.layout.mmax())
            .map(|m| {
                let n_l = self.layout.m_size(m);
                self.matrices_per_order() * n_l * self.c_in * n_l * self.c_out
            })
            .sum();
        self.bias_offset() + self.w0_cols() + orders
    }

    /// Rows of the radial weights viewed as `[E, R, C_in]`: `R = Σ_m m_size(m)`.
    pub(crate) fn radial_rows(&self) -> usize {
        (0..=self.layout.mmax())
            .map(|m| self.layout.m_size(m))
            .sum()
    }

    /// The m-major slots of every radial row: `[+m slot, −m slot]`, or `[m = 0 slot, MAX]`.
    fn radial_row_slots(&self) -> Vec<[usize; 2]> {
        let mut slots = Vec::with_capacity(self.radial_rows());
        for m in 0..=self.layout.mmax() {
            let (first, n_l) = (self.layout.m_offset(m), self.layout.m_size(m));
            for i in 0..n_l {
                let minus = if m > 0 { first + n_l + i } else { usize::MAX };
                slots.push([first + i, minus]);
            }
        }
        slots
    }

    /// Radial row of every m-major slot (`+m` and `−m` of one degree share a row).
    fn slot_radial_rows(&self) -> Vec<usize> {
        let mut rows = Vec::with_capacity(self.trunc());
        let mut base = 0;
        for m in 0..=self.layout.mmax() {
            let n_l = self.layout.m_size(m);
            rows.extend(base..base + n_l);
            if m > 0 {
                rows.extend(base..base + n_l);
            }
            base += n_l;
        }
        rows
    }

    /// Elements of the forward output: `[E, rows_out, C_out]` then `[E, extra]`.
    fn out_len(&self, edges: usize) -> usize {
        edges * (self.main_row() + self.extra)
    }

    /// Elements of one edge's main output row `[rows_out, C_out]`.
    fn main_row(&self) -> usize {
        self.rows_out() * self.c_out
    }

    /// Edges per task: 128 for layers with fewer than [`SMALL_WEIGHTS`] packed weights, 256
    /// from there, or fewer so that every thread gets at least four tasks. Large chunks
    /// amortise the packing of the weights inside each GEMM call (the
    /// per-order matrices are up to `896 × 896` at lmax 6, C 128, streamed from L3) and, in the
    /// backward pass, the read-modify-write of the weight-gradient accumulator per chunk (20 MB
    /// at lmax 6, mmax 4, C 128); small ones keep the chunk's GEMM operands in L2 (a 128-edge
    /// chunk of m-major rows is 0.6 MB at 4/2/64, 256 edges 1.2 MB, against 1 MB of L2 per
    /// core). Measured (10⁴ edges, two threads, alternating runs of one binary):
    /// - before the sub-block passes ([`SUB_EDGES`]): 256 edges 10–40 % faster than chunks of
    ///   16–53 edges at 4/2/64 and 6/4/128;
    /// - 6/4/128 (5.0 M weights per-edge, 10 M gathered): 512 against 256 edges, gathered
    ///   forward 2.5–4 % and forward+backward 2–5 % faster, per-edge within ±1 %; per-edge
    ///   1024 edges 2–5 % slower than 512;
    /// - 4/2/64 (0.4 M per-edge, 0.8 M gathered): 128 against 256 edges, per-edge
    ///   forward+backward 2–7 % faster (best of 10–15 in six of seven rounds; 64 and 192 edges
    ///   as fast as 128), gathered forward 1–7 % faster, forward and gathered forward+backward
    ///   within the noise; 512 edges 3–6 % slower and 1024 edges 12–20 % slower than 256;
    /// - 4/2/128, eqV2-S's size (1.6 M per-edge, 3.3 M gathered; 2026-11-27, two rounds, best
    ///   of 7, cap forced through a temporary switch): 256 edges against 128, forward+backward
    ///   2–4 % faster (per-edge 578–590 against 599–603 ms, gathered 1126–1136 against
    ///   1160–1179 ms), forwards within the noise; 512 edges as fast as 256 (each faster in one
    ///   of the two rounds), so layers between 1 M and 4 M weights keep 256 edges;
    /// - 6/4/128 once its large products ran Strassen's algorithm ([`crate::linalg::PackedRhs`],
    ///   whose five block sums of the left factor per product read the chunk's rows once more;
    ///   2026-11-27, two rounds, best of 5): 256 against 512 edges, gathered forward 2–3 %
    ///   faster (956 against 978–983 ms), gathered forward+backward 1.6–1.9 %, per-edge forward
    ///   1.5–3 %; 128 edges, gathered forward within the noise of 256 but forward+backward
    ///   1.5–3 % slower. So the 512-edge tier for layers above 4 M weights is gone.
    fn chunk_edges(&self, edges: usize) -> usize {
        let by_tasks = edges.div_ceil(4 * rayon::current_num_threads()).max(1);
        by_tasks.min(fused_chunk_cap(self.weight_len()))
    }
}

/// The most edges per task of a fused SO(2) layer with `packed_weights` packed weights: 128
/// below `SMALL_WEIGHTS` (1 M), 256 from there. A layer runs fewer when that leaves a thread
/// under four tasks; why these sizes is measured in `LayerShape::chunk_edges`. Public so that
/// benchmarks (bench `gemm`) run the layer's chunks.
///
/// ```
/// use matscale_equivariant::so2::fused_chunk_cap;
/// assert_eq!(fused_chunk_cap(410_000), 128); // lmax 4, mmax 2, 64 channels
/// assert_eq!(fused_chunk_cap(5_030_000), 256); // lmax 6, mmax 4, 128 channels
/// ```
pub fn fused_chunk_cap(packed_weights: usize) -> usize {
    if packed_weights < SMALL_WEIGHTS {
        128
    } else {
        256
    }
}

/// Packed weights below which a layer runs chunks of 128 edges (see
/// [`LayerShape::chunk_edges`]).
const SMALL_WEIGHTS: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Small vector kernels (in cache)
// ---------------------------------------------------------------------------------------------

/// `dst[e·n..][..n] = a[a_off + e·a_rs..][..n] + b[b_off + e·b_rs..][..n]` for `rows` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn add_rows_kernel<T: Float>(
    dst: &mut [T],
    n: usize,
    rows: usize,
    a: &[T],
    a_off: usize,
    b_off: usize,
    rs: usize,
    b: &[T],
) {
    for e in 0..rows {
        let d = &mut dst[e * n..(e + 1) * n];
        let x = &a[a_off + e * rs..a_off + e * rs + n];
        let y = &b[b_off + e * rs..b_off + e * rs + n];
        for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
            *d = x + y;
        }
    }
}

dispatch_kernel!(add_rows, add_rows_kernel, (dst: &mut [T], n: usize, rows: usize, a: &[T], a_off: usize, b_off: usize, rs: usize, b: &[T]));

/// `dst[e, s, :] = src[e, s, :] · rad[e, row(s), :]` over a chunk (`dst` may be `src`'s copy).
#[inline(always)]
fn radial_scale_kernel<T: Float>(
    dst: &mut [T],
    src: &[T],
    rad: &[T],
    rows: &[usize],
    num_rows: usize,
    c: usize,
) {
    let trunc = rows.len();
    for ((d, s), r) in dst
        .chunks_exact_mut(trunc * c)
        .zip(src.chunks_exact(trunc * c))
        .zip(rad.chunks_exact(num_rows * c))
    {
        for (slot, &q) in rows.iter().enumerate() {
            let (d, s, r) = (
                &mut d[slot * c..(slot + 1) * c],
                &s[slot * c..(slot + 1) * c],
                &r[q * c..(q + 1) * c],
            );
            for ((d, &s), &r) in d.iter_mut().zip(s).zip(r) {
                *d = s * r;
            }
        }
    }
}

dispatch_kernel!(radial_scale, radial_scale_kernel, (dst: &mut [T], src: &[T], rad: &[T], rows: &[usize], num_rows: usize, c: usize));

/// Radial backward over a chunk: `grad_rad[e, q, :] = Σ_{s: row(s) = q} g[e, s, :] · x[e, s, :]`
/// (writes every element of `grad_rad` for the edges of `g`, reads none, so it may start
/// uninitialised) and then
/// `g[e, s, :] *= rad[e, row(s), :]` (in place). `row_slots[q]` lists the one or two slots
/// (`+m`, `−m`) of radial row `q`, the second `usize::MAX` when there is none.
#[inline(always)]
fn radial_backward_kernel<T: Float>(
    g: &mut [T],
    x: &[T],
    rad: &[T],
    grad_rad: &mut [MaybeUninit<T>],
    row_slots: &[[usize; 2]],
    trunc: usize,
    c: usize,
) {
    let num_rows = row_slots.len();
    for (((g, x), r), gr) in g
        .chunks_exact_mut(trunc * c)
        .zip(x.chunks_exact(trunc * c))
        .zip(rad.chunks_exact(num_rows * c))
        .zip(grad_rad.chunks_exact_mut(num_rows * c))
    {
        for (q, &[s1, s2]) in row_slots.iter().enumerate() {
            let (r, gr) = (&r[q * c..(q + 1) * c], &mut gr[q * c..(q + 1) * c]);
            if s2 == usize::MAX {
                let (g1, x1) = (&mut g[s1 * c..(s1 + 1) * c], &x[s1 * c..(s1 + 1) * c]);
                for (((gr, g), &x), &r) in gr.iter_mut().zip(g1.iter_mut()).zip(x1).zip(r) {
                    gr.write(*g * x);
                    *g *= r;
                }
            } else {
                // Both slots of the row (`+m` and `-m`), in one pass.
                let (lo, hi) = (s1.min(s2), s1.max(s2));
                let (head, tail) = g.split_at_mut(hi * c);
                let (g1, g2) = (&mut head[lo * c..(lo + 1) * c], &mut tail[..c]);
                let (x1, x2) = (&x[lo * c..(lo + 1) * c], &x[hi * c..(hi + 1) * c]);
                for ((((gr, g1), g2), (&x1, &x2)), &r) in gr
                    .iter_mut()
                    .zip(g1.iter_mut())
                    .zip(g2.iter_mut())
                    .zip(x1.iter().zip(x2))
                    .zip(r)
                {
                    gr.write(*g1 * x1 + *g2 * x2);
                    *g1 *= r;
                    *g2 *= r;
                }
            }
        }
    }
}

dispatch_kernel!(radial_backward, radial_backward_kernel, (g: &mut [T], x: &[T], rad: &[T], grad_rad: &mut [MaybeUninit<T>], row_slots: &[[usize; 2]], trunc: usize, c: usize));

/// Copies `n` elements of each of `rows` rows within `buf`, from `src_off + e·rs` to
/// `dst_off + e·rs` (non-overlapping row segments).
fn copy_rows<T: Float>(
    buf: &mut [T],
    rows: usize,
    n: usize,
    rs: usize,
    src_off: usize,
    dst_off: usize,
) {
    for e in 0..rows {
        buf.copy_within(src_off + e * rs..src_off + e * rs + n, dst_off + e * rs);
    }
}

// ---------------------------------------------------------------------------------------------
// Per-chunk forward and backward
// ---------------------------------------------------------------------------------------------

/// Per-task scratch buffers (sized for the largest chunk).
struct Scratch<T> {
    /// m-major input of the chunk (rotated and/or radially scaled), `[ec, trunc, C_in]`.
    xin: Vec<T>,
    /// m-major input before the radial scaling (backward only), `[ec, trunc, C_in]`.
    xr: Vec<T>,
    /// m-major output or output gradient of the chunk, `[ec, trunc, C_out]`.
    y: Vec<T>,
    /// m-major input gradient, `[ec, trunc, C_in]`.
    gx: Vec<T>,
    /// Sums `x₊ + x₋` (forward) / `g₊ + g₋` (`sum_a`) and `x₊ + x₋` (`sum_b`, backward) of
    /// every order block, block after block, each `[ne, n_l · C]` (see [`Inputs::block_sums`]).
    sum_a: Vec<T>,
    sum_b: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new(shape: &LayerShape, ec: usize, backward: bool) -> Self {
        let trunc = shape.trunc();
        // Σ over the orders m > 0 of their degrees n_l, times the wider channel count.
        let wide = (1..=shape.layout.mmax())
            .map(|m| shape.layout.m_size(m))
            .sum::<usize>()
            .max(1)
            * shape.c_in.max(shape.c_out);
        let back = |len: usize| {
            if backward {
                vec![T::zero(); len]
            } else {
                Vec::new()
            }
        };
        Self {
            xin: vec![T::zero(); ec * trunc * shape.c_in],
            xr: back(ec * trunc * shape.c_in),
            y: vec![T::zero(); ec * trunc * shape.c_out],
            gx: back(ec * trunc * shape.c_in),
            sum_a: vec![T::zero(); ec * wide],
            sum_b: back(ec * wide),
        }
    }
}

/// Node rows gathered into each edge's message by the gather variants: edge `e` reads node
/// `source[e]` into channels `0..c_node` and, for a pair, node `target[e]` into channels
/// `c_node..2·c_node` (EquiformerV2's `cat(x[src], x[dst])`).
#[derive(Clone, Copy)]
struct Gather<'a> {
    source: &'a [u32],
    target: Option<&'a [u32]>,
    /// Channels of a node row; `C_in = c_node · (1 or 2)`.
    c_node: usize,
    nodes: usize,
}

/// The right factors of the layer's weight products, packed once per call
/// ([`Inputs::pack_products`]); `None` where a product keeps the `gemm` crate.
struct PackedWeights {
    m0: Option<PackedRhs>,
    /// Per order block: `[P₁, −P₂, P₃]` (complex) or `[W]`.
    blocks: Vec<Vec<Option<PackedRhs>>>,
}

/// `dst[off..][m×n] (+)= lhs · (scale · rhs)` with `(dst, off, row stride, accumulate)`:
/// through [`gemm_packed`] when the packed `scale · rhs` exists, else [`gemm()`].
fn product<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, off, rs, accumulate): (&mut [T], usize, usize, bool),
    lhs: View<'_, T>,
    (rhs, scale, packed): (View<'_, T>, T, Option<&PackedRhs>),
) {
    match packed {
        Some(p) => gemm_packed((m, n, k), dst, off, rs, accumulate, lhs, p),
        None => gemm((m, n, k), dst, off, rs, accumulate, lhs, rhs, scale),
    }
}

/// `gw[off..][k×n] += lhs · (scale · g)` with `(gw, off, row stride)`, for the weight
/// gradient's products `xᵀ·g` (`lhs` a transposed view of the chunk's rows, `g` its
/// `[ne × n]` output-gradient rows). Through [`gemm_packed`] on `g` packed for this one
/// product where [`PackedRhs::pack`] takes it and either runs Strassen's algorithm (a chunk
/// of an even number of edges, at least [`crate::linalg::STRASSEN_MIN_DEPTH`]) or the depth
/// is at most [`PLAIN_PACKED_WEIGHT_GRAD_DEPTH`]; else [`gemm()`]. Packing `g` costs `ne · n`
/// copies (7/4 of that for Strassen's block combinations) against the product's `2·k·n·ne`
/// operations.
fn weight_product<T: Float>(
    (k, n, ne): (usize, usize, usize),
    (gw, off, rs): (&mut [T], usize, usize),
    lhs: View<'_, T>,
    (g, scale): (View<'_, T>, T),
) {
    let packed = (ne <= PLAIN_PACKED_WEIGHT_GRAD_DEPTH || PackedRhs::strassen_fits((ne, n)))
        .then(|| PackedRhs::pack(g, (ne, n), scale))
        .flatten();
    match packed {
        Some(p) => gemm_packed((k, n, ne), gw, off, rs, true, lhs, &p),
        None => gemm((k, n, ne), gw, off, rs, true, lhs, g, scale),
    }
}

/// The deepest weight-gradient product (edges per chunk) that runs the plain packed tile
/// rather than the `gemm` crate when Strassen's algorithm does not apply: `bench gemm`, one
/// thread, the plain packed tile against the crate: 4 / 2 / 64 at 128 edges 1–3 % faster,
/// 6 / 4 / 128 at 256 edges 2–4 % slower (2026-11-27).
const PLAIN_PACKED_WEIGHT_GRAD_DEPTH: usize = 128;

/// Inputs shared by all chunks.
struct Inputs<'a, T> {
    shape: LayerShape,
    /// Per-edge input `[E, rows_in, C_in]`, or node rows `[N, full, c_node]` with `gather`.
    x: &'a [T],
    gather: Option<Gather<'a>>,
    radial: Option<&'a [T]>,
    weights: &'a [T],
    wigner: Option<&'a [T]>,
    plan_in: Option<RotatePlan<T>>,
    plan_out: Option<RotatePlan<T>>,
    radial_rows: Vec<usize>,
    /// Slots of every radial row (see [`LayerShape::radial_row_slots`]).
    radial_slots: Vec<[usize; 2]>,
    blocks: Vec<OrderBlock>,
}

impl<'a, T: Float> Inputs<'a, T> {
    fn new(
        shape: LayerShape,
        x: &'a [T],
        radial: Option<&'a [T]>,
        weights: &'a [T],
        wigner: Option<&'a [T]>,
    ) -> Self {
        Self {
            shape,
            x,
            gather: None,
            radial,
            weights,
            wigner,
            plan_in: shape
                .rotate_in
                .then(|| RotatePlan::new(shape.layout, false)),
            plan_out: shape
                .rotate_out
                .then(|| RotatePlan::new(shape.layout, true)),
            radial_rows: shape.slot_radial_rows(),
            radial_slots: shape.radial_row_slots(),
            blocks: shape.order_blocks(),
        }
    }

    fn wigner_chunk(&self, e0: usize, ne: usize) -> &[T] {
        let wl = self.shape.layout.wigner_len();
        self.wigner.map_or(&[][..], |w| &w[e0 * wl..(e0 + ne) * wl])
    }

    fn radial_chunk(&self, e0: usize, ne: usize) -> Option<&[T]> {
        let rl = self.shape.radial_rows() * self.shape.c_in;
        self.radial.map(|r| &r[e0 * rl..(e0 + ne) * rl])
    }

    /// `sums[block b][s0 + e, :] = x[e, +m rows] + x[e, −m rows]` for the `sn` edges of `x`
    /// (`[sn, trunc, c]`, edges `s0..s0 + sn` of a chunk of `ne`): the left operand of the
    /// first product of the three-product complex GEMM, block after block, each `[ne, n_l·c]`.
    /// Nothing without complex weights.
    fn block_sums(&self, sums: &mut [T], ne: usize, (s0, sn): (usize, usize), x: &[T], c: usize) {
        if !self.shape.complex {
            return;
        }
        let rs = self.shape.trunc() * c;
        let mut off = 0;
        for b in &self.blocks {
            let k = b.n_l * c;
            let (p, m) = (b.slot * c, (b.slot + b.n_l) * c);
            add_rows(
                &mut sums[off + s0 * k..off + (s0 + sn) * k],
                k,
                sn,
                x,
                p,
                m,
                rs,
                x,
            );
            off += ne * k;
        }
    }

    /// The packed weights with every matrix transposed where it lies (`W₀` `[k₀, w₀]` →
    /// `[w₀, k₀]`, each order's `[k, n]` → `[n, k]`; same offsets; the bias copied): the
    /// input-gradient products `g·Wᵀ` then read a contiguous right operand, which `gemm`
    /// multiplies 5–10 % faster than the transposed view of the forward's layout (bench `gemm`).
    fn transposed_weights(&self) -> Vec<T> {
        let s = &self.shape;
        let w = self.weights;
        let mut out = vec![T::zero(); w.len()];
        let (k0, wc, bias) = (s.k0(), s.w0_cols(), s.bias_offset());
        transpose(&mut out[..bias], &w[..bias], k0, wc);
        out[bias..bias + wc].copy_from_slice(&w[bias..bias + wc]);
        for b in &self.blocks {
            let kn = b.n_l * s.c_in * b.n_l * s.c_out;
            for i in 0..s.matrices_per_order() {
                let r = b.weight + i * kn..b.weight + (i + 1) * kn;
                transpose(&mut out[r.clone()], &w[r], b.n_l * s.c_in, b.n_l * s.c_out);
            }
        }
        out
    }

    /// Rotates the chunk's input into the edge frames: `out` `[ne, trunc, C_in]`, read from
    /// the per-edge rows or, with `gather`, straight from the node rows.
    fn rotate_in_chunk(&self, e0: usize, ne: usize, out: &mut [T]) {
        let s = &self.shape;
        let plan = self.plan_in.as_ref().expect("rotate_in has a plan");
        match &self.gather {
            None => {
                let xc = &self.x[e0 * s.rows_in() * s.c_in..(e0 + ne) * s.rows_in() * s.c_in];
                to_edge(plan, xc, self.wigner_chunk(e0, ne), out, s.c_in);
            }
            Some(ga) => {
                let rows = EdgeRows::Gathered {
                    source: &ga.source[e0..e0 + ne],
                    target: ga.target.map(|t| &t[e0..e0 + ne]),
                };
                let out = &mut out[..ne * s.trunc() * s.c_in];
                to_edge_rows(
                    plan,
                    self.x,
                    self.wigner_chunk(e0, ne),
                    rows,
                    out,
                    ga.c_node,
                );
            }
        }
    }

    /// Forward of one chunk of `ne` edges from edge `e0`: writes every element of `out`
    /// (`[ne, rows_out, C_out]`, uninitialised on entry) and `extra` (`[ne, extra]`).
    fn forward_chunk(
        &self,
        e0: usize,
        ne: usize,
        out: &mut [MaybeUninit<T>],
        extra: &mut [T],
        scr: &mut Scratch<T>,
        packed: &PackedWeights,
    ) {
        let s = &self.shape;
        let (trunc, c_in, c_out) = (s.trunc(), s.c_in, s.c_out);
        let Scratch { xin, y, sum_a, .. } = scr;
        let rs_in = trunc * c_in;
        let rr = s.radial_rows() * c_in;
        let rad = self.radial_chunk(e0, ne);
        // Input in the edge frame, radially scaled, and the order blocks' sums: sub-block by
        // sub-block, so that each pass after the rotation reads what is still in cache.
        let xin: &[T] = if self.plan_in.is_some() || rad.is_some() {
            let buf = &mut xin[..ne * rs_in];
            for (s0, sn) in sub_blocks(ne) {
                let piece = &mut buf[s0 * rs_in..(s0 + sn) * rs_in];
                let rad = rad.map(|r| &r[s0 * rr..(s0 + sn) * rr]);
                match (self.plan_in.is_some(), rad) {
                    (true, rad) => {
                        self.rotate_in_chunk(e0 + s0, sn, piece);
                        if let Some(rad) = rad {
                            scale_in_place(piece, rad, &self.radial_rows, s.radial_rows(), c_in);
                        }
                    }
                    (false, Some(rad)) => {
                        let xc = &self.x[(e0 + s0) * rs_in..(e0 + s0 + sn) * rs_in];
                        radial_scale(piece, xc, rad, &self.radial_rows, s.radial_rows(), c_in);
                    }
                    (false, None) => unreachable!("rotated or radially scaled"),
                }
                self.block_sums(sum_a, ne, (s0, sn), piece, c_in);
            }
            buf
        } else {
            let xc = &self.x[e0 * rs_in..(e0 + ne) * rs_in];
            self.block_sums(sum_a, ne, (0, ne), xc, c_in);
            xc
        };
        match &self.plan_out {
            Some(plan) => {
                let y = &mut y[..ne * trunc * c_out];
                self.so2_forward(ne, xin, y, extra, sum_a, packed);
                from_edge_uninit(plan, y, self.wigner_chunk(e0, ne), out, c_out);
            }
            None => self.so2_forward(ne, xin, zero_init(out), extra, sum_a, packed),
        }
    }

    /// The SO(2) linear maps of one chunk: m-major `xin` → m-major `y` (+ `extra`), with the
    /// order blocks' sums `x₊ + x₋` of `xin` in `sums` ([`Self::block_sums`]).
    #[allow(clippy::too_many_arguments)]
    fn so2_forward(
        &self,
        ne: usize,
        xin: &[T],
        y: &mut [T],
        extra: &mut [T],
        sums: &[T],
        packed: &PackedWeights,
    ) {
        let s = &self.shape;
        let (trunc, c_in, c_out) = (s.trunc(), s.c_in, s.c_out);
        let (rs_in, rs_out) = (trunc * c_in, trunc * c_out);
        let (k0, n0, wc, ex) = (s.k0(), s.n0(), s.w0_cols(), s.extra);
        let w = self.weights;
        let bias = &w[s.bias_offset()..s.bias_offset() + wc];
        // m = 0: bias, then accumulate the GEMM on top.
        for e in 0..ne {
            y[e * rs_out..e * rs_out + n0].copy_from_slice(&bias[ex..]);
            extra[e * ex..(e + 1) * ex].copy_from_slice(&bias[..ex]);
        }
        let one = T::one();
        product(
            (ne, n0, k0),
            (y, 0, rs_out, true),
            view(xin, 0, rs_in, 1),
            (view(w, ex, wc, 1), one, packed.m0.as_ref()),
        );
        if ex > 0 {
            gemm(
                (ne, ex, k0),
                extra,
                0,
                ex,
                true,
                view(xin, 0, rs_in, 1),
                view(w, 0, wc, 1),
                one,
            );
        }
        let mut sum_off = 0;
        for (b, pk) in self.blocks.iter().zip(&packed.blocks) {
            let (k, n) = (b.n_l * c_in, b.n_l * c_out);
            let (xp, xm) = (b.slot * c_in, (b.slot + b.n_l) * c_in);
            let (yp, ym) = (b.slot * c_out, (b.slot + b.n_l) * c_out);
            if s.complex {
                let (p1, p2, p3) = (b.weight, b.weight + k * n, b.weight + 2 * k * n);
                product(
                    (ne, n, k),
                    (y, yp, rs_out, false),
                    view(sums, sum_off, k, 1),
                    (view(w, p1, n, 1), one, pk[0].as_ref()),
                );
                copy_rows(y, ne, n, rs_out, yp, ym);
                product(
                    (ne, n, k),
                    (y, yp, rs_out, true),
                    view(xin, xm, rs_in, 1),
                    (view(w, p2, n, 1), T::from_f64(-1.0), pk[1].as_ref()),
                );
                product(
                    (ne, n, k),
                    (y, ym, rs_out, true),
                    view(xin, xp, rs_in, 1),
                    (view(w, p3, n, 1), one, pk[2].as_ref()),
                );
                sum_off += ne * k;
            } else {
                for (xo, yo) in [(xp, yp), (xm, ym)] {
                    product(
                        (ne, n, k),
                        (y, yo, rs_out, false),
                        view(xin, xo, rs_in, 1),
                        (view(w, b.weight, n, 1), one, pk[0].as_ref()),
                    );
                }
            }
        }
    }

    /// The right factors of the layer's products with the weights, packed once for the whole
    /// call ([`PackedRhs`]), each where the CPU and its shape allow (f32, AVX-512, output
    /// columns a multiple of 64): the order-0 matrix, then per order block `[P₁, −P₂, P₃]`
    /// (complex) or its one matrix. From the packed weights `w` for the forward's products,
    /// from their transposes ([`Self::transposed_weights`], `transposed`) for the backward's
    /// input gradient. The `gemm` crate would pack them again for every chunk of edges.
    fn pack_products(&self, w: &[T], transposed: bool) -> PackedWeights {
        let s = &self.shape;
        let (c_in, c_out, k0, n0, ex) = (s.c_in, s.c_out, s.k0(), s.n0(), s.extra);
        let one = T::one();
        // (offset, row stride, rows, columns, scale) of every product's right factor.
        let mut specs = vec![if transposed {
            (ex * k0, k0, n0, k0, one)
        } else {
            (ex, s.w0_cols(), k0, n0, one)
        }];
        for b in &self.blocks {
            let (k, n) = (b.n_l * c_in, b.n_l * c_out);
            let (rows, cols) = if transposed { (n, k) } else { (k, n) };
            let parts: &[(usize, f64)] = if s.complex {
                &[(0, 1.0), (k * n, -1.0), (2 * k * n, 1.0)]
            } else {
                &[(0, 1.0)]
            };
            for &(off, scale) in parts {
                specs.push((b.weight + off, cols, rows, cols, T::from_f64(scale)));
            }
        }
        let mut packed: Vec<Option<PackedRhs>> = specs
            .into_par_iter()
            .map(|(off, rs, rows, cols, scale)| {
                PackedRhs::pack(view(w, off, rs, 1), (rows, cols), scale)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let m0 = packed.pop().flatten();
        let per_block = if s.complex { 3 } else { 1 };
        let blocks = self
            .blocks
            .iter()
            .map(|_| (0..per_block).map(|_| packed.pop().flatten()).collect())
            .collect();
        PackedWeights { m0, blocks }
    }

    /// Backward of one chunk: writes every element of `gx` (`GxChunk::Rows`,
    /// `[ne, rows_in, C_in]`; with `gather`, `GxChunk::Nodes`: adds into the node rows
    /// `[N, full, c_node]` instead) and of `grad_rad` (`[ne, R·C_in]`; both uninitialised on
    /// entry), and accumulates the packed-weight gradient into `gw`. `wt` holds the packed
    /// weights with every matrix transposed ([`Inputs::transposed_weights`]), the right
    /// operands of the input-gradient products, and `packed_t` the same packed for
    /// [`gemm_packed`] where it applies.
    #[allow(clippy::too_many_arguments)]
    fn backward_chunk(
        &self,
        e0: usize,
        ne: usize,
        (g, g_extra): (&[T], Option<&[T]>),
        gx: GxChunk<'_, T>,
        grad_rad: &mut [MaybeUninit<T>],
        (gw, wt, packed_t): (&mut [T], &[T], &PackedWeights),
        scr: &mut Scratch<T>,
    ) {
        let s = &self.shape;
        let (trunc, c_in, c_out) = (s.trunc(), s.c_in, s.c_out);
        let (rs_in, rs_out) = (trunc * c_in, trunc * c_out);
        let (k0, n0, wc, ex) = (s.k0(), s.n0(), s.w0_cols(), s.extra);
        let one = T::one();
        let Scratch {
            xin,
            xr: xr_buf,
            y,
            gx: gxs,
            sum_a,
            sum_b,
        } = scr;
        let rr = s.radial_rows() * c_in;
        // Output gradient in the edge frame (adjoint of the rotation back, with its rescale),
        // and its order blocks' sums `g₊ + g₋`, sub-block by sub-block.
        let main_len = s.rows_out() * c_out;
        let g_main = &g[e0 * main_len..(e0 + ne) * main_len];
        let g_extra = g_extra
            .filter(|_| ex > 0)
            .map(|ge| &ge[e0 * ex..(e0 + ne) * ex]);
        let gy: &[T] = match &self.plan_out {
            Some(plan) => {
                let buf = &mut y[..ne * rs_out];
                for (s0, sn) in sub_blocks(ne) {
                    let piece = &mut buf[s0 * rs_out..(s0 + sn) * rs_out];
                    let gm = &g_main[s0 * main_len..(s0 + sn) * main_len];
                    to_edge(plan, gm, self.wigner_chunk(e0 + s0, sn), piece, c_out);
                    self.block_sums(sum_a, ne, (s0, sn), piece, c_out);
                }
                buf
            }
            None => {
                self.block_sums(sum_a, ne, (0, ne), g_main, c_out);
                g_main
            }
        };
        // Recomputed input before (xr) and after (xs) the radial scaling, and the order
        // blocks' sums `xs₊ + xs₋`, sub-block by sub-block.
        let rad = self.radial_chunk(e0, ne);
        let xr: &[T] = match &self.plan_in {
            Some(_) => {
                let buf = &mut xr_buf[..ne * rs_in];
                for (s0, sn) in sub_blocks(ne) {
                    let piece = &mut buf[s0 * rs_in..(s0 + sn) * rs_in];
                    self.rotate_in_chunk(e0 + s0, sn, piece);
                    if rad.is_none() {
                        self.block_sums(sum_b, ne, (s0, sn), piece, c_in);
                    }
                }
                buf
            }
            None => {
                let xc = &self.x[e0 * rs_in..(e0 + ne) * rs_in];
                if rad.is_none() {
                    self.block_sums(sum_b, ne, (0, ne), xc, c_in);
                }
                xc
            }
        };
        let xs: &[T] = match rad {
            Some(rad) => {
                let buf = &mut xin[..ne * rs_in];
                for (s0, sn) in sub_blocks(ne) {
                    let piece = &mut buf[s0 * rs_in..(s0 + sn) * rs_in];
                    let (xp, rp) = (
                        &xr[s0 * rs_in..(s0 + sn) * rs_in],
                        &rad[s0 * rr..(s0 + sn) * rr],
                    );
                    radial_scale(piece, xp, rp, &self.radial_rows, s.radial_rows(), c_in);
                    self.block_sums(sum_b, ne, (s0, sn), piece, c_in);
                }
                buf
            }
            None => xr,
        };
        let gxs = &mut gxs[..ne * trunc * c_in];
        // m = 0.
        product(
            (ne, k0, n0),
            (gxs, 0, rs_in, false),
            view(gy, 0, rs_out, 1),
            (view(wt, ex * k0, k0, 1), one, packed_t.m0.as_ref()),
        );
        if let Some(g_extra) = g_extra {
            gemm(
                (ne, k0, ex),
                gxs,
                0,
                rs_in,
                true,
                view(g_extra, 0, ex, 1),
                view(wt, 0, k0, 1),
                one,
            );
            gemm(
                (k0, ex, ne),
                gw,
                0,
                wc,
                true,
                view(xs, 0, 1, rs_in),
                view(g_extra, 0, ex, 1),
                one,
            );
        }
        weight_product(
            (k0, n0, ne),
            (gw, ex, wc),
            view(xs, 0, 1, rs_in),
            (view(gy, 0, rs_out, 1), one),
        );
        let gb = s.bias_offset();
        for e in 0..ne {
            if let Some(g_extra) = g_extra {
                for (acc, &v) in gw[gb..gb + ex]
                    .iter_mut()
                    .zip(&g_extra[e * ex..(e + 1) * ex])
                {
                    *acc += v;
                }
            }
            for (acc, &v) in gw[gb + ex..gb + wc]
                .iter_mut()
                .zip(&gy[e * rs_out..e * rs_out + n0])
            {
                *acc += v;
            }
        }
        // m > 0, with the sums Sg = g₊ + g₋ (`sum_a`) and S = xs₊ + xs₋ (`sum_b`) of each block.
        let (mut sa, mut sb) = (0, 0);
        for (b, pk) in self.blocks.iter().zip(&packed_t.blocks) {
            let (k, n) = (b.n_l * c_in, b.n_l * c_out);
            let (xp, xm) = (b.slot * c_in, (b.slot + b.n_l) * c_in);
            let (yp, ym) = (b.slot * c_out, (b.slot + b.n_l) * c_out);
            if s.complex {
                let (p1, p2, p3) = (b.weight, b.weight + k * n, b.weight + 2 * k * n);
                let (sum_a, sum_b) = (&sum_a[sa..sa + ne * n], &sum_b[sb..sb + ne * k]);
                (sa, sb) = (sa + ne * n, sb + ne * k);
                product(
                    (ne, k, n),
                    (gxs, xp, rs_in, false),
                    view(sum_a, 0, n, 1),
                    (view(wt, p1, k, 1), one, pk[0].as_ref()),
                );
                copy_rows(gxs, ne, k, rs_in, xp, xm);
                product(
                    (ne, k, n),
                    (gxs, xp, rs_in, true),
                    view(gy, ym, rs_out, 1),
                    (view(wt, p3, k, 1), one, pk[2].as_ref()),
                );
                product(
                    (ne, k, n),
                    (gxs, xm, rs_in, true),
                    view(gy, yp, rs_out, 1),
                    (view(wt, p2, k, 1), T::from_f64(-1.0), pk[1].as_ref()),
                );
                weight_product(
                    (k, n, ne),
                    (gw, p1, n),
                    view(sum_b, 0, 1, k),
                    (view(sum_a, 0, n, 1), one),
                );
                weight_product(
                    (k, n, ne),
                    (gw, p2, n),
                    view(xs, xm, 1, rs_in),
                    (view(gy, yp, rs_out, 1), T::from_f64(-1.0)),
                );
                weight_product(
                    (k, n, ne),
                    (gw, p3, n),
                    view(xs, xp, 1, rs_in),
                    (view(gy, ym, rs_out, 1), one),
                );
            } else {
                for (xo, yo) in [(xp, yp), (xm, ym)] {
                    product(
                        (ne, k, n),
                        (gxs, xo, rs_in, false),
                        view(gy, yo, rs_out, 1),
                        (view(wt, b.weight, k, 1), one, pk[0].as_ref()),
                    );
                    weight_product(
                        (k, n, ne),
                        (gw, b.weight, n),
                        view(xs, xo, 1, rs_in),
                        (view(gy, yo, rs_out, 1), one),
                    );
                }
            }
        }
        if rad.is_none() {
            assert!(
                grad_rad.is_empty(),
                "a radial gradient without radial weights"
            );
        }
        // Sub-block by sub-block, while it is in cache: the radial weights' gradient and the
        // gradient before the scaling (in place), then back to the input layout (adjoint of
        // the rotation into the frame, no rescale).
        let radial = |(s0, sn): (usize, usize), gp: &mut [T], grad_rad: &mut [MaybeUninit<T>]| {
            if let Some(rad) = rad {
                let (xp, rp) = (
                    &xr[s0 * rs_in..(s0 + sn) * rs_in],
                    &rad[s0 * rr..(s0 + sn) * rr],
                );
                let gr = &mut grad_rad[s0 * rr..(s0 + sn) * rr];
                radial_backward(gp, xp, rp, gr, &self.radial_slots, trunc, c_in);
            }
        };
        match (&self.plan_in, &self.gather, gx) {
            (Some(plan), None, GxChunk::Rows(gx)) => {
                let full_row = s.rows_in() * c_in;
                for (s0, sn) in sub_blocks(ne) {
                    let gp = &mut gxs[s0 * rs_in..(s0 + sn) * rs_in];
                    radial((s0, sn), gp, grad_rad);
                    let out = &mut gx[s0 * full_row..(s0 + sn) * full_row];
                    from_edge_uninit(plan, gp, self.wigner_chunk(e0 + s0, sn), out, c_in);
                }
            }
            (Some(plan), Some(ga), GxChunk::Nodes(gx)) => {
                // Back to the l-major message, added straight into its node rows.
                for (s0, sn) in sub_blocks(ne) {
                    let gp = &mut gxs[s0 * rs_in..(s0 + sn) * rs_in];
                    radial((s0, sn), gp, grad_rad);
                    let (a, b) = (e0 + s0, e0 + s0 + sn);
                    let rows = EdgeRows::Gathered {
                        source: &ga.source[a..b],
                        target: ga.target.map(|t| &t[a..b]),
                    };
                    let w = self.wigner_chunk(a, sn);
                    from_edge_add(plan, gp, w, rows, gx, ga.c_node, sn);
                }
            }
            (None, _, GxChunk::Rows(gx)) => {
                radial((0, ne), gxs, grad_rad);
                assert_eq!(
                    gx.len(),
                    gxs.len(),
                    "unrotated input rows are the m-major rows"
                );
                gx.put(0, gxs);
            }
            _ => unreachable!("node gradients come with `gather`, which rotates into the frame"),
        }
    }
}

/// `x[e, s, :] *= rad[e, row(s), :]` in place.
#[inline(always)]
fn scale_in_place_kernel<T: Float>(
    x: &mut [T],
    rad: &[T],
    rows: &[usize],
    num_rows: usize,
    c: usize,
) {
    let trunc = rows.len();
    for (xe, re) in x
        .chunks_exact_mut(trunc * c)
        .zip(rad.chunks_exact(num_rows * c))
    {
        for (slot, &q) in rows.iter().enumerate() {
            for (v, &r) in xe[slot * c..(slot + 1) * c]
                .iter_mut()
                .zip(&re[q * c..(q + 1) * c])
            {
                *v *= r;
            }
        }
    }
}

dispatch_kernel!(scale_in_place, scale_in_place_kernel, (x: &mut [T], rad: &[T], rows: &[usize], num_rows: usize, c: usize));

/// Edges per sub-block of a chunk's passes before and after its GEMMs (rotation, radial
/// scaling, order-block sums; radial gradient, rotation back): each pass over a sub-block
/// reads what the previous one wrote while it is still in L1/L2 (8 edges are 39 KB of m-major
/// rows at lmax 4, mmax 2, C 64 and 176 KB at lmax 6, mmax 4, C 128), where whole chunks
/// (128 or 256 edges, 0.6–5.6 MB) would go to L3 or memory between passes.
const SUB_EDGES: usize = 8;

/// `(first edge, edge count)` of the sub-blocks of a chunk of `ne` edges.
fn sub_blocks(ne: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..ne)
        .step_by(SUB_EDGES)
        .map(move |s0| (s0, SUB_EDGES.min(ne - s0)))
}

/// `(first edge, edge count)` of every chunk: at most `ec` edges each, as even as possible
/// (sizes differ by at most one), and a multiple of `parts` chunks where there are enough
/// edges, so that splitting them into `parts` runs of consecutive chunks (the backward pass)
/// gives every part the same work to within `parts` edges. A trailing short chunk would leave
/// one thread idle for most of a chunk: 6 % of the backward pass at 10⁴ edges and 2 threads.
fn chunks(edges: usize, ec: usize, parts: usize) -> Vec<(usize, usize)> {
    let n = edges
        .div_ceil(ec)
        .div_ceil(parts.max(1))
        .saturating_mul(parts.max(1))
        .min(edges)
        .max(1);
    let (base, longer) = (edges / n, edges % n);
    let mut e0 = 0;
    (0..n)
        .map(|i| {
            let ne = base + usize::from(i < longer);
            e0 += ne;
            (e0 - ne, ne)
        })
        .collect()
}

fn forward<T: Float>(inputs: &Inputs<'_, T>, edges: usize) -> Vec<T> {
    let s = &inputs.shape;
    let mut out = uninit_vec::<T>(s.out_len(edges));
    let (main, extra) = out.split_at_mut(edges * s.rows_out() * s.c_out);
    forward_into(inputs, edges, main, extra);
    // SAFETY: `forward_into` initialised all of `main` and `extra`, which make up `out`.
    unsafe { assume_init(out) }
}

/// The forward pass into `main` (`[E, rows_out, C_out]`) and `extra` (`[E, extra]`), which it
/// initialises in full: each task writes its chunk's rows of `main` (the rotation back, or the
/// SO(2) maps after a zero-fill when the output stays in the edge frame) and zero-fills its
/// piece of `extra` just before the maps accumulate into it.
fn forward_into<T: Float>(
    inputs: &Inputs<'_, T>,
    edges: usize,
    main: &mut [MaybeUninit<T>],
    extra: &mut [MaybeUninit<T>],
) {
    let s = &inputs.shape;
    if edges == 0 {
        return;
    }
    let ec = s.chunk_edges(edges);
    let chunks = chunks(edges, ec, rayon::current_num_threads());
    let main_row = s.rows_out() * s.c_out;
    let mains = split_pieces(
        main,
        &chunks.iter().map(|c| c.1 * main_row).collect::<Vec<_>>(),
    );
    let extras = split_pieces(
        extra,
        &chunks.iter().map(|c| c.1 * s.extra).collect::<Vec<_>>(),
    );
    let min_len = crate::buffer::min_task_len(chunks.len());
    let packed = inputs.pack_products(inputs.weights, false);
    chunks
        .into_par_iter()
        .zip(mains)
        .zip(extras)
        .with_min_len(min_len)
        .for_each_init(
            || Scratch::new(s, ec, false),
            |scr, (((e0, ne), o), x)| {
                inputs.forward_chunk(e0, ne, o, zero_init(x), scr, &packed);
            },
        );
}

/// Where one backward chunk writes the input gradient.
enum GxChunk<'a, T> {
    /// The chunk's per-edge rows, uninitialised: the chunk writes every element.
    Rows(&'a mut [MaybeUninit<T>]),
    /// The (part's) node gradient, which the chunk adds into.
    Nodes(&'a mut [T]),
}

/// Where a backward part writes the input gradient.
enum GxPart<'a, T> {
    /// The per-edge gradient rows of the part's edges, initialised chunk by chunk.
    Edges(&'a mut [MaybeUninit<T>]),
    /// The node gradient, accumulated (the first part, with `gather`).
    Nodes(&'a mut [T]),
    /// A node gradient of its own, summed into the output afterwards (the other parts, with
    /// `gather`).
    Own,
}

/// Backward: `[gx | grad_radial (E·R·C_in, if radial) | g_weights]`, `gx` per edge
/// (`E·rows_in·C_in`) or, with `gather`, per node (`N·full·c_node`), from the gradient `g` of
/// the main output `[E, rows_out, C_out]` and `g_extra` of the extra `m = 0` outputs
/// `[E, extra]` (`None`: zero).
///
/// Deterministic: the chunks are split into one contiguous part per rayon thread; each part
/// runs its chunks in order and accumulates the weight gradient (and, with `gather`, the node
/// gradient) in its own buffer (the first part straight into the output); the parts are then
/// summed in part order. No atomics, and the result depends only on the thread count.
///
/// The per-edge gradients (`gx` without `gather`, `grad_radial`) are written in full by the
/// chunks (the rotation back and the radial kernel write every element of their rows), so
/// they start uninitialised, with no zero-fill.
fn backward<T: Float>(
    inputs: &Inputs<'_, T>,
    g: &[T],
    g_extra: Option<&[T]>,
    edges: usize,
) -> Vec<T> {
    let s = &inputs.shape;
    let gather = inputs.gather.is_some();
    let gx_row = s.rows_in() * s.c_in;
    let gx_len = match &inputs.gather {
        Some(ga) => ga.nodes * s.rows_in() * ga.c_node,
        None => edges * gx_row,
    };
    let rad_row = if s.radial {
        s.radial_rows() * s.c_in
    } else {
        0
    };
    let wlen = s.weight_len();
    let mut out = uninit_vec::<T>(gx_len + edges * rad_row + wlen);
    let (gx_all, rest) = out.split_at_mut(gx_len);
    let (rad_all, gw_out) = rest.split_at_mut(edges * rad_row);
    let gw_out = zero_init(gw_out);
    if edges == 0 {
        zero_init(gx_all);
        // SAFETY: all three parts (the radial part is empty) were zero-filled.
        return unsafe { assume_init(out) };
    }
    let ec = s.chunk_edges(edges);
    let chunks = chunks(edges, ec, rayon::current_num_threads());
    let n_parts = rayon::current_num_threads().clamp(1, chunks.len());
    let wt = inputs.transposed_weights();
    let packed_t = inputs.pack_products(&wt, true);
    let bounds: Vec<usize> = (0..=n_parts).map(|p| p * chunks.len() / n_parts).collect();
    let part_edges: Vec<usize> = (0..n_parts)
        .map(|p| chunks[bounds[p]..bounds[p + 1]].iter().map(|c| c.1).sum())
        .collect();
    let rads = split_pieces(
        rad_all,
        &part_edges.iter().map(|n| n * rad_row).collect::<Vec<_>>(),
    );
    let gx_parts: Vec<GxPart<'_, T>> = if gather {
        std::iter::once(GxPart::Nodes(zero_init(gx_all)))
            .chain((1..n_parts).map(|_| GxPart::Own))
            .collect()
    } else {
        split_pieces(
            gx_all,
            &part_edges.iter().map(|n| n * gx_row).collect::<Vec<_>>(),
        )
        .into_iter()
        .map(GxPart::Edges)
        .collect()
    };
    let gw_parts: Vec<Option<&mut [T]>> = std::iter::once(Some(gw_out))
        .chain((1..n_parts).map(|_| None))
        .collect();
    let partials: Vec<PartBuffers<T>> = (0..n_parts)
        .into_par_iter()
        .zip(gx_parts)
        .zip(gw_parts)
        .zip(rads)
        .map(|(((p, mut gx), gw), rad)| {
            let mut own_gx = matches!(gx, GxPart::Own).then(|| zeroed_vec::<T>(gx_len));
            let mut own_gw = gw.is_none().then(|| vec![T::zero(); wlen]);
            let gw = match (gw, own_gw.as_mut()) {
                (Some(gw), _) => gw,
                (None, Some(own)) => own.as_mut_slice(),
                (None, None) => unreachable!("a part without an output slice owns a buffer"),
            };
            let mut scr = Scratch::new(s, ec, true);
            let mut local = 0;
            for &(e0, ne) in &chunks[bounds[p]..bounds[p + 1]] {
                let gx_chunk = match (&mut gx, own_gx.as_mut()) {
                    (GxPart::Edges(rows), _) => {
                        GxChunk::Rows(&mut rows[local * gx_row..(local + ne) * gx_row])
                    }
                    (GxPart::Nodes(nodes), _) => GxChunk::Nodes(nodes),
                    (GxPart::Own, Some(own)) => GxChunk::Nodes(own),
                    (GxPart::Own, None) => unreachable!("an Own part owns a buffer"),
                };
                let rad_chunk = &mut rad[local * rad_row..(local + ne) * rad_row];
                inputs.backward_chunk(
                    e0,
                    ne,
                    (g, g_extra),
                    gx_chunk,
                    rad_chunk,
                    (gw, &wt, &packed_t),
                    &mut scr,
                );
                local += ne;
            }
            (own_gx, own_gw)
        })
        .collect();
    // SAFETY: the weight gradient and (with `gather`) the node gradient were zero-filled up
    // front; the per-edge rows of `gx` and of the radial gradient are split into the parts'
    // edges, which together are all `edges`, and every chunk of every part wrote every element
    // of its rows (`backward_chunk`: `from_edge_uninit` or a checked full copy for `gx`,
    // `radial_backward` for the radial gradient, which is empty without radial weights).
    let mut out = unsafe { assume_init(out) };
    let (gx_all, rest) = out.split_at_mut(gx_len);
    let gw_out = &mut rest[edges * rad_row..];
    for (own_gx, own_gw) in partials {
        if let Some(acc) = own_gw {
            add_into(gw_out, &acc);
        }
        if let Some(acc) = own_gx {
            gx_all
                .par_chunks_mut(1 << 16)
                .zip(acc.par_chunks(1 << 16))
                .for_each(|(o, a)| add_into(o, a));
        }
    }
    out
}

/// The buffers a backward part owns (the first part writes into the output instead):
/// `(node gradient, weight gradient)`.
type PartBuffers<T> = (Option<Vec<T>>, Option<Vec<T>>);

/// `dst += src` elementwise.
#[inline(always)]
fn add_into_kernel<T: Float>(dst: &mut [T], src: &[T]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d += v;
    }
}

dispatch_kernel!(add_into, add_into_kernel, (dst: &mut [T], src: &[T]));

// ---------------------------------------------------------------------------------------------
// candle ops
// ---------------------------------------------------------------------------------------------

/// Runs `f` on the contiguous CPU data of a tensor held by an op (the Wigner blocks, or the
/// weights in the backward op), if there is one.
fn with_held<T: WithDType, R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[T]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_cpu_slice(t, "matscale so2 layer", |data| f(Some(data))),
        None => f(None),
    }
}

/// A fused SO(2) op whose per-edge radial weights are optional. candle has one op trait per
/// input count, so the op is applied as [`NoRadial`] (a `CustomOp2` of `(a, b)`) or as
/// [`WithRadial`] (a `CustomOp3` of `(a, b, radial)`), and both forms call these methods.
/// `(a, b)` is `(x, weights)` for the forward ops and `(x, grad_out)` for the backward ops.
trait RadialOptional: Send + Sync + 'static {
    /// candle's name of the op without and with radial weights.
    const NAMES: [&'static str; 2];

    /// The forward on the CPU.
    fn cpu(
        &self,
        a: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)>;

    /// The forward on a CUDA device; none by default (candle's error for a missing kernel).
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        _a: (&candle_core::CudaStorage, &Layout),
        _b: (&candle_core::CudaStorage, &Layout),
        radial: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let name = Self::NAMES[usize::from(radial.is_some())];
        Err(candle_core::Error::Cuda(
            format!("no cuda implementation for {name}").into(),
        ))
    }

    /// The gradients `(a, b, radial)` from the output's gradient, or `None` for an op without
    /// a backward (the backward ops: no second derivatives).
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _radial: Option<&Tensor>,
        _grad_res: &Tensor,
    ) -> Option<candle_core::Result<(Tensor, Tensor, Option<Tensor>)>> {
        None
    }
}

/// A [`RadialOptional`] op without radial weights: candle's `CustomOp2` of `(a, b)`.
struct NoRadial<O>(O);

/// A [`RadialOptional`] op with radial weights: candle's `CustomOp3` of `(a, b, radial)`.
struct WithRadial<O>(O);

impl<O: RadialOptional> CustomOp2 for NoRadial<O> {
    fn name(&self) -> &'static str {
        O::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.cpu((s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        match self.0.grads(a, b, None, grad_res) {
            Some(grads) => {
                let (ga, gb, _) = grads?;
                Ok((Some(ga), Some(gb)))
            }
            None => Err(candle_core::Error::BackwardNotSupported { op: O::NAMES[0] }),
        }
    }
}

impl<O: RadialOptional> CustomOp3 for WithRadial<O> {
    fn name(&self) -> &'static str {
        O::NAMES[1]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.cpu((s1, l1), (s2, l2), Some((s3, l3)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        radial: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match self.0.grads(a, b, Some(radial), grad_res) {
            Some(grads) => {
                let (ga, gb, gr) = grads?;
                Ok((Some(ga), Some(gb), gr))
            }
            None => Err(candle_core::Error::BackwardNotSupported { op: O::NAMES[1] }),
        }
    }
}

/// Applies a [`RadialOptional`] op to `(a, b)` and, when given, the radial weights, with
/// candle's autograd (`no_bwd`: without recording it, for the backward ops).
fn apply_radial_optional<O: RadialOptional>(
    op: O,
    a: &Tensor,
    b: &Tensor,
    radial: Option<&Tensor>,
    record: bool,
) -> candle_core::Result<Tensor> {
    match (radial, record) {
        (Some(r), true) => a.apply_op3(b, r, WithRadial(op)),
        (Some(r), false) => a.apply_op3_no_bwd(b, r, &WithRadial(op)),
        (None, true) => a.apply_op2(b, NoRadial(op)),
        (None, false) => a.apply_op2_no_bwd(b, &NoRadial(op)),
    }
}

/// The fused forward op: `(x, weights)` or `(x, weights, radial)`.
#[derive(Debug, Clone)]
pub(crate) struct So2LayerOp {
    pub(crate) shape: LayerShape,
    /// Detached Wigner blocks `[E, wigner_len]` when rotating on either side.
    pub(crate) wigner: Option<Tensor>,
}

impl So2LayerOp {
    /// The layer on `x` (contiguous), the packed `weights` and, when given, the radial
    /// weights (contiguous), with candle's autograd.
    pub(crate) fn apply(
        self,
        x: &Tensor,
        weights: &Tensor,
        radial: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        apply_radial_optional(self, x, weights, radial, true)
    }

    fn output_shape(&self, edges: usize) -> Shape {
        let s = &self.shape;
        if s.extra == 0 {
            Shape::from((edges, s.rows_out(), s.c_out))
        } else {
            Shape::from(s.out_len(edges))
        }
    }

    fn check(&self, x: &Layout, radial: Option<&Layout>, w: &Layout) -> candle_core::Result<usize> {
        let s = &self.shape;
        let &[edges, rows, c] = x.shape().dims() else {
            candle_core::bail!("matscale so2 layer: expected a rank-3 input");
        };
        let radial_ok =
            radial.is_none_or(|r| r.shape().elem_count() == edges * s.radial_rows() * s.c_in);
        if rows != s.rows_in()
            || c != s.c_in
            || !radial_ok
            || w.shape().elem_count() != s.weight_len()
        {
            candle_core::bail!("matscale so2 layer: inconsistent input shapes");
        }
        Ok(edges)
    }

    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let edges = self.check(x.1, radial.map(|r| r.1), w.1)?;
        fn go<T: Float>(
            op: &So2LayerOp,
            x: (&CpuStorage, &Layout),
            radial: Option<(&CpuStorage, &Layout)>,
            w: (&CpuStorage, &Layout),
            edges: usize,
        ) -> candle_core::Result<Vec<T>> {
            let xs = contiguous_slice::<T>(x.0, x.1)?;
            let rs = radial
                .map(|r| contiguous_slice::<T>(r.0, r.1))
                .transpose()?;
            let ws = contiguous_slice::<T>(w.0, w.1)?;
            with_held::<T, _>(op.wigner.as_ref(), |wig| {
                Ok(forward(&Inputs::new(op.shape, xs, rs, ws, wig), edges))
            })
        }
        let out = match x.0 {
            CpuStorage::F32(_) => CpuStorage::F32(go::<f32>(self, x, radial, w, edges)?),
            CpuStorage::F64(_) => CpuStorage::F64(go::<f64>(self, x, radial, w, edges)?),
            _ => candle_core::bail!("matscale so2 layer: needs f32 or f64 inputs"),
        };
        Ok((out, self.output_shape(edges)))
    }

    /// Gradients `(x, weights, radial)` from the fused backward op.
    fn gradients(
        &self,
        x: &Tensor,
        weights: &Tensor,
        radial: Option<&Tensor>,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let bwd = So2LayerBwdOp {
            shape: self.shape,
            wigner: self.wigner.clone(),
            weights: weights.detach(),
        };
        let g = grad_res.contiguous()?;
        let flat = apply_radial_optional(bwd, x, &g, radial, false)?;
        split_gradients(&flat, x, weights, radial)
    }
}

/// Splits the flat output of a fused backward op (`[grad x | grad radial | grad weights]`)
/// into the three gradients, shaped like their inputs, in the ops' input order
/// `(x, weights, radial)`.
fn split_gradients(
    flat: &Tensor,
    x: &Tensor,
    weights: &Tensor,
    radial: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let n_x = x.elem_count();
    let n_r = radial.map_or(0, Tensor::elem_count);
    let gx = flat.narrow(0, 0, n_x)?.reshape(x.shape())?;
    let gr = radial
        .map(|r| flat.narrow(0, n_x, n_r)?.reshape(r.shape()))
        .transpose()?;
    let gw = flat
        .narrow(0, n_x + n_r, weights.elem_count())?
        .reshape(weights.shape())?;
    Ok((gx, gw, gr))
}

impl RadialOptional for So2LayerOp {
    const NAMES: [&'static str; 2] = ["matscale-so2-layer", "matscale-so2-layer-radial"];

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(x, w, radial)
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        w: (&candle_core::CudaStorage, &Layout),
        radial: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::so2::layer_forward(&self.shape, self.wigner.as_ref(), x, radial, w)
    }

    fn grads(
        &self,
        x: &Tensor,
        weights: &Tensor,
        radial: Option<&Tensor>,
        grad_res: &Tensor,
    ) -> Option<candle_core::Result<(Tensor, Tensor, Option<Tensor>)>> {
        Some(self.gradients(x, weights, radial, grad_res))
    }
}

/// The fused backward op: `(x, grad_out)` or `(x, grad_out, radial)` →
/// `[gx | grad_radial | grad_weights]` flattened. No second derivatives.
#[derive(Debug, Clone)]
struct So2LayerBwdOp {
    shape: LayerShape,
    wigner: Option<Tensor>,
    weights: Tensor,
}

impl So2LayerBwdOp {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        g: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = &self.shape;
        let &[edges, ..] = x.1.shape().dims() else {
            candle_core::bail!("matscale so2 layer backward: expected a rank-3 input");
        };
        if g.1.shape().elem_count() != s.out_len(edges) {
            candle_core::bail!("matscale so2 layer backward: gradient of the wrong size");
        }
        fn go<T: Float>(
            op: &So2LayerBwdOp,
            x: (&CpuStorage, &Layout),
            g: (&CpuStorage, &Layout),
            radial: Option<(&CpuStorage, &Layout)>,
            edges: usize,
        ) -> candle_core::Result<Vec<T>> {
            let xs = contiguous_slice::<T>(x.0, x.1)?;
            let gs = contiguous_slice::<T>(g.0, g.1)?;
            let rs = radial
                .map(|r| contiguous_slice::<T>(r.0, r.1))
                .transpose()?;
            with_held::<T, _>(Some(&op.weights), |ws| {
                let ws = ws.expect("weights are always held");
                if ws.len() != op.shape.weight_len() {
                    candle_core::bail!("matscale so2 layer backward: weights of the wrong size");
                }
                with_held::<T, _>(op.wigner.as_ref(), |wig| {
                    let (g_main, g_extra) = gs.split_at(edges * op.shape.main_row());
                    let inputs = Inputs::new(op.shape, xs, rs, ws, wig);
                    Ok(backward(&inputs, g_main, Some(g_extra), edges))
                })
            })
        }
        let out = match x.0 {
            CpuStorage::F32(_) => CpuStorage::F32(go::<f32>(self, x, g, radial, edges)?),
            CpuStorage::F64(_) => CpuStorage::F64(go::<f64>(self, x, g, radial, edges)?),
            _ => candle_core::bail!("matscale so2 layer backward: needs f32 or f64 inputs"),
        };
        let rad = if s.radial {
            edges * s.radial_rows() * s.c_in
        } else {
            0
        };
        let len = edges * s.rows_in() * s.c_in + rad + s.weight_len();
        Ok((out, Shape::from(len)))
    }
}

impl RadialOptional for So2LayerBwdOp {
    const NAMES: [&'static str; 2] = [
        "matscale-so2-layer-backward",
        "matscale-so2-layer-backward-radial",
    ];

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        g: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(x, g, radial)
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        g: (&candle_core::CudaStorage, &Layout),
        radial: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (s, w) = (&self.shape, self.wigner.as_ref());
        crate::cuda::so2::layer_backward(s, w, &self.weights, x, g, radial)
    }
}

// ---------------------------------------------------------------------------------------------
// Weight packing
// ---------------------------------------------------------------------------------------------

/// fairchem's `fc.weight` of one order `m > 0` (`[2n, k]`: the `n` real rows `W_r`, then the
/// `n` imaginary rows `W_i`) → the packed `[P₁ | P₂ | P₃]` flattened, each `[k, n]` row-major:
/// `P₁ = W_rᵀ`, `P₂ = (W_r + W_i)ᵀ`, `P₃ = (W_i − W_r)ᵀ` (see the module docs).
///
/// One op with a one-pass backward (`∂W_r = (∂P₁ + ∂P₂ − ∂P₃)ᵀ`, `∂W_i = (∂P₂ + ∂P₃)ᵀ`)
/// instead of two narrows, an addition, a subtraction, three transposes and copies and their
/// backward passes: in the SO(2) layer at `lmax` 4, 64 channels, those weight-sized nodes cost
/// about a tenth of a 10⁴-edge forward+backward. CPU, f32 and f64, first order; the caller
/// composes the same packing from candle ops otherwise.
pub(crate) fn pack_complex(w: &Tensor) -> Result<Tensor> {
    Ok(w.contiguous()?.apply_op1(PackComplex)?)
}

/// Whether [`pack_complex`] applies to `w`.
pub(crate) fn pack_complex_applies(w: &Tensor) -> bool {
    w.device().is_cpu()
        && matches!(w.dtype(), DType::F32 | DType::F64)
        && w.rank() == 2
        && w.dim(0).is_ok_and(|r| r % 2 == 0)
        && !crate::higher_order_gradients_requested()
}

/// The op of [`pack_complex`].
#[derive(Debug, Clone, Copy)]
struct PackComplex;

/// `(n, k)` of a `[2n, k]` weight.
fn pack_dims(l: &Layout, name: &str) -> candle_core::Result<(usize, usize)> {
    let (rows, k) = l.shape().dims2()?;
    if rows % 2 != 0 {
        candle_core::bail!("{name}: expected [2n, k] weights, got {:?}", l.shape());
    }
    Ok((rows / 2, k))
}

/// For every element `(r, c)` of a row-major `[rows, cols]` source, at source index
/// `i = r·cols + c`: `dst[q][c·rows + r] = f(i)[q]`, i.e. `N` transposed `[cols, rows]`
/// outputs of element-wise functions of the source. In [`PACK_TILE`]² tiles (reads and writes
/// each stay within a few cache lines per row), parallel over tiles of output rows.
fn transpose_map<T: Float, const N: usize>(
    dst: [&mut [T]; N],
    rows: usize,
    cols: usize,
    f: impl Fn(usize) -> [T; N] + Sync,
) {
    assert!(
        dst.iter().all(|d| d.len() == rows * cols),
        "transpose: outputs of another size than [{cols}, {rows}]"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    let mut pieces = dst.map(|d| d.chunks_mut(PACK_TILE * rows));
    let tiles: Vec<[&mut [T]; N]> = (0..cols.div_ceil(PACK_TILE))
        .map(|_| {
            pieces
                .each_mut()
                .map(|p| p.next().expect("one piece per tile of output rows"))
        })
        .collect();
    tiles.into_par_iter().enumerate().for_each(|(t, mut d)| {
        let c0 = t * PACK_TILE;
        let tile_cols = d[0].len() / rows;
        for r0 in (0..rows).step_by(PACK_TILE) {
            for dc in 0..tile_cols {
                for r in r0..(r0 + PACK_TILE).min(rows) {
                    let v = f(r * cols + c0 + dc);
                    for (out, v) in d.iter_mut().zip(v) {
                        out[dc * rows + r] = v;
                    }
                }
            }
        }
    });
}

/// `dst[c·rows + r] = src[r·cols + c]`: the transpose of a row-major `[rows, cols]` matrix.
fn transpose<T: Float>(dst: &mut [T], src: &[T], rows: usize, cols: usize) {
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose: a source of another size"
    );
    transpose_map([dst], rows, cols, |i| [src[i]]);
}

/// Tile edge of the transpositions ([`transpose_map`]).
const PACK_TILE: usize = 32;

/// `[W_r; W_i]` (`[2n, k]`) → `[W_rᵀ | (W_r + W_i)ᵀ | (W_i − W_r)ᵀ]` (three `[k, n]`), the
/// operands of the three-product complex GEMM: one tiled, parallel transposition (6/4/128
/// packs 4.4 M weights on every forward).
fn pack_kernel<T: Float>(w: &[T], n: usize, k: usize) -> Vec<T> {
    let (wr, wi) = w.split_at(n * k);
    let mut out = vec![T::zero(); 3 * k * n];
    let (p1, rest) = out.split_at_mut(k * n);
    let (p2, p3) = rest.split_at_mut(k * n);
    transpose_map([p1, p2, p3], n, k, |i| {
        let (r, im) = (wr[i], wi[i]);
        [r, r + im, im - r]
    });
    out
}

/// The adjoint of [`pack_kernel`]: the gradients of the three packed `[k, n]` operands →
/// the gradient of `[W_r; W_i]` (`[2n, k]`), transposed the same way.
fn unpack_grad_kernel<T: Float>(g: &[T], n: usize, k: usize) -> Vec<T> {
    let (g1, rest) = g.split_at(k * n);
    let (g2, g3) = rest.split_at(k * n);
    let mut out = vec![T::zero(); 2 * n * k];
    let (dr, di) = out.split_at_mut(n * k);
    transpose_map([dr, di], k, n, |i| {
        let (a, b, c) = (g1[i], g2[i], g3[i]);
        [a + b - c, b + c]
    });
    out
}

/// Input: the weights `[2n, k]`.
impl FloatKernel<1> for PackComplex {
    fn run<T: Float>(&self, [(w, l)]: [(&[T], &Layout); 1]) -> candle_core::Result<Vec<T>> {
        let (n, k) = pack_dims(l, "matscale-so2-pack-complex")?;
        Ok(pack_kernel(w, n, k))
    }
}

impl CustomOp1 for PackComplex {
    fn name(&self) -> &'static str {
        "matscale-so2-pack-complex"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (n, k) = pack_dims(l, name)?;
        let out = run_float(name, [(s, l)], self)?;
        Ok((out, Shape::from(3 * k * n)))
    }

    fn bwd(
        &self,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, k) = w.dims2()?;
        let g = grad_res.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&PackComplexBackward {
            n: rows / 2,
            k,
        })?))
    }
}

/// The backward of [`PackComplex`] as an op on the packed gradient `[3kn]` → `[2n, k]`.
#[derive(Debug, Clone, Copy)]
struct PackComplexBackward {
    n: usize,
    k: usize,
}

/// Input: the packed gradient `[3kn]`.
impl FloatKernel<1> for PackComplexBackward {
    fn run<T: Float>(&self, [(g, _)]: [(&[T], &Layout); 1]) -> candle_core::Result<Vec<T>> {
        Ok(unpack_grad_kernel(g, self.n, self.k))
    }
}

impl CustomOp1 for PackComplexBackward {
    fn name(&self) -> &'static str {
        "matscale-so2-pack-complex-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (n, k) = (self.n, self.k);
        if l.shape().elem_count() != 3 * k * n {
            candle_core::bail!("{name}: gradient {:?} for [2·{n}, {k}] weights", l.shape());
        }
        let out = run_float(name, [(s, l)], self)?;
        Ok((out, Shape::from((2 * n, k))))
    }
}

// ---------------------------------------------------------------------------------------------
// Gathered variant: node rows in, per-edge messages built inside the op
// ---------------------------------------------------------------------------------------------

/// Which node rows form each edge's message in the gathered layer variants
/// ([`crate::so2::So2Convolution::forward_gather_rotated`] and
/// [`crate::so2::So2Convolution::forward_gather_rotate_in`]).
///
/// The indices are [`RowIndex`]es (grouped once per graph, on the device of the node
/// features), so neither the checks nor the gathers copy anything from the device; build them
/// with [`Self::single`] / [`Self::pair`] from index tensors, or from a batch's host groupings
/// with [`RowIndex::from_segments`].
#[derive(Debug, Clone)]
pub enum MessageGather {
    /// The message of edge `e` is node row `x[index[e]]` (`C_in = C`).
    Single(RowIndex),
    /// The message of edge `e` is `cat(x[source[e]], x[target[e]])` along channels
    /// (`C_in = 2·C`): EquiformerV2's `SO2EquivariantGraphAttention` message.
    Pair {
        /// Source node of each edge (channels `0..C` of the message).
        source: RowIndex,
        /// Target node of each edge (channels `C..2C`).
        target: RowIndex,
    },
}

impl MessageGather {
    /// A [`Self::Single`] gather of `index` (`[E]`, u8/u32/i64) into `nodes` node rows.
    ///
    /// # Errors
    /// [`EquivariantError::InvalidArgument`] naming `index` (and the edge) for a value outside
    /// `0..nodes`; [`EquivariantError::ShapeMismatch`] or
    /// [`EquivariantError::UnsupportedDType`] for an index that is not `[E]` integers.
    pub fn single(index: &Tensor, nodes: usize) -> Result<Self> {
        Ok(Self::Single(row_index("index", index, nodes)?))
    }

    /// A [`Self::Pair`] gather of `source` and `target` (`[E]` each) into `nodes` node rows.
    ///
    /// # Errors
    /// As [`Self::single`], naming `source` or `target`; a `target` of another length than
    /// `source`.
    pub fn pair(source: &Tensor, target: &Tensor, nodes: usize) -> Result<Self> {
        let source = row_index("source", source, nodes)?;
        let target = row_index("target", target, nodes)?;
        if target.len() != source.len() {
            return Err(EquivariantError::ShapeMismatch {
                arg: "target",
                expected: format!("[num_edges = {}] like source", source.len()),
                found: vec![target.len()],
            });
        }
        Ok(Self::Pair { source, target })
    }

    /// Number of node rows concatenated per message (1 or 2).
    pub fn parts(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Pair { .. } => 2,
        }
    }

    /// The `[E, rows, parts·C]` message tensor itself (the rows of each index and, for pairs,
    /// their `cat` along channels), which the fused CPU op never builds. Devices without the
    /// gathered kernel (CUDA) run the per-edge layer on it.
    ///
    /// The rows are [`RowIndex::gather`]: on a GPU a segment gather, whose backward is a CSR
    /// segment sum instead of candle's CUDA `index_add` (2-4 ms per EquiformerV2 message on
    /// an H100).
    pub fn message(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Single(index) => index.gather(x)?,
            Self::Pair { source, target } => {
                Tensor::cat(&[&source.gather(x)?, &target.gather(x)?], 2)?
            }
        })
    }
}

/// [`RowIndex::new`] with errors naming `arg` instead of `index`.
fn row_index(arg: &'static str, index: &Tensor, nodes: usize) -> Result<RowIndex> {
    RowIndex::new(index, nodes).map_err(|e| match e {
        EquivariantError::InvalidArgument { reason, .. } => EquivariantError::InvalidArgument {
            name: arg,
            reason: format!("node indices: {reason}"),
        },
        EquivariantError::ShapeMismatch {
            expected, found, ..
        } => EquivariantError::ShapeMismatch {
            arg,
            expected,
            found,
        },
        EquivariantError::UnsupportedDType { found, .. } => EquivariantError::InvalidArgument {
            name: arg,
            reason: format!("node indices must be u8, u32 or i64, found {found:?}"),
        },
        other => other,
    })
}

/// The grouped indices held by the gather ops.
#[derive(Debug, Clone)]
struct GatherIndex {
    source: RowIndex,
    target: Option<RowIndex>,
    nodes: usize,
    c_node: usize,
}

/// Checks the arguments of the gathered layer (see [`MessageGather`]) and returns its
/// validated indices. `shape.rotate_in` must be set.
fn check_gather(
    shape: LayerShape,
    x: &Tensor,
    gather: &MessageGather,
    wigner: &WignerBlocks,
    radial: Option<&Tensor>,
) -> Result<GatherIndex> {
    debug_assert!(shape.rotate_in, "the gathered layer rotates its input");
    let layout = shape.layout;
    let full = layout.num_coefficients();
    let parts = gather.parts();
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Err(EquivariantError::UnsupportedDType {
            arg: "x",
            found: x.dtype(),
        });
    }
    let x_error = || EquivariantError::ShapeMismatch {
        arg: "x",
        expected: format!(
            "[num_nodes, (lmax+1)^2 = {full}, in_channels / {parts} = {}] (l-major node rows, \
             in_channels {} = {parts} gathered rows × channels)",
            shape.c_in / parts,
            shape.c_in
        ),
        found: x.dims().to_vec(),
    };
    let &[nodes, rows, c_node] = x.dims() else {
        return Err(x_error());
    };
    if rows != full || c_node * parts != shape.c_in {
        return Err(x_error());
    }
    let rows_error = |arg: &'static str, found: usize| EquivariantError::ShapeMismatch {
        arg,
        expected: format!("an index into the {nodes} node rows of x"),
        found: vec![found],
    };
    let (first, arg) = match gather {
        MessageGather::Single(i) => (i, "index"),
        MessageGather::Pair { source, .. } => (source, "source"),
    };
    if first.rows() != nodes {
        return Err(rows_error(arg, first.rows()));
    }
    let index = match gather {
        MessageGather::Single(i) => GatherIndex {
            source: i.clone(),
            target: None,
            nodes,
            c_node,
        },
        MessageGather::Pair { source, target } => {
            if target.len() != source.len() {
                return Err(EquivariantError::ShapeMismatch {
                    arg: "target",
                    expected: format!("[num_edges = {}] like source", source.len()),
                    found: vec![target.len()],
                });
            }
            if target.rows() != nodes {
                return Err(rows_error("target", target.rows()));
            }
            GatherIndex {
                source: source.clone(),
                target: Some(target.clone()),
                nodes,
                c_node,
            }
        }
    };
    let edges = index.source.len();
    if wigner.lmax() != layout.lmax() {
        return Err(EquivariantError::InvalidArgument {
            name: "wigner",
            reason: format!(
                "blocks up to lmax {} for a layout with lmax {}",
                wigner.lmax(),
                layout.lmax()
            ),
        });
    }
    if wigner.num_edges() != edges {
        return Err(EquivariantError::ShapeMismatch {
            arg: "wigner",
            expected: format!("[num_edges = {edges}, {}]", layout.wigner_len()),
            found: wigner.blocks().dims().to_vec(),
        });
    }
    if wigner.blocks().dtype() != x.dtype() {
        return Err(EquivariantError::UnsupportedDType {
            arg: "wigner",
            found: wigner.blocks().dtype(),
        });
    }
    if let Some(r) = radial {
        if r.dims() != [edges, shape.radial_rows() * shape.c_in] {
            return Err(EquivariantError::ShapeMismatch {
                arg: "radial",
                expected: format!(
                    "[num_edges = {edges}, radial_len = {}]",
                    shape.radial_rows() * shape.c_in
                ),
                found: r.dims().to_vec(),
            });
        }
        if r.dtype() != x.dtype() {
            return Err(EquivariantError::UnsupportedDType {
                arg: "radial",
                found: r.dtype(),
            });
        }
    }
    Ok(index)
}

/// The gathered layer (see [`MessageGather`]): checks the arguments, then applies the fused op
/// and splits off the extra `m = 0` outputs; `weights` are packed (see the module docs) and of
/// `x`'s dtype. Where the fused op does not apply (off the CPU, or with higher-order gradients
/// requested, its backward being first order) `per_edge` runs on the gathered message instead.
pub(crate) fn forward_gather(
    shape: LayerShape,
    weights: impl FnOnce() -> Result<Tensor>,
    x: &Tensor,
    gather: &MessageGather,
    wigner: &WignerBlocks,
    radial: Option<&Tensor>,
    per_edge: impl FnOnce(&Tensor) -> Result<(Tensor, Option<Tensor>)>,
) -> Result<(Tensor, Option<Tensor>)> {
    let index = check_gather(shape, x, gather, wigner, radial)?;
    let edges = index.source.len();
    if !x.device().is_cpu() || (edges > 0 && crate::higher_order_gradients_requested()) {
        return per_edge(&gather.message(x)?);
    }
    let weights = weights()?;
    let extra_out = (shape.extra > 0).then(|| Arc::new(ExtraSlot::default()));
    let op = So2GatherOp {
        shape,
        wigner: wigner.blocks().detach().contiguous()?,
        index,
        extra_out: extra_out.clone(),
    };
    let x = x.contiguous()?;
    let radial = radial.map(Tensor::contiguous).transpose()?;
    let out = apply_radial_optional(op, &x, &weights, radial.as_ref(), true)?;
    let Some(slot) = extra_out else {
        return Ok((out, None));
    };
    let extra = out.apply_op1(ExtraOutputOp {
        slot,
        edges,
        extra: shape.extra,
    })?;
    Ok((out, Some(extra)))
}

/// Runs `f` with the host index slices and the gather description of `index`.
fn with_gather<R>(
    index: &GatherIndex,
    f: impl FnOnce(Gather<'_>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    f(Gather {
        source: index.source.host(),
        target: index.target.as_ref().map(RowIndex::host),
        c_node: index.c_node,
        nodes: index.nodes,
    })
}

/// The gathered forward op: `(x_nodes, weights)` or `(x_nodes, weights, radial)`.
#[derive(Debug, Clone)]
struct So2GatherOp {
    shape: LayerShape,
    /// Detached Wigner blocks `[E, wigner_len]`.
    wigner: Tensor,
    index: GatherIndex,
    /// With extra `m = 0` outputs: where they leave the op (see [`ExtraSlot`]).
    extra_out: Option<Arc<ExtraSlot>>,
}

/// Carries a fused layer's second output, its extra `m = 0` outputs `[E, extra]`, past
/// candle's one-output custom ops.
///
/// The forward op returns the main output `[E, rows_out, C_out]` and leaves the extra outputs
/// here; [`ExtraOutputOp`], applied to the main output, hands them out as a tensor. In the
/// backward pass candle reaches that op before the forward op (it consumes the forward op's
/// output), so its gradient is waiting here when the forward op's backward runs, which takes
/// it (`None`: the extra outputs did not reach the loss, zero gradient).
///
/// Returned through a `narrow` of one flat output instead, each of the two parts would get
/// a full-size gradient (zeros around the part's own), allocated, concatenated and added by
/// candle: about 5% of an EquiformerV2 step.
#[derive(Debug, Default)]
struct ExtraSlot {
    value: Mutex<Option<CpuStorage>>,
    grad: Mutex<Option<Tensor>>,
}

impl ExtraSlot {
    fn put_value(&self, value: CpuStorage) {
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
    }

    fn take_value(&self) -> Option<CpuStorage> {
        self.value
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn put_grad(&self, grad: Tensor) {
        *self.grad.lock().unwrap_or_else(PoisonError::into_inner) = Some(grad);
    }

    fn take_grad(&self) -> Option<Tensor> {
        self.grad
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// `main → extra`: the extra `m = 0` outputs `[E, extra]` a gathered forward op left in its
/// [`ExtraSlot`] (applied once, to that op's main output). Its backward leaves the gradient in
/// the slot and gives the main output a zero gradient, so that the main output has one even
/// when only the extra outputs reach the loss.
#[derive(Debug)]
struct ExtraOutputOp {
    slot: Arc<ExtraSlot>,
    edges: usize,
    extra: usize,
}

impl CustomOp1 for ExtraOutputOp {
    fn name(&self) -> &'static str {
        "matscale-so2-extra-outputs"
    }

    fn cpu_fwd(
        &self,
        _main: &CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let value = self.slot.take_value().ok_or_else(|| {
            candle_core::Error::Msg(
                "matscale so2 gather layer: its extra outputs were already taken".into(),
            )
        })?;
        Ok((value, Shape::from((self.edges, self.extra))))
    }

    fn bwd(
        &self,
        main: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.slot.put_grad(grad_res.clone());
        let zero = Tensor::zeros((), main.dtype(), main.device())?;
        Ok(Some(zero.broadcast_as(main.shape())?))
    }
}

impl So2GatherOp {
    fn edges(&self) -> usize {
        self.index.source.len()
    }

    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = &self.shape;
        let edges = self.edges();
        let idx = &self.index;
        let radial_ok =
            radial.is_none_or(|r| r.1.shape().elem_count() == edges * s.radial_rows() * s.c_in);
        if x.1.shape().dims() != [idx.nodes, s.rows_in(), idx.c_node]
            || !radial_ok
            || w.1.shape().elem_count() != s.weight_len()
        {
            candle_core::bail!("matscale so2 gather layer: inconsistent input shapes");
        }
        /// `(main output, extra outputs)`, or `(flat output, None)` without an extra slot.
        fn go<T: Float>(
            op: &So2GatherOp,
            x: (&CpuStorage, &Layout),
            radial: Option<(&CpuStorage, &Layout)>,
            w: (&CpuStorage, &Layout),
        ) -> candle_core::Result<(Vec<T>, Option<Vec<T>>)> {
            let xs = contiguous_slice::<T>(x.0, x.1)?;
            let rs = radial
                .map(|r| contiguous_slice::<T>(r.0, r.1))
                .transpose()?;
            let ws = contiguous_slice::<T>(w.0, w.1)?;
            with_held::<T, _>(Some(&op.wigner), |wig| {
                with_gather(&op.index, |ga| {
                    let mut inputs = Inputs::new(op.shape, xs, rs, ws, wig);
                    inputs.gather = Some(ga);
                    let edges = ga.source.len();
                    Ok(if op.extra_out.is_some() {
                        let mut main = uninit_vec::<T>(edges * op.shape.main_row());
                        let mut extra = uninit_vec::<T>(edges * op.shape.extra);
                        forward_into(&inputs, edges, &mut main, &mut extra);
                        // SAFETY: `forward_into` initialised all of `main` and `extra`.
                        unsafe { (assume_init(main), Some(assume_init(extra))) }
                    } else {
                        (forward(&inputs, edges), None)
                    })
                })
            })
        }
        let (out, extra) = match x.0 {
            CpuStorage::F32(_) => {
                let (main, extra) = go::<f32>(self, x, radial, w)?;
                (CpuStorage::F32(main), extra.map(CpuStorage::F32))
            }
            CpuStorage::F64(_) => {
                let (main, extra) = go::<f64>(self, x, radial, w)?;
                (CpuStorage::F64(main), extra.map(CpuStorage::F64))
            }
            _ => candle_core::bail!("matscale so2 gather layer: needs f32 or f64 inputs"),
        };
        let shape = match (&self.extra_out, extra) {
            (Some(slot), Some(extra)) => {
                slot.put_value(extra);
                Shape::from((edges, s.rows_out(), s.c_out))
            }
            _ if s.extra == 0 => Shape::from((edges, s.rows_out(), s.c_out)),
            _ => Shape::from(s.out_len(edges)),
        };
        Ok((out, shape))
    }

    /// Elements of the output gradient the backward op receives.
    fn grad_len(&self, edges: usize) -> usize {
        if self.extra_out.is_some() {
            edges * self.shape.main_row()
        } else {
            self.shape.out_len(edges)
        }
    }

    /// Gradients `(x_nodes, weights, radial)` from the gathered backward op.
    fn gradients(
        &self,
        x: &Tensor,
        weights: &Tensor,
        radial: Option<&Tensor>,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let grad_extra = match &self.extra_out {
            Some(slot) => slot.take_grad().map(|g| g.contiguous()).transpose()?,
            None => None,
        };
        let bwd = So2GatherBwdOp {
            fwd: self.clone(),
            weights: weights.detach(),
            grad_extra,
        };
        let g = grad_res.contiguous()?;
        let flat = apply_radial_optional(bwd, x, &g, radial, false)?;
        split_gradients(&flat, x, weights, radial)
    }
}

impl RadialOptional for So2GatherOp {
    const NAMES: [&'static str; 2] = [
        "matscale-so2-gather-layer",
        "matscale-so2-gather-layer-radial",
    ];

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(x, w, radial)
    }

    fn grads(
        &self,
        x: &Tensor,
        weights: &Tensor,
        radial: Option<&Tensor>,
        grad_res: &Tensor,
    ) -> Option<candle_core::Result<(Tensor, Tensor, Option<Tensor>)>> {
        Some(self.gradients(x, weights, radial, grad_res))
    }
}

/// The gathered backward op: `(x_nodes, grad_out)` or `(x_nodes, grad_out, radial)` →
/// `[gx_nodes | grad_radial | grad_weights]` flattened. No second derivatives.
#[derive(Debug, Clone)]
struct So2GatherBwdOp {
    fwd: So2GatherOp,
    weights: Tensor,
    /// The gradient of the extra outputs when they left through an [`ExtraSlot`].
    grad_extra: Option<Tensor>,
}

impl So2GatherBwdOp {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        g: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = &self.fwd.shape;
        let edges = self.fwd.edges();
        if g.1.shape().elem_count() != self.fwd.grad_len(edges)
            || self
                .grad_extra
                .as_ref()
                .is_some_and(|ge| ge.elem_count() != edges * s.extra)
        {
            candle_core::bail!("matscale so2 gather layer backward: gradient of the wrong size");
        }
        if x.1.shape().elem_count() != self.fwd.index.nodes * s.rows_in() * self.fwd.index.c_node {
            candle_core::bail!("matscale so2 gather layer backward: input of the wrong size");
        }
        fn go<T: Float>(
            op: &So2GatherBwdOp,
            x: (&CpuStorage, &Layout),
            g: (&CpuStorage, &Layout),
            radial: Option<(&CpuStorage, &Layout)>,
        ) -> candle_core::Result<Vec<T>> {
            let xs = contiguous_slice::<T>(x.0, x.1)?;
            let gs = contiguous_slice::<T>(g.0, g.1)?;
            let rs = radial
                .map(|r| contiguous_slice::<T>(r.0, r.1))
                .transpose()?;
            let fwd = &op.fwd;
            with_held::<T, _>(Some(&op.weights), |ws| {
                let ws = ws.expect("weights are always held");
                if ws.len() != fwd.shape.weight_len() {
                    candle_core::bail!(
                        "matscale so2 gather layer backward: weights of the wrong size"
                    );
                }
                with_held::<T, _>(Some(&fwd.wigner), |wig| {
                    with_held::<T, _>(op.grad_extra.as_ref(), |g_extra| {
                        with_gather(&fwd.index, |ga| {
                            let mut inputs = Inputs::new(fwd.shape, xs, rs, ws, wig);
                            inputs.gather = Some(ga);
                            let edges = ga.source.len();
                            let (g_main, g_extra) = if fwd.extra_out.is_some() {
                                (gs, g_extra)
                            } else {
                                let (main, extra) = gs.split_at(edges * fwd.shape.main_row());
                                (main, Some(extra))
                            };
                            Ok(backward(&inputs, g_main, g_extra, edges))
                        })
                    })
                })
            })
        }
        let out = match x.0 {
            CpuStorage::F32(_) => CpuStorage::F32(go::<f32>(self, x, g, radial)?),
            CpuStorage::F64(_) => CpuStorage::F64(go::<f64>(self, x, g, radial)?),
            _ => candle_core::bail!("matscale so2 gather layer backward: needs f32 or f64 inputs"),
        };
        let rad = if s.radial {
            edges * s.radial_rows() * s.c_in
        } else {
            0
        };
        let len = x.1.shape().elem_count() + rad + s.weight_len();
        Ok((out, Shape::from(len)))
    }
}

impl RadialOptional for So2GatherBwdOp {
    const NAMES: [&'static str; 2] = [
        "matscale-so2-gather-layer-backward",
        "matscale-so2-gather-layer-backward-radial",
    ];

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        g: (&CpuStorage, &Layout),
        radial: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(x, g, radial)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::{pack_complex, pack_complex_applies};
    use crate::error::EquivariantError;
    use crate::mapping::SphericalLayout;
    use crate::so2::{rotate, rotate_inv, MessageGather, So2ConvConfig, So2Convolution, So2Linear};
    use crate::testing::{assert_close, check_gradient, random_rotation, random_tensor};
    use crate::wigner::WignerBlocks;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// Which sides of the layer the fused op rotates.
    #[derive(Debug, Clone, Copy)]
    enum Sides {
        Both,
        In,
        Out,
    }

    /// A convolution or linear layer with seeded parameters.
    enum Module {
        Conv(So2Convolution),
        Linear(So2Linear),
    }

    type Outputs = (Tensor, Option<Tensor>);

    impl Module {
        fn new(
            config: &So2ConvConfig,
            linear: bool,
            seed: u64,
        ) -> candle_core::Result<(Self, VarMap)> {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            let wrap = candle_core::Error::wrap;
            let module = if linear {
                Self::Linear(So2Linear::new(config, vb).map_err(wrap)?)
            } else {
                Self::Conv(So2Convolution::new(config, vb).map_err(wrap)?)
            };
            let mut names: Vec<_> = varmap.data().lock().unwrap().keys().cloned().collect();
            names.sort();
            for (i, name) in names.iter().enumerate() {
                let var = varmap.data().lock().unwrap()[name].clone();
                var.set(&random_tensor(var.dims(), DType::F64, seed + i as u64)?)?;
            }
            Ok((module, varmap))
        }

        fn plain(&self, x: &Tensor, r: Option<&Tensor>) -> crate::error::Result<Outputs> {
            match self {
                Self::Conv(c) => c.forward(x, r),
                Self::Linear(l) => Ok((l.forward(x, r)?, None)),
            }
        }

        fn fused(
            &self,
            sides: Sides,
            x: &Tensor,
            w: &WignerBlocks,
            r: Option<&Tensor>,
        ) -> crate::error::Result<Outputs> {
            match (self, sides) {
                (Self::Conv(c), Sides::Both) => c.forward_rotated(x, w, r),
                (Self::Conv(c), Sides::In) => c.forward_rotate_in(x, w, r),
                (Self::Conv(c), Sides::Out) => c.forward_rotate_out(x, w, r),
                (Self::Linear(l), Sides::Both) => Ok((l.forward_rotated(x, w, r)?, None)),
                (Self::Linear(l), Sides::In) => Ok((l.forward_rotate_in(x, w, r)?, None)),
                (Self::Linear(l), Sides::Out) => Ok((l.forward_rotate_out(x, w, r)?, None)),
            }
        }

        /// The unfused composition of separate ops.
        fn composed(
            &self,
            sides: Sides,
            x: &Tensor,
            w: &WignerBlocks,
            r: Option<&Tensor>,
            layout: SphericalLayout,
        ) -> crate::error::Result<Outputs> {
            let x = match sides {
                Sides::Both | Sides::In => rotate(x, w, layout)?,
                Sides::Out => x.clone(),
            };
            let (y, extra) = self.plain(&x, r)?;
            let y = match sides {
                Sides::Both | Sides::Out => rotate_inv(&y, w, layout)?,
                Sides::In => y,
            };
            Ok((y, extra))
        }
    }

    fn random_wigner(
        edges: usize,
        lmax: usize,
        seed: u64,
        dtype: DType,
    ) -> crate::error::Result<WignerBlocks> {
        let frames: Vec<_> = (0..edges as u64)
            .map(|i| random_rotation(seed + i))
            .collect();
        WignerBlocks::from_rotations(&frames, lmax, dtype, &Device::Cpu)
    }

    /// `Σ y·w₁ + Σ extra·w₂` with fixed random weights.
    fn loss(out: &Outputs) -> candle_core::Result<Tensor> {
        let (y, extra) = out;
        let mut l = (y * random_tensor(y.dims(), DType::F64, 77)?)?.sum_all()?;
        if let Some(e) = extra {
            l = (l + (e * random_tensor(e.dims(), DType::F64, 78)?)?.sum_all()?)?;
        }
        Ok(l)
    }

    /// Values and all gradients (input, radial weights, parameters) of the fused layer equal
    /// those of the composition of separate ops, with several chunks and tasks.
    #[test]
    fn fused_layer_matches_composition() -> TestResult {
        // (lmax, mmax, c_in, c_out, extra, linear, radial, edges)
        let cases = [
            (3, 2, 3, 2, 2, false, true, 300),
            (2, 1, 2, 3, 0, false, false, 7),
            (4, 4, 2, 2, 1, false, true, 5),
            (3, 2, 2, 3, 0, true, true, 41),
            (1, 0, 3, 2, 0, false, true, 3),
            (0, 0, 2, 2, 1, false, true, 3),
        ];
        for (case, &(lmax, mmax, c_in, c_out, extra, linear, radial, edges)) in
            cases.iter().enumerate()
        {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let config = So2ConvConfig::new(layout, c_in, c_out).with_extra_m0_outputs(extra);
            let (module, varmap) = Module::new(&config, linear, 10 * case as u64)?;
            let wigner = random_wigner(edges, lmax, 1000 * case as u64, DType::F64)?;
            let r = Var::from_tensor(&random_tensor(
                &[edges, config.radial_len()],
                DType::F64,
                3,
            )?)?;
            let r_opt = radial.then_some(r.as_tensor());
            for sides in [Sides::Both, Sides::In, Sides::Out] {
                let rows = match sides {
                    Sides::Out => layout.num_truncated(),
                    _ => layout.num_coefficients(),
                };
                let x = Var::from_tensor(&random_tensor(&[edges, rows, c_in], DType::F64, 4)?)?;
                let fused = module.fused(sides, x.as_tensor(), &wigner, r_opt)?;
                let composed = module.composed(sides, x.as_tensor(), &wigner, r_opt, layout)?;
                assert_close(&fused.0, &composed.0, 1e-12);
                match (&fused.1, &composed.1) {
                    (Some(a), Some(b)) => assert_close(a, b, 1e-12),
                    (None, None) => assert_eq!(extra * usize::from(!linear), 0),
                    _ => panic!("case {case} {sides:?}: extra outputs on one side only"),
                }
                let g_fused = loss(&fused)?.backward()?;
                let g_comp = loss(&composed)?.backward()?;
                let mut tensors = vec![("x", x.as_tensor().clone())];
                if radial {
                    tensors.push(("radial", r.as_tensor().clone()));
                }
                let params = varmap.data().lock().unwrap().clone();
                for (name, var) in &params {
                    tensors.push((name.as_str(), var.as_tensor().clone()));
                }
                for (name, t) in tensors {
                    let (a, b) = (g_fused.get(&t), g_comp.get(&t));
                    let (Some(a), Some(b)) = (a, b) else {
                        panic!("case {case} {sides:?}: no gradient for {name}");
                    };
                    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
                    assert_close(&(a / scale)?, &(b / scale)?, 1e-12);
                }
            }
        }
        Ok(())
    }

    /// The fused ops' gradients against central finite differences (f64), for the input, the
    /// radial weights and every parameter.
    #[test]
    fn fused_gradients_match_finite_differences() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let config = So2ConvConfig::new(layout, 2, 2).with_extra_m0_outputs(1);
        let (module, varmap) = Module::new(&config, false, 5)?;
        let Module::Conv(conv) = &module else {
            unreachable!("a convolution was built")
        };
        let edges = 3;
        let wigner = random_wigner(edges, 2, 50, DType::F64)?;
        let x = random_tensor(&[edges, 9, 2], DType::F64, 6)?;
        let r = random_tensor(&[edges, config.radial_len()], DType::F64, 7)?;
        let wrap = candle_core::Error::wrap;
        let both = |(y, e): Outputs| -> candle_core::Result<Tensor> {
            let e = e.expect("extra outputs configured");
            Tensor::cat(&[y.flatten_all()?, e.flatten_all()?], 0)
        };
        check_gradient(
            |x| both(conv.forward_rotated(x, &wigner, Some(&r)).map_err(wrap)?),
            &x,
            1e-6,
        )?
        .assert_within(1e-8);
        check_gradient(
            |r| both(conv.forward_rotated(&x, &wigner, Some(r)).map_err(wrap)?),
            &r,
            1e-6,
        )?
        .assert_within(1e-8);
        let params: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        for name in params.keys() {
            let f = |p: &Tensor| -> candle_core::Result<Tensor> {
                let mut dict = params.clone();
                dict.insert(name.clone(), p.clone());
                let vb = VarBuilder::from_tensors(dict, DType::F64, &Device::Cpu);
                let conv = So2Convolution::new(&config, vb).map_err(wrap)?;
                both(conv.forward_rotated(&x, &wigner, Some(&r)).map_err(wrap)?)
            };
            let check = check_gradient(f, &params[name], 1e-6)?;
            assert!(check.max_rel <= 1e-8, "parameter {name}: {check:?}");
        }
        // One-sided variants, and the linear map without radial weights.
        let xm = random_tensor(&[edges, layout.num_truncated(), 2], DType::F64, 8)?;
        check_gradient(
            |x| {
                both(
                    conv.forward_rotate_out(x, &wigner, Some(&r))
                        .map_err(wrap)?,
                )
            },
            &xm,
            1e-6,
        )?
        .assert_within(1e-8);
        check_gradient(
            |x| both(conv.forward_rotate_in(x, &wigner, None).map_err(wrap)?),
            &x,
            1e-6,
        )?
        .assert_within(1e-8);
        let (lin, _) = Module::new(&So2ConvConfig::new(layout, 2, 3), true, 9)?;
        let Module::Linear(lin) = lin else {
            unreachable!("a linear layer was built")
        };
        check_gradient(
            |x| lin.forward_rotated(x, &wigner, None).map_err(wrap),
            &x,
            1e-6,
        )?
        .assert_within(1e-8);
        Ok(())
    }

    /// f32 kernels (their own GEMM micro-kernels and vector widths) agree with f64, values,
    /// input and parameter gradients, for the convolution and the linear layer, with channels
    /// that the packed products ([`PackedRhs`], whole 64-column panels; on AVX-512) take, with 128
    /// channels, where every product of both passes runs Strassen's algorithm (64 channels
    /// run it for the order-1 block only), and with channels that keep the `gemm` crate.
    #[test]
    fn fused_f32_matches_f64() -> TestResult {
        let layout = SphericalLayout::new(4, 2)?;
        // (C_in, C_out, linear, edges): 2 048 edges give chunks of 256 with two threads (as
        // CI runs; more threads cut smaller chunks), deep enough for the weight gradient's
        // products to run Strassen's algorithm.
        for (c_in, c_out, linear, edges) in [
            (19, 13, false, 70),
            (64, 64, false, 70),
            (64, 64, true, 70),
            (128, 128, false, 70),
            (128, 128, false, 2048),
        ] {
            let config = So2ConvConfig::new(layout, c_in, c_out).with_extra_m0_outputs(3);
            let (module, varmap) = Module::new(&config, linear, 11)?;
            let w64 = random_wigner(edges, 4, 60, DType::F64)?;
            let w32 = random_wigner(edges, 4, 60, DType::F32)?;
            let x = random_tensor(&[edges, 25, c_in], DType::F64, 12)?;
            let r = random_tensor(&[edges, config.radial_len()], DType::F64, 13)?;
            let forward = |x: &Tensor, w: &WignerBlocks, r: &Tensor| match &module {
                Module::Conv(conv) => conv.forward_rotated(x, w, Some(r)),
                Module::Linear(lin) => Ok((lin.forward_rotated(x, w, None)?, None)),
            };
            let (x64, x32) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&x.to_dtype(DType::F32)?)?,
            );
            let (y64, e64) = forward(x64.as_tensor(), &w64, &r)?;
            // The f64 parameters are converted to the input's dtype inside the layer.
            let (y32, e32) = forward(x32.as_tensor(), &w32, &r.to_dtype(DType::F32)?)?;
            // The input gradients (the backward's products with the transposed weights).
            let g64 = loss(&(y64.clone(), e64.clone()))?.backward()?;
            let cast = |t: &Tensor| t.to_dtype(DType::F64);
            let g32 = loss(&(cast(&y32)?, e32.as_ref().map(cast).transpose()?))?.backward()?;
            let (Some(gx64), Some(gx32)) = (g64.get(&x64), g32.get(&x32)) else {
                panic!("no input gradient");
            };
            let scale = gx64.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_close(
                &(gx32.to_dtype(DType::F64)? / scale)?,
                &(gx64 / scale)?,
                1e-5,
            );
            // The parameter gradients (the weight gradient's products `xᵀ·g`), which flow
            // through the f32 kernels into the f64 parameters.
            for (name, var) in varmap.data().lock().unwrap().iter() {
                let (Some(p64), Some(p32)) = (g64.get(var), g32.get(var)) else {
                    panic!("no gradient for {name}");
                };
                let scale = p64.abs()?.max_all()?.to_scalar::<f64>()?;
                assert_close(&(p32 / scale)?, &(p64 / scale)?, 1e-5);
            }
            let scale = y64.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_close(
                &(y32.to_dtype(DType::F64)? / scale)?,
                &(&y64 / scale)?,
                1e-5,
            );
            if let (Some(e64), Some(e32)) = (e64, e32) {
                let scale = e64.abs()?.max_all()?.to_scalar::<f64>()?;
                assert_close(
                    &(e32.to_dtype(DType::F64)? / scale)?,
                    &(&e64 / scale)?,
                    1e-5,
                );
            } else {
                assert!(linear, "the convolution has extra outputs");
            }
        }
        Ok(())
    }

    /// No edges: empty outputs and gradients of the right shapes (parameter gradients zero).
    #[test]
    fn fused_layer_handles_zero_edges() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let config = So2ConvConfig::new(layout, 2, 3).with_extra_m0_outputs(1);
        let (module, varmap) = Module::new(&config, false, 2)?;
        let wigner = random_wigner(0, 2, 0, DType::F64)?;
        let x = Var::from_tensor(&Tensor::zeros((0, 9, 2), DType::F64, &Device::Cpu)?)?;
        let r = Var::from_tensor(&Tensor::zeros(
            (0, config.radial_len()),
            DType::F64,
            &Device::Cpu,
        )?)?;
        let out = module.fused(Sides::Both, x.as_tensor(), &wigner, Some(r.as_tensor()))?;
        assert_eq!(out.0.dims(), &[0, 9, 3]);
        assert_eq!(out.1.as_ref().map(Tensor::dims), Some(&[0, 1][..]));
        let grads = loss(&out)?.backward()?;
        assert_eq!(
            grads.get(x.as_tensor()).map(Tensor::dims),
            Some(&[0, 9, 2][..])
        );
        let params = varmap.data().lock().unwrap().clone();
        for (name, var) in &params {
            let g = grads.get(var.as_tensor()).ok_or("parameter gradient")?;
            let max = g.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert_eq!(max, 0.0, "{name}");
        }
        Ok(())
    }

    #[test]
    fn fused_rejects_bad_arguments() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let (module, _) = Module::new(&So2ConvConfig::new(layout, 2, 2), false, 1)?;
        let Module::Conv(conv) = &module else {
            unreachable!("a convolution was built")
        };
        let wigner = random_wigner(3, 2, 0, DType::F64)?;
        // m-major input where the rotation expects l-major, and the reverse.
        let xm = random_tensor(&[3, 7, 2], DType::F64, 0)?;
        let err = conv.forward_rotated(&xm, &wigner, None).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "x", .. }),
            "{err}"
        );
        let xl = random_tensor(&[3, 9, 2], DType::F64, 0)?;
        let err = conv.forward_rotate_out(&xl, &wigner, None).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "x", .. }),
            "{err}"
        );
        // Blocks for another number of edges, of another dtype, of another lmax.
        let err = conv
            .forward_rotated(&random_tensor(&[4, 9, 2], DType::F64, 0)?, &wigner, None)
            .unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "wigner", .. }),
            "{err}"
        );
        let w32 = random_wigner(3, 2, 0, DType::F32)?;
        let err = conv.forward_rotated(&xl, &w32, None).unwrap_err();
        assert!(
            matches!(
                err,
                EquivariantError::UnsupportedDType { arg: "wigner", .. }
            ),
            "{err}"
        );
        let w3 = random_wigner(3, 3, 0, DType::F64)?;
        let err = conv.forward_rotated(&xl, &w3, None).unwrap_err();
        assert!(
            matches!(
                err,
                EquivariantError::InvalidArgument { name: "wigner", .. }
            ),
            "{err}"
        );
        let r = random_tensor(&[3, 5], DType::F64, 0)?;
        let err = conv.forward_rotated(&xl, &wigner, Some(&r)).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "radial", .. }),
            "{err}"
        );
        Ok(())
    }

    /// Pseudo-random node indices in `0..nodes` (a fixed LCG; repeated nodes and nodes without
    /// edges both occur).
    fn random_index(edges: usize, nodes: usize, seed: u64) -> Vec<u32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..edges)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % nodes as u64) as u32
            })
            .collect()
    }

    /// The gathered message `x[index]` or `cat(x[source], x[target])` built with candle ops.
    /// Values and all gradients (node features, radial weights, parameters) of the gathered
    /// layer equal those of `index_select` (+ `cat`) followed by the per-edge fused layer, for
    /// single and paired gathers, both output sides, several chunks and several backward
    /// parts (3 threads).
    #[test]
    fn gather_layer_matches_index_select_then_layer() -> TestResult {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build()?;
        // (lmax, mmax, c_node, c_out, extra, pair, radial, nodes, edges)
        let cases = [
            (3, 2, 3, 2, 2, true, true, 40, 700),
            (2, 1, 2, 3, 0, false, true, 5, 9),
            (2, 2, 2, 2, 1, true, false, 7, 13),
            (1, 0, 1, 2, 0, true, true, 3, 4),
            (2, 2, 40, 5, 1, true, true, 6, 30),
            (3, 1, 33, 4, 0, false, true, 5, 11),
        ];
        for (case, &(lmax, mmax, c_node, c_out, extra, pair, radial, nodes, edges)) in
            cases.iter().enumerate()
        {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let c_in = if pair { 2 * c_node } else { c_node };
            let config = So2ConvConfig::new(layout, c_in, c_out).with_extra_m0_outputs(extra);
            let (module, varmap) = Module::new(&config, false, 20 + case as u64)?;
            let Module::Conv(conv) = &module else {
                unreachable!("a convolution was built")
            };
            let wigner = random_wigner(edges, lmax, 300 + case as u64, DType::F64)?;
            let dev = Device::Cpu;
            let src = Tensor::new(random_index(edges, nodes, 1 + case as u64).as_slice(), &dev)?;
            // i64 targets: both index dtypes are accepted.
            let dst = Tensor::new(
                random_index(edges, nodes, 99 + case as u64).as_slice(),
                &dev,
            )?
            .to_dtype(DType::I64)?;
            let gather = if pair {
                MessageGather::pair(&src, &dst, nodes)?
            } else {
                MessageGather::single(&src, nodes)?
            };
            let x = Var::from_tensor(&random_tensor(
                &[nodes, layout.num_coefficients(), c_node],
                DType::F64,
                5 + case as u64,
            )?)?;
            let r = Var::from_tensor(&random_tensor(
                &[edges, config.radial_len()],
                DType::F64,
                6,
            )?)?;
            let r_opt = radial.then_some(r.as_tensor());
            for rotate_out in [true, false] {
                let (fused, reference) = pool.install(|| -> crate::error::Result<_> {
                    let msg = gather.message(x.as_tensor())?;
                    Ok(if rotate_out {
                        (
                            conv.forward_gather_rotated(x.as_tensor(), &gather, &wigner, r_opt)?,
                            conv.forward_rotated(&msg, &wigner, r_opt)?,
                        )
                    } else {
                        (
                            conv.forward_gather_rotate_in(x.as_tensor(), &gather, &wigner, r_opt)?,
                            conv.forward_rotate_in(&msg, &wigner, r_opt)?,
                        )
                    })
                })?;
                assert_close(&fused.0, &reference.0, 1e-12);
                match (&fused.1, &reference.1) {
                    (Some(a), Some(b)) => assert_close(a, b, 1e-12),
                    (None, None) => assert_eq!(extra, 0),
                    _ => panic!("case {case}: extra outputs on one side only"),
                }
                let g_fused = pool.install(|| loss(&fused).and_then(|l| l.backward()))?;
                let g_ref = pool.install(|| loss(&reference).and_then(|l| l.backward()))?;
                let mut tensors = vec![("x", x.as_tensor().clone())];
                if radial {
                    tensors.push(("radial", r.as_tensor().clone()));
                }
                let params = varmap.data().lock().unwrap().clone();
                for (name, var) in &params {
                    tensors.push((name.as_str(), var.as_tensor().clone()));
                }
                for (name, t) in tensors {
                    let (Some(a), Some(b)) = (g_fused.get(&t), g_ref.get(&t)) else {
                        panic!("case {case}: no gradient for {name}");
                    };
                    assert_eq!(a.dims(), t.dims(), "case {case}: gradient shape of {name}");
                    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
                    assert_close(&(a / scale)?, &(b / scale)?, 1e-12);
                }
            }
        }
        Ok(())
    }

    /// Gradients of the gathered layer against central finite differences (f64).
    #[test]
    fn gather_gradients_match_finite_differences() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let config = So2ConvConfig::new(layout, 4, 2).with_extra_m0_outputs(1);
        let (module, _) = Module::new(&config, false, 31)?;
        let Module::Conv(conv) = &module else {
            unreachable!("a convolution was built")
        };
        let (nodes, edges) = (3, 5);
        let dev = Device::Cpu;
        let gather = MessageGather::pair(
            &Tensor::new(&[0u32, 1, 2, 2, 0], &dev)?,
            &Tensor::new(&[1u32, 0, 0, 1, 0], &dev)?,
            nodes,
        )?;
        let wigner = random_wigner(edges, 2, 70, DType::F64)?;
        let x = random_tensor(&[nodes, 9, 2], DType::F64, 71)?;
        let r = random_tensor(&[edges, config.radial_len()], DType::F64, 72)?;
        let wrap = candle_core::Error::wrap;
        let both = |(y, e): Outputs| -> candle_core::Result<Tensor> {
            let e = e.expect("extra outputs configured");
            Tensor::cat(&[y.flatten_all()?, e.flatten_all()?], 0)
        };
        check_gradient(
            |x| {
                both(
                    conv.forward_gather_rotated(x, &gather, &wigner, Some(&r))
                        .map_err(wrap)?,
                )
            },
            &x,
            1e-6,
        )?
        .assert_within(1e-8);
        check_gradient(
            |r| {
                both(
                    conv.forward_gather_rotated(&x, &gather, &wigner, Some(r))
                        .map_err(wrap)?,
                )
            },
            &r,
            1e-6,
        )?
        .assert_within(1e-8);
        let single = MessageGather::single(&Tensor::new(&[2u32, 2, 0, 1, 2], &dev)?, nodes)?;
        let (lin_like, _) = Module::new(&So2ConvConfig::new(layout, 2, 3), false, 32)?;
        let Module::Conv(conv1) = &lin_like else {
            unreachable!("a convolution was built")
        };
        check_gradient(
            |x| {
                conv1
                    .forward_gather_rotate_in(x, &single, &wigner, None)
                    .map_err(wrap)
                    .map(|o| o.0)
            },
            &x,
            1e-6,
        )?
        .assert_within(1e-8);
        Ok(())
    }

    /// The packing op equals the composed packing (narrows, sum, difference, transposes) in
    /// value and in the gradient of the fairchem-shaped weight, f32 and f64.
    #[test]
    fn pack_complex_matches_the_composed_packing() -> TestResult {
        // One tile, and several with ragged edges in both directions (tiles of 32).
        for ((n, k), dtype) in [(5, 7), (70, 45)]
            .into_iter()
            .flat_map(|nk| [DType::F64, DType::F32].map(|d| (nk, d)))
        {
            let w = Var::from_tensor(&random_tensor(&[2 * n, k], dtype, 61)?)?;
            assert!(pack_complex_applies(w.as_tensor()));
            let fused = pack_complex(w.as_tensor())?;
            let (wr, wi) = (
                w.as_tensor().narrow(0, 0, n)?,
                w.as_tensor().narrow(0, n, n)?,
            );
            let parts = [wr.clone(), (&wr + &wi)?, (&wi - &wr)?]
                .iter()
                .map(|p| p.t()?.contiguous()?.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let composed = Tensor::cat(&parts, 0)?;
            assert_close(&fused, &composed, 1e-12);
            let probe = random_tensor(&[3 * k * n], dtype, 62)?;
            let grad = |t: &Tensor| -> candle_core::Result<Tensor> {
                let g = (t * &probe)?.sum_all()?.backward()?;
                Ok(g.get(w.as_tensor()).expect("weight gradient").clone())
            };
            assert_close(&grad(&fused)?, &grad(&composed)?, 1e-6);
        }
        Ok(())
    }

    #[test]
    fn chunks_cover_the_edges_evenly_in_whole_parts() {
        for (edges, ec, parts) in [
            (10_000, 256, 2),
            (10_000, 256, 3),
            (7, 256, 2),
            (1, 4, 4),
            (513, 256, 1),
        ] {
            let c = super::chunks(edges, ec, parts);
            assert_eq!(c[0].0, 0);
            assert!(
                c.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0),
                "contiguous"
            );
            assert_eq!(c.iter().map(|c| c.1).sum::<usize>(), edges);
            let (lo, hi) = (c.iter().map(|c| c.1).min(), c.iter().map(|c| c.1).max());
            assert!(
                hi.unwrap() <= ec && hi.unwrap() - lo.unwrap() <= 1,
                "{edges} {ec} {parts}: {c:?}"
            );
            if edges >= parts {
                assert_eq!(c.len() % parts, 0, "{edges} {ec} {parts}");
            }
        }
        // 10⁴ edges on two threads: 40 chunks of 250, not 39 of 256 and one of 16.
        assert_eq!(
            super::chunks(10_000, 256, 2),
            (0..40).map(|i| (250 * i, 250)).collect::<Vec<_>>()
        );
    }

    /// The gathered layer's two outputs leave the op separately (the extra ones through
    /// [`ExtraSlot`]): with only one of them in the loss, every gradient still equals the
    /// per-edge layer's on the gathered message, and the backward pass does not fail for
    /// want of a gradient of the unused output.
    #[test]
    fn gather_outputs_reach_the_loss_alone() -> TestResult {
        let layout = SphericalLayout::new(3, 2)?;
        let config = So2ConvConfig::new(layout, 6, 4).with_extra_m0_outputs(5);
        let (module, varmap) = Module::new(&config, false, 51)?;
        let Module::Conv(conv) = &module else {
            unreachable!("a convolution was built")
        };
        let (nodes, edges) = (20, 300);
        let dev = Device::Cpu;
        let gather = MessageGather::pair(
            &Tensor::new(random_index(edges, nodes, 5).as_slice(), &dev)?,
            &Tensor::new(random_index(edges, nodes, 6).as_slice(), &dev)?,
            nodes,
        )?;
        let wigner = random_wigner(edges, 3, 90, DType::F64)?;
        let x = Var::from_tensor(&random_tensor(&[nodes, 16, 3], DType::F64, 91)?)?;
        let r = Var::from_tensor(&random_tensor(
            &[edges, config.radial_len()],
            DType::F64,
            92,
        )?)?;
        let params = varmap.data().lock().unwrap().clone();
        let mut leaves = vec![x.as_tensor().clone(), r.as_tensor().clone()];
        leaves.extend(params.values().map(|v| v.as_tensor().clone()));
        for use_main in [true, false] {
            let pick = |(y, e): Outputs| -> candle_core::Result<Tensor> {
                let t = if use_main {
                    y
                } else {
                    e.expect("extra outputs configured")
                };
                (&t * random_tensor(t.dims(), DType::F64, 93)?)?.sum_all()
            };
            let fused = pick(conv.forward_gather_rotate_in(
                x.as_tensor(),
                &gather,
                &wigner,
                Some(r.as_tensor()),
            )?)?
            .backward()?;
            let msg = gather.message(x.as_tensor())?;
            let reference =
                pick(conv.forward_rotate_in(&msg, &wigner, Some(r.as_tensor()))?)?.backward()?;
            for (i, t) in leaves.iter().enumerate() {
                let (Some(a), Some(b)) = (fused.get(t), reference.get(t)) else {
                    panic!("use_main {use_main}: no gradient for leaf {i}");
                };
                let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
                assert_close(&(a / scale)?, &(b / scale)?, 1e-12);
            }
        }
        Ok(())
    }

    /// The backward pass is deterministic: two runs give bit-identical gradients (the node
    /// gradient is summed per part in a fixed order, never with atomics or in scheduling
    /// order), for the gathered and the per-edge layer.
    #[test]
    fn backward_is_bitwise_deterministic() -> TestResult {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build()?;
        let layout = SphericalLayout::new(3, 2)?;
        let config = So2ConvConfig::new(layout, 6, 4).with_extra_m0_outputs(2);
        let (module, varmap) = Module::new(&config, false, 41)?;
        let Module::Conv(conv) = &module else {
            unreachable!("a convolution was built")
        };
        let (nodes, edges) = (30, 900);
        let dev = Device::Cpu;
        let gather = MessageGather::pair(
            &Tensor::new(random_index(edges, nodes, 3).as_slice(), &dev)?,
            &Tensor::new(random_index(edges, nodes, 4).as_slice(), &dev)?,
            nodes,
        )?;
        let wigner = random_wigner(edges, 3, 80, DType::F32)?;
        let x = Var::from_tensor(&random_tensor(&[nodes, 16, 3], DType::F32, 81)?)?;
        let xe = Var::from_tensor(&random_tensor(&[edges, 16, 6], DType::F32, 82)?)?;
        let r = random_tensor(&[edges, config.radial_len()], DType::F32, 83)?;
        let params = varmap.data().lock().unwrap().clone();
        let run =
            |gathered: bool| -> std::result::Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
                let grads = pool.install(|| -> crate::error::Result<_> {
                    let (y, extra) = if gathered {
                        conv.forward_gather_rotated(x.as_tensor(), &gather, &wigner, Some(&r))?
                    } else {
                        conv.forward_rotated(xe.as_tensor(), &wigner, Some(&r))?
                    };
                    let extra = extra.expect("extra outputs configured");
                    let l = (y.sum_all()? + extra.sum_all()?)?;
                    Ok(l.backward()?)
                })?;
                let mut out = vec![];
                let leaf = if gathered { &x } else { &xe };
                for t in
                    std::iter::once(leaf.as_tensor()).chain(params.values().map(Var::as_tensor))
                {
                    let g = grads.get(t).ok_or("gradient")?;
                    out.push(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(out)
            };
        for gathered in [true, false] {
            let first = run(gathered)?;
            for _ in 0..3 {
                assert!(
                    run(gathered)? == first,
                    "gathered {gathered}: gradients differ between runs"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gather_rejects_bad_arguments() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let (module, _) = Module::new(&So2ConvConfig::new(layout, 4, 2), false, 1)?;
        let Module::Conv(conv) = &module else {
            unreachable!("a convolution was built")
        };
        let dev = Device::Cpu;
        let wigner = random_wigner(3, 2, 0, DType::F64)?;
        let x = random_tensor(&[2, 9, 2], DType::F64, 0)?;
        let pair = |s: &[u32], t: &[u32], nodes: usize| -> crate::error::Result<MessageGather> {
            MessageGather::pair(&Tensor::new(s, &dev)?, &Tensor::new(t, &dev)?, nodes)
        };
        let ok = pair(&[0, 1, 1], &[1, 0, 0], 2)?;
        assert!(conv.forward_gather_rotated(&x, &ok, &wigner, None).is_ok());
        // A node index out of range, named with its edge, when the gather is built.
        let err = pair(&[0, 1, 1], &[1, 2, 0], 2).unwrap_err();
        assert!(
            matches!(&err, EquivariantError::InvalidArgument { name: "target", reason } if reason.contains("entry 1 is 2")),
            "{err}"
        );
        // Source and target of different lengths.
        let err = pair(&[0, 1, 1], &[1, 0], 2).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "target", .. }),
            "{err}"
        );
        // Indices grouped for 3 nodes, applied to the 2 node rows of x.
        let three = pair(&[0, 1, 1], &[1, 0, 0], 3)?;
        let err = conv
            .forward_gather_rotated(&x, &three, &wigner, None)
            .unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "source", .. }),
            "{err}"
        );
        // Negative i64 index; float index.
        let err = MessageGather::single(&Tensor::new(&[0i64, -1, 1], &dev)?, 2).unwrap_err();
        assert!(
            matches!(&err, EquivariantError::InvalidArgument { name: "index", reason } if reason.contains("entry 1 is -1")),
            "{err}"
        );
        let err = MessageGather::single(&Tensor::new(&[0f32, 1., 1.], &dev)?, 2).unwrap_err();
        assert!(
            matches!(err, EquivariantError::InvalidArgument { name: "index", .. }),
            "{err}"
        );
        // Node channels that do not make in_channels with a pair (3 · 2 ≠ 4).
        let x3 = random_tensor(&[2, 9, 3], DType::F64, 0)?;
        let err = conv
            .forward_gather_rotated(&x3, &ok, &wigner, None)
            .unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "x", .. }),
            "{err}"
        );
        // Wigner blocks for another number of edges; radial weights of the wrong width.
        let w4 = random_wigner(4, 2, 0, DType::F64)?;
        let err = conv.forward_gather_rotated(&x, &ok, &w4, None).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "wigner", .. }),
            "{err}"
        );
        let r = random_tensor(&[3, 5], DType::F64, 0)?;
        let err = conv
            .forward_gather_rotated(&x, &ok, &wigner, Some(&r))
            .unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "radial", .. }),
            "{err}"
        );
        Ok(())
    }

    /// No edges: empty outputs, a zero node gradient of the node shape.
    #[test]
    fn gather_handles_zero_edges() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let (module, _) = Module::new(&So2ConvConfig::new(layout, 4, 3), false, 2)?;
        let Module::Conv(conv) = &module else {
            unreachable!("a convolution was built")
        };
        let dev = Device::Cpu;
        let empty = Tensor::zeros(0, DType::U32, &dev)?;
        let gather = MessageGather::pair(&empty.clone(), &empty, 2)?;
        let wigner = random_wigner(0, 2, 0, DType::F64)?;
        let x = Var::from_tensor(&random_tensor(&[2, 9, 2], DType::F64, 3)?)?;
        let (y, _) = conv.forward_gather_rotated(x.as_tensor(), &gather, &wigner, None)?;
        assert_eq!(y.dims(), &[0, 9, 3]);
        let grads = y.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).ok_or("node gradient")?;
        assert_eq!(g.dims(), &[2, 9, 2]);
        assert_eq!(g.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
        Ok(())
    }
}
