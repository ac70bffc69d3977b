//! Training and evaluation of matscale models.
//!
//! [`Trainer`] runs the study's recipe: the weighted loss of [`loss`] (energy per atom, force
//! L2, isotropic and deviatoric stress), AdamW with warm-up and cosine decay ([`schedule`]),
//! gradient clipping, early stopping, optional EMA and rotation augmentation, f32/bf16/f16
//! ([`precision`]), atomic checkpoints with exact resume ([`checkpoint`]), `metrics.jsonl`
//! and `result.json`. [`eval`] computes the error metrics the field reports.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod run;
pub mod schedule;
pub mod source;
pub mod train;

pub use data::Dataset;
pub use error::{Result, TrainError};
pub use eval::{evaluate, EvalMetrics, StructurePrediction};
pub use loss::{LossValues, LossWeights};
pub use precision::Precision;
pub use train::{load_model, MetricsLine, Observer, RunResult, Silent, TrainConfig, Trainer};
