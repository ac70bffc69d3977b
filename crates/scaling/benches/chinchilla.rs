//! Joint-fit benchmark on the Chinchilla points (240 after dropping the 5
//! highest losses): the full 4500-start grid, and 1000 bootstrap refits
//! started from the full-data optimum. The Python reference is
//! `benches/chinchilla_reference.py`; `benches/compare.sh` runs both.

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use matscale_scaling::bootstrap::BootstrapOptions;
use matscale_scaling::chinchilla::{bootstrap_joint, refit_starts, RefitStarts};
use matscale_scaling::{fit_joint, JointFitOptions, RunsTable};

fn data() -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/chinchilla/chinchilla_svg_extracted_data.csv"
    );
    let table = RunsTable::read(Path::new(path), None).expect("Chinchilla file");
    let (kept, _) = table.exclude_top_loss(5).expect("245 runs");
    let runs = kept.runs();
    (
        runs.iter().map(|r| r.params).collect(),
        runs.iter().map(|r| r.train_structures).collect(),
        runs.iter().map(|r| r.val_loss).collect(),
    )
}

fn bench(c: &mut Criterion) {
    let (n, d, l) = data();
    let options = JointFitOptions::default();
    let mut group = c.benchmark_group("chinchilla");
    group.sample_size(10);
    group.bench_function("joint_fit_full_grid_4500_starts", |b| {
        b.iter(|| fit_joint(&n, &d, &l, &options).expect("fit"))
    });
    let fit = fit_joint(&n, &d, &l, &options).expect("fit");
    let starts = refit_starts(&fit.params, RefitStarts::Optimum, &options.grid);
    group.bench_function("bootstrap_1000_refits", |b| {
        b.iter(|| {
            bootstrap_joint(&n, &d, &l, &starts, &options, BootstrapOptions::default())
                .expect("bootstrap")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
