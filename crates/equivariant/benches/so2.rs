//! Rotation into edge frames + SO(2) convolution + rotation back, at EquiformerV2 sizes.
//!
//! `cargo bench -p matscale-equivariant --bench so2` (f32, 10^4 edges; set
//! `MATSCALE_BENCH_EDGES` for another count). Per configuration `l{lmax}_m{mmax}_c{C}`:
//!
//! * `forward`, `forward_backward`: the layer as one fused op
//!   ([`So2Convolution::forward_rotated`]), radial weights, `C → C` channels;
//!   forward+backward is `out.sum().backward()` with gradients for the input, the radial
//!   weights and every parameter.
//! * `composed_forward`, `composed_forward_backward`: the same layer from separate ops
//!   (`rotate` → `So2Convolution::forward` → `rotate_inv`).
//! * `rotate`, `so2_conv`, `rotate_inv`: the separate ops alone.
//!
//! The PyTorch reference (fairchem-style dense `bmm` path) is `benches/so2_torch.py`;
//! `benches/so2_compare.sh` runs both side by side and prints the ratios.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::BatchSize::PerIteration;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::so2::{rotate, rotate_inv, So2ConvConfig, So2Convolution};
use matscale_equivariant::wigner::WignerBlocks;

const CONFIGS: [(usize, usize, usize); 4] = [(4, 2, 64), (4, 2, 128), (6, 4, 64), (6, 4, 128)];

fn edges() -> usize {
    std::env::var("MATSCALE_BENCH_EDGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

struct Setup {
    layout: SphericalLayout,
    conv: So2Convolution,
    wigner: WignerBlocks,
    x: Tensor,
    radial: Tensor,
}

fn setup(lmax: usize, mmax: usize, c: usize, edges: usize) -> Setup {
    let dev = Device::Cpu;
    let layout = SphericalLayout::new(lmax, mmax).expect("valid layout");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let conv = So2Convolution::new(&So2ConvConfig::new(layout, c, c), vb).expect("conv");
    let angles: Vec<(f64, f64, f64)> = (0..edges)
        .map(|i| {
            let t = i as f64;
            (0.37 * t, 0.11 * t, 0.73 * t)
        })
        .collect();
    let wigner = WignerBlocks::from_angles(&angles, lmax, DType::F32, &dev).expect("wigner");
    let x = Tensor::randn(0f32, 1., (edges, layout.num_coefficients(), c), &dev).expect("x");
    let radial = Tensor::randn(0f32, 1., (edges, conv.radial_len()), &dev).expect("radial");
    Setup {
        layout,
        conv,
        wigner,
        x,
        radial,
    }
}

/// The layer as one fused op.
fn layer(s: &Setup, x: &Tensor, radial: &Tensor) -> Tensor {
    s.conv
        .forward_rotated(x, &s.wigner, Some(radial))
        .expect("fused layer")
        .0
}

/// The layer from separate ops.
fn layer_composed(s: &Setup, x: &Tensor, radial: &Tensor) -> Tensor {
    let r = rotate(x, &s.wigner, s.layout).expect("rotate");
    let (y, _) = s.conv.forward(&r, Some(radial)).expect("conv");
    rotate_inv(&y, &s.wigner, s.layout).expect("rotate_inv")
}

/// Fresh leaf variables for the input and the radial weights (created outside the timed
/// region, as the PyTorch reference clones its inputs before starting the clock).
fn leaves(s: &Setup) -> (Var, Var) {
    (
        Var::from_tensor(&s.x).expect("var"),
        Var::from_tensor(&s.radial).expect("var"),
    )
}

fn forward_backward(
    s: &Setup,
    (x, radial): (Var, Var),
    f: fn(&Setup, &Tensor, &Tensor) -> Tensor,
) -> GradStore {
    let out = f(s, x.as_tensor(), radial.as_tensor());
    out.sum_all().expect("sum").backward().expect("backward")
}

fn bench_so2(c: &mut Criterion) {
    let edges = edges();
    let mut group = c.benchmark_group(format!("so2_layer_E{edges}"));
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(3));
    for (lmax, mmax, ch) in CONFIGS {
        let s = setup(lmax, mmax, ch, edges);
        let id = format!("l{lmax}_m{mmax}_c{ch}");
        group.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter(|| layer(&s, &s.x, &s.radial))
        });
        group.bench_function(BenchmarkId::new("forward_backward", &id), |b| {
            b.iter_batched(
                || leaves(&s),
                |v| forward_backward(&s, v, layer),
                PerIteration,
            )
        });
        group.bench_function(BenchmarkId::new("composed_forward", &id), |b| {
            b.iter(|| layer_composed(&s, &s.x, &s.radial))
        });
        group.bench_function(BenchmarkId::new("composed_forward_backward", &id), |b| {
            b.iter_batched(
                || leaves(&s),
                |v| forward_backward(&s, v, layer_composed),
                PerIteration,
            )
        });
        group.bench_function(BenchmarkId::new("rotate", &id), |b| {
            b.iter(|| rotate(&s.x, &s.wigner, s.layout).expect("rotate"))
        });
        let r = rotate(&s.x, &s.wigner, s.layout).expect("rotate");
        group.bench_function(BenchmarkId::new("so2_conv", &id), |b| {
            b.iter(|| s.conv.forward(&r, Some(&s.radial)).expect("conv"))
        });
        let (y, _) = s.conv.forward(&r, Some(&s.radial)).expect("conv");
        group.bench_function(BenchmarkId::new("rotate_inv", &id), |b| {
            b.iter(|| rotate_inv(&y, &s.wigner, s.layout).expect("rotate_inv"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_so2);
criterion_main!(benches);
