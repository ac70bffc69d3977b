//! The error type of the model crate.

use thiserror::Error;

/// Everything that can go wrong when a model is configured, built or run.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A configuration field has a value the model cannot use.
    #[error("invalid model configuration: field `{field}` {message}")]
    Config {
        /// The offending field, e.g. `schnet.hidden_channels`.
        field: String,
        /// What is wrong with it, phrased to follow the field name.
        message: String,
    },
    /// The batch holds an element the model has no embedding for.
    #[error(
        "structure {structure} holds atomic number {number}, but the model embeds only Z < {max}"
    )]
    UnknownElement {
        /// Index of the structure in the batch.
        structure: usize,
        /// The atomic number.
        number: u8,
        /// One past the largest atomic number the model embeds.
        max: usize,
    },
    /// The batch does not fit the model (too many atoms for a padded model, no cell, ...).
    #[error("the batch does not fit the model: {0}")]
    Batch(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An equivariant operation failed.
    #[error(transparent)]
    Equivariant(#[from] matscale_equivariant::error::EquivariantError),
}

impl ModelError {
    /// A [`ModelError::Config`] for `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `Result` with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
