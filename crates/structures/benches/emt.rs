//! EMT labelling throughput on random 32-atom fcc alloys (the default `cargo xtask data gen`
//! structures, seed 0): one thread, and all threads with rayon. Compared with ASE's EMT by
//! `benches/emt_ase.py`, which labels the same structures (see docs/BENCHMARKS.md).

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use matscale_structures::emt::Emt;
use matscale_structures::generate::AlloyGenerator;
use rayon::prelude::*;

/// Structures per measured iteration.
const N: u64 = 256;

fn emt_labelling(c: &mut Criterion) {
    let emt = Emt::new();
    let mut group = c.benchmark_group("emt");
    for (name, supercell) in [("32-atom", [2, 2, 2]), ("256-atom", [4, 4, 4])] {
        let generator = AlloyGenerator {
            supercells: vec![supercell],
            ..AlloyGenerator::default()
        }
        .check()
        .expect("default generator settings are valid");
        let structures = generator.generate(0..N);
        group.throughput(Throughput::Elements(N));
        group.bench_function(format!("{name} alloys, 1 thread"), |b| {
            b.iter(|| {
                for s in &structures {
                    black_box(emt.calculate(black_box(s)).expect("EMT metals only"));
                }
            })
        });
        group.bench_function(format!("{name} alloys, rayon"), |b| {
            b.iter(|| {
                structures.par_iter().for_each(|s| {
                    black_box(emt.calculate(black_box(s)).expect("EMT metals only"));
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, emt_labelling);
criterion_main!(benches);
