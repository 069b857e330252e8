#!/usr/bin/env bash
# One command for a GPU session: the test suite on the GPU (no Triton interpreter), the native
# CUDA kernels against the reference, then the benchmarks. The GPU machine gives one command
# of at most 10 minutes and returns only the files under $OUT (at most 8, at most 2 folders
# down), so every step runs under `timeout`, the whole run under a deadline (TOTAL_S, 540 s),
# and each step writes straight into the output folder as it goes: a run cut anywhere still
# returns what the finished steps produced. README ("GPU run") has the plan and its timings.
#
#   0. native extension build (C++ and CUDA), in the background from the start, <= BUILD_S (300)
#      s; its output goes into run.log when it ends
#   1. tests   the suite but the native CUDA tests, their emulator run and the compile-only
#              checks (CI runs those), pytest-xdist          <= TESTS_S (170) s -> tests.log
#   2. native  tests/test_native_cuda.py and test_conformance.py's native-cuda target: the native
#              CUDA kernels against the reference, on the GPU; only if they pass are they
#              benchmarked (AIA_NATIVE_CUDA=1)
#                                                            <= NATIVE_S (80) s -> native_cuda.log
#   3. tune    (not default) benchmarks/tune_triton.py sweeps the Triton tiles into the
#              package table, so later steps use it   <= TUNE_S (240) s -> tuning/ (4 files)
#   4. headline CinST->STinC, spec shapes x {fp32, bf16} x {fwd-bwd, fwd-infer, fwd-train} x
#              {eager, authors, triton, native, compile-default, compile-max-autotune}: every
#              cheap row first, the compiled peers in the time left (benchmarks/run.py)
#                                                    <= HEADLINE_S (240) s -> headline/ (3 files)
#   5. paths   (not default) native CUDA multi-launch walk vs one launch vs triton
#                                                    <= PATHS_S (120) s -> native_paths/ (3 files)
#   6. variants (not default) all ten variants, eager vs fused
#                                                  <= VARIANTS_S (110) s -> all_variants/ (3 files)
#   7. network (not default) whole TSN/TSM-ResNet-50, plain vs AIA per backend, 8 clips x 8
#              frames, 224x224 (benchmarks/network.py), then the bytes each module keeps for
#              backward (benchmarks/memory.py)   <= NETWORK_S (240) s -> network/ (5 files)
# STEPS picks steps (default "tests,native,headline", 6 files); run.log (one file) says what
# each step did and how long it took. A STEPS whose files exceed 8 is refused before it starts:
# e.g. STEPS=native,paths,variants, STEPS=tune,headline or STEPS=native,network as a second command.
# After a tune step, commit tuning/tuned_tiles.json as aia_kernels/triton/tuned_tiles.json.
#
# --dry-run: the same steps and timeouts on a CPU machine, through Triton's interpreter, with
# tiny shapes (tests: tests/test_api.py only; headline: one 8x8x8x8 case per mode and dtype,
# a 60 s time budget); exits non-zero when a step fails or the output breaks the runner's
# limits. CI runs it.
# Output: $OUT if set, else benchmarks/results/<date>_<device>/ (a dry run: a temporary folder).
# Usage: [STEPS=...] bash benchmarks/gpu_run.sh [--dry-run] [extra args for the headline run]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0 DRY_FLAG=
if [ "${1:-}" = "--dry-run" ]; then DRY=1 DRY_FLAG=" --dry-run"; shift; fi
STEPS=${STEPS:-tests,native,headline}
step() { [[ ",$STEPS," == *",$1,"* ]]; }
START=$(date +%s)
TOTAL_S=${TOTAL_S:-540}
export PYTHONUNBUFFERED=1

# Files each step leaves in the output folder; run.log is the eighth at most.
declare -A STEP_FILES=([tests]=1 [native]=1 [tune]=4 [headline]=3 [paths]=3 [variants]=3 [network]=5)
FILES=1
for s in ${STEPS//,/ }; do
    [ -n "${STEP_FILES[$s]:-}" ] || { echo "gpu_run.sh: unknown step '$s' in STEPS=$STEPS" >&2; exit 2; }
    FILES=$(( FILES + STEP_FILES[$s] ))
done
if [ $FILES -gt 8 ]; then
    echo "gpu_run.sh: STEPS=$STEPS leaves $FILES files; the GPU runner returns 8: split it into two commands" >&2
    exit 2
fi

if [ $DRY -eq 1 ]; then
    export TRITON_INTERPRET=1
    DEVICE="dry run on $(nproc) CPU cores"
    DIR=${OUT:-$(mktemp -d -t gpu_run_dry.XXXXXX)}
    BENCH=(--device cpu --shapes tiny --reps 1 --warmup 0 --threads "$(nproc)" --interpreter --no-plot)
    NETWORK=(--device cpu --archs tsm --frames 2 --size-eval 32 --size-train 32 --threads 1 --rounds 1 --warmup 0
             --backends reference,native)
    MEMORY="--device cpu --shapes 8,8,6,6"  # words without shell metacharacters: see the network step
else
    unset TRITON_INTERPRET
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_run.sh: no CUDA device visible to torch; GPU benchmarks need one (--dry-run: a CPU walk)." >&2
        exit 2
    fi
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    DEVICE=${DEVICE:-$($PY -c "import torch; print(torch.cuda.get_device_name())")}
    SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
    DIR=${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)_${SLUG}}
    BENCH=(--shapes spec --reps 20 --warmup 3 --no-plot)
    NETWORK=(--device cuda --clips 8 --frames 8 --size-eval 224 --size-train 224 --rounds 3 --no-noise-floor)
    MEMORY="--device cuda"
fi
mkdir -p "$DIR"
LOG=$DIR/run.log
log() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( START + TOTAL_S - $(date +%s) )); }
FAILED=()

log "gpu_run.sh$DRY_FLAG: $DEVICE -> $DIR; $(date -u +%FT%TZ)"
log "command: STEPS=$STEPS bash benchmarks/gpu_run.sh$DRY_FLAG $*"
$PY -c "import platform, torch, numpy; import triton; print('python', platform.python_version(), '| torch', \
torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__, '| cpus', __import__('os').cpu_count())" \
    2>&1 | tee -a "$LOG"
[ $DRY -eq 1 ] || nvidia-smi 2>&1 | head -20 >> "$LOG"

# run STEP LIMIT_S LOGFILE CMD...: CMD under `timeout` (cut to the time left before the
# deadline), its output streamed into LOGFILE; a line in run.log with exit code and time.
run() {
    local name=$1 limit=$2 logfile=$3 t0 rc
    shift 3
    if (( $(left) < 15 )); then log "$name: not run, the run's deadline (${TOTAL_S} s) is reached"; FAILED+=("$name"); return 1; fi
    (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
    log "== $name (<= ${limit} s) -> ${logfile#"$DIR"/}"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$logfile" 2>&1
    rc=$?
    log "$name: exit $rc$( ((rc == 124)) && echo ' (timed out)') in $(( $(date +%s) - t0 )) s"
    tail -n 3 "$logfile" | sed 's/^/    /' | tee -a "$LOG"
    ((rc == 0)) || FAILED+=("$name")
    return $rc
}

# 0. The native build, cached in torch's extensions dir; the tests that need it wait on its lock.
BUILD=
BUILD_LOG=$(mktemp -t native_build.XXXXXX)
if step tests || step native; then
    timeout -k 10 "${BUILD_S:-300}" $PY -c "import time, aia_kernels.native as n; t = time.time(); n.load(); \
print(f'native extension loaded in {time.time() - t:.0f} s: {n.build_info()}')" > "$BUILD_LOG" 2>&1 &
    BUILD=$!
fi
build_done() {
    [ -n "$BUILD" ] || return 0
    wait "$BUILD"
    local rc=$?
    BUILD=
    log "native build: exit $rc$( ((rc == 124)) && echo ' (timed out)')"
    sed 's/^/    /' "$BUILD_LOG" | tail -n 40 | tee -a "$LOG"
    ((rc == 0)) || FAILED+=("native build")
}
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) < 8 ? $(nproc) : 8 ))")

if step tests; then
    if [ $DRY -eq 1 ]; then TESTS=(tests/test_plan.py); else  # a quick file: the dry run rehearses the step
        # test_native_cuda.py is step 2 (on the GPU itself): its emulator run is left out here, and so
        # are the compile-only checks (CI runs them; the spec-shape Triton one alone takes minutes cold)
        # and the test that builds the C++ library again with CUDA hidden (as in CI, minutes of g++).
        # So are the native-cuda conformance cases (step 2), and the CPU-only tests that build the C++
        # library again (test_native_build.py) or export whole networks (test_export_cli.py).
        TESTS=(tests --ignore tests/test_native_cuda.py --ignore tests/test_native_cuda_emulated.py
               --ignore tests/test_triton_compile.py --ignore tests/test_native_cuda_compile.py
               --ignore tests/test_native_build.py --ignore tests/test_export_cli.py
               --deselect tests/test_native_prebuilt.py::test_setup_builds_a_portable_library_the_loader_uses
               -k "not native-cuda")
    fi
    run tests "${TESTS_S:-170}" "$DIR/tests.log" $PY -m pytest -q -p no:cacheprovider $XDIST "${TESTS[@]}"
fi
build_done

if step native; then
    # test_native_cuda.py and the conformance suite's native-cuda target, spread over the xdist
    # workers too; on CPU all skip.
    if run native "${NATIVE_S:-80}" "$DIR/native_cuda.log" $PY -m pytest tests/test_native_cuda.py \
            tests/test_conformance.py -k "native-cuda or not conformance" -q -p no:cacheprovider $XDIST; then
        export AIA_NATIVE_CUDA=1
    else
        log "native CUDA kernels: not benchmarked"
    fi
fi

if step tune; then
    LIMIT=${TUNE_S:-240}
    mkdir -p "$DIR/tuning"
    run tune "$LIMIT" "$DIR/tuning/log.txt" $PY -m benchmarks.tune_triton --time-budget $(( LIMIT - 45 )) \
        --results-dir "$DIR/tuning" $([ $DRY -eq 1 ] && echo --dry-run)
fi

# A benchmark step: its time budget is its limit less a margin for the last row and the report.
bench() {
    local name=$1 limit=$2 folder=$DIR/$3 budget
    shift 3
    (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
    budget=$(( DRY == 1 ? 60 : limit - 45 ))
    mkdir -p "$folder"
    run "$name" "$limit" "$folder/log.txt" $PY -m benchmarks.run --variants 'CinST->STinC' "${BENCH[@]}" \
        --time-budget "$budget" --out "$folder" "$@"
}
if step headline; then
    bench headline "${HEADLINE_S:-240}" headline --dtypes float32,bfloat16 --modes fwd-bwd,fwd-infer,fwd-train \
        --backends all "$@"
fi
if step paths; then
    bench paths "${PATHS_S:-120}" native_paths --dtypes float32,bfloat16 --modes fwd-bwd,fwd-infer \
        --backends triton,native-paths
fi
if step variants; then
    bench variants "${VARIANTS_S:-110}" all_variants --variants all --dtypes float32,bfloat16 \
        --modes fwd-bwd,fwd-infer --backends eager,fused
fi
if step network; then
    LIMIT=${NETWORK_S:-240}
    mkdir -p "$DIR/network"
    # One timeout for both scripts: bash -c runs them in turn ($0 python, $1 the folder, $2 the
    # memory arguments, word-split, then the network arguments).
    run network "$LIMIT" "$DIR/network/log.txt" bash -c '"$0" benchmarks/network.py "${@:3}" --results-dir "$1" \
&& "$0" benchmarks/memory.py $2 --results-dir "$1"' "$PY" "$DIR/network" "$MEMORY" "${NETWORK[@]}"
fi

# What the runner will return: at most 8 files, at most 2 folders down, plain names.
COUNT=$(find "$DIR" -type f | wc -l)
DEEP=$(find "$DIR" -mindepth 4 | head -3)
ODD=$(find "$DIR" -mindepth 1 | sed "s|^$DIR/||" | grep -v '^[A-Za-z0-9._/-]*$' | head -3)
log "output: $COUNT files in $DIR: $(cd "$DIR" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"
if [ "$COUNT" -gt 8 ] || [ -n "$DEEP" ] || [ -n "$ODD" ]; then
    log "output: beyond what the GPU runner returns (8 files, 2 folders down, names of letters, digits, . _ -)"
    FAILED+=("output")
fi
rm -f "$BUILD_LOG"
log "gpu_run.sh: done in $(( $(date +%s) - START )) s; ${#FAILED[@]} failed${FAILED[*]:+: ${FAILED[*]}}"
[ ${#FAILED[@]} -eq 0 ]
