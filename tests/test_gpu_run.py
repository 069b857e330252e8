"""benchmarks/gpu_run.sh --dry-run: the GPU run's steps on this CPU, through Triton's
interpreter, with tiny shapes and the same timeouts; its output folder holds what the GPU
runner would return (at most 8 files, at most 2 folders down). Also: a step that fails
makes the run fail, and a STEPS whose files the runner would not return is refused."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
native = pytest.importorskip("aia_kernels.native")
interpreter_problem = pytest.importorskip("aia_kernels.triton").interpreter_problem


def gpu_run(out: Path, *args, timeout=900, **env) -> subprocess.CompletedProcess:
    # A plain child process: drop what an xdist worker parent leaves in the environment.
    parent = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    env = {**parent, "OUT": str(out), "PYTHON": os.environ.get("PYTHON", "python"), **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run rehearses the GPU run on a CPU machine; on a GPU "
                                                      "machine gpu_run.sh runs for real")
def test_dry_run_walks_every_step(tmp_path):
    native.load()  # the build is cached (its time on 2 busy CPU cores is not the GPU machine's)
    proc = gpu_run(tmp_path)
    log = (tmp_path / "run.log").read_text() if (tmp_path / "run.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["headline/log.txt", "headline/results.json", "headline/results.md", "native_cuda.log",
                     "run.log", "tests.log"]
    for step in ("tests", "native", "headline"):
        assert f"{step}: exit 0 in" in log, log
    assert "native build: exit 0" in log and "0 failed" in log
    assert " passed" in (tmp_path / "tests.log").read_text()

    rows = json.loads((tmp_path / "headline/results.json").read_text())["results"]
    assert {(r["mode"], r["dtype"]) for r in rows} == {(m, d) for m in ("fwd-bwd", "fwd-infer", "fwd-train")
                                                       for d in ("float32", "bfloat16")}
    assert {r["impl"] for r in rows} == {"eager", "authors", "compile-default", "compile-max-autotune", "triton",
                                         "native"}
    cheap = [r for r in rows if r["impl"] in ("eager", "authors", "native")]
    assert all(r["status"] == "ok" for r in cheap), [r["reason"] for r in cheap if r["status"] != "ok"]
    triton = [r for r in rows if r["impl"] == "triton" and r["status"] == "ok"]
    if interpreter_problem() is None:
        assert [(r["mode"], r["dtype"]) for r in triton] == [("fwd-bwd", "float32")]  # the interpreter: one case
        assert "interpreter" in triton[0]["note"] and triton[0]["max_abs_diff"] < 1e-4
    else:  # this machine's Triton and NumPy clash: the row says so
        assert not triton
    compiled = [r for r in rows if r["impl"].startswith("compile")]
    assert {r["status"] for r in compiled} <= {"ok", "skipped"}
    ok = [(r["impl"], r["mode"], r["dtype"]) for r in compiled if r["status"] == "ok"]
    assert not ok or ok[0] == ("compile-default", "fwd-bwd", "float32")  # the compile rows' first, if any
    assert all("budget" in r["reason"] for r in compiled if r["status"] == "skipped")


def test_a_failing_step_fails_the_run(tmp_path):
    proc = gpu_run(tmp_path, STEPS="native", NATIVE_S="1", timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0 and "native: exit 124 (timed out)" in log and "1 failed: native" in log, log


def test_steps_beyond_the_runners_files_are_refused(tmp_path):
    proc = gpu_run(tmp_path, STEPS="tests,native,tune,headline", timeout=60)
    assert proc.returncode == 2 and "leaves 10 files" in proc.stderr and not any(tmp_path.iterdir())
