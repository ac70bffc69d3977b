#!/usr/bin/env bash
# extxyz read speed, matscale vs ASE, on the same ~100 MB file in one run.
# Usage: crates/structures/benches/extxyz_compare.sh [python]   (default python: python3)
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${1:-python3}
uptime
cargo bench -p matscale-structures --bench extxyz 2>&1 | grep -E "benchmark file|^extxyz|time:|thrpt:|sequential read|parallel read"
"$PY" crates/structures/benches/extxyz_ase.py --repeat 3
uptime
