//! Rotation into and out of edge frames, and the SO(2) convolutions of eSCN / EquiformerV2.
//!
//! The per-edge hot path of EquiformerV2 (fairchem 1.x `SO3_Rotation.rotate`,
//! `SO2_Convolution`, `SO2_Linear`, `SO3_Rotation.rotate_inv`) as candle ops with hand-written
//! CPU kernels and backward passes:
//!
//! * [`rotate`]: `x [E, (lmax+1)^2, C]` (l-major, one row per edge) times the per-edge
//!   block-diagonal Wigner-D `[E, Σ_l (2l+1)^2]` gives `[E, n_trunc, C]` directly in the
//!   **m-major, |m| ≤ mmax** order of [`crate::mapping`]. Only the kept rows of each block
//!   `D^l` are applied: the dense `[E, (lmax+1)^2, (lmax+1)^2]` matrix never exists.
//! * [`rotate_inv`]: the way back, `[E, n_trunc, C]` (m-major) → `[E, (lmax+1)^2, C]` with the
//!   transposed blocks restricted to the kept columns, and fairchem's rescale
//!   `sqrt((2l+1)/(2 mmax+1))` of every degree `l > mmax`.
//! * [`So2Convolution`] / [`So2Linear`]: per-order linear maps on the m-major layout. `m = 0`
//!   is a `Linear` with bias over all degrees × channels; for `m > 0` the `(+m, −m)` pair is
//!   the complex product `y₊ = W_r x₊ − W_i x₋`, `y₋ = W_r x₋ + W_i x₊` (convolution) or the
//!   same real map on both (linear). Optional per-edge radial weights multiply the inputs;
//!   the convolution can emit extra `m = 0` scalars (attention logits).
//! * [`So2Convolution::forward_rotated`] (and [`So2Linear::forward_rotated`]): the whole
//!   layer `rotate` → SO(2) map → `rotate_inv` as **one fused op**, the fast path;
//!   `forward_rotate_in` (l-major in, m-major out) and `forward_rotate_out` (m-major in,
//!   l-major out) fuse one side only, for layers that work on the m-major coefficients in
//!   between (EquiformerV2's gate between its two convolutions).
//! * [`So2Convolution::forward_gather_rotated`] / [`So2Convolution::forward_gather_rotate_in`]:
//!   the same fused layer fed by **node** features `[N, (lmax+1)^2, C]` and a
//!   [`MessageGather`] (EquiformerV2's `cat(x[src], x[dst])`): the per-edge message is built
//!   inside the op, so the `[E, (lmax+1)^2, 2C]` gathered tensor never exists and the backward
//!   pass adds straight into a node-sized gradient (deterministically, without atomics).
//!
//! Every op is SO(3)-equivariant when the Wigner blocks are those of the edge frames: for a
//! global rotation `R`, rotating all edge vectors and input embeddings by `R` (and keeping the
//! roll of each frame fixed relative to its edge) leaves the edge-frame coefficients unchanged,
//! so the output rotates by `D(R)`.
//!
//! ## Kernels
//! [`rotate`] / [`rotate_inv`] are per-edge loops (rayon over edge chunks) that walk the
//! Wigner blocks degree by degree: the kept rows, times the degree's scale, go into a small
//! table, and register tiles of up to six output rows × 32 channels (16 with AVX2, 8 or 16 in
//! the portable build) accumulate them with fused multiply-adds over the contiguous channel
//! dimension, compiled for AVX-512 or AVX2 when the CPU has them. The SO(2) maps (`forward*`)
//! run in one custom op per call: each rayon task takes a chunk of 128 or 256 edges (by the
//! layer's size), rotates it into a task-local buffer, multiplies by the radial weights, runs
//! one GEMM per order (`gemm`, single-threaded inside the task) and rotates the result straight
//! into the output, so no edge-sized intermediate tensor exists. For `m > 0` the complex product uses three real
//! GEMMs instead of four (Gauss's trick, on weights packed as `W_rᵀ`, `(W_r + W_i)ᵀ`,
//! `(W_i − W_r)ᵀ`). The backward pass is one fused op too: it recomputes the chunk's rotated
//! input, and writes the input and radial-weight gradients and per-thread weight gradients
//! (summed at the end). Second derivatives are not implemented. The Wigner blocks never
//! receive a gradient (edge frames are detached).
//!
//! ## Example
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use matscale_equivariant::mapping::SphericalLayout;
//! use matscale_equivariant::so2::{rotate, rotate_inv, So2ConvConfig, So2Convolution};
//! use matscale_equivariant::wigner::WignerBlocks;
//!
//! let dev = Device::Cpu;
//! let layout = SphericalLayout::new(2, 1)?;
//! let (edges, channels) = (4, 3);
//! let x = Tensor::randn(0f32, 1., (edges, layout.num_coefficients(), channels), &dev)?;
//! // One frame rotation per edge (normally from the edge vectors).
//! let frames = vec![[[0., 0., 1.], [1., 0., 0.], [0., 1., 0.]]; edges];
//! let wigner = WignerBlocks::from_rotations(&frames, layout.lmax(), DType::F32, &dev)?;
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let conv = So2Convolution::new(&So2ConvConfig::new(layout, channels, 5), vb)?;
//!
//! let in_frame = rotate(&x, &wigner, layout)?; // [E, 7, 3], m-major
//! let radial = Tensor::ones((edges, conv.radial_len()), DType::F32, &dev)?;
//! let (y, _extra) = conv.forward(&in_frame, Some(&radial))?; // [E, 7, 5]
//! let out = rotate_inv(&y, &wigner, layout)?; // [E, 9, 5], l-major
//! assert_eq!(out.dims(), &[edges, 9, 5]);
//!
//! // The same layer as one fused op (the fast path).
//! let (fused, _) = conv.forward_rotated(&x, &wigner, Some(&radial))?;
//! let diff = (fused - &out)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-4);
//! # Ok::<(), matscale_equivariant::error::EquivariantError>(())
//! ```
//!
//! ## Loading fairchem weights
//! The parameter names under the module's [`VarBuilder`] prefix are fairchem's state-dict
//! names: `fc_m0.weight` `[(lmax+1)·C_out + extra, (lmax+1)·C_in]`, `fc_m0.bias`, and
//! `so2_m_conv.{m-1}.fc.weight` `[2·n_m·C_out, n_m·C_in]` (convolution) or
//! `so2_m_fc.{m-1}.weight` `[n_m·C_out, n_m·C_in]` (linear), with `n_m = lmax − m + 1`.
//! fairchem's `rad_func.*` parameters belong to the radial MLP that produces the `radial`
//! argument (see [`So2Convolution::radial_len`]); here it is computed by the caller.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::activation::Float;
use crate::buffer::Overwrite;
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};
use crate::mapping::SphericalLayout;
pub use crate::so2_fused::{fused_chunk_cap, MessageGather};
use crate::so2_fused::{pack_complex, pack_complex_applies, LayerShape, So2LayerOp};
use crate::wigner::{block_offset, WignerBlocks};

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

fn check_float(arg: &'static str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        found => Err(EquivariantError::UnsupportedDType { arg, found }),
    }
}

fn shape_error(arg: &'static str, expected: String, t: &Tensor) -> EquivariantError {
    EquivariantError::ShapeMismatch {
        arg,
        expected,
        found: t.dims().to_vec(),
    }
}

/// Checks `x` is `[E, rows, C]` and `wigner` holds `E` edges of degree `lmax`, both of one
/// float dtype; returns `(E, C)`.
fn check_rotate_args(
    x: &Tensor,
    x_arg: &'static str,
    rows: usize,
    rows_desc: &str,
    wigner: &WignerBlocks,
    layout: SphericalLayout,
) -> Result<(usize, usize)> {
    check_float(x_arg, x)?;
    check_float("wigner", wigner.blocks())?;
    let expected = || format!("[num_edges, {rows_desc} = {rows}, channels]");
    let &[e, r, c] = x.dims() else {
        return Err(shape_error(x_arg, expected(), x));
    };
    if r != rows {
        return Err(shape_error(x_arg, expected(), x));
    }
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
    if wigner.num_edges() != e {
        return Err(shape_error(
            "wigner",
            format!("[num_edges = {e}, {}]", layout.wigner_len()),
            wigner.blocks(),
        ));
    }
    if wigner.blocks().dtype() != x.dtype() {
        return Err(EquivariantError::UnsupportedDType {
            arg: "wigner",
            found: wigner.blocks().dtype(),
        });
    }
    Ok((e, c))
}

/// Contiguous slice of a CPU storage described by `layout`.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    crate::buffer::contiguous_input(T::cpu_storage_as_slice(s)?, l, "matscale so2 kernel")
}

/// Number of edges per rayon task so that each task writes roughly `target` elements.
fn edges_per_task(elems_per_edge: usize, target: usize) -> usize {
    (target / elems_per_edge.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// Vector kernels with runtime CPU-feature dispatch
// ---------------------------------------------------------------------------------------------

/// `y += a * x`, with fused multiply-adds (as the register tiles of [`combine_rows`]).
#[inline(always)]
fn axpy<T: Float>(y: &mut [T], a: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(xi, *yi);
    }
}

/// Generates `$name`, which runs the `#[inline(always)]` generic kernel `$kernel` compiled
/// for AVX-512 or AVX2+FMA when the running CPU has them (plain code otherwise).
///
/// The second form names the callee of each build, `[avx512, avx2, portable]`, for kernels
/// with a per-instruction-set const parameter (the rotations' register tile width:
/// `[to_edge_kernel::<T, _, TILE_AVX512>, …]`; `T` is the generated function's type
/// parameter).
macro_rules! dispatch_kernel {
    ($vis:vis $name:ident, $kernel:ident, ($($arg:ident : $ty:ty),*)) => {
        $crate::so2::dispatch_kernel!($vis $name, [$kernel, $kernel, $kernel], ($($arg : $ty),*));
    };
    ($vis:vis $name:ident, [$avx512:expr, $avx2:expr, $portable:expr], ($($arg:ident : $ty:ty),*)) => {
        $vis fn $name<T: $crate::activation::Float>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512<T: $crate::activation::Float>($($arg: $ty),*) {
                    $avx512($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2<T: $crate::activation::Float>($($arg: $ty),*) {
                    $avx2($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}
pub(crate) use dispatch_kernel;

// ---------------------------------------------------------------------------------------------
// Rotation into / out of the edge frame
// ---------------------------------------------------------------------------------------------

/// Which way a [`RotateOp`] maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// l-major `[E, (lmax+1)^2, C]` → m-major `[E, n_trunc, C]`: `y = D|kept rows · x`.
    ToEdge,
    /// m-major `[E, n_trunc, C]` → l-major `[E, (lmax+1)^2, C]`: `x = D^T|kept columns · y`.
    FromEdge,
}

impl Direction {
    fn adjoint(self) -> Self {
        match self {
            Self::ToEdge => Self::FromEdge,
            Self::FromEdge => Self::ToEdge,
        }
    }
}

/// Block-diagonal rotation between the l-major layout and the truncated m-major edge-frame
/// layout. `rescale` multiplies block `l` by [`SphericalLayout::rotate_inv_rescale`].
/// The adjoint of `(direction, rescale)` is `(direction.adjoint(), rescale)`. With
/// `wigner_grad` the backward also returns the blocks' gradient ([`BlockOuterOp`]), and every
/// op of the backward is itself differentiable in all its inputs, to any order.
#[derive(Debug, Clone)]
struct RotateOp {
    layout: SphericalLayout,
    direction: Direction,
    rescale: bool,
    wigner_grad: bool,
}

/// Precomputed per-call tables of a [`RotateOp`].
pub(crate) struct RotatePlan<T> {
    lmax: usize,
    mmax: usize,
    /// m-major slot of full l-major coefficient `l^2 + m + l` (unused when `|m| > mmax`).
    slot: Vec<usize>,
    /// Scale of each degree.
    scale: Vec<T>,
    wigner_len: usize,
    /// `(lmax+1)^2`.
    full: usize,
    /// Number of kept (m-major) coefficients.
    trunc: usize,
}

impl<T: WithDType> RotatePlan<T> {
    /// The tables of a rotation for `layout`, with fairchem's `rotate_inv` rescale of each
    /// degree when `rescale`.
    pub(crate) fn new(layout: SphericalLayout, rescale: bool) -> Self {
        let mut slot = vec![usize::MAX; layout.num_coefficients()];
        for (i, (l, m)) in layout.m_major_degrees_orders().into_iter().enumerate() {
            slot[crate::mapping::l_major_index(l, m)] = i;
        }
        let scale = (0..=layout.lmax())
            .map(|l| {
                T::from_f64(if rescale {
                    layout.rotate_inv_rescale(l)
                } else {
                    1.0
                })
            })
            .collect();
        RotatePlan {
            lmax: layout.lmax(),
            mmax: layout.mmax(),
            slot,
            scale,
            wigner_len: layout.wigner_len(),
            full: layout.num_coefficients(),
            trunc: layout.num_truncated(),
        }
    }
}

impl RotateOp {
    fn plan<T: Float>(&self) -> RotatePlan<T> {
        RotatePlan::new(self.layout, self.rescale)
    }

    fn rows(&self) -> (usize, usize) {
        let (full, trunc) = (self.layout.num_coefficients(), self.layout.num_truncated());
        match self.direction {
            Direction::ToEdge => (full, trunc),
            Direction::FromEdge => (trunc, full),
        }
    }

    fn run<T: Float>(&self, x: &[T], w: &[T], edges: usize, c: usize) -> Vec<T> {
        let plan = self.plan::<T>();
        let (rows_in, rows_out) = self.rows();
        let mut out = crate::buffer::uninit_vec::<T>(edges * rows_out * c);
        if out.is_empty() {
            // SAFETY: an empty vector has no element to initialise.
            return unsafe { crate::buffer::assume_init(out) };
        }
        let per_task = edges_per_task(rows_out * c, 1 << 14);
        let direction = self.direction;
        out.par_chunks_mut(per_task * rows_out * c)
            .enumerate()
            .for_each(|(task, out_chunk)| {
                let e0 = task * per_task;
                let ne = out_chunk.len() / (rows_out * c);
                let x_chunk = &x[e0 * rows_in * c..(e0 + ne) * rows_in * c];
                let w_chunk = &w[e0 * plan.wigner_len..(e0 + ne) * plan.wigner_len];
                match direction {
                    Direction::ToEdge => to_edge_uninit(&plan, x_chunk, w_chunk, out_chunk, c),
                    Direction::FromEdge => from_edge_uninit(&plan, x_chunk, w_chunk, out_chunk, c),
                }
            });
        // SAFETY: the chunks cover `out`, and the rotation kernels write every element of
        // their output chunk (the input and Wigner chunks hold the same edges).
        unsafe { crate::buffer::assume_init(out) }
    }
}

/// Channels per register tile of [`combine_rows`] (its `W`), by instruction set, so that the
/// `GROUP · W` f32 partial sums of a tile stay in registers: 12 of the 32 `zmm` registers with
/// AVX-512 (32 channels), 12 of the 16 `ymm` with AVX2 (16 channels: 32 spilled and made the
/// rotations 8–30 % slower, docs/BENCHMARKS.md), and for the portable build 8 channels (12 of
/// the 16 `xmm` of SSE2) on x86-64, 16 elsewhere (24 of the 32 NEON registers of aarch64).
const TILE_AVX512: usize = 32;
/// See [`TILE_AVX512`].
const TILE_AVX2: usize = 16;
/// See [`TILE_AVX512`].
const TILE_PORTABLE: usize = if cfg!(target_arch = "x86_64") { 8 } else { 16 };

/// Largest tile width: the scratch of [`combine_rows`]' ragged tail.
const TILE_MAX: usize = TILE_AVX512;
const _: () = assert!(TILE_AVX2 <= TILE_MAX && TILE_PORTABLE <= TILE_MAX);

/// Most inputs of one [`combine_rows`] call: `2l + 1` for `l ≤ MAX_LMAX`.
const MAX_TERMS: usize = 2 * SphericalLayout::MAX_LMAX + 1;

/// `out[out_off[i]..][..c] = Σ_p coef(i, p) · src[src_off[p]..][..c]` for `R` output rows,
/// each written once and never read (so `out` may be uninitialised: [`Overwrite`]).
///
/// Register-blocked: the `R × W` partial sums of a tile of `W` channels stay in registers while
/// the inputs stream past, so each input tile is loaded once for all `R` outputs and each
/// output is stored once (instead of an `axpy` per term).
#[inline(always)]
fn combine_rows<T: Float, O: Overwrite<T> + ?Sized, const R: usize, const W: usize>(
    out: &mut O,
    out_off: [usize; R],
    src: &[T],
    src_off: &[usize],
    coef: impl Fn(usize, usize) -> T,
    c: usize,
) {
    let mut cb = 0;
    while cb + W <= c {
        let mut acc = [[T::zero(); W]; R];
        for (p, &off) in src_off.iter().enumerate() {
            let xs: &[T; W] = src[off + cb..off + cb + W]
                .try_into()
                .expect("a tile has W elements");
            for (i, a) in acc.iter_mut().enumerate() {
                let d = coef(i, p);
                for (a, &x) in a.iter_mut().zip(xs) {
                    *a = d.mul_add(x, *a);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            out.put(out_off[i] + cb, a);
        }
        cb += W;
    }
    if cb < c {
        let mut acc = [T::zero(); TILE_MAX];
        let acc = &mut acc[..c - cb];
        for (i, &o) in out_off.iter().enumerate() {
            acc.fill(T::zero());
            for (p, &off) in src_off.iter().enumerate() {
                axpy(acc, coef(i, p), &src[off + cb..off + c]);
            }
            out.put(o + cb, acc);
        }
    }
}

/// Most output rows of one [`combine_rows`] call: with each instruction set's tile width
/// ([`TILE_AVX512`]) its `GROUP` rows of f32 partial sums take 12 vector registers, which
/// leaves room for the input tile and a broadcast.
const GROUP: usize = 6;

/// [`combine_rows`] for `outputs.len()` rows, in as few groups of at most [`GROUP`] as
/// possible, of sizes that differ by at most one (9 rows: 5 + 4, not 4 + 4 + 1, so that each
/// input tile is loaded twice, not three times, and no group is load-bound).
#[inline(always)]
fn combine_groups<T: Float, O: Overwrite<T> + ?Sized, const W: usize>(
    out: &mut O,
    outputs: &[usize],
    src: &[T],
    src_off: &[usize],
    coef: impl Fn(usize, usize) -> T,
    c: usize,
) {
    let n = outputs.len();
    let groups = n.div_ceil(GROUP).max(1);
    let (base, longer) = (n / groups, n % groups);
    let mut first = 0;
    for g in 0..groups {
        let len = base + usize::from(g < longer);
        let group = &outputs[first..first + len];
        let coef = |i: usize, p: usize| coef(first + i, p);
        match *group {
            [a, b, cc, d, e, f] => {
                combine_rows::<_, _, _, W>(out, [a, b, cc, d, e, f], src, src_off, coef, c)
            }
            [a, b, cc, d, e] => {
                combine_rows::<_, _, _, W>(out, [a, b, cc, d, e], src, src_off, coef, c)
            }
            [a, b, cc, d] => combine_rows::<_, _, _, W>(out, [a, b, cc, d], src, src_off, coef, c),
            [a, b, cc] => combine_rows::<_, _, _, W>(out, [a, b, cc], src, src_off, coef, c),
            [a, b] => combine_rows::<_, _, _, W>(out, [a, b], src, src_off, coef, c),
            [a] => combine_rows::<_, _, _, W>(out, [a], src, src_off, coef, c),
            [] => {}
            _ => unreachable!("groups hold at most GROUP rows"),
        }
        first += len;
    }
}

/// Where [`to_edge_rows_kernel`] reads the l-major input rows of each edge.
#[derive(Clone, Copy)]
pub(crate) enum EdgeRows<'a> {
    /// Edge `e`'s rows are block `e` of the input (`[E, (lmax+1)², C]`).
    PerEdge,
    /// Edge `e`'s input is gathered from node rows (`[N, (lmax+1)², c]`, `c` channels):
    /// node `source[e]` gives its channels `0..c` and, when present, node `target[e]` its
    /// channels `c..2c` (EquiformerV2's message `cat(x[src], x[dst])`, never materialised).
    Gathered {
        /// The node of each edge's first `c` channels.
        source: &'a [u32],
        /// The node of each edge's second `c` channels, for a two-node message.
        target: Option<&'a [u32]>,
    },
}

impl EdgeRows<'_> {
    /// Input pieces of `c` channels per edge: 1, or 2 for a two-node message.
    fn pieces(&self) -> usize {
        match self {
            Self::Gathered {
                target: Some(_), ..
            } => 2,
            _ => 1,
        }
    }

    /// Offset in the input of the rows of edge `e`'s piece `h` (`row` elements per block).
    #[inline(always)]
    fn base(&self, e: usize, h: usize, row: usize) -> usize {
        match self {
            Self::PerEdge => e * row,
            Self::Gathered { source, target } => {
                let node = match (h, target) {
                    (0, _) => source[e],
                    (_, Some(t)) => t[e],
                    (_, None) => unreachable!("a one-node message has one piece"),
                };
                node as usize * row
            }
        }
    }
}

/// `out[e, slot(l,m), :] = s_l Σ_j D^l[m+l, j] x[e, l²+j, :]` for the kept `|m| ≤ mmax`.
///
/// Writes every element of `out` (`E` whole edges, `[E, trunc, C]`) and reads none; panics if
/// `out` is not whole edges or `x` or `w` holds fewer.
#[inline(always)]
fn to_edge_kernel<T: Float, O: Overwrite<T> + ?Sized, const W: usize>(
    plan: &RotatePlan<T>,
    x: &[T],
    w: &[T],
    out: &mut O,
    c: usize,
) {
    let edges = out.out_len() / (plan.trunc * c).max(1);
    assert!(
        x.len() >= edges * plan.full * c,
        "to_edge: the output is not whole edges, or the input holds fewer edges than it"
    );
    to_edge_rows_kernel::<T, O, W>(plan, x, w, EdgeRows::PerEdge, out, c);
}

/// [`to_edge_kernel`] with each edge's input rows where `rows` says: `x` holds `c` channels
/// per row, and each edge's output row holds `c` times [`EdgeRows::pieces`] channels, piece
/// `h` in channels `h·c..(h+1)·c`.
///
/// Writes every element of `out` (`E` whole edges) and reads none; panics if `out` is not
/// whole edges, `w` holds fewer, or a row lies outside `x`.
#[inline(always)]
fn to_edge_rows_kernel<T: Float, O: Overwrite<T> + ?Sized, const W: usize>(
    plan: &RotatePlan<T>,
    x: &[T],
    w: &[T],
    rows_in: EdgeRows<'_>,
    out: &mut O,
    c: usize,
) {
    let mut src_off = [0usize; MAX_TERMS];
    let mut dst_off = [0usize; MAX_TERMS];
    // The kept rows of the degree's block, times its scale: `[rows, k]`.
    let mut tab = [T::zero(); MAX_TERMS * MAX_TERMS];
    let pieces = rows_in.pieces();
    let c_row = pieces * c;
    let out_row = plan.trunc * c_row;
    let block_in = plan.full * c;
    let edges = out.out_len() / out_row.max(1);
    assert!(
        out.out_len() == edges * out_row && w.len() >= edges * plan.wigner_len,
        "to_edge: the output is not whole edges, or the input holds fewer edges than it"
    );
    for (e, we) in w.chunks_exact(plan.wigner_len).take(edges).enumerate() {
        let mut bases = [0usize; 2];
        for (h, b) in bases[..pieces].iter_mut().enumerate() {
            *b = rows_in.base(e, h, block_in);
            assert!(
                *b + block_in <= x.len(),
                "to_edge: edge {e} reads rows outside the input"
            );
        }
        for l in 0..=plan.lmax {
            let k = 2 * l + 1;
            let block = &we[block_offset(l)..block_offset(l) + k * k];
            let mm = l.min(plan.mmax);
            let s = plan.scale[l];
            let rows = 2 * mm + 1;
            let first = l - mm;
            for (i, t) in tab[..rows * k].chunks_exact_mut(k).enumerate() {
                for (t, &d) in t
                    .iter_mut()
                    .zip(&block[(first + i) * k..(first + i + 1) * k])
                {
                    *t = d * s;
                }
            }
            for (h, &base) in bases[..pieces].iter().enumerate() {
                for (j, off) in src_off[..k].iter_mut().enumerate() {
                    *off = base + (l * l + j) * c;
                }
                for (i, off) in dst_off[..rows].iter_mut().enumerate() {
                    *off = e * out_row + plan.slot[l * l + l - mm + i] * c_row + h * c;
                }
                combine_groups::<_, _, W>(
                    out,
                    &dst_off[..rows],
                    x,
                    &src_off[..k],
                    |i, j| tab[i * k + j],
                    c,
                );
            }
        }
    }
}

/// `out[e, l²+j, :] = s_l Σ_{|m| ≤ mmax} D^l[m+l, j] y[e, slot(l,m), :]`.
///
/// Writes every element of `out` (`E` whole edges, `[E, (lmax+1)², C]`) and reads none; panics
/// if `out` is not whole edges or `y` or `w` holds fewer.
#[inline(always)]
fn from_edge_kernel<T: Float, O: Overwrite<T> + ?Sized, const W: usize>(
    plan: &RotatePlan<T>,
    y: &[T],
    w: &[T],
    out: &mut O,
    c: usize,
) {
    let out_row = plan.full * c;
    let edges = out.out_len() / out_row.max(1);
    assert!(
        out.out_len() == edges * out_row && y.len() >= edges * plan.trunc * c,
        "from_edge: the output is not whole edges, or the input holds fewer edges than it"
    );
    from_edge_rows_kernel::<T, O, W>(plan, y, w, EdgeRows::PerEdge, out, c, edges);
}

/// `out[rows(e, h)] += (adjoint rotation of y[e])[channels h·c..(h+1)·c]`: the adjoint of
/// [`to_edge_rows_kernel`], added into the node rows of `out` (`[N, (lmax+1)², c]`) that
/// `rows` names for each edge's piece `h`.
///
/// Edges that share a node add into its rows one after another, in edge order. Panics if `y`
/// or `w` holds fewer than `edges` edges or a row lies outside `out`.
#[inline(always)]
fn from_edge_add_kernel<T: Float, const W: usize>(
    plan: &RotatePlan<T>,
    y: &[T],
    w: &[T],
    rows: EdgeRows<'_>,
    out: &mut [T],
    c: usize,
    edges: usize,
) {
    from_edge_rows_kernel::<T, _, W>(plan, y, w, rows, &mut AddInto(out), c, edges);
}

/// A sink whose [`put`](Overwrite::put) adds into the slice instead of overwriting it, for
/// the kernels that accumulate into node rows ([`from_edge_add_kernel`]). Nothing written
/// through it is ever passed to [`crate::buffer::assume_init`]: the slice is initialised.
struct AddInto<'a, T>(&'a mut [T]);

impl<T: Float> Overwrite<T> for AddInto<'_, T> {
    #[inline(always)]
    fn out_len(&self) -> usize {
        self.0.len()
    }

    #[inline(always)]
    fn put(&mut self, at: usize, src: &[T]) {
        for (d, &v) in self.0[at..at + src.len()].iter_mut().zip(src) {
            *d += v;
        }
    }
}

/// [`from_edge_kernel`] for `edges` edges of `y` (m-major, `c` times [`EdgeRows::pieces`]
/// channels per row), each piece `h` of an edge written through `out` to the l-major rows
/// that `rows` names (`c` channels per row).
#[inline(always)]
fn from_edge_rows_kernel<T: Float, O: Overwrite<T> + ?Sized, const W: usize>(
    plan: &RotatePlan<T>,
    y: &[T],
    w: &[T],
    rows_out: EdgeRows<'_>,
    out: &mut O,
    c: usize,
    edges: usize,
) {
    let mut src_off = [0usize; MAX_TERMS];
    let mut dst_off = [0usize; MAX_TERMS];
    // The kept rows of the degree's block, times its scale, transposed: `[k, rows]`.
    let mut tab = [T::zero(); MAX_TERMS * MAX_TERMS];
    let pieces = rows_out.pieces();
    let c_row = pieces * c;
    let block_out = plan.full * c;
    assert!(
        y.len() >= edges * plan.trunc * c_row && w.len() >= edges * plan.wigner_len,
        "from_edge: the input holds fewer edges than the output"
    );
    for (e, (ye, we)) in y
        .chunks_exact(plan.trunc * c_row)
        .zip(w.chunks_exact(plan.wigner_len))
        .take(edges)
        .enumerate()
    {
        let mut bases = [0usize; 2];
        for (h, b) in bases[..pieces].iter_mut().enumerate() {
            *b = rows_out.base(e, h, block_out);
            assert!(
                *b + block_out <= out.out_len(),
                "from_edge: edge {e} writes rows outside the output"
            );
        }
        for l in 0..=plan.lmax {
            let k = 2 * l + 1;
            let block = &we[block_offset(l)..block_offset(l) + k * k];
            let mm = l.min(plan.mmax);
            let s = plan.scale[l];
            let rows = 2 * mm + 1;
            let first = l - mm;
            for (i, row) in block[first * k..(first + rows) * k]
                .chunks_exact(k)
                .enumerate()
            {
                for (j, &d) in row.iter().enumerate() {
                    tab[j * rows + i] = d * s;
                }
            }
            for (h, &base) in bases[..pieces].iter().enumerate() {
                for (i, off) in src_off[..rows].iter_mut().enumerate() {
                    *off = plan.slot[l * l + l - mm + i] * c_row + h * c;
                }
                for (j, off) in dst_off[..k].iter_mut().enumerate() {
                    *off = base + (l * l + j) * c;
                }
                combine_groups::<_, _, W>(
                    out,
                    &dst_off[..k],
                    ye,
                    &src_off[..rows],
                    |j, i| tab[j * rows + i],
                    c,
                );
            }
        }
    }
}

/// The rotation kernels, compiled per instruction set with its register tile width.
macro_rules! dispatch_tiled {
    ($vis:vis $name:ident, $kernel:ident, ($($arg:ident : $ty:ty),*)) => {
        dispatch_kernel!(
            $vis $name,
            [
                $kernel::<T, _, TILE_AVX512>,
                $kernel::<T, _, TILE_AVX2>,
                $kernel::<T, _, TILE_PORTABLE>
            ],
            ($($arg : $ty),*)
        );
    };
}

dispatch_tiled!(pub(crate) to_edge, to_edge_kernel, (plan: &RotatePlan<T>, x: &[T], w: &[T], out: &mut [T], c: usize));
#[cfg(test)] // the overwriting form is only compared against in tests
dispatch_tiled!(pub(crate) from_edge, from_edge_kernel, (plan: &RotatePlan<T>, y: &[T], w: &[T], out: &mut [T], c: usize));
dispatch_tiled!(pub(crate) to_edge_uninit, to_edge_kernel, (plan: &RotatePlan<T>, x: &[T], w: &[T], out: &mut [MaybeUninit<T>], c: usize));
dispatch_tiled!(pub(crate) from_edge_uninit, from_edge_kernel, (plan: &RotatePlan<T>, y: &[T], w: &[T], out: &mut [MaybeUninit<T>], c: usize));
dispatch_kernel!(
    pub(crate) from_edge_add,
    [
        from_edge_add_kernel::<T, TILE_AVX512>,
        from_edge_add_kernel::<T, TILE_AVX2>,
        from_edge_add_kernel::<T, TILE_PORTABLE>
    ],
    (plan: &RotatePlan<T>, y: &[T], w: &[T], rows: EdgeRows<'_>, out: &mut [T], c: usize, edges: usize)
);
dispatch_tiled!(pub(crate) to_edge_rows, to_edge_rows_kernel, (plan: &RotatePlan<T>, x: &[T], w: &[T], rows: EdgeRows<'_>, out: &mut [T], c: usize));

/// Inputs `(x [E, rows_in, C], wigner)`.
impl FloatKernel<2> for RotateOp {
    fn run<T: Float>(&self, [(x, l), (w, _)]: [(&[T], &Layout); 2]) -> candle_core::Result<Vec<T>> {
        let (edges, _, c) = l.shape().dims3()?;
        Ok(self.run(x, w, edges, c))
    }
}

impl CustomOp2 for RotateOp {
    fn name(&self) -> &'static str {
        match self.direction {
            Direction::ToEdge => "matscale-rotate-to-edge",
            Direction::FromEdge => "matscale-rotate-from-edge",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[edges, _, c] = l1.shape().dims() else {
            candle_core::bail!("{}: expected a rank-3 input", self.name());
        };
        let (_, rows_out) = self.rows();
        let shape = Shape::from((edges, rows_out, c));
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let to_edge = self.direction == Direction::ToEdge;
        crate::cuda::so2::rotate(s1, l1, s2, l2, self.layout, to_edge, self.rescale)
    }

    fn bwd(
        &self,
        x: &Tensor,
        wigner: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let adjoint = RotateOp {
            layout: self.layout,
            direction: self.direction.adjoint(),
            ..*self
        };
        let g = grad_res.contiguous()?;
        if !self.wigner_grad {
            // With its own backward (the adjoint's adjoint), so gradients of gradients flow.
            return Ok((Some(g.apply_op2(&wigner.detach(), adjoint)?), None));
        }
        let grad_x = g.apply_op2(wigner, adjoint)?;
        // ∂L/∂D^l[i][j] = s_l Σ_c (m-major row of i)·(l-major row l² + j): the output
        // gradient and the input to the edge frame, the input and the output gradient back.
        let x = x.contiguous()?;
        let (m_major, l_major) = match self.direction {
            Direction::ToEdge => (&g, &x),
            Direction::FromEdge => (&x, &g),
        };
        let outer = BlockOuterOp {
            layout: self.layout,
            rescale: self.rescale,
        };
        Ok((Some(grad_x), Some(m_major.apply_op2(l_major, outer)?)))
    }
}

/// `(a [E, n_trunc, C] m-major, b [E, (lmax+1)², C] l-major)` → `[E, wigner_len]`, block `l`
/// entry `(i, j)` = `s_l Σ_c a[e, slot(l, i − l), c] · b[e, l² + j, c]` where `|i − l| ≤ mmax`,
/// else 0 (`s_l` the rotate-inverse rescale when `rescale`): the gradient of a [`RotateOp`]
/// with respect to its blocks. Bilinear, so its backward is two rotations by the cotangent
/// blocks (`a`: to the edge frame of `b`; `b`: back from the edge frame of `a`), which are
/// differentiable again.
#[derive(Debug, Clone, Copy)]
struct BlockOuterOp {
    layout: SphericalLayout,
    rescale: bool,
}

impl BlockOuterOp {
    fn run<T: Float>(&self, a: &[T], b: &[T], edges: usize, c: usize) -> Vec<T> {
        let plan = RotatePlan::<T>::new(self.layout, self.rescale);
        let (full, trunc, wlen) = (plan.full, plan.trunc, plan.wigner_len);
        let mut out = vec![T::ZERO; edges * wlen];
        let per_task = edges_per_task(wlen * c, 1 << 14);
        out.par_chunks_mut(per_task * wlen)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (k, row) in chunk.chunks_exact_mut(wlen).enumerate() {
                    let e = task * per_task + k;
                    let (ae, be) = (
                        &a[e * trunc * c..(e + 1) * trunc * c],
                        &b[e * full * c..(e + 1) * full * c],
                    );
                    for l in 0..=plan.lmax {
                        let n = 2 * l + 1;
                        let block = &mut row[block_offset(l)..block_offset(l) + n * n];
                        let mm = l.min(plan.mmax);
                        for i in l - mm..=l + mm {
                            let s = plan.slot[l * l + i];
                            let ar = &ae[s * c..(s + 1) * c];
                            for (j, d) in block[i * n..(i + 1) * n].iter_mut().enumerate() {
                                let br = &be[(l * l + j) * c..(l * l + j + 1) * c];
                                let dot = ar
                                    .iter()
                                    .zip(br)
                                    .fold(T::ZERO, |acc, (&p, &q)| p.mul_add(q, acc));
                                *d = plan.scale[l] * dot;
                            }
                        }
                    }
                }
            });
        out
    }
}

/// Inputs `(a, b)` of a [`BlockOuterOp`].
impl FloatKernel<2> for BlockOuterOp {
    fn run<T: Float>(
        &self,
        [(a, la), (b, _)]: [(&[T], &Layout); 2],
    ) -> candle_core::Result<Vec<T>> {
        let (edges, _, c) = la.shape().dims3()?;
        Ok(self.run(a, b, edges, c))
    }
}

impl CustomOp2 for BlockOuterOp {
    fn name(&self) -> &'static str {
        "matscale-rotate-block-outer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let edges = self.check(l1, l2)?;
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
        Ok((out, Shape::from((edges, self.layout.wigner_len()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let edges = self.check(l1, l2)?;
        let out = crate::cuda::so2::block_outer(s1, l1, s2, l2, self.layout, self.rescale)?;
        Ok((out, Shape::from((edges, self.layout.wigner_len()))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let cot = grad_res.contiguous()?;
        let rotation = |direction| RotateOp {
            layout: self.layout,
            direction,
            rescale: self.rescale,
            wigner_grad: true,
        };
        let grad_a = b
            .contiguous()?
            .apply_op2(&cot, rotation(Direction::ToEdge))?;
        let grad_b = a
            .contiguous()?
            .apply_op2(&cot, rotation(Direction::FromEdge))?;
        Ok((Some(grad_a), Some(grad_b)))
    }
}

impl BlockOuterOp {
    /// The number of edges, checking `a` is `[E, n_trunc, C]` and `b` `[E, (lmax+1)², C]`.
    fn check(&self, la: &Layout, lb: &Layout) -> candle_core::Result<usize> {
        let (ea, ta, ca) = la.shape().dims3()?;
        let (eb, fb, cb) = lb.shape().dims3()?;
        if ea != eb
            || ca != cb
            || ta != self.layout.num_truncated()
            || fb != self.layout.num_coefficients()
        {
            candle_core::bail!(
                "{}: inconsistent shapes {:?} and {:?}",
                self.name(),
                la.shape(),
                lb.shape()
            );
        }
        Ok(ea)
    }
}

/// Rotates l-major embeddings into the edge frames and keeps the orders `|m| ≤ mmax`, in
/// m-major order (fairchem's `rotate` followed by `_m_primary`, fused).
///
/// * `x`: `[E, (lmax+1)^2, C]`, l-major, one row per edge (already gathered), f32 or f64.
/// * `wigner`: block-diagonal Wigner-D of each edge frame ([`WignerBlocks`], `lmax` equal to
///   the layout's, same dtype as `x`); it gets no gradient.
///
/// Returns `[E, layout.num_truncated(), C]`, m-major. Differentiable with respect to `x`.
///
/// # Errors
/// [`EquivariantError::ShapeMismatch`] / [`EquivariantError::UnsupportedDType`] naming the
/// argument, [`EquivariantError::InvalidArgument`] if the blocks' `lmax` differs from the
/// layout's; candle errors from the device.
pub fn rotate(x: &Tensor, wigner: &WignerBlocks, layout: SphericalLayout) -> Result<Tensor> {
    apply_rotation(x, wigner, None, layout, Direction::ToEdge)
}

/// Rotates m-major edge-frame coefficients back to l-major embeddings (fairchem's
/// `_l_primary` followed by `rotate_inv`, fused), including the rescale
/// `sqrt((2l+1)/(2·mmax+1))` of every degree `l > mmax` that fairchem applies.
///
/// * `y`: `[E, layout.num_truncated(), C]`, m-major, f32 or f64.
/// * `wigner`: the same blocks that [`rotate`] used (not inverted: the transpose is applied
///   internally); it gets no gradient.
///
/// Returns `[E, (lmax+1)^2, C]`, l-major. Differentiable with respect to `y`.
///
/// # Errors
/// As [`rotate`].
pub fn rotate_inv(y: &Tensor, wigner: &WignerBlocks, layout: SphericalLayout) -> Result<Tensor> {
    apply_rotation(y, wigner, None, layout, Direction::FromEdge)
}

/// [`rotate`] differentiable with respect to the blocks too: `blocks` is `[E,
/// layout.wigner_len()]` in [`WignerBlocks`]' layout, with its graph, and the gradient reaches
/// that graph (e.g. [`crate::frames_diff::zero_roll_wigner`] of the edge vectors, for conservative
/// forces), still block-diagonal (no dense per-edge matrices). Every op of its backward is
/// differentiable again, in all its inputs, so gradients of gradients (training on
/// `F = −∂E/∂r`) flow through it.
///
/// # Errors
/// As [`rotate`].
pub fn rotate_differentiable(
    x: &Tensor,
    blocks: &Tensor,
    layout: SphericalLayout,
) -> Result<Tensor> {
    // The checks on a detached view; the op takes `blocks` with its graph.
    let view = WignerBlocks::new(blocks.clone(), layout.lmax())?;
    apply_rotation(x, &view, Some(blocks), layout, Direction::ToEdge)
}

/// [`rotate_inv`] differentiable with respect to the blocks too (see
/// [`rotate_differentiable`]).
///
/// # Errors
/// As [`rotate`].
pub fn rotate_inv_differentiable(
    y: &Tensor,
    blocks: &Tensor,
    layout: SphericalLayout,
) -> Result<Tensor> {
    let view = WignerBlocks::new(blocks.clone(), layout.lmax())?;
    apply_rotation(y, &view, Some(blocks), layout, Direction::FromEdge)
}

/// The rotation `direction` of `v` by `wigner` (checked against `layout`): fairchem's rescale
/// on the way back; differentiable in the blocks when `tracked` gives them with their graph
/// (the same values as `wigner`'s), else they are detached.
fn apply_rotation(
    v: &Tensor,
    wigner: &WignerBlocks,
    tracked: Option<&Tensor>,
    layout: SphericalLayout,
    direction: Direction,
) -> Result<Tensor> {
    match direction {
        Direction::ToEdge => check_rotate_args(
            v,
            "x",
            layout.num_coefficients(),
            "(lmax+1)^2",
            wigner,
            layout,
        )?,
        Direction::FromEdge => check_rotate_args(
            v,
            "y",
            layout.num_truncated(),
            "n_truncated",
            wigner,
            layout,
        )?,
    };
    let op = RotateOp {
        layout,
        direction,
        rescale: direction == Direction::FromEdge,
        wigner_grad: tracked.is_some(),
    };
    let blocks = match tracked {
        Some(b) => b.contiguous()?,
        None => wigner.blocks().detach().contiguous()?,
    };
    Ok(v.contiguous()?.apply_op2(&blocks, op)?)
}

// ---------------------------------------------------------------------------------------------
// Modules
// ---------------------------------------------------------------------------------------------

/// Initialisation of the SO(2) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum So2Init {
    /// PyTorch `nn.Linear` defaults as fairchem's modules create them: weights and bias
    /// `U(−1/√fan_in, 1/√fan_in)`, the convolution's `m > 0` weights then scaled by `1/√2`.
    #[default]
    Fairchem,
    /// EquiformerV2's `weight_init = "normal"` (its default): weights `N(0, 1/fan_in)`, bias 0.
    /// This overrides the `1/√2` of the module defaults, exactly as fairchem's
    /// `eqv2_init_weights` does.
    Eqv2Normal,
    /// EquiformerV2's `weight_init = "uniform"`: module-default weights (with the `1/√2`),
    /// bias 0.
    Eqv2Uniform,
}

impl So2Init {
    fn weight(self, fan_in: usize, complex_m: bool) -> Init {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        match self {
            Self::Eqv2Normal => Init::Randn {
                mean: 0.0,
                stdev: bound,
            },
            Self::Fairchem | Self::Eqv2Uniform => {
                let b = if complex_m {
                    bound * std::f64::consts::FRAC_1_SQRT_2
                } else {
                    bound
                };
                Init::Uniform { lo: -b, up: b }
            }
        }
    }

    fn bias(self, fan_in: usize) -> Init {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        match self {
            Self::Fairchem => Init::Uniform {
                lo: -bound,
                up: bound,
            },
            Self::Eqv2Normal | Self::Eqv2Uniform => Init::Const(0.0),
        }
    }
}

/// Configuration of a [`So2Convolution`] or [`So2Linear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct So2ConvConfig {
    /// Degrees and kept orders of the edge-frame embedding.
    pub layout: SphericalLayout,
    /// Input channels per coefficient (`sphere_channels`; `2·sphere_channels` for EquiformerV2's
    /// concatenated source/target messages).
    pub in_channels: usize,
    /// Output channels per coefficient (`m_output_channels`).
    pub out_channels: usize,
    /// Extra `m = 0` scalar outputs returned separately (`extra_m0_output_channels`;
    /// convolution only, 0 for none).
    pub extra_m0_output_channels: usize,
    /// Weight initialisation.
    pub init: So2Init,
}

impl So2ConvConfig {
    /// A configuration without extra outputs and with [`So2Init::Fairchem`].
    pub fn new(layout: SphericalLayout, in_channels: usize, out_channels: usize) -> Self {
        Self {
            layout,
            in_channels,
            out_channels,
            extra_m0_output_channels: 0,
            init: So2Init::Fairchem,
        }
    }

    /// Sets `extra_m0_output_channels`.
    pub fn with_extra_m0_outputs(mut self, extra: usize) -> Self {
        self.extra_m0_output_channels = extra;
        self
    }

    /// Sets the initialisation.
    pub fn with_init(mut self, init: So2Init) -> Self {
        self.init = init;
        self
    }

    fn check(&self) -> Result<()> {
        if self.in_channels == 0 || self.out_channels == 0 {
            return Err(EquivariantError::InvalidArgument {
                name: if self.in_channels == 0 {
                    "in_channels"
                } else {
                    "out_channels"
                },
                reason: "channel counts must be positive, got 0".to_string(),
            });
        }
        Ok(())
    }

    /// Length of the per-edge radial weight vector: `(lmax+1)·C_in + Σ_{m=1}^{mmax} (lmax−m+1)·C_in`.
    pub fn radial_len(&self) -> usize {
        (0..=self.layout.mmax())
            .map(|m| self.layout.m_size(m))
            .sum::<usize>()
            * self.in_channels
    }
}

/// Parameters and forward pass shared by [`So2Convolution`] and [`So2Linear`].
#[derive(Debug, Clone)]
struct So2Params {
    config: So2ConvConfig,
    complex: bool,
    fc_m0_weight: Tensor,
    fc_m0_bias: Tensor,
    m_weights: Vec<Tensor>,
}

impl So2Params {
    fn new(config: &So2ConvConfig, complex: bool, vb: &VarBuilder) -> Result<Self> {
        config.check()?;
        let layout = config.layout;
        let (c_in, c_out) = (config.in_channels, config.out_channels);
        let extra = if complex {
            config.extra_m0_output_channels
        } else {
            0
        };
        let k0 = (layout.lmax() + 1) * c_in;
        let n0 = (layout.lmax() + 1) * c_out + extra;
        let vb_m0 = vb.pp("fc_m0");
        let fc_m0_weight =
            vb_m0.get_with_hints((n0, k0), "weight", config.init.weight(k0, false))?;
        let fc_m0_bias = vb_m0.get_with_hints(n0, "bias", config.init.bias(k0))?;
        let mut m_weights = Vec::with_capacity(layout.mmax());
        for m in 1..=layout.mmax() {
            let k = layout.m_size(m) * c_in;
            let n = layout.m_size(m) * c_out * if complex { 2 } else { 1 };
            let w = if complex {
                vb.pp("so2_m_conv")
                    .pp((m - 1).to_string())
                    .pp("fc")
                    .get_with_hints((n, k), "weight", config.init.weight(k, true))?
            } else {
                vb.pp("so2_m_fc").pp((m - 1).to_string()).get_with_hints(
                    (n, k),
                    "weight",
                    config.init.weight(k, false),
                )?
            };
            m_weights.push(w);
        }
        Ok(Self {
            config: *config,
            complex,
            fc_m0_weight,
            fc_m0_bias,
            m_weights,
        })
    }

    fn extra(&self) -> usize {
        if self.complex {
            self.config.extra_m0_output_channels
        } else {
            0
        }
    }

    /// The packed weight vector of the fused kernels (see `so2_fused`): `fc_m0.weight`
    /// transposed, `fc_m0.bias`, then per order `m ≥ 1` the three matrices `W_rᵀ`,
    /// `(W_r + W_i)ᵀ`, `(W_i − W_r)ᵀ` of the three-multiplication complex product
    /// (convolution) or `Wᵀ` (linear). Built with differentiable candle ops so that gradients
    /// reach the fairchem-shaped parameters.
    fn packed_weights(&self) -> Result<Tensor> {
        let layout = self.config.layout;
        let c_out = self.config.out_channels;
        let mut parts = Vec::with_capacity(2 + 3 * self.m_weights.len());
        parts.push(self.fc_m0_weight.t()?.contiguous()?.flatten_all()?);
        parts.push(self.fc_m0_bias.clone());
        for (i, w) in self.m_weights.iter().enumerate() {
            if self.complex && pack_complex_applies(w) {
                parts.push(pack_complex(w)?);
            } else if self.complex {
                let n = layout.m_size(i + 1) * c_out;
                let wr = w.narrow(0, 0, n)?;
                let wi = w.narrow(0, n, n)?;
                for p in [wr.clone(), (&wr + &wi)?, (&wi - &wr)?] {
                    parts.push(p.t()?.contiguous()?.flatten_all()?);
                }
            } else {
                parts.push(w.t()?.contiguous()?.flatten_all()?);
            }
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Checks `x` (`[E, rows, C_in]` with `rows` l-major when `rotated_in`, m-major
    /// otherwise), the radial weights and the Wigner blocks; returns `E`.
    fn check_inputs(
        &self,
        x: &Tensor,
        radial: Option<&Tensor>,
        wigner: Option<&WignerBlocks>,
        rotated_in: bool,
    ) -> Result<usize> {
        let layout = self.config.layout;
        check_float("x", x)?;
        let (rows, order) = if rotated_in {
            (layout.num_coefficients(), "l-major")
        } else {
            (layout.num_truncated(), "m-major")
        };
        let expected = || {
            format!(
                "[num_edges, {rows}, in_channels = {}] ({order}, lmax {}, mmax {})",
                self.config.in_channels,
                layout.lmax(),
                layout.mmax()
            )
        };
        let &[e, r, c] = x.dims() else {
            return Err(shape_error("x", expected(), x));
        };
        if r != rows || c != self.config.in_channels {
            return Err(shape_error("x", expected(), x));
        }
        if let Some(w) = wigner {
            check_rotate_args(x, "x", rows, order, w, layout)?;
        }
        if let Some(r) = radial {
            if r.dims() != [e, self.config.radial_len()] {
                return Err(shape_error(
                    "radial",
                    format!(
                        "[num_edges = {e}, radial_len = {}]",
                        self.config.radial_len()
                    ),
                    r,
                ));
            }
            if r.dtype() != x.dtype() {
                return Err(EquivariantError::UnsupportedDType {
                    arg: "radial",
                    found: r.dtype(),
                });
            }
        }
        Ok(e)
    }

    /// The fused layer: optional rotation into the frames, radial scaling, the per-order maps,
    /// optional rotation back.
    fn forward(
        &self,
        x: &Tensor,
        radial: Option<&Tensor>,
        wigner: Option<&WignerBlocks>,
        (rotate_in, rotate_out): (bool, bool),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let wigner = wigner.filter(|_| rotate_in || rotate_out);
        let edges = self.check_inputs(x, radial, wigner, rotate_in)?;
        let layout = self.config.layout;
        // The fused op's backward is first order (with no edges every gradient is zero, so
        // the fused op serves then too).
        if edges > 0 && crate::higher_order_gradients_requested() {
            return self.forward_differentiable(x, radial, wigner, (rotate_in, rotate_out));
        }
        let shape = LayerShape {
            layout,
            c_in: self.config.in_channels,
            c_out: self.config.out_channels,
            extra: self.extra(),
            complex: self.complex,
            rotate_in,
            rotate_out,
            radial: radial.is_some(),
        };
        let wigner = match wigner {
            Some(w) => Some(w.blocks().detach().contiguous()?),
            None => None,
        };
        let op = So2LayerOp { shape, wigner };
        let weights = self.packed_weights()?.to_dtype(x.dtype())?;
        let x = x.contiguous()?;
        let radial = radial.map(Tensor::contiguous).transpose()?;
        let out = op.apply(&x, &weights, radial.as_ref())?;
        let rows_out = if rotate_out {
            layout.num_coefficients()
        } else {
            layout.num_truncated()
        };
        let extra = self.extra();
        if extra == 0 {
            return Ok((out, None));
        }
        let main = edges * rows_out * self.config.out_channels;
        Ok((
            out.narrow(0, 0, main)?
                .reshape((edges, rows_out, self.config.out_channels))?,
            Some(
                out.narrow(0, main, edges * extra)?
                    .reshape((edges, extra))?,
            ),
        ))
    }
}

impl So2Params {
    /// The layer composed from candle ops (per-order `matmul`s, the rotations as [`rotate`] /
    /// [`rotate_inv`]), differentiable to any order: used when higher-order gradients are
    /// requested, since the fused op's backward is first order. Same values as the fused op
    /// up to rounding (tested).
    fn forward_differentiable(
        &self,
        x: &Tensor,
        radial: Option<&Tensor>,
        wigner: Option<&WignerBlocks>,
        (rotate_in, rotate_out): (bool, bool),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layout = self.config.layout;
        let (c_in, c_out) = (self.config.in_channels, self.config.out_channels);
        let rotation = || {
            wigner.ok_or_else(|| EquivariantError::InvalidArgument {
                name: "wigner",
                reason: "a rotated layer needs the edge frames".into(),
            })
        };
        let x = if rotate_in {
            rotate(x, rotation()?, layout)?
        } else {
            x.clone()
        };
        let e = x.dim(0)?;
        let extra = self.extra();
        let dtype = x.dtype();
        let scaled = |rows: Tensor, r_off: usize, width: usize| -> Result<Tensor> {
            Ok(match radial {
                Some(r) => (rows * r.narrow(1, r_off, width)?)?,
                None => rows,
            })
        };
        let n0 = layout.m_size(0);
        let x0 = scaled(x.narrow(1, 0, n0)?.reshape((e, n0 * c_in))?, 0, n0 * c_in)?;
        let mut r_off = n0 * c_in;
        let y0 = x0
            .matmul(&self.fc_m0_weight.to_dtype(dtype)?.t()?)?
            .broadcast_add(&self.fc_m0_bias.to_dtype(dtype)?)?;
        let extra_out = if extra > 0 {
            Some(y0.narrow(1, 0, extra)?)
        } else {
            None
        };
        let mut parts = vec![y0.narrow(1, extra, n0 * c_out)?.reshape((e, n0, c_out))?];
        for (i, w) in self.m_weights.iter().enumerate() {
            let m = i + 1;
            let (n_l, off) = (layout.m_size(m), layout.m_offset(m));
            let (k, n) = (n_l * c_in, n_l * c_out);
            let xp = scaled(x.narrow(1, off, n_l)?.reshape((e, k))?, r_off, k)?;
            let xm = scaled(x.narrow(1, off + n_l, n_l)?.reshape((e, k))?, r_off, k)?;
            r_off += k;
            let wt = w.to_dtype(dtype)?.t()?;
            let (fp, fm) = (xp.matmul(&wt)?, xm.matmul(&wt)?);
            let (yp, ym) = if self.complex {
                // fairchem: fc(x₊) = [x₊A | x₊B], fc(x₋) = [x₋A | x₋B];
                // y₊ = x₊A − x₋B, y₋ = x₋A + x₊B.
                (
                    (fp.narrow(1, 0, n)? - fm.narrow(1, n, n)?)?,
                    (fm.narrow(1, 0, n)? + fp.narrow(1, n, n)?)?,
                )
            } else {
                (fp, fm)
            };
            parts.push(yp.reshape((e, n_l, c_out))?);
            parts.push(ym.reshape((e, n_l, c_out))?);
        }
        let y = Tensor::cat(&parts, 1)?;
        let y = if rotate_out {
            rotate_inv(&y, rotation()?, layout)?
        } else {
            y
        };
        Ok((y, extra_out))
    }

    /// The gathered layer (node rows in, see [`MessageGather`]), rotated in and optionally
    /// rotated back.
    fn forward_gather(
        &self,
        x: &Tensor,
        gather: &MessageGather,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
        rotate_out: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let shape = LayerShape {
            layout: self.config.layout,
            c_in: self.config.in_channels,
            c_out: self.config.out_channels,
            extra: self.extra(),
            complex: self.complex,
            rotate_in: true,
            rotate_out,
            radial: radial.is_some(),
        };
        check_float("x", x)?;
        // The gathered kernel is CPU-only and first order; elsewhere the per-edge layer runs
        // on the gathered message (and composes itself when higher-order gradients are on).
        crate::so2_fused::forward_gather(
            shape,
            || Ok(self.packed_weights()?.to_dtype(x.dtype())?),
            x,
            gather,
            wigner,
            radial,
            |message| self.forward(message, radial, Some(wigner), (true, rotate_out)),
        )
    }
}

/// fairchem's `SO2_Convolution` for one resolution: per-order linear maps on m-major edge-frame
/// coefficients, `m > 0` as complex products of `(+m, −m)` pairs.
///
/// Input `[E, n_trunc, C_in]` (m-major, from [`rotate`]); output `[E, n_trunc, C_out]`
/// (m-major, for [`rotate_inv`]), plus `[E, extra_m0_output_channels]` scalars when configured.
/// Parameters (fairchem names): `fc_m0.weight`, `fc_m0.bias`, `so2_m_conv.{m-1}.fc.weight`.
#[derive(Debug, Clone)]
pub struct So2Convolution {
    params: So2Params,
}

impl So2Convolution {
    /// Creates (or loads, depending on the [`VarBuilder`]) the parameters.
    ///
    /// # Errors
    /// Zero channel counts; candle errors from the var builder (e.g. a loaded tensor with the
    /// wrong shape).
    pub fn new(config: &So2ConvConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            params: So2Params::new(config, true, &vb)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &So2ConvConfig {
        &self.params.config
    }

    /// Length of the per-edge radial weights accepted by [`So2Convolution::forward`]
    /// (fairchem's `rad_func` output size).
    pub fn radial_len(&self) -> usize {
        self.params.config.radial_len()
    }

    /// Applies the convolution. `radial` (`[E, radial_len]`, from the radial MLP of the edge
    /// distance) multiplies the inputs: its first `(lmax+1)·C_in` entries the `m = 0`
    /// coefficients (flattened degree-major, channel-minor), then `(lmax−m+1)·C_in` entries per
    /// order `m`, shared by `+m` and `−m`.
    ///
    /// Returns the m-major output and, if `extra_m0_output_channels > 0`, the extra scalars
    /// (the first outputs of `fc_m0`).
    ///
    /// # Errors
    /// [`EquivariantError::ShapeMismatch`] / [`EquivariantError::UnsupportedDType`] naming `x`
    /// or `radial`.
    pub fn forward(&self, x: &Tensor, radial: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        self.params.forward(x, radial, None, (false, false))
    }

    /// [`rotate`] → [`So2Convolution::forward`] → [`rotate_inv`] in one fused op: `x` is
    /// l-major `[E, (lmax+1)^2, C_in]`, the output l-major `[E, (lmax+1)^2, C_out]` (with
    /// fairchem's rescale of the degrees above `mmax`); the extra scalars as in
    /// [`So2Convolution::forward`]. Same values as the composition (up to rounding), without
    /// its intermediate tensors.
    ///
    /// # Errors
    /// As [`So2Convolution::forward`] and [`rotate`] (naming `x`, `radial` or `wigner`).
    pub fn forward_rotated(
        &self,
        x: &Tensor,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.params.forward(x, radial, Some(wigner), (true, true))
    }

    /// [`rotate`] → [`So2Convolution::forward`] fused: l-major `x` `[E, (lmax+1)^2, C_in]` in,
    /// m-major `[E, n_trunc, C_out]` out (EquiformerV2's first convolution of a message).
    ///
    /// # Errors
    /// As [`So2Convolution::forward_rotated`].
    pub fn forward_rotate_in(
        &self,
        x: &Tensor,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.params.forward(x, radial, Some(wigner), (true, false))
    }

    /// [`So2Convolution::forward`] → [`rotate_inv`] fused: m-major `x` `[E, n_trunc, C_in]`
    /// in, l-major `[E, (lmax+1)^2, C_out]` out.
    ///
    /// # Errors
    /// As [`So2Convolution::forward_rotated`].
    pub fn forward_rotate_out(
        &self,
        x: &Tensor,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.params.forward(x, radial, Some(wigner), (false, true))
    }

    /// [`So2Convolution::forward_rotated`] on messages gathered from node rows: `x` is
    /// l-major `[N, (lmax+1)^2, C]` with `C = in_channels / gather.parts()`, and edge `e`'s
    /// message is the row (or the channel concatenation of the two rows) that `gather` names.
    /// Equal to `forward_rotated(&cat([x.index_select(src), x.index_select(dst)], 2), ..)` up
    /// to rounding, without the `[E, (lmax+1)^2, in_channels]` message tensor; the gradient of
    /// `x` is node-sized and accumulated deterministically (see the `so2` module docs).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use matscale_equivariant::mapping::SphericalLayout;
    /// use matscale_equivariant::so2::{MessageGather, So2ConvConfig, So2Convolution};
    /// use matscale_equivariant::wigner::WignerBlocks;
    ///
    /// let dev = Device::Cpu;
    /// let layout = SphericalLayout::new(2, 1)?;
    /// let nodes = Tensor::randn(0f32, 1., (3, layout.num_coefficients(), 4), &dev)?;
    /// let (src, dst) = (vec![0u32, 1, 2, 2], vec![1u32, 0, 0, 1]);
    /// let frames = vec![[[0., 0., 1.], [1., 0., 0.], [0., 1., 0.]]; src.len()];
    /// let wigner = WignerBlocks::from_rotations(&frames, layout.lmax(), DType::F32, &dev)?;
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    /// // Messages cat(x[src], x[dst]) have 2 × 4 channels.
    /// let conv = So2Convolution::new(&So2ConvConfig::new(layout, 8, 5), vb)?;
    /// let gather = MessageGather::pair(
    ///     &Tensor::new(src.as_slice(), &dev)?,
    ///     &Tensor::new(dst.as_slice(), &dev)?,
    ///     3,
    /// )?;
    /// let (y, _) = conv.forward_gather_rotated(&nodes, &gather, &wigner, None)?;
    /// assert_eq!(y.dims(), &[4, 9, 5]);
    /// # Ok::<(), matscale_equivariant::error::EquivariantError>(())
    /// ```
    ///
    /// # Errors
    /// As [`So2Convolution::forward_rotated`]; [`EquivariantError::ShapeMismatch`] naming `x`
    /// when its channels times `gather.parts()` are not `in_channels`, or naming an index that
    /// does not index `x`'s node rows or (`target`) differs in length from `source`.
    pub fn forward_gather_rotated(
        &self,
        x: &Tensor,
        gather: &MessageGather,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.params.forward_gather(x, gather, wigner, radial, true)
    }

    /// [`So2Convolution::forward_rotate_in`] on gathered messages (see
    /// [`So2Convolution::forward_gather_rotated`]): node rows in, m-major
    /// `[E, n_trunc, C_out]` out (EquiformerV2's first convolution of the attention message).
    ///
    /// # Errors
    /// As [`So2Convolution::forward_gather_rotated`].
    pub fn forward_gather_rotate_in(
        &self,
        x: &Tensor,
        gather: &MessageGather,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.params.forward_gather(x, gather, wigner, radial, false)
    }
}

/// fairchem's `SO2_Linear` for one resolution: like [`So2Convolution`] but each `m > 0` order
/// applies one real weight to `+m` and `−m` alike, and there are no extra outputs.
///
/// Parameters (fairchem names): `fc_m0.weight`, `fc_m0.bias`, `so2_m_fc.{m-1}.weight`.
#[derive(Debug, Clone)]
pub struct So2Linear {
    params: So2Params,
}

impl So2Linear {
    /// Creates (or loads) the parameters; `extra_m0_output_channels` is ignored.
    ///
    /// # Errors
    /// As [`So2Convolution::new`].
    pub fn new(config: &So2ConvConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            params: So2Params::new(config, false, &vb)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &So2ConvConfig {
        &self.params.config
    }

    /// Length of the per-edge radial weights (as [`So2Convolution::radial_len`]).
    pub fn radial_len(&self) -> usize {
        self.params.config.radial_len()
    }

    /// Applies the linear map (see [`So2Convolution::forward`] for `radial`).
    ///
    /// # Errors
    /// As [`So2Convolution::forward`].
    pub fn forward(&self, x: &Tensor, radial: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.params.forward(x, radial, None, (false, false))?.0)
    }

    /// [`rotate`] → [`So2Linear::forward`] → [`rotate_inv`] in one fused op (see
    /// [`So2Convolution::forward_rotated`]).
    ///
    /// # Errors
    /// As [`So2Convolution::forward_rotated`].
    pub fn forward_rotated(
        &self,
        x: &Tensor,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .params
            .forward(x, radial, Some(wigner), (true, true))?
            .0)
    }

    /// [`rotate`] → [`So2Linear::forward`] fused (l-major in, m-major out).
    ///
    /// # Errors
    /// As [`So2Convolution::forward_rotated`].
    pub fn forward_rotate_in(
        &self,
        x: &Tensor,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .params
            .forward(x, radial, Some(wigner), (true, false))?
            .0)
    }

    /// [`So2Linear::forward`] → [`rotate_inv`] fused (m-major in, l-major out).
    ///
    /// # Errors
    /// As [`So2Convolution::forward_rotated`].
    pub fn forward_rotate_out(
        &self,
        x: &Tensor,
        wigner: &WignerBlocks,
        radial: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .params
            .forward(x, radial, Some(wigner), (false, true))?
            .0)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::mapping::l_major_index;
    use crate::testing::{
        assert_close, check_gradient, random_normals, random_rotation, random_tensor,
    };
    use crate::wigner::{blocks_len, matrix_y, wigner_d};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// The CUDA rotation kernels (`kernels/rotate.cu`, register-tiled, Wigner blocks staged in
    /// shared memory between barriers) run on the host (`crate::host_kernels`) with the tables
    /// of `cuda/so2.rs`, against the CPU `rotate` / `rotate_inv`; the largest difference
    /// relative to the largest CPU value.
    fn host_rotation_error<T: crate::activation::Float + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        layout: SphericalLayout,
        (edges, c, to_edge): (usize, usize, bool),
        seed: u64,
    ) -> std::result::Result<f64, Box<dyn std::error::Error>> {
        use crate::host_kernels::{bytes_of, floats_from};
        let (lmax, mmax) = (layout.lmax(), layout.mmax());
        let (full, trunc, wlen) = (
            layout.num_coefficients(),
            layout.num_truncated(),
            layout.wigner_len(),
        );
        let rows_in = if to_edge { full } else { trunc };
        let cast = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        let x = random_normals(edges * rows_in * c, seed);
        let w = random_orthogonal_blocks(edges, lmax, seed + 1);
        let xt = Tensor::from_vec(cast(&x), (edges, rows_in, c), &Device::Cpu)?;
        let wt = Tensor::from_vec(cast(&w), (edges, wlen), &Device::Cpu)?;
        let blocks = WignerBlocks::new(wt, lmax)?;
        let want: Vec<f64> = if to_edge {
            rotate(&xt, &blocks, layout)?
        } else {
            rotate_inv(&xt, &blocks, layout)?
        }
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
        // The tables of `cuda/so2.rs` `RotateTables` and the tile of `register_tile`.
        let mut slot = vec![-1i32; full];
        for (i, &(l, m)) in layout.m_major_degrees_orders().iter().enumerate() {
            slot[l_major_index(l, m)] = i as i32;
        }
        let block_off: Vec<i32> = (0..=lmax + 1)
            .map(|l| crate::wigner::block_offset(l) as i32)
            .collect();
        let scale: Vec<f64> = (0..=lmax)
            .map(|l| {
                if to_edge {
                    1.0
                } else {
                    layout.rotate_inv_rescale(l)
                }
            })
            .collect();
        let inputs = 2 * if to_edge { lmax } else { lmax.min(mmax) } + 1;
        let tile = [5, 9, 13, 25]
            .into_iter()
            .find(|&k| inputs <= k)
            .expect("a tile");
        let header = [
            std::mem::size_of::<T>() as i64,
            i64::from(!to_edge),
            edges as i64,
            c as i64,
            lmax as i64,
            mmax as i64,
            trunc as i64,
            wlen as i64,
            tile as i64,
        ];
        let mut input = bytes_of(&header);
        input.extend(bytes_of(&cast(&x)));
        input.extend(bytes_of(&cast(&w)));
        input.extend(bytes_of(&slot));
        input.extend(bytes_of(&block_off));
        input.extend(bytes_of(&cast(&scale)));
        let tag = format!("{}-{lmax}-{mmax}-{c}-{to_edge}", T::DTYPE.as_str());
        let got = floats_from(&driver.run(&tag, &input), std::mem::size_of::<T>());
        Ok(crate::host_kernels::max_relative_error(&tag, &got, &want))
    }

    /// The CUDA `block_outer` kernel (a rotation's gradient with respect to its blocks), run on
    /// the host, agrees with the CPU op with and without m truncation and the rescale, channel
    /// counts below and above a warp; f64 to 1e-12 and f32 to 1e-5 of the largest value.
    #[test]
    fn cuda_block_outer_kernel_matches_the_cpu_on_the_host() -> TestResult {
        use crate::host_kernels::{bytes_of, floats_from};
        let Some(driver) = crate::host_kernels::driver("rotate_main") else {
            return Ok(());
        };
        fn case<T: crate::activation::Float + crate::host_kernels::ToLe>(
            driver: &crate::host_kernels::Driver,
            layout: SphericalLayout,
            (edges, c, rescale): (usize, usize, bool),
        ) -> std::result::Result<f64, Box<dyn std::error::Error>> {
            let (full, trunc) = (layout.num_coefficients(), layout.num_truncated());
            let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
            let a = cast(random_normals(edges * trunc * c, 91));
            let b = cast(random_normals(edges * full * c, 92));
            let op = BlockOuterOp { layout, rescale };
            let want: Vec<f64> = op
                .run(&a, &b, edges, c)
                .iter()
                .map(|v| v.to_f64())
                .collect();
            let plan = RotatePlan::<T>::new(layout, rescale);
            // `cuda/so2.rs` `RotateTables`: the m-major slot of each l-major index, −1 where
            // the order is truncated.
            let mut slot = vec![-1i32; full];
            for (i, &(l, m)) in layout.m_major_degrees_orders().iter().enumerate() {
                slot[l_major_index(l, m)] = i as i32;
            }
            let header = [
                std::mem::size_of::<T>() as i64,
                2,
                edges as i64,
                c as i64,
                layout.lmax() as i64,
                layout.mmax() as i64,
                trunc as i64,
                layout.wigner_len() as i64,
                0,
            ];
            let mut input = bytes_of(&header);
            input.extend(bytes_of(&a));
            input.extend(bytes_of(&b));
            input.extend(bytes_of(&slot));
            input.extend(bytes_of(&plan.scale));
            let tag = format!("outer-{}-{layout:?}-{c}-{rescale}", T::DTYPE.as_str());
            let got = floats_from(&driver.run(&tag, &input), std::mem::size_of::<T>());
            Ok(crate::host_kernels::max_relative_error(&tag, &got, &want))
        }
        for (lmax, mmax) in [(3, 1), (4, 4)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            for (c, rescale) in [(5, false), (40, true)] {
                let e64 = case::<f64>(driver, layout, (3, c, rescale))?;
                let e32 = case::<f32>(driver, layout, (3, c, rescale))?;
                assert!(
                    e64 < 1e-12,
                    "lmax {lmax} mmax {mmax} c {c}: f64 error {e64:e}"
                );
                assert!(
                    e32 < 1e-5,
                    "lmax {lmax} mmax {mmax} c {c}: f32 error {e32:e}"
                );
            }
        }
        Ok(())
    }

    /// The CUDA rotation kernels, run on the host, agree with the CPU rotations both ways for
    /// every register tile (lmax 1 … 11) with and without m truncation, one and two channel
    /// tiles; f64 to 1e-12 and f32 to 1e-5 of the largest value.
    #[test]
    fn cuda_rotation_kernels_match_the_cpu_on_the_host() -> TestResult {
        let Some(driver) = crate::host_kernels::driver("rotate_main") else {
            return Ok(());
        };
        let mut seed = 300;
        for (lmax, mmax, c) in [(1, 1, 5), (2, 1, 7), (4, 2, 33), (6, 4, 130), (11, 5, 3)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            for to_edge in [true, false] {
                seed += 2;
                let case = (5, c, to_edge);
                let e64 = host_rotation_error::<f64>(driver, layout, case, seed)?;
                let e32 = host_rotation_error::<f32>(driver, layout, case, seed)?;
                let what = format!("lmax {lmax} mmax {mmax} c {c} to_edge {to_edge}");
                assert!(e64 < 1e-12, "{what}: f64 error {e64:e}");
                assert!(e32 < 1e-5, "{what}: f32 error {e32:e}");
            }
        }
        Ok(())
    }

    /// Random orthogonal `(2l+1)×(2l+1)` blocks (Gram–Schmidt of Gaussian matrices): any
    /// orthogonal per-degree blocks exercise the linear algebra of the rotation ops.
    fn random_orthogonal_blocks(edges: usize, lmax: usize, seed: u64) -> Vec<f64> {
        let mut out = Vec::with_capacity(edges * blocks_len(lmax));
        let mut seed = seed;
        for _ in 0..edges {
            for l in 0..=lmax {
                let k = 2 * l + 1;
                let mut a = random_normals(k * k, seed);
                seed += 1;
                for i in 0..k {
                    for p in 0..i {
                        let dot: f64 = (0..k).map(|j| a[i * k + j] * a[p * k + j]).sum();
                        for j in 0..k {
                            a[i * k + j] -= dot * a[p * k + j];
                        }
                    }
                    let norm = (0..k).map(|j| a[i * k + j].powi(2)).sum::<f64>().sqrt();
                    for j in 0..k {
                        a[i * k + j] /= norm;
                    }
                }
                out.extend(a);
            }
        }
        out
    }

    fn blocks_tensor(data: Vec<f64>, edges: usize, lmax: usize, dtype: DType) -> WignerBlocks {
        let t = Tensor::from_vec(data, (edges, blocks_len(lmax)), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("test blocks build");
        WignerBlocks::new(t, lmax).expect("test blocks have the right length")
    }

    fn to_vec(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Dense reference of `rotate`: build the dense block-diagonal D, multiply, then pick the
    /// m-major rows.
    fn dense_rotate(
        x: &[f64],
        blocks: &[f64],
        layout: SphericalLayout,
        edges: usize,
        c: usize,
    ) -> Vec<f64> {
        let n = layout.num_coefficients();
        let wl = layout.wigner_len();
        let rows = layout.m_major_to_l_major();
        let mut out = Vec::new();
        for e in 0..edges {
            let mut dense = vec![0.0; n * n];
            for l in 0..=layout.lmax() {
                let k = 2 * l + 1;
                for i in 0..k {
                    for j in 0..k {
                        dense[(l * l + i) * n + l * l + j] =
                            blocks[e * wl + block_offset(l) + i * k + j];
                    }
                }
            }
            for &r in &rows {
                for ch in 0..c {
                    out.push(
                        (0..n)
                            .map(|j| dense[r * n + j] * x[(e * n + j) * c + ch])
                            .sum(),
                    );
                }
            }
        }
        out
    }

    /// Dense reference of `rotate_inv`: `D^T` restricted to the kept columns, times the rescale.
    fn dense_rotate_inv(
        y: &[f64],
        blocks: &[f64],
        layout: SphericalLayout,
        edges: usize,
        c: usize,
    ) -> Vec<f64> {
        let n = layout.num_coefficients();
        let t = layout.num_truncated();
        let wl = layout.wigner_len();
        let lm = layout.m_major_degrees_orders();
        let mut out = vec![0.0; edges * n * c];
        for e in 0..edges {
            for l in 0..=layout.lmax() {
                let k = 2 * l + 1;
                for j in 0..k {
                    for (slot, &(ls, m)) in lm.iter().enumerate() {
                        if ls != l {
                            continue;
                        }
                        let row = l_major_index(l, m) - l * l;
                        let d = blocks[e * wl + block_offset(l) + row * k + j]
                            * layout.rotate_inv_rescale(l);
                        for ch in 0..c {
                            out[(e * n + l * l + j) * c + ch] += d * y[(e * t + slot) * c + ch];
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rotate_matches_dense_reference() -> TestResult {
        // Channel counts below, at and above the 32-channel register tile of the kernels.
        for (lmax, mmax, c) in [
            (0, 0, 3),
            (2, 1, 4),
            (4, 2, 3),
            (6, 4, 2),
            (3, 3, 5),
            (4, 2, 35),
            (6, 4, 64),
        ] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let edges = 3;
            let blocks = random_orthogonal_blocks(edges, lmax, 100 + lmax as u64);
            let wigner = blocks_tensor(blocks.clone(), edges, lmax, DType::F64);
            let x = random_tensor(&[edges, layout.num_coefficients(), c], DType::F64, 7)?;
            let ours = rotate(&x, &wigner, layout)?;
            assert_eq!(ours.dims(), &[edges, layout.num_truncated(), c]);
            let reference = dense_rotate(&to_vec(&x), &blocks, layout, edges, c);
            crate::testing::assert_close_slice(&to_vec(&ours), &reference, 1e-12);

            let y = random_tensor(&[edges, layout.num_truncated(), c], DType::F64, 8)?;
            let back = rotate_inv(&y, &wigner, layout)?;
            assert_eq!(back.dims(), &[edges, layout.num_coefficients(), c]);
            let reference = dense_rotate_inv(&to_vec(&y), &blocks, layout, edges, c);
            crate::testing::assert_close_slice(&to_vec(&back), &reference, 1e-12);
        }
        Ok(())
    }

    /// Every register-tile width the dispatch can pick (AVX-512, AVX2, the portable builds of
    /// x86-64 and aarch64) gives the dense reference, for channel counts below, at and above
    /// each width (whole tiles, a ragged tail, tail only): the widths other than the running
    /// CPU's are otherwise never exercised on it.
    #[test]
    fn every_tile_width_matches_the_dense_reference() -> TestResult {
        fn check<const W: usize>(layout: SphericalLayout, edges: usize, c: usize) -> TestResult {
            let lmax = layout.lmax();
            let (full, trunc) = (layout.num_coefficients(), layout.num_truncated());
            let blocks = random_orthogonal_blocks(edges, lmax, 40 + c as u64);
            let x = to_vec(&random_tensor(&[edges, full, c], DType::F64, 41)?);
            let y = to_vec(&random_tensor(&[edges, trunc, c], DType::F64, 42)?);
            let mut out = vec![f64::NAN; edges * trunc * c];
            to_edge_kernel::<f64, _, W>(
                &RotatePlan::new(layout, false),
                &x,
                &blocks,
                &mut out[..],
                c,
            );
            let reference = dense_rotate(&x, &blocks, layout, edges, c);
            crate::testing::assert_close_slice(&out, &reference, 1e-12);
            let mut back = vec![f64::NAN; edges * full * c];
            from_edge_kernel::<f64, _, W>(
                &RotatePlan::new(layout, true),
                &y,
                &blocks,
                &mut back[..],
                c,
            );
            let reference = dense_rotate_inv(&y, &blocks, layout, edges, c);
            crate::testing::assert_close_slice(&back, &reference, 1e-12);
            Ok(())
        }
        for (lmax, mmax) in [(4, 2), (6, 4)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            for c in [3, 8, 16, 19, 35, 64] {
                check::<8>(layout, 2, c)?;
                check::<16>(layout, 2, c)?;
                check::<32>(layout, 2, c)?;
            }
        }
        Ok(())
    }

    /// The gathered rotations equal the per-edge ones on materialised messages, at every tile
    /// width: `to_edge_rows` on node rows against `to_edge` on `cat(x[src], x[dst])`, and
    /// `from_edge_add` against `from_edge` followed by adding each half into its node's rows
    /// (onto a non-zero gradient, with nodes shared by several edges and a source equal to
    /// its target).
    #[test]
    fn gathered_rotations_equal_rotations_of_the_materialised_messages() -> TestResult {
        fn check<const W: usize>(layout: SphericalLayout, pair: bool, c: usize) -> TestResult {
            let (lmax, full, trunc) = (
                layout.lmax(),
                layout.num_coefficients(),
                layout.num_truncated(),
            );
            let (nodes, pieces) = (3, if pair { 2 } else { 1 });
            let source = [2u32, 0, 2, 1, 1];
            let target = [0u32, 0, 1, 1, 2];
            let edges = source.len();
            let cm = pieces * c;
            let blocks = random_orthogonal_blocks(edges, lmax, 50 + c as u64);
            let x = to_vec(&random_tensor(&[nodes, full, c], DType::F64, 51)?);
            let y = to_vec(&random_tensor(&[edges, trunc, cm], DType::F64, 52)?);
            let g0 = to_vec(&random_tensor(&[nodes, full, c], DType::F64, 53)?);
            let rows = EdgeRows::Gathered {
                source: &source,
                target: pair.then_some(&target[..]),
            };
            // The messages, materialised.
            let mut msg = vec![0.0; edges * full * cm];
            for e in 0..edges {
                for (h, node) in [source[e], target[e]][..pieces].iter().enumerate() {
                    for r in 0..full {
                        let from = (*node as usize * full + r) * c;
                        let to = (e * full + r) * cm + h * c;
                        msg[to..to + c].copy_from_slice(&x[from..from + c]);
                    }
                }
            }
            let plan = RotatePlan::new(layout, true);
            let mut out = vec![f64::NAN; edges * trunc * cm];
            to_edge_rows_kernel::<f64, _, W>(&plan, &x, &blocks, rows, &mut out[..], c);
            let mut reference = vec![f64::NAN; edges * trunc * cm];
            to_edge_kernel::<f64, _, W>(&plan, &msg, &blocks, &mut reference[..], cm);
            assert_eq!(
                out, reference,
                "to_edge_rows, W = {W}, c = {c}, pair {pair}"
            );
            let mut grad = g0.clone();
            from_edge_add_kernel::<f64, W>(&plan, &y, &blocks, rows, &mut grad, c, edges);
            let mut back = vec![f64::NAN; edges * full * cm];
            from_edge_kernel::<f64, _, W>(&plan, &y, &blocks, &mut back[..], cm);
            let mut reference = g0;
            for e in 0..edges {
                for (h, node) in [source[e], target[e]][..pieces].iter().enumerate() {
                    for r in 0..full {
                        let to = (*node as usize * full + r) * c;
                        let from = (e * full + r) * cm + h * c;
                        for (d, v) in reference[to..to + c].iter_mut().zip(&back[from..from + c]) {
                            *d += v;
                        }
                    }
                }
            }
            crate::testing::assert_close_slice(&grad, &reference, 1e-13);
            Ok(())
        }
        for (lmax, mmax) in [(2, 1), (4, 2)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            for pair in [true, false] {
                for c in [3, 16, 35] {
                    check::<8>(layout, pair, c)?;
                    check::<16>(layout, pair, c)?;
                    check::<32>(layout, pair, c)?;
                }
            }
        }
        Ok(())
    }

    /// The rotation kernels write every element of their output and read none, which lets
    /// the ops hand them uninitialised buffers: a NaN-filled output comes back all finite and
    /// equal to the output written into uninitialised memory.
    #[test]
    fn rotation_kernels_overwrite_their_whole_output() -> TestResult {
        /// Runs one kernel into a NaN-filled and into an uninitialised output of `len`.
        fn check(
            name: &str,
            len: usize,
            init: impl Fn(&mut [f64]),
            uninit: impl Fn(&mut [std::mem::MaybeUninit<f64>]),
        ) {
            let mut out = vec![f64::NAN; len];
            init(&mut out);
            assert!(
                out.iter().all(|v| v.is_finite()),
                "{name} left elements unwritten"
            );
            let mut fresh = crate::buffer::uninit_vec::<f64>(len);
            uninit(&mut fresh);
            // SAFETY: the same kernel, on the same inputs, just wrote every element of `out`.
            let fresh = unsafe { crate::buffer::assume_init(fresh) };
            assert_eq!(out, fresh, "{name}");
        }
        for (lmax, mmax, c) in [(0, 0, 3), (4, 2, 35), (6, 4, 64), (3, 3, 1)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let edges = 4;
            let (full, trunc) = (layout.num_coefficients(), layout.num_truncated());
            let w = random_orthogonal_blocks(edges, lmax, 9);
            let x = to_vec(&random_tensor(&[edges, full, c], DType::F64, 5)?);
            let y = to_vec(&random_tensor(&[edges, trunc, c], DType::F64, 6)?);
            let plan = RotatePlan::<f64>::new(layout, true);
            check(
                "to_edge",
                edges * trunc * c,
                |o| to_edge(&plan, &x, &w, o, c),
                |o| to_edge_uninit(&plan, &x, &w, o, c),
            );
            check(
                "from_edge",
                edges * full * c,
                |o| from_edge(&plan, &y, &w, o, c),
                |o| from_edge_uninit(&plan, &y, &w, o, c),
            );
        }
        Ok(())
    }

    /// An output with more edges than the input would be left partly unwritten: the kernels
    /// refuse it instead.
    #[test]
    #[should_panic(expected = "the input holds fewer edges")]
    fn rotation_kernels_refuse_an_input_shorter_than_the_output() {
        let layout = SphericalLayout::new(2, 1).expect("layout");
        let (full, trunc, c) = (layout.num_coefficients(), layout.num_truncated(), 3);
        let w = random_orthogonal_blocks(1, 2, 1);
        let plan = RotatePlan::<f64>::new(layout, false);
        let mut out = crate::buffer::uninit_vec::<f64>(2 * trunc * c);
        to_edge_uninit(&plan, &vec![1.0; full * c], &w, &mut out, c);
    }

    #[test]
    fn rotate_inv_undoes_rotate_without_truncation() -> TestResult {
        let layout = SphericalLayout::new(4, 4)?;
        let edges = 5;
        let wigner = blocks_tensor(random_orthogonal_blocks(edges, 4, 3), edges, 4, DType::F64);
        let x = random_tensor(&[edges, 25, 6], DType::F64, 1)?;
        let back = rotate_inv(&rotate(&x, &wigner, layout)?, &wigner, layout)?;
        assert_close(&back, &x, 1e-12);
        Ok(())
    }

    #[test]
    fn rotations_f32_match_f64() -> TestResult {
        let layout = SphericalLayout::new(6, 4)?;
        let (edges, c) = (37, 19); // odd sizes exercise the remainder lanes of the kernels
        let blocks = random_orthogonal_blocks(edges, 6, 5);
        let w64 = blocks_tensor(blocks.clone(), edges, 6, DType::F64);
        let w32 = blocks_tensor(blocks, edges, 6, DType::F32);
        let x = random_tensor(&[edges, 49, c], DType::F64, 2)?;
        let r64 = rotate(&x, &w64, layout)?;
        let r32 = rotate(&x.to_dtype(DType::F32)?, &w32, layout)?;
        assert_close(&r32, &r64, 1e-5);
        let b64 = rotate_inv(&r64, &w64, layout)?;
        let b32 = rotate_inv(&r32, &w32, layout)?;
        assert_close(&b32, &b64, 1e-5);
        Ok(())
    }

    #[test]
    fn rotation_gradients_match_finite_differences() -> TestResult {
        let layout = SphericalLayout::new(3, 2)?;
        let edges = 2;
        let wigner = blocks_tensor(random_orthogonal_blocks(edges, 3, 9), edges, 3, DType::F64);
        let x = random_tensor(&[edges, 16, 2], DType::F64, 4)?;
        check_gradient(
            |x| rotate(x, &wigner, layout).map_err(candle_core::Error::wrap),
            &x,
            1e-6,
        )?
        .assert_within(1e-8);
        let y = random_tensor(&[edges, layout.num_truncated(), 2], DType::F64, 5)?;
        check_gradient(
            |y| rotate_inv(y, &wigner, layout).map_err(candle_core::Error::wrap),
            &y,
            1e-6,
        )?
        .assert_within(1e-8);
        Ok(())
    }

    /// The dense composition the differentiable rotations replace (as the EquiformerV2 model
    /// built it before): the block-diagonal matrix of `w`'s blocks, its kept rows (to the
    /// edge frame) or its rescaled transpose (back), applied by batched matmuls; candle
    /// differentiates it to any order.
    fn dense_rotation(
        w: &Tensor,
        v: &Tensor,
        layout: SphericalLayout,
        to_edge: bool,
    ) -> candle_core::Result<Tensor> {
        let e = w.dim(0)?;
        let blocks: Vec<Tensor> = (0..=layout.lmax())
            .map(|l| {
                let n = 2 * l + 1;
                w.narrow(1, block_offset(l), n * n)?.reshape((e, n, n))
            })
            .collect::<candle_core::Result<_>>()?;
        let dense =
            crate::frames_diff::block_diagonal(&blocks).map_err(candle_core::Error::wrap)?;
        let kept: Vec<u32> = layout
            .m_major_to_l_major()
            .iter()
            .map(|&i| i as u32)
            .collect();
        let kept = Tensor::from_vec(kept.clone(), kept.len(), w.device())?;
        if to_edge {
            return dense.index_select(&kept, 1)?.matmul(v);
        }
        let scale: Vec<f64> = (0..=layout.lmax())
            .flat_map(|l| std::iter::repeat_n(layout.rotate_inv_rescale(l), 2 * l + 1))
            .collect();
        let scale = Tensor::from_vec(scale, (1, layout.num_coefficients(), 1), w.device())?;
        dense
            .transpose(1, 2)?
            .contiguous()?
            .index_select(&kept, 2)?
            .broadcast_mul(&scale)?
            .matmul(v)
    }

    /// The rotations differentiable in their blocks agree with the dense composition (values,
    /// the input's and the blocks' gradients), both directions, with truncated orders
    /// (`mmax < lmax`) and fairchem's rescale; f64 to 1e-12. (Second derivatives:
    /// `tests/higher_order.rs`, which needs candle's graph of the backward kept.)
    #[test]
    fn differentiable_rotations_match_the_dense_composition() -> TestResult {
        use candle_core::Var;
        let (edges, c) = (3, 4);
        for (lmax, mmax) in [(3, 1), (2, 2)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            for to_edge in [true, false] {
                let (rows_in, rows_out) = if to_edge {
                    (layout.num_coefficients(), layout.num_truncated())
                } else {
                    (layout.num_truncated(), layout.num_coefficients())
                };
                let x = Var::from_tensor(&random_tensor(&[edges, rows_in, c], DType::F64, 61)?)?;
                let w = Var::from_tensor(&random_tensor(
                    &[edges, layout.wigner_len()],
                    DType::F64,
                    62,
                )?)?;
                let probe = random_tensor(&[edges, rows_out, c], DType::F64, 63)?;
                let mut results = Vec::new();
                for fused in [true, false] {
                    let (xt, wt) = (x.as_tensor(), w.as_tensor());
                    let out = match (fused, to_edge) {
                        (true, true) => rotate_differentiable(xt, wt, layout)?,
                        (true, false) => rotate_inv_differentiable(xt, wt, layout)?,
                        (false, _) => dense_rotation(wt, xt, layout, to_edge)?,
                    };
                    let grads = (&out * &probe)?.sum_all()?.backward()?;
                    let gx = grads.get(xt).expect("x gradient").clone();
                    let gw = grads.get(wt).expect("blocks gradient").clone();
                    results.push([out, gx, gw]);
                }
                for ((name, fused), dense) in ["output", "∂x", "∂blocks"]
                    .iter()
                    .zip(&results[0])
                    .zip(&results[1])
                {
                    let err = (fused - dense)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    let size = dense.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(
                        size > 1e-3 && err <= 1e-12 * size.max(1.0),
                        "lmax {lmax} mmax {mmax} to_edge {to_edge}: {name} differs by {err:e}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The blocks' gradient of the differentiable rotations matches finite differences (f64).
    #[test]
    fn differentiable_rotation_block_gradients_match_finite_differences() -> TestResult {
        let layout = SphericalLayout::new(3, 2)?;
        let edges = 2;
        let w = random_tensor(&[edges, layout.wigner_len()], DType::F64, 71)?;
        let x = random_tensor(&[edges, 16, 3], DType::F64, 72)?;
        let y = random_tensor(&[edges, layout.num_truncated(), 3], DType::F64, 73)?;
        check_gradient(
            |w| rotate_differentiable(&x, w, layout).map_err(candle_core::Error::wrap),
            &w,
            1e-6,
        )?
        .assert_within(1e-8);
        check_gradient(
            |w| rotate_inv_differentiable(&y, w, layout).map_err(candle_core::Error::wrap),
            &w,
            1e-6,
        )?
        .assert_within(1e-8);
        Ok(())
    }

    #[test]
    fn rotate_rejects_bad_arguments() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let wigner = blocks_tensor(random_orthogonal_blocks(3, 2, 1), 3, 2, DType::F64);
        let x = random_tensor(&[3, 8, 2], DType::F64, 0)?;
        let err = rotate(&x, &wigner, layout).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "x", .. }),
            "{err}"
        );
        let x = random_tensor(&[4, 9, 2], DType::F64, 0)?;
        let err = rotate(&x, &wigner, layout).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "wigner", .. }),
            "{err}"
        );
        let x = random_tensor(&[3, 9, 2], DType::F32, 0)?;
        let err = rotate(&x, &wigner, layout).unwrap_err();
        assert!(
            matches!(
                err,
                EquivariantError::UnsupportedDType { arg: "wigner", .. }
            ),
            "{err}"
        );
        let err = rotate(
            &x.to_dtype(DType::F64)?,
            &wigner,
            SphericalLayout::new(3, 1)?,
        )
        .unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "x", .. }),
            "{err}"
        );
        let x16 = random_tensor(&[3, 7, 2], DType::F64, 0)?;
        let err = rotate_inv(&x16, &wigner, SphericalLayout::new(2, 2)?).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "y", .. }),
            "{err}"
        );
        Ok(())
    }

    // ---- SO(2) convolution ----------------------------------------------------------------

    fn conv_f64(
        config: &So2ConvConfig,
        seed: u64,
    ) -> candle_core::Result<(So2Convolution, VarMap)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let conv = So2Convolution::new(config, vb).map_err(candle_core::Error::wrap)?;
        // Replace the (thread-RNG) initialisation by seeded values.
        let mut names: Vec<_> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        for (i, name) in names.iter().enumerate() {
            let var = varmap.data().lock().unwrap()[name].clone();
            var.set(&random_tensor(var.dims(), DType::F64, seed + i as u64)?)?;
        }
        Ok((conv, varmap))
    }

    /// Direct per-edge transcription of fairchem's `SO2_Convolution.forward` /
    /// `SO2_Linear.forward` (the `+m` row is the "real" part, `−m` the "imaginary" one).
    fn reference_so2(
        params: &HashMap<String, Vec<f64>>,
        layout: SphericalLayout,
        (c_in, c_out, extra, linear): (usize, usize, usize, bool),
        x: &[f64],
        radial: Option<&[f64]>,
        edges: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let t = layout.num_truncated();
        let r_len = (0..=layout.mmax()).map(|m| layout.m_size(m)).sum::<usize>() * c_in;
        let mut out = vec![0.0; edges * t * c_out];
        let mut extra_out = vec![0.0; edges * extra];
        let linear_map = |w: &[f64], rows: usize, cols: usize, v: &[f64]| -> Vec<f64> {
            (0..rows)
                .map(|r| (0..cols).map(|k| w[r * cols + k] * v[k]).sum())
                .collect()
        };
        for e in 0..edges {
            let xe = &x[e * t * c_in..(e + 1) * t * c_in];
            let rad = |i: usize| radial.map_or(1.0, |r| r[e * r_len + i]);
            // m = 0
            let n0 = layout.m_size(0);
            let x0: Vec<f64> = (0..n0 * c_in).map(|i| xe[i] * rad(i)).collect();
            let w0 = &params["fc_m0.weight"];
            let b0 = &params["fc_m0.bias"];
            let mut y0 = linear_map(w0, n0 * c_out + extra, n0 * c_in, &x0);
            for (y, b) in y0.iter_mut().zip(b0) {
                *y += b;
            }
            extra_out[e * extra..(e + 1) * extra].copy_from_slice(&y0[..extra]);
            out[e * t * c_out..e * t * c_out + n0 * c_out].copy_from_slice(&y0[extra..]);
            let mut rad_off = n0 * c_in;
            for m in 1..=layout.mmax() {
                let n_l = layout.m_size(m);
                let k = n_l * c_in;
                let off = layout.m_offset(m);
                let xp: Vec<f64> = (0..k)
                    .map(|i| xe[off * c_in + i] * rad(rad_off + i))
                    .collect();
                let xm: Vec<f64> = (0..k)
                    .map(|i| xe[(off + n_l) * c_in + i] * rad(rad_off + i))
                    .collect();
                let dst = &mut out[e * t * c_out..(e + 1) * t * c_out];
                let n = n_l * c_out;
                if linear {
                    let w = &params[&format!("so2_m_fc.{}.weight", m - 1)];
                    let yp = linear_map(w, n, k, &xp);
                    let ym = linear_map(w, n, k, &xm);
                    dst[off * c_out..off * c_out + n].copy_from_slice(&yp);
                    dst[(off + n_l) * c_out..(off + n_l) * c_out + n].copy_from_slice(&ym);
                } else {
                    let w = &params[&format!("so2_m_conv.{}.fc.weight", m - 1)];
                    let fp = linear_map(w, 2 * n, k, &xp); // fc(x_+) = [x_r[0] | x_i[0]]
                    let fm = linear_map(w, 2 * n, k, &xm); // fc(x_-) = [x_r[1] | x_i[1]]
                    for i in 0..n {
                        dst[off * c_out + i] = fp[i] - fm[n + i];
                        dst[(off + n_l) * c_out + i] = fm[i] + fp[n + i];
                    }
                }
                rad_off += k;
            }
        }
        (out, extra_out)
    }

    fn params_of(varmap: &VarMap) -> HashMap<String, Vec<f64>> {
        varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), to_vec(v.as_tensor())))
            .collect()
    }

    #[test]
    fn so2_convolution_matches_direct_transcription() -> TestResult {
        for (lmax, mmax, c_in, c_out, extra, radial) in [
            (3, 2, 3, 2, 2, true),
            (2, 2, 2, 3, 0, false),
            (4, 1, 2, 2, 1, true),
            (1, 0, 2, 2, 0, true),
        ] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let config = So2ConvConfig::new(layout, c_in, c_out).with_extra_m0_outputs(extra);
            let (conv, varmap) = conv_f64(&config, 50)?;
            let edges = 3;
            let x = random_tensor(&[edges, layout.num_truncated(), c_in], DType::F64, 1)?;
            let r = random_tensor(&[edges, conv.radial_len()], DType::F64, 2)?;
            let (y, ex) = conv.forward(&x, radial.then_some(&r))?;
            let rv = to_vec(&r);
            let (ref_y, ref_extra) = reference_so2(
                &params_of(&varmap),
                layout,
                (c_in, c_out, extra, false),
                &to_vec(&x),
                radial.then_some(rv.as_slice()),
                edges,
            );
            crate::testing::assert_close_slice(&to_vec(&y), &ref_y, 1e-12);
            match ex {
                Some(ex) => crate::testing::assert_close_slice(&to_vec(&ex), &ref_extra, 1e-12),
                None => assert_eq!(extra, 0),
            }
        }
        Ok(())
    }

    /// The composed (any-order differentiable) layer equals the fused one: values, the extra
    /// outputs and the gradients of the input, the radial weights and every parameter, for the
    /// convolution and the linear map, with and without rotations (f64).
    #[test]
    fn differentiable_composition_equals_the_fused_layer() -> TestResult {
        let layout = SphericalLayout::new(3, 2)?;
        let edges = 5;
        let frames: Vec<_> = (0..edges as u64)
            .map(|i| crate::testing::random_rotation(70 + i))
            .collect();
        let wigner = WignerBlocks::from_rotations(&frames, 3, DType::F64, &Device::Cpu)?;
        for complex in [true, false] {
            let config = So2ConvConfig::new(layout, 3, 2).with_extra_m0_outputs(2);
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            let params = So2Params::new(&config, complex, &vb)?;
            for (i, var) in varmap.all_vars().iter().enumerate() {
                var.set(&random_tensor(var.dims(), DType::F64, 90 + i as u64)?)?;
            }
            for (rotate_in, rotate_out) in [(false, false), (true, true), (true, false)] {
                let rows = if rotate_in {
                    layout.num_coefficients()
                } else {
                    layout.num_truncated()
                };
                let x = candle_core::Var::from_tensor(&random_tensor(
                    &[edges, rows, 3],
                    DType::F64,
                    1,
                )?)?;
                let r = candle_core::Var::from_tensor(&random_tensor(
                    &[edges, config.radial_len()],
                    DType::F64,
                    2,
                )?)?;
                let w = (rotate_in || rotate_out).then_some(&wigner);
                let run = |composed: bool| -> crate::error::Result<(Tensor, Option<Tensor>)> {
                    if composed {
                        params.forward_differentiable(
                            x.as_tensor(),
                            Some(r.as_tensor()),
                            w,
                            (rotate_in, rotate_out),
                        )
                    } else {
                        params.forward(
                            x.as_tensor(),
                            Some(r.as_tensor()),
                            w,
                            (rotate_in, rotate_out),
                        )
                    }
                };
                let (fused, composed) = (run(false)?, run(true)?);
                crate::testing::assert_close_slice(&to_vec(&composed.0), &to_vec(&fused.0), 1e-12);
                match (&fused.1, &composed.1) {
                    (Some(a), Some(b)) => {
                        crate::testing::assert_close_slice(&to_vec(b), &to_vec(a), 1e-12)
                    }
                    (None, None) => assert!(!complex),
                    _ => panic!("extra outputs on one side only"),
                }
                let loss = |out: &(Tensor, Option<Tensor>)| -> candle_core::Result<Tensor> {
                    let probe = random_tensor(out.0.dims(), DType::F64, 3)?;
                    let mut l = (&out.0 * probe)?.sum_all()?;
                    if let Some(e) = &out.1 {
                        l = (l + (e * random_tensor(e.dims(), DType::F64, 4)?)?.sum_all()?)?;
                    }
                    Ok(l)
                };
                let (gf, gc) = (loss(&fused)?.backward()?, loss(&composed)?.backward()?);
                let mut tensors = vec![x.as_tensor().clone(), r.as_tensor().clone()];
                tensors.extend(varmap.all_vars().iter().map(|v| v.as_tensor().clone()));
                for t in &tensors {
                    let (a, b) = (
                        gf.get(t).expect("fused gradient"),
                        gc.get(t).expect("composed gradient"),
                    );
                    crate::testing::assert_close_slice(&to_vec(b), &to_vec(a), 1e-11);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn so2_linear_matches_direct_transcription() -> TestResult {
        let layout = SphericalLayout::new(3, 2)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let lin = So2Linear::new(&So2ConvConfig::new(layout, 2, 3), vb)?;
        let edges = 4;
        let x = random_tensor(&[edges, layout.num_truncated(), 2], DType::F64, 3)?;
        let r = random_tensor(&[edges, lin.radial_len()], DType::F64, 4)?;
        let y = lin.forward(&x, Some(&r))?;
        let rv = to_vec(&r);
        let (ref_y, _) = reference_so2(
            &params_of(&varmap),
            layout,
            (2, 3, 0, true),
            &to_vec(&x),
            Some(&rv),
            edges,
        );
        crate::testing::assert_close_slice(&to_vec(&y), &ref_y, 1e-12);
        Ok(())
    }

    #[test]
    fn so2_gradients_match_finite_differences() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let config = So2ConvConfig::new(layout, 2, 2).with_extra_m0_outputs(1);
        let (conv, varmap) = conv_f64(&config, 70)?;
        let edges = 2;
        let x = random_tensor(&[edges, layout.num_truncated(), 2], DType::F64, 5)?;
        let r = random_tensor(&[edges, conv.radial_len()], DType::F64, 6)?;
        let both = |(y, e): (Tensor, Option<Tensor>)| -> candle_core::Result<Tensor> {
            let e = e.expect("extra outputs configured");
            Tensor::cat(&[y.flatten_all()?, e.flatten_all()?], 0)
        };
        let wrap = candle_core::Error::wrap;
        check_gradient(|x| both(conv.forward(x, Some(&r)).map_err(wrap)?), &x, 1e-6)?
            .assert_within(1e-8);
        check_gradient(|r| both(conv.forward(&x, Some(r)).map_err(wrap)?), &r, 1e-6)?
            .assert_within(1e-8);
        // Each parameter: rebuild the module from a state dict with that tensor replaced.
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
                both(conv.forward(&x, Some(&r)).map_err(wrap)?)
            };
            let check = check_gradient(f, &params[name], 1e-6)?;
            assert!(check.max_rel <= 1e-8, "parameter {name}: {check:?}");
        }
        // The linear variant, without radial weights.
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let lin = So2Linear::new(&So2ConvConfig::new(layout, 2, 3), vb)?;
        check_gradient(|x| lin.forward(x, None).map_err(wrap), &x, 1e-6)?.assert_within(1e-8);
        Ok(())
    }

    #[test]
    fn so2_rejects_bad_inputs() -> TestResult {
        let layout = SphericalLayout::new(2, 1)?;
        let (conv, _) = conv_f64(&So2ConvConfig::new(layout, 2, 2), 1)?;
        let x = random_tensor(&[3, 9, 2], DType::F64, 0)?;
        let err = conv.forward(&x, None).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "x", .. }),
            "{err}"
        );
        let x = random_tensor(&[3, 7, 2], DType::F64, 0)?;
        let r = random_tensor(&[3, 5], DType::F64, 0)?;
        let err = conv.forward(&x, Some(&r)).unwrap_err();
        assert!(
            matches!(err, EquivariantError::ShapeMismatch { arg: "radial", .. }),
            "{err}"
        );
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let err = So2Convolution::new(&So2ConvConfig::new(layout, 0, 2), vb).unwrap_err();
        assert!(
            matches!(
                err,
                EquivariantError::InvalidArgument {
                    name: "in_channels",
                    ..
                }
            ),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn initialisation_follows_fairchem_bounds() -> TestResult {
        let layout = SphericalLayout::new(4, 2)?;
        for init in [So2Init::Fairchem, So2Init::Eqv2Uniform, So2Init::Eqv2Normal] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            // 32 channels: the order-1 weight has 32 768 entries, so the relative spread of
            // their RMS is ≈ 0.4 % and the 5 % tolerance below is over 10 σ (with 8 channels,
            // 2 048 entries, it was 3 σ, and the unseeded initialisation failed it now and then).
            So2Convolution::new(&So2ConvConfig::new(layout, 32, 32).with_init(init), vb)?;
            let p = params_of(&varmap);
            let fan_m1 = (layout.m_size(1) * 32) as f64;
            let w1 = &p["so2_m_conv.0.fc.weight"];
            let max = w1.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let rms = (w1.iter().map(|v| v * v).sum::<f64>() / w1.len() as f64).sqrt();
            let bias_zero = p["fc_m0.bias"].iter().all(|&b| b == 0.0);
            match init {
                So2Init::Fairchem | So2Init::Eqv2Uniform => {
                    let bound = 1.0 / (2.0 * fan_m1).sqrt();
                    assert!(
                        max <= bound && max > 0.9 * bound,
                        "{init:?}: max {max}, bound {bound}"
                    );
                    assert_eq!(bias_zero, init == So2Init::Eqv2Uniform);
                }
                So2Init::Eqv2Normal => {
                    let std = 1.0 / fan_m1.sqrt();
                    assert!(
                        (rms / std - 1.0).abs() < 0.05,
                        "{init:?}: rms {rms}, std {std}"
                    );
                    assert!(bias_zero);
                }
            }
        }
        Ok(())
    }

    // ---- golden values from the PyTorch (fairchem-style, dense bmm) reference -------------

    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<FixtureCase>,
    }

    #[derive(serde::Deserialize)]
    struct FixtureCase {
        name: String,
        lmax: usize,
        mmax: usize,
        edges: usize,
        c_in: usize,
        c_out: usize,
        extra: usize,
        linear: bool,
        wigner_blocks: Vec<f64>,
        x: Vec<f64>,
        radial: Option<Vec<f64>>,
        params: HashMap<String, Vec<f64>>,
        rotated_m_major: Vec<f64>,
        so2_out_m_major: Vec<f64>,
        extra_out: Option<Vec<f64>>,
        out: Vec<f64>,
    }

    #[test]
    fn matches_pytorch_fairchem_reference() -> TestResult {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/equivariant/so2_fairchem_reference.json"
        );
        let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        assert_eq!(fixture.cases.len(), 4);
        let dev = Device::Cpu;
        for case in fixture.cases {
            let layout = SphericalLayout::new(case.lmax, case.mmax)?;
            let (e, c_in) = (case.edges, case.c_in);
            let wigner = blocks_tensor(case.wigner_blocks, e, case.lmax, DType::F64);
            let x = Tensor::from_vec(case.x, (e, layout.num_coefficients(), c_in), &dev)?;
            let radial = match case.radial {
                Some(r) => Some(Tensor::from_vec(r.clone(), (e, r.len() / e), &dev)?),
                None => None,
            };
            // The state dict as fairchem names it, shapes from the names.
            let mut dict = HashMap::new();
            for (name, values) in case.params {
                let len = values.len();
                let t = if name == "fc_m0.bias" {
                    Tensor::from_vec(values, len, &dev)?
                } else {
                    let cols = if name == "fc_m0.weight" {
                        layout.m_size(0) * c_in
                    } else {
                        let m = name
                            .split('.')
                            .nth(1)
                            .ok_or("parameter name")?
                            .parse::<usize>()?
                            + 1;
                        layout.m_size(m) * c_in
                    };
                    Tensor::from_vec(values, (len / cols, cols), &dev)?
                };
                dict.insert(name, t);
            }
            let vb = VarBuilder::from_tensors(dict, DType::F64, &dev);
            let config =
                So2ConvConfig::new(layout, c_in, case.c_out).with_extra_m0_outputs(case.extra);

            let rotated = rotate(&x, &wigner, layout)?;
            crate::testing::assert_close_slice(&to_vec(&rotated), &case.rotated_m_major, 1e-12);
            let (y, extra) = if case.linear {
                (
                    So2Linear::new(&config, vb)?.forward(&rotated, radial.as_ref())?,
                    None,
                )
            } else {
                So2Convolution::new(&config, vb)?.forward(&rotated, radial.as_ref())?
            };
            crate::testing::assert_close_slice(&to_vec(&y), &case.so2_out_m_major, 1e-10);
            match (extra, case.extra_out) {
                (Some(ours), Some(theirs)) => {
                    crate::testing::assert_close_slice(&to_vec(&ours), &theirs, 1e-10)
                }
                (None, None) => {}
                _ => panic!("{}: extra outputs present on one side only", case.name),
            }
            let out = rotate_inv(&y, &wigner, layout)?;
            crate::testing::assert_close_slice(&to_vec(&out), &case.out, 1e-10);
        }
        Ok(())
    }

    // ---- equivariance with real Wigner-D matrices of edge frames ----------------------------

    /// A rotation taking the unit vector `u` to +y (Rodrigues about `u × ŷ`).
    fn to_y(u: [f64; 3]) -> [[f64; 3]; 3] {
        let axis = [-u[2], 0.0, u[0]]; // u × ŷ
        let s = (axis[0] * axis[0] + axis[2] * axis[2]).sqrt();
        let c = u[1];
        let k = [axis[0] / s, 0.0, axis[2] / s];
        let kx = [[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]];
        let kx2 = crate::testing::matmul3(&kx, &kx);
        let mut r = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                r[i][j] = f64::from(u8::from(i == j)) + s * kx[i][j] + (1.0 - c) * kx2[i][j];
            }
        }
        r
    }

    /// Edge frames `R_e = Y(roll_e) · A_e` with `A_e u_e = ŷ` and a roll seeded by `seed`.
    fn frames(vectors: &[[f64; 3]], seed: u64) -> Vec<[[f64; 3]; 3]> {
        let rolls = random_normals(vectors.len(), seed);
        vectors
            .iter()
            .zip(rolls)
            .map(|(v, roll)| {
                let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
                let a = to_y([v[0] / n, v[1] / n, v[2] / n]);
                let r = crate::testing::matmul3(&matrix_y(3.0 * roll), &a);
                let y = crate::testing::matvec3(&r, [v[0] / n, v[1] / n, v[2] / n]);
                assert!((y[1] - 1.0).abs() < 1e-12, "frame takes the edge to +y");
                r
            })
            .collect()
    }

    /// `D(q)` applied to every row of an l-major `[E, (lmax+1)^2, C]` tensor.
    fn rotate_embedding(x: &Tensor, q: &[[f64; 3]; 3], lmax: usize) -> Result<Tensor> {
        let &[e, n, c] = x.dims() else {
            unreachable!("rank-3 test input")
        };
        let xv = to_vec(x);
        let mut out = vec![0.0; xv.len()];
        for l in 0..=lmax {
            let d = wigner_d(l, q)?;
            let k = 2 * l + 1;
            for ei in 0..e {
                for i in 0..k {
                    for j in 0..k {
                        for ch in 0..c {
                            out[(ei * n + l * l + i) * c + ch] +=
                                d[i * k + j] * xv[(ei * n + l * l + j) * c + ch];
                        }
                    }
                }
            }
        }
        Ok(Tensor::from_vec(out, (e, n, c), &Device::Cpu)?)
    }

    /// rotate → SO(2) convolution (radial weights, extra scalars) → rotate_inv commutes with
    /// global rotations, even though the roll of every frame about its edge is drawn afresh
    /// after the rotation: the SO(2) convolution absorbs any roll.
    #[test]
    fn rotate_conv_rotate_back_is_equivariant() -> TestResult {
        for (lmax, mmax) in [(4, 2), (3, 3), (6, 4)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let config = So2ConvConfig::new(layout, 3, 2).with_extra_m0_outputs(2);
            let (conv, _) = conv_f64(&config, 90)?;
            let edges = 6;
            let vecs: Vec<[f64; 3]> = random_normals(3 * edges, 40)
                .chunks(3)
                .map(|v| [v[0], v[1], v[2]])
                .collect();
            let x = random_tensor(&[edges, layout.num_coefficients(), 3], DType::F64, 41)?;
            let radial = random_tensor(&[edges, conv.radial_len()], DType::F64, 42)?;
            let layer =
                |x: &Tensor, vecs: &[[f64; 3]], roll_seed: u64| -> Result<(Tensor, Tensor)> {
                    let w = WignerBlocks::from_rotations(
                        &frames(vecs, roll_seed),
                        lmax,
                        DType::F64,
                        &Device::Cpu,
                    )?;
                    let (y, extra) = conv.forward(&rotate(x, &w, layout)?, Some(&radial))?;
                    let composed = rotate_inv(&y, &w, layout)?;
                    // The fused layer gives the same, so it is equivariant too.
                    let (fused, fused_extra) = conv.forward_rotated(x, &w, Some(&radial))?;
                    let extra = extra.expect("extra outputs configured");
                    assert_close(&fused, &composed, 1e-12);
                    assert_close(
                        &fused_extra.expect("extra outputs configured"),
                        &extra,
                        1e-12,
                    );
                    Ok((fused, extra))
                };
            let (out, extra) = layer(&x, &vecs, 43)?;
            for seed in [1, 2, 3] {
                let q = random_rotation(seed);
                let qvecs: Vec<[f64; 3]> = vecs
                    .iter()
                    .map(|v| crate::testing::matvec3(&q, *v))
                    .collect();
                let (out_q, extra_q) = layer(&rotate_embedding(&x, &q, lmax)?, &qvecs, 44 + seed)?;
                assert_close(&out_q, &rotate_embedding(&out, &q, lmax)?, 1e-10);
                assert_close(&extra_q, &extra, 1e-10);
            }
            // Not vacuous: without the rotation of the input the output changes.
            let (out_x, _) = layer(
                &x,
                &vecs
                    .iter()
                    .map(|v| crate::testing::matvec3(&random_rotation(9), *v))
                    .collect::<Vec<_>>(),
                43,
            )?;
            let diff = (out_x - &out)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(
                diff > 1e-3,
                "the layer depends on the edge directions ({diff})"
            );
        }
        Ok(())
    }
}
