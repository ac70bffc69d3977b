//! Spherical harmonics and edge Wigner-D blocks at EquiformerV2 sizes.
//!
//! `cargo bench -p matscale-equivariant --bench sh`; the side-by-side comparison with e3nn is
//! `crates/equivariant/benches/sh_compare.sh` (see docs/BENCHMARKS.md).

// `criterion_group!` defines an undocumented `pub fn benches`.
#![allow(missing_docs)]

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use matscale_equivariant::frames::{edge_wigner, Roll};
use matscale_equivariant::sh::{spherical_harmonics, spherical_harmonics_into, Normalization};

fn random_vectors(n: usize, dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1f32, (n, 3), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random vectors")
}

fn bench_sh(c: &mut Criterion) {
    let mut group = c.benchmark_group("spherical_harmonics");
    group.sample_size(20);
    let n = 1_000_000;
    for (lmax, dtype) in [(6, DType::F32), (4, DType::F32), (6, DType::F64)] {
        let x = random_vectors(n, dtype);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new(format!("forward_l{lmax}_{dtype:?}"), n),
            &x,
            |b, x| {
                b.iter(|| spherical_harmonics(x, lmax, true, Normalization::Component).expect("sh"))
            },
        );
    }
    // The same into a reused output buffer (no allocation, no page faults).
    let x = random_vectors(n, DType::F32);
    let out = Tensor::zeros((n, 49), DType::F32, &Device::Cpu).expect("buffer");
    group.bench_with_input(BenchmarkId::new("forward_into_l6_F32", n), &x, |b, x| {
        b.iter(|| spherical_harmonics_into(x, &out, 6, true, Normalization::Component).expect("sh"))
    });
    // Forward + backward of sum(Y * w) at l ≤ 6, f32, 10^5 vectors.
    let n = 100_000;
    let x = candle_core::Var::from_tensor(&random_vectors(n, DType::F32)).expect("var");
    let w = Tensor::randn(0f32, 1f32, (n, 49), &Device::Cpu).expect("weights");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(BenchmarkId::new("forward_backward_l6_F32", n), |b| {
        b.iter(|| {
            let y =
                spherical_harmonics(x.as_tensor(), 6, true, Normalization::Component).expect("sh");
            let loss = (y * &w).and_then(|t| t.sum_all()).expect("loss");
            loss.backward().expect("backward")
        })
    });
    group.finish();
}

fn bench_edge_wigner(c: &mut Criterion) {
    let mut group = c.benchmark_group("edge_wigner");
    group.sample_size(10);
    for (n, lmax) in [(10_000, 4), (100_000, 4), (100_000, 6)] {
        let e = random_vectors(n, DType::F32);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new(format!("l{lmax}_F32"), n), &e, |b, e| {
            b.iter(|| edge_wigner(e, lmax, &Roll::Random { seed: 1 }).expect("wigner"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_sh, bench_edge_wigner);
criterion_main!(benches);
