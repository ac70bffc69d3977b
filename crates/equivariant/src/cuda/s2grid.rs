//! S2 grid transforms and activations on the device: the per-row products with the grid
//! matrices run as strided-batched cuBLAS GEMMs (the matrix shared by all rows, stride 0),
//! SiLU and its derivative as elementwise kernels in between (`kernels/elementwise.cu`).
//!
//! By default ([`crate::switch::FUSED_S2_ACTIVATION`]; `MATSCALE_S2_FUSED=0` turns it off) the
//! S2 activations and their backward run instead as one kernel each on the grid matrices
//! factored over β and α (`kernels/s2fused.cu`): one thread per (row, channel), the grid
//! values kept in registers; 1.4–3.2× faster than the GEMM path on an H100 (session 19). Its
//! arithmetic is tested on the host (`s2grid::tests::fused_cuda_s2_kernels_match_the_cpu_on_the_host`)
//! and on the GPU by `tests/cuda.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};

use super::{
    gemm_batched, int, kernel, launch_cfg, long, mat, uninit, upload, view, CudaFloat, ELEMENTWISE,
    MAX_BLOCKS, S2FUSED,
};
use crate::s2grid::factored::Factored;

/// The grid of `s2grid.rs` (`GridInner`): `to` and `from` are `[G, K]` row-major, in both
/// float types.
pub(crate) struct Grid<'a> {
    pub(crate) g: usize,
    pub(crate) k: usize,
    pub(crate) to_f32: &'a [f32],
    pub(crate) from_f32: &'a [f32],
    pub(crate) to_f64: &'a [f64],
    pub(crate) from_f64: &'a [f64],
    /// The matrices factored over β and α, when they are separable (the fused kernels).
    pub(crate) factored_f32: Option<&'a Factored<f32>>,
    pub(crate) factored_f64: Option<&'a Factored<f64>>,
}

/// Which grid transform (`s2grid.rs` `LinearKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GridMap {
    /// `to · x` (`[N, K, C]` → `[N, G, C]`).
    To,
    /// `toᵀ · x` (`[N, G, C]` → `[N, K, C]`).
    ToAdjoint,
    /// `fromᵀ · x` (`[N, G, C]` → `[N, K, C]`).
    From,
    /// `from · x` (`[N, K, C]` → `[N, G, C]`).
    FromAdjoint,
}

trait GridFloat: CudaFloat {
    fn matrices<'a>(grid: &Grid<'a>) -> (&'a [Self], &'a [Self]);
    fn factored<'a>(grid: &Grid<'a>) -> Option<&'a Factored<Self>>;
}

impl GridFloat for f32 {
    fn matrices<'a>(grid: &Grid<'a>) -> (&'a [f32], &'a [f32]) {
        (grid.to_f32, grid.from_f32)
    }
    fn factored<'a>(grid: &Grid<'a>) -> Option<&'a Factored<f32>> {
        grid.factored_f32
    }
}

impl GridFloat for f64 {
    fn matrices<'a>(grid: &Grid<'a>) -> (&'a [f64], &'a [f64]) {
        (grid.to_f64, grid.from_f64)
    }
    fn factored<'a>(grid: &Grid<'a>) -> Option<&'a Factored<f64>> {
        grid.factored_f64
    }
}

/// Most α profiles the fused kernels take: they exist for odd `J = 2 · mmax + 1` up to this.
const FUSED_MAX_GROUPS: usize = 13;

/// Shared memory a fused launch may use without opting in to more (48 KiB).
const FUSED_SHARED_BYTES: usize = 48 * 1024;

/// A fused launch: its factors and threads per block (each thread keeps `columns` columns of
/// `K` values in shared memory), or `None` when the fused kernels are off or do not apply
/// (grid not separable, more than [`FUSED_MAX_GROUPS`] α profiles, columns too long).
fn fused_plan<'a, T: GridFloat>(grid: &Grid<'a>, columns: usize) -> Option<(&'a Factored<T>, u32)> {
    if !crate::switch::FUSED_S2_ACTIVATION.enabled() {
        return None;
    }
    let f = T::factored(grid)?;
    if f.groups() % 2 == 0 || f.groups() > FUSED_MAX_GROUPS {
        return None;
    }
    let per_thread = columns * grid.k * std::mem::size_of::<T>();
    let threads = [128u32, 64, 32]
        .into_iter()
        .find(|&t| t as usize * per_thread <= FUSED_SHARED_BYTES)?;
    Some((f, threads))
}

/// The device copies of a [`Factored`]'s grouped tables (`kernels/s2fused.cu`'s layout).
struct FusedTables<T> {
    b: i32,
    a: i32,
    u_to: CudaSlice<T>,
    u_from: CudaSlice<T>,
    v: CudaSlice<T>,
    order: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
}

fn fused_tables<T: GridFloat>(
    dev: &CudaDevice,
    f: &Factored<T>,
) -> candle_core::Result<FusedTables<T>> {
    let t = f.grouped();
    Ok(FusedTables {
        b: int(t.b, "grid rings")?,
        a: int(t.a, "ring points")?,
        u_to: upload(dev, &t.u_to)?,
        u_from: upload(dev, &t.u_from)?,
        v: upload(dev, &t.v)?,
        order: upload(dev, &t.order)?,
        offsets: upload(dev, &t.offsets)?,
    })
}

/// A fused launch over `items` (row, channel) pairs with `threads` per block and `columns`
/// shared-memory columns of `k` values per thread.
fn fused_cfg<T>(items: usize, threads: u32, columns: usize, k: usize) -> LaunchConfig {
    let blocks = items.div_ceil(threads as usize).clamp(1, MAX_BLOCKS);
    let shared = columns * k * threads as usize * std::mem::size_of::<T>();
    LaunchConfig {
        grid_dim: (u32::try_from(blocks).expect("at most MAX_BLOCKS"), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: u32::try_from(shared).expect("at most FUSED_SHARED_BYTES"),
    }
}

/// One fused launch (`s2_fused_{forward,backward}_j{J}`): the forward writes
/// `out[n, c ≥ skip] = fromᵀ · SiLU(to · x[n])` and, with scalars (`second`, skip = 1),
/// `out[n, 0] = SiLU(scalars[n])`; the backward (`second` = dy) writes
/// `dx[n] = toᵀ · (SiLU'(to · x[n]) ⊙ (from_{≥skip} · dy[n, ≥skip]))`.
fn fused_launch<T: GridFloat>(
    dev: &CudaDevice,
    backward: bool,
    (x, second): (&CudaView<'_, T>, Option<&CudaView<'_, T>>),
    skip: bool,
    (f, threads): (&Factored<T>, u32),
    (n, k, c): (usize, usize, usize),
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: the kernel writes every output of every (row, channel): the forward the rows
    // c ≥ skip and, when skip = 1, row 0 from the scalars; the backward all k rows.
    let mut out = unsafe { uninit::<T>(dev, n * k * c) }?;
    if n * c == 0 {
        return Ok(out);
    }
    let t = fused_tables(dev, f)?;
    let pass = if backward { "backward" } else { "forward" };
    let func = kernel::<T>(dev, S2FUSED, &format!("s2_fused_{pass}_j{}", f.groups()))?;
    let (items, ci, ki) = (long(n * c), int(c, "channels")?, int(k, "coefficients")?);
    let skip = i32::from(skip);
    let mut b = func.builder();
    b.arg(&items)
        .arg(&ci)
        .arg(&ki)
        .arg(&t.b)
        .arg(&t.a)
        .arg(&skip);
    b.arg(x).arg(second.unwrap_or(x));
    b.arg(&t.u_to)
        .arg(&t.u_from)
        .arg(&t.v)
        .arg(&t.order)
        .arg(&t.offsets);
    b.arg(&mut out);
    // SAFETY: x and out hold n × k × c elements, the second operand n × k × c (dy) or n × c
    // (scalars, read only when skip = 1), the tables the grouped factors' sizes; shared memory
    // two (forward) or three (backward) columns of k values per thread.
    let columns = if backward { 3 } else { 2 };
    unsafe { b.launch(fused_cfg::<T>(n * c, threads, columns, k)) }.w()?;
    Ok(out)
}

/// `out[n] = op(M)[rows_out × rows_in] · x[n][rows_in × c]` for all rows `n`, where `M` is a
/// `[G, K]` matrix at column offset `col` (`k − col` columns used), transposed when `trans`.
#[allow(clippy::too_many_arguments)]
fn batched<T: CudaFloat>(
    dev: &CudaDevice,
    m: &CudaSlice<T>,
    (k, col, trans): (usize, usize, bool),
    (rows_out, rows_in): (usize, usize),
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    (x_off, x_stride): (usize, usize),
    out: &mut CudaSlice<T>,
    (out_off, out_stride): (usize, usize),
    n: usize,
    c: usize,
) -> candle_core::Result<()> {
    let mv = m.slice(..);
    gemm_batched(
        dev,
        (rows_out, c, rows_in),
        mat(&mv, col, k, trans),
        mat(x, x_off, c, false),
        out,
        out_off,
        c,
        n,
        (0, x_stride, out_stride),
    )
}

fn grid_linear_typed<T: GridFloat>(
    s: &CudaStorage,
    l: &Layout,
    grid: &Grid<'_>,
    map: GridMap,
    (n, rows_in, c): (usize, usize, usize),
    rows_out: usize,
    name: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = &s.device;
    let x = view::<T>(s, l, name)?;
    let (to, from) = T::matrices(grid);
    let (matrix, trans) = match map {
        GridMap::To => (to, false),
        GridMap::ToAdjoint => (to, true),
        GridMap::From => (from, true),
        GridMap::FromAdjoint => (from, false),
    };
    let m = upload(dev, matrix)?;
    // SAFETY: the batched GEMM (β = 0) writes all n × rows_out × c elements.
    let mut out = unsafe { uninit::<T>(dev, n * rows_out * c) }?;
    batched(
        dev,
        &m,
        (grid.k, 0, trans),
        (rows_out, rows_in),
        &x,
        (0, rows_in * c),
        &mut out,
        (0, rows_out * c),
        n,
        c,
    )?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `GridLinear`.
pub(crate) fn grid_linear(
    s: &CudaStorage,
    l: &Layout,
    grid: &Grid<'_>,
    map: GridMap,
    name: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, rows_in, c) = l.shape().dims3()?;
    let (expect_in, rows_out) = match map {
        GridMap::To | GridMap::FromAdjoint => (grid.k, grid.g),
        GridMap::ToAdjoint | GridMap::From => (grid.g, grid.k),
    };
    if rows_in != expect_in {
        candle_core::bail!("{name}: expected {expect_in} rows, got {rows_in}");
    }
    let dims = (n, rows_in, c);
    let out = match s.dtype() {
        DType::F32 => grid_linear_typed::<f32>(s, l, grid, map, dims, rows_out, name)?,
        DType::F64 => grid_linear_typed::<f64>(s, l, grid, map, dims, rows_out, name)?,
        _ => candle_core::bail!("{name}: only f32 and f64 are supported"),
    };
    Ok((out, Shape::from((n, rows_out, c))))
}

/// Rows per chunk of the S2 activations: with `MATSCALE_S2_CHUNK_BYTES=B` (B > 0) the rows are
/// processed in chunks whose grid values (`rows · G · C` elements) take at most `B` bytes, so
/// that the values stay in the GPU's L2 cache between the GEMM that writes them, the SiLU and
/// the GEMM that reads them (an eqV2-S attention block's grid values are 431 MB); unset or 0,
/// all rows at once (the default until an A/B on a GPU says otherwise).
fn chunk_rows(n: usize, g: usize, c: usize, elem: usize) -> usize {
    let bytes = std::env::var("MATSCALE_S2_CHUNK_BYTES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    if bytes == 0 {
        return n.max(1);
    }
    (bytes / (g * c * elem).max(1)).clamp(1, n.max(1))
}

/// `(first row, rows)` of each chunk of `rows` (the last one shorter) over `n` rows.
fn row_chunks(n: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(rows.max(1))
        .map(move |r0| (r0, rows.min(n - r0)))
}

fn act_forward_typed<T: GridFloat>(
    x: (&CudaStorage, &Layout),
    scalars: Option<(&CudaStorage, &Layout)>,
    grid: &Grid<'_>,
    (n, c): (usize, usize),
    name: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.0.device;
    let (g, k) = (grid.g, grid.k);
    let xv = view::<T>(x.0, x.1, name)?;
    if let Some(plan) = fused_plan::<T>(grid, 2) {
        let sv = scalars.map(|s| view::<T>(s.0, s.1, name)).transpose()?;
        let skip = sv.is_some();
        let out = fused_launch(dev, false, (&xv, sv.as_ref()), skip, plan, (n, k, c))?;
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let (to, from) = T::matrices(grid);
    let (to, from) = (upload(dev, to)?, upload(dev, from)?);
    let rows = chunk_rows(n, g, c, std::mem::size_of::<T>());
    // SAFETY: the first GEMM (β = 0) writes every grid value of a chunk; the second every
    // output row but the first when there are scalars, which `silu_rows` writes.
    let mut values = unsafe { uninit::<T>(dev, rows * g * c) }?;
    let mut out = unsafe { uninit::<T>(dev, n * k * c) }?;
    if n * c == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let skip = usize::from(scalars.is_some());
    let func = kernel::<T>(dev, ELEMENTWISE, "silu_inplace")?;
    for (r0, m) in row_chunks(n, rows) {
        batched(
            dev,
            &to,
            (k, 0, false),
            (g, k),
            &xv,
            (r0 * k * c, k * c),
            &mut values,
            (0, g * c),
            m,
            c,
        )?;
        let total = m * g * c;
        let t = long(total);
        let mut b = func.builder();
        b.arg(&t).arg(&mut values);
        // SAFETY: values holds at least m × g × c elements.
        unsafe { b.launch(launch_cfg(total)) }.w()?;
        let vv = values.slice(..);
        batched(
            dev,
            &from,
            (k, skip, true),
            (k - skip, g),
            &vv,
            (0, g * c),
            &mut out,
            ((r0 * k + skip) * c, k * c),
            m,
            c,
        )?;
    }
    if let Some(sc) = scalars {
        let sv = view::<T>(sc.0, sc.1, name)?;
        let func = kernel::<T>(dev, ELEMENTWISE, "silu_rows")?;
        let (t, ci, rs) = (long(n * c), int(c, "channels")?, long(k * c));
        let mut b = func.builder();
        b.arg(&t).arg(&ci).arg(&sv).arg(&mut out).arg(&rs);
        // SAFETY: scalars hold n × c elements, out n × k × c.
        unsafe { b.launch(launch_cfg(n * c)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `S2Act` (no scalars) and `SeparableS2Act` (with `[N, C]` scalars).
pub(crate) fn activation(
    x: (&CudaStorage, &Layout),
    scalars: Option<(&CudaStorage, &Layout)>,
    grid: &Grid<'_>,
    name: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, rows, c) = x.1.shape().dims3()?;
    if rows != grid.k {
        candle_core::bail!("{name}: expected {} coefficient rows, got {rows}", grid.k);
    }
    let out = match x.0.dtype() {
        DType::F32 => act_forward_typed::<f32>(x, scalars, grid, (n, c), name)?,
        DType::F64 => act_forward_typed::<f64>(x, scalars, grid, (n, c), name)?,
        _ => candle_core::bail!("{name}: only f32 and f64 are supported"),
    };
    Ok((out, x.1.shape().clone()))
}

fn act_backward_typed<T: GridFloat>(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    grid: &Grid<'_>,
    separable: bool,
    (n, c): (usize, usize),
    name: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.0.device;
    let (g, k) = (grid.g, grid.k);
    let xv = view::<T>(x.0, x.1, name)?;
    let dyv = view::<T>(dy.0, dy.1, name)?;
    if let Some(plan) = fused_plan::<T>(grid, 3) {
        let dx = fused_launch(dev, true, (&xv, Some(&dyv)), separable, plan, (n, k, c))?;
        return Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()));
    }
    let (to, from) = T::matrices(grid);
    let (to, from) = (upload(dev, to)?, upload(dev, from)?);
    let rows = chunk_rows(n, g, c, std::mem::size_of::<T>());
    // SAFETY: each of the three GEMMs (β = 0; α = 0 with no input rows) writes its whole
    // output (a chunk's grid values and gradients, the chunk's rows of dx).
    let mut values = unsafe { uninit::<T>(dev, rows * g * c) }?;
    let mut grads = unsafe { uninit::<T>(dev, rows * g * c) }?;
    let mut dx = unsafe { uninit::<T>(dev, n * k * c) }?;
    if n * c == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()));
    }
    let skip = usize::from(separable);
    let func = kernel::<T>(dev, ELEMENTWISE, "silu_backward_inplace")?;
    for (r0, m) in row_chunks(n, rows) {
        batched(
            dev,
            &to,
            (k, 0, false),
            (g, k),
            &xv,
            (r0 * k * c, k * c),
            &mut values,
            (0, g * c),
            m,
            c,
        )?;
        batched(
            dev,
            &from,
            (k, skip, false),
            (g, k - skip),
            &dyv,
            ((r0 * k + skip) * c, k * c),
            &mut grads,
            (0, g * c),
            m,
            c,
        )?;
        let total = m * g * c;
        let (t, zero_grad) = (long(total), i32::from(k == skip));
        let mut b = func.builder();
        b.arg(&t).arg(&zero_grad).arg(&mut values).arg(&grads);
        // SAFETY: values and grads hold at least m × g × c elements.
        unsafe { b.launch(launch_cfg(total)) }.w()?;
        let vv = values.slice(..);
        batched(
            dev,
            &to,
            (k, 0, true),
            (k, g),
            &vv,
            (0, g * c),
            &mut dx,
            (r0 * k * c, k * c),
            m,
            c,
        )?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

/// `cuda_fwd` of `S2ActBackward`: `dx = toᵀ · (SiLU'(to · x) ⊙ (from · dy))` per row.
pub(crate) fn activation_backward(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    grid: &Grid<'_>,
    separable: bool,
    name: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, rows, c) = x.1.shape().dims3()?;
    if rows != grid.k {
        candle_core::bail!("{name}: expected {} coefficient rows, got {rows}", grid.k);
    }
    let out = match (x.0.dtype(), dy.0.dtype()) {
        (DType::F32, DType::F32) => {
            act_backward_typed::<f32>(x, dy, grid, separable, (n, c), name)?
        }
        (DType::F64, DType::F64) => {
            act_backward_typed::<f64>(x, dy, grid, separable, (n, c), name)?
        }
        _ => candle_core::bail!("{name}: x and grad must both be f32 or both f64"),
    };
    Ok((out, x.1.shape().clone()))
}
