//! Data sets for scaling studies: seeded splits, nested training subsets, per-element linear
//! reference energies and label statistics.
//!
//! # Splits and nested subsets
//!
//! [`DatasetSplit`] mirrors the study matscale follows (Trikha et al. 2025): the indices
//! `0..n` are shuffled once with a seed; validation is the first `⌊n·val_fraction⌋` of the
//! shuffled order, test the next `⌊n·test_fraction⌋` (the study has none: 0 by default), and the
//! rest is the training pool. A training subset of fraction `f` is the first
//! `max(1, ⌊pool·f⌋)` indices of the pool, so **every smaller subset is a prefix of every larger
//! one** and the validation set never changes: a data-scaling curve compares like with like.
//! Floors are taken of the `f64` product, as Python's `int(n * f)` does.
//!
//! The permutation is a Fisher–Yates shuffle driven by `ChaCha8Rng::seed_from_u64(seed)`
//! (rand_chacha 0.3): for `i` from `n − 1` down to 1, `j = rng.gen_range(0..=i)` drawn as a
//! `u64` and positions `i` and `j` swapped. It is the same on every platform and thread count.
//!
//! ```
//! use matscale_structures::dataset::{DatasetSplit, SplitConfig, TrainSize};
//!
//! let config = SplitConfig { seed: 1024, val_fraction: 0.1, test_fraction: 0.0 };
//! let split = DatasetSplit::new(1000, &config).unwrap();
//! assert_eq!(split.validation().len(), 100);
//! let small = split.train_subset(TrainSize::Fraction(0.01)).unwrap();
//! let large = split.train_subset(TrainSize::Count(500)).unwrap();
//! assert_eq!(small.len(), 9);
//! assert_eq!(small, &large[..9]);
//! ```
//!
//! # Linear reference energies
//!
//! [`LinearReference`] fits one energy per element, `E ≈ Σ_Z n_Z e_Z`, by least squares over the
//! labelled structures. The fit streams: each structure's composition row is folded into an
//! upper-triangular factor by Givens rotations (a QR factorisation that never forms the normal
//! equations, so it keeps full accuracy), and a zero pivot reports which element the data cannot
//! determine.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::batch::GraphOptions;
use crate::elements;
use crate::neighbors::NeighborError;
use crate::Structure;

/// Why a split, a fit or a statistic could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DatasetError {
    /// A fraction outside its allowed range.
    #[error("`{name}` must be in {range}, got {value}")]
    InvalidFraction {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range, in words.
        range: &'static str,
    },
    /// Validation and test leave nothing to train on.
    #[error(
        "{n} structures leave no training data after {n_val} for validation and {n_test} for test"
    )]
    EmptyTrainingPool {
        /// Data-set size.
        n: usize,
        /// Validation size.
        n_val: usize,
        /// Test size.
        n_test: usize,
    },
    /// An absolute training size larger than the pool (or zero).
    #[error("a training subset of {requested} structures is not possible: the pool holds {pool}")]
    InvalidSubsetSize {
        /// The size asked for.
        requested: usize,
        /// The size of the training pool.
        pool: usize,
    },
    /// No structure carries an energy.
    #[error("no structure has an energy label")]
    NoEnergies,
    /// An element of the requested reference set occurs in no labelled structure.
    #[error(
        "element {symbol} (Z = {z}) occurs in no structure with an energy: its reference energy \
         is undetermined"
    )]
    ElementAbsent {
        /// Chemical symbol.
        symbol: &'static str,
        /// Atomic number.
        z: u8,
    },
    /// The compositions do not determine every element's energy.
    #[error(
        "the reference energy of {symbol} (Z = {z}) is undetermined: its atom counts are a \
         linear combination of the other elements' over the labelled structures (e.g. fixed \
         stoichiometry); add structures of other compositions or fit fewer elements"
    )]
    RankDeficient {
        /// Chemical symbol.
        symbol: &'static str,
        /// Atomic number.
        z: u8,
    },
    /// A structure contains an element the reference has no energy for.
    #[error(
        "structure {structure} contains {symbol} (Z = {z}), which the reference does not cover"
    )]
    ElementNotInReference {
        /// Index of the structure.
        structure: usize,
        /// Chemical symbol.
        symbol: &'static str,
        /// Atomic number.
        z: u8,
    },
    /// A neighbour list (for the average degree) failed.
    #[error("structure {structure}: {source}")]
    Neighbors {
        /// Index of the structure.
        structure: usize,
        /// The neighbour-list error.
        #[source]
        source: NeighborError,
    },
}

fn symbol(z: u8) -> &'static str {
    elements::symbol(z).unwrap_or("X")
}

/// The permutation of `0..n` drawn from `seed` (see the [module docs](self) for the algorithm).
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i as u64) as usize;
        order.swap(i, j);
    }
    order
}

/// Parameters of a [`DatasetSplit`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitConfig {
    /// Seed of the shuffle (the study uses 1024).
    pub seed: u64,
    /// Fraction of the data set held out for validation, in [0, 1).
    pub val_fraction: f64,
    /// Fraction held out for test, in [0, 1) (the study has no test split).
    #[serde(default)]
    pub test_fraction: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            seed: 1024,
            val_fraction: 0.1,
            test_fraction: 0.0,
        }
    }
}

/// The size of a training subset: a fraction of the training pool or an absolute count.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TrainSize {
    /// `max(1, ⌊pool·f⌋)` structures, `f` in (0, 1].
    Fraction(f64),
    /// Exactly this many structures (1..=pool).
    Count(usize),
}

/// A seeded split of `n` structures into validation, test and a training pool whose subsets are
/// nested prefixes. Indices refer to the data set's order.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSplit {
    order: Vec<usize>,
    n_val: usize,
    n_test: usize,
}

fn floor_fraction(n: usize, f: f64) -> usize {
    (n as f64 * f).floor() as usize
}

impl DatasetSplit {
    /// Shuffles `0..n` with `config.seed` and cuts validation, test and training pool.
    pub fn new(n: usize, config: &SplitConfig) -> Result<Self, DatasetError> {
        for (name, value) in [
            ("val_fraction", config.val_fraction),
            ("test_fraction", config.test_fraction),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(DatasetError::InvalidFraction {
                    name,
                    value,
                    range: "[0, 1)",
                });
            }
        }
        let n_val = floor_fraction(n, config.val_fraction);
        let n_test = floor_fraction(n, config.test_fraction);
        if n_val + n_test >= n {
            return Err(DatasetError::EmptyTrainingPool { n, n_val, n_test });
        }
        Ok(Self {
            order: shuffled_indices(n, config.seed),
            n_val,
            n_test,
        })
    }

    /// The whole shuffled order: validation, then test, then the training pool.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Validation indices (fixed for every training size).
    pub fn validation(&self) -> &[usize] {
        &self.order[..self.n_val]
    }

    /// Test indices.
    pub fn test(&self) -> &[usize] {
        &self.order[self.n_val..self.n_val + self.n_test]
    }

    /// Every index available for training, in shuffled order.
    pub fn train_pool(&self) -> &[usize] {
        &self.order[self.n_val + self.n_test..]
    }

    /// The number of training structures for `size`.
    pub fn train_len(&self, size: TrainSize) -> Result<usize, DatasetError> {
        let pool = self.train_pool().len();
        match size {
            TrainSize::Fraction(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(DatasetError::InvalidFraction {
                        name: "training fraction",
                        value: f,
                        range: "(0, 1]",
                    });
                }
                Ok(floor_fraction(pool, f).max(1))
            }
            TrainSize::Count(k) => {
                if k == 0 || k > pool {
                    return Err(DatasetError::InvalidSubsetSize { requested: k, pool });
                }
                Ok(k)
            }
        }
    }

    /// The training subset of `size`: a prefix of the training pool, so subsets are nested.
    pub fn train_subset(&self, size: TrainSize) -> Result<&[usize], DatasetError> {
        let len = self.train_len(size)?;
        Ok(&self.train_pool()[..len])
    }
}

/// Per-element reference energies (eV per atom) fitted by least squares to total energies.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearReference {
    /// Atomic numbers, ascending.
    elements: Vec<u8>,
    /// Energy per atom of each element, eV.
    energies: Vec<f64>,
    /// Root mean square of the fit residuals over structures, eV.
    residual_rms: f64,
    /// Number of structures fitted.
    n_structures: usize,
}

/// Streaming least squares by Givens rotations: `r` is the upper-triangular factor of the rows
/// seen so far, `qty` the rotated right-hand side.
struct GivensQr {
    m: usize,
    r: Vec<f64>,
    qty: Vec<f64>,
    residual_sq: f64,
}

impl GivensQr {
    fn new(m: usize) -> Self {
        Self {
            m,
            r: vec![0.0; m * m],
            qty: vec![0.0; m],
            residual_sq: 0.0,
        }
    }

    fn add_row(&mut self, row: &mut [f64], mut y: f64) {
        let m = self.m;
        for k in 0..m {
            if row[k] == 0.0 {
                continue;
            }
            let rkk = self.r[k * m + k];
            let h = rkk.hypot(row[k]);
            let (c, s) = (rkk / h, row[k] / h);
            for l in k..m {
                let (a, b) = (self.r[k * m + l], row[l]);
                self.r[k * m + l] = c * a + s * b;
                row[l] = c * b - s * a;
            }
            let q = self.qty[k];
            self.qty[k] = c * q + s * y;
            y = c * y - s * q;
        }
        self.residual_sq += y * y;
    }

    /// Solves `R x = Qᵀy`; `Err(k)` names the first column with a (numerically) zero pivot.
    fn solve(&self) -> Result<Vec<f64>, usize> {
        let m = self.m;
        let max_pivot = (0..m).map(|k| self.r[k * m + k].abs()).fold(0.0, f64::max);
        let tol = 1e-10 * max_pivot.max(f64::MIN_POSITIVE);
        if let Some(k) = (0..m).find(|&k| self.r[k * m + k].abs() <= tol) {
            return Err(k);
        }
        let mut x = vec![0.0; m];
        for k in (0..m).rev() {
            let mut acc = self.qty[k];
            for l in k + 1..m {
                acc -= self.r[k * m + l] * x[l];
            }
            x[k] = acc / self.r[k * m + k];
        }
        Ok(x)
    }
}

impl LinearReference {
    /// Fits one energy per element present in the labelled structures (those with an energy).
    pub fn fit<S: Borrow<Structure>>(structures: &[S]) -> Result<Self, DatasetError> {
        let mut present = [false; 256];
        for s in structures.iter().map(Borrow::borrow) {
            if s.energy().is_some() {
                for &z in s.numbers() {
                    present[z as usize] = true;
                }
            }
        }
        let elements: Vec<u8> = (0..=255u8).filter(|&z| present[z as usize]).collect();
        Self::fit_elements(structures, &elements)
    }

    /// Fits the energies of exactly `elements`; structures containing other elements are an
    /// error, and so is an element the data cannot determine.
    pub fn fit_elements<S: Borrow<Structure>>(
        structures: &[S],
        elements: &[u8],
    ) -> Result<Self, DatasetError> {
        let mut elements = elements.to_vec();
        elements.sort_unstable();
        elements.dedup();
        let mut column = [usize::MAX; 256];
        for (k, &z) in elements.iter().enumerate() {
            column[z as usize] = k;
        }
        let m = elements.len();
        let mut qr = GivensQr::new(m);
        let mut seen = vec![false; m];
        let mut row = vec![0.0; m];
        let mut n_structures = 0;
        for (index, s) in structures.iter().map(Borrow::borrow).enumerate() {
            let Some(energy) = s.energy() else { continue };
            row.iter_mut().for_each(|v| *v = 0.0);
            for &z in s.numbers() {
                let k = column[z as usize];
                if k == usize::MAX {
                    return Err(DatasetError::ElementNotInReference {
                        structure: index,
                        symbol: symbol(z),
                        z,
                    });
                }
                row[k] += 1.0;
                seen[k] = true;
            }
            qr.add_row(&mut row, energy);
            n_structures += 1;
        }
        if n_structures == 0 {
            return Err(DatasetError::NoEnergies);
        }
        if let Some(k) = seen.iter().position(|&s| !s) {
            let z = elements[k];
            return Err(DatasetError::ElementAbsent {
                symbol: symbol(z),
                z,
            });
        }
        let energies = qr.solve().map_err(|k| DatasetError::RankDeficient {
            symbol: symbol(elements[k]),
            z: elements[k],
        })?;
        Ok(Self {
            elements,
            energies,
            residual_rms: (qr.residual_sq / n_structures as f64).sqrt(),
            n_structures,
        })
    }

    /// The fitted elements (ascending atomic numbers).
    pub fn elements(&self) -> &[u8] {
        &self.elements
    }

    /// Reference energy per atom of element `z`, eV, if fitted.
    pub fn energy_of_element(&self, z: u8) -> Option<f64> {
        self.elements
            .binary_search(&z)
            .ok()
            .map(|k| self.energies[k])
    }

    /// `(Z, eV per atom)` for every fitted element.
    pub fn per_element(&self) -> BTreeMap<u8, f64> {
        self.elements
            .iter()
            .copied()
            .zip(self.energies.iter().copied())
            .collect()
    }

    /// Root mean square residual of the fit over structures, eV (0 for exactly linear data).
    pub fn residual_rms(&self) -> f64 {
        self.residual_rms
    }

    /// Number of structures the fit used.
    pub fn n_structures(&self) -> usize {
        self.n_structures
    }

    /// The reference energy `Σ_Z n_Z e_Z` of a structure, eV; `index` names it in errors.
    pub fn reference_energy(
        &self,
        structure: &Structure,
        index: usize,
    ) -> Result<f64, DatasetError> {
        structure
            .numbers()
            .iter()
            .map(|&z| {
                self.energy_of_element(z)
                    .ok_or(DatasetError::ElementNotInReference {
                        structure: index,
                        symbol: symbol(z),
                        z,
                    })
            })
            .sum()
    }
}

/// Summary statistics of a data set's labels and graphs, for normalisation and model settings
/// (EquiformerV2's `avg_num_nodes` and `avg_degree`). Standard deviations are population
/// standard deviations (divide by the count, as numpy's default).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelStats {
    /// Number of structures.
    pub n_structures: usize,
    /// Total number of atoms.
    pub n_atoms: usize,
    /// Mean atoms per structure.
    pub avg_num_nodes: f64,
    /// Structures with an energy label.
    pub n_energy: usize,
    /// Mean energy per atom, eV/atom, after subtracting the linear reference when one is given.
    pub energy_per_atom_mean: f64,
    /// Standard deviation of the energy per atom, eV/atom (same subtraction).
    pub energy_per_atom_std: f64,
    /// Structures with force labels.
    pub n_forces: usize,
    /// Root mean square force component, eV/Å: `sqrt(mean over atoms and x, y, z of F²)`.
    pub force_rms: f64,
    /// Structures with a stress label.
    pub n_stress: usize,
    /// Mean of the stress components in Voigt order (xx, yy, zz, yz, xz, xy), eV/Å^3.
    pub stress_mean: [f64; 6],
    /// Standard deviation of all six Voigt stress components pooled, eV/Å^3.
    pub stress_std: f64,
    /// Mean number of incoming edges per atom under the graph options, when given.
    pub avg_degree: Option<f64>,
    /// Mean number of edges (directed pairs) per structure under the graph options, when given.
    pub avg_num_edges: Option<f64>,
    /// Atoms of each element over the data set: `(Z, count)`, ascending Z.
    pub element_counts: Vec<(u8, usize)>,
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

impl LabelStats {
    /// Computes the statistics of `structures`; energies are taken relative to `reference` when
    /// given, and `graph` (cutoff, max neighbours) sets the average degree when given.
    pub fn compute<S: Borrow<Structure> + Sync>(
        structures: &[S],
        reference: Option<&LinearReference>,
        graph: Option<&GraphOptions>,
    ) -> Result<Self, DatasetError> {
        let mut n_atoms = 0;
        let mut per_atom = Vec::new();
        let (mut n_forces, mut force_sq, mut force_components) = (0, 0.0, 0usize);
        let mut voigt: Vec<[f64; 6]> = Vec::new();
        let mut counts = [0usize; 256];
        for (index, s) in structures.iter().map(Borrow::borrow).enumerate() {
            n_atoms += s.len();
            for &z in s.numbers() {
                counts[z as usize] += 1;
            }
            if let (Some(e), false) = (s.energy(), s.is_empty()) {
                let e_ref = match reference {
                    Some(r) => r.reference_energy(s, index)?,
                    None => 0.0,
                };
                per_atom.push((e - e_ref) / s.len() as f64);
            }
            if let Some(f) = s.forces() {
                n_forces += 1;
                force_sq += f.iter().flatten().map(|v| v * v).sum::<f64>();
                force_components += 3 * f.len();
            }
            if let Some(v) = s.stress_voigt() {
                voigt.push(v);
            }
        }
        let (energy_per_atom_mean, energy_per_atom_std) = mean_std(&per_atom);
        let mut stress_mean = [0.0; 6];
        for v in &voigt {
            for c in 0..6 {
                stress_mean[c] += v[c] / voigt.len() as f64;
            }
        }
        let pooled: Vec<f64> = voigt.iter().flatten().copied().collect();
        let edges_total = match graph {
            None => None,
            Some(options) => {
                let edges = structures
                    .par_iter()
                    .enumerate()
                    .map(|(structure, s)| {
                        options
                            .neighbor_list(s.borrow())
                            .map(|l| l.len())
                            .map_err(|source| DatasetError::Neighbors { structure, source })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(edges.iter().sum::<usize>() as f64)
            }
        };
        let avg_degree = edges_total.map(|e| e / n_atoms.max(1) as f64);
        let avg_num_edges = edges_total.map(|e| e / structures.len().max(1) as f64);
        Ok(Self {
            n_structures: structures.len(),
            n_atoms,
            avg_num_nodes: n_atoms as f64 / structures.len().max(1) as f64,
            n_energy: per_atom.len(),
            energy_per_atom_mean,
            energy_per_atom_std,
            n_forces,
            force_rms: if force_components == 0 {
                0.0
            } else {
                (force_sq / force_components as f64).sqrt()
            },
            n_stress: voigt.len(),
            stress_mean,
            stress_std: mean_std(&pooled).1,
            avg_degree,
            avg_num_edges,
            element_counts: (0..=255u8)
                .filter(|&z| counts[z as usize] > 0)
                .map(|z| (z, counts[z as usize]))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest, ProptestConfig};

    fn structure(numbers: Vec<u8>, energy: Option<f64>) -> Structure {
        let n = numbers.len();
        let positions = (0..n).map(|k| [k as f64 * 2.0, 0.0, 0.0]).collect();
        let cell = [[2.0 * n as f64, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]];
        let mut s = Structure::new(numbers, positions, cell, [true; 3]).unwrap();
        if let Some(e) = energy {
            s.set_energy(e).unwrap();
        }
        s
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let a = shuffled_indices(1000, 7);
        assert_eq!(a, shuffled_indices(1000, 7));
        assert_ne!(a, shuffled_indices(1000, 8));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, sorted, "a shuffle of 1000 is not the identity");
        assert_eq!(shuffled_indices(0, 1), Vec::<usize>::new());
        assert_eq!(shuffled_indices(1, 1), vec![0]);
    }

    #[test]
    fn split_sizes_follow_the_study() {
        let cfg = SplitConfig {
            seed: 1024,
            val_fraction: 0.1,
            test_fraction: 0.05,
        };
        let split = DatasetSplit::new(1001, &cfg).unwrap();
        assert_eq!(split.validation().len(), 100);
        assert_eq!(split.test().len(), 50);
        assert_eq!(split.train_pool().len(), 851);
        assert_eq!(split.train_len(TrainSize::Fraction(1e-6)).unwrap(), 1);
        assert_eq!(split.train_len(TrainSize::Fraction(0.01)).unwrap(), 8);
        assert_eq!(split.train_len(TrainSize::Fraction(1.0)).unwrap(), 851);
        // Disjoint and covering.
        let mut all: Vec<usize> = split
            .validation()
            .iter()
            .chain(split.test())
            .chain(split.train_pool())
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1001).collect::<Vec<_>>());
        // The validation set does not depend on the test fraction's presence beyond the cut.
        let no_test = DatasetSplit::new(
            1001,
            &SplitConfig {
                test_fraction: 0.0,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_eq!(no_test.validation(), split.validation());
    }

    #[test]
    fn split_errors() {
        let bad = SplitConfig {
            seed: 0,
            val_fraction: 1.0,
            test_fraction: 0.0,
        };
        assert!(matches!(
            DatasetSplit::new(10, &bad),
            Err(DatasetError::InvalidFraction {
                name: "val_fraction",
                ..
            })
        ));
        let full = SplitConfig {
            seed: 0,
            val_fraction: 0.5,
            test_fraction: 0.5,
        };
        assert!(matches!(
            DatasetSplit::new(10, &full),
            Err(DatasetError::EmptyTrainingPool { .. })
        ));
        let split = DatasetSplit::new(10, &SplitConfig::default()).unwrap();
        for size in [
            TrainSize::Fraction(0.0),
            TrainSize::Fraction(1.5),
            TrainSize::Fraction(f64::NAN),
        ] {
            assert!(matches!(
                split.train_subset(size),
                Err(DatasetError::InvalidFraction { .. })
            ));
        }
        assert!(matches!(
            split.train_subset(TrainSize::Count(10)),
            Err(DatasetError::InvalidSubsetSize {
                requested: 10,
                pool: 9
            })
        ));
        assert!(split.train_subset(TrainSize::Count(0)).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn training_subsets_are_nested(
            n in 2usize..3000,
            seed in any::<u64>(),
            val in 0.0f64..0.5,
            fractions in prop::collection::vec(1e-4f64..=1.0, 2..6),
            count in 1usize..3000,
        ) {
            let config = SplitConfig { seed, val_fraction: val, test_fraction: 0.0 };
            let split = DatasetSplit::new(n, &config).unwrap();
            prop_assert_eq!(&split, &DatasetSplit::new(n, &config).unwrap());
            let pool = split.train_pool().len();
            let mut sizes: Vec<TrainSize> =
                fractions.iter().map(|&f| TrainSize::Fraction(f)).collect();
            sizes.push(TrainSize::Count(count.min(pool)));
            let subsets: Vec<&[usize]> =
                sizes.iter().map(|&s| split.train_subset(s).unwrap()).collect();
            for a in &subsets {
                prop_assert!(!a.is_empty());
                prop_assert!(a.iter().all(|i| !split.validation().contains(i)));
                for b in &subsets {
                    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
                    prop_assert_eq!(*small, &large[..small.len()]);
                }
            }
        }
    }

    #[test]
    fn linear_reference_recovers_known_energies() {
        // Energies exactly linear in composition: Al, Cu, Ni, Pt with known e_Z.
        let truth = [(13u8, -3.74), (29, -4.09), (28, -5.57), (78, -6.05)];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let structures: Vec<Structure> = (0..40)
            .map(|_| {
                let n = rng.gen_range(1..12);
                let numbers: Vec<u8> = (0..n).map(|_| truth[rng.gen_range(0..4)].0).collect();
                let e = numbers
                    .iter()
                    .map(|z| truth.iter().find(|t| t.0 == *z).unwrap().1)
                    .sum();
                structure(numbers, Some(e))
            })
            .collect();
        let fit = LinearReference::fit(&structures).unwrap();
        assert_eq!(fit.elements(), &[13, 28, 29, 78]);
        for (z, e) in truth {
            assert!(
                (fit.energy_of_element(z).unwrap() - e).abs() < 1e-9,
                "Z={z}"
            );
        }
        assert!(fit.residual_rms() < 1e-9);
        assert_eq!(fit.n_structures(), 40);
        // Statistics after subtraction: zero energy per atom.
        let stats = LabelStats::compute(&structures, Some(&fit), None).unwrap();
        assert!(stats.energy_per_atom_mean.abs() < 1e-9);
        assert!(stats.energy_per_atom_std < 1e-9);
        assert_eq!((stats.avg_degree, stats.avg_num_edges), (None, None));
    }

    #[test]
    fn noisy_linear_reference_matches_normal_equations() {
        // Two elements, three structures: solve the 2x2 normal equations by hand.
        let structures = vec![
            structure(vec![29, 29], Some(-8.0)),
            structure(vec![29, 79], Some(-7.5)),
            structure(vec![79, 79, 79], Some(-9.3)),
        ];
        // A = [[2,0],[1,1],[0,3]], y = [-8, -7.5, -9.3]
        let (ata, aty) = ([[5.0, 1.0], [1.0, 10.0]], [-23.5, -35.4]);
        let det = ata[0][0] * ata[1][1] - ata[0][1] * ata[1][0];
        let e_cu = (aty[0] * ata[1][1] - ata[0][1] * aty[1]) / det;
        let e_au = (ata[0][0] * aty[1] - aty[0] * ata[1][0]) / det;
        let fit = LinearReference::fit(&structures).unwrap();
        assert!((fit.energy_of_element(29).unwrap() - e_cu).abs() < 1e-12);
        assert!((fit.energy_of_element(79).unwrap() - e_au).abs() < 1e-12);
        assert!(fit.residual_rms() > 0.0);
    }

    #[test]
    fn rank_deficiency_is_an_error() {
        // Fixed 1:1 stoichiometry: only the sum e_Cu + e_Au is determined.
        let structures = vec![
            structure(vec![29, 79], Some(-8.0)),
            structure(vec![79, 29, 29, 79], Some(-16.1)),
            structure(vec![29, 79, 79, 29, 29, 79], Some(-24.0)),
        ];
        let err = LinearReference::fit(&structures).unwrap_err();
        assert!(
            matches!(err, DatasetError::RankDeficient { z: 79, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("Au"));
        let err = LinearReference::fit_elements(&structures, &[29, 47, 79]).unwrap_err();
        assert_eq!(
            err,
            DatasetError::ElementAbsent {
                symbol: "Ag",
                z: 47
            }
        );
        let err = LinearReference::fit_elements(&structures, &[29]).unwrap_err();
        assert!(matches!(
            err,
            DatasetError::ElementNotInReference {
                structure: 0,
                z: 79,
                ..
            }
        ));
        let unlabelled = vec![structure(vec![29], None)];
        assert_eq!(
            LinearReference::fit(&unlabelled).unwrap_err(),
            DatasetError::NoEnergies
        );
    }

    #[test]
    fn label_statistics() {
        let mut a = structure(vec![29, 29], Some(-8.0));
        a.set_forces(vec![[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
            .unwrap();
        a.set_stress([[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1]])
            .unwrap();
        let mut b = structure(vec![29, 29, 29, 29], Some(-12.0));
        b.set_forces(vec![[0.0; 3]; 4]).unwrap();
        let c = structure(vec![79], None);
        let stats = LabelStats::compute(&[a, b, c], None, Some(&GraphOptions::new(2.5))).unwrap();
        assert_eq!((stats.n_structures, stats.n_atoms), (3, 7));
        assert!((stats.avg_num_nodes - 7.0 / 3.0).abs() < 1e-15);
        assert_eq!(stats.n_energy, 2);
        assert!((stats.energy_per_atom_mean + 3.5).abs() < 1e-15);
        assert!((stats.energy_per_atom_std - 0.5).abs() < 1e-15);
        assert_eq!(stats.n_forces, 2);
        assert!((stats.force_rms - (2.0f64 / 18.0).sqrt()).abs() < 1e-15);
        assert_eq!(stats.n_stress, 1);
        assert_eq!(stats.stress_mean, [0.1, 0.1, 0.1, 0.0, 0.0, 0.0]);
        assert!((stats.stress_std - (0.01f64 / 2.0 - 0.0025).sqrt()).abs() < 1e-15);
        // Atoms 2 Å apart along x in a cell of period 2n Å: 2 neighbours each at 2.5 Å, except
        // the single atom in a 2 Å cell (2 self-images) — also 2.
        assert_eq!(stats.avg_degree, Some(2.0));
        assert_eq!(stats.avg_num_edges, Some(14.0 / 3.0));
        assert_eq!(stats.element_counts, vec![(29, 6), (79, 1)]);
    }
}
