//! The radial MLP of [`RadialFunction::forward_gathered`](crate::radial::RadialFunction) as
//! one CPU op, forward and backward.
//!
//! Composed from candle ops, EquiformerV2's radial MLP (`[E, 600 + 2·ec] → ec → ec → out`,
//! LayerNorm + SiLU after each hidden linear) puts about a dozen edge-sized tensors in the
//! autograd graph, each zero-filled and accumulated into in the backward pass, and candle's
//! matmul backward also computes the gradient of the 600 distance features, which nothing
//! needs. Here each rayon task runs a chunk of edges through the whole MLP in task-local
//! scratch (single-threaded GEMMs) and writes only the `[E, out]` output; the backward pass
//! recomputes a chunk's activations, then writes the gradients of the parameters and of the
//! per-element tables' projections, never of the distance features.
//!
//! The parameters travel packed in one tensor (see [`Plan`]); the first linear's columns for
//! the gathered parts multiply the small tables outside the op (`P = table · W_partᵀ`, a few
//! rows per element), and the op adds the gathered rows of `P` to the first pre-activation.
//!
//! Deterministic: the backward pass splits the chunks into one contiguous part per rayon
//! thread, each accumulating its own parameter and table gradients, summed in part order.
//! First order only; the caller composes the same function from candle ops for higher orders.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::{Float, Function};
use crate::buffer::{with_cpu_slice, zeroed_vec};
use crate::float_kernel::{run_float, FloatKernel};
use crate::linalg::{gemm, view};
use crate::norm_act::{backward_block, forward_block, BlockInputs};

/// Edges per task.
const CHUNK: usize = 256;

/// Layer sizes and the layout of the packed parameters:
/// `[W₁ (dense columns) | b₁ | γ₀ | β₀ | (W_i | b_i | γ_{i−1} | β_{i−1}) for i = 2.. | W_last | b_last]`,
/// every matrix row-major `[out, in]`.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// `[d0, c1, …, cn]`: the dense input width, then the layer widths.
    dims: Vec<usize>,
    eps: f64,
    /// Offsets of each hidden layer's parameters.
    layers: Vec<HiddenOffsets>,
    /// Offsets of the last linear's weight and bias.
    last_w: usize,
    last_b: usize,
}

/// Offsets of one hidden layer's parameters in the packed tensor.
#[derive(Debug, Clone, Copy)]
struct HiddenOffsets {
    weight: usize,
    bias: usize,
    norm: usize,
}

impl Plan {
    /// For dense width `d0` and widths `[c1, …, cn]` (at least one hidden layer).
    pub(crate) fn new(d0: usize, widths: &[usize], eps: f64) -> Self {
        let mut dims = vec![d0];
        dims.extend_from_slice(widths);
        let hidden = dims.len() - 2;
        let mut off = 0;
        let mut layers = Vec::with_capacity(hidden);
        for i in 0..hidden {
            let (c_in, c) = (dims[i], dims[i + 1]);
            let weight = off;
            let bias = weight + c * c_in;
            let norm = bias + c;
            off = norm + 2 * c;
            layers.push(HiddenOffsets { weight, bias, norm });
        }
        let last_w = off;
        let last_b = last_w + dims[hidden + 1] * dims[hidden];
        Self {
            dims,
            eps,
            layers,
            last_w,
            last_b,
        }
    }

    fn hidden(&self) -> usize {
        self.layers.len()
    }

    /// Width of hidden layer `i` (`c_{i+1}`).
    fn width(&self, i: usize) -> usize {
        self.dims[i + 1]
    }

    fn out_width(&self) -> usize {
        self.dims[self.dims.len() - 1]
    }

    /// Elements of the packed parameters.
    pub(crate) fn param_len(&self) -> usize {
        self.last_b + self.out_width()
    }
}

/// The gathered rows added to the first pre-activation: edge `e` adds row
/// `offset_p + index_p[e]` of `P` for every part `p`.
#[derive(Debug, Clone)]
pub(crate) struct Gathered {
    /// Per part: `(row offset in P, index per edge)`.
    pub(crate) parts: Vec<(usize, Vec<u32>)>,
    /// Rows of `P`.
    pub(crate) rows: usize,
}

/// The op: `(P [rows, c1], packed parameters)` → `[E, cn]`, the dense input `[E, d0]` held.
#[derive(Debug, Clone)]
pub(crate) struct RadialMlpOp {
    pub(crate) plan: Plan,
    /// `[E, d0]`, contiguous, without a gradient.
    pub(crate) dense: Tensor,
    pub(crate) gathered: std::sync::Arc<Gathered>,
}

/// A chunk's scratch: pre-activations and activations of every hidden layer, and two
/// gradient rows buffers.
struct Scratch<T> {
    pre: Vec<Vec<T>>,
    act: Vec<Vec<T>>,
    grad: Vec<T>,
    grad_pre: Vec<T>,
    norm: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new(plan: &Plan) -> Self {
        let rows = |i: usize| vec![T::ZERO; CHUNK * plan.width(i)];
        let widest = plan.dims[1..].iter().copied().max().unwrap_or(0);
        Self {
            pre: (0..plan.hidden()).map(rows).collect(),
            act: (0..plan.hidden()).map(rows).collect(),
            grad: vec![T::ZERO; CHUNK * widest],
            grad_pre: vec![T::ZERO; CHUNK * widest],
            norm: vec![T::ZERO; 2 * widest],
        }
    }
}

struct Inputs<'a, T> {
    plan: &'a Plan,
    dense: &'a [T],
    p: &'a [T],
    params: &'a [T],
    gathered: &'a Gathered,
}

impl<T: Float> Inputs<'_, T> {
    /// Runs the hidden layers of edges `e0..e0 + ne` into the scratch.
    fn hidden_forward(&self, e0: usize, ne: usize, s: &mut Scratch<T>) {
        let plan = self.plan;
        let eps = T::from_f64(plan.eps);
        let one = T::ONE;
        for (i, l) in plan.layers.iter().enumerate() {
            let (c_in, c) = (plan.dims[i], plan.width(i));
            let pre = &mut s.pre[i][..ne * c];
            let bias = &self.params[l.bias..l.bias + c];
            for row in pre.chunks_exact_mut(c) {
                row.copy_from_slice(bias);
            }
            if i == 0 {
                for (e, row) in pre.chunks_exact_mut(c).enumerate() {
                    for (off, index) in &self.gathered.parts {
                        let r = off + index[e0 + e] as usize;
                        for (o, &v) in row.iter_mut().zip(&self.p[r * c..(r + 1) * c]) {
                            *o += v;
                        }
                    }
                }
                gemm(
                    (ne, c, c_in),
                    pre,
                    0,
                    c,
                    true,
                    view(self.dense, e0 * c_in, c_in, 1),
                    view(self.params, l.weight, 1, c_in),
                    one,
                );
            } else {
                gemm(
                    (ne, c, c_in),
                    pre,
                    0,
                    c,
                    true,
                    view(&s.act[i - 1], 0, c_in, 1),
                    view(self.params, l.weight, 1, c_in),
                    one,
                );
            }
            let (gamma, beta) = self.params[l.norm..l.norm + 2 * c].split_at(c);
            forward_block(
                &s.pre[i][..ne * c],
                gamma,
                beta,
                eps,
                Some(Function::Silu),
                &mut s.act[i][..ne * c],
            );
        }
    }

    fn forward_chunk(&self, e0: usize, out: &mut [T], s: &mut Scratch<T>) {
        let plan = self.plan;
        let cn = plan.out_width();
        let ne = out.len() / cn;
        self.hidden_forward(e0, ne, s);
        let (last_w, last_b) = (plan.last_w, plan.last_b);
        let c_in = plan.dims[plan.dims.len() - 2];
        for row in out.chunks_exact_mut(cn) {
            row.copy_from_slice(&self.params[last_b..last_b + cn]);
        }
        gemm(
            (ne, cn, c_in),
            out,
            0,
            cn,
            true,
            view(&s.act[plan.hidden() - 1], 0, c_in, 1),
            view(self.params, last_w, 1, c_in),
            T::ONE,
        );
    }

    /// Adds the gradients of edges `e0..e0 + ne` (output gradient `g`) to `dp` and `dparams`.
    fn backward_chunk(
        &self,
        e0: usize,
        g: &[T],
        (dp, dparams): (&mut [T], &mut [T]),
        s: &mut Scratch<T>,
    ) {
        let plan = self.plan;
        let cn = plan.out_width();
        let ne = g.len() / cn;
        self.hidden_forward(e0, ne, s);
        let (last_w, last_b) = (plan.last_w, plan.last_b);
        let eps = T::from_f64(plan.eps);
        let one = T::ONE;
        let h = plan.hidden();
        let c_last = plan.width(h - 1);
        // Last linear.
        gemm(
            (cn, c_last, ne),
            dparams,
            last_w,
            c_last,
            true,
            view(g, 0, 1, cn),
            view(&s.act[h - 1], 0, c_last, 1),
            one,
        );
        add_row_sums(&mut dparams[last_b..last_b + cn], g);
        gemm(
            (ne, c_last, cn),
            &mut s.grad,
            0,
            c_last,
            false,
            view(g, 0, cn, 1),
            view(self.params, last_w, c_last, 1),
            one,
        );
        // Hidden layers, last to first: s.grad holds ∂(activation) of layer i.
        for i in (0..h).rev() {
            let l = plan.layers[i];
            let (c_in, c) = (plan.dims[i], plan.width(i));
            let (gamma, beta) = self.params[l.norm..l.norm + 2 * c].split_at(c);
            let inputs = BlockInputs {
                x: &s.pre[i][..ne * c],
                g: &s.grad[..ne * c],
                w: gamma,
                b: beta,
            };
            backward_block(
                inputs,
                eps,
                Some(Function::Silu),
                &mut s.grad_pre[..ne * c],
                &mut dparams[l.norm..l.norm + 2 * c],
                &mut s.norm[..2 * c],
            );
            let dpre = &s.grad_pre[..ne * c];
            add_row_sums(&mut dparams[l.bias..l.bias + c], dpre);
            if i == 0 {
                gemm(
                    (c, c_in, ne),
                    dparams,
                    l.weight,
                    c_in,
                    true,
                    view(dpre, 0, 1, c),
                    view(self.dense, e0 * c_in, c_in, 1),
                    one,
                );
                for (e, row) in dpre.chunks_exact(c).enumerate() {
                    for (off, index) in &self.gathered.parts {
                        let r = off + index[e0 + e] as usize;
                        for (d, &v) in dp[r * c..(r + 1) * c].iter_mut().zip(row) {
                            *d += v;
                        }
                    }
                }
            } else {
                gemm(
                    (c, c_in, ne),
                    dparams,
                    l.weight,
                    c_in,
                    true,
                    view(dpre, 0, 1, c),
                    view(&s.act[i - 1], 0, c_in, 1),
                    one,
                );
                gemm(
                    (ne, c_in, c),
                    &mut s.grad,
                    0,
                    c_in,
                    false,
                    view(dpre, 0, c, 1),
                    view(self.params, l.weight, c_in, 1),
                    one,
                );
            }
        }
    }
}

/// `acc[j] += Σ_rows rows[r, j]`.
fn add_row_sums<T: Float>(acc: &mut [T], rows: &[T]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

fn forward<T: Float>(inputs: &Inputs<'_, T>, edges: usize) -> Vec<T> {
    let cn = inputs.plan.out_width();
    let mut out = zeroed_vec::<T>(edges * cn);
    let min_len = crate::buffer::min_task_len(edges.div_ceil(CHUNK));
    out.par_chunks_mut(CHUNK * cn)
        .enumerate()
        .with_min_len(min_len)
        .for_each_init(
            || Scratch::new(inputs.plan),
            |s, (chunk, o)| inputs.forward_chunk(chunk * CHUNK, o, s),
        );
    out
}

/// `[dP (rows · c1) | dparams]`.
fn backward<T: Float>(inputs: &Inputs<'_, T>, g: &[T], edges: usize) -> Vec<T> {
    let plan = inputs.plan;
    let (cn, c1) = (plan.out_width(), plan.width(0));
    let dp_len = inputs.gathered.rows * c1;
    let param_len = plan.param_len();
    let chunks = edges.div_ceil(CHUNK);
    let parts = rayon::current_num_threads().clamp(1, chunks.max(1));
    let partials: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut acc = vec![T::ZERO; dp_len + param_len];
            let mut s = Scratch::new(plan);
            let (dp, dparams) = acc.split_at_mut(dp_len);
            for chunk in p * chunks / parts..(p + 1) * chunks / parts {
                let e0 = chunk * CHUNK;
                let ne = CHUNK.min(edges - e0);
                let gc = &g[e0 * cn..(e0 + ne) * cn];
                inputs.backward_chunk(e0, gc, (&mut *dp, &mut *dparams), &mut s);
            }
            acc
        })
        .collect();
    let mut out = vec![T::ZERO; dp_len + param_len];
    for partial in &partials {
        for (o, &v) in out.iter_mut().zip(partial) {
            *o += v;
        }
    }
    out
}

impl RadialMlpOp {
    /// `E`, after checking the inputs' sizes against the plan.
    fn edges(&self, p: &Layout, params: &Layout) -> candle_core::Result<usize> {
        let plan = &self.plan;
        let (edges, d0) = self.dense.dims2()?;
        let ok = d0 == plan.dims[0]
            && p.shape().dims() == [self.gathered.rows, plan.width(0)]
            && params.shape().elem_count() == plan.param_len()
            && self.gathered.parts.iter().all(|(off, index)| {
                index.len() == edges
                    && index
                        .iter()
                        .all(|&i| off + (i as usize) < self.gathered.rows)
            });
        if !ok {
            candle_core::bail!(
                "radial mlp: dense {:?}, tables {:?}, parameters {:?} do not fit the layers {:?}",
                self.dense.shape(),
                p.shape(),
                params.shape(),
                plan.dims
            );
        }
        Ok(edges)
    }

    /// Runs `f` on the inputs (`P` and the packed parameters, contiguous, with their
    /// layouts) and the held dense features.
    fn with_inputs<T: Float, R>(
        &self,
        (p, lp): (&[T], &Layout),
        (params, lw): (&[T], &Layout),
        f: impl FnOnce(&Inputs<'_, T>, usize) -> R,
    ) -> candle_core::Result<R> {
        let edges = self.edges(lp, lw)?;
        with_cpu_slice(&self.dense, "radial mlp", |dense| {
            let inputs = Inputs {
                plan: &self.plan,
                dense,
                p,
                params,
                gathered: &self.gathered,
            };
            Ok(f(&inputs, edges))
        })
    }
}

/// Inputs `(P, packed parameters)`.
impl FloatKernel<2> for RadialMlpOp {
    fn run<T: Float>(&self, [p, w]: [(&[T], &Layout); 2]) -> candle_core::Result<Vec<T>> {
        self.with_inputs(p, w, |inputs, edges| forward(inputs, edges))
    }
}

impl CustomOp2 for RadialMlpOp {
    fn name(&self) -> &'static str {
        "radial-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let edges = self.edges(l1, l2)?;
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
        Ok((out, Shape::from((edges, self.plan.out_width()))))
    }

    fn bwd(
        &self,
        p: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let back = RadialMlpBackward {
            op: self.clone(),
            grad: grad_res.contiguous()?,
        };
        let flat = p.apply_op2_no_bwd(params, &back)?;
        let n = p.elem_count();
        let dp = flat.narrow(0, 0, n)?.reshape(p.shape())?;
        let dparams = flat.narrow(0, n, params.elem_count())?;
        Ok((Some(dp), Some(dparams)))
    }
}

/// The backward of [`RadialMlpOp`]: `(P, params)` → `[dP | dparams]`, holding `∂out`.
struct RadialMlpBackward {
    op: RadialMlpOp,
    grad: Tensor,
}

/// Inputs `(P, packed parameters)`; the output gradient is held.
impl FloatKernel<2> for RadialMlpBackward {
    fn run<T: Float>(&self, [p, w]: [(&[T], &Layout); 2]) -> candle_core::Result<Vec<T>> {
        let name = "radial-mlp-backward";
        let cn = self.op.plan.out_width();
        with_cpu_slice(&self.grad, name, |g| {
            self.op
                .with_inputs(p, w, |inputs, edges| {
                    (g.len() == edges * cn).then(|| backward(inputs, g, edges))
                })?
                .ok_or_else(|| candle_core::Error::Msg(format!("{name}: gradient size")))
        })
    }
}

impl CustomOp2 for RadialMlpBackward {
    fn name(&self) -> &'static str {
        "radial-mlp-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        let out = run_float(self.name(), [(s1, l1), (s2, l2)], self)?;
        Ok((out, Shape::from(len)))
    }
}
