//! The sweep file (`configs/sweeps/*.toml`) and its validation.
//!
//! A [`SweepConfig`] is plain data read from TOML; [`SweepConfig::check_fields`] and
//! [`Plan::new`](super::plan::Plan::new) validate every field before any work starts and turn
//! it into a [`Plan`](super::plan::Plan). Errors are
//! [`ConfigError`]s that name the field (`families[1].sizes[0]`, `train_sizes`, `data.cutoff`).
//!
//! The grid is families × sizes (size-ladder targets or presets) × data sizes × seeds (×
//! datasets when several are given). Data sizes are nested: every run of a dataset shares one
//! seeded order (`data.split_seed`) and a smaller training set is a prefix of a larger one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use matscale_models::{Family, ForceMode};
use matscale_trainer::source::DataConfig;
use matscale_trainer::TrainConfig;
use serde::{Deserialize, Serialize};

/// A sweep-file error naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, as a TOML path (`families[0].sizes[2]`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sweep config, field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// One model family of the grid (`[[families]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilySweep {
    /// The family (any `matscale_models::Family`; a new family joins sweeps by config alone).
    pub family: Family,
    /// Target parameter counts on the family's size ladder.
    #[serde(default)]
    pub sizes: Vec<f64>,
    /// Named presets (`cargo xtask train --list-presets`), in addition to `sizes`.
    #[serde(default)]
    pub presets: Vec<String>,
    /// Peak learning rate of this family (default: `train.max_lr`).
    pub max_lr: Option<f64>,
    /// Structures per batch of this family (default: `train.batch_size`).
    pub batch_size: Option<usize>,
    /// Epochs of this family (default: `train.epochs`, or the `[budget]`).
    pub epochs: Option<u64>,
}

/// A fixed training budget instead of fixed epochs: each run trains for
/// `clamp(ceil(structures / D), min_epochs, max_epochs)` epochs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Training structures processed per run (summed over epochs).
    pub structures: u64,
    /// Fewest epochs (default 1).
    #[serde(default = "one")]
    pub min_epochs: u64,
    /// Most epochs (default 1000).
    #[serde(default = "thousand")]
    pub max_epochs: u64,
}

fn one() -> u64 {
    1
}
fn thousand() -> u64 {
    1000
}

/// Cost model of `--dry-run` and of the ETA (`[cost]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostConfig {
    /// Training throughput of one job, FLOP/s, per family name (`fcn = 2e9`); families not
    /// listed use `default_flop_rate`. Finished runs of the same sweep replace it by the rate
    /// they measured.
    pub flop_rate: BTreeMap<String, f64>,
    /// FLOP/s of a family without an entry in `flop_rate` (default 2e9).
    pub default_flop_rate: f64,
    /// Seconds per run outside training steps: start-up, data, validation (default 2).
    pub overhead_s: f64,
    /// Structures probed for the mean batch shape (default 64).
    pub probe_structures: usize,
    /// Size of the data set when its files are not on this machine (for dry runs).
    pub dataset_size: Option<usize>,
    /// Mean atoms per structure when the files are not here.
    pub atoms_per_structure: Option<f64>,
    /// Mean neighbours per atom within the cutoff when the files are not here.
    pub edges_per_atom: Option<f64>,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            flop_rate: BTreeMap::new(),
            default_flop_rate: 2e9,
            overhead_s: 2.0,
            probe_structures: 64,
            dataset_size: None,
            atoms_per_structure: None,
            edges_per_atom: None,
        }
    }
}

/// What the fitter does after the runs (`[fit]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FitConfig {
    /// Bootstrap resamples for the 95% intervals (0: point estimates only; default 1000).
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
    /// Fit the joint law L(N, D) per family (needs ≥ 2 sizes and ≥ 2 data sizes).
    pub joint: bool,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            bootstrap: 1000,
            seed: 0,
            joint: true,
        }
    }
}

/// A sweep file. See the [module docs](self) and `configs/sweeps/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// Name of the sweep (used in the report and the default output directory).
    pub name: String,
    /// One line for the report.
    pub description: String,
    /// Output directory (default `runs/<name>`), relative to the working directory.
    pub out: Option<PathBuf>,
    /// Parallel training processes (default 1; `--jobs` overrides).
    pub jobs: usize,
    /// Direct or conservative forces for every run.
    pub force_mode: ForceMode,
    /// Seeds of initialisation and batch order; every grid point runs once per seed.
    pub seeds: Vec<u64>,
    /// The data set (`[data]`, as in `cargo xtask train`), or ...
    pub data: Option<DataConfig>,
    /// ... several named data sets (`[datasets.Si]`, `[datasets.Mo]`); fits are then made per
    /// family and data set (`schnet@Si`).
    pub datasets: BTreeMap<String, DataConfig>,
    /// Absolute training-set sizes (structures), increasing.
    pub train_sizes: Vec<usize>,
    /// Fractions of the training pool, increasing (instead of `train_sizes`).
    pub train_fractions: Vec<f64>,
    /// Training settings shared by every run (`[train]`, as in `cargo xtask train`).
    pub train: TrainConfig,
    /// A structures budget per run instead of fixed `train.epochs`.
    pub budget: Option<Budget>,
    /// The model families and their size ladders.
    pub families: Vec<FamilySweep>,
    /// The cost model.
    pub cost: CostConfig,
    /// The fits.
    pub fit: FitConfig,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            name: "sweep".into(),
            description: String::new(),
            out: None,
            jobs: 1,
            force_mode: ForceMode::Direct,
            seeds: vec![0],
            data: None,
            datasets: BTreeMap::new(),
            train_sizes: Vec::new(),
            train_fractions: Vec::new(),
            train: TrainConfig::default(),
            budget: None,
            families: Vec::new(),
            cost: CostConfig::default(),
            fit: FitConfig::default(),
        }
    }
}

/// A training-set size of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSize {
    /// Absolute number of structures.
    Count(usize),
    /// Fraction of the training pool.
    Fraction(f64),
}

impl DataSize {
    /// Short tag for run ids (`D128`, `f0.001`).
    pub fn tag(self) -> String {
        match self {
            DataSize::Count(k) => format!("D{k}"),
            DataSize::Fraction(f) => format!("f{f}"),
        }
    }

    /// The training-set size drawn from a pool of `pool` structures (the rule of
    /// `matscale_structures::dataset::DatasetSplit::train_subset`).
    pub fn resolve(self, pool: usize) -> usize {
        match self {
            DataSize::Count(k) => k.min(pool),
            DataSize::Fraction(f) => ((pool as f64 * f).floor() as usize).max(1),
        }
    }
}

impl SweepConfig {
    /// Parses a sweep file; `origin` names it in errors (TOML syntax errors and unknown
    /// fields carry the line and the field).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::new(origin, e.to_string()))
    }

    /// The datasets of the sweep, by name (`None` for the single `[data]` section).
    pub fn dataset_list(&self) -> Result<Vec<(Option<String>, DataConfig)>, ConfigError> {
        match (&self.data, self.datasets.is_empty()) {
            (Some(_), false) => Err(ConfigError::new(
                "data",
                "give either [data] or [datasets.<name>] sections, not both",
            )),
            (None, true) => Err(ConfigError::new(
                "data",
                "is missing: give a [data] section (source = \"emt\" or a file)",
            )),
            (Some(d), true) => Ok(vec![(None, d.clone())]),
            (None, false) => Ok(self
                .datasets
                .iter()
                .map(|(k, v)| (Some(k.clone()), v.clone()))
                .collect()),
        }
    }

    /// The data sizes of the grid.
    pub fn data_sizes(&self) -> Result<Vec<DataSize>, ConfigError> {
        match (self.train_sizes.is_empty(), self.train_fractions.is_empty()) {
            (true, true) => Err(ConfigError::new(
                "train_sizes",
                "is missing: give train_sizes (structures) or train_fractions",
            )),
            (false, false) => Err(ConfigError::new(
                "train_fractions",
                "give train_sizes or train_fractions, not both",
            )),
            (false, true) => {
                for (i, w) in self.train_sizes.windows(2).enumerate() {
                    if w[1] <= w[0] {
                        return Err(ConfigError::new(
                            format!("train_sizes[{}]", i + 1),
                            format!("is {} after {}: sizes must increase", w[1], w[0]),
                        ));
                    }
                }
                if self.train_sizes[0] == 0 {
                    return Err(ConfigError::new("train_sizes[0]", "is 0"));
                }
                Ok(self
                    .train_sizes
                    .iter()
                    .map(|&k| DataSize::Count(k))
                    .collect())
            }
            (true, false) => {
                for (i, &f) in self.train_fractions.iter().enumerate() {
                    if !(f > 0.0 && f <= 1.0) {
                        return Err(ConfigError::new(
                            format!("train_fractions[{i}]"),
                            format!("is {f}; a fraction must lie in (0, 1]"),
                        ));
                    }
                    if i > 0 && f <= self.train_fractions[i - 1] {
                        return Err(ConfigError::new(
                            format!("train_fractions[{i}]"),
                            format!(
                                "is {f} after {}: fractions must increase",
                                self.train_fractions[i - 1]
                            ),
                        ));
                    }
                }
                Ok(self
                    .train_fractions
                    .iter()
                    .map(|&f| DataSize::Fraction(f))
                    .collect())
            }
        }
    }

    /// Epochs of a run with `n_train` structures (fixed `train.epochs`, or the budget).
    pub fn epochs_for(&self, n_train: usize) -> u64 {
        match self.budget {
            None => self.train.epochs,
            Some(b) => b
                .structures
                .div_ceil(n_train.max(1) as u64)
                .clamp(b.min_epochs, b.max_epochs),
        }
    }

    /// Checks the fields that do not need the model zoo or the data (the rest is checked
    /// while planning).
    pub fn check_fields(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::new(
                "name",
                format!(
                    "is `{}`: use letters, digits, `-`, `_` or `.` (it names a directory)",
                    self.name
                ),
            ));
        }
        if self.jobs == 0 {
            return Err(ConfigError::new("jobs", "is 0; run at least one job"));
        }
        if self.seeds.is_empty() {
            return Err(ConfigError::new(
                "seeds",
                "is empty; give at least one seed",
            ));
        }
        for (i, s) in self.seeds.iter().enumerate() {
            if self.seeds[..i].contains(s) {
                return Err(ConfigError::new(
                    format!("seeds[{i}]"),
                    format!("{s} appears twice"),
                ));
            }
        }
        if self.train.seed != 0 {
            return Err(ConfigError::new(
                "train.seed",
                "is set; a sweep takes its seeds from the top-level `seeds` list",
            ));
        }
        self.train
            .check()
            .map_err(|e| ConfigError::new("train", e.to_string()))?;
        let datasets = self.dataset_list()?;
        for (name, d) in &datasets {
            let at = match name {
                None => "data".to_string(),
                Some(n) => format!("datasets.{n}"),
            };
            if let Some(n) = name {
                if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(ConfigError::new(
                        at,
                        "dataset names use letters, digits and `_`",
                    ));
                }
            }
            if d.train_size.is_some() || d.train_fraction != 1.0 {
                return Err(ConfigError::new(
                    format!("{at}.train_size"),
                    "is set; a sweep takes its training sizes from `train_sizes` / `train_fractions`",
                ));
            }
            d.check()
                .map_err(|e| ConfigError::new(at.clone(), e.to_string()))?;
        }
        self.data_sizes()?;
        if let Some(b) = self.budget {
            if b.structures == 0 {
                return Err(ConfigError::new("budget.structures", "is 0"));
            }
            if b.min_epochs == 0 || b.min_epochs > b.max_epochs {
                return Err(ConfigError::new(
                    "budget.min_epochs",
                    format!(
                        "is {}: need 1 ≤ min_epochs ≤ max_epochs ({})",
                        b.min_epochs, b.max_epochs
                    ),
                ));
            }
        }
        if self.families.is_empty() {
            return Err(ConfigError::new(
                "families",
                "is empty; add [[families]] sections",
            ));
        }
        for (i, f) in self.families.iter().enumerate() {
            let at = format!("families[{i}]");
            if self.families[..i].iter().any(|g| g.family == f.family) {
                return Err(ConfigError::new(
                    format!("{at}.family"),
                    format!(
                        "{} appears twice; list all its sizes in one entry",
                        f.family
                    ),
                ));
            }
            if f.sizes.is_empty() && f.presets.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.sizes"),
                    "is empty; give target parameter counts (or presets)",
                ));
            }
            for (j, &s) in f.sizes.iter().enumerate() {
                if !(s.is_finite() && s >= 1.0) {
                    return Err(ConfigError::new(
                        format!("{at}.sizes[{j}]"),
                        format!("is {s}; a target parameter count must be ≥ 1"),
                    ));
                }
            }
            if let Some(lr) = f.max_lr {
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(ConfigError::new(
                        format!("{at}.max_lr"),
                        format!("is {lr}; it must be positive"),
                    ));
                }
            }
            if f.batch_size == Some(0) {
                return Err(ConfigError::new(format!("{at}.batch_size"), "is 0"));
            }
            if f.epochs == Some(0) {
                return Err(ConfigError::new(format!("{at}.epochs"), "is 0"));
            }
        }
        let c = &self.cost;
        for (k, &v) in &c.flop_rate {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::new(
                    format!("cost.flop_rate.{k}"),
                    format!("is {v}; it must be positive"),
                ));
            }
            if !self.families.iter().any(|f| f.family.name() == k) {
                return Err(ConfigError::new(
                    format!("cost.flop_rate.{k}"),
                    "names no family of the sweep",
                ));
            }
        }
        if !(c.default_flop_rate.is_finite() && c.default_flop_rate > 0.0) {
            return Err(ConfigError::new(
                "cost.default_flop_rate",
                "must be positive",
            ));
        }
        if !(c.overhead_s.is_finite() && c.overhead_s >= 0.0) {
            return Err(ConfigError::new("cost.overhead_s", "must be ≥ 0"));
        }
        if c.probe_structures == 0 {
            return Err(ConfigError::new("cost.probe_structures", "is 0"));
        }
        if c.dataset_size == Some(0) {
            return Err(ConfigError::new("cost.dataset_size", "is 0"));
        }
        for (name, v) in [
            ("cost.atoms_per_structure", c.atoms_per_structure),
            ("cost.edges_per_atom", c.edges_per_atom),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(ConfigError::new(
                        name,
                        format!("is {v}; it must be positive"),
                    ));
                }
            }
        }
        Ok(())
    }
}
