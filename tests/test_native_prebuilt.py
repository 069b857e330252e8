"""The optional ahead-of-time build of the native extension (setup.py with
AIA_KERNELS_BUILD_NATIVE=1) and the loader's choice between it and the first-use build:
it is used only for the torch version, sources, flags and CPU it was built for (and not
without CUDA kernels where this process could build them), a found but
unusable one warns and is skipped, a named one (AIA_NATIVE_PREBUILT) that is unusable
raises."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aia_testing import AS_ON_A_GPU_MACHINE, cuda_hidden

native = pytest.importorskip("aia_kernels.native")
ROOT = Path(__file__).resolve().parents[1]
SUFFIX = ".cpython-test.so"
PORTABLE_FLAGS = "-O1"  # no -march=native: a portable build


def fake_library(directory: Path, **overrides) -> Path:
    """An (unloadable) library file with metadata that matches this process unless overridden."""
    library = directory / f"_aia_native{SUFFIX}"
    library.write_bytes(b"not a library")
    meta = {"torch": torch.__version__, "cuda": False, "cxx_flags": native.CXX_FLAGS,
            "cpu": native.cpu_fingerprint(), "sources": native.sources_digest(native.CSRC), **overrides}
    (directory / native.PREBUILT_METADATA).write_text(json.dumps(meta))
    return library


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(native.importlib.machinery, "EXTENSION_SUFFIXES", [SUFFIX])
    monkeypatch.delenv("AIA_NATIVE_PREBUILT", raising=False)
    monkeypatch.setattr(native, "_state", {})  # this process's loaded extension is left alone
    return tmp_path


def test_no_prebuilt_library(package_dir):
    assert native._prebuilt_candidate() == (None, False)
    assert native._load_prebuilt() is False


def test_candidate_selection(package_dir, monkeypatch):
    library = fake_library(package_dir)
    assert native._prebuilt_candidate() == (library, False)
    assert native._prebuilt_metadata(library)[1] is None
    monkeypatch.setenv("AIA_NATIVE_PREBUILT", "0")
    assert native._prebuilt_candidate() == (None, False)
    monkeypatch.setenv("AIA_NATIVE_PREBUILT", "/elsewhere/lib.so")
    assert native._prebuilt_candidate() == (Path("/elsewhere/lib.so"), True)


@pytest.mark.parametrize("overrides,reason", [
    ({"torch": "0.0.0"}, "built for torch 0.0.0"),
    ({"cpu": "0000000000"}, "on another CPU"),
    ({"sources": "stale"}, "other sources"),
    ({"cxx_flags": ["-O0"]}, r"C\+\+ flags \['-O0'\]"),
])
def test_mismatch_warns_and_builds_instead(package_dir, overrides, reason):
    fake_library(package_dir, **overrides)
    with pytest.warns(UserWarning, match=reason + ".*building on first use instead"):
        assert native._load_prebuilt() is False


def test_cpu_only_library_refused_where_cuda_can_be_built(package_dir, monkeypatch):
    library = fake_library(package_dir, cuda=False)
    monkeypatch.setattr(native, "_with_cuda", lambda: True)
    assert "no CUDA kernels" in native._prebuilt_metadata(library)[1]
    monkeypatch.setattr(native, "_with_cuda", lambda: False)
    assert native._prebuilt_metadata(library)[1] is None


def test_missing_metadata(package_dir):
    library = fake_library(package_dir)
    (package_dir / native.PREBUILT_METADATA).unlink()
    assert "metadata" in native._prebuilt_metadata(library)[1]


def test_named_but_unusable_raises(package_dir, monkeypatch):
    library = fake_library(package_dir, torch="0.0.0")
    monkeypatch.setenv("AIA_NATIVE_PREBUILT", str(library))
    with pytest.raises(RuntimeError, match="built for torch 0.0.0.*unset AIA_NATIVE_PREBUILT"):
        native._load_prebuilt()
    monkeypatch.setenv("AIA_NATIVE_PREBUILT", str(package_dir / "missing.so"))
    native._state.clear()
    with pytest.raises(RuntimeError, match="does not exist"):
        native._load_prebuilt()


def test_setup_builds_a_portable_library_the_loader_uses(tmp_path):
    """setup.py build_ext into a temporary dir, without -march=native (AIA_NATIVE_CXXFLAGS="-O1"),
    C++ only (=cpu, so a GPU machine does not spend minutes in nvcc here); a fresh process
    asking for the same flags loads that library (no first-use build: its build dir stays
    empty) and matches the reference. One build checks two things: the prebuilt path, and
    the portable kernels (no AVX-512, so chunks take the element-loop paths and vector types
    are split by the compiler), at odd shapes in float64 and float32. At -O1 (the flag added
    last wins): the same code paths as a user's -O3 portable build, in a shorter build (the
    test took 54 s alone here, 277 s at -O3 before a compile-time fix of the pool, 2026-12-02)."""
    env = {**os.environ, "AIA_KERNELS_BUILD_NATIVE": "cpu", "AIA_NATIVE_CXXFLAGS": PORTABLE_FLAGS, "MAX_JOBS": "2"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (library,) = (tmp_path / "lib/aia_kernels/native").glob("_aia_native*.so")
    meta = json.loads(library.with_name(native.PREBUILT_METADATA).read_text())
    assert meta["torch"] == torch.__version__ and meta["sources"] == native.sources_digest(native.CSRC)
    assert "-march=native" not in meta["cxx_flags"], meta

    # The library is C++ only; on a machine with CUDA (AS_ON_A_GPU_MACHINE makes the child one)
    # the loader refuses it, since that process could build the CUDA kernels: the child runs
    # with CUDA hidden, as a CPU-only process.
    script = AS_ON_A_GPU_MACHINE + (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from aia_kernels import native\n"
        "from aia_testing import compare_with_reference\n"
        "assert '-march=native' not in native.CXX_FLAGS\n"
        "info = native.build_info()\n"
        f"assert info['source'] == 'prebuilt' and info['library'] == {str(library)!r}, info\n"
        "assert info['cuda'] is False, info\n"
        "for dtype, shape, tol in ((torch.float64, (6, 3, 5, 19), 1e-10), (torch.float32, (6, 3, 4, 23), 2e-4),\n"
        "                          (torch.float32, (6, 5, 4, 7), 2e-4)):\n"
        "    for variant in ('CinST->STinC', 'C+ST'):\n"
        "        compare_with_reference(variant, 'native', dtype=dtype, x=torch.randn(shape, dtype=dtype),\n"
        "                               atol=tol, rtol=tol)\n"
        "print('prebuilt ok')\n"
    )
    jit_dir = tmp_path / "jit"
    env = cuda_hidden({**os.environ, "AIA_NATIVE_PREBUILT": str(library), "AIA_KERNELS_BUILD_DIR": str(jit_dir),
                       "AIA_NATIVE_CXXFLAGS": PORTABLE_FLAGS})
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "prebuilt ok" in run.stdout, run.stdout + run.stderr
    assert not jit_dir.exists() or not any(jit_dir.iterdir()), "the first-use build ran"
