//! `cargo xtask sweep`: the whole scaling study in one command — train a grid of models over
//! nested data sizes and model sizes, record every run, fit the scaling laws, write a report.
//!
//! Layout of a sweep directory (default `runs/<name>`):
//!
//! ```text
//! sweep.toml        the sweep file as given
//! sweep.lock        OS lock held while a sweep runs here
//! manifest.json     runs and their states (pending / running / done / failed + error)
//! runs/<id>/        one training run: run.toml, train.log, metrics.jsonl, checkpoint/,
//!                   best.safetensors, result.json (see matscale_trainer)
//! runs.csv          the runs table (docs/RUNS_TABLE.md)
//! fits.json         every fit (matscale_scaling::analysis::Analysis)
//! report.md/.html   grid, runs, fitted laws with 95% intervals, frontier, plots
//! loss_vs_*.svg/png, frontier.svg/png, ...
//! ```
//!
//! Modules: [`config`] (the TOML and its validation), [`plan`] (grid, data probe, cost),
//! [`runner`] (lock, manifest, processes, live view, resume), [`report`] (table, fits,
//! report).

pub mod config;
pub mod plan;
pub mod report;
pub mod runner;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};

use config::SweepConfig;
use plan::{grid_table, Plan};
use runner::{read_result, FileLock, Manifest, RunOptions, RunState};

/// The default sweep, embedded so that `cargo xtask sweep` works from any directory.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/sweeps/default.toml");

/// The workspace root (relative data paths of sweep files are tried there too).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

const ABOUT: &str = "\
Trains every run of a sweep file (families × sizes × nested data sizes × seeds), each as its own
`xtask train` process, then writes runs.csv, fits.json, report.md, report.html and the plots into
the sweep directory and prints the fitted exponents.

Without --config the embedded configs/sweeps/default.toml runs: EMT alloys generated on the fly,
FCN, Transformer and SchNet × 4 sizes × 5 data sizes (43 s on 2 quiet cores, 4–7 minutes on
2 busy ones).

The sweep is resumable: kill it at any moment (even kill -9) and run the same command again;
finished runs are kept, interrupted ones resume from their checkpoints, and the final table is
the one an uninterrupted sweep gives. A second sweep on the same directory is refused.

Examples:
  cargo xtask sweep
  cargo xtask sweep --config configs/sweeps/mlearn.toml --jobs 2
  cargo xtask sweep --config configs/sweeps/paper.toml --dry-run
  cargo xtask sweep status runs/default
  cargo xtask sweep report runs/default";

/// Run a scaling sweep (or show one's status).
#[derive(clap::Args)]
#[command(after_help = ABOUT, args_conflicts_with_subcommands = true)]
pub struct SweepArgs {
    #[command(subcommand)]
    action: Option<Action>,
    /// Sweep file [default: the embedded configs/sweeps/default.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sweep directory (default: the file's `out`, else `runs/NAME`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Parallel trainings [default: the file's `jobs`].
    #[arg(long)]
    jobs: Option<usize>,
    /// Threads per training [default: cores / jobs].
    #[arg(long)]
    threads: Option<usize>,
    /// Bootstrap resamples of the fits [default: the file's fit.bootstrap].
    #[arg(long)]
    bootstrap: Option<usize>,
    /// Print the grid with estimated FLOPs and time per run, then exit.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Show the progress of a sweep directory.
    Status {
        /// The sweep directory.
        dir: PathBuf,
    },
    /// Rebuild runs.csv, the fits and the report from the finished runs of a sweep directory.
    Report {
        /// The sweep directory.
        dir: PathBuf,
    },
}

/// Loads the sweep file (or the embedded default) and resolves relative data paths.
fn load(path: Option<&Path>) -> anyhow::Result<(SweepConfig, String)> {
    let (text, origin) = match path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_CONFIG.to_string(),
            "configs/sweeps/default.toml (embedded)".to_string(),
        ),
    };
    let mut config = SweepConfig::from_toml(&text, &origin)?;
    let root = workspace_root();
    // Data paths become absolute (relative ones are tried in the working directory, then in
    // the workspace root), so that run.toml files do not depend on where the sweep started.
    let fix = |p: &str| -> Option<String> {
        let path = Path::new(p);
        if p == "emt" || path.is_absolute() {
            return None;
        }
        [path.to_path_buf(), root.join(path)]
            .iter()
            .find_map(|c| c.canonicalize().ok())
            .map(|c| c.display().to_string())
    };
    let fix_data = |d: &mut matscale_trainer::source::DataConfig| {
        if let Some(s) = fix(&d.source) {
            d.source = s;
        }
        if let Some(v) = &d.val_source {
            if let Some(s) = fix(&v.display().to_string()) {
                d.val_source = Some(PathBuf::from(s));
            }
        }
    };
    if let Some(d) = config.data.as_mut() {
        fix_data(d);
    }
    for d in config.datasets.values_mut() {
        fix_data(d);
    }
    Ok((config, text))
}

/// Runs `cargo xtask sweep`.
pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    match &args.action {
        Some(Action::Status { dir }) => return status(dir),
        Some(Action::Report { dir }) => return rereport(dir, &args),
        None => {}
    }
    let (mut config, text) = load(args.config.as_deref())?;
    if let Some(b) = args.bootstrap {
        config.fit.bootstrap = b;
    }
    let jobs = args.jobs.unwrap_or(config.jobs).max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or((cores / jobs).max(1));
    let dir = args
        .out
        .clone()
        .or_else(|| config.out.clone())
        .unwrap_or_else(|| PathBuf::from("runs").join(&config.name));
    let mut plan = Plan::new(config, true)?;
    // Valid but probably unintended settings, once each (e.g. an EquiformerV2 radial range
    // that differs from the neighbour-list cutoff).
    let mut notes: Vec<String> = Vec::new();
    for run in &plan.runs {
        if let Ok(spec) = run.config.resolve() {
            for note in run.config.advisories(&spec) {
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
        }
    }
    for note in &notes {
        eprintln!("note: {note}");
    }
    let measured = plan.calibrate(&dir);
    if !measured.is_empty() {
        let rates: Vec<String> = measured
            .iter()
            .map(|(f, r)| format!("{f} {} FLOP/s", plan::human(*r)))
            .collect();
        eprintln!(
            "estimates use the rates measured by the finished runs in {}: {}",
            dir.display(),
            rates.join(", ")
        );
    }
    if args.dry_run {
        print!("{}", grid_table(&plan, jobs));
        return Ok(());
    }
    let start = Instant::now();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = FileLock::sweep(&dir)?;
    runner::write_atomic(&dir.join("sweep.toml"), text.as_bytes())?;
    let (_, time) = plan.totals();
    eprintln!(
        "sweep `{}`: {} runs in {}, {jobs} jobs × {threads} threads (estimated {})",
        plan.config.name,
        plan.runs.len(),
        dir.display(),
        plan::duration(time / jobs as f64)
    );
    let options = RunOptions {
        jobs,
        threads,
        trainer_exe: std::env::current_exe().context("locating the xtask executable")?,
    };
    let manifest = runner::execute(&plan, &dir, &options)?;
    let summary = finish(&plan, &manifest, &dir, Some(start), jobs, threads)?;
    print!("{summary}");
    let (_, failed, _, _) = manifest.counts();
    if failed > 0 {
        bail!(
            "{failed} of {} runs failed (errors in {}); the report covers the others. \
             Run the same command again to retry them.",
            manifest.runs.len(),
            dir.join("manifest.json").display()
        );
    }
    Ok(())
}

/// Builds the table, fits and report from the finished runs.
fn finish(
    plan: &Plan,
    manifest: &Manifest,
    dir: &Path,
    start: Option<Instant>,
    jobs: usize,
    threads: usize,
) -> anyhow::Result<String> {
    let mut finished = Vec::new();
    for r in &plan.runs {
        if let Some(result) = read_result(&dir.join("runs").join(&r.id))? {
            finished.push(report::Finished { run: r, result });
        }
    }
    if finished.is_empty() {
        bail!("no run finished in {}; nothing to fit", dir.display());
    }
    let failed = manifest
        .runs
        .iter()
        .filter(|e| e.state == RunState::Failed)
        .map(|e| (e.id.clone(), e.error.clone().unwrap_or_default()))
        .collect();
    let ctx = report::ReportContext {
        dir,
        wall_time_s: start.map(|s| s.elapsed().as_secs_f64()),
        jobs,
        threads,
        failed,
    };
    let summary = report::write(plan, &finished, &ctx)?;
    Ok(format!(
        "{summary}wrote {} (runs.csv, fits.json, report.md, report.html, plots){}\n",
        dir.display(),
        match (ctx.wall_time_s, start) {
            (Some(t), Some(s)) => format!(
                "; the sweep took {} ({} training, {} fitting and reporting)",
                plan::duration(s.elapsed().as_secs_f64()),
                plan::duration(t),
                plan::duration(s.elapsed().as_secs_f64() - t)
            ),
            _ => String::new(),
        }
    ))
}

fn rereport(dir: &Path, args: &SweepArgs) -> anyhow::Result<()> {
    let path = dir.join("sweep.toml");
    let (mut config, _) = load(Some(&path))?;
    if let Some(b) = args.bootstrap {
        config.fit.bootstrap = b;
    }
    let plan = Plan::new(config, true)?;
    let _lock = FileLock::sweep(dir)?;
    let manifest = Manifest::read(dir)?;
    let jobs = args.jobs.unwrap_or(plan.config.jobs).max(1);
    print!(
        "{}",
        finish(&plan, &manifest, dir, None, jobs, args.threads.unwrap_or(1))?
    );
    Ok(())
}

fn status(dir: &Path) -> anyhow::Result<()> {
    let manifest = Manifest::read(dir)?;
    let running = FileLock::is_held(&dir.join("sweep.lock"));
    let (mut done, mut failed, mut active, mut pending) = (0, 0, 0, 0);
    println!(
        "{:<40} {:>8} {:>11} {:>8} {:>10} {:>9}  error",
        "run", "state", "params", "D", "val loss", "time"
    );
    for e in &manifest.runs {
        // result.json is the truth: a run may have finished after the manifest was written.
        let result = read_result(&dir.join("runs").join(&e.id)).ok().flatten();
        let state = if result.is_some() {
            RunState::Done
        } else if e.state == RunState::Running && !running {
            RunState::Pending
        } else {
            e.state
        };
        match state {
            RunState::Done => done += 1,
            RunState::Failed => failed += 1,
            RunState::Running => active += 1,
            RunState::Pending => pending += 1,
        }
        let name = match state {
            RunState::Done => "done",
            RunState::Failed => "FAILED",
            RunState::Running => "running",
            RunState::Pending => "pending",
        };
        println!(
            "{:<40} {:>8} {:>11} {:>8} {:>10} {:>9}  {}",
            e.id,
            name,
            e.n_parameters,
            result
                .as_ref()
                .map(|r| r.n_train)
                .or(e.n_train)
                .map_or("?".into(), |n| n.to_string()),
            result
                .as_ref()
                .map_or("-".into(), |r| format!("{:.5}", r.best_val_loss)),
            result
                .as_ref()
                .map_or("-".into(), |r| plan::duration(r.wall_time_s)),
            e.error.as_deref().unwrap_or("")
        );
    }
    println!(
        "sweep `{}` in {}: {done}/{} done, {active} running, {pending} pending, {failed} failed; {}",
        manifest.name,
        dir.display(),
        manifest.runs.len(),
        if running {
            "a sweep is running here now"
        } else {
            "no sweep is running here (run the same command again to resume)"
        }
    );
    Ok(())
}
