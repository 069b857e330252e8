#!/usr/bin/env bash
# Compiler reports of registers and local memory for sm_90, without a GPU, into
# benchmarks/results/<date>_register_report/: for the current tree and for a base commit
# (default 7a01641: the Triton tiles and CUDA sources before the changes that docs/triton.md
# ("The heuristic tile sizes") and docs/native.md ("Tests": local memory) describe).
#   triton_<label>.json  python -m aia_kernels.triton.compile_check --shapes spec
#                        (label current, or base_tiles: the base commit's tiles.py in this tree)
#   nvcc_<label>_<file>.txt  nvcc -c --resource-usage of csrc/<file> (label current or base)
# Usage: [BASE=<commit>] [PYTHON=python3] bash benchmarks/register_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BASE=${BASE:-7a01641}
unset TRITON_INTERPRET
TV=$($PY -c "import triton; print(triton.__version__)")
DIR=benchmarks/results/$(date -u +%Y-%m-%d)_register_report
mkdir -p "$DIR"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command: ${SKIP_NVCC:+SKIP_NVCC=1 }BASE=$BASE PYTHON=$PY bash benchmarks/register_report.sh"
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
    $PY -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
    nvcc --version | tail -1
} > "$DIR/meta_triton$TV.txt"

$PY -m aia_kernels.triton.compile_check --shapes spec > "$DIR/triton${TV}_current.json"
TILES=aia_kernels/triton/tiles.py
cp "$TILES" "$DIR/.tiles.py.keep"
trap 'cp "$DIR/.tiles.py.keep" "$TILES"; rm -f "$DIR/.tiles.py.keep"' EXIT
git show "$BASE:$TILES" > "$TILES"
$PY -m aia_kernels.triton.compile_check --shapes spec > "$DIR/triton${TV}_base_tiles.json"
cp "$DIR/.tiles.py.keep" "$TILES"

if [ -z "${SKIP_NVCC:-}" ]; then
    BASE_TREE=$(mktemp -d)
    git archive "$BASE" csrc | tar -x -C "$BASE_TREE"
    for label in current base; do
        src=csrc; [ $label = base ] && src=$BASE_TREE/csrc
        for f in aia_cuda.cu aia_cuda_persistent.cu; do
            $PY - "$src" "$f" > "$DIR/nvcc_${label}_$f.txt" <<'PYEOF'
import subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
import test_native_cuda_compile as t
src, name = Path(sys.argv[1]), sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    cmd = [t._nvcc(), "-c", str(src / name), "-o", f"{tmp}/o.o", "-std=c++17", "-arch=sm_90",
           "--expt-relaxed-constexpr", "-DAIA_WITH_CUDA", "-Xcudafe", "--diag_suppress=3306", "--resource-usage",
           *[f"-I{p}" for p in t._includes(Path(tmp)) if Path(p).resolve() != t.CSRC], f"-I{src}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
print(" ".join(cmd[1:4]))
print(r.stdout + r.stderr)
PYEOF
        done
    done
    rm -rf "$BASE_TREE"
fi
echo "register_report.sh: $DIR"
