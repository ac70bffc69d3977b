//! From a validated sweep file to the list of runs: resolve every model on its size ladder,
//! probe the data for its size and mean batch shape, and cost each run (analytic FLOPs ×
//! structures × epochs, time from a FLOP rate).

use std::path::Path;

use matscale_models::{BatchShape, ModelSpec};
use matscale_structures::dataset::{DatasetSplit, SplitConfig};
use matscale_structures::neighbors::neighbor_list;
use matscale_structures::Structure;
use matscale_trainer::run::{ModelChoice, RunConfig};
use matscale_trainer::source::DataConfig;
use serde::{Deserialize, Serialize};

use super::config::{ConfigError, DataSize, SweepConfig};

/// What the planner learnt about a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataProbe {
    /// Training pool (structures available for training), when known.
    pub pool: Option<usize>,
    /// Mean atoms per structure.
    pub mean_atoms: f64,
    /// Mean directed edges per structure within the cutoff.
    pub mean_edges: f64,
    /// Mean of the squared atom count (full attention cost).
    pub mean_sq_atoms: f64,
    /// Largest structure seen.
    pub max_atoms: usize,
    /// Where the figures come from.
    pub origin: String,
}

impl DataProbe {
    /// The shape of a typical batch of `batch` structures.
    pub fn batch_shape(&self, batch: usize) -> BatchShape {
        let b = batch as f64;
        BatchShape {
            n_structures: batch,
            n_nodes: (b * self.mean_atoms).round() as usize,
            n_edges: (b * self.mean_edges).round() as usize,
            sum_sq_nodes: (b * self.mean_sq_atoms).round() as usize,
            max_nodes: self.max_atoms,
        }
    }
}

/// One training run of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRun {
    /// Directory name under `runs/` (`schnet-N3000-D128-s0`).
    pub id: String,
    /// Group of the fits: the family, or `family@dataset`.
    pub group: String,
    /// Family name.
    pub family: String,
    /// Dataset name when the sweep has several.
    pub dataset: Option<String>,
    /// Size-ladder target or preset name.
    pub size: String,
    /// Exact parameter count.
    pub n_parameters: usize,
    /// Training-set size of the grid.
    pub data_size: DataSize,
    /// Expected training structures (when the pool is known).
    pub n_train: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// Epochs.
    pub epochs: u64,
    /// Estimated training FLOPs.
    pub est_flops: Option<f64>,
    /// Estimated wall time of one job, s.
    pub est_time_s: Option<f64>,
    /// The run's configuration (written to `run.toml`).
    pub config: RunConfig,
}

impl PlannedRun {
    /// Optimiser steps of the run (when the training-set size is known).
    pub fn total_steps(&self) -> Option<u64> {
        self.n_train
            .map(|n| n.div_ceil(self.config.train.batch_size) as u64 * self.epochs)
    }
}

/// The whole grid.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The sweep file it came from.
    pub config: SweepConfig,
    /// Runs in grid order (family, size, dataset, data size, seed).
    pub runs: Vec<PlannedRun>,
    /// Probes of the datasets, by name (`None` for the single `[data]`).
    pub probes: Vec<(Option<String>, DataProbe)>,
}

fn size_tag(target: f64) -> String {
    let t = target.round();
    if t >= 1000.0 && t % 1000.0 == 0.0 {
        if t % 1e6 == 0.0 {
            format!("{}M", t / 1e6)
        } else {
            format!("{}k", t / 1e3)
        }
    } else {
        format!("{t}")
    }
}

/// Probes `data`: the training pool and the mean batch shape from the first structures.
/// Files that are not on this machine fall back to `[cost]` (`dataset_size`,
/// `atoms_per_structure`, `edges_per_atom`) so that a dry run still costs the grid.
pub fn probe(data: &DataConfig, config: &SweepConfig, at: &str) -> Result<DataProbe, ConfigError> {
    let cost = &config.cost;
    let limit = cost.probe_structures;
    let (total, sample, origin): (Option<usize>, Vec<Structure>, String) = if data.source == "emt" {
        let gen = data
            .emt
            .check()
            .map_err(|e| ConfigError::new(format!("{at}.emt"), e.to_string()))?;
        let n = data.emt_structures as usize;
        let k = n.min(limit) as u64;
        (
            Some(n),
            gen.generate(0..k),
            format!("{k} generated structures"),
        )
    } else if Path::new(&data.source).exists() {
        let frames = matscale_structures::io::read_frames(Path::new(&data.source))
            .map_err(|e| ConfigError::new(format!("{at}.source"), e.to_string()))?;
        let mut sample = Vec::new();
        let mut n = 0usize;
        for frame in frames {
            let s = frame.map_err(|e| ConfigError::new(format!("{at}.source"), e.to_string()))?;
            if sample.len() < limit {
                sample.push(s);
            }
            n += 1;
        }
        let k = sample.len();
        (Some(n), sample, format!("{k} of {n} structures read"))
    } else {
        let (Some(atoms), Some(edges)) = (cost.atoms_per_structure, cost.edges_per_atom) else {
            return Err(ConfigError::new(
                format!("{at}.source"),
                format!(
                    "`{}` does not exist here; to cost the grid without it, give \
                     cost.dataset_size, cost.atoms_per_structure and cost.edges_per_atom",
                    data.source
                ),
            ));
        };
        return Ok(DataProbe {
            pool: cost.dataset_size.map(|n| pool_of(n, data)).transpose()?,
            mean_atoms: atoms,
            mean_edges: atoms * edges,
            mean_sq_atoms: atoms * atoms,
            max_atoms: (2.0 * atoms).ceil() as usize,
            origin: format!(
                "[cost]: {} structures of {atoms} atoms with {edges} neighbours each (files not here)",
                cost.dataset_size
                    .map_or("an unknown number of".to_string(), |n| n.to_string())
            ),
        });
    };
    if sample.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.source"),
            "holds no structure",
        ));
    }
    let mut atoms = 0.0;
    let mut edges = 0.0;
    let mut sq = 0.0;
    let mut max_atoms = 0;
    for s in &sample {
        let n = s.len();
        let list = neighbor_list(s, data.cutoff)
            .map_err(|e| ConfigError::new(format!("{at}.source"), e.to_string()))?;
        let e = match data.max_neighbors {
            Some(k) => list.len().min(k * n),
            None => list.len(),
        };
        atoms += n as f64;
        edges += e as f64;
        sq += (n * n) as f64;
        max_atoms = max_atoms.max(n);
    }
    let k = sample.len() as f64;
    Ok(DataProbe {
        pool: total.map(|n| pool_of(n, data)).transpose()?,
        mean_atoms: atoms / k,
        mean_edges: edges / k,
        mean_sq_atoms: sq / k,
        max_atoms,
        origin,
    })
}

/// The training pool of `n` structures under `data`'s split (validation held out unless a
/// separate validation file is given).
fn pool_of(n: usize, data: &DataConfig) -> Result<usize, ConfigError> {
    let val_fraction = if data.val_source.is_some() {
        0.0
    } else {
        data.val_fraction
    };
    let split = DatasetSplit::new(
        n,
        &SplitConfig {
            seed: data.split_seed,
            val_fraction,
            test_fraction: 0.0,
        },
    )
    .map_err(|e| ConfigError::new("data", e.to_string()))?;
    Ok(split.train_pool().len())
}

impl Plan {
    /// Validates `config` and expands the grid. `probe_data` = false skips reading the data
    /// (no pool sizes or FLOP estimates), for tests of the grid itself.
    pub fn new(config: SweepConfig, probe_data: bool) -> Result<Self, ConfigError> {
        config.check_fields()?;
        let datasets = config.dataset_list()?;
        let sizes = config.data_sizes()?;
        let mut probes = Vec::new();
        for (name, data) in &datasets {
            let at = name
                .as_ref()
                .map_or("data".to_string(), |n| format!("datasets.{n}"));
            if probe_data {
                let p = probe(data, &config, &at)?;
                if let Some(pool) = p.pool {
                    for (i, s) in sizes.iter().enumerate() {
                        if let DataSize::Count(k) = s {
                            if *k > pool {
                                return Err(ConfigError::new(
                                    format!("train_sizes[{i}]"),
                                    format!(
                                        "is {k} but {at} has a training pool of only {pool} structures"
                                    ),
                                ));
                            }
                        }
                    }
                }
                probes.push((name.clone(), p));
            }
        }
        let mut runs = Vec::new();
        for (fi, fam) in config.families.iter().enumerate() {
            let mut choices: Vec<(String, ModelChoice, String)> = Vec::new();
            for (j, &s) in fam.sizes.iter().enumerate() {
                choices.push((
                    format!("N{}", size_tag(s)),
                    ModelChoice {
                        family: Some(fam.family),
                        size: Some(s),
                        ..ModelChoice::default()
                    },
                    format!("families[{fi}].sizes[{j}]"),
                ));
            }
            for (j, p) in fam.presets.iter().enumerate() {
                choices.push((
                    p.replace('/', "_"),
                    ModelChoice {
                        family: Some(fam.family),
                        preset: Some(p.clone()),
                        ..ModelChoice::default()
                    },
                    format!("families[{fi}].presets[{j}]"),
                ));
            }
            let mut seen: Vec<(usize, String)> = Vec::new();
            for (tag, choice, at) in choices {
                let model = choice
                    .resolve(config.force_mode)
                    .map_err(|e| ConfigError::new(&at, e.to_string()))?;
                let spec = ModelSpec {
                    model,
                    force_mode: config.force_mode,
                };
                spec.check()
                    .map_err(|e| ConfigError::new(&at, e.to_string()))?;
                let n_parameters = spec.n_parameters();
                if let Some((_, other)) = seen.iter().find(|(n, _)| *n == n_parameters) {
                    return Err(ConfigError::new(
                        &at,
                        format!(
                            "gives the same model as {other} ({n_parameters} parameters); \
                             space the sizes further apart"
                        ),
                    ));
                }
                seen.push((n_parameters, at.clone()));
                for (di, (dname, data)) in datasets.iter().enumerate() {
                    let probe = probes.get(di).map(|(_, p)| p);
                    for &ds in &sizes {
                        for &seed in &config.seeds {
                            runs.push(plan_run(
                                &config, fam, &tag, &choice, &spec, dname, data, ds, seed, probe,
                            )?);
                        }
                    }
                }
            }
        }
        Ok(Self {
            config,
            runs,
            probes,
        })
    }

    /// Replaces the configured FLOP rates by those measured by the finished runs of each
    /// family in `dir` (training FLOPs / training wall time), so that a rerun or a dry run
    /// on a partly done sweep estimates with this machine's speed. Returns the rates used.
    pub fn calibrate(&mut self, dir: &Path) -> Vec<(String, f64)> {
        let mut sums: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
        for r in &self.runs {
            let path = dir.join("runs").join(&r.id).join("result.json");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(result) = serde_json::from_str::<matscale_trainer::RunResult>(&text) else {
                continue;
            };
            if result.wall_time_s > 0.0 && result.training_flops > 0.0 {
                let e = sums.entry(r.family.clone()).or_default();
                e.0 += result.training_flops;
                e.1 += result.wall_time_s;
            }
        }
        let rates: Vec<(String, f64)> = sums.into_iter().map(|(f, (c, t))| (f, c / t)).collect();
        for r in &mut self.runs {
            if let (Some((_, rate)), Some(flops)) =
                (rates.iter().find(|(f, _)| *f == r.family), r.est_flops)
            {
                r.est_time_s = Some(flops / rate + self.config.cost.overhead_s);
            }
        }
        rates
    }

    /// Total estimated FLOPs and single-job time (s) of the runs that have estimates.
    pub fn totals(&self) -> (f64, f64) {
        self.runs.iter().fold((0.0, 0.0), |(f, t), r| {
            (
                f + r.est_flops.unwrap_or(0.0),
                t + r.est_time_s.unwrap_or(0.0),
            )
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_run(
    config: &SweepConfig,
    fam: &super::config::FamilySweep,
    tag: &str,
    choice: &ModelChoice,
    spec: &ModelSpec,
    dname: &Option<String>,
    data: &DataConfig,
    ds: DataSize,
    seed: u64,
    probe: Option<&DataProbe>,
) -> Result<PlannedRun, ConfigError> {
    let family = fam.family.name().to_string();
    let id = match dname {
        None => format!("{family}-{tag}-{}-s{seed}", ds.tag()),
        Some(d) => format!("{family}-{tag}-{d}-{}-s{seed}", ds.tag()),
    };
    let mut run_data = data.clone();
    match ds {
        DataSize::Count(k) => run_data.train_size = Some(k),
        DataSize::Fraction(f) => run_data.train_fraction = f,
    }
    let mut train = config.train.clone();
    train.seed = seed;
    if let Some(lr) = fam.max_lr {
        train.max_lr = lr;
    }
    if let Some(b) = fam.batch_size {
        train.batch_size = b;
    }
    let n_train = probe.and_then(|p| p.pool).map(|pool| ds.resolve(pool));
    // Without a known pool the budget cannot set epochs; use the fixed count.
    train.epochs = match (fam.epochs, n_train) {
        (Some(e), _) => e,
        (None, Some(n)) => config.epochs_for(n),
        (None, None) => config.train.epochs,
    };
    let epochs = train.epochs;
    let (est_flops, est_time_s) = match (probe, n_train) {
        (Some(p), Some(n)) => {
            let shape = p.batch_shape(train.batch_size);
            let flops = spec
                .flops(&shape)
                .map_err(|e| ConfigError::new(format!("families.{family}"), e.to_string()))?;
            let total = flops.training_per_structure() * n as f64 * epochs as f64;
            let rate = config
                .cost
                .flop_rate
                .get(&family)
                .copied()
                .unwrap_or(config.cost.default_flop_rate);
            (Some(total), Some(total / rate + config.cost.overhead_s))
        }
        _ => (None, None),
    };
    Ok(PlannedRun {
        id,
        group: match dname {
            None => family.clone(),
            Some(d) => format!("{family}@{d}"),
        },
        family,
        dataset: dname.clone(),
        size: tag.to_string(),
        n_parameters: spec.n_parameters(),
        data_size: ds,
        n_train,
        seed,
        epochs,
        est_flops,
        est_time_s,
        config: RunConfig {
            model: choice.clone(),
            force_mode: config.force_mode,
            data: run_data,
            train,
        },
    })
}

/// A number of FLOPs or seconds in a short human form.
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v >= 1e3 || (v > 0.0 && v < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.1}")
    }
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
pub fn duration(s: f64) -> String {
    if !s.is_finite() {
        return "-".into();
    }
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The grid as a text table (what `--dry-run` prints).
pub fn grid_table(plan: &Plan, jobs: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let c = &plan.config;
    let mut models: Vec<(&str, &str)> = plan
        .runs
        .iter()
        .map(|r| (r.family.as_str(), r.size.as_str()))
        .collect();
    models.sort_unstable();
    models.dedup();
    let _ = writeln!(
        s,
        "sweep `{}`: {} runs = {} models ({} families) × {} data sizes × {} seeds{}",
        c.name,
        plan.runs.len(),
        models.len(),
        c.families.len(),
        c.train_sizes.len().max(c.train_fractions.len()),
        c.seeds.len(),
        if plan.probes.len() > 1 {
            format!(" × {} datasets", plan.probes.len())
        } else {
            String::new()
        }
    );
    for (name, p) in &plan.probes {
        let _ = writeln!(
            s,
            "data{}: pool {} structures, {:.1} atoms and {:.0} edges per structure ({})",
            name.as_ref().map_or(String::new(), |n| format!(" {n}")),
            p.pool.map_or("?".into(), |n| n.to_string()),
            p.mean_atoms,
            p.mean_edges,
            p.origin
        );
    }
    let w = plan.runs.iter().map(|r| r.id.len()).max().unwrap_or(3);
    let _ = writeln!(
        s,
        "{:<w$} {:>11} {:>9} {:>6} {:>10} {:>10}",
        "run", "params", "D", "epochs", "FLOPs", "time"
    );
    for r in &plan.runs {
        let _ = writeln!(
            s,
            "{:<w$} {:>11} {:>9} {:>6} {:>10} {:>10}",
            r.id,
            r.n_parameters,
            r.n_train.map_or("?".into(), |n| n.to_string()),
            r.epochs,
            r.est_flops.map_or("?".into(), human),
            r.est_time_s.map_or("?".into(), duration)
        );
    }
    let (flops, time) = plan.totals();
    let _ = writeln!(
        s,
        "total: {} training FLOPs, {} of one job; about {} with --jobs {jobs} \
         (configured rates: {}; overhead {} s per run)",
        human(flops),
        duration(time),
        duration(time / jobs.max(1) as f64),
        rates(c),
        c.cost.overhead_s
    );
    s
}

fn rates(c: &SweepConfig) -> String {
    let mut parts: Vec<String> = c
        .families
        .iter()
        .map(|f| {
            let r = c
                .cost
                .flop_rate
                .get(f.family.name())
                .copied()
                .unwrap_or(c.cost.default_flop_rate);
            format!("{} {} FLOP/s", f.family, human(r))
        })
        .collect();
    parts.dedup();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: &str = r#"
        name = "grid"
        seeds = [0, 1]
        train_sizes = [10, 20, 40]
        [data]
        source = "emt"
        emt_structures = 100
        [data.emt]
        supercells = [[1, 1, 1]]
        [train]
        epochs = 3
        max_lr = 1e-3
        [[families]]
        family = "fcn"
        sizes = [1e3, 1e4]
        max_lr = 5e-3
        [[families]]
        family = "schnet"
        sizes = [2e3]
        epochs = 7
    "#;

    fn plan(text: &str, probe: bool) -> Result<Plan, ConfigError> {
        Plan::new(SweepConfig::from_toml(text, "test").unwrap(), probe)
    }

    #[test]
    fn the_grid_is_families_by_sizes_by_data_by_seeds() {
        let p = plan(GRID, false).unwrap();
        assert_eq!(p.runs.len(), (2 + 1) * 3 * 2);
        let ids: Vec<&str> = p.runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids[0], "fcn-N1k-D10-s0");
        assert_eq!(ids[1], "fcn-N1k-D10-s1");
        assert_eq!(ids[17], "schnet-N2k-D40-s1");
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "run ids are unique");
        for r in &p.runs {
            // Every run trains on a prefix of the one seeded order of the shared data.
            assert_eq!(r.config.data.split_seed, 1024);
            assert_eq!(r.config.data.emt.supercells, vec![[1, 1, 1]]);
            let DataSize::Count(k) = r.data_size else {
                panic!("absolute sizes")
            };
            assert_eq!(r.config.data.train_size, Some(k));
            assert_eq!(r.config.train.seed, r.seed);
            let n = r.n_parameters as f64;
            match r.family.as_str() {
                "fcn" => {
                    assert_eq!(r.config.train.max_lr, 5e-3);
                    assert_eq!(r.epochs, 3);
                    let target = if r.size == "N1k" { 1e3 } else { 1e4 };
                    assert!((n / target - 1.0).abs() < 0.1, "{n} vs {target}");
                }
                _ => {
                    assert_eq!(r.config.train.max_lr, 1e-3);
                    assert_eq!(r.epochs, 7);
                    assert_eq!(r.config.train.epochs, 7);
                }
            }
        }
    }

    #[test]
    fn probing_gives_pool_sizes_costs_and_checks_sizes_against_the_pool() {
        let p = plan(GRID, true).unwrap();
        let probe = &p.probes[0].1;
        assert_eq!(probe.pool, Some(90), "100 structures, 10% validation");
        assert!((probe.mean_atoms - 4.0).abs() < 1e-12);
        for r in &p.runs {
            assert!(r.est_flops.unwrap() > 0.0);
            assert!(r.est_time_s.unwrap() > 0.0);
        }
        // FLOPs grow linearly in D for one model.
        let f = |id: &str| {
            p.runs
                .iter()
                .find(|r| r.id == id)
                .unwrap()
                .est_flops
                .unwrap()
        };
        assert!((f("fcn-N1k-D20-s0") / f("fcn-N1k-D10-s0") - 2.0).abs() < 1e-9);
        let err = plan(&GRID.replace("[10, 20, 40]", "[10, 20, 400]"), true).unwrap_err();
        assert_eq!(err.field, "train_sizes[2]");
        assert!(err.message.contains("90"), "{err}");
    }

    #[test]
    fn a_budget_sets_epochs_from_the_data_size() {
        let text = GRID.replace("epochs = 7", "") + "[budget]\nstructures = 100\nmax_epochs = 8\n";
        let p = plan(&text, true).unwrap();
        let epochs = |id: &str| p.runs.iter().find(|r| r.id == id).unwrap().epochs;
        assert_eq!(
            epochs("schnet-N2k-D10-s0"),
            8,
            "ceil(100/10) = 10, capped at 8"
        );
        assert_eq!(epochs("schnet-N2k-D20-s0"), 5);
        assert_eq!(epochs("schnet-N2k-D40-s0"), 3);
    }

    #[test]
    fn fields_are_named_in_errors() {
        let cases = [
            (GRID.replace("seeds = [0, 1]", "seeds = [1, 1]"), "seeds[1]"),
            (
                GRID.replace("sizes = [1e3, 1e4]", "sizes = [1e3, 1.01e3]"),
                "families[0].sizes[1]",
            ),
            (
                GRID.replace("sizes = [2e3]", "sizes = []"),
                "families[1].sizes",
            ),
            (
                GRID.replace("max_lr = 5e-3", "max_lr = -1.0"),
                "families[0].max_lr",
            ),
            (
                GRID.replace("epochs = 7", "epochs = 0"),
                "families[1].epochs",
            ),
            (
                GRID.replace("[10, 20, 40]", "[10, 10, 40]"),
                "train_sizes[1]",
            ),
            (
                GRID.replace("train_sizes = [10, 20, 40]", "train_fractions = [0.5, 2.0]"),
                "train_fractions[1]",
            ),
            (
                GRID.replace("train_sizes = [10, 20, 40]", ""),
                "train_sizes",
            ),
            (
                GRID.replace(
                    "emt_structures = 100",
                    "emt_structures = 100\ncutoff = -1.0",
                ),
                "data",
            ),
            (
                GRID.replace("family = \"schnet\"", "family = \"fcn\""),
                "families[1].family",
            ),
            (GRID.replace("name = \"grid\"", "name = \"a/b\""), "name"),
        ];
        for (text, field) in cases {
            let err = plan(&text, false).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().contains(field));
        }
    }

    #[test]
    fn missing_files_are_costed_from_the_cost_section() {
        let text = GRID
            .replace("source = \"emt\"", "source = \"/nonexistent/omat.aselmdb\"")
            .replace("[data.emt]\n        supercells = [[1, 1, 1]]", "");
        let err = plan(&text, true).unwrap_err();
        assert_eq!(err.field, "data.source");
        let text = text
            + "[cost]\ndataset_size = 1000\natoms_per_structure = 30.0\nedges_per_atom = 40.0\n";
        let p = plan(&text, true).unwrap();
        assert_eq!(p.probes[0].1.pool, Some(900));
        assert!(p.runs.iter().all(|r| r.est_flops.is_some()));
    }
}
