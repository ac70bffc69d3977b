#!/usr/bin/env bash
# Side-by-side: matscale's fused rotate -> SO(2) conv -> rotate_inv layer (criterion, f32)
# against the fairchem-style PyTorch reference (dense bmm, 2 threads, f32), same sizes, same
# machine, one configuration at a time (PyTorch, then matscale), then a table of ratios.
# Usage: crates/equivariant/benches/so2_compare.sh [edges [--configs "4,2,64;6,4,128"] [--threads 2]]
# (default 10000 edges, all four configurations, 2 threads)
# Needs a Python with torch (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/../../.."
EDGES="${1:-10000}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" crates/equivariant/benches/so2_torch.py compare --edges "$EDGES" --repeats 5 "${@:2}"
