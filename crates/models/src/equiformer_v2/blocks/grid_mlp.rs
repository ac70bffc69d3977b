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
//! forward (one more forward's FLOPs) instead of storing it, and accumulates the weight
//! gradients per task. No second derivatives (like the fused SO(2) and S2 ops).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use matscale_equivariant::activation;
use matscale_equivariant::buffer::{contiguous_input, zeroed_vec};
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

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`; strides as (row, column); `dst` row-major with row
/// stride `dst_rs`. Single-threaded (the callers parallelise over node chunks).
///
/// # Safety
/// Every addressed element of each operand must be in bounds, `dst` must not alias the others.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from the caller; T is f32 or f64, both supported by gemm.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
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

/// `[CHUNK·G, F]` grid-signal scratch buffers.
fn buffers<T: Elem>(d: Dims, count: usize) -> Vec<Vec<T>> {
    (0..count)
        .map(|_| vec![T::zero(); CHUNK * d.g * d.f])
        .collect()
}

/// `out[i] = to · x[node i]` for the `nb` nodes of a chunk (`x` the chunk's `[nb, K, F]`).
fn to_grid<T: Elem>(d: Dims, to: &[T], x: &[T], nb: usize, out: &mut [T]) {
    let (k, g, f) = (d.k, d.g, d.f);
    for i in 0..nb {
        // SAFETY: to is G×K, x[i] K×F, out[i] G×F, all in bounds; out is scratch.
        unsafe {
            mm(
                (g, f, k),
                out[i * g * f..].as_mut_ptr(),
                f,
                false,
                to.as_ptr(),
                (k, 1),
                x[i * k * f..].as_ptr(),
                (f, 1),
            );
        }
    }
}

/// `dst = src · Wᵀ` (`W` `[F_out, F_in]` row-major) over `rows` rows.
fn linear<T: Elem>(f: usize, rows: usize, w: &[T], src: &[T], dst: &mut [T]) {
    // SAFETY: src, dst rows × F; w F × F (read transposed); dst is a separate buffer.
    unsafe {
        mm(
            (rows, f, f),
            dst.as_mut_ptr(),
            f,
            false,
            src.as_ptr(),
            (f, 1),
            w.as_ptr(),
            (1, f),
        );
    }
}

/// The forward pass of the chunk's first `rows` grid rows: `a1 = g0·W₁ᵀ`, `h1 = SiLU(a1)`,
/// `a2 = h1·W₂ᵀ`, `h2 = SiLU(a2)` (all kept for the backward pass).
fn hidden<T: Elem>(f: usize, rows: usize, w: &[T], g0: &[T], [a1, h1, a2, h2]: [&mut [T]; 4]) {
    let ff = f * f;
    linear(f, rows, &w[..ff], &g0[..rows * f], a1);
    h1[..rows * f].copy_from_slice(&a1[..rows * f]);
    T::silu_in_place(&mut h1[..rows * f]);
    linear(f, rows, &w[ff..2 * ff], &h1[..rows * f], a2);
    h2[..rows * f].copy_from_slice(&a2[..rows * f]);
    T::silu_in_place(&mut h2[..rows * f]);
}

fn forward<T: Elem>(mats: &GridMatrices, d: Dims, x: &[T], w: &[T]) -> Vec<T> {
    let (to, from) = T::mats(mats);
    let (k, g, f) = (d.k, d.g, d.f);
    let mut y = zeroed_vec::<T>(d.n * k * f);
    y.par_chunks_mut(CHUNK * k * f).enumerate().for_each_init(
        || buffers::<T>(d, 5),
        |bufs, (chunk, y_chunk)| {
            let nb = y_chunk.len() / (k * f);
            let rows = nb * g;
            let x_chunk = &x[chunk * CHUNK * k * f..][..nb * k * f];
            let [g0, a1, h1, a2, h2] = bufs.as_mut_slice() else {
                unreachable!("five scratch buffers")
            };
            to_grid(d, to, x_chunk, nb, g0);
            hidden(f, rows, w, g0, [a1, h1, a2, h2]);
            linear(f, rows, &w[2 * f * f..], &h2[..rows * f], g0);
            for i in 0..nb {
                // SAFETY: fromᵀ is K×G (strides (1, K) of the G×K matrix), g0[i] G×F, y_i K×F.
                unsafe {
                    mm(
                        (k, f, g),
                        y_chunk[i * k * f..].as_mut_ptr(),
                        f,
                        false,
                        from.as_ptr(),
                        (1, k),
                        g0[i * g * f..].as_ptr(),
                        (f, 1),
                    );
                }
            }
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
            || buffers::<T>(d, 6),
            |bufs, (block, dx_block)| {
                let mut dw = vec![T::zero(); 3 * ff];
                for (i, dx_chunk) in dx_block.chunks_mut(CHUNK * k * f).enumerate() {
                    backward_chunk(
                        (d, to, from, w),
                        (block * BLOCK_CHUNKS + i) * CHUNK,
                        (x, dy),
                        dx_chunk,
                        &mut dw,
                        bufs,
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
/// input gradient into `dx_chunk` and adds their weight gradient to `dw`.
fn backward_chunk<T: Elem>(
    (d, to, from, w): (Dims, &[T], &[T], &[T]),
    first: usize,
    (x, dy): (&[T], &[T]),
    dx_chunk: &mut [T],
    dw: &mut [T],
    bufs: &mut [Vec<T>],
) {
    let (k, g, f) = (d.k, d.g, d.f);
    let ff = f * f;
    let nb = dx_chunk.len() / (k * f);
    let rows = nb * g;
    let x_chunk = &x[first * k * f..][..nb * k * f];
    let dy_chunk = &dy[first * k * f..][..nb * k * f];
    let [g0, a1, h1, a2, h2, dd] = bufs else {
        unreachable!("six scratch buffers")
    };
    to_grid(d, to, x_chunk, nb, g0);
    hidden(f, rows, w, g0, [a1, h1, a2, h2]);
    // da3 = from · dy per node.
    for i in 0..nb {
        // SAFETY: from G×K, dy_i K×F, dd[i] G×F; dd is scratch.
        unsafe {
            mm(
                (g, f, k),
                dd[i * g * f..].as_mut_ptr(),
                f,
                false,
                from.as_ptr(),
                (k, 1),
                dy_chunk[i * k * f..].as_ptr(),
                (f, 1),
            );
        }
    }
    // Layers 3, 2, 1: dW += daᵀ · input, d(input) = da · W, then through SiLU'.
    // Layer 3 (input h2, pre-activation a2 of layer 2).
    // SAFETY (all products below): operands are rows × F or F × F, in bounds, and
    // each destination is a buffer that is not an operand of its own product.
    unsafe {
        mm(
            (f, f, rows),
            dw[2 * ff..].as_mut_ptr(),
            f,
            true,
            dd.as_ptr(),
            (1, f),
            h2.as_ptr(),
            (f, 1),
        );
        mm(
            (rows, f, f),
            h2.as_mut_ptr(),
            f,
            false,
            dd.as_ptr(),
            (f, 1),
            w[2 * ff..].as_ptr(),
            (f, 1),
        );
    }
    T::silu_grad_mul(&mut h2[..rows * f], &a2[..rows * f]);
    // Layer 2 (input h1).
    unsafe {
        mm(
            (f, f, rows),
            dw[ff..].as_mut_ptr(),
            f,
            true,
            h2.as_ptr(),
            (1, f),
            h1.as_ptr(),
            (f, 1),
        );
        mm(
            (rows, f, f),
            h1.as_mut_ptr(),
            f,
            false,
            h2.as_ptr(),
            (f, 1),
            w[ff..].as_ptr(),
            (f, 1),
        );
    }
    T::silu_grad_mul(&mut h1[..rows * f], &a1[..rows * f]);
    // Layer 1 (input g0).
    unsafe {
        mm(
            (f, f, rows),
            dw.as_mut_ptr(),
            f,
            true,
            h1.as_ptr(),
            (1, f),
            g0.as_ptr(),
            (f, 1),
        );
        mm(
            (rows, f, f),
            dd.as_mut_ptr(),
            f,
            false,
            h1.as_ptr(),
            (f, 1),
            w.as_ptr(),
            (f, 1),
        );
    }
    // dx = toᵀ · dg0 per node.
    for i in 0..nb {
        // SAFETY: toᵀ is K×G (strides (1, K)), dd[i] G×F, dx_i K×F.
        unsafe {
            mm(
                (k, f, g),
                dx_chunk[i * k * f..].as_mut_ptr(),
                f,
                false,
                to.as_ptr(),
                (1, k),
                dd[i * g * f..].as_ptr(),
                (f, 1),
            );
        }
    }
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
