#!/usr/bin/env bash
# Side by side: training and inference throughput (structures/s) of matscale (candle, Rust)
# against PyTorch Geometric's SchNet and a PyTorch ADiT Transformer, same data (mlearn Si
# training set), same batches, same hyper-parameters, both with THREADS threads (default 2).
# For each case the PyTorch side runs first, then matscale, so that both see the same load;
# then a table of best and median structures/s and the ratio matscale / PyTorch.
#
# Usage: crates/trainer/benches/throughput_compare.sh [--structures 48] [--reps 3] [--warmup 2]
#        [--cases schnet-conservative,schnet-direct,transformer-direct]
# Environment: PYTHON (default python3; needs torch, torch_geometric,
# ase), THREADS (default 2), OUT (JSON lines are also written there; default a temp file).
set -euo pipefail
cd "$(dirname "$0")/../../.."
THREADS="${THREADS:-2}"
PYTHON="${PYTHON:-python3}"
CASES="schnet-conservative,schnet-direct,transformer-direct"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cases) CASES="$2"; shift 2 ;;
    --structures|--reps|--warmup) ARGS+=("$1" "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$(mktemp -t throughput.XXXXXX.jsonl)}"
: > "$OUT"

# Build once; find the bench executable from cargo's JSON messages.
BIN=$(cargo bench -p matscale-trainer --bench throughput --no-run --message-format=json 2>/dev/null \
  | "$PYTHON" -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="throughput" and m.get("executable"):
        print(m["executable"])')
[[ -x "$BIN" ]] || { echo "could not build the throughput bench" >&2; exit 1; }

echo "machine: $(nproc) cores, $(uptime | sed 's/.*load/load/'); threads $THREADS" >&2
IFS=, read -ra LIST <<< "$CASES"
for c in "${LIST[@]}"; do
  echo "== $c: PyTorch" >&2
  "$PYTHON" -W ignore crates/trainer/benches/throughput_torch.py --threads "$THREADS" --cases "$c" "${ARGS[@]}" | tee -a "$OUT"
  echo "== $c: matscale" >&2
  RAYON_NUM_THREADS="$THREADS" "$BIN" --cases "$c" "${ARGS[@]}" | tee -a "$OUT"
done
echo "after: $(uptime | sed 's/.*load/load/')" >&2

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ours = {(r["case"], r["phase"]): r for r in rows if r["impl"] == "matscale"}
print()
print("| case | phase | reference | ref best | ref median | matscale best | matscale median | ratio (median) | ratio (best) |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    if r["impl"] == "matscale" or (r["case"], r["phase"]) not in ours:
        continue
    m = ours[(r["case"], r["phase"])]
    rb, rm = r["best_structures_per_s"], r["median_structures_per_s"]
    mb, mm = m["best_structures_per_s"], m["median_structures_per_s"]
    print(f"| {r['case']} | {r['phase']} | {r['impl']} | {rb:.2f} | {rm:.2f} | {mb:.2f} | {mm:.2f} "
          f"| {mm / rm:.2f}x | {mb / rb:.2f}x |")
refs = {(r["case"], r["phase"]) for r in rows if r["impl"] != "matscale"}
for (case, phase), m in ours.items():
    if (case, phase) not in refs:
        print(f"| {case} | {phase} | — | | | {m['best_structures_per_s']:.2f} | "
              f"{m['median_structures_per_s']:.2f} | | |")
print(f"\n(structures/s; {rows[0]['structures']} structures, {rows[0]['atoms']} atoms per repetition; "
      f"JSON lines in {sys.argv[1]})")
EOF
