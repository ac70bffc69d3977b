//! AdamW step time: per-variable, in-place and multi-tensor update (see
//! `matscale_trainer::optim`; the multi-tensor one is the in-place one on the CPU, and unless
//! `MATSCALE_MULTI_TENSOR=0` every mode's gradient norm runs as one launch on a GPU).
//!
//! `cargo bench -p matscale-trainer --bench adamw [-- --device cpu|cuda] [--params N]
//! [--tensors K] [--reps R]`: K variables (default 383, eqV2-S's count) holding N parameters
//! in all (default 31.2M) in eqV2-S-like proportions (a third large matrices, a third
//! medium, a third small vectors), random gradients; per mode the seconds of
//! `global_norm` + `AdamW::step_scaled` with the clipping factor (`clip_by_global_norm` +
//! `AdamW::step` in one), best and median of R repetitions (default 5) after
//! one warm-up, one JSON line per mode, with the largest difference of its final weights from the
//! per-variable mode's relative to their largest magnitude (0 on the CPU, where the modes are
//! bit-identical; rounding-sized on a GPU). `adamw_reference.py` beside it runs the same step
//! in PyTorch (`clip_grad_norm_` + `torch.optim.AdamW`) on the same layout.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use matscale_equivariant::device::{select_device, DeviceRequest};
use matscale_trainer::optim::{clip_factor, global_norm, AdamW, AdamWConfig, UpdateMode};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BenchResult<()> {
    let mut request = DeviceRequest::Cpu;
    let (mut params, mut tensors, mut reps) = (31_207_434usize, 383usize, 5usize);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => request = value()?.parse()?,
            "--params" => params = value()?.parse()?,
            "--tensors" => tensors = value()?.parse()?,
            "--reps" => reps = value()?.parse()?,
            // cargo bench passes --bench; criterion-style filters are ignored.
            "--bench" => {}
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if tensors < 3 || reps == 0 || params < tensors {
        return Err("need --tensors >= 3, --reps >= 1 and --params >= --tensors".into());
    }
    let selected = select_device(request);
    let device = &selected.device;
    // Size weights 64 : 4 : 1 for large, medium and small tensors, a third of each.
    let weight = |i: usize| [64usize, 4, 1][i % 3];
    let unit = params / (0..tensors).map(weight).sum::<usize>();
    let sizes: Vec<usize> = (0..tensors).map(|i| (weight(i) * unit).max(1)).collect();
    let total: usize = sizes.iter().sum();
    let vars: Vec<(String, Var)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Ok((format!("v{i:04}"), Var::randn(0f32, 1.0, n, device)?)))
        .collect::<candle_core::Result<_>>()?;
    let grads: Vec<Option<Tensor>> = vars
        .iter()
        .map(|(_, v)| Ok(Some(Tensor::randn(0f32, 1.0, v.shape(), device)?)))
        .collect::<candle_core::Result<_>>()?;
    // The weights after the last step of the first mode, to compare the others with.
    let mut reference: Option<Vec<f32>> = None;
    for (mode, update) in [
        ("per_variable", UpdateMode::PerVariable),
        ("in_place", UpdateMode::InPlace),
        ("multi_tensor", UpdateMode::MultiTensor),
    ] {
        // Fresh variables per mode (the in-place update writes into their storage).
        let vars: Vec<(String, Var)> = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect::<candle_core::Result<_>>()?;
        let mut opt = AdamW::new(vars, AdamWConfig::default())?;
        opt.set_update_mode(Some(update));
        let mut seconds = Vec::with_capacity(reps);
        for rep in 0..=reps {
            device.synchronize()?;
            let start = Instant::now();
            // clip_by_global_norm + step, with the clipping factor applied inside the update.
            let norm = global_norm(&grads)?;
            opt.step_scaled(&grads, 1e-3, clip_factor(norm, 1.0))?;
            device.synchronize()?;
            if rep > 0 {
                seconds.push(start.elapsed().as_secs_f64());
            }
        }
        seconds.sort_by(f64::total_cmp);
        // Every mode took the same steps from the same weights: the results must agree.
        let parts = opt
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weights = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
        let agreement = match &reference {
            None => {
                reference = Some(weights);
                0.0
            }
            Some(r) => {
                let scale = r.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
                let diff = r
                    .iter()
                    .zip(&weights)
                    .fold(0f64, |m, (&a, &b)| m.max(f64::from(a - b).abs()));
                diff / scale.max(f64::MIN_POSITIVE)
            }
        };
        println!(
            "{{\"mode\": \"{mode}\", \"device\": \"{}\", \"tensors\": {tensors}, \
             \"params\": {total}, \"dtype\": \"{:?}\", \"best_s\": {}, \"median_s\": {}, \
             \"max_rel_diff_vs_per_variable\": {agreement:e}}}",
            selected.label(),
            DType::F32,
            seconds[0],
            seconds[seconds.len() / 2]
        );
    }
    Ok(())
}
