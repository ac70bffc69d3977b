//! LayerNorm + activation (+ per-row dot) on the device (`kernels/norm.cu`): the CUDA side of
//! `norm_act.rs`, one warp per row forward and backward, weight gradients summed per warp and
//! then across warps in a fixed order (deterministic).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaViewMut, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout};

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
    reduce_partials(dev, &partial, warps, &mut out.slice_mut(n..))?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `ln_act_reduce`: `tail[j] = Σ_w partial[w · width + j]` in warp order (deterministic), the
/// parameter gradients of both backward kernels; `width` is `tail`'s length.
fn reduce_partials<T: CudaFloat>(
    dev: &CudaDevice,
    partial: &CudaSlice<T>,
    warps: usize,
    tail: &mut CudaViewMut<'_, T>,
) -> candle_core::Result<()> {
    let width = tail.len();
    let func = kernel::<T>(dev, NORM, "ln_act_reduce")?;
    let (wd, wp) = (long(width), long(warps));
    let mut l = func.builder();
    l.arg(&wd).arg(&wp).arg(partial).arg(tail);
    // SAFETY: partial holds warps × width values, tail width.
    unsafe { l.launch(launch_cfg(width)) }.w()?;
    Ok(())
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

/// The shape and constants of EquiformerV2's `layer_norm_sh` (norms.rs `LayerNormShOp`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NormSh<'a> {
    /// Rows per node, `(lmax + 1)²`.
    pub(crate) k: usize,
    /// Channels.
    pub(crate) c: usize,
    /// Variance epsilon.
    pub(crate) eps: f64,
    /// `a_r` of rows `1..K`.
    pub(crate) row_coef: &'a [f64],
    /// Row of the per-degree weight for rows `1..K`.
    pub(crate) weight_row: &'a [usize],
}

/// Nodes per warp of the `layer_norm_sh` backward.
const NODES_PER_WARP: usize = 4;

/// The device copies of `row_coef` and `weight_row`.
fn sh_tables(
    dev: &CudaDevice,
    sh: NormSh<'_>,
) -> candle_core::Result<(CudaSlice<f64>, CudaSlice<i32>)> {
    let rows = sh
        .weight_row
        .iter()
        .map(|&r| int(r, "weight row"))
        .collect::<candle_core::Result<Vec<i32>>>()?;
    Ok((super::upload(dev, sh.row_coef)?, super::upload(dev, &rows)?))
}

fn sh_forward_typed<T: CudaFloat>(
    (x, lx): (&CudaStorage, &Layout),
    (p, lp): (&CudaStorage, &Layout),
    sh: NormSh<'_>,
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "layer-norm-sh";
    let dev = &x.device;
    let (xv, pv) = (view::<T>(x, lx, NAME)?, view::<T>(p, lp, NAME)?);
    let nodes = xv.len().checked_div(sh.k * sh.c).unwrap_or(0);
    // SAFETY: one warp per node writes all of its K × C outputs.
    let mut out = unsafe { uninit::<T>(dev, xv.len()) }?;
    if nodes > 0 {
        let (coef, rows) = sh_tables(dev, sh)?;
        let func = kernel::<T>(dev, NORM, "ln_sh_forward")?;
        let (n, k, c, e) = (
            long(nodes),
            int(sh.k, "rows")?,
            int(sh.c, "channels")?,
            T::from_f64(sh.eps),
        );
        let mut l = func.builder();
        l.arg(&n)
            .arg(&k)
            .arg(&c)
            .arg(&e)
            .arg(&xv)
            .arg(&pv)
            .arg(&coef)
            .arg(&rows)
            .arg(&mut out);
        // SAFETY: x and out hold nodes × K × C, p (2 + lmax) × C, the tables K − 1 entries.
        unsafe { l.launch(launch_cfg(nodes * 32)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `LayerNormShOp`: `(x [N, K, C], [γ₀ | β₀ | w])` → `[N, K, C]`.
pub(crate) fn sh_forward(
    x: (&CudaStorage, &Layout),
    p: (&CudaStorage, &Layout),
    sh: NormSh<'_>,
) -> candle_core::Result<CudaStorage> {
    match (x.0.dtype(), p.0.dtype()) {
        (DType::F32, DType::F32) => sh_forward_typed::<f32>(x, p, sh),
        (DType::F64, DType::F64) => sh_forward_typed::<f64>(x, p, sh),
        _ => candle_core::bail!("layer-norm-sh: x and parameters must both be f32 or f64"),
    }
}

fn sh_backward_typed<T: CudaFloat>(
    [(x, lx), (g, lg), (p, lp)]: [(&CudaStorage, &Layout); 3],
    sh: NormSh<'_>,
) -> candle_core::Result<CudaStorage> {
    const NAME: &str = "layer-norm-sh-backward";
    let dev = &x.device;
    let (xv, gv, pv) = (
        view::<T>(x, lx, NAME)?,
        view::<T>(g, lg, NAME)?,
        view::<T>(p, lp, NAME)?,
    );
    let n = xv.len();
    let width = pv.len();
    let nodes = n.checked_div(sh.k * sh.c).unwrap_or(0);
    if nodes == 0 {
        // No nodes: the parameter gradients are zero.
        return Ok(CudaStorage::wrap_cuda_slice(
            super::zeros::<T>(dev, n + width)?,
            dev.clone(),
        ));
    }
    // SAFETY: the row kernel writes dx, the reduction every parameter-gradient entry.
    let mut out = unsafe { uninit::<T>(dev, n + width) }?;
    let warps = nodes.div_ceil(NODES_PER_WARP);
    // SAFETY: every warp zeroes its own partial row before adding to it.
    let mut partial = unsafe { uninit::<T>(dev, warps * width) }?;
    let (coef, rows) = sh_tables(dev, sh)?;
    {
        let func = kernel::<T>(dev, NORM, "ln_sh_backward_rows")?;
        let (nn, k, c, npw, e, w) = (
            long(nodes),
            int(sh.k, "rows")?,
            int(sh.c, "channels")?,
            int(NODES_PER_WARP, "nodes per warp")?,
            T::from_f64(sh.eps),
            int(width, "parameters")?,
        );
        let mut dx = out.slice_mut(..n);
        let mut l = func.builder();
        l.arg(&nn)
            .arg(&k)
            .arg(&c)
            .arg(&npw)
            .arg(&e)
            .arg(&xv)
            .arg(&gv)
            .arg(&pv)
            .arg(&coef)
            .arg(&rows)
            .arg(&w)
            .arg(&mut dx)
            .arg(&mut partial);
        // SAFETY: x, g and dx hold nodes × K × C, p and each partial row `width`, the tables
        // K − 1 entries; one warp per `npw` nodes.
        unsafe { l.launch(launch_cfg(warps * 32)) }.w()?;
    }
    reduce_partials(dev, &partial, warps, &mut out.slice_mut(n..))?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `cuda_fwd` of `LayerNormShBackward`: `(x, ∂out, [γ₀ | β₀ | w])` → `[∂x | ∂γ₀ | ∂β₀ | ∂w]`.
pub(crate) fn sh_backward(
    inputs: [(&CudaStorage, &Layout); 3],
    sh: NormSh<'_>,
) -> candle_core::Result<CudaStorage> {
    match inputs.map(|(s, _)| s.dtype()) {
        [DType::F32, DType::F32, DType::F32] => sh_backward_typed::<f32>(inputs, sh),
        [DType::F64, DType::F64, DType::F64] => sh_backward_typed::<f64>(inputs, sh),
        _ => candle_core::bail!("layer-norm-sh-backward: inputs must all be f32 or all f64"),
    }
}
