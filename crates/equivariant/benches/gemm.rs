//! The GEMM ceiling of the fused SO(2) layer: [`linalg::gemm`] alone, on one thread, on the
//! products the layer runs for one 256-edge chunk (same shapes; edge rows of the m-major
//! `[256, trunc, C]` buffers, the packed weights), without the rotations, radial scaling or
//! anything else. One difference: for each order `m > 0` the layer's first product reads a
//! compact `[256, n_l·C]` sum `x₊ + x₋` (or `g₊ + g₋`); here it reads the strided buffer too.
//! Cases: the per-edge layers `l4_m2_c64`, `l6_m4_c128` (`C → C`) and EquiformerV2's gathered
//! message layers `l4_m2_c64_gather`, `l6_m4_c128_gather` (`cat(x[src], x[dst])`: `2C → C`).
//! At `lmax` 6, `mmax` 4, 128 channels this is the floor of the layer's time: no rotation or
//! fusion can make the layer faster than its GEMMs.//!
//! Also a 512³ product, the practical peak of one core. Every figure is the best of
//! `MATSCALE_BENCH_REPEATS` (default 5) timed passes after a warm-up, f32, one thread
//! (the layer runs one chunk per rayon task, each GEMM single-threaded).
//!
//! Run: `cargo bench -p matscale-equivariant --bench gemm`; side by side with `torch.addmm`
//! (MKL / oneDNN) on the same shapes and strides:
//! `python crates/equivariant/benches/gemm_torch.py compare`.
//! Prints one `RESULT {json}` line per case: `gflops` (best), `flops` (per pass) and, for the
//! layer cases, `seconds_per_1e4_edges` (the pass scaled to 10⁴ edges).

use std::time::Instant;

use matscale_equivariant::linalg::{gemm, view};

/// Edges per chunk of the fused layer (`LayerShape::chunk_edges`' cap).
const CHUNK: usize = 256;

/// Which buffer an operand reads.
#[derive(Clone, Copy)]
enum Src {
    /// The chunk's m-major input rows `[256, trunc·C_in]`.
    In,
    /// The chunk's m-major output-gradient rows `[256, trunc·C_out]`.
    Out,
    /// The packed weights.
    W,
}

/// One GEMM of the layer: `(m, n, k)`, each operand's buffer and `(offset, row stride,
/// column stride)` in it.
#[derive(Clone, Copy)]
struct Product {
    mnk: (usize, usize, usize),
    lhs: (Src, usize, usize, usize),
    rhs: (Src, usize, usize, usize),
}

/// A named pass (`forward`, `input_grad`, `weight_grad`) and its products.
type Pass = (&'static str, Vec<Product>);

/// The products of one chunk of a `C_in → C_out` layer: forward (`x·W` per order), input
/// gradient (`g·Wᵀ`, with `Wᵀ` contiguous as the layer's backward keeps it) and weight
/// gradient (`xᵀ·g`), with the 3-multiplication complex product
/// for `m > 0` (three products per order and direction, each `[256, n_l·C_in] × [n_l·C_in,
/// n_l·C_out]` or its transpose). Also returns the row lengths of the two activation buffers
/// (`trunc·C_in`, `trunc·C_out`). EquiformerV2's gathered message layer is `2C → C`.
fn layer_products(
    lmax: usize,
    mmax: usize,
    c_in: usize,
    c_out: usize,
) -> ((usize, usize), [Pass; 3]) {
    // m-major rows: m = 0 holds lmax + 1 degrees, each m > 0 holds 2·(lmax + 1 − m).
    let sizes: Vec<usize> = (0..=mmax).map(|m| lmax + 1 - m).collect();
    let trunc: usize = sizes[0] + 2 * sizes[1..].iter().sum::<usize>();
    let (rs_in, rs_out) = (trunc * c_in, trunc * c_out);
    let (mut fwd, mut dx, mut dw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut slot, mut woff) = (0, 0);
    for (m, &n_l) in sizes.iter().enumerate() {
        let (k, n) = (n_l * c_in, n_l * c_out);
        let copies = if m == 0 { 1 } else { 3 };
        for i in 0..copies {
            let x_off = slot * c_in + if i == 2 { k } else { 0 };
            let g_off = slot * c_out + if i == 2 { n } else { 0 };
            let w_off = woff + i * k * n;
            fwd.push(Product {
                mnk: (CHUNK, n, k),
                lhs: (Src::In, x_off, rs_in, 1),
                rhs: (Src::W, w_off, n, 1),
            });
            dx.push(Product {
                mnk: (CHUNK, k, n),
                lhs: (Src::Out, g_off, rs_out, 1),
                rhs: (Src::W, w_off, k, 1),
            });
            dw.push(Product {
                mnk: (k, n, CHUNK),
                lhs: (Src::In, x_off, 1, rs_in),
                rhs: (Src::Out, g_off, rs_out, 1),
            });
        }
        slot += if m == 0 { n_l } else { 2 * n_l };
        woff += copies * k * n;
    }
    (
        (rs_in, rs_out),
        [("forward", fwd), ("input_grad", dx), ("weight_grad", dw)],
    )
}

fn flops(products: &[Product]) -> f64 {
    products
        .iter()
        .map(|p| 2.0 * (p.mnk.0 * p.mnk.1 * p.mnk.2) as f64)
        .sum()
}

/// The three buffers the products read: input rows, output-gradient rows, weights.
struct Buffers {
    input: Vec<f32>,
    output: Vec<f32>,
    weights: Vec<f32>,
}

impl Buffers {
    fn get(&self, src: Src) -> &[f32] {
        match src {
            Src::In => &self.input,
            Src::Out => &self.output,
            Src::W => &self.weights,
        }
    }
}

/// Best seconds of `repeats` passes of `products` (after one warm-up pass).
fn time(products: &[Product], bufs: &Buffers, out: &mut [f32], repeats: usize) -> f64 {
    let pass = |out: &mut [f32]| {
        for p in products {
            let (m, n, k) = p.mnk;
            let (ls, lo, lr, lc) = p.lhs;
            let (rs, ro, rr, rc) = p.rhs;
            gemm(
                (m, n, k),
                out,
                0,
                n,
                true,
                view(bufs.get(ls), lo, lr, lc),
                view(bufs.get(rs), ro, rr, rc),
                1.0,
            );
        }
    };
    pass(out);
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            pass(out);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// A deterministic, non-trivial fill.
fn fill(len: usize, period: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i % period) as f32 - (period / 2) as f32) * 0.01)
        .collect()
}

fn main() {
    let repeats = std::env::var("MATSCALE_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    // The layer runs each GEMM on one thread; so does this bench (`Parallelism::None`).
    let square = Product {
        mnk: (512, 512, 512),
        lhs: (Src::In, 0, 512, 1),
        rhs: (Src::W, 0, 512, 1),
    };
    let bufs = Buffers {
        input: vec![0.5f32; 512 * 512],
        output: Vec::new(),
        weights: vec![0.25f32; 512 * 512],
    };
    let mut out = vec![0f32; 512 * 512];
    let per = flops(&[square]);
    let best = time(&[square], &bufs, &mut out, repeats * 4);
    println!(
        "gemm peak 512x512x512: {:.1} GFLOP/s (one thread)",
        per / best / 1e9
    );
    println!(
        "RESULT {{\"case\": \"square512\", \"gflops\": {:.3}, \"flops\": {per}}}",
        per / best / 1e9
    );
    // (lmax, mmax, C_in, C_out, name): the per-edge layers, then EquiformerV2's gathered
    // message layers (`cat(x[src], x[dst])`: 2C → C).
    for (lmax, mmax, c_in, c_out, form) in [
        (4, 2, 64, 64, ""),
        (6, 4, 128, 128, ""),
        (4, 2, 128, 64, "_gather"),
        (6, 4, 256, 128, "_gather"),
    ] {
        let ((rs_in, rs_out), passes) = layer_products(lmax, mmax, c_in, c_out);
        let case = format!("l{lmax}_m{mmax}_c{c_out}{form}");
        for (name, products) in passes {
            let w_len = products
                .iter()
                .filter(|p| matches!(p.rhs.0, Src::W))
                .map(|p| p.rhs.1 + p.mnk.1 * p.mnk.2)
                .max()
                .unwrap_or(0);
            let bufs = Buffers {
                input: fill(CHUNK * rs_in, 89),
                output: fill(CHUNK * rs_out, 83),
                weights: fill(w_len, 97),
            };
            let out_len = products
                .iter()
                .map(|p| p.mnk.0 * p.mnk.1)
                .max()
                .unwrap_or(0);
            let mut out = vec![0f32; out_len];
            let per = flops(&products);
            let best = time(&products, &bufs, &mut out, repeats);
            let per_1e4 = best * 1e4 / CHUNK as f64;
            println!(
                "gemm layer {case} {name}: {:.1} GFLOP/s, {:.1} ms per 10^4 edges (one thread)",
                per / best / 1e9,
                per_1e4 * 1e3
            );
            println!(
                "RESULT {{\"case\": \"{case}\", \"pass\": \"{name}\", \"gflops\": {:.3}, \
                 \"flops\": {per}, \"seconds_per_1e4_edges\": {per_1e4}}}",
                per / best / 1e9
            );
        }
    }
}
