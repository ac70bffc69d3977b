//! Pointwise activations of EquiformerV2 (fairchem 1.x `equiformer_v2/activation.py`) as
//! differentiable candle ops, plus the gate activation.
//!
//! * [`silu`] `x σ(x)` and [`scaled_silu`] (`× 1.6791767923989418`, fairchem `ScaledSiLU`).
//! * [`sigmoid`] and [`scaled_sigmoid`] (`× 1.8467055342154763`, fairchem `ScaledSigmoid`).
//! * [`smooth_leaky_relu`]: fairchem `SmoothLeakyReLU(negative_slope = a)`,
//!   `f(x) = (1 + a)/2 · x + (1 − a)/2 · x (2σ(x) − 1)`; with the default `a = 0.2` this is
//!   `0.6 x + 0.4 x (2σ(x) − 1)`, the attention-logit activation of EquiformerV2. It tends to
//!   `x` for large `x` and to `a x` for very negative `x`. [`scaled_smooth_leaky_relu`] multiplies
//!   by `1.531320475574866` (fairchem `ScaledSmoothLeakyReLU`).
//! * [`GateActivation`]: fairchem `GateActivation(lmax, mmax, channels)`: SiLU on the l = 0 row,
//!   the l > 0 rows multiplied by `σ(gate)` per degree and channel.
//!
//! Each elementwise function is one fused custom op ([`Elementwise`]) with a vectorised f32
//! kernel (a branch-free polynomial `exp`, AVX2/FMA when the CPU has it) and an f64 kernel. Its
//! backward multiplies the incoming gradient by the first-derivative op, whose own backward uses
//! the second-derivative op, so gradients of gradients (forces by autograd, then training on
//! them) work; third derivatives are not implemented.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use matscale_equivariant::activation::{silu, smooth_leaky_relu};
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let x = Tensor::new(&[-30.0f64, 0.0, 1.0, 30.0], &Device::Cpu)?;
//! let y: Vec<f64> = smooth_leaky_relu(&x, 0.2)?.to_vec1()?;
//! assert!((y[0] - 0.2 * -30.0).abs() < 1e-9); // slope a far left
//! assert!((y[3] - 30.0).abs() < 1e-9); // identity far right
//! let s: Vec<f64> = silu(&x)?.to_vec1()?;
//! assert!((s[2] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
//! # Ok(())
//! # }
//! ```

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{EquivariantError, Result};
use crate::float_kernel::{run_float, FloatKernel};

/// fairchem `ScaledSiLU` factor.
pub const SCALED_SILU_FACTOR: f64 = 1.6791767923989418;
/// fairchem `ScaledSigmoid` factor.
pub const SCALED_SIGMOID_FACTOR: f64 = 1.8467055342154763;
/// fairchem `ScaledSmoothLeakyReLU` factor (with negative slope 0.2).
pub const SCALED_SMOOTH_LEAKY_RELU_FACTOR: f64 = 1.531320475574866;
/// Default negative slope of fairchem's `SmoothLeakyReLU`.
pub const SMOOTH_LEAKY_RELU_SLOPE: f64 = 0.2;

/// Float types of the CPU kernels of this crate's ops (f32 and f64).
pub(crate) trait Float:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
{
    /// `0`.
    const ZERO: Self;
    /// `1`.
    const ONE: Self;
    /// `e^self` (a fast vectorisable polynomial for f32, `f64::exp` for f64).
    fn exp(self) -> Self;
    /// `self · a + b` with one rounding: one instruction where the code is compiled with FMA
    /// (the AVX2 and AVX-512 kernels, aarch64), a library call elsewhere.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// The larger of two values (no NaN handling needed by the callers).
    #[inline(always)]
    fn fmax(self, other: Self) -> Self {
        if other > self {
            other
        } else {
            self
        }
    }
    /// `σ(self) = 1 / (1 + e^−self)`.
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }
    /// Applies SiLU in place to a slice (the hot loop of the S2 activation).
    fn silu_in_place(xs: &mut [Self]);
    /// `x[i] ← grad[i] · SiLU'(x[i])` (the hot loop of the S2 activation's backward).
    fn silu_backward_in_place(xs: &mut [Self], grad: &[Self]);
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    fn silu_in_place(xs: &mut [Self]) {
        for x in xs {
            *x = *x / (1.0 + (-*x).exp());
        }
    }
    fn silu_backward_in_place(xs: &mut [Self], grad: &[Self]) {
        for (x, &g) in xs.iter_mut().zip(grad) {
            let s = 1.0 / (1.0 + (-*x).exp());
            *x = g * s * (1.0 + *x * (1.0 - s));
        }
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    fn silu_in_place(xs: &mut [Self]) {
        silu_f32_slice(xs);
    }
    fn silu_backward_in_place(xs: &mut [Self], grad: &[Self]) {
        silu_backward_f32_slice(xs, grad);
    }
}

/// Runs `$body` compiled for AVX-512F, else AVX2 + FMA, else the baseline target, picking the
/// widest instruction set the CPU has at run time (the branch-free bodies vectorise to it).
macro_rules! simd_dispatch {
    (($($arg:ident: $ty:ty),*), $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                $body
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $body
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { avx512($($arg),*) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { avx2($($arg),*) };
                return;
            }
        }
        $body
    }};
}

/// Defines `fn $name<T: Float>(…)` whose `$body` runs compiled for AVX-512F, else AVX2 + FMA,
/// else the baseline target, picked at run time (the generic counterpart of `simd_dispatch!`
/// for kernels over f32 and f64: their branch-free loops vectorise to the widest SIMD).
macro_rules! dispatch_float {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$meta])*
        $vis fn $name<T: Float>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512<T: Float>($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2<T: Float>($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use dispatch_float;

/// `x ← SiLU(x) = x σ(x)` over an f32 slice, vectorised with the widest SIMD the CPU has
/// (AVX-512F, AVX2 + FMA, or the baseline) and the polynomial [`exp_f32`].
pub fn silu_f32_slice(xs: &mut [f32]) {
    simd_dispatch!((xs: &mut [f32]), {
        for x in xs.iter_mut() {
            *x = *x / (1.0 + exp_f32_fma(-*x));
        }
    })
}

/// `x ← grad · SiLU'(x)` over f32 slices of equal length (the backward of
/// [`silu_f32_slice`] given its input), vectorised like it.
pub fn silu_backward_f32_slice(xs: &mut [f32], grad: &[f32]) {
    simd_dispatch!((xs: &mut [f32], grad: &[f32]), {
        for (x, &g) in xs.iter_mut().zip(grad) {
            let s = 1.0 / (1.0 + exp_f32_fma(-*x));
            *x = g * s * (1.0 + *x * (1.0 - s));
        }
    })
}

/// `grad ← grad · SiLU'(pre)` over f32 slices of equal length (`pre` the SiLU inputs),
/// vectorised like [`silu_f32_slice`].
pub fn silu_grad_mul_f32(grad: &mut [f32], pre: &[f32]) {
    simd_dispatch!((grad: &mut [f32], pre: &[f32]), {
        for (g, &x) in grad.iter_mut().zip(pre) {
            let s = 1.0 / (1.0 + exp_f32_fma(-x));
            *g *= s * (1.0 + x * (1.0 - s));
        }
    })
}

/// `e^x` in f32 without branches, so that loops over it vectorise: `x = k ln2 + r` with
/// `|r| ≤ ln2/2`, a degree-6 Taylor polynomial for `e^r` (relative error < 2e-7 on that
/// interval) and `2^k` assembled in the exponent bits. Inputs are clamped to `[−87, 88]`, so
/// the result never overflows to infinity nor becomes subnormal.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * exp2_from_shifted(shifted)
}

/// `log2(e)` and `ln 2` split in a high part exact in f32 and a low remainder, for the range
/// reduction `x = k ln2 + r` of [`exp_f32`] and [`exp_f32_fma`].
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// 1.5 · 2^23: adding it rounds to the nearest integer, which then sits in the low mantissa
/// bits (so `k` is read with integer arithmetic, not a saturating `as i32` that would not
/// vectorise).
const ROUND: f32 = 12_582_912.0;

/// `2^k` for `shifted = x·log2(e) + ROUND`, assembled in the exponent bits.
#[inline(always)]
fn exp2_from_shifted(shifted: f32) -> f32 {
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(k_bits.wrapping_add(127) << 23)
}

/// [`exp_f32`] with the range reduction and the polynomial as fused multiply-adds: the same
/// accuracy (relative error < 3e-7), about 1.4× faster in the SIMD loops below, which are
/// compiled with FMA on x86-64 CPUs that have it (AVX2 or AVX-512) and on aarch64. In code
/// compiled without FMA every `mul_add` is a library call: use [`exp_f32`] there.
#[inline(always)]
fn exp_f32_fma(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x.mul_add(LOG2E, ROUND);
    let k = shifted - ROUND;
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, x));
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    p * exp2_from_shifted(shifted)
}

/// The elementwise functions of [`Elementwise`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Function {
    /// `x σ(x)`.
    Silu,
    /// `σ(x)`.
    Sigmoid,
    /// fairchem `SmoothLeakyReLU` with the given negative slope.
    SmoothLeakyRelu(f64),
}

impl Function {
    /// The `order`-th derivative (0 = value) at `x`, evaluated in the kernel's float type.
    #[inline(always)]
    pub(crate) fn eval<T: Float>(self, order: u8, x: T) -> T {
        let one = T::ONE;
        let two = one + one;
        match self {
            Function::Silu => {
                let s = x.sigmoid();
                match order {
                    0 => x * s,
                    1 => s * (one + x * (one - s)),
                    _ => s * (one - s) * (two + x * (one - two * s)),
                }
            }
            Function::Sigmoid => {
                let s = x.sigmoid();
                match order {
                    0 => s,
                    1 => s * (one - s),
                    _ => s * (one - s) * (one - two * s),
                }
            }
            Function::SmoothLeakyRelu(slope) => {
                // 2σ(x) − 1 = tanh(x/2) =: t, so f = a x + b x t with a = (1+slope)/2,
                // b = (1−slope)/2, f' = a + b t + b x (1 − t²)/2, f'' = b (1 − t²)(1 − x t/2).
                let a = T::from_f64((1.0 + slope) / 2.0);
                let b = T::from_f64((1.0 - slope) / 2.0);
                let t = two * x.sigmoid() - one;
                match order {
                    0 => a * x + b * x * t,
                    1 => a + b * t + b * x * (one - t * t) / two,
                    _ => b * (one - t * t) * (one - x * t / two),
                }
            }
        }
    }

    fn name(self, order: u8) -> &'static str {
        match (self, order) {
            (Function::Silu, 0) => "silu",
            (Function::Silu, 1) => "silu-d1",
            (Function::Silu, _) => "silu-d2",
            (Function::Sigmoid, 0) => "sigmoid",
            (Function::Sigmoid, 1) => "sigmoid-d1",
            (Function::Sigmoid, _) => "sigmoid-d2",
            (Function::SmoothLeakyRelu(_), 0) => "smooth-leaky-relu",
            (Function::SmoothLeakyRelu(_), 1) => "smooth-leaky-relu-d1",
            (Function::SmoothLeakyRelu(_), _) => "smooth-leaky-relu-d2",
        }
    }
}

/// Custom op evaluating the `order`-th derivative (0, 1 or 2) of a [`Function`] elementwise.
///
/// The backward of order `k < 2` is `grad · Elementwise { order: k + 1 }(x)`.
#[derive(Debug, Clone, Copy)]
pub struct Elementwise {
    /// The function.
    pub function: Function,
    /// 0 for the value, 1 and 2 for the derivatives.
    pub order: u8,
}

/// Elements per rayon task.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

fn elementwise_kernel<T: Float>(op: Elementwise, src: &[T]) -> Vec<T> {
    let mut out = src.to_vec();
    out.par_chunks_mut(ELEMENTWISE_CHUNK).for_each(|chunk| {
        if op.function == Function::Silu && op.order == 0 {
            T::silu_in_place(chunk);
        } else {
            for x in chunk.iter_mut() {
                *x = op.function.eval(op.order, *x);
            }
        }
    });
    out
}

impl FloatKernel<1> for Elementwise {
    fn run<T: Float>(&self, [(x, _)]: [(&[T], &Layout); 1]) -> candle_core::Result<Vec<T>> {
        Ok(elementwise_kernel(*self, x))
    }
}

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        self.function.name(self.order)
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run_float(self.name(), [(storage, layout)], self)?;
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::elementwise::Activation;
        let function = match self.function {
            Function::Silu => Activation::Silu,
            Function::Sigmoid => Activation::Sigmoid,
            Function::SmoothLeakyRelu(slope) => Activation::SmoothLeakyRelu(slope),
        };
        crate::cuda::elementwise::activation(storage, layout, function, self.order, self.name())
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.order >= 2 {
            return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
        }
        let next = Elementwise {
            function: self.function,
            order: self.order + 1,
        };
        let derivative = arg.contiguous()?.apply_op1(next)?;
        Ok(Some(grad_res.mul(&derivative)?))
    }
}

/// Checks that a tensor argument is f32 or f64 (the dtypes every op of this crate supports).
pub(crate) fn check_float(x: &Tensor, arg: &'static str) -> Result<()> {
    match x.dtype() {
        candle_core::DType::F32 | candle_core::DType::F64 => Ok(()),
        found => Err(EquivariantError::UnsupportedDType { arg, found }),
    }
}

fn apply(x: &Tensor, function: Function) -> Result<Tensor> {
    check_float(x, "x")?;
    Ok(x.contiguous()?
        .apply_op1(Elementwise { function, order: 0 })?)
}

/// SiLU `x σ(x)` (fairchem/PyTorch `SiLU`), differentiable twice.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    apply(x, Function::Silu)
}

/// fairchem `ScaledSiLU`: `1.6791767923989418 · x σ(x)`.
pub fn scaled_silu(x: &Tensor) -> Result<Tensor> {
    Ok((silu(x)? * SCALED_SILU_FACTOR)?)
}

/// Logistic sigmoid `1 / (1 + e^−x)`, differentiable twice.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    apply(x, Function::Sigmoid)
}

/// fairchem `ScaledSigmoid`: `1.8467055342154763 · σ(x)`.
pub fn scaled_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((sigmoid(x)? * SCALED_SIGMOID_FACTOR)?)
}

/// fairchem `SmoothLeakyReLU(negative_slope)`:
/// `(1 + a)/2 · x + (1 − a)/2 · x (2σ(x) − 1)` with `a = negative_slope` (EquiformerV2 uses 0.2).
pub fn smooth_leaky_relu(x: &Tensor, negative_slope: f64) -> Result<Tensor> {
    if !negative_slope.is_finite() {
        return Err(EquivariantError::InvalidArgument {
            name: "negative_slope",
            reason: format!("must be finite, got {negative_slope}"),
        });
    }
    apply(x, Function::SmoothLeakyRelu(negative_slope))
}

/// fairchem `ScaledSmoothLeakyReLU`: `1.531320475574866 · SmoothLeakyReLU(0.2)(x)`.
pub fn scaled_smooth_leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok((smooth_leaky_relu(x, SMOOTH_LEAKY_RELU_SLOPE)? * SCALED_SMOOTH_LEAKY_RELU_FACTOR)?)
}

/// fairchem `GateActivation(lmax, mmax, num_channels)`.
///
/// Input embeddings are `[N, K, C]` in the l-major layout truncated to `|m| ≤ mmax`
/// (`K = 1 + Σ_{l=1}^{lmax} min(2l + 1, 2 mmax + 1)`); gating scalars are `[N, lmax · C]`
/// (degree-major: gate of degree `l` and channel `c` at `(l − 1) · C + c`). The output is
/// `SiLU(x)` on row 0 and `x · σ(gate_l)` on the rows of degree `l ≥ 1`.
#[derive(Debug, Clone)]
pub struct GateActivation {
    lmax: usize,
    mmax: usize,
    num_channels: usize,
    /// Row of each coefficient (degree ≥ 1) in the `[N, lmax, C]` gates, as a u32 tensor.
    expand_index: Vec<u32>,
}

impl GateActivation {
    /// A gate activation for degrees `1..=lmax`, orders `|m| ≤ mmax` and `num_channels` channels.
    pub fn new(lmax: usize, mmax: usize, num_channels: usize) -> Result<Self> {
        if lmax == 0 {
            return Err(EquivariantError::InvalidArgument {
                name: "lmax",
                reason: "a gate activation needs lmax ≥ 1".into(),
            });
        }
        let mut expand_index = Vec::new();
        for l in 1..=lmax {
            let len = (2 * l + 1).min(2 * mmax + 1);
            expand_index.extend(std::iter::repeat_n((l - 1) as u32, len));
        }
        Ok(Self {
            lmax,
            mmax,
            num_channels,
            expand_index,
        })
    }

    /// Number of coefficients `K` of the embeddings this gate expects.
    pub fn num_coefficients(&self) -> usize {
        1 + self.expand_index.len()
    }

    /// Largest order `mmax`.
    pub fn mmax(&self) -> usize {
        self.mmax
    }

    /// Applies the gate: `gating_scalars` `[N, lmax · C]`, `input` `[N, K, C]` → `[N, K, C]`.
    pub fn forward(&self, gating_scalars: &Tensor, input: &Tensor) -> Result<Tensor> {
        let (n, k, c) = input.dims3().map_err(|_| EquivariantError::ShapeMismatch {
            arg: "input",
            expected: "[N, K, C]".into(),
            found: input.dims().to_vec(),
        })?;
        if k != self.num_coefficients() || c != self.num_channels {
            return Err(EquivariantError::ShapeMismatch {
                arg: "input",
                expected: format!("[N, {}, {}]", self.num_coefficients(), self.num_channels),
                found: input.dims().to_vec(),
            });
        }
        if gating_scalars.dims() != [n, self.lmax * c] {
            return Err(EquivariantError::ShapeMismatch {
                arg: "gating_scalars",
                expected: format!("[{n}, {}]", self.lmax * c),
                found: gating_scalars.dims().to_vec(),
            });
        }
        let gates = sigmoid(gating_scalars)?.reshape((n, self.lmax, c))?;
        let index =
            Tensor::from_slice(&self.expand_index, self.expand_index.len(), input.device())?;
        let gates = gates.index_select(&index, 1)?;
        let scalars = silu(&input.narrow(1, 0, 1)?)?;
        let vectors = input.narrow(1, 1, k - 1)?.mul(&gates)?;
        Ok(Tensor::cat(&[&scalars, &vectors], 1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, random_tensor};
    use candle_core::{DType, Device};

    fn sigmoid64(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn fast_exp_is_accurate_over_the_useful_range() {
        for exp in [exp_f32, exp_f32_fma] {
            let mut worst = 0.0f64;
            let mut x = -80.0f32;
            while x < 80.0 {
                let rel = ((exp(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
                worst = worst.max(rel);
                x += 0.01237;
            }
            assert!(worst < 5e-7, "worst relative error {worst:e}");
            assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
            assert!(exp(1000.0).is_finite());
        }
    }

    /// The public f32 SiLU loops (vectorised for the CPU's widest SIMD) agree with f64
    /// evaluations to f32 precision, for every tail length.
    #[test]
    fn silu_slice_loops_match_f64() {
        for len in [0usize, 5, 16, 37, 1003] {
            let xs: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 4001) as f32 / 20.0 - 100.0)
                .collect();
            let gs: Vec<f32> = (0..len).map(|i| ((i % 13) as f32 - 6.0) / 3.0).collect();
            let sig = |x: f32| 1.0 / (1.0 + (-(x as f64)).exp());
            let silu = |x: f32| x as f64 * sig(x);
            let dsilu = |x: f32| sig(x) * (1.0 + x as f64 * (1.0 - sig(x)));
            let close = |a: f32, b: f64, scale: f64| (a as f64 - b).abs() <= 2e-6 * scale.max(1.0);
            let mut v = xs.clone();
            silu_f32_slice(&mut v);
            for (i, (&a, &x)) in v.iter().zip(&xs).enumerate() {
                assert!(
                    close(a, silu(x), silu(x).abs()),
                    "silu len {len} at {i}: {a} vs x {x}"
                );
            }
            let mut v = xs.clone();
            silu_backward_f32_slice(&mut v, &gs);
            for (i, ((&a, &x), &g)) in v.iter().zip(&xs).zip(&gs).enumerate() {
                let want = g as f64 * dsilu(x);
                assert!(
                    close(a, want, want.abs()),
                    "backward len {len} at {i}: {a} vs {want}"
                );
            }
            let mut v = gs.clone();
            silu_grad_mul_f32(&mut v, &xs);
            for (i, ((&a, &x), &g)) in v.iter().zip(&xs).zip(&gs).enumerate() {
                let want = g as f64 * dsilu(x);
                assert!(
                    close(a, want, want.abs()),
                    "grad_mul len {len} at {i}: {a} vs {want}"
                );
            }
        }
    }

    #[test]
    fn values_match_the_fairchem_formulas() -> Result<()> {
        let xs: Vec<f64> = (-40..=40).map(|i| i as f64 * 0.37).collect();
        let x = Tensor::from_slice(&xs, xs.len(), &Device::Cpu)?;
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-14 } else { 2e-6 };
            let xt = x.to_dtype(dtype)?;
            let slrelu: Vec<f64> = smooth_leaky_relu(&xt, 0.2)?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            let ssl: Vec<f64> = scaled_smooth_leaky_relu(&xt)?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            let si: Vec<f64> = silu(&xt)?.to_dtype(DType::F64)?.to_vec1()?;
            let ss: Vec<f64> = scaled_silu(&xt)?.to_dtype(DType::F64)?.to_vec1()?;
            let sg: Vec<f64> = scaled_sigmoid(&xt)?.to_dtype(DType::F64)?.to_vec1()?;
            for (i, &v) in xs.iter().enumerate() {
                let expected = 0.6 * v + 0.4 * v * (2.0 * sigmoid64(v) - 1.0);
                let scale = 1.0 + v.abs();
                assert!(
                    (slrelu[i] - expected).abs() <= tol * scale,
                    "{v}: {} vs {expected}",
                    slrelu[i]
                );
                assert!((ssl[i] - 1.531320475574866 * expected).abs() <= 2.0 * tol * scale);
                assert!((si[i] - v * sigmoid64(v)).abs() <= tol * scale);
                assert!((ss[i] - 1.6791767923989418 * v * sigmoid64(v)).abs() <= 2.0 * tol * scale);
                assert!((sg[i] - 1.8467055342154763 * sigmoid64(v)).abs() <= 2.0 * tol);
            }
        }
        Ok(())
    }

    /// Golden values from fairchem's `activation.py` (`tests/data/equivariant/norms_fixtures.py`).
    #[test]
    fn values_match_fairchem_golden_values() -> Result<()> {
        let fx = crate::testing::Fixture::open("norms_golden");
        let (shape, xv) = fx.array("act.x");
        let x = Tensor::from_slice(xv, shape.as_slice(), &Device::Cpu)?;
        let check = |name: &str, y: Tensor| {
            let (_, expected) = fx.array(name);
            let got: Vec<f64> = y.to_vec1().expect("vec");
            crate::testing::assert_close_slice(&got, expected, 1e-14);
        };
        check(
            "act.smooth_leaky_relu",
            smooth_leaky_relu(&x, SMOOTH_LEAKY_RELU_SLOPE)?,
        );
        check(
            "act.scaled_smooth_leaky_relu",
            scaled_smooth_leaky_relu(&x)?,
        );
        check("act.scaled_silu", scaled_silu(&x)?);
        Ok(())
    }

    #[test]
    fn first_and_second_derivatives_match_finite_differences() -> Result<()> {
        let x = (random_tensor(&[5, 7], DType::F64, 3)? * 3.0)?;
        for f in [
            Function::Silu,
            Function::Sigmoid,
            Function::SmoothLeakyRelu(0.2),
            Function::SmoothLeakyRelu(0.05),
        ] {
            let op = move |t: &Tensor| {
                t.contiguous()?.apply_op1(Elementwise {
                    function: f,
                    order: 0,
                })
            };
            check_gradient(op, &x, 1e-6)?.assert_within(1e-8);
            // The derivative op's own backward (second derivative).
            let d1 = move |t: &Tensor| {
                t.contiguous()?.apply_op1(Elementwise {
                    function: f,
                    order: 1,
                })
            };
            check_gradient(d1, &x, 1e-6)?.assert_within(1e-8);
        }
        Ok(())
    }

    #[test]
    fn gate_activation_gates_each_degree() -> Result<()> {
        let (n, c, lmax, mmax) = (3, 4, 3, 1);
        let gate = GateActivation::new(lmax, mmax, c)?;
        assert_eq!(gate.num_coefficients(), 1 + 3 + 3 + 3);
        let x = random_tensor(&[n, gate.num_coefficients(), c], DType::F64, 1)?;
        let g = random_tensor(&[n, lmax * c], DType::F64, 2)?;
        let y = gate.forward(&g, &x)?;
        let xv: Vec<f64> = x.flatten_all()?.to_vec1()?;
        let gv: Vec<f64> = g.flatten_all()?.to_vec1()?;
        let yv: Vec<f64> = y.flatten_all()?.to_vec1()?;
        let k = gate.num_coefficients();
        for i in 0..n {
            for j in 0..k {
                let l = if j == 0 { 0 } else { 1 + (j - 1) / 3 };
                for ch in 0..c {
                    let xi = xv[(i * k + j) * c + ch];
                    let expected = if l == 0 {
                        xi * sigmoid64(xi)
                    } else {
                        xi * sigmoid64(gv[i * lmax * c + (l - 1) * c + ch])
                    };
                    assert!((yv[(i * k + j) * c + ch] - expected).abs() < 1e-14);
                }
            }
        }
        check_gradient(|t| gate.forward(&g, t).map_err(candle_err), &x, 1e-6)?.assert_within(1e-8);
        check_gradient(|t| gate.forward(t, &x).map_err(candle_err), &g, 1e-6)?.assert_within(1e-8);
        assert!(gate.forward(&g, &x.narrow(1, 0, 5)?).is_err());
        Ok(())
    }

    fn candle_err(e: EquivariantError) -> candle_core::Error {
        candle_core::Error::Msg(e.to_string())
    }
}
