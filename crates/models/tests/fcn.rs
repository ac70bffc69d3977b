//! Tests of the fully connected net: conservative forces and stress against finite
//! differences, the documented non-invariance, padding, dtypes, parameter counts, the size
//! ladder and FLOPs.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use matscale_models::fcn::FcnConfig;
use matscale_models::{
    Architecture, AtomisticModel, BatchShape, ForceMode, ModelConfig, ModelError, ModelSpec,
};
use matscale_structures::batch::{GraphBatch, GraphOptions};
use matscale_structures::Structure;

/// Neighbour-list cutoff of the test batches (the FCN reads no edges; kept small).
const CUTOFF: f64 = 2.0;

fn spec(config: FcnConfig, force_mode: ForceMode) -> ModelSpec {
    ModelSpec {
        model: ModelConfig::Fcn(config),
        force_mode,
    }
}

fn small() -> FcnConfig {
    FcnConfig {
        head_hidden: 16,
        ..FcnConfig::study(8, 16, 2)
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

fn flat(p: &HostPrediction) -> Vec<f64> {
    let mut v = p.energy.clone();
    for f in &p.forces {
        v.extend(flat_forces(f));
    }
    for s in &p.stress {
        v.extend(flat_mat(s));
    }
    v
}

#[test]
fn conservative_forces_are_finite_differences_of_the_energy() {
    let (_vm, model) = build(&spec(small(), ForceMode::Conservative), DType::F64);
    for s in random_structures(2, 11) {
        let p = predict(&model, std::slice::from_ref(&s), CUTOFF);
        let fd = fd_forces(&model, &s, CUTOFF, 1e-5);
        let ad = flat_forces(&p.forces[0]);
        let scale = max_abs(&ad);
        assert!(scale > 1e-6, "forces are trivially zero");
        let err = max_abs_diff(&ad, &flat_forces(&fd));
        assert!(
            err < 1e-7 * scale.max(1.0),
            "force error {err} (scale {scale})"
        );
    }
}

#[test]
fn conservative_stress_is_the_finite_difference_under_strain() {
    let (_vm, model) = build(&spec(small(), ForceMode::Conservative), DType::F64);
    for s in random_structures(2, 12) {
        let p = predict(&model, std::slice::from_ref(&s), CUTOFF);
        let fd = fd_stress(&model, &s, CUTOFF, 1e-5);
        let ad = flat_mat(&p.stress[0]);
        let scale = max_abs(&ad);
        assert!(scale > 1e-8, "stress is trivially zero");
        let err = max_abs_diff(&ad, &flat_mat(&fd));
        assert!(
            err < 1e-7 * scale.max(1e-3),
            "stress error {err} (scale {scale})"
        );
        // A strain-gradient stress is symmetric.
        let m = &p.stress[0];
        assert!((m[0][1] - m[1][0]).abs() < 1e-12 * scale.max(1.0));
    }
}

#[test]
fn energy_is_not_invariant_to_rotations_or_translations_but_is_to_permutations() {
    let (_vm, model) = build(&spec(small(), ForceMode::Direct), DType::F64);
    for (k, s) in random_structures(3, 13).into_iter().enumerate() {
        let e = energy(&model, &s, CUTOFF);
        let rotated = energy(&model, &rotate(&s, &random_rotation(k as u64)), CUTOFF);
        let translated = energy(&model, &translate(&s, [0.7, -1.1, 0.4]), CUTOFF);
        let scale = e.abs().max(1e-3);
        assert!(
            (rotated - e).abs() > 1e-3 * scale,
            "rotation left the energy unchanged: {e} vs {rotated}"
        );
        assert!(
            (translated - e).abs() > 1e-3 * scale,
            "translation left the energy unchanged: {e} vs {translated}"
        );
        // Atoms interact only through the final sum, so the order of atoms does not matter.
        let perm: Vec<usize> = (0..s.len()).rev().collect();
        let permuted = predict(&model, &[permute(&s, &perm)], CUTOFF);
        let original = predict(&model, std::slice::from_ref(&s), CUTOFF);
        assert!((permuted.energy[0] - original.energy[0]).abs() < 1e-10 * scale.max(1.0));
        for (new, &old) in perm.iter().enumerate() {
            let d = max_abs_diff(&permuted.forces[0][new], &original.forces[0][old]);
            assert!(d < 1e-10, "permuted forces differ by {d}");
        }
    }
}

#[test]
fn a_prediction_does_not_depend_on_its_batch_mates() {
    // Structures of 4–8 atoms batched with a 12-atom one: the padded width changes from the
    // structure's own size to 12, and the other structures' atoms share the batch.
    let mut big = random_structures(2, 21);
    let merged = {
        let (a, b) = (&big[0], &big[1]);
        let mut numbers = a.numbers().to_vec();
        numbers.extend_from_slice(b.numbers());
        let mut positions = a.positions().to_vec();
        positions.extend(b.positions().iter().map(|p| [p[0], p[1], p[2] + 6.0]));
        let cell = [a.cell()[0], a.cell()[1], [0.0, 0.0, 12.0]];
        Structure::new(numbers, positions, cell, [true; 3]).unwrap()
    };
    big.push(merged);
    let structures = random_structures(3, 22);
    for mode in [ForceMode::Direct, ForceMode::Conservative] {
        let (_vm, model) = build(&spec(small(), mode), DType::F64);
        let mut together = structures.clone();
        together.extend(big.iter().cloned());
        let batched = predict(&model, &together, CUTOFF);
        for (k, s) in structures.iter().enumerate() {
            let alone = predict(&model, std::slice::from_ref(s), CUTOFF);
            let one = |p: &HostPrediction, i: usize| {
                let mut v = vec![p.energy[i]];
                v.extend(flat_forces(&p.forces[i]));
                v.extend(flat_mat(&p.stress[i]));
                v
            };
            let d = max_abs_diff(&one(&alone, 0), &one(&batched, k));
            assert!(d < 1e-10, "{mode}: structure {k} changes by {d} in a batch");
        }
    }
}

#[test]
fn padding_rows_are_masked_and_a_fixed_width_changes_nothing() {
    let structures = random_structures(3, 31);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let model = AtomisticModel::new(&spec(small(), ForceMode::Direct), vb.clone(), vb).unwrap();
    let reference = flat(&predict(&model, &structures, CUTOFF));

    // Padding slots embed atomic number 0: making that row huge must change nothing.
    {
        let data = varmap.data().lock().unwrap();
        let emb = data.get("embedding.weight").unwrap();
        let mut rows = emb.as_tensor().to_vec2::<f64>().unwrap();
        rows[0].iter_mut().for_each(|x| *x = 1e3);
        emb.set(&Tensor::new(rows, &Device::Cpu).unwrap()).unwrap();
    }
    let poisoned = flat(&predict(&model, &structures, CUTOFF));
    let d = max_abs_diff(&reference, &poisoned);
    assert!(d < 1e-12, "the padding token leaks into the outputs by {d}");

    // Padding every batch to 20 slots (the study's fixed width) gives the same outputs.
    let fixed = FcnConfig {
        max_atoms: Some(20),
        ..small()
    };
    let fixed_varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&fixed_varmap, DType::F64, &Device::Cpu);
    let fixed_model = AtomisticModel::new(&spec(fixed, ForceMode::Direct), vb.clone(), vb).unwrap();
    for (name, var) in fixed_varmap.data().lock().unwrap().iter() {
        let source = varmap.data().lock().unwrap().get(name).unwrap().clone();
        var.set(source.as_tensor()).unwrap();
    }
    let padded = flat(&predict(&fixed_model, &structures, CUTOFF));
    let d = max_abs_diff(&poisoned, &padded);
    assert!(d < 1e-12, "a fixed padded width changes the outputs by {d}");
}

#[test]
fn a_structure_wider_than_max_atoms_is_an_error() {
    let config = FcnConfig {
        max_atoms: Some(3),
        ..small()
    };
    let (_vm, model) = build(&spec(config, ForceMode::Direct), DType::F64);
    let structures = random_structures(1, 41);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(CUTOFF)).unwrap();
    let tensors = matscale_models::BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    match model.predict(&tensors, false) {
        Err(ModelError::Batch(message)) => assert!(message.contains("max_atoms = 3"), "{message}"),
        other => panic!("expected a batch error, got {other:?}"),
    }
}

#[test]
fn bf16_and_f16_builds_run_and_stay_close_to_f32() {
    let structures = random_structures(3, 51);
    let direct = spec(small(), ForceMode::Direct);
    let (reference_map, reference) = build(&direct, DType::F32);
    let expected = flat(&predict(&reference, &structures, CUTOFF));
    let scale = max_abs(&expected);
    for dtype in [DType::BF16, DType::F16] {
        let (net, _master, model) = build_mixed(&direct, dtype);
        for (name, var) in net.data().lock().unwrap().iter() {
            let source = reference_map
                .data()
                .lock()
                .unwrap()
                .get(name)
                .unwrap()
                .clone();
            var.set(&source.as_tensor().to_dtype(dtype).unwrap())
                .unwrap();
        }
        let got = flat(&predict(&model, &structures, CUTOFF));
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{dtype:?} output is not finite"
        );
        let d = max_abs_diff(&expected, &got);
        assert!(
            d < 0.02 * scale,
            "{dtype:?} differs from f32 by {d} (scale {scale})"
        );
    }
    // Conservative mode in bf16 runs too.
    let (_net, _master, model) = build_mixed(&spec(small(), ForceMode::Conservative), DType::BF16);
    let p = predict(&model, &structures, CUTOFF);
    assert!(flat(&p).iter().all(|x| x.is_finite()));
}

#[test]
fn conservative_forces_and_stress_can_be_differentiated_with_respect_to_weights() {
    // Training a conservative model on forces needs second derivatives through the network.
    matscale_models::enable_higher_order_gradients().unwrap();
    let (varmap, model) = build(&spec(small(), ForceMode::Conservative), DType::F64);
    let structures = random_structures(2, 61);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(CUTOFF)).unwrap();
    let tensors = matscale_models::BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let loss = || -> Tensor {
        let p = model.predict(&tensors, true).unwrap();
        (p.forces.sqr().unwrap().sum_all().unwrap()
            + (p.stress.sqr().unwrap().sum_all().unwrap() * 1e4).unwrap())
        .unwrap()
    };
    let grads = loss().backward().unwrap();
    for name in [
        "input.weight",
        "blocks.1.linear.weight",
        "energy_head.0.weight",
    ] {
        let var = varmap.data().lock().unwrap().get(name).unwrap().clone();
        let analytic = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"))
            .to_vec2::<f64>()
            .unwrap()[0][1];
        let original = var.as_tensor().to_vec2::<f64>().unwrap();
        let at = |delta: f64| {
            let mut w = original.clone();
            w[0][1] += delta;
            var.set(&Tensor::new(w, &Device::Cpu).unwrap()).unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        let h = 1e-6;
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        var.set(&Tensor::new(original, &Device::Cpu).unwrap())
            .unwrap();
        assert!(
            (analytic - numeric).abs() < 1e-5 * numeric.abs().max(1.0),
            "{name}: {analytic} vs {numeric}"
        );
        assert!(
            numeric.abs() > 1e-8,
            "{name}: the loss does not depend on this weight"
        );
    }
}

#[test]
fn built_parameters_equal_the_analytic_count() {
    let mut configs: Vec<FcnConfig> = FcnConfig::presets().into_iter().map(|(_, c)| c).collect();
    configs.push(FcnConfig::default());
    configs.push(FcnConfig {
        depth: 0,
        max_atomic_number: 7,
        ..small()
    });
    for target in [1e3, 1e4, 1e5, 1e6] {
        configs.push(FcnConfig::for_parameters(target as usize, ForceMode::Direct).unwrap());
    }
    for config in configs {
        for mode in [ForceMode::Direct, ForceMode::Conservative] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            config.build(mode, vb).unwrap();
            assert_eq!(
                built_parameters(&varmap),
                config.n_parameters(mode),
                "{config:?} {mode}"
            );
            assert_eq!(
                config.study_parameter_count(mode),
                config.n_parameters(mode) - config.max_atomic_number * config.embedding_dim
            );
        }
    }
}

#[test]
fn study_presets_have_the_study_sizes() {
    let presets = FcnConfig::presets();
    let sizes: Vec<(usize, usize, usize)> = presets
        .iter()
        .map(|(_, c)| (c.embedding_dim, c.hidden_dim, c.depth))
        .collect();
    assert_eq!(
        sizes,
        vec![
            (8, 16, 2),
            (24, 48, 4),
            (60, 108, 8),
            (96, 192, 12),
            (128, 256, 15)
        ]
    );
    assert!(presets.iter().all(|(_, c)| c.head_hidden == 128));
    // Sizes grow along the presets.
    let counts: Vec<usize> = presets
        .iter()
        .map(|(_, c)| c.n_parameters(ForceMode::Direct))
        .collect();
    assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
}

#[test]
fn ladder_lands_within_ten_percent_from_1e3_to_1e8() {
    for mode in [ForceMode::Direct, ForceMode::Conservative] {
        for k in 0..=50 {
            let target = 10f64.powf(3.0 + 5.0 * k as f64 / 50.0).round() as usize;
            let config = FcnConfig::for_parameters(target, mode).unwrap();
            config.check().unwrap();
            let ratio = config.n_parameters(mode) as f64 / target as f64;
            assert!((ratio - 1.0).abs() <= 0.1, "{mode} {target}: ratio {ratio}");
            assert_eq!(config.embedding_dim, (config.hidden_dim / 2).max(1));
            let d = FcnConfig::ladder_depth(config.hidden_dim);
            assert!(config.depth == d || config.depth == d + 1);
        }
    }
    assert!(FcnConfig::for_parameters(10, ForceMode::Direct).is_err());
}

#[test]
fn matmul_flops_are_twice_the_weights_times_the_padded_rows() {
    let config = small();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model =
        AtomisticModel::new(&spec(config.clone(), ForceMode::Direct), vb.clone(), vb).unwrap();
    // Every weight matrix but the embedding (a gather) is used once per padded row.
    let matrix_weights: usize = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, v)| v.rank() == 2 && name.as_str() != "embedding.weight")
        .map(|(_, v)| v.elem_count())
        .sum();
    let shape = |n_structures: usize, max_nodes: usize| BatchShape {
        n_structures,
        n_nodes: 12,
        n_edges: 0,
        sum_sq_nodes: 0,
        max_nodes,
    };
    let wide = model.flops(&shape(2, 10));
    let rows = 2 * 10;
    assert_eq!(wide.forward.matmul, 2.0 * (matrix_weights * rows) as f64);
    assert_eq!(wide.backward.matmul, 2.0 * wide.forward.matmul);
    // Narrower padding of the same atoms costs proportionally less in every padded op.
    let narrow = model.flops(&shape(2, 6));
    assert_eq!(narrow.forward.matmul * 10.0, wide.forward.matmul * 6.0);
    assert!(narrow.forward.elementwise < wide.forward.elementwise);
    assert!(wide.forward.gather_scatter > 0.0 && wide.forward.elementwise > 0.0);
    // A fixed padded width counts its slots whatever the batch.
    let fixed = FcnConfig {
        max_atoms: Some(10),
        ..config
    };
    let fixed_varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&fixed_varmap, DType::F32, &Device::Cpu);
    let fixed_model = AtomisticModel::new(&spec(fixed, ForceMode::Direct), vb.clone(), vb).unwrap();
    assert_eq!(fixed_model.flops(&shape(2, 6)), wide);
}

#[test]
fn config_round_trips_through_toml_and_rejects_unknown_fields() {
    let config = ModelConfig::Fcn(FcnConfig {
        max_atoms: Some(160),
        ..FcnConfig::study(24, 48, 4)
    });
    let text = toml::to_string(&config).unwrap();
    assert!(text.contains("family = \"fcn\""), "{text}");
    let back: ModelConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, config);
    let partial: ModelConfig = toml::from_str("family = \"fcn\"\nhidden_dim = 32\n").unwrap();
    assert_eq!(
        partial,
        ModelConfig::Fcn(FcnConfig {
            hidden_dim: 32,
            ..FcnConfig::default()
        })
    );
    assert!(toml::from_str::<ModelConfig>("family = \"fcn\"\nhiden_dim = 32\n").is_err());
    let bad = FcnConfig {
        hidden_dim: 0,
        ..FcnConfig::default()
    };
    assert!(bad
        .check()
        .unwrap_err()
        .to_string()
        .contains("fcn.hidden_dim"));
}
