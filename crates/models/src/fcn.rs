//! The fully connected net (work in progress: the configuration exists, the network does not yet).

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::config::{Architecture, Family};
use crate::error::{ModelError, Result};
use crate::model::{ForceMode, Model};

/// Configuration of the fully connected net.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FcnConfig {}

impl Architecture for FcnConfig {
    const FAMILY: Family = Family::Fcn;

    fn check(&self) -> Result<()> {
        Ok(())
    }

    fn n_parameters(&self, _mode: ForceMode) -> usize {
        0
    }

    fn for_parameters(_target: usize, _mode: ForceMode) -> Result<Self> {
        Err(ModelError::config("fcn", "has no size ladder yet"))
    }

    fn presets() -> Vec<(&'static str, Self)> {
        Vec::new()
    }

    fn build(&self, _mode: ForceMode, _vb: VarBuilder) -> Result<Box<dyn Model>> {
        Err(ModelError::config("fcn", "cannot be built yet"))
    }
}
