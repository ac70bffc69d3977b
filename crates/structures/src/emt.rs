//! Effective medium theory (EMT): a fast reference potential for fcc metals and their alloys.
//!
//! A port of ASE 3.29's `ase.calculators.emt.EMT` (K. W. Jacobsen, P. Stoltze and
//! J. K. Nørskov, Surf. Sci. 366, 394 (1996)), written from its formulas: the same parameter
//! table for Al, Cu, Ag, Au, Ni, Pd and Pt (plus ASE's H, C, N and O parameters, which ASE
//! itself says are "not for any serious use"), the same logistic cutoff and the same energy
//! zero, so results agree with ASE to rounding (about 1e-12 eV on the fixtures in
//! `tests/data/emt/`).
//!
//! # The model
//!
//! Each atom *i* of element *e* sits in a neutral sphere of radius *s_i* chosen so that the
//! electron density its neighbours give it, σ1,i = Σ_j χ_ij exp(−η2,j (r_ij − β s0,j)) w(r_ij),
//! equals that of the fcc reference crystal: s_i = s0,e − ln(σ1,i / 12γ1,e) / (β η2,e). The
//! energy is
//!
//! E = Σ_i [ E_c(s_i) − E0,e + 6 V0,e exp(−κ_e (s_i − s0,e)) ]
//!   − Σ_i ½ Σ_j ( V0,e / 2γ2,e · χ_ij exp(−κ_j (r_ij/β − s0,j)) + (i ↔ j) ) w(r_ij) / 2,
//!
//! with E_c(s) = E0 (1 + λ(s − s0)) exp(−λ(s − s0)) and χ_ij = n0,j / n0,i. The zero of
//! energy is the ideal fcc crystal of each element at its EMT reference density (ASE's "ASAP
//! convention"), so an isolated atom has energy −E0 (its cohesive energy) and fcc Cu at
//! a = 3.61 Å has −0.005681511358581304 eV/atom.
//!
//! The smooth cutoff is w(r) = 1 / (1 + exp(a (r − r_c))) with r_c the mean of the third and
//! fourth neighbour distances of fcc at the **largest s0 in the whole table** (Ag), whatever
//! elements a structure holds: ASE's default (`asap_cutoff=False`). Neighbours are summed up to
//! `r_c + 0.5 Å` (strictly closer), where w is about 7e-6: the energy has small jumps
//! when a distance crosses that radius, exactly as in ASE.
//!
//! Forces are the analytic gradient; the stress is σ = (1/V) ∂E/∂ε from the virial (ASE sign:
//! a compressed cell has negative stress), computed whenever the cell has a volume (also for
//! non-periodic structures in a box, as ASE does).
//!
//! ```
//! use matscale_structures::{emt::Emt, Structure};
//!
//! let a = 3.61; // Å
//! let cell = [[0.0, a / 2.0, a / 2.0], [a / 2.0, 0.0, a / 2.0], [a / 2.0, a / 2.0, 0.0]];
//! let cu = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap();
//! let result = Emt::new().calculate(&cu).unwrap();
//! assert!((result.energy - (-0.005681511358581304)).abs() < 1e-12);
//! ```

use rayon::prelude::*;

use crate::elements;
use crate::neighbors::{neighbor_list, NeighborError};
use crate::structure::{det3, inverse3, Mat3, Structure, StructureError};

/// The Bohr radius in Å as ASE 3.29 defines it (`ase.units.Bohr`, CODATA 2014); the parameter
/// table is in Bohr units.
pub const BOHR: f64 = 0.529_177_210_563_841_1;

/// β = (16π/3)^(1/3) / √2, rounded to 1.809 as in ASE ("preserve historical rounding"): the
/// ratio of the fcc nearest-neighbour distance to the Wigner–Seitz radius.
pub const BETA: f64 = 1.809;

/// One row of the EMT parameter table, in the units of the literature (as ASE lists them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmtParameters {
    /// Atomic number.
    pub number: u8,
    /// Cohesive energy E0, eV (negative).
    pub e0: f64,
    /// Neutral-sphere (Wigner–Seitz) radius s0, Bohr.
    pub s0: f64,
    /// Pair-potential strength V0, eV.
    pub v0: f64,
    /// Density decay η2, 1/Bohr.
    pub eta2: f64,
    /// Pair-potential decay κ, 1/Bohr.
    pub kappa: f64,
    /// Cohesive-function decay λ, 1/Bohr.
    pub lambda: f64,
    /// Reference electron density n0, 1/Bohr^3.
    pub n0: f64,
}

const fn row(
    number: u8,
    e0: f64,
    s0: f64,
    v0: f64,
    eta2: f64,
    kappa: f64,
    lambda: f64,
    n0: f64,
) -> EmtParameters {
    EmtParameters {
        number,
        e0,
        s0,
        v0,
        eta2,
        kappa,
        lambda,
        n0,
    }
}

/// The EMT parameter table of ASE 3.29: the seven fcc metals of Jacobsen, Stoltze and Nørskov
/// (1996) followed by ASE's ad hoc parameters for H, C, N and O.
pub const PARAMETERS: [EmtParameters; 11] = [
    row(13, -3.28, 3.00, 1.493, 1.240, 2.000, 1.169, 0.00700), // Al
    row(29, -3.51, 2.67, 2.476, 1.652, 2.740, 1.906, 0.00910), // Cu
    row(47, -2.96, 3.01, 2.132, 1.652, 2.790, 1.892, 0.00547), // Ag
    row(79, -3.80, 3.00, 2.321, 1.674, 2.873, 2.182, 0.00703), // Au
    row(28, -4.44, 2.60, 3.673, 1.669, 2.757, 1.948, 0.01030), // Ni
    row(46, -3.90, 2.87, 2.773, 1.818, 3.107, 2.155, 0.00688), // Pd
    row(78, -5.85, 2.90, 4.067, 1.812, 3.145, 2.192, 0.00802), // Pt
    row(1, -3.21, 1.31, 0.132, 2.652, 2.790, 3.892, 0.00547),  // H
    row(6, -3.50, 1.81, 0.332, 1.652, 2.790, 1.892, 0.01322),  // C
    row(7, -5.10, 1.88, 0.132, 1.652, 2.790, 1.892, 0.01222),  // N
    row(8, -4.60, 1.95, 0.332, 1.652, 2.790, 1.892, 0.00850),  // O
];

/// The seven fcc metals EMT was fitted to (atomic numbers of Al, Cu, Ag, Au, Ni, Pd, Pt).
pub const FCC_METALS: [u8; 7] = [13, 29, 47, 79, 28, 46, 78];

/// The EMT parameters of element `number`, if EMT supports it.
pub fn parameters(number: u8) -> Option<&'static EmtParameters> {
    PARAMETERS.iter().find(|p| p.number == number)
}

/// Why EMT could not evaluate a structure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmtError {
    /// An atom of an element without EMT parameters.
    #[error(
        "EMT has no parameters for {symbol} (atom {atom}); supported: Al, Cu, Ag, Au, Ni, Pd, Pt, H, C, N, O"
    )]
    UnsupportedElement {
        /// The element's symbol.
        symbol: String,
        /// The index of the first atom of that element.
        atom: usize,
    },
    /// Two atoms (or an atom and a periodic image of another) at the same place.
    #[error("atoms {i} and {j} coincide (distance {distance:.3e} Å); EMT forces are undefined")]
    CoincidentAtoms {
        /// First atom.
        i: usize,
        /// Second atom.
        j: usize,
        /// Their distance, Å.
        distance: f64,
    },
    /// The neighbour search failed (e.g. a cell far too thin for the cutoff).
    #[error("EMT neighbour search: {0}")]
    Neighbors(#[from] NeighborError),
    /// The results could not be attached to the structure (non-finite values).
    #[error("EMT result rejected: {0}")]
    Structure(#[from] StructureError),
}

/// An [`EmtError`] while labelling one structure of many ([`Emt::label_all`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("structure {index}: {source}")]
pub struct LabelError {
    /// The index of the structure in the slice.
    pub index: usize,
    /// What went wrong.
    pub source: EmtError,
}

/// Energy, per-atom energies, forces and stress of one structure.
#[derive(Debug, Clone, PartialEq)]
pub struct EmtResult {
    /// Total energy, eV.
    pub energy: f64,
    /// Per-atom energies, eV (they sum to `energy`; ASE's `get_potential_energies()`).
    pub energies: Vec<f64>,
    /// Forces, eV/Å.
    pub forces: Vec<[f64; 3]>,
    /// Stress σ = (1/V) ∂E/∂ε, eV/Å^3, ASE sign; `None` when the cell has no volume.
    pub stress: Option<Mat3>,
}

/// Per-element constants in Å and eV, with the fcc reference sums folded in.
#[derive(Debug, Clone, Copy)]
struct Species {
    number: u8,
    e0: f64,
    s0: f64,
    v0: f64,
    eta2: f64,
    kappa: f64,
    lambda: f64,
    n0: f64,
    /// β s0, Å.
    beta_s0: f64,
    /// 1 / (12 γ1).
    inv_12_gamma1: f64,
    /// −V0 / (2 γ2), eV.
    neg_half_v0_over_gamma2: f64,
}

/// The EMT calculator. Cheap to clone and `Sync`: one instance can label structures on many
/// threads at once.
#[derive(Debug, Clone)]
pub struct Emt {
    /// Midpoint of the logistic cutoff, Å.
    rc: f64,
    /// Neighbours are summed up to this distance (exclusive), Å.
    rc_list: f64,
    /// Steepness of the logistic cutoff, 1/Å.
    acut: f64,
    /// Species by atomic number (`None`: unsupported).
    species: Vec<Option<Species>>,
}

impl Default for Emt {
    fn default() -> Self {
        Self::new()
    }
}

impl Emt {
    /// The calculator with ASE's parameters and ASE's default cutoff (from the largest s0 of the
    /// whole table, so the same cutoff for every structure).
    pub fn new() -> Self {
        let max_s0 = PARAMETERS.iter().map(|p| p.s0).fold(f64::MIN, f64::max) * BOHR;
        let r1nn = BETA * max_s0; // fcc nearest-neighbour distance
        let rc = r1nn * 0.5 * (3f64.sqrt() + 2.0); // mean of the 3rd and 4th neighbour distances
        let r4nn = r1nn * 2.0;
        let eps = 1e-4; // w(r4nn)
        let acut = (1.0 / eps - 1.0f64).ln() / (r4nn - rc);
        let rc_list = rc + 0.5;
        let mut species = vec![None; usize::from(elements::MAX_ATOMIC_NUMBER) + 1];
        for p in &PARAMETERS {
            let s0 = p.s0 * BOHR;
            let eta2 = p.eta2 / BOHR;
            let kappa = p.kappa / BOHR;
            let (gamma1, gamma2) = fcc_gammas(s0, eta2, kappa, rc, acut);
            species[usize::from(p.number)] = Some(Species {
                number: p.number,
                e0: p.e0,
                s0,
                v0: p.v0,
                eta2,
                kappa,
                lambda: p.lambda / BOHR,
                n0: p.n0 / (BOHR * BOHR * BOHR),
                beta_s0: BETA * s0,
                inv_12_gamma1: 1.0 / (12.0 * gamma1),
                neg_half_v0_over_gamma2: -0.5 * p.v0 / gamma2,
            });
        }
        Self {
            rc,
            rc_list,
            acut,
            species,
        }
    }

    /// Midpoint r_c of the logistic cutoff function, Å (5.376798323827276 Å).
    pub fn cutoff(&self) -> f64 {
        self.rc
    }

    /// Radius of the neighbour sum, r_c + 0.5 Å; pairs at this distance or beyond are ignored.
    pub fn neighbor_cutoff(&self) -> f64 {
        self.rc_list
    }

    /// Whether EMT has parameters for atomic number `number`.
    pub fn supports(&self, number: u8) -> bool {
        self.species
            .get(usize::from(number))
            .is_some_and(Option::is_some)
    }

    /// Checks that every atom of `structure` has EMT parameters.
    pub fn check(&self, structure: &Structure) -> Result<(), EmtError> {
        self.species_of(structure).map(|_| ())
    }

    fn species_of(&self, structure: &Structure) -> Result<Vec<Species>, EmtError> {
        structure
            .numbers()
            .iter()
            .enumerate()
            .map(|(atom, &z)| {
                self.species
                    .get(usize::from(z))
                    .copied()
                    .flatten()
                    .ok_or_else(|| EmtError::UnsupportedElement {
                        symbol: elements::symbol(z).unwrap_or("?").to_string(),
                        atom,
                    })
            })
            .collect()
    }

    /// Energy, forces and stress of `structure`.
    pub fn calculate(&self, structure: &Structure) -> Result<EmtResult, EmtError> {
        let species = self.species_of(structure)?;
        let n = structure.len();
        let direct = if n <= CELL_LIST_MIN_ATOMS {
            half_pairs_direct(structure, self.rc_list)?
        } else {
            None
        };
        let pairs = match direct {
            Some(pairs) => pairs,
            None => half_pairs_cell_list(structure, self.rc_list)?,
        };
        self.evaluate(structure, &species, &pairs)
    }

    fn evaluate(
        &self,
        structure: &Structure,
        species: &[Species],
        pairs: &[Pair],
    ) -> Result<EmtResult, EmtError> {
        let n = structure.len();

        let mut energies = vec![0.0; n];
        let mut sigma1 = vec![0.0; n];
        let mut has_neighbors = vec![false; n];
        let mut terms = Vec::with_capacity(pairs.len());

        // Pass 1: densities σ1 and the pair part of the atomic-sphere correction.
        for p in pairs {
            let (i, j) = (p.i as usize, p.j as usize);
            let (si, sj) = (&species[i], &species[j]);
            let r = p.r;
            let w = 1.0 / (1.0 + (self.acut * (r - self.rc)).exp());
            let dwdr_over_w = self.acut * (w - 1.0);
            // The exponentials of j's parameters, and of i's (the same for like atoms).
            let density_j = (-sj.eta2 * (r - sj.beta_s0)).exp();
            let pair_j = (-sj.kappa * (r / BETA - sj.s0)).exp();
            let (density_i, pair_i, chi_ij, chi_ji) = if si.number == sj.number {
                (density_j, pair_j, 1.0, 1.0)
            } else {
                (
                    (-si.eta2 * (r - si.beta_s0)).exp(),
                    (-si.kappa * (r / BETA - si.s0)).exp(),
                    sj.n0 / si.n0, // χ for atom i seeing j
                    si.n0 / sj.n0,
                )
            };
            // Density atom i receives from j, and j from i.
            let s1_i = density_j * chi_ij * w;
            let s1_j = density_i * chi_ji * w;
            // Pair-potential terms as seen from i ("self") and from j.
            let es = si.neg_half_v0_over_gamma2 * pair_j * chi_ij * w;
            let eo = sj.neg_half_v0_over_gamma2 * pair_i * chi_ji * w;
            let e_pair = 0.5 * (es + eo);
            energies[i] += e_pair;
            energies[j] += e_pair;
            sigma1[i] += s1_i;
            sigma1[j] += s1_j;
            has_neighbors[i] = true;
            has_neighbors[j] = true;
            let dedr_pair =
                es * (dwdr_over_w - sj.kappa / BETA) + eo * (dwdr_over_w - si.kappa / BETA);
            let inv_r = 1.0 / r;
            terms.push(PairTerms {
                pair_over_r: dedr_pair * inv_r,
                ds1_i_over_r: s1_i * (dwdr_over_w - sj.eta2) * inv_r,
                ds1_j_over_r: s1_j * (dwdr_over_w - si.eta2) * inv_r,
            });
        }

        // Per atom: neutral-sphere radius, cohesive function and dE/dσ1.
        let mut deds = vec![0.0; n];
        for a in 0..n {
            let sp = &species[a];
            if has_neighbors[a] {
                let ds = -(sigma1[a] * sp.inv_12_gamma1).ln() / (BETA * sp.eta2);
                let lds = sp.lambda * ds;
                let exp_neg_lds = (-lds).exp();
                let six_v0 = 6.0 * sp.v0 * (-sp.kappa * ds).exp();
                energies[a] += sp.e0 * (1.0 + lds) * exp_neg_lds + six_v0;
                let dedds = -sp.e0 * sp.lambda * lds * exp_neg_lds - sp.kappa * six_v0;
                deds[a] = dedds / (-BETA * sp.eta2 * sigma1[a]);
            }
            energies[a] -= sp.e0;
        }

        // Pass 2: forces and virial.
        let mut forces = vec![[0.0; 3]; n];
        let mut virial = [[0.0; 3]; 3];
        for (p, t) in pairs.iter().zip(&terms) {
            let (i, j) = (p.i as usize, p.j as usize);
            let g = t.pair_over_r + deds[i] * t.ds1_i_over_r + deds[j] * t.ds1_j_over_r;
            let f = [g * p.d[0], g * p.d[1], g * p.d[2]];
            for k in 0..3 {
                forces[i][k] += f[k];
                forces[j][k] -= f[k];
                for l in 0..3 {
                    virial[k][l] += p.d[k] * f[l];
                }
            }
        }

        let energy = energies.iter().sum();
        let volume = det3(structure.cell()).abs();
        let stress = (volume > MIN_VOLUME).then(|| {
            let mut s = [[0.0; 3]; 3];
            for k in 0..3 {
                for l in 0..3 {
                    s[k][l] = 0.5 * (virial[k][l] + virial[l][k]) / volume;
                }
            }
            s
        });
        Ok(EmtResult {
            energy,
            energies,
            forces,
            stress,
        })
    }

    /// Replaces the labels of `structure` with EMT's energy, forces and (when the cell has a
    /// volume) stress. On error the structure is left unchanged.
    pub fn label(&self, structure: &mut Structure) -> Result<(), EmtError> {
        let result = self.calculate(structure)?;
        let mut labelled = structure.clone();
        labelled.clear_labels();
        labelled.set_energy(result.energy)?;
        labelled.set_forces(result.forces)?;
        if let Some(stress) = result.stress {
            labelled.set_stress(stress)?;
        }
        *structure = labelled;
        Ok(())
    }

    /// Labels every structure in parallel (rayon). If some fail, returns the error of the
    /// first failing one (lowest index, so the report is deterministic); the failing structures
    /// keep their old labels, all others get new ones.
    pub fn label_all(&self, structures: &mut [Structure]) -> Result<(), LabelError> {
        let first_error = structures
            .par_iter_mut()
            .enumerate()
            .filter_map(|(index, s)| {
                self.label(s)
                    .err()
                    .map(|source| LabelError { index, source })
            })
            .min_by_key(|e| e.index);
        first_error.map_or(Ok(()), Err)
    }
}

/// Cells with a smaller volume (Å^3) get no stress.
const MIN_VOLUME: f64 = 1e-10;

/// γ1 and γ2 of the fcc reference crystal: the density and pair sums over the first three
/// neighbour shells (12, 6 and 24 atoms), each weighted by the cutoff function, over 12.
fn fcc_gammas(s0: f64, eta2: f64, kappa: f64, rc: f64, acut: f64) -> (f64, f64) {
    let shells = [(12.0, 1.0f64), (6.0, 2.0), (24.0, 3.0)];
    let (mut gamma1, mut gamma2) = (0.0, 0.0);
    for (count, dist2) in shells {
        let r = BETA * s0 * dist2.sqrt();
        let w = 1.0 / (1.0 + (acut * (r - rc)).exp());
        let x = count * w / 12.0;
        gamma1 += x * (-eta2 * (r - BETA * s0)).exp();
        gamma2 += x * (-kappa / BETA * (r - BETA * s0)).exp();
    }
    (gamma1, gamma2)
}

/// One unordered pair (i ≤ j) within the neighbour radius: `d = pos[j] − pos[i] + S·cell`.
#[derive(Debug, Clone, Copy)]
struct Pair {
    i: u32,
    j: u32,
    d: [f64; 3],
    r: f64,
}

/// Per-pair derivative factors kept between the two passes, each divided by r.
#[derive(Debug, Clone, Copy)]
struct PairTerms {
    /// d(pair energy)/dr / r.
    pair_over_r: f64,
    /// dσ1,i/dr / r (the part of σ1,i from j).
    ds1_i_over_r: f64,
    /// dσ1,j/dr / r.
    ds1_j_over_r: f64,
}

/// Structures with more atoms than this use the O(N) cell list of [`crate::neighbors`]; smaller
/// ones a direct O(N²) search over pairs, which is faster for a few dozen atoms.
const CELL_LIST_MIN_ATOMS: usize = 96;

/// Upper bound on the periodic images per pair the direct search may visit.
const MAX_DIRECT_IMAGES: f64 = 4096.0;

/// The half list from the crate's full neighbour list (cell list, O(N)).
fn half_pairs_cell_list(structure: &Structure, cutoff: f64) -> Result<Vec<Pair>, EmtError> {
    let list = neighbor_list(structure, cutoff)?;
    let mut pairs = Vec::with_capacity(list.len() / 2 + 1);
    for p in 0..list.len() {
        let (i, j, shift) = (list.first()[p], list.second()[p], list.shifts()[p]);
        if i < j || (i == j && (shift[0], shift[1], shift[2]) > (0, 0, 0)) {
            let r = list.distances()[p];
            if r == 0.0 {
                return Err(EmtError::CoincidentAtoms {
                    i: i as usize,
                    j: j as usize,
                    distance: r,
                });
            }
            pairs.push(Pair {
                i,
                j,
                d: list.vectors()[p],
                r,
            });
        }
    }
    Ok(pairs)
}

/// Every unordered pair of atoms (including an atom and its own periodic images) closer than
/// `cutoff`, each listed once: for i < j every image, for i == j the images with a shift that is
/// positive in lexicographic order. Equivalent to half of ASE's full neighbour list.
/// `None` when the cell is so thin that the direct search would visit more than
/// [`MAX_DIRECT_IMAGES`] images per pair.
fn half_pairs_direct(structure: &Structure, cutoff: f64) -> Result<Option<Vec<Pair>>, EmtError> {
    let n = structure.len();
    let pbc = structure.pbc();
    let cell = *structure.cell();
    let mut pairs = Vec::new();
    // Square-distance pre-filter, a hair wider than the cutoff so that the exact decision
    // `r < cutoff` (as ASE makes it) is taken on the square root.
    let cutoff2 = cutoff * cutoff * (1.0 + 1e-12);
    let mut push = |i: usize, j: usize, d: [f64; 3]| -> Result<(), EmtError> {
        let r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
        if r2 >= cutoff2 {
            return Ok(());
        }
        let r = r2.sqrt();
        if r < cutoff {
            if r == 0.0 {
                return Err(EmtError::CoincidentAtoms { i, j, distance: r });
            }
            pairs.push(Pair {
                i: i as u32,
                j: j as u32,
                d,
                r,
            });
        }
        Ok(())
    };

    let inverse = if pbc.iter().any(|&p| p) {
        inverse3(&cell)
    } else {
        None
    };
    let Some(inverse) = inverse else {
        // No periodic axis: plain pairs, no images.
        let pos = structure.positions();
        for i in 0..n {
            for j in i + 1..n {
                push(i, j, sub(&pos[j], &pos[i]))?;
            }
        }
        return Ok(Some(pairs));
    };

    // Wrap atoms into the cell along periodic axes (a lattice translation changes no pair).
    let mut frac: Vec<[f64; 3]> = Vec::with_capacity(n);
    let mut wrapped: Vec<[f64; 3]> = Vec::with_capacity(n);
    for r in structure.positions() {
        let mut f = crate::structure::vec_mat(r, &inverse);
        let mut shift = [0.0; 3];
        for a in 0..3 {
            if pbc[a] {
                shift[a] = f[a].floor();
                f[a] -= shift[a];
            }
        }
        let back = crate::structure::vec_mat(&shift, &cell);
        frac.push(f);
        wrapped.push(sub(r, &back));
    }
    // |f_j − f_i + S_a| / h_a bounds the distance from below, h_a = |column a of cell⁻¹|.
    let mut reach = [0.0; 3];
    for a in 0..3 {
        if pbc[a] {
            let h = (inverse[0][a].powi(2) + inverse[1][a].powi(2) + inverse[2][a].powi(2)).sqrt();
            reach[a] = cutoff * h;
        }
    }
    // Thin cells need many images per pair: leave those to the cell list.
    let images: f64 = reach.iter().map(|r| 2.0 * r + 2.0).product();
    if images > MAX_DIRECT_IMAGES {
        return Ok(None);
    }
    for i in 0..n {
        for j in i..n {
            let df = sub(&frac[j], &frac[i]);
            let dr = sub(&wrapped[j], &wrapped[i]);
            let mut lo = [0i64; 3];
            let mut hi = [0i64; 3];
            for a in 0..3 {
                if pbc[a] {
                    lo[a] = ceil_i64(-reach[a] - df[a]);
                    hi[a] = floor_i64(reach[a] - df[a]);
                }
            }
            for s0 in lo[0]..=hi[0] {
                for s1 in lo[1]..=hi[1] {
                    for s2 in lo[2]..=hi[2] {
                        if i == j && (s0, s1, s2) <= (0, 0, 0) {
                            continue;
                        }
                        let (s0f, s1f, s2f) = (s0 as f64, s1 as f64, s2 as f64);
                        let mut d = dr;
                        for k in 0..3 {
                            d[k] += s0f * cell[0][k] + s1f * cell[1][k] + s2f * cell[2][k];
                        }
                        push(i, j, d)?;
                    }
                }
            }
        }
    }
    Ok(Some(pairs))
}

/// ⌊x⌋ for |x| well inside the i64 range, without a libm call (`f64::floor` is not inlined on
/// x86-64 without SSE4.1).
fn floor_i64(x: f64) -> i64 {
    let t = x as i64;
    if (t as f64) > x {
        t - 1
    } else {
        t
    }
}

/// ⌈x⌉ for |x| well inside the i64 range.
fn ceil_i64(x: f64) -> i64 {
    let t = x as i64;
    if (t as f64) < x {
        t + 1
    } else {
        t
    }
}

fn sub(a: &[f64; 3], b: &[f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structure::vec_mat;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/emt/emt_ase.json"
    );

    struct Case {
        name: String,
        structure: Structure,
        energy: f64,
        energies: Vec<f64>,
        forces: Vec<[f64; 3]>,
        stress: Option<[f64; 6]>,
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    fn vec3s(v: &serde_json::Value) -> Vec<[f64; 3]> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|r| {
                let r = floats(r);
                [r[0], r[1], r[2]]
            })
            .collect()
    }

    fn cases() -> Vec<Case> {
        let text = std::fs::read_to_string(FIXTURE).expect("fixture exists");
        let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        json["structures"]
            .as_array()
            .expect("structures")
            .iter()
            .map(|row| {
                let numbers = row["numbers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|z| z.as_u64().unwrap() as u8)
                    .collect();
                let c = vec3s(&row["cell"]);
                let pbc: Vec<bool> = row["pbc"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_bool().unwrap())
                    .collect();
                let structure = Structure::new(
                    numbers,
                    vec3s(&row["positions"]),
                    [c[0], c[1], c[2]],
                    [pbc[0], pbc[1], pbc[2]],
                )
                .unwrap();
                Case {
                    name: row["name"].as_str().unwrap().to_string(),
                    structure,
                    energy: row["energy"].as_f64().unwrap(),
                    energies: floats(&row["energies"]),
                    forces: vec3s(&row["forces"]),
                    stress: row["stress"].as_array().map(|_| {
                        let s = floats(&row["stress"]);
                        [s[0], s[1], s[2], s[3], s[4], s[5]]
                    }),
                }
            })
            .collect()
    }

    #[test]
    fn cutoff_matches_ase() {
        let emt = Emt::new();
        assert!((emt.cutoff() - 5.376798323827276).abs() < 1e-14);
        assert!((emt.neighbor_cutoff() - 5.876798323827276).abs() < 1e-14);
        assert!((emt.acut - 23.858454772693438).abs() < 1e-11);
    }

    #[test]
    fn matches_ase_fixtures() {
        let emt = Emt::new();
        let cases = cases();
        assert!(cases.len() >= 20, "{} fixtures", cases.len());
        let (mut worst_e, mut worst_f, mut worst_s) = (0.0f64, 0.0f64, 0.0f64);
        for case in &cases {
            let r = emt.calculate(&case.structure).unwrap();
            let de = (r.energy - case.energy).abs();
            assert!(
                de < 1e-9,
                "{}: energy {} vs ASE {}",
                case.name,
                r.energy,
                case.energy
            );
            worst_e = worst_e.max(de);
            for (a, (e, e_ase)) in r.energies.iter().zip(&case.energies).enumerate() {
                assert!(
                    (e - e_ase).abs() < 1e-9,
                    "{}: atom {a} energy {e} vs ASE {e_ase}",
                    case.name
                );
            }
            for (a, (f, f_ase)) in r.forces.iter().zip(&case.forces).enumerate() {
                for k in 0..3 {
                    let df = (f[k] - f_ase[k]).abs();
                    assert!(
                        df < 1e-8,
                        "{}: force[{a}][{k}] {} vs ASE {}",
                        case.name,
                        f[k],
                        f_ase[k]
                    );
                    worst_f = worst_f.max(df);
                }
            }
            match (&r.stress, &case.stress) {
                (Some(s), Some(s_ase)) => {
                    let v = crate::structure::matrix_to_voigt(s);
                    for k in 0..6 {
                        let ds = (v[k] - s_ase[k]).abs();
                        assert!(
                            ds < 1e-10,
                            "{}: stress[{k}] {} vs ASE {}",
                            case.name,
                            v[k],
                            s_ase[k]
                        );
                        worst_s = worst_s.max(ds);
                    }
                }
                (None, None) => {}
                (ours, ase) => panic!("{}: stress {ours:?} vs ASE {ase:?}", case.name),
            }
        }
        eprintln!(
            "worst |ΔE| {worst_e:.1e} eV, |ΔF| {worst_f:.1e} eV/Å, |Δσ| {worst_s:.1e} eV/Å^3"
        );
    }

    #[test]
    fn reference_energies_per_atom() {
        // REFERENCE.md §5: fcc Cu at 3.61 Å and fcc Pt at 3.92 Å, one-atom primitive cells.
        let emt = Emt::new();
        for (symbol, a, expected) in [
            ("Cu", 3.61, -0.005681511358581304),
            ("Pt", 3.92, -0.00012460841212025286),
        ] {
            let h = a / 2.0;
            let cell = [[0.0, h, h], [h, 0.0, h], [h, h, 0.0]];
            let s = Structure::from_symbols(&[symbol], vec![[0.0; 3]], cell, [true; 3]).unwrap();
            let e = emt.calculate(&s).unwrap().energy;
            assert!((e - expected).abs() < 1e-13, "{symbol}: {e} vs {expected}");
        }
    }

    fn energy(emt: &Emt, s: &Structure) -> f64 {
        emt.calculate(s).unwrap().energy
    }

    /// Central differences of the energy against the analytic forces, on every atom of the
    /// small fixtures.
    #[test]
    fn forces_are_energy_gradient() {
        let emt = Emt::new();
        let h = 1e-5;
        let mut worst = 0.0f64;
        for case in cases().iter().filter(|c| c.structure.len() <= 48) {
            let s = &case.structure;
            let forces = emt.calculate(s).unwrap().forces;
            for a in 0..s.len() {
                for k in 0..3 {
                    let mut plus = s.clone();
                    let mut pos = s.positions().to_vec();
                    pos[a][k] += h;
                    plus.set_positions(pos.clone()).unwrap();
                    let mut minus = s.clone();
                    pos[a][k] -= 2.0 * h;
                    minus.set_positions(pos).unwrap();
                    let fd = -(energy(&emt, &plus) - energy(&emt, &minus)) / (2.0 * h);
                    let err = (fd - forces[a][k]).abs();
                    worst = worst.max(err);
                    assert!(
                        err < 1e-6 * (1.0 + forces[a][k].abs()),
                        "{}: atom {a} axis {k}: analytic {} vs finite difference {fd}",
                        case.name,
                        forces[a][k]
                    );
                }
            }
        }
        eprintln!("worst |F − F_fd| = {worst:.2e} eV/Å");
    }

    /// σ_kl = (1/V) ∂E/∂ε_kl by central differences of a homogeneous deformation.
    #[test]
    fn stress_is_strain_derivative() {
        let emt = Emt::new();
        let h = 1e-6;
        let deform = |s: &Structure, k: usize, l: usize, e: f64| {
            let mut f = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
            f[k][l] += e;
            let cell = s.cell();
            let mut t = s.clone();
            t.set_cell([
                vec_mat(&cell[0], &f),
                vec_mat(&cell[1], &f),
                vec_mat(&cell[2], &f),
            ])
            .unwrap();
            t.set_positions(s.positions().iter().map(|r| vec_mat(r, &f)).collect())
                .unwrap();
            t
        };
        let mut checked = 0;
        for case in cases().iter().filter(|c| c.structure.len() <= 48) {
            let s = &case.structure;
            let Some(stress) = emt.calculate(s).unwrap().stress else {
                continue;
            };
            let v = s.volume();
            for k in 0..3 {
                for l in 0..3 {
                    let fd = (energy(&emt, &deform(s, k, l, h))
                        - energy(&emt, &deform(s, k, l, -h)))
                        / (2.0 * h)
                        / v;
                    assert!(
                        (fd - stress[k][l]).abs() < 1e-7 * (1.0 + stress[k][l].abs()),
                        "{}: stress[{k}][{l}] analytic {} vs finite difference {fd}",
                        case.name,
                        stress[k][l]
                    );
                }
            }
            checked += 1;
        }
        assert!(checked >= 15);
    }

    #[test]
    fn compressed_cell_has_negative_stress() {
        let emt = Emt::new();
        let cu = |a: f64| {
            let h = a / 2.0;
            let cell = [[0.0, h, h], [h, 0.0, h], [h, h, 0.0]];
            Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap()
        };
        let p_small = emt.calculate(&cu(3.45)).unwrap().stress.unwrap()[0][0];
        let p_large = emt.calculate(&cu(3.75)).unwrap().stress.unwrap()[0][0];
        assert!(p_small < 0.0 && p_large > 0.0, "{p_small} {p_large}");
    }

    #[test]
    fn isolated_atom_has_cohesive_energy() {
        let s =
            Structure::from_symbols(&["Au"], vec![[0.0; 3]], [[0.0; 3]; 3], [false; 3]).unwrap();
        let r = Emt::new().calculate(&s).unwrap();
        assert_eq!(r.energy, 3.80);
        assert_eq!(r.forces, vec![[0.0; 3]]);
        assert!(r.stress.is_none());
    }

    #[test]
    fn unsupported_element_is_named() {
        let cell = [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]];
        let s = Structure::from_symbols(
            &["Cu", "Fe"],
            vec![[0.0; 3], [2.0, 2.0, 0.0]],
            cell,
            [true; 3],
        )
        .unwrap();
        let emt = Emt::new();
        let err = emt.calculate(&s).unwrap_err();
        assert_eq!(
            err,
            EmtError::UnsupportedElement {
                symbol: "Fe".into(),
                atom: 1
            }
        );
        assert!(err.to_string().contains("Fe"), "{err}");
        assert!(!emt.supports(26) && emt.supports(29) && emt.supports(8) && !emt.supports(0));

        let mut many = vec![s.clone(), s.clone(), s.clone()];
        many[0] = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap();
        let err = emt.label_all(&mut many).unwrap_err();
        assert_eq!(err.index, 1, "the lowest failing index is reported");
        assert!(many[0].energy().is_some(), "good structures are labelled");
        assert!(
            many[1].energy().is_none(),
            "a failed structure keeps its labels"
        );
    }

    #[test]
    fn coincident_atoms_are_an_error() {
        let cell = [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]];
        let s = Structure::from_symbols(
            &["Cu", "Ni"],
            vec![[1.0; 3], [5.0, 1.0, 1.0]],
            cell,
            [true; 3],
        )
        .unwrap();
        let err = Emt::new().calculate(&s).unwrap_err();
        assert!(
            matches!(err, EmtError::CoincidentAtoms { i: 0, j: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn pair_searches_agree() {
        let emt = Emt::new();
        for case in cases() {
            let s = &case.structure;
            let species = emt.species_of(s).unwrap();
            let direct = half_pairs_direct(s, emt.rc_list).unwrap().unwrap();
            let cell_list = half_pairs_cell_list(s, emt.rc_list).unwrap();
            assert_eq!(direct.len(), cell_list.len(), "{}", case.name);
            let a = emt.evaluate(s, &species, &direct).unwrap();
            let b = emt.evaluate(s, &species, &cell_list).unwrap();
            assert!((a.energy - b.energy).abs() < 1e-11, "{}", case.name);
            for (fa, fb) in a.forces.iter().zip(&b.forces) {
                for k in 0..3 {
                    assert!((fa[k] - fb[k]).abs() < 1e-11, "{}", case.name);
                }
            }
        }
    }

    #[test]
    fn needle_thin_cell_is_an_error_not_a_hang() {
        // 1e-5 Å thick: ~6e5 images along x per pair, far beyond any sensible search.
        let cell = [[1e-5, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]];
        let s = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap();
        let err = Emt::new().calculate(&s).unwrap_err();
        assert!(matches!(err, EmtError::Neighbors(_)), "{err}");
    }

    #[test]
    fn label_all_matches_calculate() {
        let emt = Emt::new();
        let mut structures: Vec<Structure> = cases().into_iter().map(|c| c.structure).collect();
        emt.label_all(&mut structures).unwrap();
        for s in &structures {
            let r = emt.calculate(s).unwrap();
            assert_eq!(s.energy(), Some(r.energy));
            assert_eq!(s.forces(), Some(r.forces.as_slice()));
            assert_eq!(s.stress(), r.stress.as_ref());
        }
    }

    #[test]
    fn invariant_under_lattice_translation_of_atoms() {
        // Moving an atom by a lattice vector changes nothing (periodic axes only).
        let emt = Emt::new();
        let case = cases()
            .into_iter()
            .find(|c| c.name.starts_with("NiPdPt"))
            .unwrap();
        let s = &case.structure;
        let mut moved = s.clone();
        let cell = *s.cell();
        let mut pos = s.positions().to_vec();
        for k in 0..3 {
            pos[3][k] += 2.0 * cell[0][k] - cell[2][k];
        }
        moved.set_positions(pos).unwrap();
        let (a, b) = (emt.calculate(s).unwrap(), emt.calculate(&moved).unwrap());
        assert!((a.energy - b.energy).abs() < 1e-11);
        for (fa, fb) in a.forces.iter().zip(&b.forces) {
            for k in 0..3 {
                assert!((fa[k] - fb[k]).abs() < 1e-11);
            }
        }
    }
}
