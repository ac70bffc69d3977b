//! Where training data comes from, and how it is split: a data file (extxyz, pymatgen JSON,
//! ASE LMDB) or structures generated on the fly by the EMT alloy generator; a fixed validation
//! set (a held-out fraction of the same source, or a separate file) and nested training
//! subsets (each smaller subset a prefix of the larger, one seeded order).

use std::path::{Path, PathBuf};

use matscale_structures::batch::GraphOptions;
use matscale_structures::dataset::{DatasetSplit, SplitConfig, TrainSize};
use matscale_structures::emt::Emt;
use matscale_structures::generate::AlloyGenerator;
use matscale_structures::io::{Format, ReadError};
use matscale_structures::pymatgen::{self, StressOrder};
use matscale_structures::Structure;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{Result, TrainError};

/// The component order of mlearn's six-value stress (see docs/FORMATS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlearnStressOrder {
    /// VASP order (mlearn Si).
    #[default]
    Vasp,
    /// LAMMPS order (mlearn Mo, Cu, Ni).
    Lammps,
    /// ASE Voigt order.
    Voigt,
}

impl From<MlearnStressOrder> for StressOrder {
    fn from(o: MlearnStressOrder) -> Self {
        match o {
            MlearnStressOrder::Vasp => StressOrder::Vasp,
            MlearnStressOrder::Lammps => StressOrder::Lammps,
            MlearnStressOrder::Voigt => StressOrder::Voigt,
        }
    }
}

/// The data of a run (TOML `[data]`; missing fields take the defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A data file, or `"emt"` for generated EMT alloys (default).
    pub source: String,
    /// Structures to generate when `source = "emt"` (default 1000).
    pub emt_structures: u64,
    /// Generator settings when `source = "emt"`.
    pub emt: AlloyGenerator,
    /// A separate validation file; when absent a fraction of `source` is held out.
    pub val_source: Option<PathBuf>,
    /// Fraction held out for validation when there is no `val_source` (default 0.1).
    pub val_fraction: f64,
    /// Fraction of the training pool to train on, in (0, 1] (default 1).
    pub train_fraction: f64,
    /// Absolute number of training structures (overrides `train_fraction`).
    pub train_size: Option<usize>,
    /// Seed of the split order (the study: 1024).
    pub split_seed: u64,
    /// Stress order of mlearn pymatgen JSON files.
    pub mlearn_stress_order: MlearnStressOrder,
    /// Neighbour-list cutoff, Å (default 5).
    pub cutoff: f64,
    /// Keep at most this many nearest neighbours per atom.
    pub max_neighbors: Option<usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: "emt".into(),
            emt_structures: 1000,
            emt: AlloyGenerator::default(),
            val_source: None,
            val_fraction: 0.1,
            train_fraction: 1.0,
            train_size: None,
            split_seed: 1024,
            mlearn_stress_order: MlearnStressOrder::Vasp,
            cutoff: 5.0,
            max_neighbors: None,
        }
    }
}

/// Training and validation sets with what they were made from.
#[derive(Debug)]
pub struct SplitData {
    /// The training subset.
    pub train: Dataset,
    /// The validation set.
    pub val: Dataset,
    /// Size of the training pool the subset was taken from.
    pub pool: usize,
}

impl DataConfig {
    /// Checks every field.
    pub fn check(&self) -> Result<()> {
        if !(self.cutoff.is_finite() && self.cutoff > 0.0) {
            return Err(TrainError::config(
                "data.cutoff",
                format!("is {}; it must be positive", self.cutoff),
            ));
        }
        if self.source != "emt" && Format::from_path(Path::new(&self.source)).is_none() {
            return Err(TrainError::config(
                "data.source",
                format!(
                    "is `{}`: expected `emt` or a file ending in .xyz, .extxyz, .json, .aselmdb or .lmdb",
                    self.source
                ),
            ));
        }
        if self.source == "emt" {
            if self.emt_structures < 2 {
                return Err(TrainError::config(
                    "data.emt_structures",
                    "must be at least 2",
                ));
            }
            self.emt
                .check()
                .map_err(|e| TrainError::config("data.emt", e.to_string()))?;
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(TrainError::config(
                "data.val_fraction",
                "must lie in [0, 1)",
            ));
        }
        if self.val_source.is_none() && self.val_fraction == 0.0 {
            return Err(TrainError::config(
                "data.val_fraction",
                "is 0 and there is no val_source: the run needs a validation set",
            ));
        }
        if !(self.train_fraction > 0.0 && self.train_fraction <= 1.0) {
            return Err(TrainError::config(
                "data.train_fraction",
                "must lie in (0, 1]",
            ));
        }
        if self.train_size == Some(0) {
            return Err(TrainError::config("data.train_size", "is 0"));
        }
        Ok(())
    }

    /// The graph options (cutoff, max neighbours).
    pub fn graph(&self) -> GraphOptions {
        let g = GraphOptions::new(self.cutoff);
        match self.max_neighbors {
            Some(k) => g.with_max_neighbors(k),
            None => g,
        }
    }

    /// Loads the source and splits it (see the [module docs](self)).
    pub fn load(&self) -> Result<SplitData> {
        self.check()?;
        let all = self.load_source()?;
        let size = match self.train_size {
            Some(k) => TrainSize::Count(k),
            None => TrainSize::Fraction(self.train_fraction),
        };
        let (train, val, pool) = match &self.val_source {
            Some(path) => {
                let val = read_file(path, self.mlearn_stress_order)?;
                let split = DatasetSplit::new(
                    all.len(),
                    &SplitConfig {
                        seed: self.split_seed,
                        val_fraction: 0.0,
                        test_fraction: 0.0,
                    },
                )?;
                let pool = split.train_pool().len();
                let train = pick(&all, split.train_subset(size)?);
                (train, val, pool)
            }
            None => {
                let split = DatasetSplit::new(
                    all.len(),
                    &SplitConfig {
                        seed: self.split_seed,
                        val_fraction: self.val_fraction,
                        test_fraction: 0.0,
                    },
                )?;
                if split.validation().is_empty() {
                    return Err(TrainError::config(
                        "data.val_fraction",
                        format!(
                            "{} of {} structures leaves no validation structure",
                            self.val_fraction,
                            all.len()
                        ),
                    ));
                }
                let pool = split.train_pool().len();
                let train = pick(&all, split.train_subset(size)?);
                let val = pick(&all, split.validation());
                (train, val, pool)
            }
        };
        let graph = self.graph();
        Ok(SplitData {
            train: Dataset::new(train, graph.clone(), "training set")?,
            val: Dataset::new(val, graph, "validation set")?,
            pool,
        })
    }

    fn load_source(&self) -> Result<Vec<Structure>> {
        if self.source == "emt" {
            let generator = self
                .emt
                .check()
                .map_err(|e| TrainError::config("data.emt", e.to_string()))?;
            return generator
                .generate_labelled(0..self.emt_structures, &Emt::new())
                .map_err(|e| TrainError::Data(format!("EMT labelling: {e}")));
        }
        read_file(Path::new(&self.source), self.mlearn_stress_order)
    }
}

fn pick(all: &[Structure], indices: &[usize]) -> Vec<Structure> {
    indices.iter().map(|&i| all[i].clone()).collect()
}

/// Reads every structure of a data file (format by extension).
pub fn read_file(path: &Path, order: MlearnStressOrder) -> Result<Vec<Structure>> {
    let read = || -> std::result::Result<Vec<Structure>, ReadError> {
        match Format::from_path(path) {
            Some(Format::PymatgenJson) => pymatgen::read_path_with(
                path,
                pymatgen::Options {
                    mlearn_stress_order: order.into(),
                },
            )?
            .collect(),
            _ => matscale_structures::io::read_all(path),
        }
    };
    let structures = read().map_err(|e| TrainError::Data(e.to_string()))?;
    if structures.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no structures",
            path.display()
        )));
    }
    Ok(structures)
}
