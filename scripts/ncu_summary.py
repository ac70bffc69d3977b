#!/usr/bin/env python3
"""Device time per kernel name from Nsight Compute CSV summaries.

Usage: scripts/ncu_summary.py NCU.csv [...]   (files from `ncu --metrics gpu__time_duration.sum
--csv --print-summary per-kernel`, as `scripts/gpu-verify.sh profile` writes them)

Prints, per file, the number of kernels, their summed device time and the 40 kernel names
with the most time (launches of one name with different grids are added up).
"""
import collections
import csv
import sys


def main(paths):
    for path in paths:
        with open(path) as f:
            rows = list(csv.DictReader(line for line in f if line.startswith('"')))
        total = collections.defaultdict(lambda: [0, 0.0])
        for r in rows:
            n = int(r["Invocations"])
            mean_ns = float(r["Average"].replace(",", ""))
            entry = total[r["Kernel Name"][:70]]
            entry[0] += n
            entry[1] += n * mean_ns / 1e6
        ms = sum(v[1] for v in total.values())
        count = sum(v[0] for v in total.values())
        print(f"== {path}: {count} kernels, {ms:.1f} ms device time")
        for name, (n, t) in sorted(total.items(), key=lambda kv: -kv[1][1])[:40]:
            print(f"{t:8.2f} ms {n:6d}  {name}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
