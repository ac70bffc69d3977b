"""The SO(2) layer's GEMMs in PyTorch, beside matscale's `linalg::gemm` (bench `gemm`).

Same products, shapes and strides as crates/equivariant/benches/gemm.rs: for one chunk of the
fused layer, at the layer's own chunk size (128 or 256 edges by its packed weight count),
per-edge C -> C and EquiformerV2's gathered 2C -> C message layer: the forward `x·W`,
input-gradient `g·Wᵀ` and weight-gradient `xᵀ·g` products of every order (three per order
m > 0: the 3-multiplication complex product), the activations as column blocks of
`[chunk, trunc·C]` buffers, accumulated with `torch.addmm` into a preallocated output (as
`gemm` accumulates), f32, one thread; plus a 512³ product.

  python gemm_torch.py bench      PyTorch alone (RESULT lines like the Rust bench's)
  python gemm_torch.py [compare]  the Rust bench (cargo bench -p matscale-equivariant --bench
                                  gemm), then PyTorch, then a table
                                  (= cargo xtask bench gemm --reference)

Versions used for the figures in docs/BENCHMARKS.md: torch 2.15.0, Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

def layer_chunk(weights: int) -> int:
    """Edges per chunk of the fused layer for `weights` packed weights, as gemm.rs
    (`matscale_equivariant::so2::fused_chunk_cap`: 128 under 1 M, 256 above)."""
    return 128 if weights < 1 << 20 else 256


# (lmax, mmax, C_in, C_out, case suffix): the per-edge layers, then EquiformerV2's gathered
# message layers (cat(x[src], x[dst]): 2C -> C), as in gemm.rs.
CASES = [(4, 2, 64, 64, ""), (6, 4, 128, 128, ""), (4, 2, 128, 64, "_gather"),
         (6, 4, 256, 128, "_gather")]


def layer_products(lmax: int, mmax: int, c_in: int, c_out: int):
    """((row length in, out), chunk, {pass: [(m, n, k, x_off, g_off, kind)]}) as in gemm.rs.

    kind: "w" (x·W), "wt" (g·Wᵀ, with Wᵀ stored contiguous as the layer's backward does) or
    "act" (xᵀ·g); W of order block i is [k, n], k = n_l·C_in, n = n_l·C_out."""
    sizes = [lmax + 1 - m for m in range(mmax + 1)]
    trunc = sizes[0] + 2 * sum(sizes[1:])
    weights = sum(n_l * c_in * n_l * c_out + n_l * c_out if m == 0 else 3 * n_l * c_in * n_l * c_out
                  for m, n_l in enumerate(sizes))
    chunk = layer_chunk(weights)
    passes = {"forward": [], "input_grad": [], "weight_grad": []}
    slot = 0
    for m, n_l in enumerate(sizes):
        k, n = n_l * c_in, n_l * c_out
        for i in range(1 if m == 0 else 3):
            x_off = slot * c_in + (k if i == 2 else 0)
            g_off = slot * c_out + (n if i == 2 else 0)
            passes["forward"].append((chunk, n, k, x_off, g_off, "w"))
            passes["input_grad"].append((chunk, k, n, x_off, g_off, "wt"))
            passes["weight_grad"].append((k, n, chunk, x_off, g_off, "act"))
        slot += n_l if m == 0 else 2 * n_l
    return (trunc * c_in, trunc * c_out), chunk, passes


def best_of(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(repeats: int):
    torch.set_num_threads(1)
    results = []
    a = torch.full((512, 512), 0.5)
    b = torch.full((512, 512), 0.25)
    out = torch.zeros(512, 512)
    flops = 2.0 * 512**3
    best = best_of(lambda: torch.addmm(out, a, b, out=out), repeats * 4)
    results.append({"case": "square512", "gflops": flops / best / 1e9, "flops": flops})
    for lmax, mmax, c_in, c_out, form in CASES:
        (rs_in, rs_out), chunk, passes = layer_products(lmax, mmax, c_in, c_out)
        fill = lambda rows, cols, period: (
            ((torch.arange(rows * cols) % period).float() - period // 2).mul(0.01).reshape(rows, cols))
        x = fill(chunk, rs_in, 89)
        g = fill(chunk, rs_out, 83)
        for name, products in passes.items():
            ops = []
            for m, n, k, x_off, g_off, kind in products:
                if kind == "act":
                    lhs = x[:, x_off:x_off + m].t()  # xᵀ: [k, chunk], strided
                    rhs = g[:, g_off:g_off + n]
                elif kind == "w":
                    lhs = x[:, x_off:x_off + k]
                    rhs = fill(k, n, 97)
                else:  # g·Wᵀ (n = n_l·C_in, k = n_l·C_out): the layer keeps Wᵀ contiguous
                    lhs = g[:, g_off:g_off + k]
                    rhs = fill(k, n, 97)
                ops.append((torch.zeros(m, n), lhs, rhs))

            def run(ops=ops):
                for o, lhs, rhs in ops:
                    torch.addmm(o, lhs, rhs, out=o)

            flops = sum(2.0 * m * n * k for m, n, k, _, _, _ in products)
            best = best_of(run, repeats)
            results.append({
                "case": f"l{lmax}_m{mmax}_c{c_out}{form}", "pass": name, "gflops": flops / best / 1e9,
                "chunk": chunk, "flops": flops, "seconds_per_1e4_edges": best * 1e4 / chunk,
            })
    return results


def rust_results(repeats: int):
    cmd = ["cargo", "bench", "-q", "-p", "matscale-equivariant", "--bench", "gemm"]
    env = dict(**__import__("os").environ, MATSCALE_BENCH_REPEATS=str(repeats),
               RAYON_NUM_THREADS="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines()
            if line.startswith("RESULT ")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", nargs="?", default="compare", choices=["bench", "compare"])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.mode == "bench":
        for r in bench(a.repeats):
            print("RESULT " + json.dumps(r))
        return
    ours = rust_results(a.repeats)
    theirs = bench(a.repeats)
    peak = next((r for r in ours if r["case"] == "fma_peak"), None)
    ours = [r for r in ours if r["case"] != "fma_peak"]
    print(f"torch {torch.__version__}, one thread each, f32, best of {a.repeats}")
    if peak is not None:
        print(f"FMA peak of one core ({peak['isa']}, matscale's bench): {peak['gflops']:.1f} GFLOP/s")
    print("| case | chunk | pass | matscale GFLOP/s | torch GFLOP/s | matscale ms / 10⁴ edges "
          "| torch ms / 10⁴ edges | ms / 10⁴ edges at the FMA peak |")
    print("|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["case"], r.get("pass", ""))
    by = {key(r): r for r in theirs}
    for r in ours:
        t = by.get(key(r))
        if t is None:
            sys.exit(f"no torch result for {key(r)}")
        ms = lambda x, k="seconds_per_1e4_edges": f"{x[k] * 1e3:.0f}" if x.get(k) is not None else "–"
        print(f"| {r['case']} | {r.get('chunk', '–')} | {r.get('pass', 'peak')} "
              f"| {r['gflops']:.1f} | {t['gflops']:.1f} "
              f"| {ms(r)} | {ms(t)} | {ms(r, 'seconds_per_1e4_edges_at_fma_peak')} |")

if __name__ == "__main__":
    main()
