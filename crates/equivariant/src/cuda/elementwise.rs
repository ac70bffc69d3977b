//! Elementwise ops on the device (`kernels/elementwise.cu`): activations and their
//! derivatives, SchNet's shifted softplus, the Gaussian smearing.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Shape};

use super::{cast, int, kernel, launch_cfg, long, upload, view, zeros, CudaFloat, ELEMENTWISE};

/// An elementwise function of the `activation` kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Activation {
    /// SiLU.
    Silu,
    /// Logistic sigmoid.
    Sigmoid,
    /// fairchem's smooth leaky ReLU with the given negative slope.
    SmoothLeakyRelu(f64),
}

/// Runs `kernel_name(n, ints..., [slope,] x, out)` over the contiguous input.
fn map_typed<T: CudaFloat>(
    s: &CudaStorage,
    l: &Layout,
    name: &str,
    kernel_name: &str,
    ints: &[i32],
    slope: Option<T>,
) -> candle_core::Result<CudaStorage> {
    let dev = &s.device;
    let x = view::<T>(s, l, name)?;
    let n = x.len();
    let mut out = zeros::<T>(dev, n)?;
    if n > 0 {
        let func = kernel::<T>(dev, ELEMENTWISE, kernel_name)?;
        let nn = long(n);
        let mut b = func.builder();
        b.arg(&nn);
        for i in ints {
            b.arg(i);
        }
        if let Some(slope) = &slope {
            b.arg(slope);
        }
        b.arg(&x).arg(&mut out);
        // SAFETY: x and out hold n elements; the scalar arguments match the kernel.
        unsafe { b.launch(launch_cfg(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `activation::Elementwise`: the `order`-th derivative of `function`.
pub(crate) fn activation(
    s: &CudaStorage,
    l: &Layout,
    function: Activation,
    order: u8,
    name: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (code, slope) = match function {
        Activation::Silu => (0i32, 0.0),
        Activation::Sigmoid => (1, 0.0),
        Activation::SmoothLeakyRelu(slope) => (2, slope),
    };
    let order = i32::from(order.min(2));
    let ints = [code, order];
    let out = match s.dtype() {
        DType::F32 => map_typed::<f32>(s, l, name, "activation", &ints, Some(slope as f32))?,
        DType::F64 => map_typed::<f64>(s, l, name, "activation", &ints, Some(slope))?,
        other => candle_core::bail!("{name}: unsupported dtype {other:?}"),
    };
    Ok((out, l.shape().clone()))
}

/// `cuda_fwd` of SchNet's `ShiftedSoftplusOp` (f32 and f64).
pub fn shifted_softplus(
    s: &CudaStorage,
    l: &Layout,
    order: u8,
    name: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let order = i32::from(order.min(2));
    let out = match s.dtype() {
        DType::F32 => map_typed::<f32>(s, l, name, "shifted_softplus", &[order], None)?,
        DType::F64 => map_typed::<f64>(s, l, name, "shifted_softplus", &[order], None)?,
        other => candle_core::bail!("{name}: the CUDA kernel supports f32 and f64, not {other:?}"),
    };
    Ok((out, l.shape().clone()))
}

fn smearing_typed<T: CudaFloat>(
    s: &CudaStorage,
    l: &Layout,
    offsets: &[f64],
    coeff: f64,
) -> candle_core::Result<CudaStorage> {
    let dev = &s.device;
    let d = view::<T>(s, l, "gaussian-smearing")?;
    let k = offsets.len();
    let total = d.len() * k;
    let mut out = zeros::<T>(dev, total)?;
    if total > 0 {
        let mu = upload(dev, &cast::<T>(offsets))?;
        let func = kernel::<T>(dev, ELEMENTWISE, "gaussian_smearing")?;
        let (t, kk, c) = (long(total), int(k, "centres")?, T::from_f64(coeff));
        let mut b = func.builder();
        b.arg(&t).arg(&kk).arg(&c).arg(&d).arg(&mu).arg(&mut out);
        // SAFETY: d has total / k elements, mu k, out total.
        unsafe { b.launch(launch_cfg(total)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `radial::SmearingOp`: distances `[E]` → `[E, K]`.
pub(crate) fn gaussian_smearing(
    s: &CudaStorage,
    l: &Layout,
    offsets: &[f64],
    coeff: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let e = l.shape().elem_count();
    let out = match s.dtype() {
        DType::F32 => smearing_typed::<f32>(s, l, offsets, coeff)?,
        DType::F64 => smearing_typed::<f64>(s, l, offsets, coeff)?,
        _ => candle_core::bail!("gaussian-smearing: only f32 and f64 are supported"),
    };
    Ok((out, Shape::from((e, offsets.len()))))
}
