//! Spherical harmonics on the device (`kernels/sh.cu`), forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};

use super::{cast, kernel, long, upload, view, CudaFloat, SH};

/// Vectors per thread block of the forward kernel (its rows are staged in shared memory):
/// 64, or 32 where 64 rows would exceed the 48 KiB of dynamic shared memory a launch gets
/// without opting in (f64 at lmax ≥ 9).
fn vectors_per_block<T>(dim: usize) -> u32 {
    if 64 * dim * std::mem::size_of::<T>() <= 48 * 1024 {
        64
    } else {
        32
    }
}

/// The recurrence tables of `sh.rs` (`Recurrence::<f64>`): `start[m]`, `alpha`/`beta` at
/// `l (lmax + 1) + m`.
pub(crate) struct Recurrence<'a> {
    pub(crate) lmax: usize,
    pub(crate) normalize: bool,
    pub(crate) start: &'a [f64],
    pub(crate) alpha: &'a [f64],
    pub(crate) beta: &'a [f64],
}

fn launch_forward<T: CudaFloat>(
    dev: &CudaDevice,
    xyz: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    n: usize,
    rec: &Recurrence<'_>,
    out: &mut CudaSlice<T>,
) -> candle_core::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let dim = (rec.lmax + 1) * (rec.lmax + 1);
    let start = upload(dev, &cast::<T>(rec.start))?;
    let alpha = upload(dev, &cast::<T>(rec.alpha))?;
    let beta = upload(dev, &cast::<T>(rec.beta))?;
    let func = kernel::<T>(dev, SH, "sh_forward")?;
    let per_block = vectors_per_block::<T>(dim);
    let blocks = n.div_ceil(per_block as usize);
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(blocks).map_err(candle_core::Error::wrap)?,
            1,
            1,
        ),
        block_dim: (per_block, 1, 1),
        shared_mem_bytes: u32::try_from(per_block as usize * dim * std::mem::size_of::<T>())
            .expect("at most 64 rows of at most 144 f64"),
    };
    let (n, lmax, normalize) = (long(n), rec.lmax as i32, i32::from(rec.normalize));
    let mut b = func.builder();
    b.arg(&n).arg(&lmax).arg(&normalize).arg(xyz);
    b.arg(&start).arg(&alpha).arg(&beta).arg(out);
    // SAFETY: `xyz` holds n × 3 and `out` n × dim elements; the tables (lmax + 1)² each.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

fn forward_typed<T: CudaFloat>(
    s: &CudaStorage,
    l: &Layout,
    n: usize,
    rec: &Recurrence<'_>,
) -> candle_core::Result<CudaStorage> {
    let dev = &s.device;
    let xyz = view::<T>(s, l, "spherical-harmonics")?;
    let dim = (rec.lmax + 1) * (rec.lmax + 1);
    let mut out = super::zeros::<T>(dev, n * dim)?;
    launch_forward(dev, &xyz, n, rec, &mut out)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `SphericalHarmonicsOp`: `[n, 3]` → `[n, (lmax+1)²]`.
pub(crate) fn forward(
    s: &CudaStorage,
    l: &Layout,
    rec: &Recurrence<'_>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, three) = l.shape().dims2()?;
    if three != 3 {
        candle_core::bail!(
            "spherical-harmonics: expected [n, 3] input, got {:?}",
            l.shape()
        );
    }
    let dim = (rec.lmax + 1) * (rec.lmax + 1);
    let out = match s.dtype() {
        DType::F32 => forward_typed::<f32>(s, l, n, rec)?,
        DType::F64 => forward_typed::<f64>(s, l, n, rec)?,
        other => candle_core::bail!("spherical-harmonics: unsupported dtype {other:?}"),
    };
    Ok((out, Shape::from((n, dim))))
}

/// `cuda_fwd` of the in-place op: writes into the contiguous `out`.
pub(crate) fn forward_into(
    out: &mut CudaStorage,
    out_l: &Layout,
    s: &CudaStorage,
    l: &Layout,
    rec: &Recurrence<'_>,
) -> candle_core::Result<()> {
    let Some((start, end)) = out_l.contiguous_offsets() else {
        candle_core::bail!("spherical-harmonics-into: output must be contiguous");
    };
    let n = l.shape().elem_count() / 3;
    let dev = s.device.clone();
    match (out.dtype(), s.dtype()) {
        (DType::F32, DType::F32) => {
            let xyz = view::<f32>(s, l, "spherical-harmonics-into")?;
            let mut tmp = super::zeros::<f32>(&dev, end - start)?;
            launch_forward(&dev, &xyz, n, rec, &mut tmp)?;
            let dst = out.as_cuda_slice_mut::<f32>()?;
            dev.memcpy_dtod(&tmp.slice(..end - start), &mut dst.slice_mut(start..end))?;
        }
        (DType::F64, DType::F64) => {
            let xyz = view::<f64>(s, l, "spherical-harmonics-into")?;
            let mut tmp = super::zeros::<f64>(&dev, end - start)?;
            launch_forward(&dev, &xyz, n, rec, &mut tmp)?;
            let dst = out.as_cuda_slice_mut::<f64>()?;
            dev.memcpy_dtod(&tmp.slice(..end - start), &mut dst.slice_mut(start..end))?;
        }
        (o, x) => candle_core::bail!(
            "spherical-harmonics-into: unsupported dtypes {o:?} (output), {x:?} (xyz)"
        ),
    }
    Ok(())
}

fn backward_typed<T: CudaFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    n: usize,
    lmax: usize,
    normalize: bool,
    k: &[f64],
) -> candle_core::Result<CudaStorage> {
    let dev = &s1.device;
    let xyz = view::<T>(s1, l1, "spherical-harmonics-backward")?;
    let grad = view::<T>(s2, l2, "spherical-harmonics-backward")?;
    let mut out = super::zeros::<T>(dev, 3 * n)?;
    if n > 0 {
        let k = upload(dev, k)?;
        let func = kernel::<T>(dev, SH, "sh_backward")?;
        let (nn, lmax, normalize) = (long(n), lmax as i32, i32::from(normalize));
        let mut b = func.builder();
        b.arg(&nn)
            .arg(&lmax)
            .arg(&normalize)
            .arg(&xyz)
            .arg(&grad)
            .arg(&k)
            .arg(&mut out);
        // SAFETY: xyz n × 3, grad n × (lmax+1)², k (lmax+1)², out n × 3 elements.
        unsafe { b.launch(super::launch_cfg(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `ShBackward`: `(xyz [n, 3], grad [n, (lmax+1)²])` → `[n, 3]`; `k` are the
/// normalisation constants `K_lm` at `l (lmax + 1) + m`.
pub(crate) fn backward(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    lmax: usize,
    normalize: bool,
    k: &[f64],
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, _) = l1.shape().dims2()?;
    let (n2, dim) = l2.shape().dims2()?;
    if n2 != n || dim != (lmax + 1) * (lmax + 1) {
        candle_core::bail!(
            "spherical-harmonics-backward: gradient shape {:?} does not match input {:?}",
            l2.shape(),
            l1.shape()
        );
    }
    let out = match (s1.dtype(), s2.dtype()) {
        (DType::F32, DType::F32) => backward_typed::<f32>(s1, l1, s2, l2, n, lmax, normalize, k)?,
        (DType::F64, DType::F64) => backward_typed::<f64>(s1, l1, s2, l2, n, lmax, normalize, k)?,
        (a, b) => {
            candle_core::bail!("spherical-harmonics-backward: unsupported dtypes {a:?}, {b:?}")
        }
    };
    Ok((out, l1.shape().clone()))
}
