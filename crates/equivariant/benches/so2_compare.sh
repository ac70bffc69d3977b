#!/usr/bin/env bash
# Side-by-side: matscale's fused rotate -> SO(2) conv -> rotate_inv layer, per-edge and with the
# message gathered from node features inside the op (bench `so2` in its MATSCALE_BENCH_REPEATS
# mode, f32), against the fairchem-style PyTorch reference (dense bmm; index_select + cat for
# the gathered messages), same sizes, same machine, same statistics (best and median of R runs,
# wall clock and process CPU time), one configuration at a time (PyTorch, then matscale), then a
# table of ratios with the load average.
# Usage: crates/equivariant/benches/so2_compare.sh [edges [--configs "4,2,64;6,4,128"]
#        [--threads 2] [--repeats 5] [--modes layer,gather]]
# (default 10000 edges, all four configurations, 2 threads, 5 repeats, both modes)
# Needs a Python with torch (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/../../.."
EDGES="${1:-10000}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" crates/equivariant/benches/so2_torch.py compare --edges "$EDGES" --repeats 5 "${@:2}"
