#!/usr/bin/env bash
# GPU verification of matscale's `cuda` feature, in two halves: build here (no GPU needed),
# run on a GPU machine that has the NVIDIA driver and a Python with torch + e3nn but no Rust.
#
#   scripts/gpu-verify.sh build          # here: CUDA 13.0 toolkit (cargo xtask cuda-env), release
#                                        # builds with --features cuda, stripped binaries packed
#                                        # into target/gpu-stage/matscale-gpu.tar.xz
#   scripts/gpu-verify.sh ab [OUTDIR]    # there: matscale's EquiformerV2 step, staged builds
#                                        # alternately (AB_STAGES; see `ab` below)
#   scripts/gpu-verify.sh ab-switches [OUTDIR]  # there: the same for one stage with each
#                                        # kernel-path switch flipped (`ab_switches`)
#   scripts/gpu-verify.sh run [OUTDIR]   # there, from the repository root, with target/gpu-stage
#                                        # carried: the CUDA kernel tests (every kernel against the
#                                        # CPU, values and gradients), `bench kernels --device cuda`
#                                        # with the e3nn/PyTorch reference side by side and the
#                                        # AdamW step bench (per variable, in place; and
#                                        # PyTorch's), two-epoch training runs of every model
#                                        # family on the GPU, EquiformerV2 forward and
#                                        # forward+backward against fairchem 1.x on the same GPU
#                                        # (crates/models/benches/equiformer_v2_compare.sh), and
#                                        # with both the whole eqV2-S step with the optimiser on
#                                        # each side (whole-step.log). Logs and
#                                        # JSON go to OUTDIR (default $OUT, else target/gpu-out).
#
# With the device tool: after `build`, run
#   command: bash scripts/gpu-verify.sh run "$OUT"     carry: ["target/gpu-stage"]
# The CUDA libraries (cuBLAS, cuRAND, NVRTC, runtime) come from the machine's PyTorch venv
# (python3 -c 'import nvidia'): never put the toolkit's lib/stubs on LD_LIBRARY_PATH there,
# the stub libcuda.so.1 would hide the driver's.
# Environment: TARGET_DIR (default /work/target-cuda), CUDA_COMPUTE_CAP (default 90),
# SANITIZE=1 to also run the kernel tests under compute-sanitizer, FAIRCHEM (build: a fairchem
# 1.x source checkout whose EquiformerV2 and SCN model folders, about 0.5 MB, are staged for the
# GPU machine; default /tmp/fairchem, see equiformer_v2_compare.sh; without it the EquiformerV2
# comparison is skipped), EQV2_REPS (run: timed repetitions, default 5). Each step of `run` has
# its own time limit (seconds: T_TESTS 150, T_CHECK 90 per model, T_BENCH 180, T_EQV2 200,
# T_TRAIN 60 per model family) so that one
# hung or slow step cannot eat the lease: the steps after it still run and report.
# STAGE_BINS (build: a space list of the binaries to stage, default all four: xtask, cuda-tests,
# equiformer-v2-bench, adamw-bench; an A/B stage needs only equiformer-v2-bench and
# cuda-tests). STEPS (run: a comma list of tests, check, bench, eqv2, train, and adamw for the AdamW bench alone (bench
# runs it too); default all but adamw) picks steps. STAGE (default
# target/gpu-stage) names the staged folder, so two builds can travel together for an A/B in one
# device call:
#   git checkout A && STAGE=target/gpu-stage-a scripts/gpu-verify.sh build
#   git checkout B && STAGE=target/gpu-stage-b scripts/gpu-verify.sh build
#   device: for v in a b; do STAGE=target/gpu-stage-$v STEPS=tests,bench \
#             bash scripts/gpu-verify.sh run "$OUT/$v"; done     carry both stages
# (each such run returns 4 files; the device tool returns at most 8).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE="${STAGE:-target/gpu-stage}"
# The steps of `run` (a comma list of tests, check, bench, eqv2, train).
STEPS="${STEPS:-tests,check,bench,eqv2,train}"
want() { [[ ",$STEPS," == *",$1,"* ]]; }

setup_bins() {
    bin=/tmp/matscale-gpu
    rm -rf "$bin" && mkdir -p "$bin"
    tar -C "$bin" -xJf "$STAGE/matscale-gpu.tar.xz"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "${work:-/tmp}/device.txt"
    # The CUDA 13 libraries of the PyTorch venv (every folder under nvidia/ holding a .so).
    local libs
    libs=$(python3 - <<'PY'
import glob, os, nvidia
dirs = set()
for p in nvidia.__path__:
    for f in glob.glob(os.path.join(p, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
    # The machine's own toolkit as a fallback (its lib64, never lib64/stubs).
    local d
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && libs="$libs:$d"
    done
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    for b in xtask cuda-tests equiformer-v2-bench adamw-bench; do
        # A stage cut down with STAGE_BINS lacks some.
        [ -e "$bin/bin/$b" ] || continue
        if ldd "$bin/bin/$b" | grep "not found"; then
            echo "missing libraries for $b (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2
            exit 1
        fi
    done
}

# Unpacks the staged fairchem sources and prints their folder.
unpack_fairchem() {
    local fc=/tmp/matscale-fairchem
    rm -rf "$fc" && mkdir -p "$fc"
    tar -C "$fc" -xJf "$STAGE/fairchem-src.tar.xz"
    echo "$fc"
}

# Where the time of one EquiformerV2 step goes on the GPU: every kernel of one forward and one
# forward+backward of matscale under Nsight Compute (device time per kernel name, one metric,
# no replay), the wall time of each, and fairchem's step under torch.profiler, into OUTDIR.
profile() {
    local out="${1:-${OUT:-target/gpu-out}}"
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    setup_bins
    local ncu
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
    local input=/tmp/matscale-eqv2-input.json
    "$bin/bin/equiformer-v2-bench" input "$input"
    local fc
    fc=$(unpack_fairchem)
    local c p
    for c in ${PROFILE_CONFIGS:-eqv2-s}; do
        for p in ${PROFILE_PHASES:-forward forward_backward}; do
            echo "== $c $p"
            "$bin/bin/equiformer-v2-bench" compare --config "$c" --phase "$p" --reps 5 \
                --warmup 2 --device cuda | tee -a "$out/profile-wall.jsonl"
            timeout "${T_PROFILE:-120}" "$ncu" --metrics gpu__time_duration.sum --csv \
                --print-summary per-kernel "$bin/bin/equiformer-v2-bench" compare --config "$c" \
                --phase "$p" --reps 1 --warmup 0 --device cuda \
                > "$out/ncu-$c-$p.csv" 2> "$out/ncu-$c-$p.err" || echo "ncu failed: $(tail -n 3 "$out/ncu-$c-$p.err")"
            timeout 120 python3 -W ignore crates/models/benches/equiformer_v2_fairchem.py \
                --fairchem "$fc" --input "$input" --config "$c" --phase "$p" --reps 5 \
                --warmup 2 --device cuda --profile "$out/torch-$c-$p.txt" \
                | tee -a "$out/profile-wall.jsonl" || echo "fairchem profile failed"
        done
    done
}

# A/B of matscale's EquiformerV2 step between staged builds on one GPU: AB_STAGES (a comma
# list of stage folders; only bin/equiformer-v2-bench is needed in each, so a stage can be cut
# down to that binary to fit the carry limit) run alternately, AB_ROUNDS rounds (default 2) of
# `compare` for each of AB_CONFIGS (default eqv2-s) and AB_PHASES (default forward_backward),
# JSON lines tagged with the stage into OUTDIR/ab.jsonl.
ab() {
    local out="${1:-${OUT:-target/gpu-out}}"
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    local stages
    IFS=, read -ra stages <<< "${AB_STAGES:?set AB_STAGES to a comma list of stage folders}"
    # AB_ENVS: optional comma list, one `VAR=value` (or empty) per stage, e.g. the same stage
    # twice with MATSCALE_S2_CHUNK_BYTES=0 and =16777216.
    local envs=()
    IFS=, read -ra envs <<< "${AB_ENVS:-}"
    local root=/tmp/matscale-ab i
    rm -rf "$root"
    for i in "${!stages[@]}"; do
        mkdir -p "$root/$i"
        tar -C "$root/$i" -xJf "${stages[$i]}/matscale-gpu.tar.xz" bin/equiformer-v2-bench
    done
    # The libraries (and device.txt) as for `run`, from the first stage.
    STAGE="${stages[0]}"
    work="$out" setup_bins
    local round c p
    for round in $(seq "${AB_ROUNDS:-2}"); do
        for c in ${AB_CONFIGS:-eqv2-s}; do
            for p in ${AB_PHASES:-forward_backward}; do
                for i in "${!stages[@]}"; do
                    echo "== round $round, $c $p, ${stages[$i]} ${envs[$i]:-}"
                    timeout 120 env ${envs[$i]:-} "$root/$i/bin/equiformer-v2-bench" compare --config "$c" \
                        --phase "$p" --reps "${EQV2_REPS:-5}" --warmup 2 --device cuda \
                        | sed "s|^{|{\"stage\": \"${stages[$i]}\", \"env\": \"${envs[$i]:-}\", \"round\": $round, |" \
                        | tee -a "$out/ab.jsonl"
                done
            done
        done
    done
    ab_summary "$out/ab.jsonl" | tee "$out/ab-summary.txt"
}

# One line per (config, phase, build): its best and median step over all rounds, and the
# ratio of the first build's median to its own (> 1: faster than the first).
ab_summary() {
    python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
groups = {}
for r in rows:
    key = (r["config"], r["phase"])
    build = (r.get("stage", "") + " " + r.get("env", "")).strip()
    groups.setdefault(key, {}).setdefault(build, []).extend(r["seconds"])
for (config, phase), builds in groups.items():
    first = None
    for build, secs in builds.items():
        med = statistics.median(secs)
        first = first or med
        print(f"{config:8} {phase:17} best {min(secs)*1e3:8.2f} ms  median {med*1e3:8.2f} ms"
              f"  x{first/med:5.3f}  {build}")
PY
}

# The kernel-path switches (crates/equivariant/src/switch.rs) A/B'd on one stage: the
# defaults, each switch flipped alone, then all of them on, through `ab` (AB_ROUNDS,
# AB_CONFIGS, AB_PHASES as there; AB_CONFIGS defaults to "small eqv2-s" here). SWITCHES holds
# `VARIABLE:default` (1 on, 0 off); keep it in step with switch.rs `ALL` (a unit test checks).
SWITCHES="MATSCALE_S2_FUSED:1 MATSCALE_WIGNER_TWO_PASS:0 MATSCALE_LN_SH_CUDA:1"
# `VARIABLE=1` for every switch, space-separated (an `env` prefix).
all_switches_on() {
    local v out=""
    for v in $SWITCHES; do out="${out:+$out }${v%%:*}=1"; done
    echo "$out"
}
ab_switches() {
    local stages="$STAGE" envs="" v
    for v in $SWITCHES; do
        stages="$stages,$STAGE"
        envs="$envs,${v%%:*}=$((1 - ${v##*:}))"
    done
    AB_STAGES="$stages,$STAGE" AB_ENVS="$envs,$(all_switches_on)" \
        AB_CONFIGS="${AB_CONFIGS:-small eqv2-s}" ab "$@"
}

build() {
    local td="${TARGET_DIR:-/work/target-cuda}"
    eval "$(cargo xtask cuda-env --compute-cap "${CUDA_COMPUTE_CAP:-90}")"
    echo "== building with --features cuda into $td (the first build of candle's kernels takes ~10 min on 2 cores)"
    # One feature set for both (xtask and the equivariant tests), so candle is built once.
    cargo build --release --features cuda -p xtask -p matscale-equivariant --target-dir "$td"
    local tests
    tests=$(cargo test --release --features cuda -p xtask -p matscale-equivariant --test cuda \
        --no-run --target-dir "$td" 2>&1 | tee /dev/stderr \
        | sed -n 's/.*Executable tests\/cuda.rs (\(.*\))/\1/p')
    [ -x "$tests" ] || { echo "could not find the cuda test binary" >&2; exit 1; }
    local eqv2
    eqv2=$(cargo bench --features cuda -p matscale-models --bench equiformer_v2 --no-run \
        --target-dir "$td" 2>&1 | tee /dev/stderr \
        | sed -n 's/.*Executable benches\/equiformer_v2.rs (\(.*\))/\1/p')
    [ -x "$eqv2" ] || { echo "could not find the equiformer_v2 bench binary" >&2; exit 1; }
    local adamw
    adamw=$(cargo bench --features cuda -p matscale-trainer --bench adamw --no-run \
        --target-dir "$td" 2>&1 | tee /dev/stderr \
        | sed -n 's/.*Executable benches\/adamw.rs (\(.*\))/\1/p')
    [ -x "$adamw" ] || { echo "could not find the adamw bench binary" >&2; exit 1; }
    rm -rf "$STAGE" && mkdir -p "$STAGE/bin"
    cp "$td/release/xtask" "$STAGE/bin/xtask"
    cp "$tests" "$STAGE/bin/cuda-tests"
    cp "$eqv2" "$STAGE/bin/equiformer-v2-bench"
    cp "$adamw" "$STAGE/bin/adamw-bench"
    strip "$STAGE/bin/xtask" "$STAGE/bin/cuda-tests" "$STAGE/bin/equiformer-v2-bench" \
        "$STAGE/bin/adamw-bench"
    if [ -n "${STAGE_BINS:-}" ]; then
        # Only the named binaries (e.g. "equiformer-v2-bench cuda-tests" for an A/B stage), so
        # that several stages fit the device tool's 64 MiB carry limit.
        local b keep
        for b in xtask cuda-tests equiformer-v2-bench adamw-bench; do
            keep=0
            for k in $STAGE_BINS; do [ "$k" = "$b" ] && keep=1; done
            [ "$keep" = 1 ] || rm -f "$STAGE/bin/$b"
        done
    fi
    ls -l "$STAGE/bin"
    tar -C "$STAGE" -cJf "$STAGE/matscale-gpu.tar.xz" bin
    rm -rf "$STAGE/bin"
    local fc="${FAIRCHEM:-/tmp/fairchem}"
    if [ -d "$fc/src/fairchem/core/models/equiformer_v2" ]; then
        tar -C "$fc" -cJf "$STAGE/fairchem-src.tar.xz" \
            src/fairchem/core/models/equiformer_v2 src/fairchem/core/models/scn
    else
        echo "warning: no fairchem checkout at $fc: the EquiformerV2 comparison will be skipped" >&2
    fi
    ls -l "$STAGE"
    local size
    size=$(stat -c %s "$STAGE/matscale-gpu.tar.xz")
    if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
        echo "warning: $STAGE is $((size >> 20)) MiB, close to the 64 MiB carry limit" >&2
    fi
    echo "staged; on the GPU machine: bash scripts/gpu-verify.sh run \"\$OUT\"  (carry target/gpu-stage)"
}

run() {
    # The logs go straight to OUTDIR (they survive a kill); JSON, device facts and the training
    # run's folder go to a work folder packed into OUTDIR/results.tar.gz at the end (the device
    # tool brings back at most 8 files, two folders down).
    local out="${1:-${OUT:-target/gpu-out}}"
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    local work=/tmp/matscale-gpu-out
    rm -rf "$work" && mkdir -p "$work"
    setup_bins
    echo "== preflight"
    python3 - <<'PY' 2>&1 | tee "$out/preflight.txt"
import torch, e3nn
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("e3nn", e3nn.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
PY
    local status=0
    if want tests; then
        echo "== CUDA kernel tests (each kernel against the CPU, f32 1e-5, f64 1e-12, with gradients)"
        timeout "${T_TESTS:-150}" "$bin/bin/cuda-tests" --test-threads=1 2>&1 \
            | tee "$out/cuda-tests.log" || status=1
        # The S2 activations in row chunks (MATSCALE_S2_CHUNK_BYTES, off by default): 64 KiB
        # chunks split the tests' 37 rows into several.
        MATSCALE_S2_CHUNK_BYTES=65536 timeout "${T_TESTS:-150}" "$bin/bin/cuda-tests" \
            --test-threads=1 s2_grid 2>&1 | tee -a "$out/cuda-tests.log" || status=1
        if grep -q "no CUDA device" "$out/cuda-tests.log"; then
            echo "the tests found no CUDA device: nothing was compared" >&2
            status=1
        fi
    fi
    if want tests && [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
        echo "== the same tests under compute-sanitizer (memcheck)"
        timeout "${T_TESTS:-150}" compute-sanitizer --tool memcheck "$bin/bin/cuda-tests" \
            --test-threads=1 > "$out/sanitizer.log" 2>&1 || status=1
        tail -n 5 "$out/sanitizer.log"
    fi
    if want check; then
        echo "== EquiformerV2 on the GPU against the CPU (same weights: outputs and every weight gradient)"
        local c
        for c in small eqv2-s; do
            timeout "${T_CHECK:-90}" "$bin/bin/equiformer-v2-bench" check --config "$c" \
                --device cuda 2>&1 | tee -a "$out/eqv2-check.log" || status=1
        done
        # Conservative forces: differentiable frames and second derivatives on the GPU.
        timeout "${T_CHECK:-90}" "$bin/bin/equiformer-v2-bench" check --config tiny \
            --forces conservative --structures 2 --device cuda 2>&1 \
            | tee -a "$out/eqv2-check.log" || status=1
        # The whole model again with every kernel-path switch on (SWITCHES).
        echo "== eqV2-S on the GPU with every switch on (defaults: $SWITCHES)" | tee -a "$out/eqv2-check.log"
        # shellcheck disable=SC2046 # one word per VARIABLE=1
        env $(all_switches_on) timeout "${T_CHECK:-90}" "$bin/bin/equiformer-v2-bench" check \
            --config eqv2-s --device cuda 2>&1 | tee -a "$out/eqv2-check.log" || status=1
    fi
    if want bench; then
        echo "== bench kernels --device cuda, with the e3nn / PyTorch reference"
        timeout "${T_BENCH:-180}" "$bin/bin/xtask" bench kernels --device cuda --reference \
            --python python3 --out "$work/bench-kernels-cuda0.json" 2>&1 \
            | tee "$out/bench-kernels.log" || status=1
    fi
    if want adamw || want bench; then
        echo "== AdamW step on the GPU: per-variable, in-place and multi-tensor (eqV2-S's 383 tensors)"
        MATSCALE_MULTI_TENSOR=0 timeout 60 "$bin/bin/adamw-bench" --device cuda 2>&1 \
            | tee "$out/adamw.log" || status=1
        echo "== the same with the gradient norm as one launch too (MATSCALE_MULTI_TENSOR=1, the default)"
        MATSCALE_MULTI_TENSOR=1 timeout 60 "$bin/bin/adamw-bench" --device cuda 2>&1 \
            | sed 's/"mode": "\([a-z_]*\)"/"mode": "\1+multi_norm"/' \
            | tee -a "$out/adamw.log" || status=1
    fi
    if want adamw || want bench; then
        echo "== the same step in PyTorch (clip_grad_norm_ + AdamW, foreach and fused)"
        timeout 60 python3 crates/trainer/benches/adamw_reference.py --device cuda 2>&1 \
            | tee -a "$out/adamw.log" || status=1
    fi
    if ! want eqv2; then
        :
    elif [ -f "$STAGE/fairchem-src.tar.xz" ]; then
        echo "== EquiformerV2 forward and forward+backward on the GPU, matscale against fairchem"
        local fc
        fc=$(unpack_fairchem)
        BIN="$bin/bin/equiformer-v2-bench" FAIRCHEM="$fc" PYTHON=python3 \
            OUT="$work/equiformer_v2.jsonl" timeout "${T_EQV2:-200}" \
            crates/models/benches/equiformer_v2_compare.sh --device cuda \
            --reps "${EQV2_REPS:-5}" --warmup 2 2>&1 | tee "$out/equiformer_v2.log" || status=1
    else
        echo "== EquiformerV2 against fairchem: skipped (no fairchem sources staged)"
    fi
    if want train; then
        # Every model family through the trainer on the GPU (EMT-labelled alloys, two epochs).
        local m size
        : > "$out/train.log"
        for m in schnet:1e5 fcn:4e4 transformer:1.5e5 equiformer_v2:5e4; do
            size=${m#*:} m=${m%%:*}
            echo "== $m: a short training run on the GPU (EMT-labelled alloys)" | tee -a "$out/train.log"
            timeout "${T_TRAIN:-60}" "$bin/bin/xtask" train --model "$m" --size "$size" \
                --data emt --emt-structures 64 --epochs 2 --device cuda \
                --out "$work/train-$m" 2>&1 | tail -n 4 | tee -a "$out/train.log" || status=1
        done
    fi
    if [ -f "$work/equiformer_v2.jsonl" ] && [ -f "$out/adamw.log" ]; then
        # The whole eqV2-S training step on each side: forward+backward (median, this run) plus
        # clip + AdamW on the same parameter count (matscale's in-place update, PyTorch's
        # default foreach AdamW; synthetic 383-tensor layout, see adamw_reference.py).
        python3 - "$work/equiformer_v2.jsonl" "$out/adamw.log" <<'PY' | tee "$out/whole-step.log"
import json, sys
fb = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d.get("config") == "eqv2-s" and d.get("phase") == "forward_backward":
        fb[d["impl"]] = d["median_s"]
opt = {}
for line in open(sys.argv[2]):
    if line.startswith("{"):
        d = json.loads(line)
        opt[d["mode"]] = d["median_s"]
if "matscale" in fb and "fairchem" in fb and "in_place" in opt and "torch_default" in opt:
    f = fb["fairchem"] + opt["torch_default"]
    for mode in ("in_place", "multi_tensor+multi_norm"):
        if mode not in opt:
            continue
        m = fb["matscale"] + opt[mode]
        print(f"whole eqV2-S step (median fwd+bwd + clip + AdamW, {mode}): matscale "
              f"{m*1e3:.1f} ms ({fb['matscale']*1e3:.1f} + {opt[mode]*1e3:.1f}), fairchem "
              f"{f*1e3:.1f} ms ({fb['fairchem']*1e3:.1f} + {opt['torch_default']*1e3:.1f}): "
              f"ratio {f/m:.2f}x")
else:
    print("whole step: missing figures", sorted(fb), sorted(opt))
PY
    fi
    cp "$out"/*.log "$out"/preflight.txt "$work"/ 2>/dev/null || true
    tar -C "$(dirname "$work")" -czf "$out/results.tar.gz" "$(basename "$work")"
    echo "results in $out (status $status)"
    return "$status"
}

case "${1:-}" in
    build) build ;;
    run) shift; run "$@" ;;
    profile) shift; profile "$@" ;;
    ab) shift; ab "$@" ;;
    ab-switches) shift; ab_switches "$@" ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
