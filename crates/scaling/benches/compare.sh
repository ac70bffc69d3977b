#!/usr/bin/env bash
# Side-by-side timing of the Chinchilla joint fit: matscale (criterion, release)
# and the scipy reference (benches/chinchilla_reference.py).
# Usage: crates/scaling/benches/compare.sh [python] [python-starts] [python-bootstrap]
# The Python reference is slow (~0.1-0.3 s per start): by default it times every
# 10th grid start (450) and 100 bootstrap refits and scales both to the full work.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${1:-/work/venv/py/bin/python}
STARTS=${2:-450}
BOOT=${3:-100}
nproc
for threads in 2 1; do
  echo "== matscale, RAYON_NUM_THREADS=$threads"
  RAYON_NUM_THREADS=$threads cargo bench -q -p matscale-scaling --bench chinchilla -- --noplot 2>&1 | grep -E "^chinchilla|time:"
done
echo "== scipy reference (single thread), $STARTS starts, $BOOT bootstrap refits"
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$PY" crates/scaling/benches/chinchilla_reference.py --starts "$STARTS" --bootstrap "$BOOT"
