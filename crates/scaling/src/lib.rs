//! # matscale-scaling
//!
//! Scaling-law fits for neural material models (work in progress).

pub mod analysis;
pub mod bootstrap;
pub mod chinchilla;
pub mod error;
pub mod frontier;
mod optim;
pub mod plot;
pub mod power_law;
pub mod report;
pub mod table;
pub mod validation;

pub use chinchilla::{fit_joint, InitGrid, JointFit, JointFitOptions, JointParams};
pub use error::{Error, Result};
pub use table::{Run, RunsTable, TableFormat};
