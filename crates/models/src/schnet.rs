//! The SchNet (work in progress: the configuration exists, the network does not yet).

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::config::{Architecture, Family};
use crate::error::{ModelError, Result};
use crate::model::{ForceMode, Model};

/// Configuration of the SchNet.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SchNetConfig {}

impl Architecture for SchNetConfig {
    const FAMILY: Family = Family::Schnet;

    fn check(&self) -> Result<()> {
        Ok(())
    }

    fn n_parameters(&self, _mode: ForceMode) -> usize {
        0
    }

    fn for_parameters(_target: usize, _mode: ForceMode) -> Result<Self> {
        Err(ModelError::config("schnet", "has no size ladder yet"))
    }

    fn presets() -> Vec<(&'static str, Self)> {
        Vec::new()
    }

    fn build(&self, _mode: ForceMode, _vb: VarBuilder) -> Result<Box<dyn Model>> {
        Err(ModelError::config("schnet", "cannot be built yet"))
    }
}
