//! AdamW with state that can be saved and restored exactly, gradient clipping by global norm,
//! and an exponential moving average of the weights.
//!
//! The update is decoupled AdamW (Loshchilov & Hutter): `θ ← θ − lr·wd·θ`, then
//! `θ ← θ − lr·m̂ / (√v̂ + ε)` with bias-corrected moments. Moments are kept per variable name
//! in the master dtype, so that a checkpoint can store them by name and a resumed run continues
//! bit for bit.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator floor.
    pub eps: f64,
    /// Decoupled weight decay (study: 1e-3).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-3,
        }
    }
}

/// The optimiser over a named set of variables.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    vars: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimiser over `vars` (name, variable), sorted by name for a stable order.
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let first = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        Ok(Self {
            config,
            vars,
            first,
            second,
            step: 0,
        })
    }

    /// The variables, sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` from `grads` (one per variable, in [`Self::vars`]
    /// order, master dtype; `None` for a variable that received no gradient).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as f64;
        let correction1 = 1.0 - c.beta1.powf(t);
        let correction2 = 1.0 - c.beta2.powf(t);
        for (k, ((_, var), grad)) in self.vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            // A gradient that still carries its graph would chain every step's graph into the
            // moments.
            let grad = &grad.detach();
            let m = ((&self.first[k] * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            let v = ((&self.second[k] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let m_hat = (&m / correction1)?;
            let v_hat = (&v / correction2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.first[k] = m;
            self.second[k] = v;
        }
        Ok(())
    }

    /// The moments by name (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.first[k].clone());
            out.insert(format!("v.{name}"), self.second[k].clone());
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    pub fn restore(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for (k, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.first[k]), ("v", &mut self.second[k])] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    TrainError::Data(format!("optimiser state has no tensor `{key}`"))
                })?;
                if t.shape() != var.shape() {
                    return Err(TrainError::Data(format!(
                        "optimiser state `{key}` has shape {:?}, the variable {:?}",
                        t.shape(),
                        var.shape()
                    )));
                }
                *slot = t.to_dtype(var.dtype())?.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0.0;
    for g in grads.iter().flatten() {
        sum += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm`; returns the norm before.
pub fn clip_by_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if norm.is_finite() && norm > max_norm && max_norm > 0.0 {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Exponential moving average of weights: `ema ← d·ema + (1 − d)·θ` after each step.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current values of `vars`.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        Ok(Self {
            decay,
            shadow: vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Folds the current values of `vars` into the average.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        for (s, (_, v)) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * self.decay)? + (v.as_tensor() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The averaged tensors, in the order of the variables.
    pub fn tensors(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Replaces the average (when resuming).
    pub fn restore(&mut self, tensors: Vec<Tensor>) {
        self.shadow = tensors;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        let var = Var::from_slice(&[1.0f64, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
        let grad = Tensor::new(&[0.5f64, -0.25], &Device::Cpu).unwrap();
        opt.step(&[Some(grad)], 0.1).unwrap();
        // First step: m̂ = g, v̂ = g², update = g/(|g| + ε) = sign(g).
        let w = var.as_tensor().to_vec1::<f64>().unwrap();
        let expect = |theta: f64, g: f64| theta * (1.0 - 0.1 * 1e-3) - 0.1 * g / (g.abs() + 1e-8);
        assert!((w[0] - expect(1.0, 0.5)).abs() < 1e-15);
        assert!((w[1] - expect(-2.0, -0.25)).abs() < 1e-15);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let var = Var::from_slice(&[3.0f64, -4.0], 2, &Device::Cpu).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], config).unwrap();
        for _ in 0..2000 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(var.as_tensor()).cloned();
            opt.step(&[g], 0.05).unwrap();
        }
        let w = var.as_tensor().to_vec1::<f64>().unwrap();
        assert!(w.iter().all(|x| x.abs() < 1e-2), "{w:?}");
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut grads = vec![
            Some(Tensor::new(&[3.0f64], &Device::Cpu).unwrap()),
            Some(Tensor::new(&[4.0f64], &Device::Cpu).unwrap()),
            None,
        ];
        let before = clip_by_global_norm(&mut grads, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-12);
        assert!((global_norm(&grads).unwrap() - 1.0).abs() < 1e-6);
    }
}
