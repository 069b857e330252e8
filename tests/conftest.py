"""Test setup. Without a GPU, Triton kernels run on the CPU through Triton's
interpreter, which must be switched on before triton is first imported."""
import os
import sys
from pathlib import Path

import torch

# The repository root, so tests import `benchmarks` (the authors'-style peer, the runners).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if torch.cuda.is_available():
    # The float32 reference must compute in float32: cuDNN convolutions default to TF32
    # (10-bit mantissa), which would put the reference, not our kernels, 1e-3 off.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The tests that take half a minute or more on a 2-core machine (builds, subprocess runs),
# started first: under pytest-xdist a long test dispatched last keeps one worker busy while
# the others have finished. xdist hands out the first quarter of the tests round robin, so
# this order also splits them between two workers about evenly; the second emulated test
# comes last, when the first has built the emulation build they share.
SLOW_FIRST = (
    "test_native_cuda_emulated.py::test_cuda_kernels_on_the_emulator",
    "test_native_prebuilt.py::test_setup_builds_a_portable_library",
    "test_gpu_run.py::test_dry_run_walks_every_step",
    "test_triton_compile.py::test_heuristic_tiles_do_not_spill",
    "test_native_build.py::test_killed_build_then_two_processes",
    "test_api.py::test_demo_shows_backends_agreement",
    "test_native_cuda_compile.py::test_cuda_sources_compile",
    "test_native_cuda_compile.py::test_cuda_kernels_keep_to_registers",
    "test_temporal_order.py::",
    "test_benchmarks_smoke.py::test_onnx_network_benchmark_smoke",
    "test_native_cuda_emulated.py::test_one_launch_paths_on_a_large_grid",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, prefix in enumerate(SLOW_FIRST):
            if prefix in item.nodeid:
                return i
        return len(SLOW_FIRST)
    items.sort(key=rank)  # stable: the rest keep their order
