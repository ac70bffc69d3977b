//! Training precision: f32 or f64 throughout, or bf16/f16 compute with f32 master weights.
//!
//! In mixed precision the network runs on a low-precision copy of the weights (refreshed from
//! the f32 master weights before each step); gradients are cast to f32 and applied to the
//! master weights. Geometry, the output normaliser and the loss stay in f32. f16 has a narrow
//! exponent range, so its loss is multiplied by a dynamic scale ([`LossScaler`]): a step whose
//! gradients overflow is skipped and the scale halved; after `growth_interval` good steps the
//! scale doubles.

use candle_core::DType;
use serde::{Deserialize, Serialize};

/// The precision of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// f64 everywhere (for checks; slow).
    F64,
    /// bf16 compute, f32 master weights.
    Bf16,
    /// f16 compute with dynamic loss scaling, f32 master weights.
    F16,
}

impl Precision {
    /// The dtype of the master weights, the geometry and the loss.
    pub fn master(self) -> DType {
        match self {
            Precision::F64 => DType::F64,
            _ => DType::F32,
        }
    }

    /// The dtype the network computes in.
    pub fn compute(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// True when compute and master dtypes differ.
    pub fn is_mixed(self) -> bool {
        self.master() != self.compute()
    }

    /// True when the loss is scaled dynamically.
    pub fn uses_loss_scaling(self) -> bool {
        self == Precision::F16
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::TrainError;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f64" => Ok(Self::F64),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(crate::TrainError::config(
                "precision",
                format!("is `{other}`; expected f32, f64, bf16 or f16"),
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// Dynamic loss scaling for f16 (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Consecutive good steps since the last change.
    pub good_steps: u32,
    /// Good steps before the scale doubles.
    pub growth_interval: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// Records a step: `finite` tells whether the scaled gradients were finite. Returns true
    /// when the step should be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale = (self.scale * 2.0).min(2f64.powi(24));
                self.good_steps = 0;
            }
            true
        } else {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_backs_off_and_grows() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..Default::default()
        };
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true) && s.update(true) && s.update(true));
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.good_steps, 0);
    }
}
