//! extxyz reading speed on a ~100 MB file: 14,160 frames of 64-atom Cu with energy, forces and
//! stress, formatted the way `ase.io.write` formats them (`%16.8f` columns).
//!
//! The file is generated (seeded, deterministic) on first use at
//! `$TMPDIR/matscale-bench/cu64_100mb.extxyz` and reused; `extxyz_ase.py` beside this file
//! times `ase.io.read(f, index=':')` on the same file:
//!
//! ```text
//! cargo bench -p matscale-structures --bench extxyz
//! python3 crates/structures/benches/extxyz_ase.py
//! ```

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use matscale_structures::extxyz;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Frames in the benchmark file (the figure in shared/REFERENCE.md §9).
const FRAMES: usize = 14_160;

fn bench_file() -> PathBuf {
    let dir = std::env::temp_dir().join("matscale-bench");
    std::fs::create_dir_all(&dir).expect("create the benchmark directory");
    let path = dir.join("cu64_100mb.extxyz");
    if !path.exists() {
        let tmp = dir.join("cu64_100mb.extxyz.partial");
        write_file(&tmp).expect("write the benchmark file");
        std::fs::rename(&tmp, &path).expect("move the benchmark file into place");
    }
    path
}

/// 64-atom fcc Cu (2x2x4 conventional cells), randomly strained and rattled, with random labels.
fn write_file(path: &std::path::Path) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let mut out = BufWriter::new(File::create(path)?);
    let a = 3.61;
    let basis = [
        [0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0],
        [0.5, 0.0, 0.5],
        [0.0, 0.5, 0.5],
    ];
    for _ in 0..FRAMES {
        let mut cell = [
            [2.0 * a, 0.0, 0.0],
            [0.0, 2.0 * a, 0.0],
            [0.0, 0.0, 4.0 * a],
        ];
        for row in &mut cell {
            for x in row.iter_mut() {
                *x += rng.gen_range(-0.05..0.05);
            }
        }
        let stress: [f64; 6] = std::array::from_fn(|_| rng.gen_range(-0.01..0.01));
        let energy = -3.7 * 64.0 + rng.gen_range(-1.0..1.0);
        writeln!(out, "64")?;
        let l: Vec<String> = cell.iter().flatten().map(|x| format!("{x}")).collect();
        let s = [
            stress[0], stress[5], stress[4], stress[5], stress[1], stress[3], stress[4], stress[3],
            stress[2],
        ];
        let s: Vec<String> = s.iter().map(|x| format!("{x}")).collect();
        writeln!(
            out,
            "Lattice=\"{}\" Properties=species:S:1:pos:R:3:forces:R:3 energy={energy} stress=\"{}\" pbc=\"T T T\"",
            l.join(" "),
            s.join(" ")
        )?;
        for i in 0..2 {
            for j in 0..2 {
                for k in 0..4 {
                    for b in &basis {
                        let f = [
                            (i as f64 + b[0]) / 2.0,
                            (j as f64 + b[1]) / 2.0,
                            (k as f64 + b[2]) / 4.0,
                        ];
                        let mut r = [0.0; 3];
                        for c in 0..3 {
                            r[c] = f[0] * cell[0][c]
                                + f[1] * cell[1][c]
                                + f[2] * cell[2][c]
                                + rng.gen_range(-0.1..0.1);
                        }
                        let force: [f64; 3] = std::array::from_fn(|_| rng.gen_range(-1.0..1.0));
                        writeln!(
                            out,
                            "Cu {:16.8} {:16.8} {:16.8} {:16.8} {:16.8} {:16.8}",
                            r[0], r[1], r[2], force[0], force[1], force[2]
                        )?;
                    }
                }
            }
        }
    }
    out.flush()
}

fn read(c: &mut Criterion) {
    let path = bench_file();
    let bytes = std::fs::metadata(&path).expect("benchmark file").len();
    eprintln!(
        "benchmark file {} ({:.1} MB); rayon threads: {}",
        path.display(),
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    let mut group = c.benchmark_group("extxyz_read_100mb");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    for parallel in [true, false] {
        let name = if parallel { "parallel" } else { "sequential" };
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut frames = 0usize;
                for s in extxyz::read_path(&path).expect("open").parallel(parallel) {
                    let s = s.expect("valid frame");
                    frames += s.len();
                }
                assert_eq!(frames, FRAMES * 64);
            })
        });
    }
    group.finish();
}

/// CPU time (user + system) of this process so far, seconds (Linux; `None` elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses): utime is the 12th, stime 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// CPU and wall seconds per read, sequential and parallel: CPU time is comparable with ASE's
/// `time.process_time()` even when other processes load the machine (wall-clock time is not).
fn cpu_time(_c: &mut Criterion) {
    let path = bench_file();
    let repeats = 5;
    for parallel in [false, true] {
        let (Some(t0), wall) = (cpu_seconds(), std::time::Instant::now()) else {
            return;
        };
        for _ in 0..repeats {
            let n = extxyz::read_path(&path)
                .expect("open")
                .parallel(parallel)
                .map(|s| s.expect("valid frame").len())
                .sum::<usize>();
            assert_eq!(n, FRAMES * 64);
        }
        let cpu = cpu_seconds().unwrap_or(t0) - t0;
        eprintln!(
            "{} read, mean of {repeats}: {:.3} s CPU, {:.3} s wall",
            if parallel { "parallel" } else { "sequential" },
            cpu / repeats as f64,
            wall.elapsed().as_secs_f64() / repeats as f64
        );
    }
}

criterion_group!(benches, read, cpu_time);
criterion_main!(benches);
