#!/usr/bin/env bash
# Side-by-side: matscale rotate -> SO(2) conv -> rotate_inv (criterion, f32) against the
# fairchem-style PyTorch reference (dense bmm, 2 threads, f32), same sizes, same machine.
# Usage: crates/equivariant/benches/so2_compare.sh [edges]   (default 10000)
# Needs a Python with torch (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/../../.."
EDGES="${1:-10000}"
PYTHON="${PYTHON:-python3}"
echo "== PyTorch reference"
"$PYTHON" crates/equivariant/benches/so2_torch.py bench --edges "$EDGES" --repeats 5
echo "== matscale"
MATSCALE_BENCH_EDGES="$EDGES" cargo bench -p matscale-equivariant --bench so2 2>/dev/null | grep -E "^so2_layer|time:"
