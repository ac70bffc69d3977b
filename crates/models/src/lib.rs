//! The matscale model zoo: neural models of materials behind one interface.
//!
//! A [`ModelSpec`] (architecture + [`ForceMode`]) builds an [`AtomisticModel`], which maps a
//! [`BatchTensors`] (a [`GraphBatch`](matscale_structures::batch::GraphBatch) on a device) to a
//! [`Prediction`]: total energy per structure (eV), forces (eV/Å) and stress (eV/Å^3, ASE
//! sign). Every model reports its exact parameter count, its analytic FLOPs ([`flops`]) and a
//! size ladder ([`Architecture::for_parameters`]).
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use matscale_models::{AtomisticModel, BatchTensors, Family, ForceMode, ModelConfig, ModelSpec};
//! use matscale_structures::batch::{GraphBatch, GraphOptions};
//! use matscale_structures::Structure;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let a = 3.61;
//! let cell = [[0.0, a / 2.0, a / 2.0], [a / 2.0, 0.0, a / 2.0], [a / 2.0, a / 2.0, 0.0]];
//! let cu = Structure::new(vec![29], vec![[0.0, 0.0, 0.0]], cell, [true; 3])?;
//! let batch = GraphBatch::new(&[cu], &GraphOptions::new(5.0))?;
//!
//! let spec = ModelSpec {
//!     model: ModelConfig::default_for(Family::Schnet),
//!     force_mode: ForceMode::Conservative,
//! };
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
//! let model = AtomisticModel::new(&spec, vb.clone(), vb)?;
//! let prediction = model.predict(&BatchTensors::new(&batch, DType::F64, &Device::Cpu)?, false)?;
//! assert_eq!(prediction.forces.dims(), &[1, 3]);
//! # Ok(())
//! # }
//! ```

pub mod batch;
pub mod config;
pub mod equiformer_v2;
pub mod error;
pub mod fcn;
pub mod flops;
pub mod heads;
pub mod init;
pub mod model;
pub mod schnet;
pub mod transformer;

pub use batch::{BatchShape, BatchTensors, Geometry};
pub use config::{Architecture, Family, ModelConfig};
pub use error::{ModelError, Result};
pub use flops::{FlopBreakdown, FlopCounter, Flops};
pub use init::{seeded_var_builder, shape_only_var_builder};
pub use model::{
    enable_higher_order_gradients, AtomisticModel, ForceMode, Model, ModelSpec, NormalizerValues,
    Prediction, RawOutput,
};
