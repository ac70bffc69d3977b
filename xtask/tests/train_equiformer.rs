//! `cargo xtask train` and `cargo xtask eval` with EquiformerV2, as a user runs them: a size
//! on the ladder, a named preset, and a `[model]` section of a TOML file, each trained for a
//! few steps on a dozen EMT-labelled alloys.

use std::path::Path;
use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("xtask runs")
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn result_of(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap()
}

/// 12 EMT-labelled 4-atom alloys written with `xtask data gen`.
fn alloys(dir: &Path) -> String {
    let data = dir.join("alloys.extxyz");
    ok(&xtask(&[
        "data",
        "gen",
        "--n",
        "12",
        "--seed",
        "5",
        "--supercell",
        "1x1x1",
        "-o",
        data.to_str().unwrap(),
    ]));
    data.to_str().unwrap().to_string()
}

fn train(data: &str, model: &[&str], out: &Path) -> serde_json::Value {
    let mut args = vec!["train"];
    args.extend_from_slice(model);
    args.extend_from_slice(&[
        "--data",
        data,
        "--val-fraction",
        "0.25",
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&xtask(&args));
    let result = result_of(out);
    assert_eq!(result["family"], "equiformer_v2");
    assert_eq!(result["n_train"], 9);
    assert_eq!(result["epochs"], 2);
    assert!(result["best_val_loss"].as_f64().unwrap().is_finite());
    assert!(result["training_flops"].as_f64().unwrap() > 0.0);
    result
}

#[test]
fn size_ladder_model_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let data = alloys(dir.path());
    let run = dir.path().join("ladder");
    let result = train(&data, &["--model", "equiformer_v2", "--size", "4000"], &run);
    let n = result["n_parameters"].as_f64().unwrap();
    assert!((n / 4000.0 - 1.0).abs() < 0.1, "{n}");

    let out = dir.path().join("eval");
    let text = ok(&xtask(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(text.contains("energy MAE"), "{text}");
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["n_structures"], 12);
    for key in [
        "energy_mae_mev_per_atom",
        "force_mae_mev_per_angstrom",
        "stress_mae_mev_per_angstrom3",
    ] {
        assert!(eval[key].as_f64().unwrap().is_finite(), "{key}");
    }
}

#[test]
fn preset_and_toml_model_sections_train() {
    let dir = tempfile::tempdir().unwrap();
    let data = alloys(dir.path());
    // The study's smallest size (1,926 parameters by its count, which leaves out embeddings).
    let preset = train(
        &data,
        &["--model", "equiformer_v2", "--preset", "study-01"],
        &dir.path().join("preset"),
    );
    let study_01 = matscale_models_count("study-01");
    assert_eq!(preset["n_parameters"].as_u64().unwrap(), study_01);

    // An explicit configuration in a TOML [model] section (fairchem's field names).
    let config = dir.path().join("eqv2.toml");
    std::fs::write(
        &config,
        "force_mode = \"direct\"\n\n[model.config]\nfamily = \"equiformer_v2\"\nnum_layers = 1\n\
         sphere_channels = 4\nattn_hidden_channels = 4\nnum_heads = 1\nattn_alpha_channels = 4\n\
         attn_value_channels = 2\nffn_hidden_channels = 4\nedge_channels = 4\nlmax_list = [2]\n\
         mmax_list = [1]\nmax_radius = 5.0\nframe_roll = \"zero\"\n",
    )
    .unwrap();
    let explicit = train(
        &data,
        &["--config", config.to_str().unwrap()],
        &dir.path().join("toml"),
    );
    let listed = ok(&xtask(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--dry-run",
    ]));
    assert!(listed.contains("max_radius = 5.0") || listed.contains("\"max_radius\": 5.0"));
    assert!(explicit["n_parameters"].as_u64().unwrap() > 0);
}

/// The direct-mode parameter count `xtask train --list-presets` prints for an EquiformerV2
/// preset.
fn matscale_models_count(preset: &str) -> u64 {
    let text = ok(&xtask(&["train", "--list-presets"]));
    let name = format!("equiformer_v2/{preset}");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .unwrap_or_else(|| panic!("{name} is listed:\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_equiformer_sweep_plans_and_costs_its_runs() {
    let text = ok(&xtask(&[
        "sweep",
        "--dry-run",
        "--config",
        "configs/sweeps/equiformer.toml",
    ]));
    assert!(text.contains("9 runs = 3 models (1 families)"), "{text}");
    for id in ["equiformer_v2-N4k-D32-s0", "equiformer_v2-N30k-D128-s0"] {
        assert!(text.contains(id), "{text}");
    }
    assert!(text.contains("training FLOPs"), "{text}");
}
