//! Times the Chinchilla joint fit (full 4500-start grid) and 1000 bootstrap
//! refits, printing wall-clock and process CPU seconds per phase, so that the
//! comparison with the scipy reference (`benches/chinchilla_reference.py`)
//! holds even on a machine shared with other work. Run by `benches/compare.sh`:
//! `cargo run --release -p matscale-scaling --example chinchilla_timing`.

use std::path::Path;
use std::time::Instant;

use matscale_scaling::bootstrap::BootstrapOptions;
use matscale_scaling::chinchilla::{bootstrap_joint, refit_starts, RefitStarts};
use matscale_scaling::{fit_joint, JointFitOptions, RunsTable};

/// Process CPU time (user + system) in seconds, from /proc/self/stat
/// (Linux; `None` elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks; USER_HZ is 100 on every mainstream configuration.
    Some((utime + stime) / 100.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/chinchilla/chinchilla_svg_extracted_data.csv"
    );
    let (table, _) = RunsTable::read(Path::new(path), None)?.exclude_top_loss(5)?;
    let n: Vec<f64> = table.runs().iter().map(|r| r.params).collect();
    let d: Vec<f64> = table.runs().iter().map(|r| r.train_structures).collect();
    let l: Vec<f64> = table.runs().iter().map(|r| r.val_loss).collect();
    let options = JointFitOptions::default();

    let (c0, t0) = (cpu_seconds(), Instant::now());
    let fit = fit_joint(&n, &d, &l, &options)?;
    let (c1, t1) = (cpu_seconds(), Instant::now());
    let starts = refit_starts(&fit.params, RefitStarts::Optimum, &options.grid);
    let boot = bootstrap_joint(&n, &d, &l, &starts, &options, BootstrapOptions::default())?;
    let (c2, t2) = (cpu_seconds(), Instant::now());
    let cpu = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(f64::NAN, |(a, b)| b - a);
    let alpha = boot.interval(3, fit.params.alpha);
    let beta = boot.interval(4, fit.params.beta);
    println!(
        "{{\"threads\": {}, \"grid_wall_s\": {:.3}, \"grid_cpu_s\": {:.2}, \"bootstrap_wall_s\": {:.3}, \"bootstrap_cpu_s\": {:.2}, \
         \"E\": {:.6}, \"A\": {:.3}, \"B\": {:.3}, \"alpha\": {:.6}, \"beta\": {:.6}, \"objective\": {:.10}, \
         \"alpha_ci\": [{:.4}, {:.4}], \"beta_ci\": [{:.4}, {:.4}]}}",
        rayon::current_num_threads(),
        (t1 - t0).as_secs_f64(),
        cpu(c0, c1),
        (t2 - t1).as_secs_f64(),
        cpu(c1, c2),
        fit.params.e,
        fit.params.a,
        fit.params.b,
        fit.params.alpha,
        fit.params.beta,
        fit.objective,
        alpha.lower,
        alpha.upper,
        beta.lower,
        beta.upper
    );
    Ok(())
}
