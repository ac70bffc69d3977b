//! Elementwise ops on the device (`kernels/elementwise.cu`): activations and their
//! derivatives, SchNet's shifted softplus, the Gaussian smearing, and the optimiser's kernels
//! (the in-place AdamW halves and partial sums of squares per tensor, and their multi-tensor
//! forms over every variable in one launch).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Shape, Storage, Tensor};

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

/// The scalars of one AdamW step (see [`adamw_param`]), in f64; each kernel casts them to the
/// parameters' dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// First-moment decay β₁.
    pub beta1: f64,
    /// Second-moment decay β₂.
    pub beta2: f64,
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight-decay factor `1 − lr · weight_decay`.
    pub decay: f64,
    /// Bias correction `1 − β₁ᵗ`.
    pub correction1: f64,
    /// Bias correction `1 − β₂ᵗ`.
    pub correction2: f64,
    /// Denominator floor.
    pub eps: f64,
}

impl AdamWScalars {
    /// The AdamW kernels' trailing arguments in the kernel type: β₁, 1 − β₁, β₂, 1 − β₂, lr,
    /// decay, 1/c₁, 1/c₂, eps.
    fn kernel_args<T: CudaFloat>(&self) -> [T; 9] {
        [
            self.beta1,
            1.0 - self.beta1,
            self.beta2,
            1.0 - self.beta2,
            self.lr,
            self.decay,
            1.0 / self.correction1,
            1.0 / self.correction2,
            self.eps,
        ]
        .map(T::from_f64)
    }
}

/// A contiguous float storage's elements as a mutable device slice (its layout's range).
fn slice_mut<'a, T: CudaFloat>(
    s: &'a mut CudaStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(start..end)),
        None => candle_core::bail!("{op}: the tensor written in place must be contiguous"),
    }
}

fn adamw_param_typed<T: CudaFloat>(
    (theta, lt): (&mut CudaStorage, &Layout),
    (mv, lm): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    h: AdamWScalars,
) -> candle_core::Result<()> {
    const NAME: &str = "adamw-param";
    let dev = theta.device.clone();
    let (mvv, gv) = (view::<T>(mv, lm, NAME)?, view::<T>(g, lg, NAME)?);
    let mut t = slice_mut::<T>(theta, lt, NAME)?;
    let n = t.len();
    if mvv.len() != 2 * n || gv.len() != n {
        candle_core::bail!(
            "{NAME}: {n} parameters, {} moments, {} gradients",
            mvv.len(),
            gv.len()
        );
    }
    if n == 0 {
        return Ok(());
    }
    let scalars = h.kernel_args::<T>();
    let func = kernel::<T>(&dev, ELEMENTWISE, "adamw_param")?;
    let nn = long(n);
    let mut b = func.builder();
    b.arg(&nn);
    for v in &scalars {
        b.arg(v);
    }
    b.arg(&mut t).arg(&mvv).arg(&gv);
    // SAFETY: theta and g hold n elements, mv 2n; the scalars match the kernel's parameters.
    unsafe { b.launch(launch_cfg(n)) }.w()?;
    Ok(())
}

/// The parameter half of an in-place AdamW step on the device: `theta` (contiguous, `n`) from
/// the moments `mv = [m | v]` before this step (`2n`) and the gradient `g` (`n`). Run it
/// before [`adamw_moments`] on the same `mv`.
///
/// # Errors
/// Mismatched lengths or dtypes (f32 and f64 only), a non-contiguous `theta`, a CUDA error.
pub fn adamw_param(
    theta: (&mut CudaStorage, &Layout),
    mv: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    h: AdamWScalars,
) -> candle_core::Result<()> {
    match (theta.0.dtype(), mv.0.dtype(), g.0.dtype()) {
        (DType::F32, DType::F32, DType::F32) => adamw_param_typed::<f32>(theta, mv, g, h),
        (DType::F64, DType::F64, DType::F64) => adamw_param_typed::<f64>(theta, mv, g, h),
        _ => candle_core::bail!(
            "adamw-param: parameters, moments and gradient must all be f32 or f64"
        ),
    }
}

fn adamw_moments_typed<T: CudaFloat>(
    (mv, lm): (&mut CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    (beta1, beta2): (f64, f64),
) -> candle_core::Result<()> {
    const NAME: &str = "adamw-moments";
    let dev = mv.device.clone();
    let gv = view::<T>(g, lg, NAME)?;
    let mut m = slice_mut::<T>(mv, lm, NAME)?;
    let n = gv.len();
    if m.len() != 2 * n {
        candle_core::bail!("{NAME}: {} moments for {n} gradients", m.len());
    }
    if n == 0 {
        return Ok(());
    }
    let s = |v: f64| T::from_f64(v);
    let (b1, om1, b2, om2) = (s(beta1), s(1.0 - beta1), s(beta2), s(1.0 - beta2));
    let func = kernel::<T>(&dev, ELEMENTWISE, "adamw_moments")?;
    let nn = long(n);
    let mut b = func.builder();
    b.arg(&nn)
        .arg(&b1)
        .arg(&om1)
        .arg(&b2)
        .arg(&om2)
        .arg(&mut m)
        .arg(&gv);
    // SAFETY: mv holds 2n elements, g n.
    unsafe { b.launch(launch_cfg(n)) }.w()?;
    Ok(())
}

/// The moments half of an in-place AdamW step on the device: `mv = [m | v]` (contiguous,
/// `2n`) ← `[β₁ m + (1 − β₁) g | β₂ v + (1 − β₂) g²]`.
///
/// # Errors
/// As [`adamw_param`].
pub fn adamw_moments(
    mv: (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    betas: (f64, f64),
) -> candle_core::Result<()> {
    match (mv.0.dtype(), g.0.dtype()) {
        (DType::F32, DType::F32) => adamw_moments_typed::<f32>(mv, g, betas),
        (DType::F64, DType::F64) => adamw_moments_typed::<f64>(mv, g, betas),
        _ => candle_core::bail!("adamw-moments: moments and gradient must both be f32 or f64"),
    }
}

/// Blocks (partials) per tensor of [`sum_squares_partials`].
pub const SUM_SQUARES_BLOCKS: usize = 64;

fn sum_squares_typed<T: CudaFloat>(
    (dst, ld): (&mut CudaStorage, &Layout),
    (x, lx): (&CudaStorage, &Layout),
    slot: usize,
) -> candle_core::Result<()> {
    const NAME: &str = "sum-squares";
    let dev = dst.device.clone();
    let xv = view::<T>(x, lx, NAME)?;
    let mut out = slice_mut::<f64>(dst, ld, NAME)?;
    let at = slot * SUM_SQUARES_BLOCKS;
    if out.len() < at + SUM_SQUARES_BLOCKS {
        candle_core::bail!("{NAME}: slot {slot} beyond {} partials", out.len());
    }
    let func = kernel::<T>(&dev, ELEMENTWISE, "sum_squares_partials")?;
    let (n, a) = (long(xv.len()), long(at));
    let mut b = func.builder();
    b.arg(&n).arg(&a).arg(&xv).arg(&mut out);
    let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (SUM_SQUARES_BLOCKS as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds n elements; out has SUM_SQUARES_BLOCKS entries from `at`; the kernel's
    // shared reduction assumes 256 threads per block, as launched.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Writes the [`SUM_SQUARES_BLOCKS`] partial sums of `x²` (in f64, deterministic) of the f32 or
/// f64 tensor `x` into `dst[slot · SUM_SQUARES_BLOCKS ..]` (f64): one launch per tensor of a
/// gradient norm, read back once for all tensors.
///
/// # Errors
/// `dst` not f64, contiguous and long enough; `x` not f32/f64 or not contiguous; CUDA errors.
pub fn sum_squares_partials(
    dst: (&mut CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
    slot: usize,
) -> candle_core::Result<()> {
    if dst.0.dtype() != DType::F64 {
        candle_core::bail!("sum-squares: the partials must be f64");
    }
    match x.0.dtype() {
        DType::F32 => sum_squares_typed::<f32>(dst, x, slot),
        DType::F64 => sum_squares_typed::<f64>(dst, x, slot),
        other => candle_core::bail!("sum-squares: f32 or f64 input, got {other:?}"),
    }
}

/// The device address of the first element of a contiguous `T` tensor on `dev`'s stream.
///
/// The address outlives the storage guard taken here: the multi-tensor kernels read and write
/// through it on candle's stream, where every later use or free of the storage is ordered after
/// them (the callers hold the tensors for the call; candle frees device memory stream-ordered).
fn device_address<T: CudaFloat>(
    t: &Tensor,
    stream: &CudaStream,
    what: &str,
) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: every tensor must be contiguous");
    };
    let Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("{what}: every tensor must be on the CUDA device");
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let (ptr, _read) = slice.device_ptr(stream);
    Ok(ptr + (start * std::mem::size_of::<T>()) as u64)
}

/// The CUDA device of the first tensor, checked against all the others.
fn common_device(tensors: &[&Tensor], what: &str) -> candle_core::Result<CudaDevice> {
    let Some(first) = tensors.first().map(|t| t.device()) else {
        candle_core::bail!("{what}: no tensors");
    };
    let Device::Cuda(dev) = first else {
        candle_core::bail!("{what}: the tensors must be on a CUDA device");
    };
    if !tensors.iter().all(|t| t.device().same_device(first)) {
        candle_core::bail!("{what}: the tensors must all be on one CUDA device");
    }
    Ok(dev.clone())
}

fn adamw_multi_typed<T: CudaFloat>(
    dev: &CudaDevice,
    (params, moments, grads): (&[&Tensor], &[&Tensor], &[&Tensor]),
    grad_scale: f64,
    h: AdamWScalars,
) -> candle_core::Result<()> {
    const NAME: &str = "adamw-multi";
    let stream = dev.cuda_stream();
    let mut starts = vec![0i64];
    let mut ptrs = Vec::with_capacity(3 * params.len());
    for ((p, mv), g) in params.iter().zip(moments).zip(grads) {
        let n = p.elem_count();
        if mv.elem_count() != 2 * n || g.elem_count() != n {
            candle_core::bail!(
                "{NAME}: {n} parameters with {} moments and {} gradients",
                mv.elem_count(),
                g.elem_count()
            );
        }
        for t in [p, mv, g] {
            ptrs.push(device_address::<T>(t, &stream, NAME)?);
        }
        starts.push(starts[starts.len() - 1] + long(n));
    }
    let total = starts[starts.len() - 1];
    if total == 0 {
        return Ok(());
    }
    let (starts_d, ptrs_d) = (upload(dev, &starts)?, upload(dev, &ptrs)?);
    let func = kernel::<T>(dev, ELEMENTWISE, "adamw_multi")?;
    let tensors = int(params.len(), "tensors")?;
    let (scale, scalars) = (T::from_f64(grad_scale), h.kernel_args::<T>());
    let mut b = func.builder();
    b.arg(&total)
        .arg(&tensors)
        .arg(&starts_d)
        .arg(&ptrs_d)
        .arg(&scale);
    for v in &scalars {
        b.arg(v);
    }
    // SAFETY: the tables describe `tensors` contiguous device tensors of the checked sizes
    // (θ n, [m | v] 2n, g n elements at the uploaded addresses), alive for the launch.
    unsafe { b.launch(launch_cfg(total as usize)) }.w()?;
    Ok(())
}

/// AdamW on many variables in one launch (`adamw_multi` of `kernels/elementwise.cu`): for
/// every `k`, the parameter `params[k]` and its packed moments `moments[k]` (`[m | v]`, twice
/// its size) are updated in place from `grads[k] · grad_scale`, with the arithmetic of
/// [`adamw_param`] + [`adamw_moments`]. All contiguous, f32 or f64 alike, on one CUDA device.
///
/// Writes through the tensors' device addresses (as PyTorch's multi-tensor apply does): the
/// caller must own the parameters and moments (no other tensor may be reading them in a way
/// that expects them unchanged).
///
/// # Errors
/// Mismatched lengths, sizes, dtypes or devices, a non-contiguous tensor, or a launch failure.
pub fn adamw_multi(
    params: &[&Tensor],
    moments: &[&Tensor],
    grads: &[&Tensor],
    grad_scale: f64,
    h: AdamWScalars,
) -> candle_core::Result<()> {
    const NAME: &str = "adamw-multi";
    if moments.len() != params.len() || grads.len() != params.len() {
        candle_core::bail!(
            "{NAME}: {} parameters, {} moments, {} gradients",
            params.len(),
            moments.len(),
            grads.len()
        );
    }
    if params.is_empty() {
        return Ok(());
    }
    let all: Vec<&Tensor> = params.iter().chain(moments).chain(grads).copied().collect();
    let dev = common_device(&all, NAME)?;
    let dtype = params[0].dtype();
    if all.iter().any(|t| t.dtype() != dtype) {
        candle_core::bail!("{NAME}: parameters, moments and gradients must share one dtype");
    }
    match dtype {
        DType::F32 => adamw_multi_typed::<f32>(&dev, (params, moments, grads), grad_scale, h),
        DType::F64 => adamw_multi_typed::<f64>(&dev, (params, moments, grads), grad_scale, h),
        other => candle_core::bail!("{NAME}: f32 or f64, not {other:?}"),
    }
}

/// Blocks (partials) of [`sum_squares_multi`] at most.
const SUM_SQUARES_MULTI_BLOCKS: usize = 1024;

fn sum_squares_multi_typed<T: CudaFloat>(
    dev: &CudaDevice,
    xs: &[&Tensor],
) -> candle_core::Result<f64> {
    const NAME: &str = "sum-squares-multi";
    let stream = dev.cuda_stream();
    let mut starts = vec![0i64];
    let mut ptrs = Vec::with_capacity(xs.len());
    for x in xs {
        ptrs.push(device_address::<T>(x, &stream, NAME)?);
        starts.push(starts[starts.len() - 1] + long(x.elem_count()));
    }
    let total = starts[starts.len() - 1] as usize;
    if total == 0 {
        return Ok(0.0);
    }
    let blocks = total.div_ceil(256).clamp(1, SUM_SQUARES_MULTI_BLOCKS);
    let (starts_d, ptrs_d) = (upload(dev, &starts)?, upload(dev, &ptrs)?);
    // SAFETY: every one of the `blocks` partials is written by its block.
    let mut partial = unsafe { super::uninit::<f64>(dev, blocks) }?;
    let func = kernel::<T>(dev, ELEMENTWISE, "sum_squares_multi")?;
    let (tl, tensors) = (long(total), int(xs.len(), "tensors")?);
    let mut b = func.builder();
    b.arg(&tl)
        .arg(&tensors)
        .arg(&starts_d)
        .arg(&ptrs_d)
        .arg(&mut partial);
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(blocks).expect("at most 1024 blocks"), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the tables describe contiguous device tensors alive for the launch; the kernel
    // reduces over 256 threads per block and writes `blocks` partials.
    unsafe { b.launch(cfg) }.w()?;
    let host = dev.clone_dtoh(&partial)?;
    Ok(host[..blocks].iter().sum())
}

/// `Σ_k Σ x_k²` in f64 over many tensors in one launch (`sum_squares_multi`): per-block partial
/// sums over the flattened elements, read back in one copy and added in order (deterministic).
/// All contiguous, f32 or f64 alike, on one CUDA device.
///
/// # Errors
/// Mixed dtypes or devices, a non-contiguous tensor, or a launch failure.
pub fn sum_squares_multi(xs: &[&Tensor]) -> candle_core::Result<f64> {
    const NAME: &str = "sum-squares-multi";
    if xs.is_empty() {
        return Ok(0.0);
    }
    let dev = common_device(xs, NAME)?;
    let dtype = xs[0].dtype();
    if xs.iter().any(|t| t.dtype() != dtype) {
        candle_core::bail!("{NAME}: the tensors must share one dtype");
    }
    match dtype {
        DType::F32 => sum_squares_multi_typed::<f32>(&dev, xs),
        DType::F64 => sum_squares_multi_typed::<f64>(&dev, xs),
        other => candle_core::bail!("{NAME}: f32 or f64, not {other:?}"),
    }
}
