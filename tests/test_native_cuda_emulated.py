"""The native CUDA kernels run on the CPU through the CUDA emulator (csrc/emulation/):
the whole of test_native_cuda.py, in a subprocess with AIA_NATIVE_CUDA_EMULATION=1 (the
emulation build replaces the C++ CPU kernels for a whole process, so it cannot share this
one) and its own build directory.

This is not a GPU run: it checks the kernels' indexing, arithmetic and barrier logic
against the reference, not the memory model, races the emulator's thread orders cannot
expose, launch limits or speed. README's status table keeps the CUDA kernels "never run
on a GPU" until test_native_cuda.py has passed on one."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aia_kernels.native")
TESTS = Path(__file__).resolve().parent
# test_native_cuda.py's tests that need a real device (they skip under emulation, saying why).
DEVICE_ONLY = 2


def test_cuda_kernels_on_the_emulator(tmp_path):
    env = {**os.environ, "AIA_NATIVE_CUDA_EMULATION": "1", "AIA_KERNELS_BUILD_DIR": str(tmp_path / "build"),
           "AIA_CUDA_EMULATION_ORDER": "forward"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(TESTS / "test_native_cuda.py")]
    proc = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    summary = output.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    skipped = int(m.group(1)) if (m := re.search(r"(\d+) skipped", summary)) else 0
    assert skipped == DEVICE_ONLY and passed > 100, summary
