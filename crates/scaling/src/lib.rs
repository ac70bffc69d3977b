//! # matscale-scaling
//!
//! Everything between a table of finished training runs and the conclusions
//! drawn from it: single-variable power laws L = a·x^-b and L = E + a·x^-b per
//! model family (x = training-set size D, parameters N or compute C), the
//! joint law L(N, D) = E + A/N^α + B/D^β by Chinchilla's "approach 3",
//! bootstrap percentile intervals for every parameter and prediction,
//! leave-the-largest-out extrapolation and AIC/BIC to choose between forms,
//! the compute-optimal frontier, plots (SVG and PNG) and a Markdown report.
//! `cargo xtask fit` is the command-line front end.
//!
//! All fits are in f64 with analytic gradients and argmin's L-BFGS.
//! On the Chinchilla points of Besiroglu et al. (2024) the joint fit reaches
//! E = 1.817, α = 0.3473, β = 0.3672 (summed Huber objective 0.0010183) and
//! bootstrap intervals α ∈ [0.318, 0.372], β ∈ [0.329, 0.414].
//!
//! ## Example: build a table in code, fit, read the exponent and its interval
//!
//! ```
//! use matscale_scaling::analysis::{analyse, AnalysisOptions, XVar};
//! use matscale_scaling::bootstrap::BootstrapOptions;
//! use matscale_scaling::power_law::SingleLaw;
//! use matscale_scaling::{Run, RunsTable};
//!
//! // Eight runs of one family: loss falls as 1.5 + 30·D^-0.4 (with a wiggle).
//! let runs: Vec<Run> = (0..8)
//!     .map(|i| {
//!         let d = 100.0 * 3f64.powi(i);
//!         let loss = (1.5 + 30.0 * d.powf(-0.4)) * (1.0 + 0.01 * (i as f64).sin());
//!         // family, parameters N, training structures D, FLOPs C, best validation loss
//!         Run::new("schnet", 455_809.0, d, 6.0 * 455_809.0 * d, loss)
//!     })
//!     .collect();
//! let table = RunsTable::new(runs)?;
//!
//! let options = AnalysisOptions {
//!     xs: vec![XVar::Data],
//!     laws: vec![SingleLaw::PowerWithOffset],
//!     joint: false, // one model size: the joint law is not identifiable
//!     bootstrap: BootstrapOptions { resamples: 200, seed: 1, level: 0.95 },
//!     ..AnalysisOptions::default()
//! };
//! let analysis = analyse(&table, &options)?;
//! let fit = &analysis.single[0];
//! let b = fit.params.iter().find(|p| p.name == "b").unwrap().value;
//! assert!((b.estimate - 0.4).abs() < 0.05);
//! assert!(b.lower <= b.estimate && b.estimate <= b.upper);
//! println!("data exponent b = {:.3} [{:.3}, {:.3}]", b.estimate, b.lower, b.upper);
//! # Ok::<(), matscale_scaling::Error>(())
//! ```
//!
//! Lower-level entry points: [`power_law::fit_power_law`],
//! [`chinchilla::fit_joint`], [`power_law::bootstrap_power_law`],
//! [`chinchilla::bootstrap_joint`], [`frontier::lower_envelope`],
//! [`report::write_outputs`].

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
