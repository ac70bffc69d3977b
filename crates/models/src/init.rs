//! Reproducible weight initialisation.
//!
//! candle's [`VarMap`] draws initial weights from a thread-local generator, so two builds of
//! the same model differ. [`seeded_var_builder`] gives a [`VarBuilder`] that creates each
//! missing variable from candle's [`Init`] hint with a ChaCha8 stream keyed by the run's seed
//! and the variable's name, and stores it in the [`VarMap`]: the same seed gives the same
//! weights whatever the order of construction, the thread or the machine.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A [`SimpleBackend`] over a [`VarMap`] that initialises missing variables reproducibly.
struct SeededBackend {
    varmap: VarMap,
    seed: u64,
}

/// 64-bit FNV-1a of a name, mixed with the seed.
fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Samples `init` for `shape` with `rng`, in f64.
fn sample(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let n = shape.elem_count();
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * rng.gen::<f64>()).collect()
    };
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f64> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                mean + std * z
            })
            .collect()
    };
    match init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .expect("the var map lock is never poisoned");
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "shape mismatch on {name}: the model wants {shape:?}, the weights have {:?}",
                    var.shape()
                )
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(self.seed, name));
        let values = sample(init, &shape, &mut rng);
        let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .expect("the var map lock is never poisoned");
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(device),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("the var map lock is never poisoned")
            .contains_key(name)
    }
}

/// A [`VarBuilder`] that takes existing variables from `varmap` and creates missing ones
/// reproducibly from `seed` (see the [module docs](self)).
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededBackend {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

/// A backend that hands out broadcast zeros: every variable costs one element, whatever its
/// shape. Used to build a network only to count its FLOPs.
struct ShapeOnlyBackend;

impl SimpleBackend for ShapeOnlyBackend {
    fn get(
        &self,
        shape: Shape,
        _name: &str,
        _init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("the shape-only builder has no stored variable {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// A [`VarBuilder`] whose variables are broadcast zeros (no memory per parameter): build a
/// network with it to count FLOPs of configurations too large to allocate.
pub fn shape_only_var_builder() -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(ShapeOnlyBackend), DType::F32, Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> Vec<f32> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
        let linear = candle_nn::linear(4, 3, vb.pp("layer")).unwrap();
        let _ = linear;
        let data = varmap.data().lock().unwrap();
        let mut out = data["layer.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        out.extend(data["layer.bias"].as_tensor().to_vec1::<f32>().unwrap());
        out
    }

    #[test]
    fn same_seed_same_weights_different_seed_different_weights() {
        let a = build(7);
        assert_eq!(a, build(7));
        assert_ne!(a, build(8));
        // Kaiming-uniform bound for fan-in 4 with the ReLU gain √2: √3·√2/2.
        let bound = (3.0f32).sqrt() * (2.0f32).sqrt() / 2.0;
        assert!(a[..12].iter().all(|w| w.abs() <= bound));
        assert!(a[..12].iter().any(|w| w.abs() > 0.1 * bound));
    }
}
