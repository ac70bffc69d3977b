"""ASE's EMT on the same structures as `cargo bench --bench emt`, side by side.

Usage (from the repository root):

    python crates/structures/benches/emt_ase.py [--n 256] [--skip-cargo]

1. `cargo xtask data gen --n N --seed 0` writes the first N structures of the default generator
   (32-atom fcc alloys, EMT-labelled by matscale) to target/emt_bench/alloys.extxyz; these are
   the structures the criterion bench labels.
2. ASE 3.29's EMT labels them (energy, forces, stress; one thread, a fresh calculator per
   structure) and the results are compared with matscale's labels in the file.
3. Unless --skip-cargo, `cargo bench -p matscale-structures --bench emt` runs and the
   throughputs are put side by side.
"""

import argparse
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import ase  # noqa: E402
import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402


def label_all(frames):
    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = EMT()
        out.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="number of structures (the bench uses 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats for ASE (best is kept)")
    ap.add_argument("--skip-cargo", action="store_true", help="do not run the criterion bench")
    args = ap.parse_args()

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    path = os.path.join(root, "target", "emt_bench", "alloys.extxyz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(["cargo", "xtask", "data", "gen", "--n", str(args.n), "--seed", "0", "-o", path],
                   cwd=root, check=True)
    frames = ase.io.read(path, index=":")
    natoms = sorted({len(a) for a in frames})

    ours = [(a.get_potential_energy(), a.get_forces(), a.get_stress()) for a in frames]
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ase_results = label_all(frames)
        best = min(best, time.perf_counter() - t0)
    de = max(abs(e1 - e2) for (e1, _, _), (e2, _, _) in zip(ours, ase_results))
    df = max(np.abs(f1 - f2).max() for (_, f1, _), (_, f2, _) in zip(ours, ase_results))
    ds = max(np.abs(s1 - s2).max() for (_, _, s1), (_, _, s2) in zip(ours, ase_results))
    ase_rate = len(frames) / best
    print(f"ASE {ase.__version__} EMT, 1 thread: {len(frames)} structures of {natoms} atoms "
          f"in {best:.3f} s = {ase_rate:.1f} structures/s")
    print(f"matscale vs ASE on these structures: max |dE| {de:.1e} eV, max |dF| {df:.1e} eV/A, "
          f"max |dsigma| {ds:.1e} eV/A^3 (extxyz stores full precision)")

    if args.skip_cargo:
        return
    bench = subprocess.run(
        ["cargo", "bench", "-p", "matscale-structures", "--bench", "emt", "--", "32-atom"],
        cwd=root, check=True, capture_output=True, text=True)
    sys.stdout.write("\n".join(l for l in bench.stdout.splitlines() if "time:" in l or "thrpt:" in l or l.startswith("emt/")) + "\n")
    unit = {"elem/s": 1.0, "Kelem/s": 1e3, "Melem/s": 1e6}
    name = None
    for line in bench.stdout.splitlines():
        if line.startswith("emt/"):
            name = line.strip()
        m = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+) ", line)
        if m and name:
            rate = float(m.group(1)) * unit[m.group(2)]
            print(f"{name}: {rate:,.0f} structures/s = {rate / ase_rate:.0f}x ASE")
            name = None


if __name__ == "__main__":
    main()
