"""The first-use native build, when things go wrong: a build killed half-way leaves nothing
that blocks the next process, two processes starting at once build once and both run, the
first use says what it compiles, and a build that fails or cannot happen (no compiler, a
compiler error, a folder that cannot be written) raises with the reason for
``backend="native"`` and falls back, warning once, for ``backend="auto"``.

Each build runs in a subprocess with its own ``AIA_KERNELS_BUILD_DIR`` (a tmp dir), so this
process's extension is left alone."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aia_kernels.native.build_config import CPU_SOURCES
from aia_kernels.native.build_lock import LOCK_NAME, TORCH_LOCK_NAME, exclusive_build

ROOT = Path(__file__).resolve().parents[1]
COMPILER = shutil.which(os.environ.get("CXX", "c++"))

# Loads the extension, runs one native forward and compares it with the reference.
RUN_NATIVE = """
import torch, aia_kernels
from aia_kernels import native
native.load()
m = aia_kernels.build("CinST", num_segments=2, backend="native").eval()
x = torch.randn(4, 3, 5, 6)
y = m(x)
m.backend = "reference"
torch.testing.assert_close(y, m(x))
print("ran", flush=True)
"""

# backend="native" raises with the reason; backend="auto" warns once and runs the reference.
NATIVE_RAISES_AUTO_FALLS_BACK = """
import warnings, torch, aia_kernels
m = aia_kernels.build("C", num_segments=2, backend="native").eval()
x = torch.randn(4, 3, 5, 6)
try:
    m(x)
except RuntimeError as exc:
    print("NATIVE RAISED:", str(exc).replace("\\n", " | "), flush=True)
else:
    raise SystemExit("backend='native' ran although the build cannot succeed")
m.backend = "auto"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = m(x)
    m(x)
fallbacks = [str(w.message) for w in caught if "backend='auto' uses" in str(w.message)]
assert len(fallbacks) == 1, fallbacks
print("AUTO WARNED:", fallbacks[0].replace("\\n", " | "), flush=True)
assert m.last_backend == "reference", m.last_backend
m.backend = "reference"
torch.testing.assert_close(y, m(x))
print("auto ran", m.last_backend, flush=True)
"""


def environment(build_dir: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("AIA_NATIVE_CUDA_EMULATION", "AIA_NATIVE_CXXFLAGS")}
    env.update(PYTHONPATH=str(ROOT), AIA_KERNELS_BUILD_DIR=str(build_dir), AIA_NATIVE_PREBUILT="0",
               CUDA_VISIBLE_DEVICES="", **overrides)
    return env


def python(script: str, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def compiler_wrapper(path: Path, body: str) -> str:
    """A stand-in for CXX: ``body`` (bash) runs first, then the real compiler with the same
    arguments and -O0 last (it wins over the build's -O3): these builds test the build's
    locking, not the kernels' speed, and compile in about half the time."""
    path.write_text(f"#!/bin/bash\n{body}\nexec {COMPILER} \"$@\" -O0\n")
    path.chmod(0o755)
    return str(path)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# ---- the lock itself (no compiler) ----

HOLD_LOCK = """
import sys, time
from aia_kernels.native.build_lock import exclusive_build
with exclusive_build(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_lock_dies_with_its_holder(tmp_path, capfd):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=environment(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        (tmp_path / TORCH_LOCK_NAME).touch()  # as torch's FileBaton leaves it when its build is killed
        holder.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with exclusive_build(str(tmp_path)):
            assert time.monotonic() - start < 5
            assert not (tmp_path / TORCH_LOCK_NAME).exists()  # the stale torch lock is cleared
            assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()
    assert "left by an interrupted build" in capfd.readouterr().err


def test_a_waiting_process_says_whom_it_waits_for(tmp_path, capfd):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=environment(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        killer = subprocess.Popen(["bash", "-c", f"sleep 1; kill {holder.pid}"])
        with exclusive_build(str(tmp_path)):
            pass
        killer.wait()
    finally:
        holder.kill()
        holder.wait()
    err = capfd.readouterr().err
    assert f"waiting for the native build in progress in {tmp_path} (process {holder.pid})" in err


# ---- a real build, killed, then two processes at once ----

# The lock is under test, not the kernels: built at -O0 (the last -O wins), the real sources
# take a third of the CPU time of the -O3 build (pool: 12 s against 36 s here).
UNOPTIMISED = "-O0"


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler on PATH")
def test_killed_build_then_two_processes_build_once_and_both_run(tmp_path):
    build = tmp_path / "build"
    log = tmp_path / "compiles.log"
    # 1. A build whose compiler hangs, killed with everything it started (as an OOM kill or
    #    a Ctrl-C at the wrong moment would): torch's lock file stays behind.
    #    ninja runs each compiler in a process group of its own: the hanging ones record their
    #    pids, and are killed by them.
    hung = tmp_path / "hung-compilers"
    hanging = compiler_wrapper(tmp_path / "hanging-cxx",
                               f'[[ " $* " == *" -c "* ]] && echo $$ >> {hung} && exec sleep 600')
    first = python(RUN_NATIVE, environment(build, CXX=hanging, AIA_NATIVE_CXXFLAGS=UNOPTIMISED), start_new_session=True)
    try:
        wait_for(lambda: (build / TORCH_LOCK_NAME).exists() and hung.exists(), 300, "the first build to start")
        time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        for pid in (hung.read_text().split() if hung.exists() else ()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert (build / TORCH_LOCK_NAME).exists()

    # 2. Two processes at once, with a compiler that logs what it compiles: one builds (and
    #    says so first), the other waits for it, and both run the kernels.
    logging = compiler_wrapper(tmp_path / "logging-cxx", f'[[ " $* " == *" -c "* ]] && echo "$@" >> {log}')
    env = environment(build, CXX=logging, AIA_NATIVE_CXXFLAGS=UNOPTIMISED)
    runs = [python(RUN_NATIVE, env) for _ in range(2)]
    try:  # a minute on an idle 2-core machine; 15 on one loaded eight times over
        results = [run.communicate(timeout=1800) for run in runs]
    finally:
        for run in runs:
            run.kill()
    for run, (out, err) in zip(runs, results):
        assert run.returncode == 0, err[-3000:]
        assert out.strip().endswith("ran")
    compiled = log.read_text().splitlines()
    for source in CPU_SOURCES:
        assert sum(source in line for line in compiled) == 1, compiled
    announcements = [line for _, err in results for line in err.splitlines() if "on first use" in line]
    assert len(announcements) == 1, announcements
    assert "compiling the native C++ kernels" in announcements[0] and str(build) in announcements[0]
    assert any("left by an interrupted build" in err for _, err in results)

    # 3. Built: a later process loads it silently.
    out, err = python(RUN_NATIVE, env).communicate(timeout=300)
    assert out.strip().endswith("ran") and "on first use" not in err, err[-3000:]


# ---- builds that fail or cannot happen ----

def fails_then_falls_back(env: dict) -> tuple[str, str]:
    """Runs NATIVE_RAISES_AUTO_FALLS_BACK; returns (native's error, auto's warning)."""
    out, err = python(NATIVE_RAISES_AUTO_FALLS_BACK, env).communicate(timeout=300)
    assert "auto ran reference" in out, out + err[-3000:]
    native_error = next(line for line in out.splitlines() if line.startswith("NATIVE RAISED:"))
    auto_warning = next(line for line in out.splitlines() if line.startswith("AUTO WARNED:"))
    assert "native:" in auto_warning  # says which backend could not run, and why
    return native_error, auto_warning


def test_no_compiler(tmp_path):
    native_error, auto_warning = fails_then_falls_back(environment(tmp_path, CXX=str(tmp_path / "no-such-c++")))
    assert "no-such-c++" in native_error and "no-such-c++" in auto_warning


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler on PATH")
def test_compiler_error(tmp_path):
    failing = compiler_wrapper(tmp_path / "failing-cxx", 'if [[ " $* " == *" -c "* ]]; then\n'
                               '  echo "simulated: error: expected ; before }" >&2; exit 1\nfi')
    native_error, auto_warning = fails_then_falls_back(environment(tmp_path, CXX=failing))
    assert "simulated: error: expected ; before }" in native_error  # the compiler's own message


def test_build_folder_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_text("")
    native_error, _ = fails_then_falls_back(environment(tmp_path / "a-file" / "build"))
    assert "a-file" in native_error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders; tested as another user")
def test_read_only_build_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        native_error, _ = fails_then_falls_back(environment(folder))
    finally:
        folder.chmod(0o755)
    assert "not writable" in native_error and str(folder) in native_error
