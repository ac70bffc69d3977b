//! Neighbour-list benchmark: rattled fcc Cu (a = 3.61 Å) at 6 Å, 10^3, 10^4 and 10^5 atoms.
//!
//! `bench_neighbors_reference.py` beside this file builds the same structures (same supercells,
//! same LCG rattle) and times matscipy and ASE on them; run it to get both in one run:
//!
//! ```text
//! /path/to/python crates/structures/benches/bench_neighbors_reference.py
//! ```
#![allow(missing_docs)] // criterion_group! generates an undocumented public function

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use matscale_structures::neighbors::neighbor_list;
use matscale_structures::Structure;

/// Knuth's MMIX linear congruential generator; the reference script uses the same one.
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `reps` conventional fcc Cu cells (4 atoms each), every coordinate rattled uniformly within
/// ±0.1 Å by the LCG seeded with 12345, in the order x, y, z of atom 0, then atom 1, ...
pub fn rattled_fcc_cu(reps: [usize; 3]) -> Structure {
    let a = 3.61;
    let basis = [
        [0.0, 0.0, 0.0],
        [0.0, 0.5, 0.5],
        [0.5, 0.0, 0.5],
        [0.5, 0.5, 0.0],
    ];
    let mut rng = Lcg(12345);
    let mut positions = Vec::with_capacity(4 * reps[0] * reps[1] * reps[2]);
    for i in 0..reps[0] {
        for j in 0..reps[1] {
            for k in 0..reps[2] {
                for b in &basis {
                    let mut p = [
                        (i as f64 + b[0]) * a,
                        (j as f64 + b[1]) * a,
                        (k as f64 + b[2]) * a,
                    ];
                    for x in &mut p {
                        *x += 0.2 * (rng.uniform() - 0.5);
                    }
                    positions.push(p);
                }
            }
        }
    }
    let cell = [
        [reps[0] as f64 * a, 0.0, 0.0],
        [0.0, reps[1] as f64 * a, 0.0],
        [0.0, 0.0, reps[2] as f64 * a],
    ];
    let numbers = vec![29; positions.len()];
    Structure::new(numbers, positions, cell, [true; 3]).expect("a valid fcc supercell")
}

/// Supercells of exactly 10^3, 10^4 and 10^5 atoms.
pub const SIZES: [[usize; 3]; 3] = [[5, 5, 10], [10, 10, 25], [25, 25, 40]];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("neighbor_list_fcc_cu_6A");
    group.sample_size(10);
    for reps in SIZES {
        let s = rattled_fcc_cu(reps);
        let pairs = neighbor_list(&s, 6.0).expect("neighbour list").len();
        eprintln!("{} atoms: {pairs} pairs", s.len());
        group.throughput(Throughput::Elements(s.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(s.len()), &s, |b, s| {
            b.iter(|| neighbor_list(s, 6.0).expect("neighbour list"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
