//! Training EquiformerV2 on conservative forces: the gradient of a loss on `F = −∂E/∂r` (and
//! on the stress) with respect to the weights is a second derivative of the energy. With
//! higher-order gradients enabled the model composes its layers from differentiable ops; here
//! that gradient is checked against finite differences of the loss in weights of every kind of
//! layer (f64).
//!
//! A test binary of its own: enabling higher-order gradients is process-wide and would switch
//! the other EquiformerV2 tests off the fused kernels.

mod common;

use candle_core::{DType, Device, Tensor};
use common::random_structures;
use matscale_models::equiformer_v2::{EquiformerV2Config, FrameRoll};
use matscale_models::{BatchTensors, ForceMode, ModelConfig, ModelSpec};
use matscale_structures::batch::{GraphBatch, GraphOptions};

fn tiny() -> EquiformerV2Config {
    EquiformerV2Config {
        num_layers: 2,
        sphere_channels: 4,
        attn_hidden_channels: 3,
        num_heads: 2,
        attn_alpha_channels: 4,
        attn_value_channels: 2,
        ffn_hidden_channels: 3,
        edge_channels: 3,
        lmax_list: vec![2],
        mmax_list: vec![1],
        grid_resolution: 8,
        num_distance_basis: 40,
        max_radius: 4.0,
        max_num_elements: 30,
        alpha_drop: 0.0,
        drop_path_rate: 0.0,
        proj_drop: 0.0,
        frame_roll: FrameRoll::Zero,
        ..EquiformerV2Config::default()
    }
}

#[test]
fn force_and_stress_loss_gradients_match_finite_differences() {
    matscale_models::enable_higher_order_gradients().expect("second derivatives available");
    let config = tiny();
    let spec = ModelSpec {
        model: ModelConfig::EquiformerV2(config.clone()),
        force_mode: ForceMode::Conservative,
    };
    let (varmap, model) = common::build(&spec, DType::F64);
    let structures: Vec<_> = random_structures(2, 21);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(config.max_radius)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let n = batch.n_nodes();
    let force_weights = Tensor::from_vec(
        (0..3 * n).map(|i| ((i * 7 % 5) as f64) - 2.0).collect(),
        (n, 3),
        &Device::Cpu,
    )
    .unwrap();
    let stress_weights = Tensor::from_vec(
        (0..9 * structures.len())
            .map(|i| ((i * 3 % 4) as f64) - 1.5)
            .collect(),
        (structures.len(), 3, 3),
        &Device::Cpu,
    )
    .unwrap();
    let loss = || -> Tensor {
        let p = model
            .predict(&tensors, true)
            .expect("training forward pass");
        let forces = (p.forces * &force_weights).unwrap().sum_all().unwrap();
        let stress = (p.stress * &stress_weights).unwrap().sum_all().unwrap();
        (forces + stress).unwrap()
    };
    let grads = loss().backward().unwrap();
    // One weight per kind of layer (in both blocks): radial MLP, both SO(2) convolutions
    // (m = 0 and m > 0), the attention logits, the grid MLP, the norms, the edge-degree
    // embedding and the energy head. (With one block, the first block's grid MLP and the
    // energy head's l > 0 path would not reach the energy: the energy reads the l = 0 row,
    // which `layer_norm_sh` normalises apart from the others.)
    let data = varmap.data().lock().unwrap().clone();
    let mut names: Vec<&String> = data
        .keys()
        .filter(|k| {
            [
                "so2_conv_1.rad_func.net.0.weight",
                "ga.so2_conv_1.fc_m0.weight",
                "ga.so2_conv_1.so2_m_conv.0.fc.weight",
                "ga.so2_conv_2.fc_m0.weight",
                "ga.alpha_dot",
                "ffn.grid_mlp.0.weight",
                "norm_1.affine_weight",
                "edge_degree_embedding.rad_func.net.3.weight",
                "energy_block.scalar_mlp.0.weight",
            ]
            .iter()
            .any(|suffix| k.ends_with(suffix))
        })
        .collect();
    names.sort();
    assert!(names.len() >= 8, "weights found: {names:?}");
    let h = 1e-4;
    let mut worst = 0.0f64;
    let mut largest = 0.0f64;
    for name in names {
        let var = &data[name];
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let i = analytic
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, _)| i)
            .unwrap();
        let at = |delta: f64| -> f64 {
            let mut v = original.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        // Richardson extrapolation of two central differences cancels their h² error.
        let coarse = (at(h) - at(-h)) / (2.0 * h);
        let fine = (at(h / 2.0) - at(-h / 2.0)) / h;
        let numeric = (4.0 * fine - coarse) / 3.0;
        var.set(&Tensor::from_vec(original, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let error = (numeric - analytic[i]).abs() / numeric.abs().max(1e-3);
        println!(
            "{name}[{i}]: autograd {:.6e}, finite differences {numeric:.6e}",
            analytic[i]
        );
        worst = worst.max(error);
        largest = largest.max(numeric.abs());
    }
    assert!(
        largest > 1e-3,
        "the checked gradients are not trivially zero"
    );
    assert!(worst < 1e-5, "relative error {worst:e}");
}
