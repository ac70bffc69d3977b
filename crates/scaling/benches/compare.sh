#!/usr/bin/env bash
# Side-by-side timing of the Chinchilla joint fit (240 points, 4500-start grid)
# and 1000 bootstrap refits: matscale (release) and the scipy reference.
# Both print wall-clock and process CPU seconds; on a shared machine compare CPU
# seconds at one thread. The scipy reference is slow, so by default it times
# every 10th grid start (450) and 1000/10 bootstrap refits, scaled up (its JSON
# says how many it ran).
# Usage: crates/scaling/benches/compare.sh [python] [python-starts] [python-bootstrap]
# Criterion statistics: cargo bench -p matscale-scaling --bench chinchilla
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${1:-python3}
STARTS=${2:-450}
BOOT=${3:-100}
echo "cores: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build -q --release -p matscale-scaling --example chinchilla_timing
for threads in 1 2; do
  echo "== matscale, RAYON_NUM_THREADS=$threads"
  RAYON_NUM_THREADS=$threads target/release/examples/chinchilla_timing
done
echo "== scipy reference (one thread), $STARTS grid starts, $BOOT bootstrap refits"
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$PY" crates/scaling/benches/chinchilla_reference.py --starts "$STARTS" --bootstrap "$BOOT"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
