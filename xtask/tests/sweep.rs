//! `cargo xtask sweep` end to end: a tiny sweep produces the runs table and the report; the
//! same sweep killed with SIGKILL at random moments and rerun gives the same table; `--jobs 2`
//! gives the same table; a second sweep on a locked directory is refused; bad files name the
//! field.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// 2 families × 2 sizes × 2 nested data sizes, 2 epochs, 28 four-atom EMT alloys.
const TINY: &str = r#"
name = "tiny"
seeds = [0]
train_sizes = [8, 16]

[data]
source = "emt"
emt_structures = 28
val_fraction = 0.25

[data.emt]
supercells = [[1, 1, 1]]
seed = 3

[train]
epochs = 2
batch_size = 4
patience = 0
checkpoint_every = 1

[[families]]
family = "fcn"
sizes = [1e3, 3e3]

[[families]]
family = "schnet"
sizes = [1e3, 3e3]
max_lr = 2e-3

[fit]
bootstrap = 20
joint = false
"#;

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    c
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("sweep.toml.in");
    std::fs::write(&path, body).unwrap();
    path
}

fn sweep_cmd(config: &Path, out: &Path, jobs: &str) -> Command {
    let mut c = xtask();
    c.args(["sweep", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(["--jobs", jobs, "--threads", "1"]);
    c
}

/// The columns that must not depend on interruptions or parallelism (all but wall time).
fn stable_table(dir: &Path) -> Vec<Vec<String>> {
    let csv = std::fs::read_to_string(dir.join("runs.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = header
        .iter()
        .enumerate()
        .filter(|(_, h)| **h != "wall_time_s")
        .map(|(i, _)| i)
        .collect();
    assert!(header.contains(&"val_loss") && header.contains(&"flops"));
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| cells[i].to_string()).collect()
        })
        .collect()
}

struct Reference {
    _dir: tempfile::TempDir,
    out: PathBuf,
    table: Vec<Vec<String>>,
    seconds: f64,
}

/// The uninterrupted tiny sweep, run once per test binary.
fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), TINY);
        let out = dir.path().join("sweep");
        let start = Instant::now();
        let o = sweep_cmd(&config, &out, "1").output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let seconds = start.elapsed().as_secs_f64();
        Reference {
            table: stable_table(&out),
            out,
            _dir: dir,
            seconds,
        }
    })
}

#[test]
fn tiny_sweep_writes_table_fits_and_report() {
    let r = reference();
    let table = &r.table;
    assert_eq!(table.len(), 8, "2 families × 2 sizes × 2 data sizes");
    let csv = std::fs::read_to_string(r.out.join("runs.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    for row in &rows {
        let d: usize = row[col("train_structures")].parse().unwrap();
        assert!(d == 8 || d == 16, "{row:?}");
        assert_eq!(row[col("train_atoms")], (4 * d).to_string(), "{row:?}");
        let loss: f64 = row[col("val_loss")].parse().unwrap();
        let flops: f64 = row[col("flops")].parse().unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        assert!(flops > 0.0);
        let parts: f64 = ["val_energy", "val_force", "val_stress"]
            .iter()
            .map(|c| row[col(c)].parse::<f64>().unwrap())
            .sum();
        assert!((parts - loss).abs() <= 1e-9 * loss, "{parts} vs {loss}");
        assert_eq!(row[col("epochs")], "2");
    }
    // Same model on twice the data: about twice the training FLOPs (2 epochs of 8 vs 16
    // structures; not exactly, as the structures' edge counts differ).
    for a in &rows {
        for b in &rows {
            if a[col("model")] == b[col("model")]
                && a[col("params")] == b[col("params")]
                && a[col("train_structures")] == "8"
                && b[col("train_structures")] == "16"
            {
                let fa: f64 = a[col("flops")].parse().unwrap();
                let fb: f64 = b[col("flops")].parse().unwrap();
                assert!((fb / fa - 2.0).abs() < 0.1, "{fa} {fb}");
            }
        }
    }
    let report = std::fs::read_to_string(r.out.join("report.md")).unwrap();
    for needle in ["## Grid", "## Runs", "## Fits", "fcn", "schnet", "frontier"] {
        assert!(report.contains(needle), "report.md lacks {needle}");
    }
    let html = std::fs::read_to_string(r.out.join("report.html")).unwrap();
    assert!(html.contains("<svg"), "report.html embeds the plots");
    assert!(r.out.join("fits.json").exists());
    assert!(r.out.join("loss_vs_data.svg").exists());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.out.join("manifest.json")).unwrap())
            .unwrap();
    let runs = manifest["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8);
    assert!(runs.iter().all(|r| r["state"] == "done"), "{manifest}");

    // Status shows everything done; a rerun does no training and keeps the table.
    let o = xtask()
        .args(["sweep", "status"])
        .arg(&r.out)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("8/8 done"), "{t}");
}

#[test]
fn jobs_2_gives_the_same_table() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY);
    let out = dir.path().join("sweep");
    let o = sweep_cmd(&config, &out, "2").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(stable_table(&out), r.table);
}

/// Bytes of `metrics.jsonl` of every run directory without `result.json`: runs that
/// started training and have not finished.
fn progress(out: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(out.join("runs")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let p = e.path();
            let len = std::fs::metadata(p.join("metrics.jsonl")).ok()?.len();
            (len > 0 && !p.join("result.json").exists()).then_some((p, len))
        })
        .collect()
}

#[test]
fn killed_at_random_moments_then_resumed_gives_the_same_table() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY);
    let out = dir.path().join("sweep");
    // Pseudo-random kill times (printed on failure): odd kills at a random moment in
    // (0.05, 0.5) of the uninterrupted duration, even kills as soon as a run is seen training
    // (so that those land inside a training).
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 10_000) as f64 / 10_000.0
    };
    let mut kills = Vec::new();
    let mut interrupted = 0;
    // At least four kills; more (up to twelve) until one has landed inside a training, which
    // on a fast machine the first ones may miss (the tiny runs take a few tens of ms).
    for k in 0..12 {
        if k >= 4 && interrupted > 0 {
            break;
        }
        let mut child = sweep_cmd(&config, &out, "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut seen_training = false;
        if k % 2 == 0 {
            std::thread::sleep(Duration::from_secs_f64(
                r.seconds * (0.05 + 0.45 * uniform()),
            ));
        } else {
            // Wait for new training progress in this sweep (or its end), then kill at once:
            // a run was training when it was seen.
            let before = progress(&out);
            while child.try_wait().unwrap().is_none() {
                if progress(&out)
                    .iter()
                    .any(|(p, len)| before.iter().all(|(q, old)| q != p || old < len))
                {
                    seen_training = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        kills.push(start.elapsed().as_secs_f64());
        // SIGKILL: no clean-up in the sweep; its trainers die with it (PR_SET_PDEATHSIG).
        child.kill().unwrap();
        child.wait().unwrap();
        if seen_training || !progress(&out).is_empty() {
            interrupted += 1;
        }
    }
    assert!(
        interrupted > 0,
        "no kill at {kills:?} s interrupted a training"
    );
    let o = sweep_cmd(&config, &out, "1").output().unwrap();
    assert!(o.status.success(), "kills at {kills:?} s: {}", text(&o));
    assert_eq!(
        stable_table(&out),
        r.table,
        "kills at {kills:?} s changed the table"
    );
}

#[test]
fn a_second_sweep_on_a_locked_directory_is_refused() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY);
    let out = dir.path().join("sweep");
    std::fs::create_dir_all(&out).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(out.join("sweep.lock"))
        .unwrap();
    // SAFETY: `lock` owns an open descriptor for the duration of the call.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let o = sweep_cmd(&config, &out, "1").output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("another sweep"), "{t}");
    assert!(!out.join("manifest.json").exists(), "nothing was written");
    drop(lock);
}

#[test]
fn invalid_sweep_files_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            TINY.replace("train_sizes = [8, 16]", "train_sizes = [16, 8]"),
            "train_sizes[1]",
        ),
        (
            TINY.replace("sizes = [1e3, 3e3]\nmax_lr", "sizes = [1e3, -5.0]\nmax_lr"),
            "families[1].sizes[1]",
        ),
        (
            TINY.replace("family = \"fcn\"", "family = \"gemnet\""),
            "family",
        ),
        (
            TINY.replace("train_sizes = [8, 16]", "train_sizes = [8, 5000]"),
            "train_sizes[1]",
        ),
        (TINY.replace("epochs = 2", "epochs = 2\nbogus = 1"), "bogus"),
        (
            TINY.replace("emt_structures = 28", "emt_structures = 28\ntrain_size = 4"),
            "data.train_size",
        ),
        (TINY.replace("seeds = [0]", "seeds = []"), "seeds"),
    ];
    for (i, (body, field)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&config, body).unwrap();
        let o = xtask()
            .args(["sweep", "--dry-run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let t = text(&o);
        assert!(!o.status.success(), "case {i} was accepted: {t}");
        assert!(
            t.contains(field),
            "case {i}: the error does not name `{field}`: {t}"
        );
    }
}

#[test]
fn dry_run_prints_the_grid_with_costs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY);
    let o = xtask()
        .args(["sweep", "--dry-run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("8 runs = 4 models (2 families)"), "{t}");
    for id in ["fcn-N1k-D8-s0", "schnet-N3k-D16-s0"] {
        assert!(t.contains(id), "{t}");
    }
    assert!(t.contains("training FLOPs"), "{t}");
    // The embedded default and the shipped sweep files are valid.
    for file in [
        None,
        Some("configs/sweeps/mlearn.toml"),
        Some("configs/sweeps/paper.toml"),
    ] {
        let mut c = xtask();
        c.args(["sweep", "--dry-run"]);
        if let Some(f) = file {
            c.args(["--config", f]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{file:?}: {}", text(&o));
    }
}

#[test]
fn a_failed_run_is_recorded_and_the_others_go_on() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY);
    let out = dir.path().join("sweep");
    // A corrupt checkpoint makes one trainer fail when it tries to resume.
    let bad = out
        .join("runs")
        .join("schnet-N1k-D16-s0")
        .join("checkpoint");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("state.json"), "{ not json").unwrap();
    let o = sweep_cmd(&config, &out, "2").output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("1 of 8 runs failed"), "{t}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    for run in manifest["runs"].as_array().unwrap() {
        if run["id"] == "schnet-N1k-D16-s0" {
            assert_eq!(run["state"], "failed");
            assert!(
                run["error"].as_str().unwrap().contains("state.json"),
                "{run}"
            );
        } else {
            assert_eq!(run["state"], "done", "{run}");
        }
    }
    assert_eq!(
        stable_table(&out).len(),
        7,
        "the report covers the other runs"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Failed runs") && report.contains("schnet-N1k-D16-s0"));
    let o = xtask()
        .args(["sweep", "status"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(text(&o).contains("FAILED"), "{}", text(&o));
    // Repaired, the same command finishes the sweep with the uninterrupted table.
    std::fs::remove_dir_all(&bad).unwrap();
    let o = sweep_cmd(&config, &out, "2").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(stable_table(&out), r.table);
}
