//! Segment sum / gather / softmax on the device (`kernels/segment.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};
use std::sync::{Arc, Mutex, PoisonError};

use super::{int, kernel, launch_cfg, long, upload, view, zeros, CudaFloat, SEGMENT};

/// The CSR grouping of `segment.rs` (`Csr`), borrowed from the op.
pub(crate) struct Csr<'a> {
    pub(crate) num_segments: usize,
    pub(crate) index: &'a [u32],
    pub(crate) offsets: &'a [usize],
    pub(crate) order: Option<&'a [u32]>,
    /// The grouping's device copy, kept with the grouping (see [`DeviceCsrCache`]).
    pub(crate) cache: &'a DeviceCsrCache,
}

/// The CSR arrays on one GPU: index, offsets (u32) and order (one dummy entry when sorted).
struct DeviceCsr {
    device: DeviceId,
    index: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    order: CudaSlice<u32>,
}

/// A grouping's arrays on the device, uploaded by the first segment op that runs there and
/// reused by every later one (a model sums, gathers and softmaxes over the same grouping in
/// every layer, forward and backward). A grouping used on another device gets fresh copies.
#[derive(Default)]
pub(crate) struct DeviceCsrCache(Mutex<Option<Arc<DeviceCsr>>>);

impl std::fmt::Debug for DeviceCsrCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self
            .0
            .lock()
            .map(|c| c.as_ref().map(|d| d.device))
            .unwrap_or(None);
        f.debug_tuple("DeviceCsrCache").field(&held).finish()
    }
}

impl Csr<'_> {
    /// The arrays on `dev`: the cached copy, or a new upload that becomes the cache.
    fn on_device(&self, dev: &CudaDevice) -> candle_core::Result<Arc<DeviceCsr>> {
        let mut slot = self.cache.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = slot.as_ref().filter(|c| c.device == dev.id()) {
            return Ok(cached.clone());
        }
        let arrays = Arc::new(DeviceCsr {
            device: dev.id(),
            index: upload(dev, self.index)?,
            offsets: upload(dev, &offsets_u32(self)?)?,
            order: upload(dev, self.order.unwrap_or(&[]))?,
        });
        *slot = Some(arrays.clone());
        Ok(arrays)
    }
}

/// Which segment op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum SegmentKind {
    /// Sum of the items of every segment.
    Sum,
    /// Each item gets its segment's row.
    Gather,
    /// Softmax over the items of every segment (per column), `1 / (Σ + eps)`.
    Softmax(f64),
}

fn offsets_u32(csr: &Csr<'_>) -> candle_core::Result<Vec<u32>> {
    csr.offsets
        .iter()
        .map(|&o| {
            u32::try_from(o)
                .map_err(|_| candle_core::Error::Msg(format!("segment offset {o} exceeds u32")))
        })
        .collect()
}

fn run<T: CudaFloat>(
    s: &CudaStorage,
    l: &Layout,
    csr: &Csr<'_>,
    kind: SegmentKind,
    cols: usize,
    name: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = &s.device;
    let src = view::<T>(s, l, name)?;
    let items = csr.index.len();
    let rows_out = match kind {
        SegmentKind::Sum => csr.num_segments,
        SegmentKind::Gather | SegmentKind::Softmax(_) => items,
    };
    let mut out = zeros::<T>(dev, rows_out * cols)?;
    let c = int(cols.max(1), "columns")?;
    match kind {
        SegmentKind::Gather => {
            let total = items * cols;
            if total > 0 {
                let arrays = csr.on_device(dev)?;
                let func = kernel::<T>(dev, SEGMENT, "segment_gather")?;
                let t = long(total);
                let mut b = func.builder();
                b.arg(&t).arg(&c).arg(&arrays.index).arg(&src).arg(&mut out);
                // SAFETY: index has `items` entries < num_segments; src [num_segments, cols].
                unsafe { b.launch(launch_cfg(total)) }.w()?;
            }
        }
        SegmentKind::Sum | SegmentKind::Softmax(_) => {
            let total = csr.num_segments * cols;
            if total > 0 {
                let arrays = csr.on_device(dev)?;
                let (offsets, order) = (&arrays.offsets, &arrays.order);
                let has_order = i32::from(csr.order.is_some());
                let t = long(total);
                let (fname, eps) = match kind {
                    SegmentKind::Softmax(eps) => ("segment_softmax", Some(T::from_f64(eps))),
                    _ => ("segment_sum", None),
                };
                let func = kernel::<T>(dev, SEGMENT, fname)?;
                let mut b = func.builder();
                b.arg(&t).arg(&c).arg(offsets).arg(order).arg(&has_order);
                if let Some(eps) = &eps {
                    b.arg(eps);
                }
                b.arg(&src).arg(&mut out);
                // SAFETY: offsets has num_segments + 1 entries bounding `order` (items entries);
                // src and out hold items × cols (sum: out num_segments × cols).
                unsafe { b.launch(launch_cfg(total)) }.w()?;
            }
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `SegmentOp`.
pub(crate) fn forward(
    s: &CudaStorage,
    l: &Layout,
    csr: &Csr<'_>,
    kind: SegmentKind,
    name: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dims = l.dims();
    let cols: usize = dims[1..].iter().product();
    let mut out_dims = dims.to_vec();
    out_dims[0] = match kind {
        SegmentKind::Sum => csr.num_segments,
        SegmentKind::Gather | SegmentKind::Softmax(_) => csr.index.len(),
    };
    let out = match s.dtype() {
        DType::F32 => run::<f32>(s, l, csr, kind, cols, name)?,
        DType::F64 => run::<f64>(s, l, csr, kind, cols, name)?,
        _ => candle_core::bail!("{name}: only f32 and f64 are supported"),
    };
    Ok((out, Shape::from(out_dims)))
}

fn softmax_backward_typed<T: CudaFloat>(
    y: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    csr: &Csr<'_>,
    cols: usize,
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "segment-softmax-backward";
    let dev = &y.0.device;
    let yv = view::<T>(y.0, y.1, NAME)?;
    let gv = view::<T>(g.0, g.1, NAME)?;
    let mut out = zeros::<T>(dev, csr.index.len() * cols)?;
    let total = csr.num_segments * cols;
    if total > 0 {
        let arrays = csr.on_device(dev)?;
        let has_order = i32::from(csr.order.is_some());
        let (t, c) = (long(total), int(cols, "columns")?);
        let func = kernel::<T>(dev, SEGMENT, "segment_softmax_backward")?;
        let mut b = func.builder();
        b.arg(&t)
            .arg(&c)
            .arg(&arrays.offsets)
            .arg(&arrays.order)
            .arg(&has_order)
            .arg(&yv)
            .arg(&gv)
            .arg(&mut out);
        // SAFETY: as in `run`; y, g and out hold items × cols.
        unsafe { b.launch(launch_cfg(total)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `SoftmaxBackward`: `(y, g)` → `y (g − Σ_segment g y)`.
pub(crate) fn softmax_backward(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    csr: &Csr<'_>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let cols: usize = l1.dims()[1..].iter().product();
    let out = match (s1.dtype(), s2.dtype()) {
        (DType::F32, DType::F32) => softmax_backward_typed::<f32>((s1, l1), (s2, l2), csr, cols)?,
        (DType::F64, DType::F64) => softmax_backward_typed::<f64>((s1, l1), (s2, l2), csr, cols)?,
        _ => candle_core::bail!("segment-softmax-backward: y and g must both be f32 or f64"),
    };
    Ok((out, l1.shape().clone()))
}

fn weighted_sum_typed<T: CudaFloat>(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    csr: &Csr<'_>,
    heads: usize,
    (k, hv): (usize, usize),
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "segment-weighted-sum";
    let dev = &x.device;
    let (xv, wv) = (view::<T>(x, lx, NAME)?, view::<T>(w, lw, NAME)?);
    let row = k * hv;
    let total = csr.num_segments * row;
    // SAFETY: the kernel writes every one of the `total` outputs.
    let mut out = unsafe { super::uninit::<T>(dev, total) }?;
    if total > 0 {
        let arrays = csr.on_device(dev)?;
        let has_order = i32::from(csr.order.is_some());
        let t = long(total);
        let (r, c, v, h) = (
            int(row, "row")?,
            int(hv, "channels")?,
            int(hv / heads, "head channels")?,
            int(heads, "heads")?,
        );
        let func = kernel::<T>(dev, SEGMENT, "segment_weighted_sum")?;
        let mut b = func.builder();
        b.arg(&t)
            .arg(&r)
            .arg(&c)
            .arg(&v)
            .arg(&h)
            .arg(&arrays.offsets)
            .arg(&arrays.order)
            .arg(&has_order)
            .arg(&xv)
            .arg(&wv)
            .arg(&mut out);
        // SAFETY: offsets bound `order` (items entries); x holds items × row, w items × heads,
        // out num_segments × row.
        unsafe { b.launch(launch_cfg(total)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of the head-weighted segment sum (`segment::weighted`): values `[E, K, H·V]`
/// and weights `[E, H]` → `[S, K, H·V]`.
pub(crate) fn weighted_sum(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    csr: &Csr<'_>,
    heads: usize,
    k: usize,
    hv: usize,
) -> candle_core::Result<CudaStorage> {
    match (x.0.dtype(), w.0.dtype()) {
        (DType::F32, DType::F32) => weighted_sum_typed::<f32>(x, w, csr, heads, (k, hv)),
        (DType::F64, DType::F64) => weighted_sum_typed::<f64>(x, w, csr, heads, (k, hv)),
        _ => candle_core::bail!("segment-weighted-sum: values and weights must be f32 or f64"),
    }
}

fn weighted_sum_backward_typed<T: CudaFloat>(
    [(x, lx), (w, lw), (g, lg)]: [(&CudaStorage, &Layout); 3],
    csr: &Csr<'_>,
    heads: usize,
    (k, hv): (usize, usize),
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "segment-weighted-sum-backward";
    let dev = &x.device;
    let (xv, wv, gv) = (
        view::<T>(x, lx, NAME)?,
        view::<T>(w, lw, NAME)?,
        view::<T>(g, lg, NAME)?,
    );
    let items = csr.index.len();
    let row = k * hv;
    let (n_dx, n_dw) = (items * row, items * heads);
    // SAFETY: the two kernels write all of [∂values | ∂weights].
    let mut out = unsafe { super::uninit::<T>(dev, n_dx + n_dw) }?;
    if n_dx + n_dw > 0 {
        let arrays = csr.on_device(dev)?;
        let (r, kk, c, v, h) = (
            int(row, "row")?,
            int(k, "rows")?,
            int(hv, "channels")?,
            int(hv / heads, "head channels")?,
            int(heads, "heads")?,
        );
        if n_dx > 0 {
            let t = long(n_dx);
            let func = kernel::<T>(dev, SEGMENT, "segment_weighted_sum_dx")?;
            let mut b = func.builder();
            b.arg(&t)
                .arg(&r)
                .arg(&c)
                .arg(&v)
                .arg(&h)
                .arg(&arrays.index)
                .arg(&wv)
                .arg(&gv)
                .arg(&mut out);
            // SAFETY: index has `items` entries < num_segments; w items × heads; g
            // num_segments × row; out starts with items × row.
            unsafe { b.launch(launch_cfg(n_dx)) }.w()?;
        }
        let pairs = long(n_dw);
        let mut dw = out.slice_mut(n_dx..);
        let func = kernel::<T>(dev, SEGMENT, "segment_weighted_sum_dw")?;
        let mut b = func.builder();
        b.arg(&pairs)
            .arg(&kk)
            .arg(&c)
            .arg(&v)
            .arg(&h)
            .arg(&arrays.index)
            .arg(&xv)
            .arg(&gv)
            .arg(&mut dw);
        // SAFETY: one warp per (item, head) pair; x items × row, g num_segments × row, dw
        // items × heads.
        unsafe { b.launch(launch_cfg(n_dw * 32)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of the head-weighted segment sum's backward: (values, weights, `∂out`) → the
/// flat `[∂values | ∂weights]`.
pub(crate) fn weighted_sum_backward(
    inputs: [(&CudaStorage, &Layout); 3],
    csr: &Csr<'_>,
    heads: usize,
    k: usize,
    hv: usize,
) -> candle_core::Result<CudaStorage> {
    let dtypes = inputs.map(|(s, _)| s.dtype());
    match dtypes {
        [DType::F32, DType::F32, DType::F32] => {
            weighted_sum_backward_typed::<f32>(inputs, csr, heads, (k, hv))
        }
        [DType::F64, DType::F64, DType::F64] => {
            weighted_sum_backward_typed::<f64>(inputs, csr, heads, (k, hv))
        }
        _ => candle_core::bail!("segment-weighted-sum-backward: inputs must all be f32 or f64"),
    }
}
