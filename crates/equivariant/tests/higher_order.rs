//! Gradients of gradients through the fused ops' differentiable fallbacks.
//!
//! With `CANDLE_GRAD_DO_NOT_DETACH` set (what `matscale_models::enable_higher_order_gradients`
//! does, e.g. to train on conservative forces) the SO(2) layers, S2 activations and the
//! LayerNorm + activation op compose themselves from ops that have backwards of their own. Each
//! test checks a second derivative, `∂/∂b ⟨v, ∂/∂a ⟨w, f(a, b)⟩⟩`, against central finite
//! differences of the analytic first derivative (f64).
//!
//! This file is its own test binary (own process) because the setting is process-wide and
//! would switch the other tests of the crate to the composed paths.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use matscale_equivariant::activation::Function;
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::norm_act::layer_norm_act;
use matscale_equivariant::s2grid::S2Grid;
use matscale_equivariant::so2::{MessageGather, So2ConvConfig, So2Convolution};
use matscale_equivariant::wigner::WignerBlocks;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn enable() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    assert!(matscale_equivariant::higher_order_gradients_requested());
}

/// Deterministic pseudo-random normal-ish values.
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            let mut sum = 0.0;
            for _ in 0..4 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                sum += (state >> 11) as f64 / (1u64 << 53) as f64;
            }
            (sum - 2.0) * 1.7
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(n, seed), dims, &Device::Cpu).expect("tensor")
}

fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all().expect("flatten").to_vec1().expect("host")
}

/// `g(a, b) = ⟨v, ∂/∂a ⟨w, f(a, b)⟩⟩` with its graph kept; `∂g/∂b` from autograd is compared
/// with central differences of `g` in a few entries of `b` (step 1e-5), relative to the
/// largest derivative.
fn check_second_derivative(
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
    a: &Tensor,
    b: &Tensor,
    entries: &[usize],
) -> f64 {
    let g = |a: &Var, b: &Tensor| -> Tensor {
        let out = f(a.as_tensor(), b);
        let w = tensor(out.dims(), 11);
        let grads = (out * w).unwrap().sum_all().unwrap().backward().unwrap();
        let da = grads.get(a.as_tensor()).expect("a gets a gradient");
        let v = tensor(da.dims(), 12);
        (da * v).unwrap().sum_all().unwrap()
    };
    let a_var = Var::from_tensor(a).unwrap();
    let b_var = Var::from_tensor(b).unwrap();
    let second = g(&a_var, b_var.as_tensor()).backward().unwrap();
    let analytic = host(
        second
            .get(b_var.as_tensor())
            .expect("b gets a second derivative"),
    );
    let b0 = host(b);
    let h = 1e-5;
    let mut worst = 0.0f64;
    let scale = analytic.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    for &i in entries {
        let shifted = |delta: f64| -> f64 {
            let mut bv = b0.clone();
            bv[i] += delta;
            let bt = Tensor::from_vec(bv, b.dims(), &Device::Cpu).unwrap();
            g(&Var::from_tensor(a).unwrap(), &bt)
                .to_scalar::<f64>()
                .unwrap()
        };
        let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
        worst = worst.max((numeric - analytic[i]).abs() / scale);
    }
    assert!(scale > 1e-6, "the second derivative is not trivially zero");
    worst
}

fn conv(layout: SphericalLayout, c_in: usize, c_out: usize, extra: usize) -> So2Convolution {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let config = So2ConvConfig::new(layout, c_in, c_out).with_extra_m0_outputs(extra);
    let conv = So2Convolution::new(&config, vb).expect("convolution");
    for (i, var) in varmap.all_vars().iter().enumerate() {
        var.set(&tensor(var.dims(), 40 + i as u64)).unwrap();
    }
    conv
}

fn frames(edges: usize, lmax: usize) -> WignerBlocks {
    let vectors = tensor(&[edges, 3], 5);
    matscale_equivariant::frames::edge_wigner(
        &vectors,
        lmax,
        &matscale_equivariant::frames::Roll::Zero,
    )
    .expect("frames")
}

/// The SO(2) convolution is bilinear in the input and the radial weights: `∂²/∂x∂r` through
/// the per-edge, rotated and gathered forms.
#[test]
fn so2_layers_have_second_derivatives() -> TestResult {
    enable();
    let layout = SphericalLayout::new(3, 2)?;
    let (edges, nodes) = (6, 4);
    let conv = conv(layout, 4, 3, 2);
    let wigner = frames(edges, 3);
    let r = tensor(&[edges, conv.radial_len()], 2);
    let entries = [0, 5, 17, 30, 44];
    let x = tensor(&[edges, layout.num_truncated(), 4], 1);
    let err = check_second_derivative(
        |x, r| {
            let (y, extra) = conv.forward(x, Some(r)).unwrap();
            Tensor::cat(
                &[
                    y.flatten_all().unwrap(),
                    extra.unwrap().flatten_all().unwrap(),
                ],
                0,
            )
            .unwrap()
        },
        &x,
        &r,
        &entries,
    );
    assert!(err < 1e-7, "per-edge: {err:e}");
    let x_full = tensor(&[edges, layout.num_coefficients(), 4], 3);
    let err = check_second_derivative(
        |x, r| conv.forward_rotated(x, &wigner, Some(r)).unwrap().0,
        &x_full,
        &r,
        &entries,
    );
    assert!(err < 1e-7, "rotated: {err:e}");
    let nodes_x = tensor(&[nodes, layout.num_coefficients(), 2], 4);
    let gather = MessageGather::pair(
        &Tensor::new(&[0u32, 1, 2, 3, 3, 1], &Device::Cpu)?,
        &Tensor::new(&[1u32, 1, 0, 2, 0, 3], &Device::Cpu)?,
        nodes,
    )?;
    let err = check_second_derivative(
        |x, r| {
            conv.forward_gather_rotate_in(x, &gather, &wigner, Some(r))
                .unwrap()
                .0
        },
        &nodes_x,
        &r,
        &entries,
    );
    assert!(err < 1e-7, "gathered: {err:e}");
    Ok(())
}

/// The separable S2 activation (SiLU on the grid): `∂²/∂x²`.
#[test]
fn s2_activation_has_second_derivatives() -> TestResult {
    enable();
    let grid = S2Grid::equiformer_v2(2, 1, Some(8))?;
    let k = grid.num_coefficients();
    let x = tensor(&[3, k, 2], 6);
    let scalars = tensor(&[3, 2], 7);
    let err = check_second_derivative(
        |a, b| {
            // f(a, b) = act(scalars, a + b): ∂²/∂a∂b is the activation's Hessian.
            grid.separable_s2_activation(&scalars, &(a + b).unwrap())
                .unwrap()
        },
        &x,
        &tensor(&[3, k, 2], 8),
        &[0, 4, 9, 13, 20],
    );
    assert!(err < 1e-6, "separable S2 activation: {err:e}");
    Ok(())
}

/// LayerNorm + SiLU: `∂²/∂x∂weight`.
#[test]
fn layer_norm_act_has_second_derivatives() -> TestResult {
    enable();
    let x = tensor(&[4, 6], 9);
    let bias = tensor(&[6], 10);
    let err = check_second_derivative(
        |x, w| layer_norm_act(x, w, &bias, 1e-5, Some(Function::Silu)).unwrap(),
        &x,
        &(tensor(&[6], 13) + 1.0)?,
        &[0, 2, 5],
    );
    assert!(err < 1e-6, "layer_norm_act: {err:e}");
    Ok(())
}

/// The differentiable edge frames (`frames_diff`, used by conservative EquiformerV2): the
/// gradient of `Σ w·D(r)` with respect to the edge vectors is itself differentiable in `w`
/// (and in `r`): `∂²/∂r∂w` against finite differences.
#[test]
fn differentiable_frames_have_second_derivatives() -> TestResult {
    enable();
    let lmax = 3;
    let r = tensor(&[4, 3], 14);
    let len = matscale_equivariant::wigner::blocks_len(lmax);
    let w = tensor(&[4, len], 15);
    let err = check_second_derivative(
        |r, w| {
            let blocks = matscale_equivariant::frames_diff::zero_roll_wigner(r, lmax).unwrap();
            let flat: Vec<Tensor> = blocks.iter().map(|b| b.flatten_from(1).unwrap()).collect();
            Tensor::cat(&flat, 1).unwrap().mul(w).unwrap()
        },
        &r,
        &w,
        &[0, 7, len + 3, 3 * len - 1],
    );
    assert!(err < 1e-6, "frames: {err:e}");
    Ok(())
}

/// The rotations differentiable in their blocks: the mixed second derivatives `∂²/∂x∂D` both
/// ways and, through frames built from edge vectors (`zero_roll_wigner`), `∂²/∂r∂x` (what
/// training on conservative forces differentiates), in both directions; and both mixed
/// derivatives of a round trip into the frame, a square and back.
#[test]
fn differentiable_rotations_have_second_derivatives() -> TestResult {
    use matscale_equivariant::so2::{rotate_differentiable, rotate_inv_differentiable};
    enable();
    let layout = SphericalLayout::new(3, 2)?;
    let (edges, c) = (4, 3);
    let len = layout.wigner_len();
    let w = tensor(&[edges, len], 21);
    let r = tensor(&[edges, 3], 22);
    let flat = |r: &Tensor| -> Tensor {
        let blocks = matscale_equivariant::frames_diff::zero_roll_wigner(r, 3).unwrap();
        let flat: Vec<Tensor> = blocks.iter().map(|b| b.flatten_from(1).unwrap()).collect();
        Tensor::cat(&flat, 1).unwrap()
    };
    for to_edge in [true, false] {
        let rows = if to_edge {
            layout.num_coefficients()
        } else {
            layout.num_truncated()
        };
        let x = tensor(&[edges, rows, c], 23);
        let rot = |x: &Tensor, w: &Tensor| -> Tensor {
            if to_edge {
                rotate_differentiable(x, w, layout).unwrap()
            } else {
                rotate_inv_differentiable(x, w, layout).unwrap()
            }
        };
        let entries_x = [0, 5, rows * c + 2, edges * rows * c - 1];
        let entries_w = [0, 4, len + 10, edges * len - 1];
        let what = |k: &str| format!("to_edge {to_edge}: {k}");
        let err = check_second_derivative(|x, w| rot(x, w), &x, &w, &entries_w);
        assert!(err < 1e-6, "{}: {err:e}", what("∂²/∂x∂D"));
        let err = check_second_derivative(|w, x| rot(x, w), &w, &x, &entries_x);
        assert!(err < 1e-6, "{}: {err:e}", what("∂²/∂D∂x"));
        let err = check_second_derivative(|r, x| rot(x, &flat(r)), &r, &x, &entries_x);
        assert!(err < 1e-6, "{}: {err:e}", what("∂²/∂r∂x"));
        if to_edge {
            // The round trip a message makes (into the frame, a nonlinearity, back).
            let trip = |r: &Tensor, x: &Tensor| -> Tensor {
                let d = flat(r);
                let y = rotate_differentiable(x, &d, layout).unwrap();
                rotate_inv_differentiable(&(&y * &y).unwrap(), &d, layout).unwrap()
            };
            let err = check_second_derivative(trip, &r, &x, &entries_x);
            assert!(err < 1e-6, "{}: {err:e}", what("round trip ∂²/∂r∂x"));
            let err = check_second_derivative(|x, r| trip(r, x), &x, &r, &[0, 4, 3 * edges - 1]);
            assert!(err < 1e-6, "{}: {err:e}", what("round trip ∂²/∂x∂r"));
        }
    }
    Ok(())
}
