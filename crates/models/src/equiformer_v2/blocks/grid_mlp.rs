//! The grid MLP of EquiformerV2's feed-forward network as one CPU op: for every node,
//! `y = fromᵀ · W₃(SiLU(W₂(SiLU(W₁(to · x)))))` (bias-free linears applied pointwise on the
//! sphere grid), forward and backward.
//!
//! Composed from candle ops, each of the five steps writes a `[N, G, F]` grid signal
//! (`G = 324` points at grid 18, e.g. 42 MB each for 256 nodes and 128 channels) that the
//! autograd graph keeps until the backward pass, and the three linears run as multi-threaded
//! GEMMs that synchronise after every call. Here each rayon task takes a few nodes, keeps their
//! grid signals in a task-local scratch (a few MB, cache-sized), runs single-threaded GEMMs on
//! it and writes only the `[N, K, F]` output. The backward pass recomputes the chunk's
//! forward instead of storing it, and accumulates the weight gradients per task. No second
//! derivatives (like the fused SO(2) and S2 ops).
//!
//! The grid projections act on coefficients and the linears on channels, so the first and the
//! last linear commute with them: `(to·x)·W₁ᵀ = to·(x·W₁ᵀ)` and
//! `fromᵀ·(h₂·W₃ᵀ) = (fromᵀ·h₂)·W₃ᵀ`. Both run on the `K` coefficient rows of a node instead
//! of its `G` grid points (25 against 324 at `lmax` 4, grid 18): only the middle linear is
//! applied on the grid, which cuts the op's FLOPs by more than half.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use matscale_equivariant::activation;
use matscale_equivariant::buffer::{contiguous_input, zeroed_vec};
use matscale_equivariant::linalg::{gemm, view};
use rayon::prelude::*;

/// Nodes per chunk (`CHUNK · G` rows per GEMM).
const CHUNK: usize = 4;

/// Chunks per backward task: each task's weight gradient is one partial of the ordered sum.
const BLOCK_CHUNKS: usize = 4;

/// The grid matrices `to`, `from` (`[G, K]` row-major) in f32 and f64.
#[derive(Debug)]
pub(crate) struct GridMatrices {
    g: usize,
    k: usize,
    to64: Vec<f64>,
    from64: Vec<f64>,
    to32: Vec<f32>,
    from32: Vec<f32>,
}

impl GridMatrices {
    /// From `to` and `from` `[G, K]` in f64.
    pub(crate) fn new(g: usize, k: usize, to: Vec<f64>, from: Vec<f64>) -> Self {
        Self {
            g,
            k,
            to32: to.iter().map(|&v| v as f32).collect(),
            from32: from.iter().map(|&v| v as f32).collect(),
            to64: to,
            from64: from,
        }
    }
}

/// f32 / f64 with the matrices and vectorised SiLU loops.
trait Elem: WithDType + Copy + Send + Sync + 'static {
    fn mats(m: &GridMatrices) -> (&[Self], &[Self]);
    /// `x ← SiLU(x)`.
    fn silu_in_place(xs: &mut [Self]);
    /// `grad ← grad · SiLU'(pre)`.
    fn silu_grad_mul(grad: &mut [Self], pre: &[Self]);
}

impl Elem for f32 {
    fn mats(m: &GridMatrices) -> (&[f32], &[f32]) {
        (&m.to32, &m.from32)
    }
    fn silu_in_place(xs: &mut [f32]) {
        activation::silu_f32_slice(xs);
    }
    fn silu_grad_mul(grad: &mut [f32], pre: &[f32]) {
        activation::silu_grad_mul_f32(grad, pre);
    }
}

impl Elem for f64 {
    fn mats(m: &GridMatrices) -> (&[f64], &[f64]) {
        (&m.to64, &m.from64)
    }
    fn silu_in_place(xs: &mut [f64]) {
        for x in xs {
            *x /= 1.0 + (-*x).exp();
        }
    }
    fn silu_grad_mul(grad: &mut [f64], pre: &[f64]) {
        for (g, &x) in grad.iter_mut().zip(pre) {
            let s = 1.0 / (1.0 + (-x).exp());
            *g *= s * (1.0 + x * (1.0 - s));
        }
    }
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    k: usize,
    g: usize,
    f: usize,
}

/// A chunk's scratch: `[CHUNK·G, F]` grid signals and `[CHUNK·K, F]` coefficient signals.
struct Scratch<T> {
    /// `x·W₁ᵀ`, then (backward) `∂(x·W₁ᵀ)`.
    xw: Vec<T>,
    /// `fromᵀ·h₂`, then (backward) `∂(fromᵀ·h₂)`.
    p: Vec<T>,
    a1: Vec<T>,
    h1: Vec<T>,
    a2: Vec<T>,
    h2: Vec<T>,
}

impl<T: Elem> Scratch<T> {
    fn new(d: Dims) -> Self {
        let grid = || vec![T::zero(); CHUNK * d.g * d.f];
        let coef = || vec![T::zero(); CHUNK * d.k * d.f];
        Self {
            xw: coef(),
            p: coef(),
            a1: grid(),
            h1: grid(),
            a2: grid(),
            h2: grid(),
        }
    }
}

/// `out[i] = m · src[i]` for the `nb` nodes of a chunk, `m` `[rows × cols]` with strides
/// `m_strides`, `src[i]` `[cols × F]`, `out[i]` `[rows × F]`.
fn per_node<T: Elem>(
    (rows, cols, f): (usize, usize, usize),
    m: &[T],
    m_strides: (usize, usize),
    src: &[T],
    nb: usize,
    out: &mut [T],
) {
    let (rs, cs) = m_strides;
    for i in 0..nb {
        gemm(
            (rows, f, cols),
            out,
            i * rows * f,
            f,
            false,
            view(m, 0, rs, cs),
            view(src, i * cols * f, f, 1),
            T::one(),
        );
    }
}

/// `dst = src · Wᵀ` (`W` `[F_out, F_in]` row-major) over `rows` rows.
fn linear<T: Elem>(f: usize, rows: usize, w: &[T], src: &[T], dst: &mut [T]) {
    times_square(f, rows, (w, (1, f)), src, dst);
}

/// `dst = src · W` (the input gradient of [`linear`]) over `rows` rows.
fn linear_input_grad<T: Elem>(f: usize, rows: usize, w: &[T], src: &[T], dst: &mut [T]) {
    times_square(f, rows, (w, (f, 1)), src, dst);
}

/// `dst = src · M` for the `F × F` matrix `M` stored in `w` with strides `m_strides`, over
/// `rows` rows.
fn times_square<T: Elem>(
    f: usize,
    rows: usize,
    (w, m_strides): (&[T], (usize, usize)),
    src: &[T],
    dst: &mut [T],
) {
    let (rs, cs) = m_strides;
    gemm(
        (rows, f, f),
        dst,
        0,
        f,
        false,
        view(src, 0, f, 1),
        view(w, 0, rs, cs),
        T::one(),
    );
}

/// `dw += gradᵀ · input` over `rows` rows (the weight gradient of [`linear`]).
fn linear_weight_grad<T: Elem>(f: usize, rows: usize, grad: &[T], input: &[T], dw: &mut [T]) {
    gemm(
        (f, f, rows),
        dw,
        0,
        f,
        true,
        view(grad, 0, 1, f),
        view(input, 0, f, 1),
        T::one(),
    );
}

/// The forward pass of a chunk of `nb` nodes (`x` their `[nb, K, F]`) up to the second
/// activation: `a1 = to · (x·W₁ᵀ)`, `h1 = SiLU(a1)`, `a2 = h1·W₂ᵀ`, `h2 = SiLU(a2)`; then
/// `p = fromᵀ · h2`, the input of the last linear.
///
/// The first linear acts on channels and `to` on coefficients, so they commute:
/// `(to·x)·W₁ᵀ = to·(x·W₁ᵀ)`, a GEMM over the chunk's `nb·K` coefficient rows instead of its
/// `nb·G` grid rows (13× fewer at `lmax` 4, grid 18). Likewise the last linear runs after
/// `fromᵀ`: `fromᵀ·(h₂·W₃ᵀ) = (fromᵀ·h₂)·W₃ᵀ`.
fn chunk_forward<T: Elem>(
    (d, to, from, w): (Dims, &[T], &[T], &[T]),
    x: &[T],
    nb: usize,
    s: &mut Scratch<T>,
) {
    let (k, g, f) = (d.k, d.g, d.f);
    let ff = f * f;
    let (krows, rows) = (nb * k, nb * g);
    linear(f, krows, &w[..ff], x, &mut s.xw);
    per_node((g, k, f), to, (k, 1), &s.xw, nb, &mut s.a1);
    s.h1[..rows * f].copy_from_slice(&s.a1[..rows * f]);
    T::silu_in_place(&mut s.h1[..rows * f]);
    linear(f, rows, &w[ff..2 * ff], &s.h1, &mut s.a2);
    s.h2[..rows * f].copy_from_slice(&s.a2[..rows * f]);
    T::silu_in_place(&mut s.h2[..rows * f]);
    per_node((k, g, f), from, (1, k), &s.h2, nb, &mut s.p);
}

fn forward<T: Elem>(mats: &GridMatrices, d: Dims, x: &[T], w: &[T]) -> Vec<T> {
    let (to, from) = T::mats(mats);
    let (k, f) = (d.k, d.f);
    let mut y = zeroed_vec::<T>(d.n * k * f);
    let min_len = matscale_equivariant::buffer::min_task_len(d.n.div_ceil(CHUNK));
    y.par_chunks_mut(CHUNK * k * f)
        .enumerate()
        .with_min_len(min_len)
        .for_each_init(
            || Scratch::<T>::new(d),
            |s, (chunk, y_chunk)| {
                let nb = y_chunk.len() / (k * f);
                let x_chunk = &x[chunk * CHUNK * k * f..][..nb * k * f];
                chunk_forward((d, to, from, w), x_chunk, nb, s);
                linear(f, nb * k, &w[2 * f * f..], &s.p, y_chunk);
            },
        );
    y
}

/// `[dx (N·K·F) | dw (3·F·F)]`.
fn backward<T: Elem>(mats: &GridMatrices, d: Dims, x: &[T], dy: &[T], w: &[T]) -> Vec<T> {
    let (to, from) = T::mats(mats);
    let (k, f) = (d.k, d.f);
    let ff = f * f;
    let mut out = zeroed_vec::<T>(d.n * k * f + 3 * ff);
    let (dx, dw_out) = out.split_at_mut(d.n * k * f);
    // One weight-gradient partial per fixed block of BLOCK_CHUNKS chunks, its chunks in order,
    // the partials summed in block order: the same bits for any thread count or schedule.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(BLOCK_CHUNKS * CHUNK * k * f)
        .enumerate()
        .map_init(
            || Scratch::<T>::new(d),
            |s, (block, dx_block)| {
                let mut dw = vec![T::zero(); 3 * ff];
                for (i, dx_chunk) in dx_block.chunks_mut(CHUNK * k * f).enumerate() {
                    backward_chunk(
                        (d, to, from, w),
                        (block * BLOCK_CHUNKS + i) * CHUNK,
                        (x, dy),
                        dx_chunk,
                        &mut dw,
                        s,
                    );
                }
                dw
            },
        )
        .collect();
    for partial in &partials {
        for (o, &v) in dw_out.iter_mut().zip(partial) {
            *o += v;
        }
    }
    out
}

/// The backward pass of the `nb = dx_chunk.len() / (K·F)` nodes from node `first`: writes their
/// input gradient into `dx_chunk` and adds their weight gradient to `dw`. The chunk's forward
/// is recomputed first.
fn backward_chunk<T: Elem>(
    (d, to, from, w): (Dims, &[T], &[T], &[T]),
    first: usize,
    (x, dy): (&[T], &[T]),
    dx_chunk: &mut [T],
    dw: &mut [T],
    s: &mut Scratch<T>,
) {
    let (k, g, f) = (d.k, d.g, d.f);
    let ff = f * f;
    let nb = dx_chunk.len() / (k * f);
    let (krows, rows) = (nb * k, nb * g);
    let x_chunk = &x[first * k * f..][..krows * f];
    let dy_chunk = &dy[first * k * f..][..krows * f];
    chunk_forward((d, to, from, w), x_chunk, nb, s);
    let Scratch {
        xw,
        p,
        a1,
        h1,
        a2,
        h2,
    } = s;
    // Layer 3 on coefficient rows: y = p·W₃ᵀ.
    linear_weight_grad(f, krows, dy_chunk, p, &mut dw[2 * ff..]);
    linear_input_grad(f, krows, &w[2 * ff..], dy_chunk, p);
    // ∂h₂ = from · ∂p per node (into h2), then ∂a₂ = ∂h₂ · SiLU'(a₂).
    per_node((g, k, f), from, (k, 1), p, nb, h2);
    T::silu_grad_mul(&mut h2[..rows * f], &a2[..rows * f]);
    // Layer 2 on grid rows: ∂W₂ += ∂a₂ᵀ·h₁, ∂h₁ = ∂a₂·W₂ (into a2), ∂a₁ = ∂h₁ · SiLU'(a₁).
    linear_weight_grad(f, rows, h2, h1, &mut dw[ff..2 * ff]);
    linear_input_grad(f, rows, &w[ff..2 * ff], h2, a2);
    T::silu_grad_mul(&mut a2[..rows * f], &a1[..rows * f]);
    // ∂(x·W₁ᵀ) = toᵀ · ∂a₁ per node (into xw); layer 1 on coefficient rows.
    per_node((k, g, f), to, (1, k), a2, nb, xw);
    linear_weight_grad(f, krows, xw, x_chunk, &mut dw[..ff]);
    linear_input_grad(f, krows, &w[..ff], xw, dx_chunk);
}

/// The forward op: `(x [N, K, F], w [3·F·F])` → `[N, K, F]`.
#[derive(Debug, Clone)]
pub(crate) struct GridMlpOp {
    pub(crate) mats: Arc<GridMatrices>,
}

impl GridMlpOp {
    fn dims(&self, x: &Layout, w: &Layout, name: &str) -> candle_core::Result<Dims> {
        let (n, k, f) = x.shape().dims3()?;
        if k != self.mats.k || w.shape().elem_count() != 3 * f * f {
            candle_core::bail!(
                "{name}: x {:?} and weights {:?} do not fit a grid with K = {} and three F×F \
                 linears",
                x.shape(),
                w.shape(),
                self.mats.k
            );
        }
        Ok(Dims {
            n,
            k,
            g: self.mats.g,
            f,
        })
    }
}

impl CustomOp2 for GridMlpOp {
    fn name(&self) -> &'static str {
        "grid-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let d = self.dims(l1, l2, name)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(forward(
                &self.mats,
                d,
                contiguous_input(x, l1, name)?,
                contiguous_input(w, l2, name)?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(forward(
                &self.mats,
                d,
                contiguous_input(x, l1, name)?,
                contiguous_input(w, l2, name)?,
            )),
            _ => candle_core::bail!("{name}: x and weights must be both f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k, f) = x.dims3()?;
        let both = x.contiguous()?.apply_op3_no_bwd(
            &grad_res.contiguous()?,
            &w.contiguous()?,
            &GridMlpBackward { op: self.clone() },
        )?;
        let dx = both.narrow(0, 0, n * k * f)?.reshape((n, k, f))?;
        let dw = both.narrow(0, n * k * f, 3 * f * f)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The backward op: `(x, dy, w)` → `[dx | dw]` flattened.
struct GridMlpBackward {
    op: GridMlpOp,
}

impl CustomOp3 for GridMlpBackward {
    fn name(&self) -> &'static str {
        "grid-mlp-backward"
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
        let name = self.name();
        let d = self.op.dims(l1, l3, name)?;
        if l2.shape() != l1.shape() {
            candle_core::bail!("{name}: gradient {:?} for x {:?}", l2.shape(), l1.shape());
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(dy), CpuStorage::F32(w)) => {
                CpuStorage::F32(backward(
                    &self.op.mats,
                    d,
                    contiguous_input(x, l1, name)?,
                    contiguous_input(dy, l2, name)?,
                    contiguous_input(w, l3, name)?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(dy), CpuStorage::F64(w)) => {
                CpuStorage::F64(backward(
                    &self.op.mats,
                    d,
                    contiguous_input(x, l1, name)?,
                    contiguous_input(dy, l2, name)?,
                    contiguous_input(w, l3, name)?,
                ))
            }
            _ => candle_core::bail!("{name}: mixed dtypes"),
        };
        let len = d.n * d.k * d.f + 3 * d.f * d.f;
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use matscale_equivariant::s2grid::S2Grid;

    /// The backward pass (input and weight gradients) is bit-for-bit the same on 1, 2 and 3
    /// threads, over enough nodes for several weight-gradient blocks.
    #[test]
    fn backward_is_deterministic_across_thread_counts() {
        let dev = Device::Cpu;
        let grid = S2Grid::equiformer_v2(2, 2, Some(6)).expect("grid");
        let host = |m: Tensor| m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (n, k, f) = (70, grid.num_coefficients(), 8);
        let mats = GridMatrices::new(
            grid.num_points(),
            k,
            host(grid.to_grid_matrix(DType::F64, &dev).unwrap()),
            host(grid.from_grid_matrix(DType::F64, &dev).unwrap()),
        );
        let d = Dims {
            n,
            k,
            g: grid.num_points(),
            f,
        };
        let random = |len: usize, seed: u64| -> Vec<f32> {
            (0..len as u64)
                .map(|i| ((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (x, dy, w) = (
            random(n * k * f, 1),
            random(n * k * f, 2),
            random(3 * f * f, 3),
        );
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| backward::<f32>(&mats, d, &x, &dy, &w))
        };
        let one = run(1);
        assert!(one.iter().all(|v| v.is_finite()) && one.iter().any(|&v| v != 0.0));
        for threads in [2, 3] {
            let other = run(threads);
            let same = one
                .iter()
                .zip(&other)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{threads} threads differ from 1");
        }
    }
}
