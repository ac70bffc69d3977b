//! Random fcc alloys: an unlimited, deterministic data source labelled by [EMT](crate::emt).
//!
//! Each structure is a supercell of the conventional 4-atom fcc cell holding 2–4 (configurable)
//! of the EMT metals with a random composition, at the lattice constant Vegard's law gives for
//! that composition, then homogeneously strained and rattled:
//!
//! 1. pick k elements uniformly from the pool (k uniform in `min_elements..=max_elements`);
//! 2. draw mole fractions from a flat Dirichlet distribution; every chosen element gets at least
//!    one site, the other sites are drawn independently from those fractions;
//! 3. lattice constant a = Σ_e x_e a_e over the actual composition ([`EMT_LATTICE_CONSTANTS`]);
//! 4. supercell drawn uniformly from `supercells` (repetitions of the 4-atom cubic cell);
//! 5. a symmetric strain ε with the six independent components uniform in ±`max_strain`; cell
//!    and positions are mapped by (I + ε);
//! 6. Gaussian displacements with a standard deviation drawn uniformly from `rattle_std`, Å.
//!
//! Structure `i` depends only on the seed and `i` (a ChaCha8 stream per structure, stream
//! number `i`), so structures can be generated in any order and in parallel, and the first
//! `n` structures of a larger set are the same `n` structures.
//!
//! ```
//! use matscale_structures::generate::AlloyGenerator;
//! use matscale_structures::emt::Emt;
//!
//! let generator = AlloyGenerator { seed: 7, ..AlloyGenerator::default() }.check().unwrap();
//! let structures = generator.generate_labelled(0..4, &Emt::new()).unwrap();
//! assert_eq!(structures.len(), 4);
//! assert_eq!(structures[0].len(), 32); // 2x2x2 conventional cells
//! assert!(structures[0].energy().is_some());
//! ```

use std::ops::Range;

use rand::seq::index::sample;
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::elements;
use crate::emt::{Emt, LabelError};
use crate::structure::{vec_mat, InfoValue, Structure};

/// fcc lattice constants (Å) used for Vegard's law: the EMT equilibrium of each pure metal
/// (energy minimum of ASE 3.29's EMT over the lattice constant, rounded to 1e-4 Å), so that
/// unstrained alloys sit near zero stress under the potential that labels them. For reference,
/// the experimental values are Al 4.05, Cu 3.61, Ag 4.09, Au 4.08, Ni 3.52, Pd 3.89, Pt 3.92.
pub const EMT_LATTICE_CONSTANTS: [(&str, f64); 7] = [
    ("Al", 3.9943),
    ("Cu", 3.5898),
    ("Ag", 4.0636),
    ("Au", 4.0562),
    ("Ni", 3.4871),
    ("Pd", 3.8787),
    ("Pt", 3.9218),
];

/// The EMT equilibrium fcc lattice constant of `symbol` (Å), if it is one of the EMT metals.
pub fn lattice_constant(symbol: &str) -> Option<f64> {
    EMT_LATTICE_CONSTANTS
        .iter()
        .find(|(s, _)| *s == symbol)
        .map(|&(_, a)| a)
}

/// Fractional coordinates of the four atoms of the conventional fcc cell.
const FCC_BASIS: [[f64; 3]; 4] = [
    [0.0, 0.0, 0.0],
    [0.0, 0.5, 0.5],
    [0.5, 0.0, 0.5],
    [0.5, 0.5, 0.0],
];

/// Settings of the random alloy generator (TOML/JSON via serde; missing fields take the
/// defaults). Turn it into a [`ValidAlloyGenerator`] with [`AlloyGenerator::check`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlloyGenerator {
    /// The pool of elements (symbols of EMT fcc metals: Al, Cu, Ag, Au, Ni, Pd, Pt).
    /// Default: all seven.
    pub elements: Vec<String>,
    /// Fewest distinct elements per structure (default 2).
    pub min_elements: usize,
    /// Most distinct elements per structure (default 4).
    pub max_elements: usize,
    /// Supercells as repetitions of the conventional 4-atom cubic cell, one drawn uniformly per
    /// structure (default `[[2, 2, 2]]`: 32 atoms).
    pub supercells: Vec<[usize; 3]>,
    /// Largest magnitude of each component of the symmetric strain tensor (default 0.03).
    pub max_strain: f64,
    /// Range `[low, high]` of the standard deviation of the Gaussian rattle, Å, drawn uniformly
    /// per structure (default `[0.05, 0.1]`; equal bounds fix it).
    pub rattle_std: [f64; 2],
    /// Seed of the whole set; structure `i` uses ChaCha8 stream `i` of this seed (default 0).
    pub seed: u64,
}

impl Default for AlloyGenerator {
    fn default() -> Self {
        Self {
            elements: EMT_LATTICE_CONSTANTS
                .iter()
                .map(|(s, _)| (*s).to_string())
                .collect(),
            min_elements: 2,
            max_elements: 4,
            supercells: vec![[2, 2, 2]],
            max_strain: 0.03,
            rattle_std: [0.05, 0.1],
            seed: 0,
        }
    }
}

/// An invalid [`AlloyGenerator`] setting; each message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    /// `elements` holds something that is not a chemical symbol.
    #[error("elements: unknown element symbol {0:?}")]
    UnknownElement(String),
    /// `elements` holds an element that is not one of the EMT fcc metals.
    #[error("elements: {0} is not an EMT fcc metal (expected Al, Cu, Ag, Au, Ni, Pd or Pt)")]
    NotAnFccMetal(String),
    /// `elements` names an element twice.
    #[error("elements: {0} is listed twice")]
    DuplicateElement(String),
    /// `min_elements`/`max_elements` do not fit the pool.
    #[error(
        "min_elements = {min}, max_elements = {max}: need 1 <= min_elements <= max_elements <= {pool} (the number of elements in the pool)"
    )]
    ElementCount {
        /// `min_elements`.
        min: usize,
        /// `max_elements`.
        max: usize,
        /// Size of the pool.
        pool: usize,
    },
    /// `supercells` is empty or holds a repetition that is zero or too small for the elements.
    #[error("supercells: {0}")]
    Supercell(String),
    /// `max_strain` is negative, not finite or too large (at least 0.5).
    #[error("max_strain = {0}: must be finite and in [0, 0.5)")]
    Strain(f64),
    /// `rattle_std` is not a finite range of non-negative values.
    #[error("rattle_std = [{0}, {1}]: need finite 0 <= low <= high")]
    Rattle(f64, f64),
}

impl AlloyGenerator {
    /// Validates the settings.
    pub fn check(&self) -> Result<ValidAlloyGenerator, GenerateError> {
        let mut pool = Vec::with_capacity(self.elements.len());
        for symbol in &self.elements {
            let number = elements::atomic_number(symbol)
                .ok_or_else(|| GenerateError::UnknownElement(symbol.clone()))?;
            let a = lattice_constant(symbol)
                .ok_or_else(|| GenerateError::NotAnFccMetal(symbol.clone()))?;
            if pool.iter().any(|&(z, _)| z == number) {
                return Err(GenerateError::DuplicateElement(symbol.clone()));
            }
            pool.push((number, a));
        }
        if self.min_elements < 1
            || self.min_elements > self.max_elements
            || self.max_elements > pool.len()
        {
            return Err(GenerateError::ElementCount {
                min: self.min_elements,
                max: self.max_elements,
                pool: pool.len(),
            });
        }
        if self.supercells.is_empty() {
            return Err(GenerateError::Supercell("the list is empty".into()));
        }
        for rep in &self.supercells {
            let sites = rep.iter().try_fold(4usize, |n, &r| n.checked_mul(r));
            match sites {
                Some(n) if n >= self.max_elements && n <= u32::MAX as usize => {}
                _ => {
                    return Err(GenerateError::Supercell(format!(
                        "{rep:?} gives {} sites; need every repetition >= 1 and at least max_elements = {} sites",
                        sites.map_or("too many".to_string(), |n| n.to_string()),
                        self.max_elements
                    )))
                }
            }
        }
        if !(self.max_strain.is_finite() && (0.0..0.5).contains(&self.max_strain)) {
            return Err(GenerateError::Strain(self.max_strain));
        }
        let [lo, hi] = self.rattle_std;
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi) {
            return Err(GenerateError::Rattle(lo, hi));
        }
        Ok(ValidAlloyGenerator {
            config: self.clone(),
            pool,
        })
    }
}

/// A checked [`AlloyGenerator`], ready to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidAlloyGenerator {
    config: AlloyGenerator,
    /// (atomic number, lattice constant Å) per pool element.
    pool: Vec<(u8, f64)>,
}

impl ValidAlloyGenerator {
    /// The settings.
    pub fn config(&self) -> &AlloyGenerator {
        &self.config
    }

    /// Structure number `index` (unlabelled). Its `info` records the generator's choices:
    /// `generator` (`"emt_fcc_alloy"`), `seed`, `index`, `lattice_constant` (Å, before strain),
    /// `strain` (Voigt xx, yy, zz, yz, xz, xy) and `rattle_std` (Å).
    pub fn structure(&self, index: u64) -> Structure {
        let c = &self.config;
        let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
        rng.set_stream(index);

        let k = rng.gen_range(c.min_elements..=c.max_elements);
        let chosen: Vec<(u8, f64)> = sample(&mut rng, self.pool.len(), k)
            .into_iter()
            .map(|e| self.pool[e])
            .collect();
        let rep = c.supercells[rng.gen_range(0..c.supercells.len())];
        let n_sites = 4 * rep[0] * rep[1] * rep[2];

        // Flat Dirichlet fractions; every chosen element gets one site, the rest are drawn.
        let weights: Vec<f64> = (0..k).map(|_| -(1.0 - rng.gen::<f64>()).ln()).collect();
        let total: f64 = weights.iter().sum();
        let mut species = vec![usize::MAX; n_sites];
        for (e, site) in sample(&mut rng, n_sites, k).into_iter().enumerate() {
            species[site] = e;
        }
        for s in species.iter_mut().filter(|s| **s == usize::MAX) {
            let mut u = rng.gen::<f64>() * total;
            *s = k - 1;
            for (e, w) in weights.iter().enumerate() {
                if u < *w {
                    *s = e;
                    break;
                }
                u -= w;
            }
        }
        let a = species.iter().map(|&e| chosen[e].1).sum::<f64>() / n_sites as f64;

        // Symmetric strain, deformation F = I + ε.
        let m = c.max_strain;
        let mut draw = || if m > 0.0 { rng.gen_range(-m..=m) } else { 0.0 };
        let voigt = [draw(), draw(), draw(), draw(), draw(), draw()];
        let f = [
            [1.0 + voigt[0], voigt[5], voigt[4]],
            [voigt[5], 1.0 + voigt[1], voigt[3]],
            [voigt[4], voigt[3], 1.0 + voigt[2]],
        ];
        let ideal_cell = [
            [a * rep[0] as f64, 0.0, 0.0],
            [0.0, a * rep[1] as f64, 0.0],
            [0.0, 0.0, a * rep[2] as f64],
        ];
        let cell = [
            vec_mat(&ideal_cell[0], &f),
            vec_mat(&ideal_cell[1], &f),
            vec_mat(&ideal_cell[2], &f),
        ];

        let [lo, hi] = c.rattle_std;
        let sigma = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
        let normal = Normal::new(0.0, sigma).expect("rattle_std is validated finite and >= 0");
        let mut positions = Vec::with_capacity(n_sites);
        for x in 0..rep[0] {
            for y in 0..rep[1] {
                for z in 0..rep[2] {
                    for b in &FCC_BASIS {
                        let ideal = [
                            (x as f64 + b[0]) * a,
                            (y as f64 + b[1]) * a,
                            (z as f64 + b[2]) * a,
                        ];
                        let mut r = vec_mat(&ideal, &f);
                        for v in &mut r {
                            *v += normal.sample(&mut rng);
                        }
                        positions.push(r);
                    }
                }
            }
        }
        let numbers = species.iter().map(|&e| chosen[e].0).collect();
        let mut s = Structure::new(numbers, positions, cell, [true; 3])
            .expect("generated structures are valid: EMT metals, finite positions, strain < 0.5");
        let info = s.info_mut();
        info.insert("generator".into(), InfoValue::Str("emt_fcc_alloy".into()));
        info.insert("seed".into(), InfoValue::Int(c.seed as i64));
        info.insert("index".into(), InfoValue::Int(index as i64));
        info.insert("lattice_constant".into(), InfoValue::Float(a));
        info.insert("strain".into(), InfoValue::FloatArray(voigt.to_vec()));
        info.insert("rattle_std".into(), InfoValue::Float(sigma));
        s
    }

    /// Structures `indices` (unlabelled), generated in parallel, in index order.
    pub fn generate(&self, indices: Range<u64>) -> Vec<Structure> {
        indices.into_par_iter().map(|i| self.structure(i)).collect()
    }

    /// Structures `indices` labelled with `emt` (energy, forces, stress), in parallel, in index
    /// order. The [`LabelError`] index counts from the start of `indices`.
    pub fn generate_labelled(
        &self,
        indices: Range<u64>,
        emt: &Emt,
    ) -> Result<Vec<Structure>, LabelError> {
        let start = indices.start;
        indices
            .into_par_iter()
            .map(|i| {
                let mut s = self.structure(i);
                emt.label(&mut s).map_err(|source| LabelError {
                    index: (i - start) as usize,
                    source,
                })?;
                Ok(s)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structure::{inverse3, Mat3};
    use std::collections::BTreeSet;

    fn info_f64(s: &Structure, key: &str) -> f64 {
        match s.info().get(key) {
            Some(InfoValue::Float(v)) => *v,
            other => panic!("info {key}: {other:?}"),
        }
    }

    fn strain_of(s: &Structure) -> Vec<f64> {
        match s.info().get("strain") {
            Some(InfoValue::FloatArray(v)) => v.clone(),
            other => panic!("info strain: {other:?}"),
        }
    }

    fn mat_mul(a: &Mat3, b: &Mat3) -> Mat3 {
        let mut c = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
            }
        }
        c
    }

    #[test]
    fn deterministic_and_order_independent() {
        let g = AlloyGenerator::default().check().unwrap();
        let batch = g.generate(0..12);
        let again = g.generate(0..12);
        assert_eq!(batch, again);
        // Structure 7 alone, or in a batch starting elsewhere, is the same structure.
        assert_eq!(g.structure(7), batch[7]);
        assert_eq!(g.generate(5..9)[2], batch[7]);
        // Another seed gives other structures.
        let other = AlloyGenerator {
            seed: 1,
            ..AlloyGenerator::default()
        }
        .check()
        .unwrap();
        assert_ne!(other.structure(7).positions(), batch[7].positions());
        assert_ne!(batch[0].positions(), batch[1].positions());
    }

    #[test]
    fn composition_within_bounds() {
        let config = AlloyGenerator {
            elements: vec![
                "Cu".into(),
                "Ag".into(),
                "Au".into(),
                "Ni".into(),
                "Pt".into(),
            ],
            min_elements: 2,
            max_elements: 4,
            supercells: vec![[1, 1, 1], [2, 2, 2], [3, 2, 1]],
            ..AlloyGenerator::default()
        };
        let g = config.check().unwrap();
        let pool: BTreeSet<u8> = [29, 47, 79, 28, 78].into();
        let mut counts_seen = BTreeSet::new();
        let mut sizes_seen = BTreeSet::new();
        let mut elements_seen = BTreeSet::new();
        for s in g.generate(0..300) {
            let present: BTreeSet<u8> = s.numbers().iter().copied().collect();
            assert!(present.is_subset(&pool), "{present:?}");
            assert!((2..=4).contains(&present.len()), "{present:?}");
            counts_seen.insert(present.len());
            sizes_seen.insert(s.len());
            elements_seen.extend(present);
            // Vegard's law over the actual composition.
            let a: f64 = s
                .symbols()
                .iter()
                .map(|sym| lattice_constant(sym).unwrap())
                .sum::<f64>()
                / s.len() as f64;
            assert!((info_f64(&s, "lattice_constant") - a).abs() < 1e-12);
        }
        assert_eq!(counts_seen, [2, 3, 4].into());
        assert_eq!(sizes_seen, [4, 32, 24].into());
        assert_eq!(elements_seen, pool);
    }

    #[test]
    fn strain_and_rattle_magnitudes() {
        let sigma = 0.07;
        let config = AlloyGenerator {
            max_strain: 0.03,
            rattle_std: [sigma, sigma],
            ..AlloyGenerator::default()
        };
        let g = config.check().unwrap();
        let (mut sum2, mut count) = (0.0, 0usize);
        let mut largest_strain = 0.0f64;
        for s in g.generate(0..100) {
            let a = info_f64(&s, "lattice_constant");
            let ideal = [
                [2.0 * a, 0.0, 0.0],
                [0.0, 2.0 * a, 0.0],
                [0.0, 0.0, 2.0 * a],
            ];
            // F = ideal⁻¹ · cell must be I + ε with ε symmetric, |ε_ij| <= max_strain.
            let f = mat_mul(&inverse3(&ideal).unwrap(), s.cell());
            for i in 0..3 {
                for j in 0..3 {
                    let eps = f[i][j] - if i == j { 1.0 } else { 0.0 };
                    assert!(eps.abs() <= 0.03 + 1e-12, "ε[{i}][{j}] = {eps}");
                    assert!((f[i][j] - f[j][i]).abs() < 1e-12);
                    largest_strain = largest_strain.max(eps.abs());
                }
            }
            let voigt = strain_of(&s);
            assert!((f[1][2] - voigt[3]).abs() < 1e-12 && (f[0][0] - 1.0 - voigt[0]).abs() < 1e-12);
            // Displacements from the strained ideal sites.
            let mut site = 0;
            for x in 0..2 {
                for y in 0..2 {
                    for z in 0..2 {
                        for b in &FCC_BASIS {
                            let ideal = [
                                (x as f64 + b[0]) * a,
                                (y as f64 + b[1]) * a,
                                (z as f64 + b[2]) * a,
                            ];
                            let r0 = vec_mat(&ideal, &f);
                            for k in 0..3 {
                                let d = s.positions()[site][k] - r0[k];
                                sum2 += d * d;
                                count += 1;
                            }
                            site += 1;
                        }
                    }
                }
            }
            assert_eq!(info_f64(&s, "rattle_std"), sigma);
        }
        assert!(
            largest_strain > 0.025,
            "strains should fill the range: {largest_strain}"
        );
        let std = (sum2 / count as f64).sqrt();
        // 9,600 samples: the standard error of the estimated σ is about 0.7%.
        assert!(
            (std - sigma).abs() < 0.05 * sigma,
            "rattle std {std} vs {sigma}"
        );
    }

    #[test]
    fn labelled_structures_are_physical() {
        let g = AlloyGenerator::default().check().unwrap();
        let structures = g.generate_labelled(0..50, &Emt::new()).unwrap();
        for s in &structures {
            let e = s.energy().unwrap() / s.len() as f64;
            assert!(e.abs() < 0.5, "energy per atom {e} eV");
            let forces = s.forces().unwrap();
            for k in 0..3 {
                let total: f64 = forces.iter().map(|f| f[k]).sum();
                assert!(total.abs() < 1e-10, "net force {total}");
            }
            let largest = forces
                .iter()
                .map(|f| (f[0] * f[0] + f[1] * f[1] + f[2] * f[2]).sqrt())
                .fold(0.0, f64::max);
            assert!(
                largest > 0.01 && largest < 20.0,
                "largest force {largest} eV/Å"
            );
            let stress = s.stress().unwrap();
            // Vegard alloys sit at a few GPa and ±3 % strain adds up to ~20 GPa (B ≈ 100–280 GPa):
            // |σ| must stay below 0.25 eV/Å^3 = 40 GPa.
            assert!(
                stress.iter().flatten().all(|v| v.abs() < 0.25),
                "{stress:?}"
            );
        }
    }

    #[test]
    fn lattice_constants_are_emt_equilibria() {
        let emt = Emt::new();
        for (symbol, a) in EMT_LATTICE_CONSTANTS {
            let h = a / 2.0;
            let cell = [[0.0, h, h], [h, 0.0, h], [h, h, 0.0]];
            let s = Structure::from_symbols(&[symbol], vec![[0.0; 3]], cell, [true; 3]).unwrap();
            let p = emt.calculate(&s).unwrap().stress.unwrap()[0][0];
            // 1e-4 Å of rounding is about 1e-4 eV/Å^3 of pressure at most.
            assert!(p.abs() < 2e-4, "{symbol}: stress {p} eV/Å^3 at a = {a}");
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let base = AlloyGenerator::default();
        let err = |c: AlloyGenerator| c.check().unwrap_err();
        assert_eq!(
            err(AlloyGenerator {
                elements: vec!["Cu".into(), "Xx".into()],
                ..base.clone()
            }),
            GenerateError::UnknownElement("Xx".into())
        );
        for bad in ["Fe", "O"] {
            let e = err(AlloyGenerator {
                elements: vec!["Cu".into(), bad.into()],
                min_elements: 1,
                max_elements: 2,
                ..base.clone()
            });
            assert_eq!(e, GenerateError::NotAnFccMetal(bad.into()));
            assert!(e.to_string().contains(bad));
        }
        assert_eq!(
            err(AlloyGenerator {
                elements: vec!["Cu".into(), "Cu".into()],
                ..base.clone()
            }),
            GenerateError::DuplicateElement("Cu".into())
        );
        for (min, max) in [(0, 2), (3, 2), (2, 8)] {
            let e = err(AlloyGenerator {
                min_elements: min,
                max_elements: max,
                ..base.clone()
            });
            assert!(matches!(e, GenerateError::ElementCount { .. }), "{e}");
            assert!(e.to_string().contains("max_elements"));
        }
        for supercells in [vec![], vec![[2, 0, 2]], vec![[1, 1, 1]]] {
            let e = err(AlloyGenerator {
                supercells,
                max_elements: 5,
                ..base.clone()
            });
            assert!(matches!(e, GenerateError::Supercell(_)), "{e}");
        }
        for s in [-0.01, 0.5, f64::NAN] {
            assert!(matches!(
                err(AlloyGenerator {
                    max_strain: s,
                    ..base.clone()
                }),
                GenerateError::Strain(_)
            ));
        }
        for r in [[-0.1, 0.1], [0.2, 0.1], [0.0, f64::INFINITY]] {
            assert!(matches!(
                err(AlloyGenerator {
                    rattle_std: r,
                    ..base.clone()
                }),
                GenerateError::Rattle(..)
            ));
        }
        // A single-element pool with min = max = 1 is allowed (pure metals).
        let pure = AlloyGenerator {
            elements: vec!["Pt".into()],
            min_elements: 1,
            max_elements: 1,
            max_strain: 0.0,
            rattle_std: [0.0, 0.0],
            ..base
        }
        .check()
        .unwrap()
        .structure(3);
        assert!(pure.numbers().iter().all(|&z| z == 78));
        assert!((pure.cell()[0][0] - 2.0 * 3.9218).abs() < 1e-12);
    }

    #[test]
    fn config_serde_defaults() {
        let c: AlloyGenerator = serde_json::from_str(r#"{"seed": 5, "max_strain": 0.01}"#).unwrap();
        assert_eq!(
            c,
            AlloyGenerator {
                seed: 5,
                max_strain: 0.01,
                ..AlloyGenerator::default()
            }
        );
        let back: AlloyGenerator =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<AlloyGenerator>(r#"{"sead": 5}"#).is_err());
    }
}
