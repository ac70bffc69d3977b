//! LayerNorm + activation (+ per-row dot) on the device (`kernels/norm.cu`): the CUDA side of
//! `norm_act.rs`, one warp per row forward and backward, weight gradients summed per warp and
//! then across warps in a fixed order (deterministic).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout};

use super::{int, kernel, launch_cfg, long, uninit, view, CudaFloat, NORM};
use crate::activation::Function;

/// Rows per warp of the backward pass: enough rows that the cross-warp sum of the weight
/// gradients is short, few enough that every SM gets warps at EquiformerV2's row counts.
const ROWS_PER_WARP: usize = 32;

/// The kernels' activation code (`-1` none, else `activation`'s function) and slope.
fn act_code(act: Option<Function>) -> (i32, f64) {
    match act {
        None => (-1, 0.0),
        Some(Function::Silu) => (0, 0.0),
        Some(Function::Sigmoid) => (1, 0.0),
        Some(Function::SmoothLeakyRelu(slope)) => (2, slope),
    }
}

/// The LayerNorm's parameters shared by every kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NormAct {
    /// Row width `A`.
    pub(crate) width: usize,
    /// The activation after the affine map.
    pub(crate) act: Option<Function>,
    /// Variance epsilon.
    pub(crate) eps: f64,
}

fn forward_typed<T: CudaFloat>(
    [(x, lx), (w, lw), (b, lb)]: [(&CudaStorage, &Layout); 3],
    p: NormAct,
    heads: usize,
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "layer-norm-act";
    let dev = &x.device;
    let (xv, wv, bv) = (
        view::<T>(x, lx, NAME)?,
        view::<T>(w, lw, NAME)?,
        view::<T>(b, lb, NAME)?,
    );
    let rows = xv.len().checked_div(p.width).unwrap_or(0);
    let out_len = if heads == 0 { xv.len() } else { rows };
    // SAFETY: one warp per row writes the row's outputs.
    let mut out = unsafe { uninit::<T>(dev, out_len) }?;
    if rows > 0 {
        let (code, slope) = act_code(p.act);
        let (r, a, s, e) = (
            long(rows),
            int(p.width, "row width")?,
            T::from_f64(slope),
            T::from_f64(p.eps),
        );
        if heads == 0 {
            let func = kernel::<T>(dev, NORM, "ln_act_forward")?;
            let mut l = func.builder();
            l.arg(&r)
                .arg(&a)
                .arg(&code)
                .arg(&s)
                .arg(&e)
                .arg(&xv)
                .arg(&wv)
                .arg(&bv)
                .arg(&mut out);
            // SAFETY: x and out hold rows × A, w and b A values.
            unsafe { l.launch(launch_cfg(rows * 32)) }.w()?;
        } else {
            let h = int(heads, "heads")?;
            let func = kernel::<T>(dev, NORM, "ln_act_dot_forward")?;
            let mut l = func.builder();
            l.arg(&r)
                .arg(&a)
                .arg(&h)
                .arg(&code)
                .arg(&s)
                .arg(&e)
                .arg(&xv)
                .arg(&wv)
                .arg(&bv)
                .arg(&mut out);
            // SAFETY: x holds rows × A, wb 2A values, dot H × A, out rows.
            unsafe { l.launch(launch_cfg(rows * 32)) }.w()?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `LayerNormAct` (args x, weight, bias; `heads == 0`) or of `LayerNormActDot`
/// (args x, `[weight ‖ bias]`, dot `[H, A]`; `heads = H`, one output per row).
pub(crate) fn forward(
    inputs: [(&CudaStorage, &Layout); 3],
    p: NormAct,
    heads: usize,
) -> candle_core::Result<CudaStorage> {
    match inputs.map(|(s, _)| s.dtype()) {
        [DType::F32, DType::F32, DType::F32] => forward_typed::<f32>(inputs, p, heads),
        [DType::F64, DType::F64, DType::F64] => forward_typed::<f64>(inputs, p, heads),
        _ => candle_core::bail!("layer-norm-act: inputs must all be f32 or all f64"),
    }
}

fn backward_typed<T: CudaFloat>(
    [(x, lx), (g, lg), (packed, lp)]: [(&CudaStorage, &Layout); 3],
    p: NormAct,
    heads: usize,
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "layer-norm-act-backward";
    let dev = &x.device;
    let (xv, gv, pv) = (
        view::<T>(x, lx, NAME)?,
        view::<T>(g, lg, NAME)?,
        view::<T>(packed, lp, NAME)?,
    );
    let n = xv.len();
    let rows = n.checked_div(p.width).unwrap_or(0);
    let width = 2 * p.width + heads * p.width;
    if rows == 0 {
        // No rows: the weight gradients are zero.
        let out = super::zeros::<T>(dev, n + width)?;
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    // SAFETY: the row kernel writes dx, the reduction every weight-gradient entry.
    let mut out = unsafe { uninit::<T>(dev, n + width) }?;
    let warps = rows.div_ceil(ROWS_PER_WARP);
    // SAFETY: every warp zeroes its own partial row before adding to it.
    let mut partial = unsafe { uninit::<T>(dev, warps * width) }?;
    let (code, slope) = act_code(p.act);
    let (r, a, h, rpw) = (
        long(rows),
        int(p.width, "row width")?,
        int(heads, "heads")?,
        int(ROWS_PER_WARP, "rows per warp")?,
    );
    let (s, e) = (T::from_f64(slope), T::from_f64(p.eps));
    {
        let func = kernel::<T>(dev, NORM, "ln_act_backward_rows")?;
        let mut dx = out.slice_mut(..n);
        let mut l = func.builder();
        l.arg(&r)
            .arg(&a)
            .arg(&h)
            .arg(&rpw)
            .arg(&code)
            .arg(&s)
            .arg(&e)
            .arg(&xv)
            .arg(&gv)
            .arg(&pv)
            .arg(&mut dx)
            .arg(&mut partial);
        // SAFETY: x and dx hold rows × A, g rows × A (heads = 0) or rows, packed 2A + H·A,
        // partial warps × width; one warp per `rpw` rows.
        unsafe { l.launch(launch_cfg(warps * 32)) }.w()?;
    }
    let func = kernel::<T>(dev, NORM, "ln_act_reduce")?;
    let (wd, wp) = (long(width), long(warps));
    let mut tail = out.slice_mut(n..);
    let mut l = func.builder();
    l.arg(&wd).arg(&wp).arg(&partial).arg(&mut tail);
    // SAFETY: partial holds warps × width, tail width values.
    unsafe { l.launch(launch_cfg(width)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of the backward ops: (x, `∂out`, `[weight ‖ bias (‖ dot)]`) → the flat
/// `[dx | dw | db (| ddot)]`; `heads == 0` for `LayerNormActBackward` (`∂out` `[rows, A]`),
/// `H` for `LayerNormActDotBackward` (`∂out` `[rows]`).
pub(crate) fn backward(
    inputs: [(&CudaStorage, &Layout); 3],
    p: NormAct,
    heads: usize,
) -> candle_core::Result<CudaStorage> {
    match inputs.map(|(s, _)| s.dtype()) {
        [DType::F32, DType::F32, DType::F32] => backward_typed::<f32>(inputs, p, heads),
        [DType::F64, DType::F64, DType::F64] => backward_typed::<f64>(inputs, p, heads),
        _ => candle_core::bail!("layer-norm-act-backward: inputs must all be f32 or all f64"),
    }
}
