//! AdamW step time, per-variable against grouped update (see `matscale_trainer::optim`).
//!
//! `cargo bench -p matscale-trainer --bench adamw [-- --device cpu|cuda] [--params N]
//! [--tensors K] [--reps R]`: K variables (default 383, eqV2-S's count) holding N parameters
//! in all (default 31.2M) in eqV2-S-like proportions (a third large matrices, a third
//! medium, a third small vectors), random gradients; per mode the seconds of
//! `clip_by_global_norm` + `AdamW::step`, best and median of R repetitions (default 5) after
//! one warm-up, one JSON line per mode. Both modes give identical weights (unit tests).

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use matscale_equivariant::device::{select_device, DeviceRequest};
use matscale_trainer::optim::{clip_by_global_norm, AdamW, AdamWConfig};

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
    for (mode, grouped) in [("per_variable", false), ("grouped", true)] {
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
        opt.set_grouped(Some(grouped));
        let mut seconds = Vec::with_capacity(reps);
        for rep in 0..=reps {
            let mut g = grads.clone();
            device.synchronize()?;
            let start = Instant::now();
            clip_by_global_norm(&mut g, 1.0)?;
            opt.step(&g, 1e-3)?;
            device.synchronize()?;
            if rep > 0 {
                seconds.push(start.elapsed().as_secs_f64());
            }
        }
        seconds.sort_by(f64::total_cmp);
        println!(
            "{{\"mode\": \"{mode}\", \"device\": \"{}\", \"tensors\": {tensors}, \
             \"params\": {total}, \"dtype\": \"{:?}\", \"best_s\": {}, \"median_s\": {}}}",
            selected.label(),
            DType::F32,
            seconds[0],
            seconds[seconds.len() / 2]
        );
    }
    Ok(())
}
