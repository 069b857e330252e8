"""What the native extension is built from and with: shared by the first-use build
(``aia_kernels.native.load``) and the optional ahead-of-time build in ``setup.py``,
which reads this file by path (no torch, no package import)."""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

CPU_SOURCES = ("aia_ops.cpp", "aia_plan.cpp", "aia_cpu_pool.cpp", "aia_cpu_grad.cpp", "aia_cpu_gate.cpp")
CUDA_SOURCES = ("aia_cuda.cu", "aia_cuda_persistent.cu")
# The CUDA sources as host C++ against the emulator (each wrapper includes its .cu).
EMULATED_CUDA_SOURCES = tuple(f"emulation/{Path(s).stem}_emulated.cpp" for s in CUDA_SOURCES)
# The emulation build: every tensor takes the CUDA path there (csrc/aia_host.h), so the full-size
# CPU passes (aia_cpu_pool.cpp, aia_cpu_grad.cpp) are left out; aia_ops.cpp still calls the gate
# helpers of aia_cpu_gate.cpp on its (dead) CPU branches.
EMULATION_SOURCES = (tuple(s for s in CPU_SOURCES if s not in ("aia_cpu_pool.cpp", "aia_cpu_grad.cpp"))
                     + EMULATED_CUDA_SOURCES)
# Host code must not fuse the kernels' explicitly rounded a * b + c (the __fmul_rn & co. stand-ins).
EMULATION_FLAGS = ["-DAIA_WITH_CUDA", "-DAIA_CUDA_EMULATION", "-ffp-contract=off"]
CUDA_FLAGS = ["-DAIA_WITH_CUDA"]
# The sources are C++17, whatever torch's default: torch 2.11 (the GPU machine's) builds extensions
# as C++17, torch 2.13 as C++20, so without this CI would compile what no GPU run compiles. Given
# after torch's own -std, it wins (nvcc: torch adds none when one is given). torch 2.13's headers
# accept C++17 (ATen.h asks for >= C++17); GCC warns, -Wc++20-extensions, about their one C++20
# construct (default member initialisers of bit-fields, c10/core/AutogradState.h).
CXX_STANDARD = "-std=c++17"
# -march=native: a build is for the machine that built it; set AIA_NATIVE_CXXFLAGS="" for a portable build.
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without it the loops run serially.
# -ffp-contract=off: GCC fuses a * b + c into one FMA per copy of a loop it makes (versions, peels),
# not per source expression, so a parallel task covering one work item and one covering two ran
# differently fused code for the same item: an AVX2 build's conv weight gradients changed in the
# last bits with the thread count (docs/native.md, "Determinism"). Off, no step got slower
# (benchmarks/results/native_ab_20261201_epyc_avx512_fp_contract_t1.md).
CXX_FLAGS = (["-O3", "-fopenmp", "-ffp-contract=off", CXX_STANDARD]
             + os.environ.get("AIA_NATIVE_CXXFLAGS", "-march=native").split())
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", CXX_STANDARD]

# The ahead-of-time build: aia_kernels/native/_aia_native<ext suffix>, and beside it
# _aia_native.json saying what it was built for (torch version, CUDA, flags, CPU, sources).
PREBUILT_MODULE = "aia_kernels.native._aia_native"
PREBUILT_METADATA = "_aia_native.json"


def cpu_fingerprint() -> str:
    """A short hash of this CPU's model and feature flags (what -march=native depends on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        cpu = platform.processor() or platform.machine()
    return hashlib.sha1(cpu.encode()).hexdigest()[:10]


def sources_digest(csrc: Path) -> str:
    """A hash of every file under csrc/: a prebuilt library of other sources is stale."""
    digest = hashlib.sha1()
    for path in sorted(p for p in Path(csrc).rglob("*") if p.is_file()):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def machine_specific(flags: list[str]) -> bool:
    return "-march=native" in flags
