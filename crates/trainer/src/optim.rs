//! AdamW with state that can be saved and restored exactly, gradient clipping by global norm,
//! and an exponential moving average of the weights.
//!
//! The update is decoupled AdamW (Loshchilov & Hutter): `θ ← θ − lr·wd·θ`, then
//! `θ ← θ − lr·m̂ / (√v̂ + ε)` with bias-corrected moments. Moments are kept per variable name
//! in the master dtype, so that a checkpoint can store them by name and a resumed run continues
//! bit for bit.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, DType, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator floor.
    pub eps: f64,
    /// Decoupled weight decay (study: 1e-3).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-3,
        }
    }
}

/// The optimiser over a named set of variables.
///
/// f32 and f64 variables (every model's master weights) are updated in place, two kernels per
/// variable ([`UpdateMode::InPlace`]); other dtypes by a dozen tensor ops per variable
/// ([`UpdateMode::PerVariable`]). On the CPU both give bit-identical results.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    vars: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// The update forced to one form; `None`: [`UpdateMode::default_for`] each variable.
    mode: Option<UpdateMode>,
    /// `[m | v]` of a variable packed in one tensor, for [`UpdateMode::InPlace`] (built from
    /// `first` and `second` on first use; `first` and `second` are then views of it).
    packed: Vec<Option<Tensor>>,
    step: u64,
}

/// How [`AdamW::step`] updates a variable. Both give the same numbers on the CPU (bit for
/// bit); they differ in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    /// A dozen tensor ops per variable (any dtype; the written-out reference).
    PerVariable,
    /// Two in-place kernels per variable on its storage and its packed `[m | v]`, one pass
    /// over memory each and no allocation (f32 and f64 on the CPU and on CUDA; on a GPU eqV2-S's
    /// 383 tensors are 766 launches instead of a dozen per tensor).
    InPlace,
    /// [`UpdateMode::InPlace`]'s arithmetic for every variable of the step in one kernel
    /// launch, parameter and moments in one pass (CUDA, f32 and f64; elsewhere it runs as
    /// `InPlace`). On a GPU the per-variable launches, not the memory traffic, are what the
    /// in-place update costs (eqV2-S: 766 launches for 0.9 GB). The default on CUDA, where
    /// the gradient norm of [`global_norm`] also runs as one launch: on an H100 eqV2-S's clip +
    /// AdamW takes 1.0 ms this way against 6.9 ms in place (session 19; PyTorch's fused AdamW
    /// 5.5 ms). `MATSCALE_MULTI_TENSOR=0` turns it off.
    MultiTensor,
}

/// Whether the multi-tensor optimiser kernels run on CUDA: yes unless `MATSCALE_MULTI_TENSOR=0`.
fn multi_tensor_requested() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FROM_ENV.get_or_init(|| !std::env::var("MATSCALE_MULTI_TENSOR").is_ok_and(|v| v.trim() == "0"))
}

impl UpdateMode {
    /// The default for a variable like `t`: in place for f32 and f64 on the CPU and on a
    /// CUDA device (on the CPU 3× faster than per variable and bit-identical to it; on CUDA
    /// [`UpdateMode::MultiTensor`] unless `MATSCALE_MULTI_TENSOR=0`), per variable otherwise.
    pub fn default_for(t: &Tensor) -> Self {
        let float = matches!(t.dtype(), DType::F32 | DType::F64);
        let cuda = cfg!(feature = "cuda") && t.device().is_cuda();
        if float && cuda && multi_tensor_requested() {
            UpdateMode::MultiTensor
        } else if float && (t.device().is_cpu() || cuda) {
            UpdateMode::InPlace
        } else {
            UpdateMode::PerVariable
        }
    }
}

/// The scalars of one AdamW step.
#[derive(Debug, Clone, Copy)]
struct AdamWScalars {
    beta1: f64,
    beta2: f64,
    lr: f64,
    /// `1 − lr · weight_decay`.
    decay: f64,
    correction1: f64,
    correction2: f64,
    eps: f64,
}

#[cfg(feature = "cuda")]
impl From<AdamWScalars> for matscale_equivariant::cuda::AdamWScalars {
    fn from(h: AdamWScalars) -> Self {
        Self {
            beta1: h.beta1,
            beta2: h.beta2,
            lr: h.lr,
            decay: h.decay,
            correction1: h.correction1,
            correction2: h.correction2,
            eps: h.eps,
        }
    }
}

/// The element range of a contiguous layout (`what` names the tensor in the error).
fn contiguous_range(l: &Layout, what: &str) -> candle_core::Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The typed slice of a contiguous CPU storage (`what` names it in errors).
fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    Ok(&T::cpu_storage_as_slice(s)?[contiguous_range(l, what)?])
}

/// The parameter half of the in-place update (dst θ; sources `[m | v]` before the step, `g`):
/// the same arithmetic, in the same order, as [`adamw_update`].
struct AdamWParamOp(AdamWScalars);

/// f32 / f64 for the CPU side of the in-place update.
trait Real:
    candle_core::WithDType
    + std::ops::Mul<Output = Self>
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

fn param_cpu<T: Real>(theta: &mut [T], mv: &[T], g: &[T], h: AdamWScalars) {
    let s = |v: f64| T::from_f64(v);
    let (b1, om1, b2, om2) = (s(h.beta1), s(1.0 - h.beta1), s(h.beta2), s(1.0 - h.beta2));
    let (inv_c1, inv_c2) = (s(1.0 / h.correction1), s(1.0 / h.correction2));
    let (lr, decay, eps) = (s(h.lr), s(h.decay), s(h.eps));
    let n = theta.len();
    let (m, v) = mv.split_at(n);
    for i in 0..n {
        let mi = m[i] * b1 + g[i] * om1;
        let vi = v[i] * b2 + g[i] * g[i] * om2;
        theta[i] = theta[i] * decay - (mi * inv_c1) / ((vi * inv_c2).sqrt() + eps) * lr;
    }
}

impl candle_core::InplaceOp3 for AdamWParamOp {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        mv: &CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let range = contiguous_range(dst_l, "adamw: the variable")?;
        match dst {
            CpuStorage::F32(t) => param_cpu(
                &mut t[range],
                cpu_slice(mv, ml, "adamw: the moments")?,
                cpu_slice(g, gl, "adamw: the gradient")?,
                self.0,
            ),
            CpuStorage::F64(t) => param_cpu(
                &mut t[range],
                cpu_slice(mv, ml, "adamw: the moments")?,
                cpu_slice(g, gl, "adamw: the gradient")?,
                self.0,
            ),
            _ => candle_core::bail!("adamw: in-place update of f32 and f64 only"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        mv: &candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        matscale_equivariant::cuda::adamw_param((dst, dst_l), (mv, ml), (g, gl), self.0.into())
    }
}

/// The moments half of the in-place update (dst `[m | v]`; source `g`).
struct AdamWMomentsOp(AdamWScalars);

fn moments_cpu<T: Real>(mv: &mut [T], g: &[T], h: AdamWScalars) {
    let s = |v: f64| T::from_f64(v);
    let (b1, om1, b2, om2) = (s(h.beta1), s(1.0 - h.beta1), s(h.beta2), s(1.0 - h.beta2));
    let (m, v) = mv.split_at_mut(g.len());
    for i in 0..g.len() {
        m[i] = m[i] * b1 + g[i] * om1;
        v[i] = v[i] * b2 + g[i] * g[i] * om2;
    }
}

impl candle_core::InplaceOp2 for AdamWMomentsOp {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let range = contiguous_range(dst_l, "adamw: the moments")?;
        let g_of = "adamw: the gradient";
        match dst {
            CpuStorage::F32(t) => moments_cpu(&mut t[range], cpu_slice(g, gl, g_of)?, self.0),
            CpuStorage::F64(t) => moments_cpu(&mut t[range], cpu_slice(g, gl, g_of)?, self.0),
            _ => candle_core::bail!("adamw: in-place update of f32 and f64 only"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        matscale_equivariant::cuda::adamw_moments(
            (dst, dst_l),
            (g, gl),
            (self.0.beta1, self.0.beta2),
        )
    }
}

/// One AdamW update: `(θ', m', v')` from `(θ, m, v, g)` (any matching shapes).
fn adamw_update(
    c: &AdamWConfig,
    (theta, m, v, g): (&Tensor, &Tensor, &Tensor, &Tensor),
    lr: f64,
    (correction1, correction2): (f64, f64),
) -> Result<(Tensor, Tensor, Tensor)> {
    let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
    let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    let decayed = (theta * (1.0 - lr * c.weight_decay))?;
    let m_hat = (&m / correction1)?;
    let v_hat = (&v / correction2)?;
    let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
    Ok(((decayed - (update * lr)?)?, m, v))
}

impl AdamW {
    /// An optimiser over `vars` (name, variable), sorted by name for a stable order.
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let first = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        let packed = vec![None; vars.len()];
        Ok(Self {
            config,
            vars,
            first,
            second,
            mode: None,
            packed,
            step: 0,
        })
    }

    /// Forces one form of the update (`None`, the default: [`UpdateMode::default_for`] each
    /// variable). The results are the same up to rounding (on the CPU, exactly); only the
    /// speed differs.
    pub fn set_update_mode(&mut self, mode: Option<UpdateMode>) {
        self.mode = mode;
    }

    /// The variables, sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` from `grads` (one per variable, in [`Self::vars`]
    /// order, master dtype; `None` for a variable that received no gradient, which then keeps
    /// its weights and moments).
    ///
    /// # Errors
    /// `grads` does not have one entry per variable, or a gradient's shape differs from its
    /// variable's; nothing is updated then.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`Self::step`] with every gradient multiplied by `grad_scale` first (the clipping
    /// factor of [`clip_factor`]): the same numbers as scaling the gradients and then
    /// stepping, but the multi-tensor update ([`UpdateMode::MultiTensor`]) applies the factor
    /// inside its one launch instead of in one op per gradient.
    ///
    /// # Errors
    /// As [`Self::step`].
    pub fn step_scaled(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(TrainError::Data(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        for ((name, var), grad) in self.vars.iter().zip(grads) {
            if let Some(grad) = grad.as_ref().filter(|g| g.shape() != var.shape()) {
                return Err(TrainError::Data(format!(
                    "gradient of `{name}` has shape {:?}, the variable {:?}",
                    grad.shape(),
                    var.shape()
                )));
            }
        }
        let c = self.config;
        self.step += 1;
        let t = self.step as f64;
        let corrections = (1.0 - c.beta1.powf(t), 1.0 - c.beta2.powf(t));
        let scalars = AdamWScalars {
            beta1: c.beta1,
            beta2: c.beta2,
            lr,
            decay: 1.0 - lr * c.weight_decay,
            correction1: corrections.0,
            correction2: corrections.1,
            eps: c.eps,
        };
        // Variables of the multi-tensor update, run together after the loop.
        let mut together: Vec<(usize, Tensor)> = Vec::new();
        for (k, grad) in grads.iter().enumerate() {
            // A gradient that still carries its graph would chain every step's graph into
            // the moments: detached.
            let Some(grad) = grad.as_ref().map(Tensor::detach) else {
                continue;
            };
            let var = self.vars[k].1.clone();
            let mode = self
                .mode
                .unwrap_or_else(|| UpdateMode::default_for(var.as_tensor()));
            let multi = mode == UpdateMode::MultiTensor
                && cfg!(feature = "cuda")
                && var.device().is_cuda()
                && matches!(var.dtype(), DType::F32 | DType::F64);
            if multi {
                together.push((k, grad.contiguous()?));
                continue;
            }
            let grad = if grad_scale == 1.0 {
                grad
            } else {
                (&grad * grad_scale)?
            };
            if matches!(mode, UpdateMode::InPlace | UpdateMode::MultiTensor) {
                self.update_in_place(k, &grad.contiguous()?, scalars)?;
            } else {
                let (theta, m, v) = adamw_update(
                    &c,
                    (var.as_tensor(), &self.first[k], &self.second[k], &grad),
                    lr,
                    corrections,
                )?;
                var.set(&theta)?;
                self.first[k] = m;
                self.second[k] = v;
            }
        }
        if !together.is_empty() {
            self.update_together(&together, scalars, grad_scale)?;
        }
        Ok(())
    }

    /// `[m | v]` of variable `k` packed in one tensor (built on first use; `first[k]` and
    /// `second[k]` become views of it).
    fn packed_moments(&mut self, k: usize) -> Result<Tensor> {
        if let Some(mv) = &self.packed[k] {
            return Ok(mv.clone());
        }
        let var = self.vars[k].1.as_tensor();
        let (n, shape) = (var.elem_count(), var.shape().clone());
        let mv = Tensor::cat(
            &[self.first[k].flatten_all()?, self.second[k].flatten_all()?],
            0,
        )?
        .contiguous()?;
        self.first[k] = mv.narrow(0, 0, n)?.reshape(&shape)?;
        self.second[k] = mv.narrow(0, n, n)?.reshape(&shape)?;
        self.packed[k] = Some(mv.clone());
        Ok(mv)
    }

    /// The multi-tensor update ([`UpdateMode::MultiTensor`]) of the variables `k` with their
    /// contiguous gradients times `grad_scale`: one launch per dtype.
    #[cfg(feature = "cuda")]
    fn update_together(
        &mut self,
        items: &[(usize, Tensor)],
        scalars: AdamWScalars,
        grad_scale: f64,
    ) -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let (mut params, mut moments, mut grads) = (Vec::new(), Vec::new(), Vec::new());
            for (k, grad) in items {
                let var = self.vars[*k].1.as_tensor().clone();
                if var.dtype() == dtype {
                    moments.push(self.packed_moments(*k)?);
                    params.push(var);
                    grads.push(grad.clone());
                }
            }
            let (p, m, g): (Vec<&Tensor>, Vec<&Tensor>, Vec<&Tensor>) = (
                params.iter().collect(),
                moments.iter().collect(),
                grads.iter().collect(),
            );
            matscale_equivariant::cuda::adamw_multi(&p, &m, &g, grad_scale, scalars.into())?;
        }
        Ok(())
    }

    /// Without the `cuda` feature no variable takes the multi-tensor path.
    #[cfg(not(feature = "cuda"))]
    fn update_together(
        &mut self,
        items: &[(usize, Tensor)],
        scalars: AdamWScalars,
        grad_scale: f64,
    ) -> Result<()> {
        for (k, grad) in items {
            self.update_in_place(*k, &(grad * grad_scale)?, scalars)?;
        }
        Ok(())
    }

    /// One variable's in-place update: the parameter from the moments before the step,
    /// then the moments (two in-place ops on the variable's and its packed `[m | v]` storage).
    fn update_in_place(&mut self, k: usize, grad: &Tensor, scalars: AdamWScalars) -> Result<()> {
        let mv = self.packed_moments(k)?;
        let var = self.vars[k].1.as_tensor();
        var.inplace_op3(&mv, grad, &AdamWParamOp(scalars))?;
        mv.inplace_op2(grad, &AdamWMomentsOp(scalars))?;
        Ok(())
    }

    /// The moments by name (`m.<name>`, `v.<name>`) for a checkpoint. With the in-place
    /// update ([`UpdateMode::InPlace`], the default on a GPU) they are views of the live
    /// moments, which the next [`Self::step`] overwrites: write or copy them before it.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.first[k].clone());
            out.insert(format!("v.{name}"), self.second[k].clone());
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    ///
    /// # Errors
    /// A moment is missing or has another shape than its variable.
    pub fn restore(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for (k, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.first[k]), ("v", &mut self.second[k])] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    TrainError::Data(format!("optimiser state has no tensor `{key}`"))
                })?;
                if t.shape() != var.shape() {
                    return Err(TrainError::Data(format!(
                        "optimiser state `{key}` has shape {:?}, the variable {:?}",
                        t.shape(),
                        var.shape()
                    )));
                }
                *slot = t.to_dtype(var.dtype())?.to_device(var.device())?;
            }
            self.packed[k] = None;
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of `grads`.
///
/// Each tensor's sum of squares is taken in f64 on its device, the sums are read back in one
/// copy per device and added on the host in order. On a GPU that is one synchronisation per
/// step, not one per parameter tensor (383 for eqV2-S), and on a CUDA device one kernel per
/// tensor writes its partial sums straight into a shared buffer (instead of a cast, a square,
/// a sum and a concatenation per tensor).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let present: Vec<&Tensor> = grads.iter().flatten().collect();
    let mut total = 0.0;
    let mut k = 0;
    while k < present.len() {
        // One device at a time (a model on one device gives one run).
        let device = present[k].device().clone();
        let run = present[k..]
            .iter()
            .take_while(|t| t.device().same_device(&device))
            .count();
        let chunk = &present[k..k + run];
        let fused = device.is_cuda()
            && cfg!(feature = "cuda")
            && chunk
                .iter()
                .all(|t| matches!(t.dtype(), DType::F32 | DType::F64));
        total += if fused && multi_tensor_requested() {
            sum_squares_multi(chunk)?
        } else if fused {
            sum_squares_partials(chunk)?
        } else {
            sum_squares_composed(chunk)?
        };
        k += run;
    }
    Ok(total.sqrt())
}

/// `Σ_k Σ x_k²` of tensors on one device, each sum in f64 by candle ops, read back in one copy.
fn sum_squares_composed(chunk: &[&Tensor]) -> Result<f64> {
    let sums = chunk
        .iter()
        .map(|g| Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?.reshape(1)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&sums, 0)?
        .to_vec1::<f64>()?
        .iter()
        .fold(0.0, |t, v| t + v))
}

/// `Σ_k Σ x_k²` of f32/f64 CUDA tensors in one launch (unless `MATSCALE_MULTI_TENSOR=0`), grouped
/// by dtype.
fn sum_squares_multi(chunk: &[&Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    {
        let mut total = 0.0;
        for dtype in [DType::F32, DType::F64] {
            let xs = chunk
                .iter()
                .filter(|t| t.dtype() == dtype)
                .map(|t| t.contiguous())
                .collect::<candle_core::Result<Vec<_>>>()?;
            total += matscale_equivariant::cuda::sum_squares_multi(&xs.iter().collect::<Vec<_>>())?;
        }
        Ok(total)
    }
    #[cfg(not(feature = "cuda"))]
    sum_squares_partials(chunk)
}

/// Partial sums per tensor of [`sum_squares_partials`] (the CUDA kernel's block count).
const NORM_PARTIALS: usize = 64;

/// `Σ_k Σ x_k²` of f32/f64 tensors on one device: [`NORM_PARTIALS`] f64 partial sums per
/// tensor written in place into one buffer (one op per tensor), read back in one copy and
/// added in order.
fn sum_squares_partials(chunk: &[&Tensor]) -> Result<f64> {
    let Some(first) = chunk.first() else {
        return Ok(0.0);
    };
    let partials = Tensor::zeros(chunk.len() * NORM_PARTIALS, DType::F64, first.device())?;
    for (slot, g) in chunk.iter().enumerate() {
        partials.inplace_op2(&g.contiguous()?, &SumSquaresOp { slot })?;
    }
    Ok(partials.to_vec1::<f64>()?.iter().fold(0.0, |t, v| t + v))
}

/// Writes the partial sums of squares of its source into `dst[slot · NORM_PARTIALS ..]`.
struct SumSquaresOp {
    slot: usize,
}

impl candle_core::InplaceOp2 for SumSquaresOp {
    fn name(&self) -> &'static str {
        "sum-squares"
    }

    /// The CPU side (for tests): partial `b` sums the elements `i` with
    /// `(i mod (NORM_PARTIALS · 256)) / 256 == b`, the CUDA kernel's blocks.
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<()> {
        let a = contiguous_range(dst_l, "sum-squares: the partials")?.start;
        let CpuStorage::F64(out) = dst else {
            candle_core::bail!("sum-squares: the partials must be f64");
        };
        let values: Vec<f64> = match x {
            CpuStorage::F32(_) => cpu_slice::<f32>(x, xl, "sum-squares: the gradient")?
                .iter()
                .map(|&v| f64::from(v))
                .collect(),
            CpuStorage::F64(_) => cpu_slice::<f64>(x, xl, "sum-squares: the gradient")?.to_vec(),
            _ => candle_core::bail!("sum-squares: f32 or f64 input"),
        };
        let row = &mut out[a + self.slot * NORM_PARTIALS..a + (self.slot + 1) * NORM_PARTIALS];
        row.iter_mut().for_each(|p| *p = 0.0);
        for (i, v) in values.iter().enumerate() {
            row[(i % (NORM_PARTIALS * 256)) / 256] += v * v;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<()> {
        const _: () = assert!(NORM_PARTIALS == matscale_equivariant::cuda::SUM_SQUARES_BLOCKS);
        matscale_equivariant::cuda::sum_squares_partials((dst, dst_l), (x, xl), self.slot)
    }
}

/// The factor [`clip_by_global_norm`] scales gradients of global norm `norm` by: 1 unless
/// the norm is finite and above a positive `max_norm`.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm.is_finite() && norm > max_norm && max_norm > 0.0 {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales `grads` so that their global norm is at most `max_norm`; returns the norm before.
/// ([`AdamW::step_scaled`] with [`clip_factor`] does the same inside the update.)
pub fn clip_by_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let scale = clip_factor(norm, max_norm);
    if scale != 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Exponential moving average of weights: `ema ← d·ema + (1 − d)·θ` after each step.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current values of `vars`.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        Ok(Self {
            decay,
            shadow: vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Folds the current values of `vars` into the average.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        for (s, (_, v)) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * self.decay)? + (v.as_tensor() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The averaged tensors, in the order of the variables.
    pub fn tensors(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Replaces the average (when resuming).
    pub fn restore(&mut self, tensors: Vec<Tensor>) {
        self.shadow = tensors;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        let var = Var::from_slice(&[1.0f64, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
        let grad = Tensor::new(&[0.5f64, -0.25], &Device::Cpu).unwrap();
        opt.step(&[Some(grad)], 0.1).unwrap();
        // First step: m̂ = g, v̂ = g², update = g/(|g| + ε) = sign(g).
        let w = var.as_tensor().to_vec1::<f64>().unwrap();
        let expect = |theta: f64, g: f64| theta * (1.0 - 0.1 * 1e-3) - 0.1 * g / (g.abs() + 1e-8);
        assert!((w[0] - expect(1.0, 0.5)).abs() < 1e-15);
        assert!((w[1] - expect(-2.0, -0.25)).abs() < 1e-15);
    }

    /// Both update modes (per variable, in place) equal a hand-written per-variable AdamW bit
    /// for bit over several steps, with f32 and f64 variables, a
    /// variable without a gradient in some steps (its weights and moments stay), and a
    /// checkpoint round trip in the middle.
    #[test]
    fn every_update_mode_equals_the_written_out_update() {
        for mode in [
            UpdateMode::PerVariable,
            UpdateMode::InPlace,
            UpdateMode::MultiTensor,
        ] {
            update_case(mode);
        }
    }

    fn update_case(mode: UpdateMode) {
        let dev = Device::Cpu;
        let config = AdamWConfig::default();
        let shapes: [(&str, &[usize], DType); 4] = [
            ("a", &[3, 4], DType::F32),
            ("b", &[5], DType::F64),
            ("c", &[2, 2, 2], DType::F32),
            ("d", &[7], DType::F32),
        ];
        let make = || -> Vec<(String, Var)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, (name, shape, dtype))| {
                    let n: usize = shape.iter().product();
                    let values: Vec<f64> = (0..n)
                        .map(|j| ((i * 31 + j * 7) % 11) as f64 - 5.0)
                        .collect();
                    let t = Tensor::from_vec(values, *shape, &dev)
                        .unwrap()
                        .to_dtype(*dtype)
                        .unwrap();
                    (name.to_string(), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        let (vars, reference) = (make(), make());
        let mut opt = AdamW::new(vars.clone(), config).unwrap();
        opt.set_update_mode(Some(mode));
        let mut moments: Vec<(Tensor, Tensor)> = reference
            .iter()
            .map(|(_, v)| (v.zeros_like().unwrap(), v.zeros_like().unwrap()))
            .collect();
        for step in 1..=6u64 {
            let grads: Vec<Option<Tensor>> = reference
                .iter()
                .enumerate()
                .map(|(i, (_, v))| {
                    // "c" gets no gradient in steps 2 and 5.
                    (i != 2 || step % 3 != 2).then(|| {
                        (v.as_tensor().sin().unwrap() * (0.3 * step as f64 + i as f64)).unwrap()
                    })
                })
                .collect();
            let lr = 0.01 * step as f64;
            opt.step(&grads, lr).unwrap();
            // The per-variable reference, written out.
            let t = step as f64;
            let (c1, c2) = (1.0 - config.beta1.powf(t), 1.0 - config.beta2.powf(t));
            for (((_, var), grad), (m0, v0)) in reference.iter().zip(&grads).zip(&mut moments) {
                let Some(g) = grad else { continue };
                let m =
                    ((&*m0 * config.beta1).unwrap() + (g * (1.0 - config.beta1)).unwrap()).unwrap();
                let v = ((&*v0 * config.beta2).unwrap()
                    + (g.sqr().unwrap() * (1.0 - config.beta2)).unwrap())
                .unwrap();
                let decayed = (var.as_tensor() * (1.0 - lr * config.weight_decay)).unwrap();
                let update = ((&m / c1).unwrap()
                    / ((&v / c2).unwrap().sqrt().unwrap() + config.eps).unwrap())
                .unwrap();
                var.set(&(decayed - (update * lr).unwrap()).unwrap())
                    .unwrap();
                (*m0, *v0) = (m, v);
            }
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            for ((name, got), (_, want)) in opt.vars().iter().zip(&reference) {
                assert_eq!(
                    flat(got.as_tensor()),
                    flat(want.as_tensor()),
                    "{mode:?}, step {step}: {name}"
                );
            }
            let state = opt.state_tensors();
            for ((name, _), (m, v)) in reference.iter().zip(&moments) {
                assert_eq!(
                    flat(&state[&format!("m.{name}")]),
                    flat(m),
                    "{mode:?}, step {step}: m.{name}"
                );
                assert_eq!(
                    flat(&state[&format!("v.{name}")]),
                    flat(v),
                    "{mode:?}, step {step}: v.{name}"
                );
            }
            if step == 3 {
                // Resume into a fresh optimiser over the same variables.
                let mut resumed = AdamW::new(vars.clone(), config).unwrap();
                resumed.restore(&state, opt.step_count()).unwrap();
                resumed.set_update_mode(Some(mode));
                opt = resumed;
            }
        }
        // Wrong number of gradients; a gradient of the wrong shape.
        assert!(opt.step(&[None], 0.1).is_err());
        let mut bad: Vec<Option<Tensor>> = vec![None; 4];
        bad[0] = Some(Tensor::zeros(12, DType::F32, &dev).unwrap());
        let before = opt.step_count();
        let err = opt.step(&bad, 0.1).unwrap_err().to_string();
        assert!(err.contains("`a`"), "{err}");
        assert_eq!(opt.step_count(), before, "a rejected step changes nothing");
    }

    /// The partial-sum form of the gradient norm (used on CUDA devices) equals the composed
    /// one (used on the CPU) up to the order of the f64 additions.
    #[test]
    fn partial_sums_of_squares_equal_the_composed_sums() {
        let dev = Device::Cpu;
        let tensors = [
            Tensor::randn(0f32, 1.0, (300, 70), &dev).unwrap(),
            Tensor::randn(0f64, 2.0, 40_000, &dev).unwrap(),
            Tensor::randn(0f32, 1.0, 3, &dev).unwrap(),
        ];
        let chunk: Vec<&Tensor> = tensors.iter().collect();
        let composed = sum_squares_composed(&chunk).unwrap();
        let partial = sum_squares_partials(&chunk).unwrap();
        assert!(composed > 1e3);
        assert!(
            (partial - composed).abs() <= 1e-12 * composed,
            "{partial} vs {composed}"
        );
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let var = Var::from_slice(&[3.0f64, -4.0], 2, &Device::Cpu).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], config).unwrap();
        for _ in 0..2000 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(var.as_tensor()).cloned();
            opt.step(&[g], 0.05).unwrap();
        }
        let w = var.as_tensor().to_vec1::<f64>().unwrap();
        assert!(w.iter().all(|x| x.abs() < 1e-2), "{w:?}");
    }

    /// `step_scaled` with the clipping factor gives bit for bit what clipping the gradients
    /// and then stepping gives, in every update mode (the trainer's path since session 18).
    #[test]
    fn step_scaled_equals_clip_then_step() {
        let dev = Device::Cpu;
        for mode in [
            UpdateMode::PerVariable,
            UpdateMode::InPlace,
            UpdateMode::MultiTensor,
        ] {
            let make = || {
                let vars = (0..3)
                    .map(|i| {
                        let v = Tensor::randn(0f32, 1.0, (4 + i, 3), &dev).unwrap();
                        (format!("w{i}"), Var::from_tensor(&v).unwrap())
                    })
                    .collect::<Vec<_>>();
                let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
                opt.set_update_mode(Some(mode));
                opt
            };
            let mut a = make();
            let mut b = AdamW::new(
                a.vars()
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.clone(),
                            Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                        )
                    })
                    .collect(),
                AdamWConfig::default(),
            )
            .unwrap();
            b.set_update_mode(Some(mode));
            for step in 0..3 {
                let grads: Vec<Option<Tensor>> = a
                    .vars()
                    .iter()
                    .map(|(_, v)| {
                        Some(
                            (Tensor::randn(0f32, 1.0, v.shape(), &dev).unwrap()
                                * (step + 2) as f64)
                                .unwrap(),
                        )
                    })
                    .collect();
                let mut clipped = grads.clone();
                let norm = clip_by_global_norm(&mut clipped, 1.5).unwrap();
                assert!(norm > 1.5, "the case must clip");
                a.step(&clipped, 0.01).unwrap();
                b.step_scaled(&grads, 0.01, clip_factor(norm, 1.5)).unwrap();
            }
            for ((_, va), (_, vb)) in a.vars().iter().zip(b.vars()) {
                let (x, y) = (
                    va.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    vb.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
                assert_eq!(x, y, "{mode:?}");
            }
        }
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut grads = vec![
            Some(Tensor::new(&[3.0f64], &Device::Cpu).unwrap()),
            Some(Tensor::new(&[4.0f64], &Device::Cpu).unwrap()),
            None,
        ];
        let before = clip_by_global_norm(&mut grads, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-12);
        assert!((global_norm(&grads).unwrap() - 1.0).abs() < 1e-6);
    }

    /// The norm adds the per-tensor sums of squares in f64, whatever the tensors' shapes and
    /// dtypes (f32 and f64 mixed, gaps for missing gradients).
    #[test]
    fn global_norm_sums_every_tensor_in_order() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &dev).unwrap();
        let b = Tensor::new(&[1e-3f64, 7.0, -0.5], &dev).unwrap();
        let c = Tensor::new(&[[[2.0f32]]], &dev).unwrap();
        let grads = vec![Some(a), None, Some(b), Some(c), None];
        let mut want = 0.0f64;
        for v in [1.5f64, -2.0, 0.25, 3.0] {
            want += v * v;
        }
        let b_sq = 1e-3f64 * 1e-3 + 49.0 + 0.25;
        want = (want + b_sq) + 4.0;
        let got = global_norm(&grads).unwrap();
        assert!(
            (got - want.sqrt()).abs() <= 1e-14 * want.sqrt(),
            "{got} vs {}",
            want.sqrt()
        );
        assert_eq!(global_norm(&[None, None]).unwrap(), 0.0);
    }
}
