"""The CUDA sources compile (nvcc, compile only). No GPU is needed, nothing runs: this
catches syntax and type errors in every csrc/*.cu, and in the C++ sources' CUDA-only
branches (AIA_WITH_CUDA), on CI machines without a GPU."""
import fcntl
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from aia_kernels.native.build_config import CPU_SOURCES, CUDA_SOURCES, CXX_STANDARD

from aia_testing import run_shared_dir

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
# The aia_cpu_*.cpp kernels have no CUDA branch; the others dispatch to CUDA under AIA_WITH_CUDA.
CXX_WITH_CUDA_BRANCHES = [s for s in CPU_SOURCES if not s.startswith("aia_cpu_")]


def _nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _includes(tmp_path) -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(CSRC)]
    # A CPU-only torch wheel ships c10/cuda headers without the header CMake generates
    # for CUDA builds; a stub with its one define stands in for compile-only checks.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = tmp_path / "stub/c10/cuda/impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "stub"))
    return includes


def test_every_cuda_source_is_built():
    assert set(CU_FILES) == set(CUDA_SOURCES), "csrc/*.cu and aia_kernels.native.CUDA_SOURCES differ"


@pytest.fixture(scope="module")
def compile_cu(tmp_path_factory):
    """compile_cu(source): nvcc -c of csrc/<source> for sm_90 (the H100/H200) with ptxas's
    resource report; its output, one compile per source and test run, shared by the xdist
    workers (a lock file per source: a second worker waits for the first's compile, up to a
    minute of CPU, instead of repeating it). Skips without nvcc."""
    shared = run_shared_dir(tmp_path_factory, "nvcc_outputs")

    def run(source: str) -> str:
        nvcc = _nvcc()
        if nvcc is None:
            pytest.skip("nvcc not found: the CUDA sources cannot be compile-checked on this machine")
        output = shared / f"{source}.txt"
        with open(shared / f"{source}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not output.exists():
                tmp = tmp_path_factory.mktemp("nvcc")
                cmd = [nvcc, "-c", str(CSRC / source), "-o", str(tmp / (source + ".o")), CXX_STANDARD,
                       "-arch=sm_90", "--expt-relaxed-constexpr", "-DAIA_WITH_CUDA", "-Xcudafe",
                       "--diag_suppress=3306", "--resource-usage", *[f"-I{p}" for p in _includes(tmp)]]
                result = subprocess.run(cmd, capture_output=True, text=True)
                assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
                output.write_text(result.stdout + result.stderr)
        return output.read_text()

    return run


@pytest.mark.parametrize("source", CU_FILES)
def test_cuda_sources_compile(compile_cu, source):
    compile_cu(source)


def _local_memory(ptxas_output: str) -> dict[str, tuple[int, int, int]]:
    """Per kernel (mangled name): (stack frame, spill stores, spill loads) in bytes, as
    ptxas --resource-usage reports them."""
    usage = {}
    pattern = (r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
               r"(\d+) bytes spill loads")
    for name, frame, stores, loads in re.findall(pattern, ptxas_output):
        usage[name] = (int(frame), int(stores), int(loads))
    return usage


# Local memory (a per-thread stack frame in DRAM behind L1) on the hot paths is a cost no
# CPU test can see. The one-launch kernels may spill a few registers (ptxas trades them
# for occupancy: 64 or 128 registers a thread), but hold no local arrays.
MAX_FRAME_BYTES = {"aia_cuda.cu": 0, "aia_cuda_persistent.cu": 128}


@pytest.mark.parametrize("source", CU_FILES)
def test_cuda_kernels_keep_to_registers(compile_cu, source):
    """ptxas for sm_90: no kernel of the multi-launch walk uses local memory; the one-launch
    kernels hold no local array (a runtime-indexed struct parameter or an array of 54
    tap sums, both seen before, each took hundreds of bytes)."""
    usage = _local_memory(compile_cu(source))
    assert usage, "ptxas reported no kernels"
    limit = MAX_FRAME_BYTES[source]
    over = {name: u for name, u in usage.items() if u[0] > limit or (limit == 0 and (u[1] or u[2]))}
    assert not over, f"local memory (stack frame, spill stores, spill loads) over {limit} bytes: {over}"


@pytest.mark.parametrize("source", CXX_WITH_CUDA_BRANCHES)
def test_cxx_sources_compile_with_cuda_branches(tmp_path, source):
    """The CPU build never defines AIA_WITH_CUDA: its CUDA branches (the CUDA op
    registrations, the one-launch forward's dispatch in aia_plan.cpp) are checked here."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler: the CUDA branches cannot be compile-checked")
    cmd = [cxx, "-fsyntax-only", CXX_STANDARD, "-DAIA_WITH_CUDA", str(CSRC / source),
           *[f"-I{p}" for p in _includes(tmp_path)]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"compile failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
