//! Typed errors of the equivariant operations.
//!
//! Every fallible public function of this crate returns [`Result<T>`], whose error type
//! [`EquivariantError`] names the offending argument, the value it had and the limit or
//! shape it should have had. Errors raised by candle itself are wrapped unchanged.
//!
//! ```
//! use matscale_equivariant::error::EquivariantError;
//!
//! let err = EquivariantError::InvalidDegree { name: "lmax", value: 13, limit: 11 };
//! assert_eq!(err.to_string(), "`lmax` = 13 exceeds the supported limit 11");
//! ```

use candle_core::DType;

/// The error type of `matscale-equivariant`.
#[derive(Debug, thiserror::Error)]
pub enum EquivariantError {
    /// An error raised by candle (device, dtype or backend failure).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A degree (`lmax`, `mmax`, `l`) exceeds what the operation supports.
    #[error("`{name}` = {value} exceeds the supported limit {limit}")]
    InvalidDegree {
        /// The argument, e.g. `"lmax"` or `"mmax"`.
        name: &'static str,
        /// The value that was passed.
        value: usize,
        /// The largest supported value.
        limit: usize,
    },

    /// A tensor argument has the wrong shape.
    #[error("shape mismatch for `{arg}`: expected {expected}, found {found:?}")]
    ShapeMismatch {
        /// The argument, e.g. `"edge_vec"`.
        arg: &'static str,
        /// The expected shape in words, e.g. `"[num_edges, 3]"`.
        expected: String,
        /// The shape that was passed.
        found: Vec<usize>,
    },

    /// A tensor argument has a dtype the operation does not support.
    #[error("unsupported dtype {found:?} for `{arg}`: expected f32 or f64")]
    UnsupportedDType {
        /// The argument, e.g. `"xyz"`.
        arg: &'static str,
        /// The dtype that was passed.
        found: DType,
    },

    /// An edge vector from which no frame can be built (zero length or not finite).
    #[error("degenerate edge {index}: {reason}")]
    DegenerateEdge {
        /// Row of the edge in the `edge_vec` tensor.
        index: usize,
        /// What is wrong with it, with the value.
        reason: String,
    },

    /// An argument with an invalid value (an index out of range, an odd grid resolution, ...).
    #[error("invalid `{name}`: {reason}")]
    InvalidArgument {
        /// The argument, e.g. `"index"` or `"res_beta"`.
        name: &'static str,
        /// What is wrong with it, with the value.
        reason: String,
    },
}

/// `Result` with [`EquivariantError`].
pub type Result<T> = std::result::Result<T, EquivariantError>;
