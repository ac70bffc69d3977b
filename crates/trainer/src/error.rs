//! The error type of the trainer.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can stop training or evaluation.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A configuration field is invalid.
    #[error("invalid training configuration: field `{field}` {message}")]
    Config {
        /// The offending field.
        field: String,
        /// What is wrong, phrased to follow the field name.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A checkpoint is missing pieces or does not fit the model.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The loss or the gradients stayed non-finite.
    #[error(
        "the loss was not finite on {count} consecutive steps (last at step {step}); the last \
         good checkpoint is kept"
    )]
    NonFinite {
        /// The step of the last failure.
        step: u64,
        /// How many consecutive steps failed.
        count: u32,
    },
    /// The run was stopped on request; its last checkpoint is intact.
    #[error("stopped on request at step {step}; the run resumes from its last checkpoint")]
    Interrupted {
        /// The last step taken.
        step: u64,
    },
    /// The data set is unusable (empty, no labels, unknown elements).
    #[error("data: {0}")]
    Data(String),
    /// A model error.
    #[error(transparent)]
    Model(#[from] matscale_models::ModelError),
    /// A data-set error.
    #[error(transparent)]
    Dataset(#[from] matscale_structures::dataset::DatasetError),
    /// A batching error.
    #[error(transparent)]
    Batch(#[from] matscale_structures::batch::BatchError),
    /// A tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// A [`TrainError::Config`] for `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
