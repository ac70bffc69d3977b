#!/usr/bin/env bash
# Side by side: EquiformerV2 forward and forward+backward on the CPU (or a GPU: --device cuda),
# matscale (candle, Rust) against fairchem 1.x (PyTorch), same configuration, same batch (8
# periodic 32-atom fcc alloy cells, 256 atoms, the same edge list), both with THREADS threads
# (default 2), f32, eval mode, warm. Every (config, phase, side) runs in its own process so that its peak RSS
# (ru_maxrss) is that measurement's; for each case fairchem runs first, then matscale, so
# that both see the same machine load. Ends with a table of best / median seconds, the
# speed-up (fairchem / matscale) and the peak memory of both.
#
# Usage: crates/models/benches/equiformer_v2_compare.sh [--configs small,eqv2-s]
#        [--phases forward,forward_backward] [--reps 3] [--warmup 1] [--device cpu|cuda]
# Environment: PYTHON (default python3; needs torch and e3nn), FAIRCHEM (a fairchem source
# checkout at tag fairchem_core-1.9.0 or any 1.x; default /tmp/fairchem, made from the mirror
# if missing: `git --git-dir=<mirror> archive fairchem_core-1.9.0 src | tar -x -C /tmp/fairchem`),
# THREADS (default 2), OUT (JSON lines are also written there; default a temp file), BIN (a
# prebuilt `equiformer_v2` bench executable, e.g. on a GPU machine without cargo; default: build
# it with cargo, adding `--features cuda` for --device cuda). On a GPU an extra row gives the
# device memory peaks: PyTorch's `max_memory_allocated` and the high watermark of the CUDA
# memory pool that candle allocates from, both over the timed repetitions.
set -euo pipefail
cd "$(dirname "$0")/../../.."
THREADS="${THREADS:-2}"
PYTHON="${PYTHON:-python3}"
FAIRCHEM="${FAIRCHEM:-/tmp/fairchem}"
CONFIGS="small,eqv2-s"
PHASES="forward,forward_backward"
REPS=3
WARMUP=1
DEVICE=cpu
while [[ $# -gt 0 ]]; do
  case "$1" in
    --configs) CONFIGS="$2"; shift 2 ;;
    --phases) PHASES="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -d "$FAIRCHEM/src/fairchem/core/models/equiformer_v2" ]] || {
  echo "no fairchem checkout at $FAIRCHEM (set FAIRCHEM; see the header of this script)" >&2
  exit 1
}
OUT="${OUT:-$(mktemp -t equiformer_v2.XXXXXX.jsonl)}"
: > "$OUT"
INPUT="$(mktemp -t equiformer_v2_batch.XXXXXX.json)"

# Build once (unless BIN is given); find the bench executable from cargo's JSON messages.
if [[ -z "${BIN:-}" ]]; then
  FEATURES=()
  [[ "$DEVICE" == cuda ]] && FEATURES=(--features cuda)
  BIN=$(cargo bench -p matscale-models "${FEATURES[@]}" --bench equiformer_v2 --no-run \
    --message-format=json 2>/dev/null \
    | "$PYTHON" -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="equiformer_v2" and m.get("executable"):
        print(m["executable"])')
fi
[[ -x "$BIN" ]] || { echo "could not build the equiformer_v2 bench" >&2; exit 1; }
"$BIN" input "$INPUT"

echo "machine: $(nproc) cores, $(uptime | sed 's/.*load/load/'); threads $THREADS; device $DEVICE" >&2
IFS=, read -ra CLIST <<< "$CONFIGS"
IFS=, read -ra PLIST <<< "$PHASES"
for c in "${CLIST[@]}"; do
  for p in "${PLIST[@]}"; do
    echo "== $c $p: fairchem" >&2
    OMP_NUM_THREADS="$THREADS" "$PYTHON" -W ignore crates/models/benches/equiformer_v2_fairchem.py \
      --fairchem "$FAIRCHEM" --input "$INPUT" --config "$c" --phase "$p" \
      --reps "$REPS" --warmup "$WARMUP" --threads "$THREADS" --device "$DEVICE" | tee -a "$OUT"
    echo "== $c $p: matscale" >&2
    RAYON_NUM_THREADS="$THREADS" "$BIN" compare --config "$c" --phase "$p" \
      --reps "$REPS" --warmup "$WARMUP" --device "$DEVICE" | tee -a "$OUT"
  done
done
echo "after: $(uptime | sed 's/.*load/load/')" >&2

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ours = {(r["config"], r["phase"]): r for r in rows if r["impl"] == "matscale"}
gb = lambda r: r["peak_rss_bytes"] / 1e9
print()
print("| config | phase | fairchem best | fairchem median | matscale best | matscale median "
      "| speed-up (median) | speed-up (best) | fairchem peak | matscale peak | memory ratio |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
gpu = lambda r: r.get("peak_device_bytes")
for r in rows:
    if r["impl"] != "fairchem" or (r["config"], r["phase"]) not in ours:
        continue
    m = ours[(r["config"], r["phase"])]
    print(f"| {r['config']} ({r['parameters']:,} params) | {r['phase']} | {r['best_s']:.2f} s "
          f"| {r['median_s']:.2f} s | {m['best_s']:.2f} s | {m['median_s']:.2f} s "
          f"| {r['median_s'] / m['median_s']:.2f}x | {r['best_s'] / m['best_s']:.2f}x "
          f"| {gb(r):.2f} GB | {gb(m):.2f} GB | {gb(m) / gb(r):.2f} |")
    if gpu(r) is not None:
        ours_gpu = gpu(m)
        theirs = f"{gpu(r) / 1e9:.2f} GB"
        mine, ratio = ("–", "–") if not ours_gpu else (
            f"{ours_gpu / 1e9:.2f} GB", f"{ours_gpu / gpu(r):.2f}")
        print(f"|  |  |  |  |  |  |  | GPU: | {theirs} | {mine} | {ratio} |")
if rows:
    devices = sorted({f"{r['impl']}: {r.get('device', 'cpu')}" for r in rows})
    print(f"\n({rows[0]['atoms']} atoms, {rows[0]['edges']} edges; {', '.join(devices)}; "
          f"JSON lines in {sys.argv[1]})")
EOF
rm -f "$INPUT"
