//! The rotations into / out of edge frames (`so2.rs` `RotateOp`) and the fused SO(2) layer
//! (`so2_fused.rs` `So2LayerOp` / `So2LayerBwdOp`) on the device.
//!
//! The fused layer runs as a short pipeline on whole edge batches: `rotate_to_edge` (and the
//! radial scaling) into an m-major buffer, the per-order linear maps as cuBLAS GEMMs with the
//! same packed weights and Gauss's three-multiplication complex product as the CPU kernel, then
//! `rotate_from_edge` (with fairchem's rescale) into the output. The backward recomputes the
//! rotated input, like the CPU op, and writes `[gx | grad_radial | grad_weights]`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor};

use super::{gemm, int, kernel, launch_cfg, long, mat, upload, view, zeros, CudaFloat, ROTATE};
use crate::mapping::{l_major_index, SphericalLayout};
use crate::so2_fused::LayerShape;
use crate::wigner::block_offset;

/// Device tables of one rotation.
struct RotateTables<T: CudaFloat> {
    /// m-major slot of every l-major index (−1 where `|m| > mmax`).
    slot: CudaSlice<i32>,
    block_off: CudaSlice<i32>,
    scale: CudaSlice<T>,
}

impl<T: CudaFloat> RotateTables<T> {
    fn new(dev: &CudaDevice, layout: SphericalLayout, rescale: bool) -> candle_core::Result<Self> {
        let orders = layout.m_major_degrees_orders();
        let mut slot = vec![-1i32; layout.num_coefficients()];
        for (i, &(l, m)) in orders.iter().enumerate() {
            slot[l_major_index(l, m)] = i as i32;
        }
        let block_off: Vec<i32> = (0..=layout.lmax() + 1)
            .map(|l| block_offset(l) as i32)
            .collect();
        let scale: Vec<T> = (0..=layout.lmax())
            .map(|l| {
                T::from_f64(if rescale {
                    layout.rotate_inv_rescale(l)
                } else {
                    1.0
                })
            })
            .collect();
        Ok(Self {
            slot: upload(dev, &slot)?,
            block_off: upload(dev, &block_off)?,
            scale: upload(dev, &scale)?,
        })
    }
}

/// The smallest register tile of the rotation kernels (`rotate.cu`: 5, 9, 13, 25 inputs per
/// degree) that holds `inputs`; every layout qualifies (`SphericalLayout::MAX_LMAX` = 11
/// needs 23).
fn register_tile(inputs: usize) -> candle_core::Result<usize> {
    [5, 9, 13, 25]
        .into_iter()
        .find(|&k| inputs <= k)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "the CUDA rotation kernels hold at most 25 inputs per degree, not {inputs}"
            ))
        })
}

/// Launch of the rotation kernels: one block per (edge, tile of up to 128 channels), the
/// edge's `wlen` Wigner entries in dynamic shared memory.
fn rotate_cfg<T>(edges: usize, c: usize, wlen: usize) -> LaunchConfig {
    const MAX_THREADS: usize = 128;
    let threads = c.next_multiple_of(32).min(MAX_THREADS);
    let tiles = c.div_ceil(threads);
    LaunchConfig {
        grid_dim: (
            u32::try_from(edges.min(i32::MAX as usize)).expect("capped"),
            u32::try_from(tiles).expect("channel tiles fit in u32"),
            1,
        ),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: u32::try_from(wlen * std::mem::size_of::<T>())
            .expect("Wigner blocks of one edge fit in shared memory"),
    }
}

/// `out[e, m-major, c] = D|kept rows · x[e, l-major, c]` (times the per-degree scale).
fn to_edge<T: CudaFloat>(
    dev: &CudaDevice,
    layout: SphericalLayout,
    tables: &RotateTables<T>,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    edges: usize,
    c: usize,
    out: &mut CudaViewMut<'_, T>,
) -> candle_core::Result<()> {
    if edges == 0 || c == 0 {
        return Ok(());
    }
    let (e, ci) = (long(edges), int(c, "channels")?);
    let (lmax, trunc, wlen, mmax) = (
        layout.lmax() as i32,
        layout.num_truncated() as i32,
        layout.wigner_len() as i32,
        layout.mmax() as i32,
    );
    // The register-tiled kernel whose tile holds a degree's 2·lmax + 1 inputs.
    let func = match register_tile(2 * layout.lmax() + 1)? {
        5 => kernel::<T>(dev, ROTATE, "rotate_to_edge_k5")?,
        9 => kernel::<T>(dev, ROTATE, "rotate_to_edge_k9")?,
        13 => kernel::<T>(dev, ROTATE, "rotate_to_edge_k13")?,
        _ => kernel::<T>(dev, ROTATE, "rotate_to_edge_k25")?,
    };
    let mut b = func.builder();
    b.arg(&e)
        .arg(&ci)
        .arg(&lmax)
        .arg(&trunc)
        .arg(&wlen)
        .arg(&mmax)
        .arg(x)
        .arg(w)
        .arg(&tables.slot);
    b.arg(&tables.block_off).arg(&tables.scale).arg(out);
    // SAFETY: x is [edges, full, c], w [edges, wlen], out [edges, trunc, c]; tables sized by
    // layout; the shared memory holds wlen entries.
    unsafe { b.launch(rotate_cfg::<T>(edges, c, layout.wigner_len())) }.w()?;
    Ok(())
}

/// `out[e, l-major, c] = Dᵀ|kept columns · y[e, m-major, c]` (times the per-degree scale).
fn from_edge<T: CudaFloat>(
    dev: &CudaDevice,
    layout: SphericalLayout,
    tables: &RotateTables<T>,
    y: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    edges: usize,
    c: usize,
    out: &mut CudaViewMut<'_, T>,
) -> candle_core::Result<()> {
    if edges == 0 || c == 0 {
        return Ok(());
    }
    // The register-tiled kernel whose tile holds a degree's 2·min(lmax, mmax) + 1 inputs.
    let func = match register_tile(2 * layout.lmax().min(layout.mmax()) + 1)? {
        5 => kernel::<T>(dev, ROTATE, "rotate_from_edge_k5")?,
        9 => kernel::<T>(dev, ROTATE, "rotate_from_edge_k9")?,
        13 => kernel::<T>(dev, ROTATE, "rotate_from_edge_k13")?,
        _ => kernel::<T>(dev, ROTATE, "rotate_from_edge_k25")?,
    };
    let (e, ci) = (long(edges), int(c, "channels")?);
    let (lmax, trunc, wlen, mmax) = (
        layout.lmax() as i32,
        layout.num_truncated() as i32,
        layout.wigner_len() as i32,
        layout.mmax() as i32,
    );
    let mut b = func.builder();
    b.arg(&e)
        .arg(&ci)
        .arg(&lmax)
        .arg(&trunc)
        .arg(&wlen)
        .arg(&mmax)
        .arg(y)
        .arg(w);
    b.arg(&tables.slot)
        .arg(&tables.block_off)
        .arg(&tables.scale)
        .arg(out);
    // SAFETY: y is [edges, trunc, c], w [edges, wlen], out [edges, full, c]; the shared
    // memory holds wlen entries.
    unsafe { b.launch(rotate_cfg::<T>(edges, c, layout.wigner_len())) }.w()?;
    Ok(())
}

fn rotate_typed<T: CudaFloat>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    layout: SphericalLayout,
    to_edge_frame: bool,
    rescale: bool,
    edges: usize,
    c: usize,
    name: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.0.device;
    let xv = view::<T>(x.0, x.1, name)?;
    let wv = view::<T>(w.0, w.1, name)?;
    let tables = RotateTables::<T>::new(dev, layout, rescale)?;
    let rows_out = if to_edge_frame {
        layout.num_truncated()
    } else {
        layout.num_coefficients()
    };
    let mut out = zeros::<T>(dev, edges * rows_out * c)?;
    let mut ov = out.slice_mut(..);
    if to_edge_frame {
        to_edge(dev, layout, &tables, &xv, &wv, edges, c, &mut ov)?;
    } else {
        from_edge(dev, layout, &tables, &xv, &wv, edges, c, &mut ov)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `RotateOp`: `(x [E, rows_in, C], wigner [E, wlen])` → `[E, rows_out, C]`.
pub(crate) fn rotate(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    layout: SphericalLayout,
    to_edge_frame: bool,
    rescale: bool,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let name = if to_edge_frame {
        "matscale-rotate-to-edge"
    } else {
        "matscale-rotate-from-edge"
    };
    let &[edges, rows_in, c] = l1.shape().dims() else {
        candle_core::bail!("{name}: expected a rank-3 input");
    };
    let (expect_in, rows_out) = if to_edge_frame {
        (layout.num_coefficients(), layout.num_truncated())
    } else {
        (layout.num_truncated(), layout.num_coefficients())
    };
    if rows_in != expect_in || l2.shape().elem_count() != edges * layout.wigner_len() {
        candle_core::bail!(
            "{name}: inconsistent shapes {:?} and {:?}",
            l1.shape(),
            l2.shape()
        );
    }
    let out = match (s1.dtype(), s2.dtype()) {
        (DType::F32, DType::F32) => rotate_typed::<f32>(
            (s1, l1),
            (s2, l2),
            layout,
            to_edge_frame,
            rescale,
            edges,
            c,
            name,
        )?,
        (DType::F64, DType::F64) => rotate_typed::<f64>(
            (s1, l1),
            (s2, l2),
            layout,
            to_edge_frame,
            rescale,
            edges,
            c,
            name,
        )?,
        _ => candle_core::bail!("{name}: needs f32 or f64 inputs of one dtype"),
    };
    Ok((out, Shape::from((edges, rows_out, c))))
}

fn block_outer_typed<T: CudaFloat>(
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    layout: SphericalLayout,
    rescale: bool,
    (edges, c): (usize, usize),
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "matscale-rotate-block-outer";
    let dev = &a.0.device;
    let (av, bv) = (view::<T>(a.0, a.1, NAME)?, view::<T>(b.0, b.1, NAME)?);
    let tables = RotateTables::<T>::new(dev, layout, rescale)?;
    let wlen = layout.wigner_len();
    let total = edges * wlen;
    // SAFETY: one warp per output entry writes it (0 when there are no channels).
    let mut out = unsafe { super::uninit::<T>(dev, total) }?;
    if total > 0 {
        let func = kernel::<T>(dev, ROTATE, "block_outer")?;
        let (t, ci, tr, fu, w) = (
            long(total),
            int(c, "channels")?,
            int(layout.num_truncated(), "rows")?,
            int(layout.num_coefficients(), "rows")?,
            int(wlen, "block entries")?,
        );
        let mut l = func.builder();
        l.arg(&t)
            .arg(&ci)
            .arg(&tr)
            .arg(&fu)
            .arg(&w)
            .arg(&av)
            .arg(&bv)
            .arg(&tables.slot)
            .arg(&tables.scale)
            .arg(&mut out);
        // SAFETY: a [edges, trunc, c], b [edges, full, c], slot (lmax+1)², scale lmax + 1,
        // out [edges, wlen]; one warp per entry.
        unsafe { l.launch(launch_cfg(total * 32)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `BlockOuterOp`: `(a [E, n_trunc, C] m-major, b [E, (lmax+1)², C] l-major)` →
/// `[E, wigner_len]`, the gradient of a rotation with respect to its blocks.
pub(crate) fn block_outer(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    layout: SphericalLayout,
    rescale: bool,
) -> candle_core::Result<CudaStorage> {
    let (edges, _, c) = l1.shape().dims3()?;
    match (s1.dtype(), s2.dtype()) {
        (DType::F32, DType::F32) => {
            block_outer_typed::<f32>((s1, l1), (s2, l2), layout, rescale, (edges, c))
        }
        (DType::F64, DType::F64) => {
            block_outer_typed::<f64>((s1, l1), (s2, l2), layout, rescale, (edges, c))
        }
        _ => {
            candle_core::bail!("matscale-rotate-block-outer: needs f32 or f64 inputs of one dtype")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fused SO(2) layer
// ---------------------------------------------------------------------------------------------

/// Sizes and offsets of one fused layer (the same packing as `so2_fused.rs`).
struct Geometry {
    layout: SphericalLayout,
    c_in: usize,
    c_out: usize,
    extra: usize,
    complex: bool,
    rotate_in: bool,
    rotate_out: bool,
    radial: bool,
    trunc: usize,
    full: usize,
    k0: usize,
    n0: usize,
    /// Columns of `W₀` (extra outputs first).
    wc: usize,
    bias_off: usize,
    /// `(first m-major slot of +m, degrees n_l, weight offset)` per order `m ≥ 1`.
    orders: Vec<(usize, usize, usize)>,
    weight_len: usize,
    /// Radial rows `R` and the radial row of every m-major slot / the slots of every row.
    radial_rows: usize,
    slot_rows: Vec<i32>,
    row_slots: Vec<i32>,
}

impl Geometry {
    fn new(s: &LayerShape) -> Self {
        let layout = s.layout;
        let (c_in, c_out, extra) = (s.c_in, s.c_out, s.extra);
        let k0 = layout.m_size(0) * c_in;
        let n0 = layout.m_size(0) * c_out;
        let wc = extra + n0;
        let bias_off = k0 * wc;
        let per_order = if s.complex { 3 } else { 1 };
        let mut offset = bias_off + wc;
        let mut orders = Vec::new();
        for m in 1..=layout.mmax() {
            let n_l = layout.m_size(m);
            orders.push((layout.m_offset(m), n_l, offset));
            offset += per_order * n_l * c_in * n_l * c_out;
        }
        let radial_rows: usize = (0..=layout.mmax()).map(|m| layout.m_size(m)).sum();
        let mut slot_rows = Vec::with_capacity(layout.num_truncated());
        let mut base = 0;
        for m in 0..=layout.mmax() {
            let n_l = layout.m_size(m);
            slot_rows.extend((base..base + n_l).map(|r| r as i32));
            if m > 0 {
                slot_rows.extend((base..base + n_l).map(|r| r as i32));
            }
            base += n_l;
        }
        let mut row_slots = vec![-1i32; 2 * radial_rows];
        for (slot, &row) in slot_rows.iter().enumerate() {
            let r = row as usize;
            let k = if row_slots[2 * r] < 0 {
                2 * r
            } else {
                2 * r + 1
            };
            row_slots[k] = slot as i32;
        }
        Self {
            layout,
            c_in,
            c_out,
            extra,
            complex: s.complex,
            rotate_in: s.rotate_in,
            rotate_out: s.rotate_out,
            radial: s.radial,
            trunc: layout.num_truncated(),
            full: layout.num_coefficients(),
            k0,
            n0,
            wc,
            bias_off,
            orders,
            weight_len: offset,
            radial_rows,
            slot_rows,
            row_slots,
        }
    }

    fn rows_in(&self) -> usize {
        if self.rotate_in {
            self.full
        } else {
            self.trunc
        }
    }

    fn rows_out(&self) -> usize {
        if self.rotate_out {
            self.full
        } else {
            self.trunc
        }
    }

    fn out_len(&self, edges: usize) -> usize {
        edges * (self.rows_out() * self.c_out + self.extra)
    }
}

/// Runs `f` on the contiguous device data of a tensor held by an op (Wigner blocks, weights).
fn with_held<T: CudaFloat, R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&CudaView<'_, T>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let Some(t) = t else {
        return f(None);
    };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(cuda) => f(Some(&view::<T>(cuda, layout, "matscale so2 layer")?)),
        _ => candle_core::bail!(
            "matscale so2 layer: the Wigner blocks / weights are not on the CUDA device of the input"
        ),
    }
}

/// Launches `name(total, ...)` of the rotate module with the arguments pushed by `push`.
macro_rules! launch {
    ($dev:expr, $t:ty, $name:literal, $total:expr, |$b:ident| $push:block) => {{
        let total = $total;
        if total > 0 {
            let func = kernel::<$t>($dev, ROTATE, $name)?;
            let total_arg = long(total);
            let mut $b = func.builder();
            $b.arg(&total_arg);
            $push
            // SAFETY: every buffer passed by the caller holds the elements the kernel indexes
            // for `total` threads (sizes documented at each call).
            unsafe { $b.launch(launch_cfg(total)) }.w()?;
        }
    }};
}

/// `dst[e, j] = a[e·rs + off1 + j] + a[e·rs + off2 + j]`, `dst` dense `[E, n]`.
fn add_rows<T: CudaFloat>(
    dev: &CudaDevice,
    edges: usize,
    n: usize,
    a: &CudaView<'_, T>,
    (off1, off2, rs): (usize, usize, usize),
) -> candle_core::Result<CudaSlice<T>> {
    let mut dst = zeros::<T>(dev, edges * n)?;
    let ni = int(n, "row length")?;
    let (o1, o2, r) = (long(off1), long(off2), long(rs));
    launch!(dev, T, "add_rows", edges * n, |b| {
        b.arg(&ni).arg(a).arg(&o1).arg(&o2).arg(&r).arg(&mut dst);
    });
    Ok(dst)
}

/// Copies `[E, n]` dense `src` into columns `doff..doff+n` of rows of stride `drs` of `dst`.
fn scatter_rows<T: CudaFloat>(
    dev: &CudaDevice,
    edges: usize,
    n: usize,
    src: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
    (doff, drs): (usize, usize),
) -> candle_core::Result<()> {
    let ni = int(n, "row length")?;
    let (so, srs, o, r) = (0i64, long(n), long(doff), long(drs));
    launch!(dev, T, "copy_rows", edges * n, |b| {
        b.arg(&ni)
            .arg(src)
            .arg(&so)
            .arg(&srs)
            .arg(dst)
            .arg(&o)
            .arg(&r);
    });
    Ok(())
}

/// Writes `v[..n]` into columns `doff..doff+n` of every row (stride `drs`) of `dst`.
fn broadcast_rows<T: CudaFloat>(
    dev: &CudaDevice,
    edges: usize,
    n: usize,
    v: &CudaView<'_, T>,
    dst: &mut CudaSlice<T>,
    (doff, drs): (usize, usize),
) -> candle_core::Result<()> {
    let ni = int(n, "row length")?;
    let (o, r) = (long(doff), long(drs));
    launch!(dev, T, "broadcast_rows", edges * n, |b| {
        b.arg(&ni).arg(v).arg(dst).arg(&o).arg(&r);
    });
    Ok(())
}

/// The m-major input before (`xr`) and after (`xs`) the radial scaling; `None` means "the
/// input itself" (no rotation) or "same as `xr`" (no radial weights).
struct RotatedInput<T: CudaFloat> {
    xr: Option<CudaSlice<T>>,
    xs: Option<CudaSlice<T>>,
}

fn rotated_input<T: CudaFloat>(
    dev: &CudaDevice,
    g: &Geometry,
    edges: usize,
    x: &CudaView<'_, T>,
    radial: Option<&CudaView<'_, T>>,
    wigner: Option<&CudaView<'_, T>>,
    slot_rows: &CudaSlice<i32>,
) -> candle_core::Result<RotatedInput<T>> {
    let xr = if g.rotate_in {
        let w = wigner.ok_or_else(|| {
            candle_core::Error::Msg("matscale so2 layer: rotation without Wigner blocks".into())
        })?;
        let tables = RotateTables::<T>::new(dev, g.layout, false)?;
        let mut buf = zeros::<T>(dev, edges * g.trunc * g.c_in)?;
        to_edge(
            dev,
            g.layout,
            &tables,
            x,
            w,
            edges,
            g.c_in,
            &mut buf.slice_mut(..),
        )?;
        Some(buf)
    } else {
        None
    };
    let xs = match radial {
        Some(rad) => {
            let src = match &xr {
                Some(b) => b.slice(..),
                None => x.slice(..),
            };
            let mut buf = zeros::<T>(dev, edges * g.trunc * g.c_in)?;
            let (ci, trunc, rows) = (
                int(g.c_in, "channels")?,
                g.trunc as i32,
                g.radial_rows as i32,
            );
            launch!(dev, T, "radial_scale", edges * g.trunc * g.c_in, |b| {
                b.arg(&ci)
                    .arg(&trunc)
                    .arg(&rows)
                    .arg(&src)
                    .arg(rad)
                    .arg(slot_rows)
                    .arg(&mut buf);
            });
            Some(buf)
        }
        None => None,
    };
    Ok(RotatedInput { xr, xs })
}

fn layer_forward_typed<T: CudaFloat>(
    g: &Geometry,
    wigner: Option<&Tensor>,
    x: (&CudaStorage, &Layout),
    radial: Option<(&CudaStorage, &Layout)>,
    w: (&CudaStorage, &Layout),
    edges: usize,
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "matscale so2 layer";
    let dev = &x.0.device;
    let xv = view::<T>(x.0, x.1, NAME)?;
    let wv = view::<T>(w.0, w.1, NAME)?;
    let radv = radial.map(|r| view::<T>(r.0, r.1, NAME)).transpose()?;
    let mut out = zeros::<T>(dev, g.out_len(edges))?;
    if edges == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    with_held::<T, _>(wigner, |wig| {
        let slot_rows = upload(dev, &g.slot_rows)?;
        let input = rotated_input(dev, g, edges, &xv, radv.as_ref(), wig, &slot_rows)?;
        let xs = match (&input.xs, &input.xr) {
            (Some(b), _) | (None, Some(b)) => b.slice(..),
            (None, None) => xv.slice(..),
        };
        let (rs_in, rs_out) = (g.trunc * g.c_in, g.trunc * g.c_out);
        let (one, zero) = (T::one(), T::zero());
        let mut ybuf = if g.rotate_out {
            Some(zeros::<T>(dev, edges * rs_out)?)
        } else {
            None
        };
        let mut extra = zeros::<T>(dev, edges * g.extra)?;
        {
            let y: &mut CudaSlice<T> = match ybuf.as_mut() {
                Some(b) => b,
                None => &mut out,
            };
            // m = 0: bias, then the GEMM on top; the extra outputs likewise.
            broadcast_rows(
                dev,
                edges,
                g.n0,
                &wv.slice(g.bias_off + g.extra..),
                y,
                (0, rs_out),
            )?;
            gemm(
                dev,
                (edges, g.n0, g.k0),
                one,
                mat(&xs, 0, rs_in, false),
                mat(&wv, g.extra, g.wc, false),
                one,
                y,
                0,
                rs_out,
            )?;
            if g.extra > 0 {
                broadcast_rows(
                    dev,
                    edges,
                    g.extra,
                    &wv.slice(g.bias_off..),
                    &mut extra,
                    (0, g.extra),
                )?;
                gemm(
                    dev,
                    (edges, g.extra, g.k0),
                    one,
                    mat(&xs, 0, rs_in, false),
                    mat(&wv, 0, g.wc, false),
                    one,
                    &mut extra,
                    0,
                    g.extra,
                )?;
            }
            for &(slot, n_l, woff) in &g.orders {
                let (k, n) = (n_l * g.c_in, n_l * g.c_out);
                let (xp, xm) = (slot * g.c_in, (slot + n_l) * g.c_in);
                let (yp, ym) = (slot * g.c_out, (slot + n_l) * g.c_out);
                if g.complex {
                    let (p1, p2, p3) = (woff, woff + k * n, woff + 2 * k * n);
                    let sum = add_rows(dev, edges, k, &xs, (xp, xm, rs_in))?;
                    let mut tmp = zeros::<T>(dev, edges * n)?;
                    gemm(
                        dev,
                        (edges, n, k),
                        one,
                        mat(&sum.slice(..), 0, k, false),
                        mat(&wv, p1, n, false),
                        zero,
                        &mut tmp,
                        0,
                        n,
                    )?;
                    scatter_rows(dev, edges, n, &tmp, y, (yp, rs_out))?;
                    scatter_rows(dev, edges, n, &tmp, y, (ym, rs_out))?;
                    gemm(
                        dev,
                        (edges, n, k),
                        T::from_f64(-1.0),
                        mat(&xs, xm, rs_in, false),
                        mat(&wv, p2, n, false),
                        one,
                        y,
                        yp,
                        rs_out,
                    )?;
                    gemm(
                        dev,
                        (edges, n, k),
                        one,
                        mat(&xs, xp, rs_in, false),
                        mat(&wv, p3, n, false),
                        one,
                        y,
                        ym,
                        rs_out,
                    )?;
                } else {
                    for (xo, yo) in [(xp, yp), (xm, ym)] {
                        gemm(
                            dev,
                            (edges, n, k),
                            one,
                            mat(&xs, xo, rs_in, false),
                            mat(&wv, woff, n, false),
                            zero,
                            y,
                            yo,
                            rs_out,
                        )?;
                    }
                }
            }
        }
        if let Some(ybuf) = &ybuf {
            let w = wig.ok_or_else(|| {
                candle_core::Error::Msg("matscale so2 layer: rotation without Wigner blocks".into())
            })?;
            let tables = RotateTables::<T>::new(dev, g.layout, true)?;
            from_edge(
                dev,
                g.layout,
                &tables,
                &ybuf.slice(..),
                w,
                edges,
                g.c_out,
                &mut out.slice_mut(..),
            )?;
        }
        if g.extra > 0 {
            let main = edges * g.rows_out() * g.c_out;
            dev.memcpy_dtod(
                &extra.slice(..edges * g.extra),
                &mut out.slice_mut(main..main + edges * g.extra),
            )?;
        }
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

fn check_layer(
    g: &Geometry,
    x: &Layout,
    radial: Option<&Layout>,
    w: &Layout,
) -> candle_core::Result<usize> {
    let &[edges, rows, c] = x.shape().dims() else {
        candle_core::bail!("matscale so2 layer: expected a rank-3 input");
    };
    let radial_ok = radial.is_none_or(|r| r.shape().elem_count() == edges * g.radial_rows * g.c_in);
    if rows != g.rows_in() || c != g.c_in || !radial_ok || w.shape().elem_count() != g.weight_len {
        candle_core::bail!("matscale so2 layer: inconsistent input shapes");
    }
    Ok(edges)
}

/// `cuda_fwd` of `So2LayerOp` (candle's inputs `(x, weights[, radial])`, passed here as
/// `x, radial, weights`) → `[E, rows_out, C_out]` (or the flat `[main | extra]` when the layer
/// has extra `m = 0` outputs).
pub(crate) fn layer_forward(
    shape: &LayerShape,
    wigner: Option<&Tensor>,
    x: (&CudaStorage, &Layout),
    radial: Option<(&CudaStorage, &Layout)>,
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let g = Geometry::new(shape);
    let edges = check_layer(&g, x.1, radial.map(|r| r.1), w.1)?;
    let out = match x.0.dtype() {
        DType::F32 => layer_forward_typed::<f32>(&g, wigner, x, radial, w, edges)?,
        DType::F64 => layer_forward_typed::<f64>(&g, wigner, x, radial, w, edges)?,
        _ => candle_core::bail!("matscale so2 layer: needs f32 or f64 inputs"),
    };
    let shape = if g.extra == 0 {
        Shape::from((edges, g.rows_out(), g.c_out))
    } else {
        Shape::from(g.out_len(edges))
    };
    Ok((out, shape))
}

#[allow(clippy::too_many_lines)]
fn layer_backward_typed<T: CudaFloat>(
    g: &Geometry,
    wigner: Option<&Tensor>,
    weights: &Tensor,
    x: (&CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    radial: Option<(&CudaStorage, &Layout)>,
    edges: usize,
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "matscale so2 layer backward";
    let dev = &x.0.device;
    let xv = view::<T>(x.0, x.1, NAME)?;
    let gv = view::<T>(grad.0, grad.1, NAME)?;
    let radv = radial.map(|r| view::<T>(r.0, r.1, NAME)).transpose()?;
    let gx_row = g.rows_in() * g.c_in;
    let rad_row = if g.radial { g.radial_rows * g.c_in } else { 0 };
    let gw_off = edges * (gx_row + rad_row);
    let mut out = zeros::<T>(dev, gw_off + g.weight_len)?;
    if edges == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    with_held::<T, _>(Some(weights), |wv| {
        let wv = wv.expect("weights are always held");
        if wv.len() != g.weight_len {
            candle_core::bail!("{NAME}: weights of the wrong size");
        }
        with_held::<T, _>(wigner, |wig| {
            let (rs_in, rs_out) = (g.trunc * g.c_in, g.trunc * g.c_out);
            let (one, zero) = (T::one(), T::zero());
            let main_len = g.rows_out() * g.c_out;
            let g_main = gv.slice(..edges * main_len);
            let g_extra = gv.slice(edges * main_len..);
            // Output gradient in the edge frame (adjoint of the rotation back, with its rescale).
            let gy_buf = if g.rotate_out {
                let w = wig.ok_or_else(|| {
                    candle_core::Error::Msg(format!("{NAME}: rotation without Wigner blocks"))
                })?;
                let tables = RotateTables::<T>::new(dev, g.layout, true)?;
                let mut buf = zeros::<T>(dev, edges * rs_out)?;
                to_edge(
                    dev,
                    g.layout,
                    &tables,
                    &g_main,
                    w,
                    edges,
                    g.c_out,
                    &mut buf.slice_mut(..),
                )?;
                Some(buf)
            } else {
                None
            };
            let gy = match &gy_buf {
                Some(b) => b.slice(..),
                None => g_main.slice(..),
            };
            let slot_rows = upload(dev, &g.slot_rows)?;
            let input = rotated_input(dev, g, edges, &xv, radv.as_ref(), wig, &slot_rows)?;
            let xr = match &input.xr {
                Some(b) => b.slice(..),
                None => xv.slice(..),
            };
            let xs = match &input.xs {
                Some(b) => b.slice(..),
                None => xr.slice(..),
            };
            let mut gxs = zeros::<T>(dev, edges * rs_in)?;
            // m = 0: weight, bias and input gradients.
            let mut ones = zeros::<T>(dev, edges)?;
            let fill = T::one();
            launch!(dev, T, "fill", edges, |b| {
                b.arg(&fill).arg(&mut ones);
            });
            let ones_v = ones.slice(..);
            gemm(
                dev,
                (g.k0, g.n0, edges),
                one,
                mat(&xs, 0, rs_in, true),
                mat(&gy, 0, rs_out, false),
                zero,
                &mut out,
                gw_off + g.extra,
                g.wc,
            )?;
            gemm(
                dev,
                (1, g.n0, edges),
                one,
                mat(&ones_v, 0, edges, false),
                mat(&gy, 0, rs_out, false),
                zero,
                &mut out,
                gw_off + g.bias_off + g.extra,
                g.n0,
            )?;
            gemm(
                dev,
                (edges, g.k0, g.n0),
                one,
                mat(&gy, 0, rs_out, false),
                mat(wv, g.extra, g.wc, true),
                zero,
                &mut gxs,
                0,
                rs_in,
            )?;
            if g.extra > 0 {
                gemm(
                    dev,
                    (g.k0, g.extra, edges),
                    one,
                    mat(&xs, 0, rs_in, true),
                    mat(&g_extra, 0, g.extra, false),
                    zero,
                    &mut out,
                    gw_off,
                    g.wc,
                )?;
                gemm(
                    dev,
                    (1, g.extra, edges),
                    one,
                    mat(&ones_v, 0, edges, false),
                    mat(&g_extra, 0, g.extra, false),
                    zero,
                    &mut out,
                    gw_off + g.bias_off,
                    g.extra,
                )?;
                gemm(
                    dev,
                    (edges, g.k0, g.extra),
                    one,
                    mat(&g_extra, 0, g.extra, false),
                    mat(wv, 0, g.wc, true),
                    one,
                    &mut gxs,
                    0,
                    rs_in,
                )?;
            }
            for &(slot, n_l, woff) in &g.orders {
                let (k, n) = (n_l * g.c_in, n_l * g.c_out);
                let (xp, xm) = (slot * g.c_in, (slot + n_l) * g.c_in);
                let (yp, ym) = (slot * g.c_out, (slot + n_l) * g.c_out);
                if g.complex {
                    let (p1, p2, p3) = (woff, woff + k * n, woff + 2 * k * n);
                    let gsum = add_rows(dev, edges, n, &gy, (yp, ym, rs_out))?;
                    let ssum = add_rows(dev, edges, k, &xs, (xp, xm, rs_in))?;
                    let (gsv, ssv) = (gsum.slice(..), ssum.slice(..));
                    // ∂P₁ = Sᵀ(g₊ + g₋), ∂P₂ = −x₋ᵀg₊, ∂P₃ = x₊ᵀg₋.
                    gemm(
                        dev,
                        (k, n, edges),
                        one,
                        mat(&ssv, 0, k, true),
                        mat(&gsv, 0, n, false),
                        zero,
                        &mut out,
                        gw_off + p1,
                        n,
                    )?;
                    gemm(
                        dev,
                        (k, n, edges),
                        T::from_f64(-1.0),
                        mat(&xs, xm, rs_in, true),
                        mat(&gy, yp, rs_out, false),
                        zero,
                        &mut out,
                        gw_off + p2,
                        n,
                    )?;
                    gemm(
                        dev,
                        (k, n, edges),
                        one,
                        mat(&xs, xp, rs_in, true),
                        mat(&gy, ym, rs_out, false),
                        zero,
                        &mut out,
                        gw_off + p3,
                        n,
                    )?;
                    // ∂S = (g₊ + g₋)P₁ᵀ, ∂x₊ = ∂S + g₋P₃ᵀ, ∂x₋ = ∂S − g₊P₂ᵀ.
                    let mut ds = zeros::<T>(dev, edges * k)?;
                    gemm(
                        dev,
                        (edges, k, n),
                        one,
                        mat(&gsv, 0, n, false),
                        mat(wv, p1, n, true),
                        zero,
                        &mut ds,
                        0,
                        k,
                    )?;
                    scatter_rows(dev, edges, k, &ds, &mut gxs, (xp, rs_in))?;
                    scatter_rows(dev, edges, k, &ds, &mut gxs, (xm, rs_in))?;
                    gemm(
                        dev,
                        (edges, k, n),
                        one,
                        mat(&gy, ym, rs_out, false),
                        mat(wv, p3, n, true),
                        one,
                        &mut gxs,
                        xp,
                        rs_in,
                    )?;
                    gemm(
                        dev,
                        (edges, k, n),
                        T::from_f64(-1.0),
                        mat(&gy, yp, rs_out, false),
                        mat(wv, p2, n, true),
                        one,
                        &mut gxs,
                        xm,
                        rs_in,
                    )?;
                } else {
                    let mut beta = zero;
                    for (xo, yo) in [(xp, yp), (xm, ym)] {
                        gemm(
                            dev,
                            (k, n, edges),
                            one,
                            mat(&xs, xo, rs_in, true),
                            mat(&gy, yo, rs_out, false),
                            beta,
                            &mut out,
                            gw_off + woff,
                            n,
                        )?;
                        gemm(
                            dev,
                            (edges, k, n),
                            one,
                            mat(&gy, yo, rs_out, false),
                            mat(wv, woff, n, true),
                            zero,
                            &mut gxs,
                            xo,
                            rs_in,
                        )?;
                        beta = one;
                    }
                }
            }
            // Radial weights: their gradient, and the input gradient through the scaling.
            let gx_r = match &radv {
                Some(rad) => {
                    let mut scaled = zeros::<T>(dev, edges * rs_in)?;
                    let row_slots = upload(dev, &g.row_slots)?;
                    let (ci, trunc, rows) = (
                        int(g.c_in, "channels")?,
                        g.trunc as i32,
                        g.radial_rows as i32,
                    );
                    let mut grad_rad = out.slice_mut(edges * gx_row..edges * (gx_row + rad_row));
                    launch!(
                        dev,
                        T,
                        "radial_backward",
                        edges * g.radial_rows * g.c_in,
                        |b| {
                            b.arg(&ci)
                                .arg(&trunc)
                                .arg(&rows)
                                .arg(&gxs)
                                .arg(&xr)
                                .arg(rad)
                                .arg(&row_slots);
                            b.arg(&mut grad_rad).arg(&mut scaled);
                        }
                    );
                    scaled
                }
                None => gxs,
            };
            if g.rotate_in {
                let w = wig.ok_or_else(|| {
                    candle_core::Error::Msg(format!("{NAME}: rotation without Wigner blocks"))
                })?;
                let tables = RotateTables::<T>::new(dev, g.layout, false)?;
                from_edge(
                    dev,
                    g.layout,
                    &tables,
                    &gx_r.slice(..),
                    w,
                    edges,
                    g.c_in,
                    &mut out.slice_mut(..edges * gx_row),
                )?;
            } else {
                dev.memcpy_dtod(
                    &gx_r.slice(..edges * gx_row),
                    &mut out.slice_mut(..edges * gx_row),
                )?;
            }
            Ok(())
        })
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `So2LayerBwdOp`: `(x, grad_out[, radial])` → `[gx | grad_radial | grad_weights]`.
pub(crate) fn layer_backward(
    shape: &LayerShape,
    wigner: Option<&Tensor>,
    weights: &Tensor,
    x: (&CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    radial: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let g = Geometry::new(shape);
    let &[edges, ..] = x.1.shape().dims() else {
        candle_core::bail!("matscale so2 layer backward: expected a rank-3 input");
    };
    if grad.1.shape().elem_count() != g.out_len(edges) {
        candle_core::bail!("matscale so2 layer backward: gradient of the wrong size");
    }
    let out = match x.0.dtype() {
        DType::F32 => layer_backward_typed::<f32>(&g, wigner, weights, x, grad, radial, edges)?,
        DType::F64 => layer_backward_typed::<f64>(&g, wigner, weights, x, grad, radial, edges)?,
        _ => candle_core::bail!("matscale so2 layer backward: needs f32 or f64 inputs"),
    };
    let rad = if g.radial {
        edges * g.radial_rows * g.c_in
    } else {
        0
    };
    Ok((
        out,
        Shape::from(edges * g.rows_in() * g.c_in + rad + g.weight_len),
    ))
}
