//! Executing the grid: the sweep lock, the manifest, one training process per run, resume.
//!
//! Each run is `xtask train --config runs/<id>/run.toml --out runs/<id>` in its own process,
//! with `RAYON_NUM_THREADS` set to its share of the cores and its output in
//! `runs/<id>/train.log`. Processes are spawned from the main thread only, polled every
//! 200 ms, and the live view reads each run's `metrics.jsonl` tail.
//!
//! **Kill safety.** `sweep.lock` holds an OS lock (`flock`) for the life of the sweep, so a
//! second sweep on the same directory is refused, and a sweep killed with `kill -9` leaves no
//! stale lock (the kernel drops it with the process). Each run also has `run.lock`, locked by
//! the sweep and handed to the trainer as its standard input: the trainer process holds the
//! lock until it exits, whoever its parent is. On Linux the trainer additionally asks the
//! kernel to kill it when the sweep dies (`PR_SET_PDEATHSIG`), so a killed sweep leaves no
//! orphan training; where that is not available (or in the instants between the sweep's death
//! and the signal) the next sweep waits on `run.lock` until the old trainer is gone before it
//! relaunches that run, so two trainers never write one run directory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use matscale_trainer::{MetricsLine, RunResult};
use serde::{Deserialize, Serialize};

use super::plan::{duration, Plan, PlannedRun};

/// State of a run in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Not started (or interrupted with its sweep; it resumes from its checkpoint).
    Pending,
    /// A trainer is working on it.
    Running,
    /// `result.json` is written.
    Done,
    /// The trainer failed; `error` says why. A later sweep retries it.
    Failed,
}

/// One run in `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Run id (its directory under `runs/`).
    pub id: String,
    /// Fit group (family or `family@dataset`).
    pub group: String,
    /// Parameter count.
    pub n_parameters: usize,
    /// Training structures (when known before the run).
    pub n_train: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// Epochs.
    pub epochs: u64,
    /// Estimated training FLOPs.
    pub est_flops: Option<f64>,
    /// State.
    pub state: RunState,
    /// Launches so far (resumes included).
    pub attempts: u32,
    /// The error of the last failed attempt.
    pub error: Option<String>,
    /// Best validation loss (done runs).
    pub val_loss: Option<f64>,
    /// Training FLOPs (done runs).
    pub training_flops: Option<f64>,
    /// Wall time of the training, s (done runs, all attempts).
    pub wall_time_s: Option<f64>,
}

/// `manifest.json`: the sweep's runs and their states, rewritten atomically on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Sweep name.
    pub name: String,
    /// Runs in grid order.
    pub runs: Vec<ManifestEntry>,
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_atomic(
            &dir.join("manifest.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    /// Counts of (done, failed, running, pending).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let c = |s| self.runs.iter().filter(|r| r.state == s).count();
        (
            c(RunState::Done),
            c(RunState::Failed),
            c(RunState::Running),
            c(RunState::Pending),
        )
    }
}

/// Writes through a temporary file in the same directory and renames it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// An exclusive OS lock on a file, released when dropped or when the process dies.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

/// Outcome of a non-blocking lock attempt.
enum TryLock {
    Acquired(FileLock),
    Busy(File),
}

fn open_lock(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))
}

fn flock(file: &File, blocking: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = if blocking {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: `file` owns an open descriptor for the duration of the call; flock only
        // changes the lock state of the open file description.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !blocking => return Ok(false),
            _ => return Err(err),
        }
    }
}

impl FileLock {
    fn try_acquire(path: &Path) -> anyhow::Result<TryLock> {
        let file = open_lock(path)?;
        if flock(&file, false).with_context(|| format!("locking {}", path.display()))? {
            Ok(TryLock::Acquired(FileLock { file }))
        } else {
            Ok(TryLock::Busy(file))
        }
    }

    /// Locks the sweep directory `dir` (`sweep.lock`), or fails at once naming the process
    /// that holds it.
    pub fn sweep(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("sweep.lock");
        match Self::try_acquire(&path)? {
            TryLock::Acquired(lock) => {
                use std::io::Write;
                let mut f = &lock.file;
                f.set_len(0)?;
                writeln!(f, "{}", std::process::id())?;
                Ok(lock)
            }
            TryLock::Busy(mut file) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                bail!(
                    "another sweep (pid {}) is running in {}; wait for it or stop it first \
                     (`cargo xtask sweep status {}` shows its progress)",
                    pid.trim(),
                    dir.display(),
                    dir.display()
                )
            }
        }
    }

    /// True when some process holds the lock at `path`.
    pub fn is_held(path: &Path) -> bool {
        if !path.exists() {
            return false;
        }
        matches!(Self::try_acquire(path), Ok(TryLock::Busy(_)))
    }

    /// Locks `run_dir/run.lock`, waiting for a trainer left over from an earlier sweep.
    fn run(run_dir: &Path, log: &dyn Fn(String)) -> anyhow::Result<Self> {
        let path = run_dir.join("run.lock");
        match Self::try_acquire(&path)? {
            TryLock::Acquired(lock) => Ok(lock),
            TryLock::Busy(file) => {
                log(format!(
                    "waiting for a trainer of an earlier sweep to leave {}",
                    run_dir.display()
                ));
                flock(&file, true).with_context(|| format!("locking {}", path.display()))?;
                Ok(FileLock { file })
            }
        }
    }
}

/// Options of one execution.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Parallel trainings.
    pub jobs: usize,
    /// Threads of each training (`RAYON_NUM_THREADS`).
    pub threads: usize,
    /// The `xtask` binary that trains (normally the current executable).
    pub trainer_exe: PathBuf,
}

/// Reads `dir/runs/<id>/result.json` when the run finished.
pub fn read_result(run_dir: &Path) -> anyhow::Result<Option<RunResult>> {
    let path = run_dir.join("result.json");
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
    ))
}

/// The last complete line of `metrics.jsonl`.
fn last_metrics(run_dir: &Path) -> Option<MetricsLine> {
    let mut f = File::open(run_dir.join("metrics.jsonl")).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut buf = String::new();
    f.read_to_string(&mut buf).ok()?;
    buf.lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .find_map(|l| serde_json::from_str(l).ok())
}

/// The error a failed trainer printed (the `Error:` block of its log, or its last lines).
fn error_of(log: &Path, status: std::process::ExitStatus) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: &str = match text.rfind("Error: ") {
        Some(i) => &text[i..],
        None => {
            let lines: Vec<&str> = text.lines().rev().take(3).collect();
            return format!(
                "trainer exited with {status}: {}",
                lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
    };
    let msg: String = tail.split_whitespace().collect::<Vec<_>>().join(" ");
    let msg: String = msg.chars().take(600).collect();
    format!("trainer exited with {status}: {msg}")
}

struct Active {
    index: usize,
    child: Child,
    bar: ProgressBar,
    started: Instant,
}

/// The live view: a sweep bar and one bar per active run (hidden when stderr is not a
/// terminal, where plain event lines are printed instead).
struct View {
    multi: MultiProgress,
    sweep: ProgressBar,
    tty: bool,
}

impl View {
    fn new(total_cost: u64) -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let sweep = multi.add(ProgressBar::new(total_cost.max(1)));
        sweep.set_style(
            ProgressStyle::with_template(
                "sweep [{bar:30.cyan/blue}] {msg} [{elapsed_precise}, ETA {eta}]",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        sweep.enable_steady_tick(Duration::from_millis(500));
        Self { multi, sweep, tty }
    }

    fn log(&self, line: String) {
        if self.tty {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }
}

/// Runs every unfinished run of `plan` in `dir` and returns the final manifest. Finished runs
/// (`result.json` present) are skipped; interrupted and failed ones are launched again and
/// resume from their checkpoints.
pub fn execute(plan: &Plan, dir: &Path, options: &RunOptions) -> anyhow::Result<Manifest> {
    let runs_dir = dir.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .with_context(|| format!("creating {}", runs_dir.display()))?;
    let previous = Manifest::read(dir).ok();
    let mut manifest = Manifest {
        name: plan.config.name.clone(),
        runs: Vec::with_capacity(plan.runs.len()),
    };
    // Every run directory either is new or was made by the same configuration.
    for r in &plan.runs {
        let run_dir = runs_dir.join(&r.id);
        let toml_text = toml::to_string_pretty(&r.config)
            .with_context(|| format!("serialising the configuration of {}", r.id))?;
        let path = run_dir.join("run.toml");
        if let Ok(old) = std::fs::read_to_string(&path) {
            if old != toml_text {
                bail!(
                    "{} was made by a different configuration than this sweep's; use another \
                     --out directory or delete that run directory",
                    run_dir.display()
                );
            }
        } else {
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?;
            write_atomic(&path, toml_text.as_bytes())?;
        }
        let old = previous
            .as_ref()
            .and_then(|m| m.runs.iter().find(|e| e.id == r.id));
        let mut entry = ManifestEntry {
            id: r.id.clone(),
            group: r.group.clone(),
            n_parameters: r.n_parameters,
            n_train: r.n_train,
            seed: r.seed,
            epochs: r.epochs,
            est_flops: r.est_flops,
            state: RunState::Pending,
            attempts: old.map_or(0, |e| e.attempts),
            error: old.and_then(|e| e.error.clone()),
            val_loss: None,
            training_flops: None,
            wall_time_s: None,
        };
        if let Some(result) = read_result(&run_dir)? {
            entry.state = RunState::Done;
            entry.error = None;
            entry.val_loss = Some(result.best_val_loss);
            entry.training_flops = Some(result.training_flops);
            entry.wall_time_s = Some(result.wall_time_s);
        } else if old.is_some_and(|e| e.state == RunState::Failed) {
            entry.state = RunState::Failed;
        }
        manifest.runs.push(entry);
    }
    manifest.write(dir)?;

    let cost = |r: &PlannedRun| r.est_time_s.unwrap_or(1.0);
    let unit = 1000.0; // bar units per estimated second
    let total: f64 = plan.runs.iter().map(cost).sum();
    let view = View::new((total * unit) as u64);
    let mut done_cost: f64 = plan
        .runs
        .iter()
        .zip(&manifest.runs)
        .filter(|(_, e)| e.state == RunState::Done)
        .map(|(r, _)| cost(r))
        .sum();
    // Longest first: the makespan of N parallel jobs is shortest when the big runs start early.
    let mut todo: Vec<usize> = (0..plan.runs.len())
        .filter(|&i| manifest.runs[i].state != RunState::Done)
        .collect();
    todo.sort_by(|&a, &b| cost(&plan.runs[b]).total_cmp(&cost(&plan.runs[a])));
    let mut queue: VecDeque<usize> = todo.into();
    let already = plan.runs.len() - queue.len();
    if already > 0 {
        view.log(format!(
            "{already} of {} runs already finished in {}; {} to go",
            plan.runs.len(),
            dir.display(),
            queue.len()
        ));
    }
    let mut active: Vec<Active> = Vec::new();
    let mut failed_now = 0usize;
    let parent_pid = std::process::id();
    let run_style =
        ProgressStyle::with_template("  {prefix:<34} [{bar:20}] {pos}/{len} steps {msg}")
            .expect("the template is valid")
            .progress_chars("=> ");
    loop {
        while active.len() < options.jobs {
            let Some(index) = queue.pop_front() else {
                break;
            };
            let r = &plan.runs[index];
            let run_dir = runs_dir.join(&r.id);
            let lock = FileLock::run(&run_dir, &|m| view.log(m))?;
            // A leftover trainer may have finished the run while we waited for its lock.
            if let Some(result) = read_result(&run_dir)? {
                mark_done(&mut manifest.runs[index], &result);
                done_cost += cost(r);
                manifest.write(dir)?;
                continue;
            }
            let log_path = run_dir.join("train.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            let mut cmd = Command::new(&options.trainer_exe);
            cmd.arg("train")
                .arg("--config")
                .arg(run_dir.join("run.toml"))
                .arg("--out")
                .arg(&run_dir)
                .env("RAYON_NUM_THREADS", options.threads.to_string())
                .stdin(Stdio::from(lock.file))
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log));
            die_with_parent(&mut cmd, parent_pid);
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", options.trainer_exe.display()))?;
            let entry = &mut manifest.runs[index];
            entry.state = RunState::Running;
            entry.attempts += 1;
            manifest.write(dir)?;
            let bar = view
                .multi
                .add(ProgressBar::new(r.total_steps().unwrap_or(1)));
            bar.set_style(run_style.clone());
            bar.set_prefix(r.id.clone());
            active.push(Active {
                index,
                child,
                bar,
                started: Instant::now(),
            });
        }
        if active.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut k = 0;
        let mut running_cost = 0.0;
        while k < active.len() {
            let a = &mut active[k];
            let r = &plan.runs[a.index];
            let status = a
                .child
                .try_wait()
                .with_context(|| format!("waiting for the trainer of {}", r.id))?;
            let run_dir = runs_dir.join(&r.id);
            match status {
                None => {
                    if let Some(line) = last_metrics(&run_dir) {
                        let (step, msg) = match line {
                            MetricsLine::Step {
                                step, epoch, loss, ..
                            } => (step, format!("epoch {} loss {:.4}", epoch + 1, loss.total)),
                            MetricsLine::Epoch {
                                step,
                                epoch,
                                best_val_loss,
                                ..
                            } => (
                                step,
                                format!("epoch {epoch} done, best val {best_val_loss:.4}"),
                            ),
                            MetricsLine::NonFinite { step, .. } => (step, "non-finite step".into()),
                        };
                        a.bar.set_position(step);
                        a.bar.set_message(msg);
                    }
                    let frac = a.bar.position() as f64 / a.bar.length().unwrap_or(1).max(1) as f64;
                    running_cost += frac.min(1.0) * cost(r);
                    k += 1;
                }
                Some(status) => {
                    let a = active.swap_remove(k);
                    a.bar.finish_and_clear();
                    view.multi.remove(&a.bar);
                    let entry = &mut manifest.runs[a.index];
                    let elapsed = a.started.elapsed().as_secs_f64();
                    match (status.success(), read_result(&run_dir)) {
                        (true, Ok(Some(result))) => {
                            mark_done(entry, &result);
                            done_cost += cost(r);
                            view.log(format!(
                                "done   {:<36} N {:>9}  D {:>7}  val loss {:.5}  ({})",
                                r.id,
                                result.n_parameters,
                                result.n_train,
                                result.best_val_loss,
                                duration(elapsed)
                            ));
                        }
                        (ok, result) => {
                            entry.state = RunState::Failed;
                            entry.error = Some(match result {
                                Err(e) => format!("{e:#}"),
                                Ok(_) if ok => "trainer exited without result.json".into(),
                                Ok(_) => error_of(&run_dir.join("train.log"), status),
                            });
                            failed_now += 1;
                            done_cost += cost(r);
                            view.log(format!(
                                "FAILED {:<36} {}",
                                r.id,
                                entry.error.as_deref().unwrap_or("")
                            ));
                        }
                    }
                    manifest.write(dir)?;
                }
            }
        }
        let (done, failed, _, _) = manifest.counts();
        view.sweep
            .set_position(((done_cost + running_cost) * unit) as u64);
        view.sweep.set_message(format!(
            "{done}/{} runs{}",
            plan.runs.len(),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        ));
    }
    view.sweep.finish_and_clear();
    if failed_now > 0 {
        view.log(format!(
            "{failed_now} runs failed; their errors are in {}",
            dir.join("manifest.json").display()
        ));
    }
    Ok(manifest)
}

fn mark_done(entry: &mut ManifestEntry, result: &RunResult) {
    entry.state = RunState::Done;
    entry.error = None;
    entry.val_loss = Some(result.best_val_loss);
    entry.training_flops = Some(result.training_flops);
    entry.wall_time_s = Some(result.wall_time_s);
    entry.n_train = Some(result.n_train);
}

/// Makes the child die with the sweep (Linux: `PR_SET_PDEATHSIG`). The signal is tied to the
/// thread that spawns, which is why the sweep spawns from its main thread only.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command, parent_pid: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The sweep may have died between fork and prctl: then nobody will signal us.
            if libc::getppid() as u32 != parent_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command, _parent_pid: u32) {}
