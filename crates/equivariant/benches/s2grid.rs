//! S2 activation at EquiformerV2 sizes (f32, 18 × 18 grid, 10^4 rows): the fused forward and
//! forward + backward, next to the unfused composition to_grid → SiLU → from_grid.
//!
//! Reference: `s2grid_torch.py` beside this file (fairchem's einsum formulation, 2 threads).
//! Run: `cargo bench -p matscale-equivariant --bench s2grid`.

#![allow(missing_docs)] // criterion_group! generates an undocumented public function

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use matscale_equivariant::activation::silu;
use matscale_equivariant::s2grid::S2Grid;

const ROWS: usize = 10_000;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("s2_act");
    group.sample_size(10);
    for (lmax, mmax, channels) in [(4, 2, 64), (4, 4, 128), (6, 4, 128), (6, 6, 128)] {
        let grid = S2Grid::equiformer_v2(lmax, mmax, Some(18)).expect("grid");
        let k = grid.num_coefficients();
        let x = Tensor::randn(0f32, 1.0, (ROWS, k, channels), &Device::Cpu).expect("input");
        let id = format!("l{lmax}_m{mmax}_c{channels}_n{ROWS}");
        group.bench_function(format!("fwd/{id}"), |b| {
            b.iter(|| grid.s2_activation(&x).expect("s2 act"));
        });
        if (lmax, mmax) == (4, 4) {
            group.bench_function(format!("fwd_unfused/{id}"), |b| {
                b.iter(|| {
                    let g = grid.to_grid(&x).expect("to grid");
                    grid.from_grid(&silu(&g).expect("silu")).expect("from grid")
                });
            });
        }
        let var = Var::from_tensor(&x).expect("var");
        group.bench_function(format!("fwd_bwd/{id}"), |b| {
            b.iter(|| {
                let y = grid.s2_activation(var.as_tensor()).expect("s2 act");
                y.sum_all().and_then(|s| s.backward()).expect("backward")
            });
        });
        assert_eq!(x.dtype(), DType::F32);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
