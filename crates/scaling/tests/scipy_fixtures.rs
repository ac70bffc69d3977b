//! Single-variable fits against scipy `curve_fit` (tests/data/scaling).

use matscale_scaling::power_law::{fit_power_law, Objective, SingleLaw};
use serde_json::Value;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/scaling/power_law_fixtures.json"
);

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn power_laws_agree_with_curve_fit_to_1e6() {
    let text = std::fs::read_to_string(FIXTURES).unwrap();
    let root: Value = serde_json::from_str(&text).unwrap();
    let cases = root["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    let mut worst = 0.0f64;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let law = match case["law"].as_str().unwrap() {
            "power" => SingleLaw::Power,
            "power_e" => SingleLaw::PowerWithOffset,
            other => panic!("unknown law {other}"),
        };
        let objective = match case["objective"].as_str().unwrap() {
            "log" => Objective::Log,
            "linear" => Objective::Linear,
            other => panic!("unknown objective {other}"),
        };
        let x = floats(&case["x"]);
        let y = floats(&case["loss"]);
        let fit = fit_power_law(&x, &y, law, objective).unwrap();
        let want = &case["params"];
        for (got, key) in [
            (fit.params.a, "a"),
            (fit.params.b, "b"),
            (fit.params.e, "E"),
        ] {
            let w = want[key].as_f64().unwrap();
            let rel = if w == 0.0 {
                got.abs()
            } else {
                (got / w - 1.0).abs()
            };
            assert!(
                rel < 1e-6,
                "{name}: {key} = {got}, scipy {w} (rel {rel:.1e})"
            );
            worst = worst.max(rel);
        }
        let sse = case["sse"].as_f64().unwrap();
        // Our minimum may only be lower (or equal to rounding).
        assert!(
            fit.sse <= sse * (1.0 + 1e-9),
            "{name}: sse {} vs scipy {sse}",
            fit.sse
        );
    }
    eprintln!("largest relative difference from curve_fit: {worst:.1e}");
}
