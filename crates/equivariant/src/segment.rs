//! Segment reductions over edges grouped by their target node: sum, gather (broadcast back to
//! the edges) and softmax, as custom ops with gradients.
//!
//! A [`Segments`] is built once per graph from the target index of every edge (`[E]`, u32 or
//! i64, values `< num_segments`) by a counting sort: it stores, for every segment, the edges that
//! point to it (in edge order) as a CSR list. Edges sorted by target make every segment a
//! contiguous block and skip the permutation; unsorted edges work too.
//!
//! * [`Segments::sum`]: `[E, ...] → [S, ...]`, `out[s] = Σ_{e: index[e] = s} src[e]` (what
//!   `index_add` / `torch_scatter.scatter(..., reduce="sum")` compute). Deterministic: each
//!   segment is summed by one thread in edge order. Empty segments give zeros.
//! * [`Segments::gather`]: `[S, ...] → [E, ...]`, `out[e] = src[index[e]]` (`index_select`).
//! * [`Segments::softmax`]: `[E, ...] → [E, ...]`, a softmax over the edges of each segment,
//!   independently for every trailing column (e.g. attention heads), numerically stable (the
//!   per-segment maximum is subtracted) and with PyTorch Geometric's `1e-16` added to the
//!   denominator (`torch_geometric.utils.softmax`, used by EquiformerV2's attention).
//!
//! Gradients: `sum` and `gather` are each other's backward; the softmax backward
//! `y ⊙ (g − gather(sum(g ⊙ y)))` is one fused pass per segment whose own backward is composed
//! of these ops, so gradients of gradients work too.
//! `Tensor::scatter_add` is never used (its backward is wrong in candle 0.11).
//!
//! A grouping made from a device tensor ([`Segments::new`]) copies the index to the host,
//! which on a GPU waits for every queued kernel: build groupings once per graph from host
//! data ([`Segments::from_indices`], [`Segments::from_offsets`]) and pair them with their
//! device index as a [`RowIndex`] where layers gather by the same index again and again.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use matscale_equivariant::segment::Segments;
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! // Four edges into three nodes; node 1 has no incoming edge.
//! let target = Tensor::new(&[2u32, 0, 2, 0], &Device::Cpu)?;
//! let segments = Segments::new(&target, 3)?;
//! let messages = Tensor::new(&[[1.0f32], [2.0], [3.0], [4.0]], &Device::Cpu)?;
//! let summed: Vec<Vec<f32>> = segments.sum(&messages)?.to_vec2()?;
//! assert_eq!(summed, vec![vec![6.0], vec![0.0], vec![4.0]]);
//! let logits = Tensor::new(&[[0.0f32], [1.0], [0.0], [1.0]], &Device::Cpu)?;
//! let alpha: Vec<Vec<f32>> = segments.softmax(&logits)?.to_vec2()?;
//! assert!((alpha[0][0] - 0.5).abs() < 1e-6 && (alpha[1][0] - 0.5).abs() < 1e-6);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::{check_float, Float};
use crate::buffer::split_pieces;
use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};
use crate::so2::dispatch_kernel;

mod weighted;

/// Added to the softmax denominator, as `torch_geometric.utils.softmax` does.
const SOFTMAX_EPS: f64 = 1e-16;

/// Target number of scalar elements handled by one rayon task.
const TASK_ELEMENTS: usize = 1 << 15;

/// The CSR grouping of items (edges) by segment (target node); shared by the ops.
#[derive(Debug)]
struct Csr {
    num_segments: usize,
    /// Segment of every item, `[E]`.
    index: Vec<u32>,
    /// `offsets[s]..offsets[s + 1]` is the range of segment `s` in `order`.
    offsets: Vec<usize>,
    /// Items grouped by segment (stable); `None` when the index is sorted (identity).
    order: Option<Vec<u32>>,
    /// The arrays on the GPU, uploaded once by the first op that runs there.
    #[cfg(feature = "cuda")]
    device: crate::cuda::segment::DeviceCsrCache,
}

impl Csr {
    fn num_items(&self) -> usize {
        self.index.len()
    }

    /// The grouping as borrowed by the CUDA kernels.
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> crate::cuda::segment::Csr<'_> {
        let (index, offsets, order) = (&self.index, &self.offsets, self.order.as_deref());
        let num_segments = self.num_segments;
        crate::cuda::segment::Csr {
            num_segments,
            index,
            offsets,
            order,
            cache: &self.device,
        }
    }

    /// Item at position `k` of the grouped order.
    #[inline(always)]
    fn item(&self, k: usize) -> usize {
        match &self.order {
            Some(order) => order[k] as usize,
            None => k,
        }
    }

    /// Consecutive segment ranges `[s0, s1)` of roughly `TASK_ELEMENTS / cols` items each.
    fn blocks(&self, cols: usize) -> Vec<(usize, usize)> {
        let target = (TASK_ELEMENTS / cols.max(1)).max(1);
        let mut blocks = Vec::new();
        let mut s0 = 0;
        for s in 0..self.num_segments {
            let items = self.offsets[s + 1] - self.offsets[s0];
            if items >= target || s - s0 + 1 >= target {
                blocks.push((s0, s + 1));
                s0 = s + 1;
            }
        }
        if s0 < self.num_segments || blocks.is_empty() {
            blocks.push((s0, self.num_segments));
        }
        blocks
    }
}

/// Splits `data` into consecutive pieces of `(b − a) · cols` elements for the consecutive
/// bounds `(a, b)` starting at 0.
fn split_blocks<'a, T>(
    data: &'a mut [T],
    bounds: &[(usize, usize)],
    cols: usize,
) -> Vec<&'a mut [T]> {
    let lens: Vec<usize> = bounds.iter().map(|&(a, b)| (b - a) * cols).collect();
    split_pieces(data, &lens)
}

/// Edges (items) grouped by their target segment; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Segments {
    csr: Arc<Csr>,
}

impl Segments {
    /// Groups the items of `index` (`[E]`, u8/u32/i64, every value `< num_segments`).
    pub fn new(index: &Tensor, num_segments: usize) -> Result<Self> {
        if index.rank() != 1 {
            return Err(EquivariantError::ShapeMismatch {
                arg: "index",
                expected: "[num_edges]".into(),
                found: index.dims().to_vec(),
            });
        }
        let values: Vec<i64> = match index.dtype() {
            DType::U8 | DType::U32 | DType::I64 => index.to_dtype(DType::I64)?.to_vec1()?,
            found => {
                return Err(EquivariantError::UnsupportedDType {
                    arg: "index",
                    found,
                })
            }
        };
        Self::from_indices(&values, num_segments)
    }

    /// Groups the items of a plain index slice (every value in `0..num_segments`).
    pub fn from_indices<I>(index: &[I], num_segments: usize) -> Result<Self>
    where
        I: Copy + TryInto<u32> + std::fmt::Debug,
    {
        if num_segments > u32::MAX as usize {
            return Err(EquivariantError::InvalidArgument {
                name: "num_segments",
                reason: format!("{num_segments} exceeds u32::MAX"),
            });
        }
        let mut idx = Vec::with_capacity(index.len());
        for (e, &v) in index.iter().enumerate() {
            match v.try_into() {
                Ok(s) if (s as usize) < num_segments => idx.push(s),
                _ => {
                    return Err(EquivariantError::InvalidArgument {
                        name: "index",
                        reason: format!("entry {e} is {v:?}, outside 0..{num_segments}"),
                    })
                }
            }
        }
        let mut offsets = vec![0usize; num_segments + 1];
        for &s in &idx {
            offsets[s as usize + 1] += 1;
        }
        for s in 0..num_segments {
            offsets[s + 1] += offsets[s];
        }
        let sorted = idx.windows(2).all(|w| w[0] <= w[1]);
        let order = if sorted {
            None
        } else {
            let mut next = offsets.clone();
            let mut order = vec![0u32; idx.len()];
            for (e, &s) in idx.iter().enumerate() {
                order[next[s as usize]] = e as u32;
                next[s as usize] += 1;
            }
            Some(order)
        };
        Ok(Self {
            csr: Arc::new(Csr {
                num_segments,
                index: idx,
                offsets,
                order,
                #[cfg(feature = "cuda")]
                device: Default::default(),
            }),
        })
    }

    /// Groups items that are already sorted by segment: segment `s` holds the items
    /// `offsets[s]..offsets[s + 1]` (`offsets` has `S + 1` non-decreasing entries from 0, as
    /// a batch's per-node or per-structure pointers).
    ///
    /// # Errors
    /// [`EquivariantError::InvalidArgument`] naming `offsets` if it is empty, does not start
    /// at 0, decreases, or has more than `u32::MAX` items or segments.
    pub fn from_offsets(offsets: &[usize]) -> Result<Self> {
        let invalid = |reason: String| EquivariantError::InvalidArgument {
            name: "offsets",
            reason,
        };
        let (&first, &last) = match (offsets.first(), offsets.last()) {
            (Some(first), Some(last)) => (first, last),
            _ => return Err(invalid("empty (it needs S + 1 entries)".into())),
        };
        if first != 0 {
            return Err(invalid(format!("starts at {first}, not 0")));
        }
        if let Some(s) = offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(invalid(format!(
                "decreases at segment {s} ({} then {})",
                offsets[s],
                offsets[s + 1]
            )));
        }
        let num_segments = offsets.len() - 1;
        if last > u32::MAX as usize || num_segments > u32::MAX as usize {
            return Err(invalid(format!(
                "{last} items in {num_segments} segments exceed u32::MAX"
            )));
        }
        let mut index = Vec::with_capacity(last);
        for (s, w) in offsets.windows(2).enumerate() {
            index.extend(std::iter::repeat_n(s as u32, w[1] - w[0]));
        }
        Ok(Self {
            csr: Arc::new(Csr {
                num_segments,
                index,
                offsets: offsets.to_vec(),
                order: None,
                #[cfg(feature = "cuda")]
                device: Default::default(),
            }),
        })
    }

    /// Number of segments `S` (nodes).
    pub fn num_segments(&self) -> usize {
        self.csr.num_segments
    }

    /// Number of items `E` (edges).
    pub fn num_items(&self) -> usize {
        self.csr.num_items()
    }

    /// Whether the index was sorted (every segment is a contiguous block of items).
    pub fn is_sorted(&self) -> bool {
        self.csr.order.is_none()
    }

    /// CSR offsets `[S + 1]`: the items of segment `s` are `offsets[s]..offsets[s + 1]` in
    /// segment order (the items themselves when [`Self::is_sorted`]).
    pub fn offsets(&self) -> &[usize] {
        &self.csr.offsets
    }

    /// The segment of every item `[E]` (the index the grouping was built from, as u32).
    pub fn segment_of(&self) -> &[u32] {
        &self.csr.index
    }

    /// Number of items in every segment (the in-degree of every node).
    pub fn counts(&self) -> Vec<usize> {
        self.csr.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The segment index as a u32 tensor `[E]` on `device`.
    pub fn index_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.csr.index,
            self.num_items(),
            device,
        )?)
    }

    fn check(&self, src: &Tensor, rows: usize, arg: &'static str, what: &str) -> Result<()> {
        check_float(src, arg)?;
        check_rows(src, rows, arg, what)
    }

    /// Sum over the items of each segment: `[E, ...] → [S, ...]` (zeros for empty segments).
    pub fn sum(&self, src: &Tensor) -> Result<Tensor> {
        self.check(src, self.num_items(), "src", "items")?;
        Ok(src.contiguous()?.apply_op1(SegmentOp {
            csr: self.csr.clone(),
            kind: Kind::Sum,
        })?)
    }

    /// Copies each segment's row to its items: `[S, ...] → [E, ...]`.
    pub fn gather(&self, src: &Tensor) -> Result<Tensor> {
        self.check(src, self.num_segments(), "src", "segments")?;
        Ok(src.contiguous()?.apply_op1(SegmentOp {
            csr: self.csr.clone(),
            kind: Kind::Gather,
        })?)
    }

    /// `src.index_select(index, 0)` where `index` is this grouping's index as a tensor: candle's
    /// `index_select` on the CPU and for dtypes other than f32 and f64, [`Self::gather`]
    /// elsewhere (its backward is a segment sum, not candle's CUDA `index_add`; see
    /// [`gather_rows`], which builds the grouping from the tensor on every call).
    pub fn select_rows(&self, src: &Tensor, index: &Tensor) -> Result<Tensor> {
        if gathers_with_index_select(src) {
            return Ok(src.index_select(index, 0)?);
        }
        self.gather(src)
    }

    /// `zeros([S, ...]).index_add(index, src, 0)` where `index` is this grouping's index as a
    /// tensor: [`Self::sum`] for f32 and f64 on every device (deterministic, parallel on the
    /// CPU, and on a GPU free of candle's `index_add`, which walks every row in each column's
    /// thread), candle's `index_add` for the other dtypes (zeros without items, which
    /// `index_add` rejects).
    pub fn scatter_sum(&self, src: &Tensor, index: &Tensor) -> Result<Tensor> {
        if matches!(src.dtype(), DType::F32 | DType::F64) {
            return self.sum(src);
        }
        let mut shape = src.dims().to_vec();
        if let Some(rows) = shape.first_mut() {
            *rows = self.num_segments();
        }
        let zeros = Tensor::zeros(shape, src.dtype(), src.device())?;
        if self.num_items() == 0 {
            return Ok(zeros);
        }
        Ok(zeros.index_add(index, &src.contiguous()?, 0)?)
    }

    /// Softmax over the items of each segment, per trailing column: `[E, ...] → [E, ...]`.
    pub fn softmax(&self, src: &Tensor) -> Result<Tensor> {
        self.check(src, self.num_items(), "src", "items")?;
        Ok(src.contiguous()?.apply_op1(SegmentOp {
            csr: self.csr.clone(),
            kind: Kind::Softmax,
        })?)
    }
}

/// `[E, ...] → [S, ...]` sum over segments given by `index` (`[E]`); see [`Segments::sum`].
pub fn segment_sum(src: &Tensor, index: &Tensor, num_segments: usize) -> Result<Tensor> {
    Segments::new(index, num_segments)?.sum(src)
}

/// `src.index_select(index, 0)` (`[S, ...]` rows for `index` `[E]`), differentiable, with a
/// backward that is fast on every device.
///
/// On the CPU, and for dtypes other than f32 and f64, it is candle's `index_select`. On a GPU
/// it is a [`Segments::gather`] (after copying `index` to the host to group it): the backward
/// of `index_select`, candle's CUDA `index_add`, gives each thread one column and walks all
/// `E` rows in it, milliseconds per call where the segment sum takes microseconds.
///
/// # Errors
/// `index` is not a `[E]` integer tensor with values below `src.dim(0)`.
pub fn gather_rows(src: &Tensor, index: &Tensor) -> Result<Tensor> {
    if gathers_with_index_select(src) {
        return Ok(src.index_select(index, 0)?);
    }
    Segments::new(index, src.dim(0)?)?.gather(src)
}

/// A row index (`[E]`, u32, values below [`Self::rows`]) on its device together with its
/// host grouping ([`Segments`]), made once per graph and shared (cheaply cloned) by every
/// gather and sum over it.
///
/// [`gather_rows`] and [`segment_sum`] group their index anew on every call, which on a GPU
/// copies it to the host and so waits for every queued kernel. A model that gathers by the
/// same index in every layer (EquiformerV2's messages and radial embeddings) builds a
/// `RowIndex` per batch instead, from the host copy the batch already has
/// ([`Self::from_segments`]), and its layers never synchronise with the device.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor};
/// use matscale_equivariant::segment::{RowIndex, Segments};
///
/// # fn main() -> matscale_equivariant::error::Result<()> {
/// let source = RowIndex::from_segments(Segments::from_indices(&[1u32, 0, 1], 2)?, &Device::Cpu)?;
/// let nodes = Tensor::new(&[[10.0f32], [20.0]], &Device::Cpu)?;
/// let rows: Vec<Vec<f32>> = source.gather(&nodes)?.to_vec2()?;
/// assert_eq!(rows, vec![vec![20.0], vec![10.0], vec![20.0]]);
/// let back: Vec<Vec<f32>> = source.sum(&source.gather(&nodes)?)?.to_vec2()?;
/// assert_eq!(back, vec![vec![10.0], vec![40.0]]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RowIndex {
    index: Tensor,
    segments: Segments,
}

impl RowIndex {
    /// Groups `index` (`[E]`, u8/u32/i64, every value below `rows`): one copy to the host.
    ///
    /// # Errors
    /// As [`Segments::new`].
    pub fn new(index: &Tensor, rows: usize) -> Result<Self> {
        let segments = Segments::new(index, rows)?;
        Self::from_segments(segments, index.device())
    }

    /// The index of `segments` ([`Segments::segment_of`]) uploaded to `device`; no copy from
    /// the device.
    ///
    /// # Errors
    /// The upload fails.
    pub fn from_segments(segments: Segments, device: &candle_core::Device) -> Result<Self> {
        let index = segments.index_tensor(device)?;
        Ok(Self { index, segments })
    }

    /// The index `[E]`, u32, contiguous, on its device.
    pub fn tensor(&self) -> &Tensor {
        &self.index
    }

    /// The host grouping of the index.
    pub fn segments(&self) -> &Segments {
        &self.segments
    }

    /// The index on the host (`[E]`, u32).
    pub fn host(&self) -> &[u32] {
        self.segments.segment_of()
    }

    /// Number of rows indexed into (`S`: every value is below it).
    pub fn rows(&self) -> usize {
        self.segments.num_segments()
    }

    /// Number of entries `E`.
    pub fn len(&self) -> usize {
        self.segments.num_items()
    }

    /// Whether the index has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `src.index_select(index, 0)`: `[S, ...] → [E, ...]`, as [`Segments::select_rows`].
    ///
    /// # Errors
    /// `src` does not have [`Self::rows`] rows.
    pub fn gather(&self, src: &Tensor) -> Result<Tensor> {
        check_rows(src, self.rows(), "src", "rows of the index")?;
        self.segments.select_rows(src, &self.index)
    }

    /// `zeros([S, ...]).index_add(index, src, 0)`: `[E, ...] → [S, ...]`, as
    /// [`Segments::scatter_sum`].
    ///
    /// # Errors
    /// `src` does not have [`Self::len`] rows.
    pub fn sum(&self, src: &Tensor) -> Result<Tensor> {
        check_rows(src, self.len(), "src", "entries of the index")?;
        self.segments.scatter_sum(src, &self.index)
    }
}

/// An error naming `arg` unless `src` is `[rows, ...]` (`what` says what the rows are).
fn check_rows(src: &Tensor, rows: usize, arg: &'static str, what: &str) -> Result<()> {
    if src.rank() == 0 || src.dim(0)? != rows {
        return Err(EquivariantError::ShapeMismatch {
            arg,
            expected: format!("[{rows} ({what}), ...]"),
            found: src.dims().to_vec(),
        });
    }
    Ok(())
}

/// Whether [`gather_rows`] and [`Segments::select_rows`] keep candle's `index_select` for
/// `src`: on the CPU (where its backward is fine) and for dtypes the segment ops lack.
fn gathers_with_index_select(src: &Tensor) -> bool {
    src.device().is_cpu() || !matches!(src.dtype(), DType::F32 | DType::F64)
}

/// Softmax over the items sharing an `index` (`[E]`); see [`Segments::softmax`].
pub fn segment_softmax(src: &Tensor, index: &Tensor, num_segments: usize) -> Result<Tensor> {
    Segments::new(index, num_segments)?.softmax(src)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sum,
    Gather,
    Softmax,
}

/// The custom op behind [`Segments::sum`], [`Segments::gather`] and [`Segments::softmax`].
#[derive(Debug, Clone)]
struct SegmentOp {
    csr: Arc<Csr>,
    kind: Kind,
}

fn sum_kernel<T: Float>(csr: &Csr, src: &[T], cols: usize) -> Vec<T> {
    let mut out = crate::buffer::zeroed_vec::<T>(csr.num_segments * cols);
    let blocks = csr.blocks(cols);
    let pieces = split_blocks(&mut out, &blocks, cols);
    pieces
        .into_par_iter()
        .zip(blocks.par_iter())
        .for_each(|(piece, &(s0, s1))| {
            for s in s0..s1 {
                let acc = &mut piece[(s - s0) * cols..(s - s0 + 1) * cols];
                for k in csr.offsets[s]..csr.offsets[s + 1] {
                    let e = csr.item(k);
                    for (a, &v) in acc.iter_mut().zip(&src[e * cols..(e + 1) * cols]) {
                        *a += v;
                    }
                }
            }
        });
    out
}

fn gather_kernel<T: Float>(csr: &Csr, src: &[T], cols: usize) -> Vec<T> {
    let mut out = crate::buffer::zeroed_vec::<T>(csr.num_items() * cols);
    let rows_per_task = (TASK_ELEMENTS / cols.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * cols.max(1))
        .enumerate()
        .for_each(|(task, chunk)| {
            for (r, row) in chunk.chunks_mut(cols.max(1)).enumerate() {
                let s = csr.index[task * rows_per_task + r] as usize;
                row.copy_from_slice(&src[s * cols..(s + 1) * cols]);
            }
        });
    out
}

fn softmax_kernel<T: Float>(csr: &Csr, src: &[T], cols: usize) -> Vec<T> {
    // Results in the grouped order (each segment contiguous), then permuted back if needed.
    let mut grouped = crate::buffer::zeroed_vec::<T>(csr.num_items() * cols);
    let blocks = csr.blocks(cols);
    let item_bounds: Vec<(usize, usize)> = blocks
        .iter()
        .map(|&(s0, s1)| (csr.offsets[s0], csr.offsets[s1]))
        .collect();
    let pieces = split_blocks(&mut grouped, &item_bounds, cols);
    pieces
        .into_par_iter()
        .zip(blocks.par_iter())
        .for_each(|(piece, &(s0, s1))| softmax_block(csr, src, piece, (s0, s1), cols));
    ungroup(csr, grouped, cols)
}

/// The softmax of the segments `s0..s1` into `piece` (their items' rows, grouped order).
/// Each row's exponentials are written first and summed after, so that both loops run on
/// whole rows of SIMD lanes (compiled for AVX-512 or AVX2 by [`softmax_block`]).
#[inline(always)]
fn softmax_block_kernel<T: Float>(
    csr: &Csr,
    src: &[T],
    piece: &mut [T],
    (s0, s1): (usize, usize),
    cols: usize,
) {
    let base = csr.offsets[s0];
    let eps = T::from_f64(SOFTMAX_EPS);
    let mut max = vec![T::ZERO; cols];
    let mut sum = vec![T::ZERO; cols];
    for s in s0..s1 {
        let (k0, k1) = (csr.offsets[s], csr.offsets[s + 1]);
        if k0 == k1 {
            continue;
        }
        let first = csr.item(k0);
        max.copy_from_slice(&src[first * cols..(first + 1) * cols]);
        for k in k0 + 1..k1 {
            let e = csr.item(k);
            for (m, &v) in max.iter_mut().zip(&src[e * cols..(e + 1) * cols]) {
                *m = Float::fmax(*m, v);
            }
        }
        sum.fill(T::ZERO);
        for k in k0..k1 {
            let e = csr.item(k);
            let row = &mut piece[(k - base) * cols..(k - base + 1) * cols];
            for ((r, &v), &m) in row.iter_mut().zip(&src[e * cols..(e + 1) * cols]).zip(&max) {
                *r = (v - m).exp();
            }
            for (acc, &r) in sum.iter_mut().zip(row.iter()) {
                *acc += r;
            }
        }
        for v in sum.iter_mut() {
            *v = T::ONE / (*v + eps);
        }
        for row in piece[(k0 - base) * cols..(k1 - base) * cols].chunks_mut(cols) {
            for (v, &inv) in row.iter_mut().zip(&sum) {
                *v *= inv;
            }
        }
    }
}

dispatch_kernel!(softmax_block, softmax_block_kernel, (csr: &Csr, src: &[T], piece: &mut [T], bounds: (usize, usize), cols: usize));

/// Moves rows from the grouped (by segment) order back to item order.
fn ungroup<T: Float>(csr: &Csr, grouped: Vec<T>, cols: usize) -> Vec<T> {
    let Some(order) = &csr.order else {
        return grouped;
    };
    // position of every item in the grouped order
    let mut position = vec![0u32; order.len()];
    for (k, &e) in order.iter().enumerate() {
        position[e as usize] = k as u32;
    }
    let mut out = crate::buffer::zeroed_vec::<T>(grouped.len());
    out.par_chunks_mut(cols.max(1))
        .zip(position.par_iter())
        .for_each(|(row, &k)| {
            let k = k as usize;
            row.copy_from_slice(&grouped[k * cols..(k + 1) * cols]);
        });
    out
}

/// Softmax backward `dx = y ⊙ (g − gather(sum(g ⊙ y)))` in one pass per segment.
fn softmax_backward_kernel<T: Float>(csr: &Csr, y: &[T], g: &[T], cols: usize) -> Vec<T> {
    let mut grouped = crate::buffer::zeroed_vec::<T>(csr.num_items() * cols);
    let blocks = csr.blocks(cols);
    let item_bounds: Vec<(usize, usize)> = blocks
        .iter()
        .map(|&(s0, s1)| (csr.offsets[s0], csr.offsets[s1]))
        .collect();
    let pieces = split_blocks(&mut grouped, &item_bounds, cols);
    pieces
        .into_par_iter()
        .zip(blocks.par_iter())
        .for_each(|(piece, &(s0, s1))| {
            let base = csr.offsets[s0];
            let mut dot = vec![T::ZERO; cols];
            for s in s0..s1 {
                let (k0, k1) = (csr.offsets[s], csr.offsets[s + 1]);
                dot.iter_mut().for_each(|v| *v = T::ZERO);
                for k in k0..k1 {
                    let e = csr.item(k);
                    for j in 0..cols {
                        dot[j] += g[e * cols + j] * y[e * cols + j];
                    }
                }
                for k in k0..k1 {
                    let e = csr.item(k);
                    let row = &mut piece[(k - base) * cols..(k - base + 1) * cols];
                    for j in 0..cols {
                        row[j] = y[e * cols + j] * (g[e * cols + j] - dot[j]);
                    }
                }
            }
        });
    ungroup(csr, grouped, cols)
}

/// Fused softmax backward (args: softmax output `y`, incoming gradient `g`), `[E, ...]`.
///
/// Its own backward (for gradients of gradients), with upstream `h`, `S = sum(g ⊙ y)` and
/// `T = sum(h ⊙ y)`: `∂/∂g = y ⊙ (h − gather(T))` (this op again) and
/// `∂/∂y = h ⊙ (g − gather(S)) − g ⊙ gather(T)`.
#[derive(Debug, Clone)]
struct SoftmaxBackward {
    csr: Arc<Csr>,
}

/// Inputs `(y, g)`, rows of `cols` values.
impl FloatKernel<2> for SoftmaxBackward {
    fn run<T: Float>(&self, [(y, l), (g, _)]: [(&[T], &Layout); 2]) -> candle_core::Result<Vec<T>> {
        let cols: usize = l.dims()[1..].iter().product();
        Ok(softmax_backward_kernel(&self.csr, y, g, cols))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "segment-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::segment::softmax_backward(s1, l1, s2, l2, &self.csr.cuda())
    }

    fn bwd(
        &self,
        y: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        h: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let seg = Segments {
            csr: self.csr.clone(),
        };
        let h = h.contiguous()?;
        let dg = y.apply_op2(&h, self.clone())?;
        let s = seg
            .gather(&seg.sum(&g.mul(y)?).map_err(to_candle)?)
            .map_err(to_candle)?;
        let t = seg
            .gather(&seg.sum(&h.mul(y)?).map_err(to_candle)?)
            .map_err(to_candle)?;
        let dy = h.mul(&g.sub(&s)?)?.sub(&g.mul(&t)?)?;
        Ok((Some(dy), Some(dg)))
    }
}

fn to_candle(e: EquivariantError) -> candle_core::Error {
    match e {
        EquivariantError::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// Input: rows of `cols` values, grouped by segment.
impl FloatKernel<1> for SegmentOp {
    fn run<T: Float>(&self, [(src, l)]: [(&[T], &Layout); 1]) -> candle_core::Result<Vec<T>> {
        let cols: usize = l.dims()[1..].iter().product();
        Ok(match self.kind {
            Kind::Sum => sum_kernel(&self.csr, src, cols),
            Kind::Gather => gather_kernel(&self.csr, src, cols),
            Kind::Softmax => softmax_kernel(&self.csr, src, cols),
        })
    }
}

impl CustomOp1 for SegmentOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Sum => "segment-sum",
            Kind::Gather => "segment-gather",
            Kind::Softmax => "segment-softmax",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out_dims = layout.dims().to_vec();
        out_dims[0] = match self.kind {
            Kind::Sum => self.csr.num_segments,
            Kind::Gather | Kind::Softmax => self.csr.num_items(),
        };
        let out = run_float(self.name(), [(storage, layout)], self)?;
        Ok((out, Shape::from(out_dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::segment::SegmentKind;
        let kind = match self.kind {
            Kind::Sum => SegmentKind::Sum,
            Kind::Gather => SegmentKind::Gather,
            Kind::Softmax => SegmentKind::Softmax(SOFTMAX_EPS),
        };
        crate::cuda::segment::forward(storage, layout, &self.csr.cuda(), kind, self.name())
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let seg = Segments {
            csr: self.csr.clone(),
        };
        let grad = match self.kind {
            Kind::Sum => seg.gather(grad_res).map_err(to_candle)?,
            Kind::Gather => seg.sum(grad_res).map_err(to_candle)?,
            Kind::Softmax => res.contiguous()?.apply_op2(
                &grad_res.contiguous()?,
                SoftmaxBackward {
                    csr: self.csr.clone(),
                },
            )?,
        };
        Ok(Some(grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close_slice, check_gradient, random_tensor};
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// One launch of the CUDA segment kernels (`kernels/segment.cu`) on the host
    /// (`crate::host_kernels`) for `seg`, mode as in `kernels/host/segment_main.cpp`, with the
    /// float inputs `floats` (already in the driver's order); the output as f64.
    fn host_segment<T: crate::activation::Float + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        seg: &Segments,
        mode: i64,
        (cols, k, hv, heads): (usize, usize, usize, usize),
        floats: &[&[f64]],
    ) -> Vec<f64> {
        use crate::host_kernels::{bytes_of, floats_from};
        let header = [
            std::mem::size_of::<T>() as i64,
            mode,
            seg.num_segments() as i64,
            seg.num_items() as i64,
            cols as i64,
            i64::from(!seg.is_sorted()),
            k as i64,
            hv as i64,
            (hv / heads.max(1)) as i64,
            heads as i64,
        ];
        let order: Vec<u32> = (0..seg.num_items())
            .map(|p| seg.csr.item(p) as u32)
            .collect();
        let offsets: Vec<u32> = seg.offsets().iter().map(|&o| o as u32).collect();
        let mut input = bytes_of(&header);
        for ints in [&offsets, &order, &seg.segment_of().to_vec()] {
            input.extend(ints.iter().flat_map(|v| v.to_le_bytes()));
        }
        for f in floats {
            let t: Vec<T> = f.iter().map(|&v| T::from_f64(v)).collect();
            input.extend(bytes_of(&t));
        }
        let tag = format!(
            "{}-{mode}-{}-{}",
            T::DTYPE.as_str(),
            seg.num_items(),
            seg.is_sorted()
        );
        floats_from(&driver.run(&tag, &input), std::mem::size_of::<T>())
    }

    /// A host-kernel case: driver mode, float inputs, the CPU result.
    type HostCase<'a> = (i64, Vec<&'a [f64]>, &'a [f64]);

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values")
    }

    /// The CUDA segment kernels, run on the host, agree with the CPU ops: sum, gather, softmax
    /// and its backward, the head-weighted sum and its two backward kernels, for sorted and
    /// unsorted groupings with empty segments; f64 to 1e-12 and f32 to 1e-5 of the largest value.
    #[test]
    fn cuda_segment_kernels_match_the_cpu_on_the_host() -> Result<()> {
        let Some(driver) = crate::host_kernels::driver("segment_main") else {
            return Ok(());
        };
        let dev = Device::Cpu;
        let (items, segments, cols) = (53, 9, 5);
        let (k, heads, v) = (3, 2, 4);
        let hv = heads * v;
        for sorted in [true, false] {
            let index = random_index(items, segments, sorted, 61);
            // Segment 3 empty: no item points to it.
            let index: Vec<u32> = index
                .into_iter()
                .map(|s| if s == 3 { 4 } else { s })
                .collect();
            let seg = Segments::from_indices(&index, segments)?;
            assert_eq!(seg.is_sorted(), sorted);
            let src = crate::testing::random_normals(items * cols, 62);
            let node = crate::testing::random_normals(segments * cols, 63);
            let g = crate::testing::random_normals(items * cols, 64);
            let x = crate::testing::random_normals(items * k * hv, 65);
            let w = crate::testing::random_normals(items * heads, 66);
            let gs = crate::testing::random_normals(segments * k * hv, 67);
            let t = |d: &[f64], shape: &[usize]| Tensor::from_slice(d, shape, &dev);
            // The CPU results (f64).
            let sum = values(&seg.sum(&t(&src, &[items, cols])?)?);
            let gather = values(&seg.gather(&t(&node, &[segments, cols])?)?);
            let xs = candle_core::Var::from_tensor(&t(&src, &[items, cols])?)?;
            let y = seg.softmax(xs.as_tensor())?;
            let dsoft = (&y * t(&g, &[items, cols])?)?.sum_all()?.backward()?;
            let dsoft = values(dsoft.get(xs.as_tensor()).expect("softmax gradient"));
            let soft = values(&y);
            let xv = candle_core::Var::from_tensor(&t(&x, &[items, k, hv])?)?;
            let wv = candle_core::Var::from_tensor(&t(&w, &[items, heads])?)?;
            let ws = seg.head_weighted_sum(xv.as_tensor(), wv.as_tensor())?;
            let grads = (&ws * t(&gs, &[segments, k, hv])?)?.sum_all()?.backward()?;
            let mut dws = values(grads.get(xv.as_tensor()).expect("values gradient"));
            dws.extend(values(grads.get(wv.as_tensor()).expect("weights gradient")));
            let ws = values(&ws);
            let shape = (cols, k, hv, heads);
            let cases: [HostCase<'_>; 6] = [
                (0, vec![&src], &sum),
                (1, vec![&node], &gather),
                (2, vec![&src], &soft),
                (3, vec![&soft, &g], &dsoft),
                (4, vec![&x, &w], &ws),
                (5, vec![&x, &w, &gs], &dws),
            ];
            for (mode, inputs, want) in cases {
                use crate::host_kernels::max_relative_error;
                let what = format!("mode {mode} sorted {sorted}");
                let got64 = host_segment::<f64>(driver, &seg, mode, shape, &inputs);
                let got32 = host_segment::<f32>(driver, &seg, mode, shape, &inputs);
                let e64 = max_relative_error(&what, &got64, want);
                let e32 = max_relative_error(&what, &got32, want);
                assert!(e64 < 1e-12, "{what}: f64 error {e64:e}");
                assert!(e32 < 1e-5, "{what}: f32 error {e32:e}");
            }
        }
        Ok(())
    }

    fn random_index(n: usize, segments: usize, sorted: bool, seed: u64) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v: Vec<u32> = (0..n).map(|_| rng.gen_range(0..segments as u32)).collect();
        if sorted {
            v.sort();
        }
        v
    }

    fn naive_sum(src: &[f64], index: &[u32], segments: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0.0; segments * cols];
        for (e, &s) in index.iter().enumerate() {
            for j in 0..cols {
                out[s as usize * cols + j] += src[e * cols + j];
            }
        }
        out
    }

    fn naive_softmax(src: &[f64], index: &[u32], segments: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0.0; src.len()];
        for s in 0..segments as u32 {
            for j in 0..cols {
                let items: Vec<usize> = (0..index.len()).filter(|&e| index[e] == s).collect();
                let max = items
                    .iter()
                    .map(|&e| src[e * cols + j])
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = items.iter().map(|&e| (src[e * cols + j] - max).exp()).sum();
                for &e in &items {
                    out[e * cols + j] = (src[e * cols + j] - max).exp() / (z + 1e-16);
                }
            }
        }
        out
    }

    #[test]
    fn sum_gather_softmax_match_naive_references() -> Result<()> {
        for (sorted, seed) in [(true, 1u64), (false, 2), (false, 3)] {
            let (e, s, cols) = (3000, 700, 3);
            let index = random_index(e, s, sorted, seed);
            let seg = Segments::from_indices(&index, s)?;
            assert_eq!(seg.is_sorted(), sorted);
            assert!(seg.counts().contains(&0), "want some empty segments");
            let x = (random_tensor(&[e, cols], DType::F64, seed)? * 5.0)?;
            let xv: Vec<f64> = x.flatten_all()?.to_vec1()?;

            let sum: Vec<f64> = seg.sum(&x)?.flatten_all()?.to_vec1()?;
            assert_close_slice(&sum, &naive_sum(&xv, &index, s, cols), 1e-12);
            // index_add agrees (the candle op with a correct backward)
            let idx = seg.index_tensor(&Device::Cpu)?;
            let ia = Tensor::zeros((s, cols), DType::F64, &Device::Cpu)?.index_add(&idx, &x, 0)?;
            assert_close_slice(&sum, &ia.flatten_all()?.to_vec1::<f64>()?, 1e-12);

            let soft: Vec<f64> = seg.softmax(&x)?.flatten_all()?.to_vec1()?;
            assert_close_slice(&soft, &naive_softmax(&xv, &index, s, cols), 1e-14);

            let nodes = random_tensor(&[s, cols], DType::F64, 9)?;
            let g: Vec<f64> = seg.gather(&nodes)?.flatten_all()?.to_vec1()?;
            let nv: Vec<f64> = nodes.flatten_all()?.to_vec1()?;
            for (k, &t) in index.iter().enumerate() {
                assert_eq!(
                    &g[k * cols..(k + 1) * cols],
                    &nv[t as usize * cols..(t as usize + 1) * cols]
                );
            }

            // f32 agrees with f64
            let soft32: Vec<f32> = seg
                .softmax(&x.to_dtype(DType::F32)?)?
                .flatten_all()?
                .to_vec1()?;
            let soft32: Vec<f64> = soft32.into_iter().map(f64::from).collect();
            assert_close_slice(&soft32, &soft, 1e-6);
        }
        Ok(())
    }

    #[test]
    fn softmax_is_stable_and_empty_segments_give_zeros() -> Result<()> {
        // huge logits would overflow exp without the max shift
        let index = [0u32, 0, 2, 2, 2];
        let seg = Segments::from_indices(&index, 4)?;
        let x = Tensor::new(
            &[
                [1000.0f32, -1000.0],
                [999.0, -1001.0],
                [5.0, 0.0],
                [5.0, 0.0],
                [5.0, 0.0],
            ],
            &Device::Cpu,
        )?;
        let y: Vec<Vec<f32>> = seg.softmax(&x)?.to_vec2()?;
        assert!(y.iter().flatten().all(|v| v.is_finite()));
        let e = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((y[0][0] - e).abs() < 1e-6 && (y[1][1] - (1.0 - e)).abs() < 1e-6);
        assert!((y[2][0] - 1.0 / 3.0).abs() < 1e-6);
        let s: Vec<Vec<f32>> = seg.sum(&x)?.to_vec2()?;
        assert_eq!(s[1], vec![0.0, 0.0]);
        assert_eq!(s[3], vec![0.0, 0.0]);
        // gradient flowing into an empty segment's row is finite and does not leak
        let var = candle_core::Var::from_tensor(&x.to_dtype(DType::F64)?)?;
        let loss = seg.softmax(var.as_tensor())?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let gv: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()?
            .to_vec1()?;
        assert!(gv.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for sorted in [true, false] {
            let index = random_index(40, 9, sorted, 5);
            let seg = Segments::from_indices(&index, 9)?;
            let x = random_tensor(&[40, 2, 3], DType::F64, 6)?;
            let to_c = |e: EquivariantError| candle_core::Error::Msg(e.to_string());
            check_gradient(|t| seg.sum(t).map_err(to_c), &x, 1e-6)?.assert_within(1e-8);
            check_gradient(|t| seg.softmax(t).map_err(to_c), &x, 1e-6)?.assert_within(1e-8);
            let nodes = random_tensor(&[9, 2, 3], DType::F64, 7)?;
            check_gradient(|t| seg.gather(t).map_err(to_c), &nodes, 1e-6)?.assert_within(1e-8);
        }
        Ok(())
    }

    #[test]
    fn softmax_backward_op_has_correct_gradients() -> Result<()> {
        for sorted in [true, false] {
            let index = random_index(30, 7, sorted, 8);
            let seg = Segments::from_indices(&index, 7)?;
            let y = seg.softmax(&random_tensor(&[30, 2], DType::F64, 1)?)?;
            let g = random_tensor(&[30, 2], DType::F64, 2)?;
            let op = || SoftmaxBackward {
                csr: seg.csr.clone(),
            };
            // the fused op equals the composed formula
            let composed = y.mul(&g.sub(&seg.gather(&seg.sum(&g.mul(&y)?)?)?)?)?;
            crate::testing::assert_close(&y.apply_op2(&g, op())?, &composed, 1e-15);
            check_gradient(|t| y.apply_op2(t, op()), &g, 1e-6)?.assert_within(1e-8);
            check_gradient(|t| t.apply_op2(&g, op()), &y, 1e-6)?.assert_within(1e-8);
        }
        Ok(())
    }

    #[test]
    fn offsets_group_like_the_sorted_index() -> Result<()> {
        let offsets = [0usize, 2, 2, 5, 6];
        let from_offsets = Segments::from_offsets(&offsets)?;
        let from_index = Segments::from_indices(&[0u32, 0, 2, 2, 2, 3], 4)?;
        assert_eq!(from_offsets.segment_of(), from_index.segment_of());
        assert_eq!(from_offsets.offsets(), &offsets);
        assert!(from_offsets.is_sorted());
        let src = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((6, 2))?;
        assert_eq!(
            from_offsets.sum(&src)?.to_vec2::<f32>()?,
            from_index.sum(&src)?.to_vec2::<f32>()?
        );
        for (bad, what) in [
            (&[][..], "empty"),
            (&[1usize, 2][..], "starts at 1"),
            (&[0usize, 3, 2][..], "decreases at segment 1"),
        ] {
            let err = Segments::from_offsets(bad).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
        Ok(())
    }

    #[test]
    fn invalid_indices_are_reported() {
        let err = Segments::from_indices(&[0u32, 5], 3).unwrap_err();
        assert!(err.to_string().contains("entry 1 is 5"), "{err}");
        let err = Segments::from_indices(&[-1i64], 3).unwrap_err();
        assert!(err.to_string().contains("index"), "{err}");
        let seg = Segments::from_indices(&[0u32, 1], 2).expect("valid");
        let bad = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).expect("tensor");
        assert!(matches!(
            seg.sum(&bad),
            Err(EquivariantError::ShapeMismatch { .. })
        ));
        let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).expect("tensor");
        assert!(matches!(
            seg.softmax(&ints),
            Err(EquivariantError::UnsupportedDType { .. })
        ));
    }
}
