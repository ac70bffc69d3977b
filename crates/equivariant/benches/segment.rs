//! Segment softmax and segment sum over edges sorted by target node (f32), next to candle's
//! `index_add` for the sum.
//!
//! Reference: `s2grid_torch.py` beside this file (PyG-style softmax and `index_add_`, 2 threads).
//! Run: `cargo bench -p matscale-equivariant --bench segment`.

#![allow(missing_docs)] // criterion_group! generates an undocumented public function

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use matscale_equivariant::segment::Segments;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sorted random targets with 20 edges per node on average (EquiformerV2's max_neighbors).
fn targets(edges: usize) -> (Vec<u32>, usize) {
    let nodes = edges / 20;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut index: Vec<u32> = (0..edges).map(|_| rng.gen_range(0..nodes as u32)).collect();
    index.sort_unstable();
    (index, nodes)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("segment");
    group.sample_size(20);
    for (edges, heads) in [(10_000, 8), (100_000, 8)] {
        let (index, nodes) = targets(edges);
        let seg = Segments::from_indices(&index, nodes).expect("segments");
        let x = Tensor::randn(0f32, 1.0, (edges, heads), &Device::Cpu).expect("input");
        let w = Tensor::randn(0f32, 1.0, (edges, heads), &Device::Cpu).expect("weights");
        group.bench_function(format!("softmax/fwd/e{edges}_h{heads}"), |b| {
            b.iter(|| seg.softmax(&x).expect("softmax"));
        });
        let var = Var::from_tensor(&x).expect("var");
        group.bench_function(format!("softmax/fwd_bwd/e{edges}_h{heads}"), |b| {
            b.iter(|| {
                let y = seg.softmax(var.as_tensor()).expect("softmax");
                y.mul(&w)
                    .and_then(|t| t.sum_all())
                    .and_then(|s| s.backward())
                    .expect("backward")
            });
        });
    }
    for (edges, width) in [(10_000, 25 * 64), (100_000, 128)] {
        let (index, nodes) = targets(edges);
        let seg = Segments::from_indices(&index, nodes).expect("segments");
        let x = Tensor::randn(0f32, 1.0, (edges, width), &Device::Cpu).expect("input");
        group.bench_function(format!("sum/fwd/e{edges}_w{width}"), |b| {
            b.iter(|| seg.sum(&x).expect("sum"));
        });
        let idx = seg.index_tensor(&Device::Cpu).expect("index");
        group.bench_function(format!("sum_index_add/fwd/e{edges}_w{width}"), |b| {
            b.iter(|| {
                Tensor::zeros((nodes, width), x.dtype(), &Device::Cpu)
                    .and_then(|z| z.index_add(&idx, &x, 0))
                    .expect("index_add")
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
