//! SchNet: parameter counts against PyTorch Geometric, the size ladder, symmetries, forces and
//! stress against finite differences, mixed precision, FLOP counts, and numerical parity with
//! PyG's `SchNet` on periodic structures (fixtures in `tests/data/models/schnet_pyg/`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use matscale_models::schnet::{Readout, SchNetConfig};
use matscale_models::{
    Architecture, AtomisticModel, BatchShape, BatchTensors, ForceMode, ModelConfig, ModelError,
    ModelSpec,
};
use matscale_structures::batch::{GraphBatch, GraphOptions};
use matscale_structures::{Mat3, Structure};
use serde_json::Value;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/models/schnet_pyg"
);

/// A small SchNet (the parity fixture's size; filters ≠ hidden so that no transposition hides).
fn small() -> SchNetConfig {
    SchNetConfig {
        hidden_channels: 16,
        num_filters: 12,
        num_interactions: 2,
        num_gaussians: 10,
        cutoff: 4.0,
        ..SchNetConfig::default()
    }
}

fn spec(config: SchNetConfig, force_mode: ForceMode) -> ModelSpec {
    ModelSpec {
        model: ModelConfig::Schnet(config),
        force_mode,
    }
}

fn built_parameters(config: &SchNetConfig, mode: ForceMode) -> usize {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    config.build(mode, vb).expect("builds");
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

fn read_json(name: &str) -> Value {
    let path = format!("{FIXTURES}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn usize_of(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` missing")) as usize
}

/// Relative deviation `max |a − b| / max |b|`.
fn relative(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    max_abs_diff(a, b) / max_abs(b).max(f64::MIN_POSITIVE)
}

#[test]
fn parameter_counts_equal_pytorch_geometric() {
    let fixture = read_json("param_counts.json");
    let configs = fixture["configs"].as_array().expect("configs");
    assert!(configs.len() >= 5);
    for row in configs {
        let config = SchNetConfig {
            hidden_channels: usize_of(row, "hidden_channels"),
            num_filters: usize_of(row, "num_filters"),
            num_interactions: usize_of(row, "num_interactions"),
            num_gaussians: usize_of(row, "num_gaussians"),
            ..SchNetConfig::default()
        };
        let pyg = usize_of(row, "pyg_parameters");
        assert_eq!(
            config.n_parameters(ForceMode::Conservative),
            pyg,
            "{config:?}"
        );
        if pyg < 1_000_000 {
            assert_eq!(built_parameters(&config, ForceMode::Conservative), pyg);
        }
        // The study's early SchNet: PyG's plus a per-atom Linear(H, 6) stress output.
        let h = config.hidden_channels;
        assert_eq!(pyg + 6 * h + 6, usize_of(row, "study_feb2025_parameters"));
    }
    assert_eq!(
        SchNetConfig::default().n_parameters(ForceMode::Conservative),
        455_809
    );
}

#[test]
fn direct_head_parameters_are_counted_exactly() {
    for config in [
        small(),
        SchNetConfig::with_width(7, 1),
        SchNetConfig::with_width(64, 3),
    ] {
        let direct = config.n_parameters(ForceMode::Direct);
        assert_eq!(built_parameters(&config, ForceMode::Direct), direct);
        assert_eq!(
            direct - config.n_parameters(ForceMode::Conservative),
            config.direct_head_parameters(ForceMode::Direct)
        );
    }
}

#[test]
fn size_ladder_lands_within_ten_percent_from_1e3_to_1e8() {
    for mode in [ForceMode::Conservative, ForceMode::Direct] {
        for k in 0..=40 {
            let target = 10f64.powf(3.0 + 5.0 * k as f64 / 40.0).round() as usize;
            let config = SchNetConfig::for_parameters(target, mode).expect("ladder point");
            config.check().expect("valid");
            let n = config.n_parameters(mode);
            let miss = (n as f64 - target as f64).abs() / target as f64;
            // The requirement is 10%; the documented rule promises 5%.
            assert!(miss <= 0.05, "{target} → {n} ({config:?})");
            if target <= 1_000_000 {
                assert_eq!(built_parameters(&config, mode), n, "{config:?}");
            }
        }
    }
    // The ladder goes through the study's three SchNet sizes.
    for (target, width, interactions) in [(68_033, 64, 3), (455_809, 128, 6), (2_266_369, 256, 8)] {
        let config = SchNetConfig::for_parameters(target, ForceMode::Conservative).unwrap();
        assert_eq!(
            (
                config.hidden_channels,
                config.num_filters,
                config.num_interactions
            ),
            (width, width, interactions)
        );
    }
    // Too small a target is an error that names the size.
    let err = SchNetConfig::for_parameters(10, ForceMode::Conservative).unwrap_err();
    assert!(err.to_string().contains("size"), "{err}");
}

#[test]
fn presets_are_the_study_sizes() {
    let counts: Vec<usize> = SchNetConfig::presets()
        .iter()
        .map(|(_, c)| c.n_parameters(ForceMode::Conservative))
        .collect();
    assert_eq!(counts, vec![68_033, 455_809, 2_266_369]);
}

#[test]
fn config_round_trips_through_toml_and_rejects_bad_fields() {
    let config = ModelConfig::Schnet(SchNetConfig {
        readout: Readout::Mean,
        ..small()
    });
    let text = toml::to_string(&config).unwrap();
    assert!(text.contains("family = \"schnet\""), "{text}");
    assert!(text.contains("readout = \"mean\""), "{text}");
    let back: ModelConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, config);
    let partial: ModelConfig = toml::from_str("family = \"schnet\"\nhidden_channels = 32").unwrap();
    let ModelConfig::Schnet(partial) = partial else {
        panic!("wrong family")
    };
    assert_eq!(partial.hidden_channels, 32);
    assert_eq!(partial.num_gaussians, 50);
    assert!(toml::from_str::<ModelConfig>("family = \"schnet\"\nwidth = 3").is_err());
    for (bad, field) in [
        (
            SchNetConfig {
                hidden_channels: 1,
                ..small()
            },
            "hidden_channels",
        ),
        (
            SchNetConfig {
                num_gaussians: 1,
                ..small()
            },
            "num_gaussians",
        ),
        (
            SchNetConfig {
                cutoff: -1.0,
                ..small()
            },
            "cutoff",
        ),
        (
            SchNetConfig {
                max_atomic_number: 200,
                ..small()
            },
            "max_atomic_number",
        ),
    ] {
        let err = bad.check().unwrap_err();
        assert!(
            matches!(&err, ModelError::Config { field: f, .. } if f.ends_with(field)),
            "{err}"
        );
    }
}

#[test]
fn energy_is_invariant_to_rotation_translation_and_permutation() {
    let (_vars, model) = build(&spec(small(), ForceMode::Conservative), DType::F64);
    let structures = random_structures(3, 11);
    let base = predict(&model, &structures, 4.0);
    let moved: Vec<Structure> = structures
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let s = rotate(s, &random_rotation(100 + k as u64));
            let s = translate(&s, [0.3, -1.7, 2.9]);
            let perm: Vec<usize> = (0..s.len()).rev().collect();
            permute(&s, &perm)
        })
        .collect();
    let after = predict(&model, &moved, 4.0);
    for (a, b) in base.energy.iter().zip(&after.energy) {
        assert!((a - b).abs() <= 1e-10 * a.abs().max(1.0), "{a} vs {b}");
    }
    // The energy is not trivially constant: a different structure gives a different energy.
    assert!((base.energy[0] - base.energy[1]).abs() > 1e-3);
}

/// Forces rotate as vectors and stress as a rank-2 tensor, in both force modes.
#[test]
fn forces_and_stress_are_equivariant() {
    for mode in [ForceMode::Conservative, ForceMode::Direct] {
        let (_vars, model) = build(&spec(small(), mode), DType::F64);
        let structures = random_structures(2, 5);
        let r = random_rotation(9);
        let base = predict(&model, &structures, 4.0);
        let rotated: Vec<Structure> = structures.iter().map(|s| rotate(s, &r)).collect();
        let after = predict(&model, &rotated, 4.0);
        for s in 0..structures.len() {
            let want: Vec<[f64; 3]> = base.forces[s].iter().map(|f| apply(&r, f)).collect();
            let scale = max_abs(&flat_forces(&want));
            assert!(scale > 1e-6, "{mode}: forces vanish");
            let err = max_abs_diff(&flat_forces(&after.forces[s]), &flat_forces(&want));
            assert!(err <= 1e-10 * scale, "{mode}: force error {err}");
            let want = rotate_tensor(&r, &base.stress[s]);
            let scale = max_abs(&flat_mat(&want));
            assert!(scale > 1e-8, "{mode}: stress vanishes");
            let err = max_abs_diff(&flat_mat(&after.stress[s]), &flat_mat(&want));
            assert!(err <= 1e-10 * scale, "{mode}: stress error {err}");
        }
    }
}

#[test]
fn conservative_forces_and_stress_equal_finite_differences() {
    let (_vars, model) = build(&spec(small(), ForceMode::Conservative), DType::F64);
    let s = &random_structures(1, 21)[0];
    let p = predict(&model, std::slice::from_ref(s), 4.0);
    let fd = fd_forces(&model, s, 4.0, 1e-5);
    let err = relative(&flat_forces(&p.forces[0]), &flat_forces(&fd));
    assert!(err < 1e-7, "forces: relative error {err}");
    let fd = fd_stress(&model, s, 4.0, 1e-5);
    let err = relative(&flat_mat(&p.stress[0]), &flat_mat(&fd));
    assert!(err < 1e-7, "stress: relative error {err}");
}

#[test]
fn direct_forces_obey_newtons_third_law() {
    let (_vars, model) = build(&spec(small(), ForceMode::Direct), DType::F64);
    let p = predict(&model, &random_structures(3, 2), 4.0);
    for forces in &p.forces {
        let scale = max_abs(&flat_forces(forces));
        for c in 0..3 {
            let total: f64 = forces.iter().map(|f| f[c]).sum();
            assert!(total.abs() <= 1e-12 * scale.max(1.0), "net force {total}");
        }
    }
}

/// Conservative forces can be trained: their gradient with respect to the weights exists and
/// equals a finite difference (the network is twice differentiable).
#[test]
fn conservative_force_loss_has_correct_weight_gradients() {
    matscale_models::enable_higher_order_gradients().unwrap();
    let config = SchNetConfig {
        hidden_channels: 6,
        num_filters: 5,
        num_interactions: 2,
        num_gaussians: 4,
        cutoff: 4.0,
        ..SchNetConfig::default()
    };
    let (varmap, model) = build(&spec(config, ForceMode::Conservative), DType::F64);
    let s = random_structures(1, 4);
    let batch = GraphBatch::new(&s, &GraphOptions::new(4.0)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let loss = |model: &AtomisticModel| -> Tensor {
        let p = model.predict(&tensors, true).unwrap();
        p.forces.sqr().unwrap().sum_all().unwrap()
    };
    let grads = loss(&model).backward().unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    for name in [
        "interactions.0.mlp.0.weight",
        "embedding.weight",
        "lin1.weight",
    ] {
        let var = &vars[name];
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let flat = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // The entry with the largest gradient (embedding rows of absent elements have none).
        let k = (0..grad.len())
            .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
            .unwrap();
        let at = |delta: f64| -> f64 {
            let mut v = flat.clone();
            v[k] += delta;
            var.set(&Tensor::from_vec(v, original.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&model).to_vec0::<f64>().unwrap()
        };
        let h = 1e-6;
        let fd = (at(h) - at(-h)) / (2.0 * h);
        var.set(&original).unwrap();
        assert!(
            (grad[k] - fd).abs() <= 1e-6 * fd.abs().max(1e-3),
            "{name}: autograd {} vs finite difference {fd}",
            grad[k]
        );
    }
}

/// Weights of the PyG parity fixture, under matscale's (= PyG's) names.
fn parity_weights() -> HashMap<String, Tensor> {
    let path = format!("{FIXTURES}/parity_weights.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{path}: {e}"))
}

struct ParityCase {
    structure: Structure,
    energy: f64,
    forces: Vec<f64>,
    stress: Vec<f64>,
}

fn parity_fixture() -> (SchNetConfig, Vec<ParityCase>) {
    let fixture = read_json("parity.json");
    let config = SchNetConfig {
        hidden_channels: usize_of(&fixture, "hidden_channels"),
        num_filters: usize_of(&fixture, "num_filters"),
        num_interactions: usize_of(&fixture, "num_interactions"),
        num_gaussians: usize_of(&fixture, "num_gaussians"),
        cutoff: fixture["cutoff"].as_f64().unwrap(),
        ..SchNetConfig::default()
    };
    let floats = |v: &Value| -> Vec<f64> {
        let mut out = Vec::new();
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                Value::Array(items) => stack.extend(items.iter().rev()),
                other => out.push(other.as_f64().expect("a number")),
            }
        }
        out
    };
    let triples =
        |v: &Value| -> Vec<[f64; 3]> { floats(v).chunks(3).map(|c| [c[0], c[1], c[2]]).collect() };
    let cases = fixture["structures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let numbers = floats(&s["numbers"]).iter().map(|&z| z as u8).collect();
            let cell = triples(&s["cell"]);
            let cell: Mat3 = [cell[0], cell[1], cell[2]];
            ParityCase {
                structure: Structure::new(numbers, triples(&s["positions"]), cell, [true; 3])
                    .unwrap(),
                energy: s["energy"].as_f64().unwrap(),
                forces: floats(&s["forces"]),
                stress: floats(&s["stress"]),
            }
        })
        .collect();
    (config, cases)
}

/// A conservative SchNet with the PyG fixture's weights in `weights` precision and a zero
/// normaliser in `master` precision.
fn parity_model(config: &SchNetConfig, weights: DType, master: DType) -> (VarMap, AtomisticModel) {
    let normalizer = VarMap::new();
    let model = AtomisticModel::new(
        &spec(config.clone(), ForceMode::Conservative),
        VarBuilder::from_tensors(parity_weights(), weights, &Device::Cpu),
        VarBuilder::from_varmap(&normalizer, master, &Device::Cpu),
    )
    .expect("the fixture's weights fit the configuration");
    (normalizer, model)
}

#[test]
fn reproduces_pytorch_geometric_schnet() {
    let (config, cases) = parity_fixture();
    assert_eq!(cases.len(), 3);
    let structures: Vec<Structure> = cases.iter().map(|c| c.structure.clone()).collect();
    // The fixture's edges are ASE's at the same cutoff; check the count matches ours.
    let batch = GraphBatch::new(&structures, &GraphOptions::new(config.cutoff)).unwrap();
    let fixture = read_json("parity.json");
    let edges: Vec<usize> = fixture["structures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| usize_of(s, "n_edges"))
        .collect();
    let ours: Vec<usize> = batch.edge_ptr.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(ours, edges);
    let force_scale = cases.iter().map(|c| max_abs(&c.forces)).fold(0.0, f64::max);
    assert!(force_scale > 0.01);
    for (dtype, tolerance) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let (_normalizer, model) = parity_model(&config, dtype, dtype);
        let p = predict(&model, &structures, config.cutoff);
        for (k, case) in cases.iter().enumerate() {
            let e = p.energy[k];
            assert!(
                (e - case.energy).abs() <= tolerance * case.energy.abs(),
                "{dtype:?} structure {k}: energy {e} vs PyG {}",
                case.energy
            );
            // Forces relative to the largest force of the fixture (the one-atom cell has zero
            // forces by symmetry).
            let err = max_abs_diff(&flat_forces(&p.forces[k]), &case.forces) / force_scale;
            assert!(
                err <= tolerance,
                "{dtype:?} structure {k}: forces off by {err}"
            );
            let err = relative(&flat_mat(&p.stress[k]), &case.stress);
            assert!(
                err <= tolerance,
                "{dtype:?} structure {k}: stress off by {err}"
            );
        }
    }
}

#[test]
fn bf16_weights_run_close_to_f32() {
    let (config, cases) = parity_fixture();
    let structures: Vec<Structure> = cases.iter().map(|c| c.structure.clone()).collect();
    let (_n32, f32_model) = parity_model(&config, DType::F32, DType::F32);
    let reference = predict(&f32_model, &structures, config.cutoff);
    for weights in [DType::BF16, DType::F16] {
        let (_n, model) = parity_model(&config, weights, DType::F32);
        let p = predict(&model, &structures, config.cutoff);
        for (k, (a, b)) in p.energy.iter().zip(&reference.energy).enumerate() {
            assert!(a.is_finite());
            assert!(
                (a - b).abs() <= 0.05 * b.abs().max(0.1),
                "{weights:?} {k}: {a} vs {b}"
            );
            let forces = flat_forces(&p.forces[k]);
            assert!(forces.iter().all(|f| f.is_finite()));
            let err = max_abs_diff(&forces, &flat_forces(&reference.forces[k]));
            assert!(err <= 0.05 * max_abs(&flat_forces(&reference.forces[k])).max(0.1));
        }
    }
    // Random bf16 weights in direct mode run as well.
    let (_net, _master, model) = build_mixed(&spec(small(), ForceMode::Direct), DType::BF16);
    let p = predict(&model, &random_structures(2, 8), 4.0);
    assert!(p.energy.iter().all(|e| e.is_finite()));
    assert!(p.forces.iter().flatten().flatten().all(|f| f.is_finite()));
    assert!(p.stress.iter().flatten().flatten().all(|s| s.is_finite()));
}

#[test]
fn unknown_elements_are_rejected() {
    let config = SchNetConfig {
        max_atomic_number: 20,
        ..small()
    };
    let (_vars, model) = build(&spec(config, ForceMode::Conservative), DType::F64);
    let s = random_structures(1, 3); // holds Cu, Ni or Al (Z > 20) or O
    let s: Vec<Structure> = s
        .iter()
        .map(|s| {
            let mut numbers = s.numbers().to_vec();
            numbers[0] = 29;
            Structure::new(numbers, s.positions().to_vec(), *s.cell(), s.pbc()).unwrap()
        })
        .collect();
    let batch = GraphBatch::new(&s, &GraphOptions::new(4.0)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let err = model.predict(&tensors, false).unwrap_err();
    assert!(
        matches!(err, ModelError::UnknownElement { number: 29, .. }),
        "{err}"
    );
}

#[test]
fn flop_counts_follow_the_architecture() {
    let c = small();
    let (h, f, g, t) = (
        c.hidden_channels as f64,
        c.num_filters as f64,
        c.num_gaussians as f64,
        c.num_interactions as f64,
    );
    let shape = |n: usize, e: usize| BatchShape {
        n_structures: 2,
        n_nodes: n,
        n_edges: e,
        sum_sq_nodes: n * n / 2,
        max_nodes: n / 2,
    };
    for mode in [ForceMode::Conservative, ForceMode::Direct] {
        let (_vars, model) = build(&spec(c.clone(), mode), DType::F32);
        let flops = |n, e| model.flops(&shape(n, e));
        // Matmuls: 2 × rows × (weights of the layers applied to those rows).
        let (n, e) = (10usize, 300usize);
        let (nf, ef) = (n as f64, e as f64);
        let mut matmul = 2.0 * (ef * t * (g * f + f * f) + nf * t * (h * f + f * h + h * h))
            + 2.0 * nf * (h * (h / 2.0).floor() + (h / 2.0).floor());
        if mode == ForceMode::Direct {
            matmul += 2.0 * (nf * h * h + ef * (g * h + 2.0 * h));
        }
        let counted = flops(n, e);
        assert_eq!(counted.forward.matmul, matmul, "{mode}");
        assert_eq!(counted.backward.matmul, 2.0 * matmul, "{mode}");
        // Every kind of work is linear in the number of edges at a fixed number of atoms.
        let total = |e| flops(n, e).forward.total();
        let (a, b, c3) = (total(100), total(200), total(300));
        assert!(((b - a) - (c3 - b)).abs() <= 1e-9 * c3, "{mode}");
        assert!(b > a);
        assert!(counted.forward.gather_scatter > 0.0 && counted.forward.elementwise > 0.0);
        assert_eq!(counted.conservative, mode == ForceMode::Conservative);
        // Costing without weights (sweeps) gives the same counts, even for a 10⁸ model.
        assert_eq!(
            spec(c.clone(), mode).flops(&shape(n, e)).unwrap(),
            counted,
            "{mode}"
        );
        let huge = SchNetConfig::for_parameters(100_000_000, mode).unwrap();
        let huge = spec(huge, mode).flops(&shape(n, e)).unwrap();
        assert!(huge.forward.matmul > 1e4 * counted.forward.matmul);
        // No work grows faster than linearly in atoms and edges: two halves cost the whole.
        let half = flops(n / 2, e / 2).forward.total();
        assert!((2.0 * half - counted.forward.total()).abs() <= 1e-9 * counted.forward.total());
    }
}

/// An atom without neighbours (no edges at all in the batch) gets the readout of its
/// embedding, zero force and zero stress, in both modes.
#[test]
fn structures_without_edges_are_handled() {
    let s = Structure::new(
        vec![13],
        vec![[1.0, 2.0, 3.0]],
        [[20.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, 20.0]],
        [true; 3],
    )
    .unwrap();
    for mode in [ForceMode::Conservative, ForceMode::Direct] {
        let (_vars, model) = build(&spec(small(), mode), DType::F64);
        let p = predict(&model, std::slice::from_ref(&s), 4.0);
        assert!(p.energy[0].is_finite() && p.energy[0] != 0.0, "{mode}");
        assert_eq!(max_abs(&flat_forces(&p.forces[0])), 0.0, "{mode}");
        assert_eq!(max_abs(&flat_mat(&p.stress[0])), 0.0, "{mode}");
    }
}

#[test]
fn mean_readout_divides_the_sum_by_the_atom_count() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let sum = AtomisticModel::new(
        &spec(small(), ForceMode::Conservative),
        vb.clone(),
        vb.clone(),
    )
    .unwrap();
    // Built from the same variables: the same weights.
    let mean_config = SchNetConfig {
        readout: Readout::Mean,
        ..small()
    };
    let mean =
        AtomisticModel::new(&spec(mean_config, ForceMode::Conservative), vb.clone(), vb).unwrap();
    let structures = random_structures(3, 17);
    let (a, b) = (
        predict(&sum, &structures, 4.0),
        predict(&mean, &structures, 4.0),
    );
    for (k, s) in structures.iter().enumerate() {
        let want = a.energy[k] / s.len() as f64;
        assert!((b.energy[k] - want).abs() <= 1e-12 * want.abs().max(1.0));
    }
}
