//! The error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong between a runs table and a report.
///
/// Input errors name the file, the line (1-based, as an editor shows it) and
/// the column, so that a bad row can be found and fixed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A row could not be parsed at all (bad CSV quoting, bad JSON, wrong field count).
    #[error("{path}, line {line}: {message}")]
    Parse {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A required column is absent from the header (or a JSON object lacks the key).
    #[error("{path}, line {line}: missing required column `{column}`")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// 1-based line number (the header for CSV, the row for JSON lines).
        line: u64,
        /// The column name.
        column: String,
    },
    /// A value is missing, non-finite, non-positive or not a number.
    #[error("{path}, line {line}, column `{column}`: {message}")]
    InvalidValue {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the row.
        line: u64,
        /// The column name.
        column: String,
        /// What is wrong with the value.
        message: String,
    },
    /// The table (or a group of it) has no rows.
    #[error("no runs to fit{0}")]
    Empty(String),
    /// Fewer points than free parameters.
    #[error("{law}: {points} points cannot determine {params} parameters")]
    TooFewPoints {
        /// The law being fitted.
        law: String,
        /// Number of data points.
        points: usize,
        /// Number of free parameters.
        params: usize,
    },
    /// The design cannot identify the parameters (e.g. every x is equal).
    #[error("{law}: degenerate design: {message}")]
    DegenerateDesign {
        /// The law being fitted.
        law: String,
        /// Which variable is degenerate and why.
        message: String,
    },
    /// A non-finite number reached the fitter (input arrays, or a model evaluation).
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// Arrays of different lengths, an invalid option, ...
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No start of the optimiser reached a finite, stationary optimum.
    #[error("{law}: the fit did not converge: {message}")]
    NotConverged {
        /// The law being fitted.
        law: String,
        /// What the optimiser reported.
        message: String,
    },
    /// Drawing a plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The output file.
        path: PathBuf,
        /// The backend's message.
        message: String,
    },
    /// Serialising the report failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
