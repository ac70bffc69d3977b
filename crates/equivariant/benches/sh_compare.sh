#!/usr/bin/env bash
# Side-by-side benchmark of spherical harmonics: e3nn (warm, 2 threads) then matscale (criterion),
# same sizes (10^6 vectors, normalize, component). Usage, from the repository root:
#   crates/equivariant/benches/sh_compare.sh [path/to/python]
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/../../.."
echo "== $(date -u +%FT%TZ) $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" crates/equivariant/benches/sh_e3nn.py
RAYON_NUM_THREADS=2 cargo bench -q -p matscale-equivariant --bench sh -- spherical_harmonics/forward 2>&1 \
    | grep -E "^spherical_harmonics|time:"
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
