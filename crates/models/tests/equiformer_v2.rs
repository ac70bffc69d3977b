//! EquiformerV2: analytic parameter counts against fairchem's (OMat24 eqV2-S and the scaling
//! study's 20 sizes), built counts against analytic ones, a forward pass on periodic
//! structures, rotation invariance / equivariance to the level the S2 grid allows, config
//! validation and FLOP-count sanity.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use matscale_models::equiformer_v2::{EquiformerV2, EquiformerV2Config, FrameRoll};
use matscale_models::{
    seeded_var_builder, BatchShape, BatchTensors, ForceMode, Geometry, Model, ModelError,
};
use matscale_structures::batch::{GraphBatch, GraphOptions};
use matscale_structures::{Mat3, Structure};
use serde_json::Value;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/equiformer_v2"
);

/// A small EquiformerV2 (the real `lmax 4, mmax 2` layout, few channels, 5 Å cutoff).
fn small(grid_resolution: usize) -> EquiformerV2Config {
    EquiformerV2Config {
        num_layers: 2,
        sphere_channels: 6,
        attn_hidden_channels: 5,
        num_heads: 2,
        attn_alpha_channels: 3,
        attn_value_channels: 4,
        ffn_hidden_channels: 7,
        edge_channels: 4,
        grid_resolution,
        max_radius: 5.0,
        max_num_elements: 30,
        frame_roll: FrameRoll::Zero,
        ..EquiformerV2Config::default()
    }
}

fn build(config: &EquiformerV2Config, dtype: DType) -> (VarMap, EquiformerV2) {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 7, dtype, &Device::Cpu);
    let net = EquiformerV2::new(config, ForceMode::Direct, vb).expect("EquiformerV2 builds");
    (varmap, net)
}

/// Energies, forces and stresses (normalised network outputs) of `structures` as one batch.
fn run(
    net: &EquiformerV2,
    structures: &[Structure],
    cutoff: f64,
    dtype: DType,
) -> (Vec<f64>, Vec<[f64; 3]>, Vec<Mat3>) {
    let batch = GraphBatch::new(structures, &GraphOptions::new(cutoff)).expect("batch");
    let tensors = BatchTensors::new(&batch, dtype, &Device::Cpu).expect("tensors");
    let geometry = Geometry::of(&tensors).expect("geometry");
    let out = net.forward(&tensors, &geometry, false).expect("forward");
    let energy: Vec<f64> = out.energy.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let forces: Vec<Vec<f64>> = out
        .forces
        .expect("direct forces")
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let stress: Vec<Vec<Vec<f64>>> = out
        .stress
        .expect("direct stress")
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3()
        .unwrap();
    (
        energy,
        forces.iter().map(|f| [f[0], f[1], f[2]]).collect(),
        stress
            .iter()
            .map(|m| {
                [
                    [m[0][0], m[0][1], m[0][2]],
                    [m[1][0], m[1][1], m[1][2]],
                    [m[2][0], m[2][1], m[2][2]],
                ]
            })
            .collect(),
    )
}

fn n_built(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

fn relative(a: &[f64], b: &[f64]) -> f64 {
    let diff = max_abs_diff(a, b);
    diff / max_abs(b).max(1e-300)
}

#[test]
fn eqv2_s_parameter_counts_equal_fairchem() {
    // fairchem-core 1.x, OMat24 eqV2-S (eqV2_31M_omat): HydraModel with the EquiformerV2
    // backbone, EqV2ScalarHead, EqV2VectorHead and Rank2SymmetricTensorHead.
    let config = EquiformerV2Config::default();
    config.check().unwrap();
    let p = config.parameter_breakdown();
    assert_eq!(p.backbone(), 27_795_584);
    assert_eq!(p.energy_head, 148_353);
    assert_eq!(p.force(), 3_130_881);
    assert_eq!(p.stress_head, 132_616);
    assert_eq!(config.n_parameters(ForceMode::Direct), 31_207_434);
    assert_eq!(
        config.n_parameters(ForceMode::Conservative),
        27_795_584 + 148_353
    );
}

#[test]
fn study_sizes_equal_the_study_counts() {
    // Trikha et al.'s 20 EquiformerV2 sizes (count excluding every parameter whose name
    // contains "embedding"): layers / sphere = edge channels / ffn hidden / attn hidden =
    // alpha channels / heads / value channels; lmax 4, mmax 2, 96 elements.
    let grid: [(usize, [usize; 6]); 20] = [
        (1_926, [1, 1, 1, 1, 1, 1]),
        (3_643, [2, 1, 1, 2, 1, 1]),
        (9_548, [2, 2, 2, 4, 1, 1]),
        (14_175, [2, 3, 3, 4, 1, 1]),
        (23_165, [2, 3, 3, 8, 1, 2]),
        (30_872, [3, 3, 3, 8, 1, 2]),
        (40_104, [3, 4, 4, 8, 1, 2]),
        (62_065, [4, 5, 5, 8, 1, 2]),
        (125_040, [4, 10, 6, 8, 1, 2]),
        (175_710, [4, 12, 8, 10, 1, 2]),
        (204_250, [4, 12, 10, 12, 1, 3]),
        (278_492, [4, 16, 12, 12, 1, 3]),
        (348_882, [4, 16, 16, 16, 1, 4]),
        (472_154, [4, 18, 18, 20, 1, 5]),
        (831_514, [4, 24, 24, 24, 2, 6]),
        (2_146_582, [5, 36, 36, 32, 3, 8]),
        (3_624_602, [6, 48, 48, 32, 4, 8]),
        (5_242_826, [6, 64, 64, 32, 5, 8]),
        (6_294_242, [6, 72, 72, 32, 6, 8]),
        (10_970_586, [6, 96, 96, 40, 7, 10]),
    ];
    for (count, [layers, sphere, ffn, attn, heads, value]) in grid {
        let config = EquiformerV2Config {
            num_layers: layers,
            sphere_channels: sphere,
            edge_channels: sphere,
            ffn_hidden_channels: ffn,
            attn_hidden_channels: attn,
            attn_alpha_channels: attn,
            num_heads: heads,
            attn_value_channels: value,
            ..EquiformerV2Config::default()
        };
        config.check().unwrap();
        let p = config.parameter_breakdown();
        assert_eq!(p.study_count(ForceMode::Direct), count, "{config:?}");
        assert!(p.total(ForceMode::Direct) > count);
    }
}

#[test]
fn built_count_equals_analytic_count() {
    let configs = [
        small(18),
        EquiformerV2Config {
            lmax_list: vec![3],
            mmax_list: vec![3],
            norm_type: "rms_norm_sh".into(),
            use_attn_renorm: false,
            num_layers: 1,
            ..small(0)
        },
        EquiformerV2Config {
            lmax_list: vec![2],
            mmax_list: vec![1],
            norm_type: "layer_norm".into(),
            weight_init: "normal".into(),
            ..small(12)
        },
    ];
    for config in configs {
        let (varmap, _net) = build(&config, DType::F32);
        assert_eq!(
            n_built(&varmap),
            config.n_parameters(ForceMode::Direct),
            "{config:?}"
        );
    }
}

#[test]
fn parameter_names_follow_fairchem() {
    let (varmap, _net) = build(&small(18), DType::F32);
    let data = varmap.data().lock().unwrap();
    for name in [
        "backbone.sphere_embedding.weight",
        "backbone.edge_degree_embedding.source_embedding.weight",
        "backbone.edge_degree_embedding.rad_func.net.0.weight",
        "backbone.blocks.1.norm_1.norm_l0.weight",
        "backbone.blocks.1.norm_1.affine_weight",
        "backbone.blocks.0.ga.so2_conv_1.fc_m0.weight",
        "backbone.blocks.0.ga.so2_conv_1.so2_m_conv.1.fc.weight",
        "backbone.blocks.0.ga.so2_conv_1.rad_func.net.6.bias",
        "backbone.blocks.0.ga.alpha_dot",
        "backbone.blocks.0.ga.proj.weight",
        "backbone.blocks.0.ffn.grid_mlp.4.weight",
        "backbone.blocks.0.ffn.scalar_mlp.0.bias",
        "backbone.norm.affine_weight",
        "output_heads.energy.energy_block.so3_linear_2.weight",
        "output_heads.forces.force_block.so2_conv_2.fc_m0.bias",
        "output_heads.stress.block.irrep2_MLP.2.weight",
        "output_heads.stress.sphharm_norm.affine_weight",
    ] {
        assert!(data.contains_key(name), "missing {name}");
    }
    // fairchem's SO(2) `m > 0` weights have no bias and the grid MLP is bias-free.
    assert!(!data.contains_key("backbone.blocks.0.ga.so2_conv_1.so2_m_conv.0.fc.bias"));
    assert!(!data.contains_key("backbone.blocks.0.ffn.grid_mlp.0.bias"));
}

#[test]
fn forward_runs_on_a_periodic_batch() {
    let config = small(18);
    let (_varmap, net) = build(&config, DType::F32);
    let structures = random_structures(2, 11);
    let (energy, forces, stress) = run(&net, &structures, config.max_radius, DType::F32);
    let atoms: usize = structures.iter().map(|s| s.len()).sum();
    assert_eq!(energy.len(), 2);
    assert_eq!(forces.len(), atoms);
    assert_eq!(stress.len(), 2);
    assert!(energy.iter().all(|e| e.is_finite()));
    assert!(flat_forces(&forces).iter().all(|f| f.is_finite()));
    for s in &stress {
        for i in 0..3 {
            for j in 0..3 {
                assert!(s[i][j].is_finite());
                assert!((s[i][j] - s[j][i]).abs() <= 1e-6 * max_abs(&flat_mat(s)));
            }
        }
    }
    // The outputs depend on the input (no constant network).
    assert!(max_abs(&flat_forces(&forces)) > 0.0);
    assert!((energy[0] - energy[1]).abs() > 0.0);
}

/// Worst relative errors under `rotations` random rotations: energy, forces, the trace of
/// the stress (isotropic part) and the whole stress (against `R σ Rᵀ`).
fn rotation_errors(config: &EquiformerV2Config, rotations: u64) -> [f64; 4] {
    let (_varmap, net) = build(config, DType::F64);
    let structures = random_structures(2, 5);
    let (e0, f0, s0) = run(&net, &structures, config.max_radius, DType::F64);
    let trace =
        |s: &[Mat3]| -> Vec<f64> { s.iter().map(|m| m[0][0] + m[1][1] + m[2][2]).collect() };
    let mut worst = [0.0f64; 4];
    for seed in 0..rotations {
        let r = random_rotation(100 + seed);
        let rotated: Vec<Structure> = structures.iter().map(|s| rotate(s, &r)).collect();
        let (e1, f1, s1) = run(&net, &rotated, config.max_radius, DType::F64);
        let f_expected: Vec<[f64; 3]> = f0.iter().map(|f| apply(&r, f)).collect();
        let s_expected: Vec<f64> = s0
            .iter()
            .flat_map(|s| flat_mat(&rotate_tensor(&r, s)))
            .collect();
        let s_found: Vec<f64> = s1.iter().flat_map(flat_mat).collect();
        worst[0] = worst[0].max(relative(&e1, &e0));
        worst[1] = worst[1].max(relative(&flat_forces(&f1), &flat_forces(&f_expected)));
        worst[2] = worst[2].max(relative(&trace(&s1), &trace(&s0)));
        worst[3] = worst[3].max(relative(&s_found, &s_expected));
    }
    worst
}

#[test]
fn energy_invariant_and_forces_equivariant_to_grid_level() {
    // The only non-equivariant ops of the backbone are the S2 activations (SiLU on a finite
    // grid), so errors shrink with the grid resolution; see the printed figures (f64).
    let coarse = rotation_errors(&small(18), 2);
    let fine = rotation_errors(&small(36), 2);
    println!("relative rotation errors [energy, forces, stress trace, stress]: grid 18 {coarse:?}, grid 36 {fine:?}");
    let names = ["energy", "forces", "stress trace"];
    for (k, what) in names.iter().enumerate() {
        assert!(
            coarse[k] < 5e-3,
            "{what}: relative rotation error {:e} at grid 18",
            coarse[k]
        );
        assert!(
            fine[k] < coarse[k] / 5.0,
            "{what}: grid 36 error {:e} not well below grid 18 error {:e}",
            fine[k],
            coarse[k]
        );
    }
}

#[test]
fn anisotropic_stress_is_not_equivariant_as_in_fairchem() {
    // fairchem's Rank2DecompositionEdgeBlock applies Linear + SiLU to each of the five l = 2
    // components separately (`irrep2_MLP`), which breaks equivariance of the anisotropic
    // stress whatever the grid; the port keeps that for parity. A finer grid does not help.
    let coarse = rotation_errors(&small(18), 2);
    let fine = rotation_errors(&small(36), 2);
    assert!(coarse[3] > 1e-2, "stress error {:e}", coarse[3]);
    assert!(fine[3] > 1e-2, "stress error {:e}", fine[3]);
}

#[test]
fn gradients_reach_every_weight() {
    // A direct-mode training step differentiates energy, forces and stress with respect to
    // every weight (first order through the equivariant kernels).
    let config = EquiformerV2Config {
        alpha_drop: 0.0,
        drop_path_rate: 0.0,
        ..small(18)
    };
    let (varmap, net) = build(&config, DType::F64);
    let structures = random_structures(2, 9);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(config.max_radius)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let geometry = Geometry::of(&tensors).unwrap();
    let out = net.forward(&tensors, &geometry, true).unwrap();
    let loss = (out.energy.sqr().unwrap().sum_all().unwrap()
        + out.forces.unwrap().sqr().unwrap().sum_all().unwrap()
        + out.stress.unwrap().sqr().unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    // Parameters fairchem's architecture leaves without any influence on the outputs: the
    // energy head reads the l = 0 row of its FFN, which the separable activation replaces by
    // the gating scalars (so its so3_linear_1 and grid MLP are dead); the force head reads
    // l = 1 only (so the l = 0 bias and the m = 2 weights of its last convolution are dead);
    // the stress head's layer_norm_sh has one channel, so its l = 0 LayerNorm output is 0.
    let dead = [
        "output_heads.energy.energy_block.so3_linear_1.weight",
        "output_heads.energy.energy_block.so3_linear_1.bias",
        "output_heads.energy.energy_block.grid_mlp.0.weight",
        "output_heads.energy.energy_block.grid_mlp.2.weight",
        "output_heads.energy.energy_block.grid_mlp.4.weight",
        "output_heads.forces.force_block.proj.bias",
        "output_heads.forces.force_block.so2_conv_2.so2_m_conv.1.fc.weight",
        "output_heads.stress.sphharm_norm.norm_l0.weight",
    ];
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let v: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        let signal = v.iter().any(|x| *x != 0.0);
        assert_eq!(signal, !dead.contains(&name.as_str()), "{name}");
    }
}

#[test]
fn f32_agrees_with_f64() {
    let config = small(18);
    let structures = random_structures(1, 3);
    let (_v32, net32) = build(&config, DType::F32);
    let (_v64, net64) = build(&config, DType::F64);
    let (e32, f32_, _) = run(&net32, &structures, config.max_radius, DType::F32);
    let (e64, f64_, _) = run(&net64, &structures, config.max_radius, DType::F64);
    assert!(relative(&e32, &e64) < 1e-4, "{e32:?} vs {e64:?}");
    assert!(relative(&flat_forces(&f32_), &flat_forces(&f64_)) < 1e-3);
}

#[test]
fn check_names_the_field() {
    let field_of = |c: EquiformerV2Config| match c.check() {
        Err(ModelError::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    let base = EquiformerV2Config::default();
    assert_eq!(
        field_of(EquiformerV2Config {
            mmax_list: vec![5],
            ..base.clone()
        }),
        "equiformer_v2.mmax_list"
    );
    assert_eq!(
        field_of(EquiformerV2Config {
            lmax_list: vec![4, 6],
            mmax_list: vec![2, 2],
            ..base.clone()
        }),
        "equiformer_v2.lmax_list"
    );
    assert_eq!(
        field_of(EquiformerV2Config {
            norm_type: "batch_norm".into(),
            ..base.clone()
        }),
        "equiformer_v2.norm_type"
    );
    assert_eq!(
        field_of(EquiformerV2Config {
            use_gate_act: true,
            ..base.clone()
        }),
        "equiformer_v2.use_gate_act"
    );
    assert_eq!(
        field_of(EquiformerV2Config {
            alpha_drop: 1.5,
            ..base.clone()
        }),
        "equiformer_v2.alpha_drop"
    );
}

/// The small model in conservative mode (energy only; forces and stress by autograd).
fn conservative(config: &EquiformerV2Config) -> matscale_models::AtomisticModel {
    let spec = matscale_models::ModelSpec {
        model: matscale_models::ModelConfig::EquiformerV2(config.clone()),
        force_mode: ForceMode::Conservative,
    };
    common::build(&spec, DType::F64).1
}

#[test]
fn conservative_forces_and_stress_are_gradients_of_the_energy() {
    // The frames are differentiable functions of the edge vectors (frames_diff), so −∂E/∂r
    // includes the angular paths through them. The energy is a smooth function of the
    // positions at any grid resolution (the grid limits equivariance, not smoothness), but it
    // curves on the 0.017 Å scale of the 600 Gaussians over 5 Å, so a central difference is
    // off by O(h²) with a large constant (measured on forces: 1.2e-2, 1.2e-4, 1.2e-6 relative
    // at h = 1e-4, 1e-5, 1e-6 Å). Richardson extrapolation of h = 2e-6 and 1e-6 cancels the
    // h² term; what remains is round-off.
    let config = EquiformerV2Config {
        num_layers: 1,
        ..small(18)
    };
    let model = conservative(&config);
    let mut structure = random_structures(3, 13)
        .into_iter()
        .min_by_key(|s| s.len())
        .unwrap();
    // One edge exactly along +y (the second frame chart, common in crystals): atom 1 sits
    // 2.1 Å above atom 0.
    let mut positions = structure.positions().to_vec();
    positions[1] = [positions[0][0], positions[0][1] + 2.1, positions[0][2]];
    structure.set_positions(positions).unwrap();
    let p = predict(&model, std::slice::from_ref(&structure), config.max_radius);
    let richardson = |coarse: Vec<f64>, fine: Vec<f64>| -> Vec<f64> {
        coarse
            .iter()
            .zip(&fine)
            .map(|(c, f)| (4.0 * f - c) / 3.0)
            .collect()
    };
    let (h, r) = (2e-6, config.max_radius);
    let fd = richardson(
        flat_forces(&fd_forces(&model, &structure, r, h)),
        flat_forces(&fd_forces(&model, &structure, r, h / 2.0)),
    );
    let forces = flat_forces(&p.forces[0]);
    let force_error = relative(&forces, &fd);
    let fd_s = richardson(
        flat_mat(&fd_stress(&model, &structure, r, h)),
        flat_mat(&fd_stress(&model, &structure, r, h / 2.0)),
    );
    let stress_error = relative(&flat_mat(&p.stress[0]), &fd_s);
    println!("conservative vs finite differences: forces {force_error:e}, stress {stress_error:e}");
    assert!(max_abs(&forces) > 1e-3, "forces are not trivially zero");
    assert!(force_error < 1e-7, "forces: relative error {force_error:e}");
    assert!(
        stress_error < 1e-7,
        "stress: relative error {stress_error:e}"
    );
    // The energy depends on differences of positions only: the forces sum to zero.
    let sum: Vec<f64> = (0..3)
        .map(|c| p.forces[0].iter().map(|f| f[c]).sum())
        .collect();
    assert!(
        max_abs(&sum) < 1e-9 * max_abs(&forces).max(1.0),
        "net force {sum:?}"
    );
}

#[test]
fn conservative_and_direct_modes_compute_the_same_energy() {
    // Same weights (one VarMap; conservative mode builds a subset of the direct mode's
    // variables). The conservative frames equal the zero-roll frames except for edges within
    // 45° of ±y, which get another roll about the edge; at grid 36 the network is roll-blind
    // to ~1e-12, so the energies agree to that level: the matmul rotations compute the same
    // network as the fused kernels.
    let config = EquiformerV2Config {
        num_layers: 1,
        ..small(36)
    };
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 7, DType::F64, &Device::Cpu);
    let direct = EquiformerV2::new(&config, ForceMode::Direct, vb.clone()).unwrap();
    let conservative = EquiformerV2::new(&config, ForceMode::Conservative, vb).unwrap();
    let structures = random_structures(2, 17);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(config.max_radius)).unwrap();
    let second_chart = batch
        .edge_vectors
        .chunks(3)
        .filter(|v| v[1] * v[1] > 0.5 * (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]))
        .count();
    assert!(second_chart > 0 && second_chart < batch.n_edges());
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let geometry = Geometry::of(&tensors).unwrap();
    let energy = |net: &EquiformerV2| -> Vec<f64> {
        net.forward(&tensors, &geometry, false)
            .unwrap()
            .energy
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (energy(&direct), energy(&conservative));
    let err = relative(&b, &a);
    assert!(err < 1e-9, "{a:?} vs {b:?}: {err:e}");
}

#[test]
fn conservative_mode_builds_without_direct_heads_and_refuses_training_and_helpers() {
    let config = small(18);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F64, &Device::Cpu);
    let net = EquiformerV2::new(&config, ForceMode::Conservative, vb).unwrap();
    assert_eq!(
        n_built(&varmap),
        config.n_parameters(ForceMode::Conservative)
    );
    let structures = random_structures(1, 3);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(config.max_radius)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let geometry = Geometry::of(&tensors).unwrap();
    let out = net.forward(&tensors, &geometry, false).unwrap();
    assert!(out.forces.is_none() && out.stress.is_none());
    // Training needs second derivatives: without enable_higher_order_gradients (this test
    // process never calls it) it is refused, not silently wrong.
    match net.forward(&tensors, &geometry, true) {
        Err(ModelError::Config { field, .. }) => assert_eq!(field, "force_mode"),
        other => panic!("expected a force_mode error, got {other:?}"),
    }
    let helpers = Tensor::zeros((batch.n_edges(), 3), DType::F64, &Device::Cpu).unwrap();
    match net.forward_with_frame_helpers(&tensors, &geometry, &helpers) {
        Err(ModelError::Config { field, .. }) => assert_eq!(field, "force_mode"),
        other => panic!("expected a force_mode error, got {other:?}"),
    }
}

#[test]
fn config_reads_from_toml_and_rejects_unknown_fields() {
    let config: EquiformerV2Config =
        toml::from_str("num_layers = 3\nlmax_list = [6]\nmmax_list = [4]\nframe_roll = \"zero\"\n")
            .unwrap();
    assert_eq!(config.num_layers, 3);
    assert_eq!(config.lmax(), 6);
    assert_eq!(config.frame_roll, FrameRoll::Zero);
    assert_eq!(config.sphere_channels, 128);
    assert!(toml::from_str::<EquiformerV2Config>("num_layer = 3\n").is_err());
}

#[test]
fn flops_are_affine_in_edges_and_nodes() {
    let config = small(18);
    let (_varmap, net) = build(&config, DType::F32);
    let total = |n: usize, e: usize| {
        let mut counter = matscale_models::FlopCounter::new();
        let shape = BatchShape {
            n_structures: 1,
            n_nodes: n,
            n_edges: e,
            sum_sq_nodes: n * n,
            max_nodes: n,
        };
        net.count_flops(&shape, &mut counter);
        counter.forward().matmul + counter.forward().elementwise + counter.forward().gather_scatter
    };
    let (a, b, c) = (total(10, 100), total(10, 200), total(10, 300));
    assert!(((c - b) - (b - a)).abs() <= 1e-9 * c);
    assert!(b > a);
    let (a, b, c) = (total(10, 100), total(20, 100), total(30, 100));
    assert!(((c - b) - (b - a)).abs() <= 1e-9 * c);
    assert!(b > a);
    // Sweeps cost models without allocating weights: eqV2-S builds on the shape-only backend.
    let big = EquiformerV2Config::eqv2_s()
        .build(ForceMode::Direct, matscale_models::shape_only_var_builder())
        .unwrap();
    let mut counter = matscale_models::FlopCounter::new();
    big.count_flops(&BatchShape::single(32, 20), &mut counter);
    let forward = counter.forward();
    // At least the per-node matmuls of the weights: 2 FLOPs per weight of the node-wise
    // layers (SO3_LinearV2 weights act on 2l+1 rows each, so this is a loose lower bound).
    assert!(
        forward.matmul
            > 2.0 * 32.0 * EquiformerV2Config::eqv2_s().parameter_breakdown().block_ffn as f64
    );
}

fn numbers(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(numbers).collect(),
        other => vec![other.as_f64().expect("a number")],
    }
}

/// The fixture's model, structures, edge helpers (in the order of our graph) and outputs.
struct Parity {
    config: EquiformerV2Config,
    structures: Vec<Structure>,
    fixture: Value,
}

fn parity() -> Parity {
    let text = std::fs::read_to_string(format!("{FIXTURES}/parity.json")).expect("parity.json");
    let fixture: Value = serde_json::from_str(&text).expect("valid JSON");
    let c = &fixture["config"];
    let int = |k: &str| c[k].as_u64().expect("integer field") as usize;
    let config = EquiformerV2Config {
        num_layers: int("num_layers"),
        sphere_channels: int("sphere_channels"),
        attn_hidden_channels: int("attn_hidden_channels"),
        num_heads: int("num_heads"),
        attn_alpha_channels: int("attn_alpha_channels"),
        attn_value_channels: int("attn_value_channels"),
        ffn_hidden_channels: int("ffn_hidden_channels"),
        edge_channels: int("edge_channels"),
        norm_type: c["norm_type"].as_str().unwrap().into(),
        lmax_list: vec![c["lmax_list"][0].as_u64().unwrap() as usize],
        mmax_list: vec![c["mmax_list"][0].as_u64().unwrap() as usize],
        grid_resolution: int("grid_resolution"),
        max_radius: c["max_radius"].as_f64().unwrap(),
        max_num_elements: int("max_num_elements"),
        avg_num_nodes: c["avg_num_nodes"].as_f64().unwrap(),
        avg_degree: c["avg_degree"].as_f64().unwrap(),
        ..EquiformerV2Config::default()
    };
    let structures = fixture["structures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let z: Vec<u8> = s["numbers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            let p = numbers(&s["positions"]);
            let c = numbers(&s["cell"]);
            let positions = p.chunks(3).map(|r| [r[0], r[1], r[2]]).collect();
            let cell = [[c[0], c[1], c[2]], [c[3], c[4], c[5]], [c[6], c[7], c[8]]];
            Structure::new(z, positions, cell, [true; 3]).unwrap()
        })
        .collect();
    Parity {
        config,
        structures,
        fixture,
    }
}

fn parity_case(dtype: DType) -> (Vec<f64>, Vec<f64>, Vec<f64>, Parity) {
    let p = parity();
    let weights = candle_core::safetensors::load(
        format!("{FIXTURES}/parity_weights.safetensors"),
        &Device::Cpu,
    )
    .expect("weights");
    let n_file: usize = weights.values().map(|t| t.elem_count()).sum();
    assert_eq!(n_file, p.config.n_parameters(ForceMode::Direct));
    assert_eq!(
        p.fixture["n_parameters"].as_u64().unwrap() as usize,
        p.config.n_parameters(ForceMode::Direct)
    );
    let weights: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
        .collect();
    let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    let net = EquiformerV2::new(&p.config, ForceMode::Direct, vb).expect("loads fairchem weights");
    let batch = GraphBatch::new(&p.structures, &GraphOptions::new(p.config.max_radius)).unwrap();
    // fairchem's helper of each of our edges, found by (source, target, shift).
    let e = &p.fixture["edges"];
    let mut helper_of = HashMap::new();
    for k in 0..e["src"].as_array().unwrap().len() {
        let shift: Vec<i64> = e["shift"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let key = (
            e["src"][k].as_u64().unwrap(),
            e["dst"][k].as_u64().unwrap(),
            shift,
        );
        helper_of.insert(key, numbers(&e["helper"][k]));
    }
    assert_eq!(
        helper_of.len(),
        batch.n_edges(),
        "same edge set as fairchem"
    );
    let mut helpers: Vec<f64> = Vec::with_capacity(3 * batch.n_edges());
    for k in 0..batch.n_edges() {
        let shift: Vec<i64> = batch.edge_shifts[3 * k..3 * k + 3]
            .iter()
            .map(|&s| s as i64)
            .collect();
        let key = (batch.edge_src[k] as u64, batch.edge_dst[k] as u64, shift);
        helpers.extend(helper_of.get(&key).expect("edge in the fixture"));
    }
    let helpers = Tensor::from_vec(helpers, (batch.n_edges(), 3), &Device::Cpu).unwrap();
    let tensors = BatchTensors::new(&batch, dtype, &Device::Cpu).unwrap();
    let geometry = Geometry::of(&tensors).unwrap();
    let out = net
        .forward_with_frame_helpers(&tensors, &geometry, &helpers.to_dtype(dtype).unwrap())
        .expect("forward");
    let host = |t: Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    (
        host(out.energy),
        host(out.forces.unwrap()),
        host(out.stress.unwrap()),
        p,
    )
}

#[test]
fn reproduces_fairchem_outputs_in_f64() {
    let (energy, forces, stress, p) = parity_case(DType::F64);
    let f = &p.fixture;
    let errors = [
        relative(&energy, &numbers(&f["energy"])),
        relative(&forces, &numbers(&f["forces"])),
        relative(&stress, &numbers(&f["stress"])),
    ];
    println!("f64 relative errors vs fairchem [energy, forces, stress]: {errors:?}");
    for (what, err) in ["energy", "forces", "stress"].iter().zip(errors) {
        assert!(
            err < 1e-10,
            "{what}: relative error {err:e} against fairchem"
        );
    }
}

#[test]
fn reproduces_fairchem_outputs_in_f32_to_f32_round_off() {
    // An f32 evaluation differs from the f64 reference by f32 round-off, and the forces (small
    // sums of large per-edge terms that cancel) lose most: fairchem itself, run in f32 on the
    // same model and inputs (parity_f32.json, make_f32_reference.py), is 5.8e-7 (energy),
    // 1.4e-4 (forces) and 1.6e-6 (stress) from its own f64 outputs. So 1e-5 on forces is not
    // reachable in f32 by either implementation. Asserted: matscale's f32 is within 3× of
    // fairchem's own f32 error (floored at 1e-6) against the f64 reference (round-off of
    // either side varies by that much; measured 1.2e-6, 7.3e-5, 2.9e-6: the forces are 2×
    // better than fairchem's),
    // energy and stress are within 1e-5, and the two f32 runs agree to 3× fairchem's round-off.
    let (energy, forces, stress, p) = parity_case(DType::F32);
    let f = &p.fixture;
    let text = std::fs::read_to_string(format!("{FIXTURES}/parity_f32.json")).unwrap();
    let f32_ref: Value = serde_json::from_str(&text).unwrap();
    let names = ["energy", "forces", "stress"];
    let ours = [&energy, &forces, &stress];
    for (what, values) in names.iter().zip(ours) {
        let vs_f64 = relative(values, &numbers(&f[*what]));
        let vs_fairchem_f32 = relative(values, &numbers(&f32_ref[*what]));
        let fairchem_round_off = f32_ref["relative_error_f32_vs_f64"][*what]
            .as_f64()
            .unwrap();
        println!(
            "{what}: matscale f32 vs fairchem f64 {vs_f64:.2e}, vs fairchem f32 \
             {vs_fairchem_f32:.2e}; fairchem f32 vs f64 {fairchem_round_off:.2e}"
        );
        // Floored at 1e-6: below it, f32 rounding of either side is noise of a few ulps.
        let bound = 3.0 * fairchem_round_off.max(1e-6);
        assert!(
            vs_f64 <= bound,
            "{what}: {vs_f64:e} against f64, fairchem's own f32 error is {fairchem_round_off:e}"
        );
        assert!(
            vs_fairchem_f32 <= bound,
            "{what}: {vs_fairchem_f32:e} against fairchem f32"
        );
        if *what != "forces" {
            assert!(vs_f64 < 1e-5, "{what}: {vs_f64:e}");
        }
    }
}

#[test]
fn counts_by_component_equal_fairchem_built_models() {
    // parameter_counts.json: fairchem's own modules built and counted by name
    // (count_parameters.py) for eqV2-S/M/L and the study's 20 sizes.
    let text = std::fs::read_to_string(format!("{FIXTURES}/parameter_counts.json")).unwrap();
    let counts: Value = serde_json::from_str(&text).unwrap();
    let base = counts["base"].as_object().unwrap();
    let presets: HashMap<String, EquiformerV2Config> =
        EquiformerV2Config::presets().into_iter().collect();
    let models = counts["models"].as_object().unwrap();
    assert_eq!(models.len(), 23);
    for (name, m) in models {
        // The fairchem constructor arguments are our field names (deny_unknown_fields).
        let mut merged = base.clone();
        merged.extend(m["config"].as_object().unwrap().clone());
        let config: EquiformerV2Config = serde_json::from_value(Value::Object(merged)).unwrap();
        config.check().unwrap();
        // Equal to fairchem's constructor arguments except the one documented difference:
        // the energy sum is not divided by fairchem's avg_num_nodes (31.17), because
        // matscale's normaliser already scales energies per atom.
        let preset = &presets[name.as_str()];
        assert_eq!(preset.avg_num_nodes, 1.0, "preset {name}");
        assert_eq!(config.avg_num_nodes, 31.17, "fairchem {name}");
        assert_eq!(
            &EquiformerV2Config {
                avg_num_nodes: config.avg_num_nodes,
                ..preset.clone()
            },
            &config,
            "preset {name}"
        );
        let p = config.parameter_breakdown();
        let get = |k: &str| m[k].as_u64().unwrap() as usize;
        assert_eq!(p.total(ForceMode::Direct), get("total"), "{name}");
        assert_eq!(p.backbone(), get("backbone"), "{name}");
        assert_eq!(p.sphere_embedding, get("sphere_embedding"), "{name}");
        assert_eq!(
            p.edge_degree_atom_embeddings + p.edge_degree_radial,
            get("edge_degree_embedding"),
            "{name}"
        );
        assert_eq!(p.block(), get("block_0"), "{name}");
        assert_eq!(p.final_norm, get("final_norm"), "{name}");
        assert_eq!(p.energy_head, get("energy_head"), "{name}");
        assert_eq!(p.force(), get("force_head"), "{name}");
        assert_eq!(p.stress_head, get("stress_head"), "{name}");
        assert_eq!(
            p.study_count(ForceMode::Direct),
            get("study_count"),
            "{name}"
        );
    }
}

#[test]
fn ladder_lands_within_ten_percent() {
    for mode in [ForceMode::Direct, ForceMode::Conservative] {
        let mut target = 5_500.0f64;
        while target <= 1.0e8 {
            let config = EquiformerV2Config::for_parameters(target as usize, mode).unwrap();
            config.check().unwrap();
            let n = config.n_parameters(mode) as f64;
            assert!(
                (n / target - 1.0).abs() < 0.1,
                "{mode}: target {target}, got {n} ({config:?})"
            );
            target *= 1.7;
        }
    }
    // Larger targets give larger models, and the floor is an error naming the field.
    let a = EquiformerV2Config::for_parameters(100_000, ForceMode::Direct).unwrap();
    let b = EquiformerV2Config::for_parameters(1_000_000, ForceMode::Direct).unwrap();
    assert!(b.sphere_channels > a.sphere_channels);
    match EquiformerV2Config::for_parameters(100, ForceMode::Direct) {
        Err(ModelError::Config { field, .. }) => assert_eq!(field, "target"),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn built_ladder_points_have_the_analytic_count() {
    for target in [10_000, 100_000, 1_000_000] {
        let config = EquiformerV2Config::for_parameters(target, ForceMode::Direct).unwrap();
        let (varmap, _net) = build(&config, DType::F32);
        assert_eq!(n_built(&varmap), config.n_parameters(ForceMode::Direct));
    }
}

#[test]
fn structures_without_edges_give_finite_outputs() {
    // One atom alone in a 20 Å cube: no neighbour within 5 Å, so no edges at all.
    let lonely = Structure::new(
        vec![29],
        vec![[1.0, 2.0, 3.0]],
        [[20.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, 20.0]],
        [true; 3],
    )
    .unwrap();
    let config = small(18);
    let (_varmap, net) = build(&config, DType::F64);
    let (energy, forces, stress) = run(&net, &[lonely], config.max_radius, DType::F64);
    assert!(energy[0].is_finite());
    assert_eq!(forces, vec![[0.0; 3]]);
    assert!(flat_mat(&stress[0]).iter().all(|s| s.is_finite()));
}

#[test]
fn random_frame_rolls_are_reproducible_and_change_outputs_only_at_grid_level() {
    let config = EquiformerV2Config {
        frame_roll: FrameRoll::Random,
        frame_seed: 42,
        ..small(18)
    };
    let structures = random_structures(2, 21);
    let (_v1, net1) = build(&config, DType::F64);
    let (_v2, net2) = build(&config, DType::F64);
    let (a1, _, _) = run(&net1, &structures, config.max_radius, DType::F64);
    let (b1, _, _) = run(&net1, &structures, config.max_radius, DType::F64);
    let (a2, _, _) = run(&net2, &structures, config.max_radius, DType::F64);
    // Same seed and call count, same frames; the next call draws new rolls.
    assert_eq!(a1, a2);
    assert_ne!(a1, b1);
    assert!(relative(&b1, &a1) < 5e-3, "{a1:?} vs {b1:?}");
}

#[test]
fn training_mode_applies_dropout_and_drop_path() {
    let config = EquiformerV2Config {
        alpha_drop: 0.5,
        drop_path_rate: 0.5,
        ..small(18)
    };
    let (_varmap, net) = build(&config, DType::F64);
    let structures = random_structures(2, 4);
    let batch = GraphBatch::new(&structures, &GraphOptions::new(config.max_radius)).unwrap();
    let tensors = BatchTensors::new(&batch, DType::F64, &Device::Cpu).unwrap();
    let geometry = Geometry::of(&tensors).unwrap();
    let eval: Vec<f64> = net
        .forward(&tensors, &geometry, false)
        .unwrap()
        .energy
        .to_vec1()
        .unwrap();
    let again: Vec<f64> = net
        .forward(&tensors, &geometry, false)
        .unwrap()
        .energy
        .to_vec1()
        .unwrap();
    assert_eq!(eval, again, "evaluation is deterministic with zero roll");
    let mut differs = false;
    for _ in 0..4 {
        let train: Vec<f64> = net
            .forward(&tensors, &geometry, true)
            .unwrap()
            .energy
            .to_vec1()
            .unwrap();
        assert!(train.iter().all(|e| e.is_finite()));
        differs |= train != eval;
    }
    assert!(differs, "dropout and drop path change training outputs");
}

#[test]
fn bf16_and_f16_weights_compute_in_f32_and_train() {
    // Low-precision weights are the caller's variables (what the trainer's mixed precision
    // refreshes and reads gradients of); the network computes in f32 on their casts. With the
    // same seeded values rounded to 8 (bf16) or 11 (f16) significant bits, outputs stay close
    // to the f32 model's.
    let config = small(18);
    let structures = random_structures(2, 3);
    let (_v32, net32) = build(&config, DType::F32);
    let (e32, f32_, s32) = run(&net32, &structures, config.max_radius, DType::F32);
    for (dtype, tol) in [(DType::BF16, 5e-2), (DType::F16, 1e-2)] {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 7, dtype, &Device::Cpu);
        let net = EquiformerV2::new(&config, ForceMode::Direct, vb).unwrap();
        assert_eq!(n_built(&varmap), config.n_parameters(ForceMode::Direct));
        assert!(varmap.all_vars().iter().all(|v| v.dtype() == dtype));
        let (e, f, st) = run(&net, &structures, config.max_radius, DType::F32);
        let errors = [
            relative(&e, &e32),
            relative(&flat_forces(&f), &flat_forces(&f32_)),
            relative(
                &st.iter().flat_map(flat_mat).collect::<Vec<_>>(),
                &s32.iter().flat_map(flat_mat).collect::<Vec<_>>(),
            ),
        ];
        println!("{dtype:?} weights vs f32 [energy, forces, stress]: {errors:?}");
        for err in errors {
            assert!(err.is_finite() && err < tol, "{dtype:?}: {errors:?}");
        }
        assert!(errors[1] > 0.0, "the low-precision weights are used");
        // Gradients reach the low-precision variables.
        let batch = GraphBatch::new(&structures, &GraphOptions::new(config.max_radius)).unwrap();
        let tensors = BatchTensors::new(&batch, DType::F32, &Device::Cpu).unwrap();
        let geometry = Geometry::of(&tensors).unwrap();
        let out = net.forward(&tensors, &geometry, false).unwrap();
        let loss = (out.energy.sqr().unwrap().sum_all().unwrap()
            + out.forces.unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let embedding = &data["backbone.sphere_embedding.weight"];
        let g = grads.get(embedding.as_tensor()).expect("a gradient");
        assert_eq!(g.dtype(), dtype);
        let g: Vec<f32> = g
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|x| *x != 0.0));
    }
    // Other dtypes are refused, naming the field.
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::U32, &Device::Cpu);
    match EquiformerV2::new(&small(18), ForceMode::Direct, vb) {
        Err(ModelError::Config { field, .. }) => assert_eq!(field, "dtype"),
        other => panic!("expected a dtype error, got {other:?}"),
    }
}
