#!/usr/bin/env bash
# One command for a GPU session: the full test suite (real GPU, no Triton interpreter),
# then the benchmark matrix, saved under benchmarks/results/<date>_<device>/.
# Sized for a 10-minute command limit (~8.5 min worst case, every step under `timeout`):
#   1. tests                                    <= 150 s   -> tests.log
#   2. headline CinST->STinC: spec shapes x {fp32, bf16} x {fwd-bwd, fwd-infer, fwd-train}
#      x {eager, compile-default, compile-max-autotune, triton, native}, 20 reps
#                                               <= 240 s   -> results.{md,json}, summary.png
#   3. all ten variants, {eager, triton, native}, {fwd-bwd, fwd-infer}, 10 reps
#                                               <= 110 s   -> all_variants/
# Cases the budgets cut are listed as "skipped: ... budget" in the report, never dropped.
# If $OUT is set (the device runner's output dir), the results are copied there too.
# Usage: bash benchmarks/gpu_run.sh [extra args for the headline run]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_run.sh: no CUDA device visible to torch; GPU benchmarks need one." >&2
    exit 2
fi
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
DEVICE=${DEVICE:-$($PY -c "import torch; print(torch.cuda.get_device_name())")}
SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
DIR=benchmarks/results/$(date -u +%Y-%m-%d)_${SLUG}
mkdir -p "$DIR"
echo "gpu_run.sh: $DEVICE -> $DIR"
nvidia-smi > "$DIR/nvidia-smi.txt" 2>&1 || true

echo "== 1/3 tests (no interpreter)"
START=$(date +%s)
env -u TRITON_INTERPRET timeout 150 $PY -m pytest tests -q -p no:cacheprovider > "$DIR/tests.log" 2>&1
echo "tests: exit $? in $(( $(date +%s) - START )) s (log: $DIR/tests.log)" | tee -a "$DIR/tests.log"
tail -5 "$DIR/tests.log"

echo "== 2/3 headline CinST->STinC"
env -u TRITON_INTERPRET timeout 240 $PY -m benchmarks.run --variants 'CinST->STinC' --shapes spec \
    --dtypes float32,bfloat16 --modes fwd-bwd,fwd-infer,fwd-train --backends all --reps 20 --warmup 3 \
    --time-budget 180 --compile-budget 130 --out "$DIR" "$@"
echo "headline: exit $?"

echo "== 3/3 all variants, eager vs fused"
env -u TRITON_INTERPRET timeout 110 $PY -m benchmarks.run --variants all --shapes spec \
    --dtypes float32,bfloat16 --modes fwd-bwd,fwd-infer --backends eager,fused --reps 10 --warmup 2 \
    --time-budget 75 --out "$DIR/all_variants" > "$DIR/all_variants.log" 2>&1
echo "all variants: exit $? (table: $DIR/all_variants/results.md)"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    cp -r "$DIR" "$OUT/"
fi
echo "gpu_run.sh: done in $(( $(date +%s) - START )) s; results in $DIR"
