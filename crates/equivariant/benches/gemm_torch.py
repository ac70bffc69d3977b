"""The SO(2) layer's GEMMs in PyTorch, beside matscale's `linalg::gemm` (bench `gemm`).

Same products, shapes and strides as crates/equivariant/benches/gemm.rs: for one 256-edge
chunk of the fused layer, the forward `x·W`, input-gradient `g·Wᵀ` and weight-gradient `xᵀ·g`
products of every order (three per order m > 0: the 3-multiplication complex product), the
activations as column blocks of an `[256, trunc·C]` buffer, accumulated with `torch.addmm`
into a preallocated output (as `gemm` accumulates), f32, one thread; plus a 512³ product.

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

CHUNK = 256


def layer_products(lmax: int, mmax: int, c: int):
    """(row stride, {pass: [(m, n, k, lhs, rhs, rhs_is_act)]}) as in gemm.rs."""
    sizes = [lmax + 1 - m for m in range(mmax + 1)]
    trunc = sizes[0] + 2 * sum(sizes[1:])
    rs = trunc * c
    passes = {"forward": [], "input_grad": [], "weight_grad": []}
    slot = 0
    for m, n_l in enumerate(sizes):
        k = n_l * c
        for i in range(1 if m == 0 else 3):
            off = slot * c + (k if i == 2 else 0)
            passes["forward"].append((CHUNK, k, k, off, "w"))
            passes["input_grad"].append((CHUNK, k, k, off, "wt"))
            passes["weight_grad"].append((k, k, CHUNK, off, "act"))
        slot += n_l if m == 0 else 2 * n_l
    return rs, passes


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
    for lmax, mmax, c in [(4, 2, 64), (6, 4, 128)]:
        rs, passes = layer_products(lmax, mmax, c)
        act = ((torch.arange(CHUNK * rs) % 89).float() - 44.0).mul(0.01).reshape(CHUNK, rs)
        for name, products in passes.items():
            ops = []
            for m, n, k, off, kind in products:
                if kind == "act":
                    lhs = act[:, off:off + m].t()  # xᵀ: [k_out, CHUNK], strided
                    rhs = act[:, off:off + n]
                else:
                    w = ((torch.arange(k * n) % 97).float() - 48.0).mul(0.01).reshape(k, n)
                    lhs = act[:, off:off + k]
                    rhs = w if kind == "w" else w.t()
                ops.append((torch.zeros(m, n), lhs, rhs))

            def run(ops=ops):
                for o, lhs, rhs in ops:
                    torch.addmm(o, lhs, rhs, out=o)

            flops = sum(2.0 * m * n * k for m, n, k, _, _ in products)
            best = best_of(run, repeats)
            results.append({
                "case": f"l{lmax}_m{mmax}_c{c}", "pass": name, "gflops": flops / best / 1e9,
                "flops": flops, "seconds_per_1e4_edges": best * 1e4 / CHUNK,
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
    print(f"torch {torch.__version__}, one thread each, f32, best of {a.repeats}")
    print("| case | pass | matscale GFLOP/s | torch GFLOP/s | matscale ms / 10⁴ edges | torch ms / 10⁴ edges |")
    print("|---|---|---|---|---|---|")
    key = lambda r: (r["case"], r.get("pass", ""))
    by = {key(r): r for r in theirs}
    for r in ours:
        t = by.get(key(r))
        if t is None:
            sys.exit(f"no torch result for {key(r)}")
        ms = lambda x: f"{x['seconds_per_1e4_edges'] * 1e3:.0f}" if "seconds_per_1e4_edges" in x else "–"
        print(f"| {r['case']} | {r.get('pass', 'peak')} | {r['gflops']:.1f} | {t['gflops']:.1f} | {ms(r)} | {ms(t)} |")


if __name__ == "__main__":
    main()
