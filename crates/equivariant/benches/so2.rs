//! Rotation into edge frames + SO(2) convolution + rotation back, at EquiformerV2 sizes.
//!
//! `cargo bench -p matscale-equivariant --bench so2` (f32, 10^4 edges; set
//! `MATSCALE_BENCH_EDGES` for another count). Per configuration `l{lmax}_m{mmax}_c{C}`:
//!
//! * `forward`, `forward_backward`: the layer as one fused op
//!   ([`So2Convolution::forward_rotated`]), radial weights, `C → C` channels;
//!   forward+backward is `out.backward()` (an all-ones output gradient) with gradients for the input, the radial
//!   weights and every parameter.
//! * `composed_forward`, `composed_forward_backward`: the same layer from separate ops
//!   (`rotate` → `So2Convolution::forward` → `rotate_inv`).
//! * `gather_forward`, `gather_forward_backward`: EquiformerV2's message layer on node
//!   features, [`So2Convolution::forward_gather_rotated`] with a source/target
//!   [`MessageGather`] (`N = E / 20` nodes `[N, K, C]` → messages of `2C` channels → `C`
//!   outputs, rotated back), forward+backward with gradients for the node features, the
//!   radial weights and every parameter.
//! * `gather_unfused_forward`, `gather_unfused_forward_backward`: the same with the messages
//!   materialised first (`index_select` + `cat`, then `forward_rotated`).
//! * `autograd_overhead`: candle's own work around the op in `forward_backward` (the
//!   all-ones output-gradient seed, a zero-filled gradient slot and an `add` for the input and
//!   for the radial weights), on tensors of the same shapes: the part of `forward_backward`
//!   that no op can remove.
//! * `rotate`, `so2_conv`, `rotate_inv`: the separate ops alone.
//!
//! Environment:
//! * `MATSCALE_BENCH_CONFIGS="4,2,64;6,4,128"`: the configurations (only those are set up).
//! * `MATSCALE_BENCH_REPEATS=n`: instead of criterion, time each case `n` times after one
//!   warm-up run and print best and median (the statistics the PyTorch reference
//!   `so2_torch.py` reports; used by `so2_compare.sh`, and for 10^5 edges, where criterion's
//!   minimum of 10 samples takes too long), in wall-clock time and in process CPU time (user +
//!   system, all threads: on a loaded machine the work done, without the waits for a core). `MATSCALE_BENCH_CASES="forward,gather_forward"`
//!   selects cases by exact name (all by default). Each result is also printed as one line
//!   `RESULT {json}`.
//!
//! The PyTorch reference (fairchem-style dense `bmm` path) is `benches/so2_torch.py`;
//! `benches/so2_compare.sh` runs both side by side and prints the ratios.

#![allow(missing_docs)] // criterion's generated items

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::BatchSize::PerIteration;
use criterion::{BenchmarkId, Criterion};
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::so2::{rotate, rotate_inv, MessageGather, So2ConvConfig, So2Convolution};
use matscale_equivariant::wigner::WignerBlocks;

const CONFIGS: [(usize, usize, usize); 4] = [(4, 2, 64), (4, 2, 128), (6, 4, 64), (6, 4, 128)];

/// Edges per node of the gathered benchmark (EquiformerV2's `max_neighbors` 20).
const DEGREE: usize = 20;

fn edges() -> usize {
    std::env::var("MATSCALE_BENCH_EDGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The configurations to run: `MATSCALE_BENCH_CONFIGS` (`"l,m,c;l,m,c"`) or all four.
fn configs() -> Vec<(usize, usize, usize)> {
    let Ok(spec) = std::env::var("MATSCALE_BENCH_CONFIGS") else {
        return CONFIGS.to_vec();
    };
    spec.split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let v: Vec<usize> = s
                .split(',')
                .map(|x| x.trim().parse().expect("MATSCALE_BENCH_CONFIGS: l,m,c;..."))
                .collect();
            assert_eq!(v.len(), 3, "MATSCALE_BENCH_CONFIGS: l,m,c;...");
            (v[0], v[1], v[2])
        })
        .collect()
}

struct Setup {
    layout: SphericalLayout,
    conv: So2Convolution,
    wigner: WignerBlocks,
    x: Tensor,
    radial: Tensor,
}

fn setup(lmax: usize, mmax: usize, c: usize, edges: usize) -> Setup {
    let dev = Device::Cpu;
    let layout = SphericalLayout::new(lmax, mmax).expect("valid layout");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let conv = So2Convolution::new(&So2ConvConfig::new(layout, c, c), vb).expect("conv");
    let angles: Vec<(f64, f64, f64)> = (0..edges)
        .map(|i| {
            let t = i as f64;
            (0.37 * t, 0.11 * t, 0.73 * t)
        })
        .collect();
    let wigner = WignerBlocks::from_angles(&angles, lmax, DType::F32, &dev).expect("wigner");
    let x = Tensor::randn(0f32, 1., (edges, layout.num_coefficients(), c), &dev).expect("x");
    let radial = Tensor::randn(0f32, 1., (edges, conv.radial_len()), &dev).expect("radial");
    Setup {
        layout,
        conv,
        wigner,
        x,
        radial,
    }
}

/// Node features, the source/target gather and the `2C → C` convolution.
struct GatherSetup {
    conv: So2Convolution,
    nodes: Tensor,
    gather: MessageGather,
    radial: Tensor,
}

fn gather_setup(s: &Setup, c: usize, edges: usize) -> GatherSetup {
    let dev = Device::Cpu;
    let n = edges.div_ceil(DEGREE).max(1);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let conv = So2Convolution::new(&So2ConvConfig::new(s.layout, 2 * c, c), vb).expect("conv");
    // Edges grouped by target (as EquiformerV2's graphs are), sources spread over the nodes.
    let source: Vec<u32> = (0..edges).map(|e| ((e * 7919 + 13) % n) as u32).collect();
    let target: Vec<u32> = (0..edges).map(|e| (e / DEGREE).min(n - 1) as u32).collect();
    GatherSetup {
        nodes: Tensor::randn(0f32, 1., (n, s.layout.num_coefficients(), c), &dev).expect("x"),
        radial: Tensor::randn(0f32, 1., (edges, conv.radial_len()), &dev).expect("radial"),
        gather: MessageGather::pair(
            &Tensor::new(source.as_slice(), &dev).expect("source"),
            &Tensor::new(target.as_slice(), &dev).expect("target"),
            n,
        )
        .expect("gather"),
        conv,
    }
}

/// The layer as one fused op.
fn layer(s: &Setup, x: &Tensor, radial: &Tensor) -> Tensor {
    s.conv
        .forward_rotated(x, &s.wigner, Some(radial))
        .expect("fused layer")
        .0
}

/// The layer from separate ops.
fn layer_composed(s: &Setup, x: &Tensor, radial: &Tensor) -> Tensor {
    let r = rotate(x, &s.wigner, s.layout).expect("rotate");
    let (y, _) = s.conv.forward(&r, Some(radial)).expect("conv");
    rotate_inv(&y, &s.wigner, s.layout).expect("rotate_inv")
}

/// The gathered layer as one op.
fn gather_layer(s: &Setup, g: &GatherSetup, x: &Tensor, radial: &Tensor) -> Tensor {
    g.conv
        .forward_gather_rotated(x, &g.gather, &s.wigner, Some(radial))
        .expect("gathered layer")
        .0
}

/// The gathered layer with the messages materialised first.
fn gather_unfused(s: &Setup, g: &GatherSetup, x: &Tensor, radial: &Tensor) -> Tensor {
    let MessageGather::Pair { source, target } = &g.gather else {
        unreachable!("the benchmark gathers pairs")
    };
    let msg = Tensor::cat(
        &[
            &x.index_select(source.tensor(), 0).expect("source rows"),
            &x.index_select(target.tensor(), 0).expect("target rows"),
        ],
        2,
    )
    .expect("cat");
    g.conv
        .forward_rotated(&msg, &s.wigner, Some(radial))
        .expect("fused layer")
        .0
}

/// Fresh leaf variables (created outside the timed region, as the PyTorch reference clones
/// its inputs before starting the clock).
fn leaves(x: &Tensor, radial: &Tensor) -> (Var, Var) {
    (
        Var::from_tensor(x).expect("var"),
        Var::from_tensor(radial).expect("var"),
    )
}

/// Backward from an all-ones output gradient, as the PyTorch reference's
/// `out.backward(torch.ones_like(out))` (candle seeds `backward` with `ones_like`; a
/// `sum_all` first would add candle's single-threaded sum and the broadcast of its gradient,
/// which the reference does not time).
fn backward(out: &Tensor) -> GradStore {
    out.backward().expect("backward")
}

/// What candle's `backward()` spends outside the op in the per-edge `forward_backward` case,
/// on tensors of the same shapes (the layer maps `C → C`, so its output has the input's
/// shape): the all-ones seed of the output gradient, then for each edge-sized leaf (input,
/// radial weights) a zero-filled gradient slot plus the `add` of the op's gradient into it.
/// PyTorch's autograd does none of these (it hands a leaf its first gradient as it is).
fn autograd_overhead(x: &Tensor, radial: &Tensor) -> (Tensor, Tensor, Tensor) {
    let seed = x.ones_like().and_then(|t| t.contiguous()).expect("seed");
    let gx = x.zeros_like().and_then(|z| z.add(x)).expect("input slot");
    let gr = radial
        .zeros_like()
        .and_then(|z| z.add(radial))
        .expect("radial slot");
    (seed, gx, gr)
}

/// Leaf variables `(input, radial weights)` of one timed run.
type Leaves = (Var, Var);

/// One timed case: `prepare` builds the untimed inputs, `run` is timed.
struct Case<'a> {
    name: &'static str,
    prepare: Box<dyn Fn() -> Leaves + 'a>,
    run: Box<dyn Fn(&Leaves) + 'a>,
}

fn cases<'a>(s: &'a Setup, g: &'a GatherSetup) -> Vec<Case<'a>> {
    let edge_leaves = move || leaves(&s.x, &s.radial);
    let node_leaves = move || leaves(&g.nodes, &g.radial);
    let r = rotate(&s.x, &s.wigner, s.layout).expect("rotate");
    let (y, _) = s.conv.forward(&r, Some(&s.radial)).expect("conv");
    vec![
        Case {
            name: "forward",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |(x, r)| drop(layer(s, x, r))),
        },
        Case {
            name: "forward_backward",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |(x, r)| drop(backward(&layer(s, x, r)))),
        },
        Case {
            name: "composed_forward",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |(x, r)| drop(layer_composed(s, x, r))),
        },
        Case {
            name: "composed_forward_backward",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |(x, r)| drop(backward(&layer_composed(s, x, r)))),
        },
        Case {
            name: "gather_forward",
            prepare: Box::new(node_leaves),
            run: Box::new(move |(x, r)| drop(gather_layer(s, g, x, r))),
        },
        Case {
            name: "gather_forward_backward",
            prepare: Box::new(node_leaves),
            run: Box::new(move |(x, r)| drop(backward(&gather_layer(s, g, x, r)))),
        },
        Case {
            name: "gather_unfused_forward",
            prepare: Box::new(node_leaves),
            run: Box::new(move |(x, r)| drop(gather_unfused(s, g, x, r))),
        },
        Case {
            name: "gather_unfused_forward_backward",
            prepare: Box::new(node_leaves),
            run: Box::new(move |(x, r)| drop(backward(&gather_unfused(s, g, x, r)))),
        },
        Case {
            name: "autograd_overhead",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |(x, r)| drop(autograd_overhead(x, r))),
        },
        Case {
            name: "rotate",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |(x, _)| drop(rotate(x, &s.wigner, s.layout).expect("rotate"))),
        },
        Case {
            name: "so2_conv",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |(_, rad)| drop(s.conv.forward(&r, Some(rad)).expect("conv"))),
        },
        Case {
            name: "rotate_inv",
            prepare: Box::new(edge_leaves),
            run: Box::new(move |_| drop(rotate_inv(&y, &s.wigner, s.layout).expect("rotate_inv"))),
        },
    ]
}

fn bench_so2(c: &mut Criterion) {
    let edges = edges();
    let mut group = c.benchmark_group(format!("so2_layer_E{edges}"));
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(3));
    for (lmax, mmax, ch) in configs() {
        let s = setup(lmax, mmax, ch, edges);
        let g = gather_setup(&s, ch, edges);
        let id = format!("l{lmax}_m{mmax}_c{ch}");
        for case in cases(&s, &g) {
            group.bench_function(BenchmarkId::new(case.name, &id), |b| {
                b.iter_batched(&case.prepare, |v| (case.run)(&v), PerIteration)
            });
        }
    }
    group.finish();
}

/// CPU time (user + system) of the whole process so far, in seconds: with other jobs on the
/// machine this measures the work done rather than the time waited for a core.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the `rusage` struct it is given.
    let usage = unsafe {
        let mut u = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `MATSCALE_BENCH_REPEATS` mode: best and median of `repeats` timed runs after a warm-up.
fn quick(repeats: usize) {
    let edges = edges();
    let selected: Option<Vec<String>> = std::env::var("MATSCALE_BENCH_CASES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let threads = rayon::current_num_threads();
    for (lmax, mmax, ch) in configs() {
        let s = setup(lmax, mmax, ch, edges);
        let g = gather_setup(&s, ch, edges);
        let id = format!("l{lmax}_m{mmax}_c{ch}");
        for case in cases(&s, &g) {
            if selected
                .as_ref()
                .is_some_and(|sel| !sel.iter().any(|n| n == case.name))
            {
                continue;
            }
            let mut times = Vec::with_capacity(repeats);
            let mut cpu = Vec::with_capacity(repeats);
            for i in 0..=repeats {
                let inputs = (case.prepare)();
                let (t, c) = (Instant::now(), cpu_seconds());
                (case.run)(&inputs);
                let (dt, dc) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
                if i > 0 {
                    times.push(dt);
                    cpu.push(dc);
                }
            }
            times.sort_by(f64::total_cmp);
            cpu.sort_by(f64::total_cmp);
            let (best, median) = (times[0], times[times.len() / 2]);
            let (cpu_best, cpu_median) = (cpu[0], cpu[cpu.len() / 2]);
            println!(
                "so2 E={edges} {id} {}: best {:.1} ms, median {:.1} ms; CPU best {:.1} ms, median {:.1} ms (n={repeats}, threads {threads})",
                case.name,
                best * 1e3,
                median * 1e3,
                cpu_best * 1e3,
                cpu_median * 1e3
            );
            println!(
                "RESULT {{\"edges\": {edges}, \"config\": \"{id}\", \"case\": \"{}\", \"best\": {best}, \"median\": {median}, \"cpu_best\": {cpu_best}, \"cpu_median\": {cpu_median}, \"repeats\": {repeats}, \"threads\": {threads}}}",
                case.name
            );
        }
    }
}

fn main() {
    // The heap policy of `cargo xtask` (freed tensors stay mapped for reuse).
    matscale_equivariant::buffer::tune_allocator();
    if let Some(repeats) = std::env::var("MATSCALE_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        quick(repeats);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench_so2(&mut c);
    c.final_summary();
}
