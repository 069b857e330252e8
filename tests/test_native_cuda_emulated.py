"""The native CUDA kernels run on the CPU through the CUDA emulator (csrc/emulation/):
test_native_cuda.py and test_conformance.py's native-cuda target in subprocesses with
AIA_NATIVE_CUDA_EMULATION=1 (the emulation build replaces the C++ CPU kernels for a whole
process, so it cannot share this one), sharing one build directory.

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

from aia_testing import run_shared_dir

pytest.importorskip("aia_kernels.native")
TESTS = Path(__file__).resolve().parent
# test_native_cuda.py's tests that need a real device (they skip under emulation, saying why).
DEVICE_ONLY = 2
# The CUDA-specific tests, and the conformance matrix of the one target the emulator runs.
FILES = ("test_native_cuda.py", "test_conformance.py")
EMULATED_TESTS = "not test_conformance or native-cuda"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """One build for the run: the loader's build lock lets a second worker wait for the
    first's build and load it instead of compiling it again."""
    return run_shared_dir(tmp_path_factory, "emulation_build")


def run_emulated(build_dir, keyword=EMULATED_TESTS, **env) -> tuple[int, int]:
    """(passed, skipped) of the tests of FILES that ``keyword`` (pytest -k) selects, under
    emulation; fails on any failure."""
    # The child is a plain pytest run: drop what an xdist worker parent leaves in the
    # environment (pytest-benchmark reacts to it with a warning on stderr).
    parent = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    env = {**parent, "AIA_NATIVE_CUDA_EMULATION": "1", "AIA_KERNELS_BUILD_DIR": str(build_dir),
           "AIA_CUDA_EMULATION_ORDER": "forward", **env}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *(str(TESTS / f) for f in FILES),
           "-k", keyword]
    proc = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    # pytest's closing summary ("161 passed, 2 skipped, 3 warnings in 95.1s") is on stdout;
    # stderr may end with a plugin's warning, so look for the line rather than take the last.
    summaries = [line for line in proc.stdout.splitlines() if re.search(r"\d+ passed.* in [\d.]+s", line)]
    assert summaries, output[-8000:]
    passed = re.search(r"(\d+) passed", summaries[-1])
    skipped = re.search(r"(\d+) skipped", summaries[-1])
    return int(passed.group(1)), int(skipped.group(1)) if skipped else 0


def test_cuda_kernels_on_the_emulator(build_dir):
    passed, skipped = run_emulated(build_dir)
    assert skipped == DEVICE_ONLY and passed > 100, (passed, skipped)  # the covering subsets: ~150


def test_one_launch_paths_on_a_large_grid(build_dir):
    """320 co-resident blocks (AIA_CUDA_EMULATION_SMS=160; an H100 has 132 SMs): the
    one-launch forward's BN merge reads more block partials than a block has threads,
    and the one-launch backward merges 320 partials per sum."""
    passed, _ = run_emulated(build_dir, "persistent_many_blocks and f64", AIA_CUDA_EMULATION_SMS="160")
    assert passed == 1
