//! EquiformerV2 on the CPU (or, built with `--features cuda`, a GPU): forward and
//! forward+backward of the whole model on a fixed batch, and the peak memory of each (one
//! process per measurement).
//!
//! Three modes:
//! * `cargo bench -p matscale-models --bench equiformer_v2 [-- FILTER]`: criterion benches
//!   `equiformer_v2/{small,eqv2-s}/{forward,forward_backward}` (10 samples each; the eqV2-S
//!   ones take a few minutes).
//! * `equiformer_v2 compare --config small|eqv2-s --phase forward|forward_backward
//!   [--reps 3] [--warmup 1] [--device cpu|cuda]`: the side-by-side mode of
//!   `equiformer_v2_compare.sh`. Prints one JSON line (every repetition's seconds, best,
//!   median, the process's peak RSS, the device). Run one measurement per process so that the
//!   peak RSS is that measurement's. With `--device cuda` (a `cuda` build with a GPU; otherwise
//!   one line says why and it runs on the CPU) each repetition ends with a device
//!   synchronisation, and `peak_device_bytes` is the high watermark of the device's memory
//!   pool over the timed repetitions (reset after the warm-up, as the fairchem script resets
//!   `torch.cuda.max_memory_allocated`); `null` on the CPU.
//! * `equiformer_v2 check --config small|eqv2-s|tiny [--forces direct|conservative]
//!   [--structures 1..8] [--device cuda] [--tolerance 1e-3]`: the same model (same seeded
//!   weights, zero frame roll, normaliser included) on the CPU and on the device: energy,
//!   forces, stress and every weight gradient of the loss `mean(E²) + mean(F²)` (second
//!   derivatives with conservative forces), compared as `max |device − cpu| / max |cpu|` per
//!   tensor. Prints one JSON line with the worst of each
//!   and exits non-zero above the tolerance (f32: the two sides sum in different orders).
//! * `equiformer_v2 input PATH`: writes the batch (structures and the edge list with its
//!   vectors) as JSON for `equiformer_v2_fairchem.py`, so both sides run on the same graph.
//!
//! Input: 8 fcc alloys of 32 atoms from matscale's EMT structure generator
//! (`AlloyGenerator { seed: 2026, .. }`, structures 0..8: 2–4 of Al, Cu, Ag, Au, Ni, Pd, Pt,
//! strained ±3%, rattled), 256 atoms; edges within 12 Å, the 20 nearest per atom plus any
//! within 0.01 Å of the 20th (fairchem's non-strict `max_neighbors`). Models (f32, eval mode,
//! direct forces): `small` is eqV2-S with 2 layers and 64 sphere channels (lmax 4, mmax 2,
//! grid 18), `eqv2-s` the OMat24 eqV2-S; both with the energy, force and stress heads.
//! Forward: inference with the weights as plain tensors (no autograd graph kept, as PyTorch
//! under `no_grad`). Forward+backward: the weights as `Var`s, the loss `mean(E²) + mean(F²)`
//! of the normalised outputs, then the gradient of every weight (the stress is computed but
//! not in the loss). The frame roll is random per forward, as in fairchem.
//!
//! The allocator is tuned as `cargo xtask` tunes it
//! (`matscale_equivariant::buffer::tune_allocator`: freed blocks stay in the heap for reuse):
//! without it glibc returns every large temporary to the kernel and the page faults and
//! zero-fills of fresh pages cost a large share of the run time.

use std::collections::HashMap;
use std::error::Error;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::Criterion;
use matscale_equivariant::device::{
    peak_device_bytes, reset_peak_device_bytes, select_device, DeviceRequest,
};
use matscale_models::equiformer_v2::{EquiformerV2, EquiformerV2Config, FrameRoll};
use matscale_models::{
    seeded_var_builder, AtomisticModel, BatchTensors, ForceMode, Geometry, Model, ModelConfig,
    ModelSpec,
};
use matscale_structures::batch::{GraphBatch, GraphOptions};
use matscale_structures::generate::AlloyGenerator;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Structures in the batch.
const STRUCTURES: u64 = 8;
/// Generator seed of the batch.
const SEED: u64 = 2026;
/// fairchem's tolerance for neighbours tied with the last kept one, Å.
const DEGENERACY_TOLERANCE: f64 = 0.01;

/// Peak resident set size of this process, bytes.
fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    usage.ru_maxrss as u64 * 1024
}

fn config(name: &str) -> BenchResult<EquiformerV2Config> {
    match name {
        "small" => Ok(EquiformerV2Config {
            num_layers: 2,
            sphere_channels: 64,
            ..EquiformerV2Config::eqv2_s()
        }),
        "eqv2-s" => Ok(EquiformerV2Config::eqv2_s()),
        // For the conservative check: second derivatives of eqV2-S-sized layers need tens of
        // GB even for one cell.
        "tiny" => Ok(EquiformerV2Config {
            num_layers: 2,
            sphere_channels: 16,
            attn_hidden_channels: 16,
            num_heads: 2,
            attn_alpha_channels: 8,
            attn_value_channels: 8,
            ffn_hidden_channels: 16,
            edge_channels: 16,
            lmax_list: vec![4],
            mmax_list: vec![2],
            grid_resolution: 10,
            ..EquiformerV2Config::eqv2_s()
        }),
        other => Err(format!("unknown config {other:?} (small, eqv2-s, tiny)").into()),
    }
}

fn batch(config: &EquiformerV2Config) -> BenchResult<GraphBatch> {
    batch_of(config, STRUCTURES)
}

/// The first `structures` cells of the benchmark batch.
fn batch_of(config: &EquiformerV2Config, structures: u64) -> BenchResult<GraphBatch> {
    let generator = AlloyGenerator {
        seed: SEED,
        ..AlloyGenerator::default()
    }
    .check()?;
    let structures = generator.generate(0..structures);
    let options = GraphOptions {
        cutoff: config.max_radius,
        max_neighbors: Some(config.max_neighbors),
        degeneracy_tolerance: Some(DEGENERACY_TOLERANCE),
    };
    Ok(GraphBatch::new(&structures, &options)?)
}

/// A built model and its inputs.
struct Case {
    net: EquiformerV2,
    tensors: BatchTensors,
    geometry: Geometry,
    device: Device,
    n_parameters: usize,
    n_atoms: usize,
    n_edges: usize,
}

impl Case {
    /// The model of `name` on the benchmark batch. With `frozen` its weights are plain tensors
    /// instead of `Var`s, so a forward pass keeps no autograd graph (inference, as PyTorch
    /// under `no_grad`).
    fn new(name: &str, frozen: bool, device: &Device) -> BenchResult<Self> {
        let config = config(name)?;
        let batch = batch(&config)?;
        let device = device.clone();
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 7, DType::F32, &device);
        let mut net = EquiformerV2::new(&config, ForceMode::Direct, vb)?;
        let n_parameters = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        if frozen {
            let tensors: HashMap<String, Tensor> = varmap
                .data()
                .lock()
                .map_err(|_| "poisoned var map")?
                .iter()
                .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
                .collect();
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
            net = EquiformerV2::new(&config, ForceMode::Direct, vb)?;
        }
        let tensors = BatchTensors::new(&batch, DType::F32, &device)?;
        let geometry = Geometry::of(&tensors)?;
        Ok(Self {
            net,
            tensors,
            geometry,
            device,
            n_parameters,
            n_atoms: batch.n_nodes(),
            n_edges: batch.n_edges(),
        })
    }

    /// Energy, forces, stress; with `backward`, also the weight gradients of
    /// `mean(E²) + mean(F²)`. Returns the loss (to keep the work observable).
    fn step(&self, backward: bool) -> BenchResult<f32> {
        let out = self.net.forward(&self.tensors, &self.geometry, false)?;
        let forces = out.forces.ok_or("direct forces missing")?;
        // The stress is computed (and its graph freed: it is not in the loss).
        std::hint::black_box(out.stress.ok_or("direct stress missing")?);
        let loss = (out.energy.sqr()?.mean_all()? + forces.sqr()?.mean_all()?)?;
        if backward {
            let grads = loss.backward()?;
            std::hint::black_box(grads);
        }
        let loss = loss.to_scalar::<f32>()?;
        // Everything queued on a GPU has finished before the clock stops.
        self.device.synchronize()?;
        Ok(loss)
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// The `--flag value` pairs of a mode's arguments, in order.
fn flag_values(args: &[String]) -> BenchResult<Vec<(&str, &str)>> {
    let mut pairs = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        pairs.push((flag.as_str(), value.as_str()));
    }
    Ok(pairs)
}

fn compare(args: &[String]) -> BenchResult<()> {
    let mut name = "small".to_string();
    let mut phase = "forward".to_string();
    let (mut reps, mut warmup) = (3usize, 1usize);
    let mut request = DeviceRequest::Cpu;
    for (flag, value) in flag_values(args)? {
        match flag {
            "--config" => name = value.to_string(),
            "--phase" => phase = value.to_string(),
            "--reps" => reps = value.parse()?,
            "--warmup" => warmup = value.parse()?,
            "--device" => request = value.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let backward = match phase.as_str() {
        "forward" => false,
        "forward_backward" => true,
        other => return Err(format!("unknown phase {other:?}").into()),
    };
    if reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    let selected = select_device(request);
    let case = Case::new(&name, !backward, &selected.device)?;
    for _ in 0..warmup {
        case.step(backward)?;
    }
    let device = &selected.device;
    device.synchronize()?;
    reset_peak_device_bytes(device);
    let mut seconds = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        case.step(backward)?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    device.synchronize()?;
    let peak_device = peak_device_bytes(device).map_or("null".to_string(), |b| b.to_string());
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{{\"impl\": \"matscale\", \"config\": \"{name}\", \"phase\": \"{phase}\", \
         \"parameters\": {}, \"atoms\": {}, \"edges\": {}, \"threads\": {}, \
         \"device\": \"{}\", \"seconds\": {seconds:?}, \"best_s\": {}, \"median_s\": {}, \
         \"peak_rss_bytes\": {}, \"peak_device_bytes\": {peak_device}}}",
        case.n_parameters,
        case.n_atoms,
        case.n_edges,
        rayon::current_num_threads(),
        selected.label(),
        sorted[0],
        median(&sorted),
        peak_rss_bytes()
    );
    Ok(())
}

/// Writes the batch for the fairchem side: per structure its numbers, positions and cell;
/// the edges as `src`, `dst` (global node indices), `vec` (`r_src − r_dst + shift·cell`, Å).
fn write_input(path: &str) -> BenchResult<()> {
    let config = config("small")?;
    let b = batch(&config)?;
    let mut structures = Vec::new();
    for s in 0..b.n_structures() {
        let (lo, hi) = (b.node_ptr[s], b.node_ptr[s + 1]);
        let numbers: Vec<u8> = b.numbers[lo..hi].to_vec();
        let positions: Vec<&[f64]> = b.positions[3 * lo..3 * hi].chunks(3).collect();
        let cell: Vec<&[f64]> = b.cells[9 * s..9 * s + 9].chunks(3).collect();
        structures.push(format!(
            "{{\"numbers\": {numbers:?}, \"positions\": {positions:?}, \"cell\": {cell:?}}}"
        ));
    }
    let vec: Vec<&[f64]> = b.edge_vectors.chunks(3).collect();
    let json = format!(
        "{{\"generator\": \"AlloyGenerator seed {SEED}, structures 0..{STRUCTURES}\", \
         \"cutoff\": {}, \"max_neighbors\": {}, \"structures\": [{}], \
         \"edges\": {{\"src\": {:?}, \"dst\": {:?}, \"vec\": {vec:?}}}}}",
        config.max_radius,
        config.max_neighbors,
        structures.join(", "),
        b.edge_src,
        b.edge_dst,
    );
    std::fs::write(path, json)?;
    eprintln!(
        "wrote {path}: {} structures, {} atoms, {} edges",
        b.n_structures(),
        b.n_nodes(),
        b.n_edges()
    );
    Ok(())
}

/// `max |got − want| / max |want|` of two tensors of the same shape (on any devices).
fn relative_error(got: &Tensor, want: &Tensor) -> BenchResult<f64> {
    let got = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let want = want.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (got - &want)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = want.abs()?.max(0)?.to_scalar::<f64>()?;
    if !diff.is_finite() {
        return Ok(f64::INFINITY);
    }
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// One side of `check`: outputs and the weight gradients (by name) of `mean(E²) + mean(F²)`.
struct Evaluated {
    energy: Tensor,
    forces: Tensor,
    stress: Tensor,
    grads: Vec<(String, Option<Tensor>)>,
}

/// The model of `name` through [`AtomisticModel`] (normaliser included) with `force_mode`; conservative forces are energy gradients, so the loss's weight gradients are
/// second derivatives.
fn evaluate(
    name: &str,
    device: &Device,
    force_mode: ForceMode,
    structures: u64,
) -> BenchResult<Evaluated> {
    let config = EquiformerV2Config {
        frame_roll: FrameRoll::Zero,
        ..config(name)?
    };
    let b = batch_of(&config, structures)?;
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 7, DType::F32, device);
    let spec = ModelSpec {
        model: ModelConfig::EquiformerV2(config),
        force_mode,
    };
    let model = AtomisticModel::new(&spec, vb.clone(), vb)?;
    let tensors = BatchTensors::new(&b, DType::F32, device)?;
    let out = model.predict(&tensors, false)?;
    let (forces, stress) = (out.forces, out.stress);
    let loss = (out.energy.sqr()?.mean_all()? + forces.sqr()?.mean_all()?)?;
    let store = loss.backward()?;
    let mut vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .map_err(|_| "poisoned var map")?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let grads = vars
        .into_iter()
        .map(|(k, v)| {
            // Detached: with higher-order gradients on, each would keep the whole graph alive.
            let g = store.get(v.as_tensor()).map(Tensor::detach);
            (k, g)
        })
        .collect();
    Ok(Evaluated {
        energy: out.energy.detach(),
        forces: forces.detach(),
        stress: stress.detach(),
        grads,
    })
}

/// `check`: the model on the CPU against the same model on the requested device.
fn check(args: &[String]) -> BenchResult<()> {
    let mut name = "small".to_string();
    let mut request = DeviceRequest::Cpu;
    let mut tolerance = 1e-3;
    let mut force_mode = ForceMode::Direct;
    let mut structures = STRUCTURES;
    for (flag, value) in flag_values(args)? {
        match flag {
            "--config" => name = value.to_string(),
            "--forces" => force_mode = value.parse()?,
            "--structures" => structures = value.parse()?,
            "--device" => request = value.parse()?,
            "--tolerance" => tolerance = value.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if !(1..=STRUCTURES).contains(&structures) {
        return Err(format!("--structures must be 1..={STRUCTURES}").into());
    }
    if force_mode == ForceMode::Conservative {
        matscale_models::enable_higher_order_gradients()?;
    }
    let selected = select_device(request);
    let cpu = evaluate(&name, &Device::Cpu, force_mode, structures)?;
    let dev = evaluate(&name, &selected.device, force_mode, structures)?;
    let energy = relative_error(&dev.energy, &cpu.energy)?;
    let forces = relative_error(&dev.forces, &cpu.forces)?;
    let stress = relative_error(&dev.stress, &cpu.stress)?;
    let (mut worst, mut worst_name, mut missing) = (0f64, String::new(), Vec::new());
    for ((k, want), (_, got)) in cpu.grads.iter().zip(&dev.grads) {
        match (want, got) {
            (Some(want), Some(got)) => {
                let err = relative_error(got, want)?;
                if err.is_nan() || err > worst {
                    worst = err;
                    worst_name = k.clone();
                }
            }
            (None, None) => {}
            _ => missing.push(k.clone()),
        }
    }
    let ok = [energy, forces, stress, worst]
        .iter()
        .all(|&e| e <= tolerance)
        && missing.is_empty();
    println!(
        "{{\"check\": \"{name}\", \"force_mode\": \"{force_mode:?}\", \
         \"structures\": {structures}, \"device\": \"{}\", \"energy\": {energy:e}, \
         \"forces\": {forces:e}, \"stress\": {stress:e}, \"worst_gradient\": {worst:e}, \
         \"worst_gradient_of\": \"{worst_name}\", \"gradients\": {}, \
         \"missing_gradients\": {missing:?}, \"tolerance\": {tolerance:e}, \"ok\": {ok}}}",
        selected.label(),
        cpu.grads.len(),
    );
    if ok {
        Ok(())
    } else {
        Err(format!("{name}: the device and the CPU differ by more than {tolerance:e}").into())
    }
}

fn criterion_benches() -> BenchResult<()> {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .configure_from_args();
    for name in ["small", "eqv2-s"] {
        let mut group = c.benchmark_group(format!("equiformer_v2/{name}"));
        group.sample_size(10);
        for (phase, backward) in [("forward", false), ("forward_backward", true)] {
            let case = Case::new(name, !backward, &Device::Cpu)?;
            group.bench_function(phase, |b| {
                b.iter(|| case.step(backward).expect("EquiformerV2 step"))
            });
        }
        group.finish();
    }
    c.final_summary();
    Ok(())
}

fn main() -> BenchResult<()> {
    matscale_equivariant::buffer::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("compare") => compare(&args[1..]),
        Some("check") => check(&args[1..]),
        Some("input") => write_input(args.get(1).ok_or("input needs a path")?),
        _ => criterion_benches(),
    }
}
