"""Neighbour lists at 6 Å on rattled fcc Cu: matscale (criterion) vs matscipy and ASE, one run.

Builds exactly the structures of `neighbors.rs` beside this file (fcc Cu, a = 3.61 Å, supercells
of 10^3, 10^4 and 10^5 atoms, every coordinate rattled by ±0.1 Å with the same MMIX LCG), times
`matscipy.neighbours.neighbour_list('ijdDS', ...)` and `ase.neighborlist.neighbor_list('ijdDS',
...)` on them (best of several runs) right before and after running the criterion bench of the
same size (`cargo bench --bench neighbors`, median), so that both see the same machine load, and
prints a Markdown table.

    /path/to/python crates/structures/benches/bench_neighbors_reference.py [--skip-rust] [--skip-ase]

Needs numpy, ase and matscipy (tested with ase 3.29.0, matscipy 1.3.1).
"""

import argparse
import json
import os
import subprocess
import time

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from matscipy.neighbours import neighbour_list as matscipy_neighbour_list

SIZES = [(5, 5, 10), (10, 10, 25), (25, 25, 40)]
CUTOFF = 6.0
MASK = (1 << 64) - 1
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def rattled_fcc_cu(reps):
    a = 3.61
    basis = [(0.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.5, 0.0, 0.5), (0.5, 0.5, 0.0)]
    state = 12345
    positions = []
    for i in range(reps[0]):
        for j in range(reps[1]):
            for k in range(reps[2]):
                for b in basis:
                    p = [(i + b[0]) * a, (j + b[1]) * a, (k + b[2]) * a]
                    for c in range(3):
                        state = (state * 6364136223846793005 + 1442695040888963407) & MASK
                        p[c] += 0.2 * ((state >> 11) / float(1 << 53) - 0.5)
                    positions.append(p)
    cell = np.diag([r * a for r in reps])
    return Atoms(numbers=[29] * len(positions), positions=positions, cell=cell, pbc=True)


def best_time(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cargo_bench(*extra):
    subprocess.run(
        ["cargo", "bench", "-p", "matscale-structures", "--bench", "neighbors", *extra],
        cwd=ROOT,
        check=True,
    )


def rust_time(n):
    """Runs the criterion bench of one size; returns its median time (s)."""
    cargo_bench("--", f"^neighbor_list_fcc_cu_6A/{n}$", "--warm-up-time", "1", "--measurement-time", "4")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    path = os.path.join(target, "criterion", "neighbor_list_fcc_cu_6A", str(n), "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"] * 1e-9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-rust", action="store_true", help="only time the Python references")
    parser.add_argument("--skip-ase", action="store_true", help="do not time ASE (slow at 10^5 atoms)")
    args = parser.parse_args()
    if not args.skip_rust:
        cargo_bench("--no-run")

    # matscipy is timed right before and right after the Rust bench of the same size, so that
    # both see the same machine load (the best of the two is reported).
    rows = []
    for reps in SIZES:
        atoms = rattled_fcc_cu(reps)
        n = len(atoms)
        repeats = 5 if n <= 10_000 else 2
        msp = lambda: matscipy_neighbour_list("ijdDS", atoms, CUTOFF)  # noqa: E731
        t_before, out = best_time(msp, repeats)
        pairs = len(out[0])
        ours = rust_time(n) if not args.skip_rust else None
        t_after, _ = best_time(msp, repeats)
        t_msp = min(t_before, t_after)
        t_ase = None
        if not args.skip_ase:
            t_ase, out_ase = best_time(lambda: ase_neighbor_list("ijdDS", atoms, CUTOFF), 1 if n > 10_000 else 3)
            assert len(out_ase[0]) == pairs, "ASE and matscipy disagree on the pair count"
        rows.append((n, pairs, ours, t_msp, t_ase))
        print(f"{n} atoms: {pairs} pairs, matscale {ours}, matscipy {t_before:.4f}/{t_after:.4f} s, ase {t_ase}")

    print()
    print("| atoms | pairs | matscale median (s) | matscale µs/atom | matscipy best (s) | matscipy µs/atom | ASE (s) | matscipy / matscale |")
    print("|---|---|---|---|---|---|---|---|")
    for n, pairs, ours, t_msp, t_ase in rows:
        ase_s = f"{t_ase:.3f}" if t_ase is not None else "–"
        if ours is None:
            print(f"| {n} | {pairs} | – | – | {t_msp:.4f} | {t_msp / n * 1e6:.2f} | {ase_s} | – |")
        else:
            print(
                f"| {n} | {pairs} | {ours:.4f} | {ours / n * 1e6:.2f} | {t_msp:.4f} | {t_msp / n * 1e6:.2f} | "
                f"{ase_s} | {t_msp / ours:.2f}x |"
            )


if __name__ == "__main__":
    main()
