//! The GEMM ceiling of the fused SO(2) layer: [`linalg::gemm`] alone, on one thread, on the
//! products the layer runs for one 256-edge chunk (same shapes; edge rows of the m-major
//! `[256, trunc, C]` buffers, the packed weights), without the rotations, radial scaling or
//! anything else. One difference: for each order `m > 0` the layer's first product reads a
//! compact `[256, n_l·C]` sum `x₊ + x₋` (or `g₊ + g₋`); here it reads the strided buffer too. With `lmax` 6, `mmax` 4, 128 channels this is the floor of
//! the layer's time: no rotation or fusion can make the layer faster than its GEMMs.
//!
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

/// One GEMM of the layer: `(m, n, k)`, the left operand's `(offset, row stride, column
/// stride)` in the activation buffer, the right operand's in the weights (or the gradient).
#[derive(Clone, Copy)]
struct Product {
    mnk: (usize, usize, usize),
    lhs: (usize, usize, usize),
    rhs: (usize, usize, usize),
    /// Whether the right operand is the activation buffer (the weight gradient `xᵀ·g`).
    rhs_is_act: bool,
}

/// The products of one chunk: forward (`x·W` per order), input gradient (`g·Wᵀ`) and weight
/// gradient (`xᵀ·g`), with the 3-multiplication complex product for `m > 0` (three products
/// per order and direction, each `[256, n_l·C] × [n_l·C, n_l·C]`).
/// Also returns the row stride of the activation buffers (`trunc·C`).
fn layer_products(
    lmax: usize,
    mmax: usize,
    c: usize,
) -> (usize, [(&'static str, Vec<Product>); 3]) {
    // m-major rows: m = 0 holds lmax + 1 degrees, each m > 0 holds 2·(lmax + 1 − m).
    let sizes: Vec<usize> = (0..=mmax).map(|m| lmax + 1 - m).collect();
    let trunc: usize = sizes[0] + 2 * sizes[1..].iter().sum::<usize>();
    let rs = trunc * c;
    let (mut fwd, mut dx, mut dw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut slot, mut woff) = (0, 0);
    for (m, &n_l) in sizes.iter().enumerate() {
        let k = n_l * c;
        let copies = if m == 0 { 1 } else { 3 };
        for i in 0..copies {
            let x_off = slot * c + if i == 2 { k } else { 0 };
            let w_off = woff + i * k * k;
            fwd.push(Product {
                mnk: (CHUNK, k, k),
                lhs: (x_off, rs, 1),
                rhs: (w_off, k, 1),
                rhs_is_act: false,
            });
            dx.push(Product {
                mnk: (CHUNK, k, k),
                lhs: (x_off, rs, 1),
                rhs: (w_off, 1, k),
                rhs_is_act: false,
            });
            dw.push(Product {
                mnk: (k, k, CHUNK),
                lhs: (x_off, 1, rs),
                rhs: (x_off, rs, 1),
                rhs_is_act: true,
            });
        }
        slot += if m == 0 { n_l } else { 2 * n_l };
        woff += copies * k * k;
    }
    (
        rs,
        [("forward", fwd), ("input_grad", dx), ("weight_grad", dw)],
    )
}

fn flops(products: &[Product]) -> f64 {
    products
        .iter()
        .map(|p| 2.0 * (p.mnk.0 * p.mnk.1 * p.mnk.2) as f64)
        .sum()
}

/// Best seconds of `repeats` passes of `products` (after one warm-up pass).
fn time(products: &[Product], act: &[f32], w: &[f32], out: &mut [f32], repeats: usize) -> f64 {
    let pass = |out: &mut [f32]| {
        for p in products {
            let (m, n, k) = p.mnk;
            let rhs_data = if p.rhs_is_act { act } else { w };
            gemm(
                (m, n, k),
                out,
                0,
                n,
                true,
                view(act, p.lhs.0, p.lhs.1, p.lhs.2),
                view(rhs_data, p.rhs.0, p.rhs.1, p.rhs.2),
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

fn main() {
    let repeats = std::env::var("MATSCALE_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    // The layer runs each GEMM on one thread; so does this bench (`Parallelism::None`).
    let square = Product {
        mnk: (512, 512, 512),
        lhs: (0, 512, 1),
        rhs: (0, 512, 1),
        rhs_is_act: false,
    };
    let act = vec![0.5f32; 512 * 512];
    let w = vec![0.25f32; 512 * 512];
    let mut out = vec![0f32; 512 * 512];
    let per = flops(&[square]);
    let best = time(&[square], &act, &w, &mut out, repeats * 4);
    println!(
        "gemm peak 512x512x512: {:.1} GFLOP/s (one thread)",
        per / best / 1e9
    );
    println!(
        "RESULT {{\"case\": \"square512\", \"gflops\": {:.3}, \"flops\": {per}}}",
        per / best / 1e9
    );
    for (lmax, mmax, c) in [(4, 2, 64), (6, 4, 128)] {
        let (trunc_c, passes) = layer_products(lmax, mmax, c);
        for (name, products) in passes {
            let act: Vec<f32> = (0..CHUNK * trunc_c)
                .map(|i| ((i % 89) as f32 - 44.0) * 0.01)
                .collect();
            let w_len = products
                .iter()
                .filter(|p| !p.rhs_is_act)
                .map(|p| p.rhs.0 + p.mnk.1 * p.mnk.2)
                .max()
                .unwrap_or(0);
            let w: Vec<f32> = (0..w_len)
                .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
                .collect();
            let out_len = products
                .iter()
                .map(|p| p.mnk.0 * p.mnk.1)
                .max()
                .unwrap_or(0);
            let mut out = vec![0f32; out_len];
            let per = flops(&products);
            let best = time(&products, &act, &w, &mut out, repeats);
            let per_1e4 = best * 1e4 / CHUNK as f64;
            println!(
                "gemm layer l{lmax}_m{mmax}_c{c} {name}: {:.1} GFLOP/s, {:.1} ms per 10^4 edges \
                 (one thread)",
                per / best / 1e9,
                per_1e4 * 1e3
            );
            println!(
                "RESULT {{\"case\": \"l{lmax}_m{mmax}_c{c}\", \"pass\": \"{name}\", \"gflops\": {:.3}, \
                 \"flops\": {per}, \"seconds_per_1e4_edges\": {per_1e4}}}",
                per / best / 1e9
            );
        }
    }
}
