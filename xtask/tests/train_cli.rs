//! The `train` and `eval` commands end to end, as a user runs them.

use std::path::Path;
use std::process::Command;

fn xtask(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("xtask runs")
}

fn ok(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn train_then_resume_then_eval() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let data = dir.path().join("alloys.extxyz");
    ok(&xtask(&[
        "data",
        "gen",
        "--n",
        "24",
        "--seed",
        "3",
        "--supercell",
        "1x1x1",
        "-o",
        data.to_str().unwrap(),
    ]));
    let train = |epochs: &str| {
        xtask(&[
            "train",
            "--model",
            "schnet",
            "--size",
            "3000",
            "--data",
            data.to_str().unwrap(),
            "--val-fraction",
            "0.25",
            "--epochs",
            epochs,
            "--batch-size",
            "6",
            "--out",
            run_s,
        ])
    };
    ok(&train("2"));
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["family"], "schnet");
    assert_eq!(result["n_train"], 18);
    assert_eq!(result["n_val"], 6);
    assert_eq!(result["epochs"], 2);
    let n = result["n_parameters"].as_f64().unwrap();
    assert!((n - 3000.0).abs() < 300.0, "{n}");
    assert!(result["training_flops"].as_f64().unwrap() > 0.0);
    // Asking for more epochs on the same directory continues the finished run? No: a finished
    // run stays finished; a longer run needs a new directory. Re-running is idempotent.
    ok(&train("2"));

    let out = dir.path().join("eval");
    let text = ok(&xtask(&[
        "eval",
        "--checkpoint",
        run_s,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(text.contains("energy MAE"), "{text}");
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    for key in [
        "energy_mae_mev_per_atom",
        "force_mae_mev_per_angstrom",
        "stress_mae_mev_per_angstrom3",
    ] {
        assert!(eval[key].as_f64().unwrap().is_finite(), "{key}");
    }
    assert_eq!(eval["n_structures"], 24);
    let predictions = std::fs::read_to_string(out.join("predictions.extxyz")).unwrap();
    assert_eq!(predictions.matches("REF_energy=").count(), 24);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = xtask(&[
        "train",
        "--model",
        "schnet",
        "--data",
        "missing.extxyz",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.extxyz"), "{err}");
    let out = xtask(&["train", "--model", "schnet", "--max-lr=-1", "--dry-run"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_lr"));
}

#[test]
fn every_shipped_train_config_resolves() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/train"));
    let mut n = 0;
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            ok(&xtask(&[
                "train",
                "--config",
                path.to_str().unwrap(),
                "--dry-run",
            ]));
            n += 1;
        }
    }
    assert!(n >= 4);
}
