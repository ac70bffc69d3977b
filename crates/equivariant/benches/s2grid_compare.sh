#!/usr/bin/env bash
# Side-by-side run of the S2-activation and segment benchmarks: the PyTorch reference
# (fairchem's formulation, 2 threads) and matscale's criterion benches, in one go.
# Usage: crates/equivariant/benches/s2grid_compare.sh [path/to/python]
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY="${1:-python3}"
echo "== PyTorch reference (best / median seconds) =="
"$PY" crates/equivariant/benches/s2grid_torch.py
echo "== matscale (criterion: [low estimate high]) =="
RAYON_NUM_THREADS=2 cargo bench -p matscale-equivariant --bench segment --bench s2grid -- --noplot 2>&1 \
  | grep -E "^(segment|s2_act)/|time:"
