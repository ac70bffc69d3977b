//! # matscale-structures
//!
//! Atomic structures and everything needed to turn materials data into training graphs:
//!
//! - [`Structure`]: atoms, cell, periodicity and DFT labels (energy, forces, stress) in ASE units
//!   and sign conventions (Å, eV, eV/Å, eV/Å^3; compressed cell has negative stress).
//! - File formats: extended XYZ ([`extxyz`]), pymatgen Structure JSON ([`pymatgen`]) and ASE
//!   LMDB databases ([`aselmdb`]), all streaming frame by frame.
//! - Periodic neighbour lists ([`neighbors`]) matching ASE's `neighbor_list('ijdDS', ...)`.
//! - Graph batches ([`batch`]) and dataset splits with nested training subsets ([`dataset`]).
//! - The EMT reference potential ([`emt`]) and random alloy generators ([`generate`]).
//!
//! ```
//! use matscale_structures::Structure;
//!
//! let a = 3.61; // fcc Cu, Å
//! let cell = [[0.0, a / 2.0, a / 2.0], [a / 2.0, 0.0, a / 2.0], [a / 2.0, a / 2.0, 0.0]];
//! let cu = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap();
//! assert_eq!(cu.len(), 1);
//! assert!((cu.volume() - a * a * a / 4.0).abs() < 1e-12);
//! ```

pub mod aselmdb;
pub mod batch;
pub mod dataset;
pub mod elements;
pub mod emt;
pub mod extxyz;
pub mod generate;
pub mod io;
pub mod neighbors;
pub mod pymatgen;
pub mod structure;
pub mod units;

pub use structure::{InfoValue, Mat3, PerAtomArray, PerAtomData, Structure, StructureError};
