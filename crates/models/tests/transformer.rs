//! Tests of the Transformer family: the study's ADiT encoder and the distance-biased variant.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::*;
use matscale_models::transformer::{AttentionBias, TransformerConfig};
use matscale_models::{
    Architecture, AtomisticModel, BatchShape, BatchTensors, ForceMode, ModelConfig, ModelSpec,
};
use matscale_structures::batch::{GraphBatch, GraphOptions};
use matscale_structures::Structure;

/// The neighbour-list cutoff of the tests, Å (equal to the model's default cutoff).
const CUTOFF: f64 = 5.0;

/// A small configuration that runs fast in the dev profile.
fn small(bias: AttentionBias) -> TransformerConfig {
    TransformerConfig {
        d_model: 16,
        depth: 2,
        heads: 2,
        head_hidden: 16,
        num_radial: 8,
        attention_bias: bias,
        ..TransformerConfig::default()
    }
}

fn spec(config: TransformerConfig, force_mode: ForceMode) -> ModelSpec {
    ModelSpec {
        model: ModelConfig::Transformer(config),
        force_mode,
    }
}

fn built_parameters(varmap: &VarMap) -> usize {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| !name.starts_with("normalizer."))
        .map(|(_, v)| v.elem_count())
        .sum()
}

/// Builds `spec` with weights drawn reproducibly from `seed`.
fn build_seeded(spec: &ModelSpec, seed: u64, dtype: DType) -> (VarMap, AtomisticModel) {
    let varmap = VarMap::new();
    let vb = matscale_models::seeded_var_builder(&varmap, seed, dtype, &Device::Cpu);
    let model = AtomisticModel::new(spec, vb.clone(), vb).unwrap();
    (varmap, model)
}

const MODES: [ForceMode; 2] = [ForceMode::Direct, ForceMode::Conservative];
const BIASES: [AttentionBias; 2] = [AttentionBias::None, AttentionBias::Distance];

// ---------------------------------------------------------------------------------------------
// Parameters, ladder, presets, configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn built_parameter_counts_equal_the_analytic_counts() {
    let mut configs = vec![
        small(AttentionBias::None),
        small(AttentionBias::Distance),
        TransformerConfig {
            d_model: 7,
            heads: 7,
            depth: 1,
            ff_multiplier: 3,
            head_hidden: 5,
            num_radial: 3,
            max_atomic_number: 50,
            ..TransformerConfig::default()
        },
        TransformerConfig::default(),
    ];
    for target in [1_000, 20_000, 300_000, 1_000_000] {
        for bias in BIASES {
            configs.push(TransformerConfig::ladder(target, ForceMode::Direct, bias).unwrap());
        }
    }
    for config in configs {
        for bias in BIASES {
            let config = TransformerConfig {
                attention_bias: bias,
                ..config.clone()
            };
            for mode in MODES {
                let (varmap, model) = build(&spec(config.clone(), mode), DType::F32);
                assert_eq!(
                    built_parameters(&varmap),
                    config.n_parameters(mode),
                    "{config:?} {mode}"
                );
                assert_eq!(model.n_parameters(), config.n_parameters(mode));
            }
        }
    }
}

fn pytorch_counts() -> Vec<serde_json::Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/transformer/parameter_counts.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn parameter_counts_match_pytorch() {
    // The study's module layout built in PyTorch (tests/data/transformer).
    let rows = pytorch_counts();
    assert_eq!(rows.len(), 18);
    for row in rows {
        let config = TransformerConfig {
            d_model: row["d_model"].as_u64().unwrap() as usize,
            heads: row["nhead"].as_u64().unwrap() as usize,
            depth: row["num_layers"].as_u64().unwrap() as usize,
            max_atomic_number: row["max_num_elements"].as_u64().unwrap() as usize,
            ..TransformerConfig::default()
        };
        assert_eq!(
            config.n_parameters(ForceMode::Direct) as u64,
            row["total"].as_u64().unwrap(),
            "{row}"
        );
        assert_eq!(
            config.n_parameters_study_rule(ForceMode::Direct) as u64,
            row["study_rule"].as_u64().unwrap(),
            "{row}"
        );
    }
}

#[test]
fn presets_are_the_study_sizes() {
    let rows = pytorch_counts();
    let presets = TransformerConfig::presets();
    let mut adit = 0;
    for (name, config) in &presets {
        config.check().unwrap();
        assert_eq!(
            *name,
            format!(
                "{}-d{}-l{}",
                if config.is_distance() {
                    "distance"
                } else {
                    "adit"
                },
                config.d_model,
                config.depth
            )
        );
        if config.is_distance() {
            assert_eq!(config.label(), "transformer_distance");
            continue;
        }
        assert_eq!(config.label(), "transformer");
        let row = rows
            .iter()
            .find(|r| {
                r["max_num_elements"] == 100
                    && r["d_model"] == config.d_model
                    && r["nhead"] == config.heads
                    && r["num_layers"] == config.depth
            })
            .unwrap_or_else(|| panic!("{name} is not one of the study's sizes"));
        assert_eq!(
            config.n_parameters(ForceMode::Direct) as u64,
            row["total"].as_u64().unwrap()
        );
        adit += 1;
    }
    assert_eq!(adit, 9);
}

#[test]
fn ladder_lands_within_ten_percent_from_1e3_to_1e8() {
    for bias in BIASES {
        for mode in MODES {
            let mut last_depth = 0;
            let mut last_width = 0;
            for k in 0..=20 {
                let target = 10f64.powf(3.0 + 0.25 * k as f64).round() as usize;
                let config = TransformerConfig::ladder(target, mode, bias).unwrap();
                config.check().unwrap();
                let n = config.n_parameters(mode) as f64;
                let ratio = n / target as f64;
                assert!(
                    (0.9..=1.1).contains(&ratio),
                    "{bias:?} {mode} {target}: {n}"
                );
                assert_eq!(config.heads, (config.d_model / 64).max(1));
                assert_eq!(config.attention_bias, bias);
                // Depth and width grow with the target.
                assert!(config.depth >= last_depth);
                assert!(config.depth > last_depth || config.d_model >= last_width);
                last_depth = config.depth;
                last_width = config.d_model;
            }
            assert!(last_depth >= 10, "1e8 parameters at depth {last_depth}");
        }
    }
    // Dense targets in the small-model regime, where the head width does the fine tuning.
    for bias in BIASES {
        for mode in MODES {
            for target in (1_000..30_000).step_by(700) {
                let config = TransformerConfig::ladder(target, mode, bias).unwrap();
                let ratio = config.n_parameters(mode) as f64 / target as f64;
                assert!((0.9..=1.1).contains(&ratio), "{target}: {config:?}");
            }
        }
    }
    assert!(TransformerConfig::for_parameters(10, ForceMode::Direct).is_err());
}

#[test]
fn ladder_returns_the_study_sizes_on_the_rule_at_their_own_counts() {
    // Seven of the study's nine sizes follow heads = max(1, d/64) and depth = 2 + d/64; asked
    // for exactly their parameter count, the ladder returns them.
    let mut on_rule = 0;
    for (name, config) in TransformerConfig::presets() {
        let rule =
            config.heads == (config.d_model / 64).max(1) && config.depth == 2 + config.d_model / 64;
        if config.is_distance() || !rule {
            continue;
        }
        let n = config.n_parameters(ForceMode::Direct);
        let ladder = TransformerConfig::for_parameters(n, ForceMode::Direct).unwrap();
        assert_eq!(ladder, config, "{name}");
        on_rule += 1;
    }
    assert_eq!(on_rule, 7);
}

#[test]
fn config_round_trips_through_toml_and_rejects_bad_fields() {
    let config = small(AttentionBias::Distance);
    let model = ModelConfig::Transformer(config.clone());
    let text = toml::to_string(&model).unwrap();
    assert!(text.contains("family = \"transformer\""));
    assert!(text.contains("attention_bias = \"distance\""));
    let back: ModelConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, model);
    assert_eq!(back.label(), "transformer_distance");

    let partial: ModelConfig = toml::from_str("family = \"transformer\"\nd_model = 32").unwrap();
    let ModelConfig::Transformer(partial) = partial else {
        panic!("wrong family")
    };
    assert_eq!(partial.d_model, 32);
    assert_eq!(partial.ff_multiplier, 4);
    assert!(toml::from_str::<ModelConfig>("family = \"transformer\"\nwidth = 3").is_err());

    let bad = |c: TransformerConfig, field: &str| {
        let message = c.check().unwrap_err().to_string();
        assert!(message.contains(field), "{message}");
    };
    bad(
        TransformerConfig {
            heads: 3,
            ..config.clone()
        },
        "transformer.heads",
    );
    bad(
        TransformerConfig {
            dropout: 1.0,
            ..config.clone()
        },
        "transformer.dropout",
    );
    bad(
        TransformerConfig {
            cutoff: -1.0,
            ..config.clone()
        },
        "transformer.cutoff",
    );
    bad(
        TransformerConfig { depth: 0, ..config },
        "transformer.depth",
    );
}

// ---------------------------------------------------------------------------------------------
// Agreement with the study's model in PyTorch
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_variant_matches_the_study_layout_in_pytorch() {
    // tests/data/transformer/make_forward_fixture.py: the study's ADiT layout built from
    // PyTorch modules (nn.TransformerEncoder, pre-norm, GELU tanh, key padding mask) with
    // random weights, on two structures of 3 and 5 atoms, some outside their cells.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/transformer/forward.json"
    );
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let size = |key: &str| fixture["config"][key].as_u64().unwrap() as usize;
    let config = TransformerConfig {
        d_model: size("d_model"),
        heads: size("heads"),
        depth: size("depth"),
        head_hidden: size("head_hidden"),
        max_atomic_number: size("max_atomic_number"),
        ..TransformerConfig::default()
    };
    let (varmap, model) = build(&spec(config.clone(), ForceMode::Direct), DType::F64);
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let weights = fixture["weights"].as_object().unwrap();
    {
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter().filter(|(n, _)| !n.starts_with("normalizer.")) {
            let w = weights
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing from the fixture"));
            let t = Tensor::from_vec(floats(&w["data"]), var.shape(), &Device::Cpu).unwrap();
            var.set(&t).unwrap();
        }
    }
    assert_eq!(weights.len(), varmap.all_vars().len() - 4); // 4 normaliser tensors
    let structures: Vec<Structure> = fixture["structures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let numbers = s["numbers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|z| z.as_u64().unwrap() as u8)
                .collect();
            let rows = |v: &serde_json::Value| -> Vec<[f64; 3]> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        let r = floats(r);
                        [r[0], r[1], r[2]]
                    })
                    .collect()
            };
            let cell = rows(&s["cell"]);
            Structure::new(
                numbers,
                rows(&s["positions"]),
                [cell[0], cell[1], cell[2]],
                [true; 3],
            )
            .unwrap()
        })
        .collect();
    let p = predict(&model, &structures, CUTOFF);
    let de = max_abs_diff(&p.energy, &floats(&fixture["energy"]));
    let forces: Vec<f64> = fixture["forces"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    let df = max_abs_diff(
        &p.forces
            .iter()
            .flatten()
            .flatten()
            .copied()
            .collect::<Vec<_>>(),
        &forces,
    );
    let stress: Vec<f64> = fixture["stress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| {
            m.as_array()
                .unwrap()
                .iter()
                .flat_map(floats)
                .collect::<Vec<_>>()
        })
        .collect();
    let ds = max_abs_diff(
        &p.stress.iter().flat_map(flat_mat).collect::<Vec<_>>(),
        &stress,
    );
    assert!(
        de < 1e-10 && df < 1e-10 && ds < 1e-10,
        "energy {de}, forces {df}, stress {ds}"
    );
}

// ---------------------------------------------------------------------------------------------
// Symmetry
// ---------------------------------------------------------------------------------------------

fn check_equivariance(model: &AtomisticModel, structures: &[Structure], tol: f64) {
    let reference = predict(model, structures, CUTOFF);
    let scale = max_abs(reference.energy.iter()).max(1.0);
    for (k, s) in structures.iter().enumerate() {
        let r = random_rotation(10 + k as u64);
        let n = s.len();
        let perm: Vec<usize> = (0..n).map(|i| (i * 3 + 1) % n).rev().collect();
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "not a permutation");
        let moved = translate(&permute(&rotate(s, &r), &perm), [1.3, -2.1, 0.4]);
        let p = predict(model, std::slice::from_ref(&moved), CUTOFF);
        let de = (p.energy[0] - reference.energy[k]).abs();
        assert!(de < tol * scale, "energy changed by {de}");
        let expected: Vec<[f64; 3]> = perm
            .iter()
            .map(|&i| apply(&r, &reference.forces[k][i]))
            .collect();
        let df = max_abs_diff(&flat_forces(&p.forces[0]), &flat_forces(&expected));
        assert!(df < tol * scale, "forces not equivariant: {df}");
        let ds = max_abs_diff(
            &flat_mat(&p.stress[0]),
            &flat_mat(&rotate_tensor(&r, &reference.stress[k])),
        );
        assert!(ds < tol * scale, "stress not equivariant: {ds}");
    }
    assert!(max_abs(reference.forces.iter().flatten().flatten()) > 1e-6);
}

#[test]
fn distance_variant_is_invariant_and_equivariant_in_both_force_modes() {
    let structures = random_structures(3, 7);
    for mode in MODES {
        let (_, model) = build(&spec(small(AttentionBias::Distance), mode), DType::F64);
        check_equivariance(&model, &structures, 1e-10);
    }
}

#[test]
fn plain_adit_is_not_invariant() {
    let structures = random_structures(2, 8);
    let (_, model) = build_seeded(
        &spec(small(AttentionBias::None), ForceMode::Direct),
        1,
        DType::F64,
    );
    let reference = predict(&model, &structures, CUTOFF);
    for (k, s) in structures.iter().enumerate() {
        let rotated = rotate(s, &random_rotation(20 + k as u64));
        let e = energy(&model, &rotated, CUTOFF);
        let de = (e - reference.energy[k]).abs();
        assert!(de > 1e-3, "rotation changed the energy by only {de}");
        let shifted = translate(s, [0.7, 0.2, -0.5]);
        let de = (energy(&model, &shifted, CUTOFF) - reference.energy[k]).abs();
        assert!(de > 1e-3, "translation changed the energy by only {de}");
    }
}

// ---------------------------------------------------------------------------------------------
// Conservative forces and stress
// ---------------------------------------------------------------------------------------------

#[test]
fn conservative_forces_and_stress_equal_finite_differences() {
    let structures = random_structures(2, 9);
    for bias in BIASES {
        let (_, model) = build(&spec(small(bias), ForceMode::Conservative), DType::F64);
        let p = predict(&model, &structures, CUTOFF);
        for (k, s) in structures.iter().enumerate() {
            let fd = fd_forces(&model, s, CUTOFF, 1e-5);
            let scale = max_abs(flat_forces(&fd).iter()).max(1e-3);
            let df = max_abs_diff(&flat_forces(&p.forces[k]), &flat_forces(&fd));
            assert!(
                df < 1e-6 * scale.max(1.0),
                "{bias:?}: forces differ by {df}"
            );
            let fd = fd_stress(&model, s, CUTOFF, 1e-5);
            let ds = max_abs_diff(&flat_mat(&p.stress[k]), &flat_mat(&fd));
            assert!(ds < 1e-9, "{bias:?}: stress differs by {ds}");
            assert!(
                max_abs(flat_mat(&fd).iter()) > 1e-5,
                "{bias:?}: trivial stress"
            );
        }
    }
}

#[test]
fn force_loss_gradients_equal_finite_differences_in_the_weights() {
    // Conservative training differentiates forces again: this checks the second derivatives
    // through attention, softmax, GELU and the LayerNorms.
    matscale_models::enable_higher_order_gradients().unwrap();
    let structures = random_structures(1, 12);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(CUTOFF)).unwrap();
    for bias in BIASES {
        let (varmap, model) = build(&spec(small(bias), ForceMode::Conservative), DType::F64);
        let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
        let loss = |model: &AtomisticModel| -> Tensor {
            let p = model.predict(&tensors, false).unwrap();
            (p.forces.sqr().unwrap().sum_all().unwrap()
                + p.stress.sqr().unwrap().sum_all().unwrap())
            .unwrap()
        };
        let names = ["blocks.0.attn.in_proj.weight", "blocks.1.ff.linear1.weight"];
        let grads = loss(&model).backward().unwrap();
        for name in names {
            let var: Var = varmap.data().lock().unwrap()[name].clone();
            let grad = grads.get(var.as_tensor()).expect("weight gradient");
            let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let original = var.as_tensor().copy().unwrap();
            for index in [0, 5] {
                let value = |delta: f64| -> f64 {
                    let mut w: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
                    w[index] += delta;
                    var.set(&Tensor::from_vec(w, original.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&model).to_scalar::<f64>().unwrap()
                };
                let h = 1e-5;
                let fd = (value(h) - value(-h)) / (2.0 * h);
                var.set(&original).unwrap();
                assert!(
                    (fd - grad[index]).abs() < 1e-8 * fd.abs().max(1.0),
                    "{bias:?} {name}[{index}]: autograd {} vs finite difference {fd}",
                    grad[index]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Batching, dropout, precision
// ---------------------------------------------------------------------------------------------

#[test]
fn a_batch_predicts_what_each_structure_predicts_alone() {
    let mut structures = random_structures(4, 13);
    structures.sort_by_key(|s| std::cmp::Reverse(s.len()));
    structures.swap(0, 2); // the largest structure in the middle of the batch
    let sizes: Vec<usize> = structures.iter().map(Structure::len).collect();
    assert!(sizes.iter().min() < sizes.iter().max(), "sizes {sizes:?}");
    for bias in BIASES {
        for mode in MODES {
            let (_, model) = build(&spec(small(bias), mode), DType::F64);
            let together = predict(&model, &structures, CUTOFF);
            for (k, s) in structures.iter().enumerate() {
                let alone = predict(&model, std::slice::from_ref(s), CUTOFF);
                let scale = together.energy[k].abs().max(1.0);
                assert!((alone.energy[0] - together.energy[k]).abs() < 1e-10 * scale);
                let df = max_abs_diff(
                    &flat_forces(&alone.forces[0]),
                    &flat_forces(&together.forces[k]),
                );
                assert!(df < 1e-10, "{bias:?} {mode}: forces differ by {df}");
                let ds = max_abs_diff(&flat_mat(&alone.stress[0]), &flat_mat(&together.stress[k]));
                assert!(ds < 1e-10, "{bias:?} {mode}: stress differs by {ds}");
            }
        }
    }
}

#[test]
fn dropout_acts_only_in_training() {
    let structures = random_structures(2, 14);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(CUTOFF)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let config = TransformerConfig {
        dropout: 0.3,
        ..small(AttentionBias::None)
    };
    let (_, model) = build(&spec(config, ForceMode::Direct), DType::F64);
    let energy = |train: bool| -> Vec<f64> {
        model
            .predict(&tensors, train)
            .unwrap()
            .energy
            .to_vec1()
            .unwrap()
    };
    assert_eq!(energy(false), energy(false));
    let (a, b) = (energy(true), energy(true));
    assert!(max_abs_diff(&a, &b) > 1e-6, "two training passes agree");
    assert!(max_abs_diff(&a, &energy(false)) > 1e-6);
}

#[test]
fn structures_without_neighbours_are_handled() {
    // One atom in a 6 Å cube has no neighbour within 5 Å, not even its own images; batched
    // with an ordinary structure.
    let lonely = Structure::new(
        vec![29],
        vec![[0.5, 0.5, 0.5]],
        [[6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]],
        [true; 3],
    )
    .unwrap();
    for bias in BIASES {
        for mode in MODES {
            let (_, model) = build(&spec(small(bias), mode), DType::F64);
            let alone = predict(&model, std::slice::from_ref(&lonely), CUTOFF);
            assert!(alone.energy[0].is_finite());
            let mut both = random_structures(1, 16);
            both.push(lonely.clone());
            let together = predict(&model, &both, CUTOFF);
            assert!((together.energy[1] - alone.energy[0]).abs() < 1e-10);
            if bias == AttentionBias::Distance {
                // Edge-based forces and stress of an atom without edges vanish.
                assert!(max_abs(flat_forces(&alone.forces[0]).iter()) < 1e-12);
                assert!(max_abs(flat_mat(&alone.stress[0]).iter()) < 1e-12);
            }
        }
    }
}

/// Copies the f32 weights of `from` into the (lower precision) variables of `to`.
fn copy_weights(from: &VarMap, to: &VarMap) {
    let from = from.data().lock().unwrap();
    let to = to.data().lock().unwrap();
    for (name, var) in to.iter() {
        if let Some(source) = from.get(name) {
            var.set(&source.as_tensor().to_dtype(var.dtype()).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn bf16_and_f16_weights_give_finite_predictions_close_to_f32() {
    let structures = random_structures(2, 15);
    for bias in BIASES {
        for mode in MODES {
            let spec = spec(small(bias), mode);
            let (reference_map, reference) = build(&spec, DType::F32);
            let exact = predict(&reference, &structures, CUTOFF);
            for dtype in [DType::BF16, DType::F16] {
                let (net, _master, model) = build_mixed(&spec, dtype);
                copy_weights(&reference_map, &net);
                let low = predict(&model, &structures, CUTOFF);
                let all = |p: &HostPrediction| -> Vec<f64> {
                    p.energy
                        .iter()
                        .copied()
                        .chain(p.forces.iter().flatten().flatten().copied())
                        .chain(p.stress.iter().flat_map(flat_mat))
                        .collect()
                };
                let (a, b) = (all(&low), all(&exact));
                assert!(a.iter().all(|v| v.is_finite()), "{bias:?} {mode} {dtype:?}");
                let scale = max_abs(b.iter()).max(1.0);
                let diff = max_abs_diff(&a, &b);
                assert!(
                    diff < 0.1 * scale,
                    "{bias:?} {mode} {dtype:?}: {diff} of {scale}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// FLOPs
// ---------------------------------------------------------------------------------------------

fn flops(
    config: &TransformerConfig,
    mode: ForceMode,
    shape: &BatchShape,
) -> matscale_models::Flops {
    let (_, model) = build(&spec(config.clone(), mode), DType::F32);
    model.flops(shape)
}

#[test]
fn matmul_flops_are_twice_the_linear_parameters_per_row_plus_attention() {
    let config = TransformerConfig {
        index_embedding: false,
        ..small(AttentionBias::None)
    };
    let (d, h, l) = (config.d_model, config.head_hidden, config.depth);
    let f = config.ff_width();
    let shape = BatchShape {
        n_structures: 3,
        n_nodes: 15,
        n_edges: 200,
        sum_sq_nodes: 4 * 4 + 5 * 5 + 6 * 6,
        max_nodes: 6,
    };
    // Matrices applied to every atom: the encoder's linear layers with their biases (added as
    // rank-one products), the heads' weights (their biases are broadcast adds); norms and
    // embedding tables excluded.
    let per_row = 2 * (3 * d + d * d + d) // coordinate embedders
        + 9 // fractional coordinates
        + l * (3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d)
        + 3 * (d * d + d * h)
        + h * (1 + 3 + 6); // heads
                           // Q Kᵀ and A V on the padded width, per layer.
    let attention = l * 2 * 2 * shape.n_structures * shape.max_nodes.pow(2) * d;
    let expected = 2 * shape.n_nodes * per_row + attention;
    let counted = flops(&config, ForceMode::Direct, &shape);
    assert_eq!(counted.forward.matmul, expected as f64);
    assert_eq!(counted.backward.matmul, 2.0 * expected as f64);
    assert!(counted.forward.elementwise > 0.0 && counted.forward.gather_scatter > 0.0);
    // Conservative: no force/stress heads, and a training step counts three passes.
    let conservative = flops(&config, ForceMode::Conservative, &shape);
    let heads_only = 2 * shape.n_nodes * (2 * (d * d + d * h) + h * 9);
    assert_eq!(conservative.forward.matmul, (expected - heads_only) as f64);
    assert_eq!(
        conservative.training_step(),
        3.0 * (conservative.forward.total() + conservative.backward.total())
    );
}

#[test]
fn attention_flops_grow_with_the_padded_width_and_edge_work_with_edges() {
    let plain = small(AttentionBias::None);
    let shape = |max_nodes: usize, edges: usize| BatchShape {
        n_structures: 2,
        n_nodes: 12,
        n_edges: edges,
        sum_sq_nodes: 72,
        max_nodes,
    };
    // Same atoms, more padding: only the attention (quadratic in M) and padding work grow.
    let even = flops(&plain, ForceMode::Direct, &shape(6, 100));
    let uneven = flops(&plain, ForceMode::Direct, &shape(10, 100));
    let d = plain.d_model;
    let extra_matmul = plain.depth * 2 * 2 * 2 * (10 * 10 - 6 * 6) * d;
    assert_eq!(
        uneven.forward.matmul - even.forward.matmul,
        extra_matmul as f64
    );
    // The plain variant ignores edges; the distance variant is affine in them.
    let more_edges = flops(&plain, ForceMode::Direct, &shape(6, 300));
    assert_eq!(more_edges.forward, even.forward);
    let distance = small(AttentionBias::Distance);
    let totals: Vec<f64> = [100, 200, 300]
        .iter()
        .map(|&e| {
            flops(&distance, ForceMode::Direct, &shape(6, e))
                .forward
                .total()
        })
        .collect();
    assert!(totals[1] > totals[0]);
    assert!(((totals[2] - totals[1]) - (totals[1] - totals[0])).abs() < 1e-6);
}
// ---------------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------------

#[test]
fn both_variants_overfit_two_structures() {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    use rand::{Rng, SeedableRng};
    let structures = random_structures(2, 17);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(CUTOFF)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F32, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let n = batch.n_nodes();
    let forces: Vec<f32> = (0..n * 3).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let forces = Tensor::from_vec(forces, (n, 3), &Device::Cpu).unwrap();
    let energy = Tensor::new(&[-3.0f32, 2.0], &Device::Cpu).unwrap();
    // The loss of predicting zeros, the yardstick of the fit.
    let trivial = (energy.sqr().unwrap().mean_all().unwrap()
        + forces.sqr().unwrap().mean_all().unwrap())
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    for bias in BIASES {
        let (varmap, model) = build_seeded(&spec(small(bias), ForceMode::Direct), 5, DType::F32);
        let params = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| !name.starts_with("normalizer."))
            .map(|(_, v)| v.clone())
            .collect();
        let mut optimizer = AdamW::new(
            params,
            ParamsAdamW {
                lr: 5e-3,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )
        .unwrap();
        let loss = || -> Tensor {
            let p = model.predict(&tensors, true).unwrap();
            let e = (p.energy - &energy)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            let f = (p.forces - &forces)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            (e + f).unwrap()
        };
        for _ in 0..120 {
            optimizer.backward_step(&loss()).unwrap();
        }
        let last = loss().to_scalar::<f32>().unwrap();
        assert!(
            last < 0.05 * trivial,
            "{bias:?}: loss {last}, zero predictor {trivial}"
        );
    }
}
