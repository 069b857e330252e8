"""The CUDA sources compile (nvcc, compile only). No GPU is needed, nothing runs: this
catches syntax and type errors in every csrc/*.cu, and in the C++ sources' CUDA-only
branches (AIA_WITH_CUDA), on CI machines without a GPU."""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from aia_kernels.native import CPU_SOURCES, CUDA_SOURCES

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
# aia_cpu.cpp has no CUDA branch; the others dispatch to CUDA under AIA_WITH_CUDA.
CXX_WITH_CUDA_BRANCHES = [s for s in CPU_SOURCES if s != "aia_cpu.cpp"]


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


@pytest.mark.parametrize("source", CU_FILES)
def test_cuda_sources_compile(tmp_path, source):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compile-checked on this machine")
    cmd = [nvcc, "-c", str(CSRC / source), "-o", str(tmp_path / (source + ".o")), "-std=c++17",
           "-arch=sm_90", "--expt-relaxed-constexpr", "-DAIA_WITH_CUDA", "-Xcudafe", "--diag_suppress=3306",
           *[f"-I{p}" for p in _includes(tmp_path)]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("source", CXX_WITH_CUDA_BRANCHES)
def test_cxx_sources_compile_with_cuda_branches(tmp_path, source):
    """The CPU build never defines AIA_WITH_CUDA: its CUDA branches (the CUDA op
    registrations, the one-launch forward's dispatch in aia_plan.cpp) are checked here."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler: the CUDA branches cannot be compile-checked")
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-DAIA_WITH_CUDA", str(CSRC / source),
           *[f"-I{p}" for p in _includes(tmp_path)]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"compile failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
