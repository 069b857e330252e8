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
    # Rows run or are cut by the 60 s budget (how many fit depends on this machine's load), in
    # the headline's order: every cheap row before any compile row.
    assert {r["status"] for r in rows} <= {"ok", "skipped", "not available"}
    assert all("budget" in r["reason"] for r in rows if r["status"] == "skipped")
    cheap = [r for r in rows if r["impl"] in ("eager", "authors", "native")]
    assert all(r["status"] == "ok" for r in cheap[:3])  # the first case, fwd-bwd float32
    compiled = [r for r in rows if r["impl"].startswith("compile")]
    ok = [(r["impl"], r["mode"], r["dtype"]) for r in compiled if r["status"] == "ok"]
    if ok:
        assert ok[0] == ("compile-default", "fwd-bwd", "float32") and all(r["status"] == "ok" for r in cheap)
    triton = [(r["mode"], r["dtype"], r["status"], r["note"] if r["status"] == "ok" else r["reason"])
              for r in rows if r["impl"] == "triton"]
    interpreted = [t for t in triton if t[2] == "ok"]
    if interpreter_problem() is None and all(r["status"] == "ok" for r in cheap):  # the interpreter: one case
        assert [t[:2] for t in interpreted] == [("fwd-infer", "float32")] and "interpreter" in interpreted[0][3]
    elif interpreter_problem() is not None:  # this machine's Triton and NumPy clash: the row says so
        assert not interpreted


def test_a_failing_step_fails_the_run(tmp_path):
    proc = gpu_run(tmp_path, STEPS="native", NATIVE_S="1", timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0 and "native: exit 124 (timed out)" in log and "1 failed: native" in log, log


def test_steps_beyond_the_runners_files_are_refused(tmp_path):
    proc = gpu_run(tmp_path, STEPS="tests,native,tune,headline", timeout=60)
    assert proc.returncode == 2 and "leaves 10 files" in proc.stderr and not any(tmp_path.iterdir())


def test_what_the_gpu_run_leaves_out_exists():
    """pytest ignores a --deselect or --ignore that names nothing, so a renamed test would
    silently come back into the GPU run's budget: every one named must exist."""
    import re
    script = SCRIPT.read_text()
    for path in re.findall(r"--ignore (\S+)", script):
        assert (ROOT / path).is_file(), path
    for path, name in re.findall(r"--deselect (\S+?)::(\w+)", script):
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"
