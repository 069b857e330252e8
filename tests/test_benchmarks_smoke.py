"""The benchmark code cannot rot: the runner on a tiny shape on CPU (a smoke test, no
timing assertion), the bytes model on known variants, and the target checks."""
from __future__ import annotations

import json
import multiprocessing
import os
import sys

import pytest
import torch

from aia_kernels import backends
from aia_kernels.primitives.torch_impl import TorchPrimitives
from benchmarks import report, run
from benchmarks.bytes_model import design_bytes, design_passes


def test_bytes_model_known_variants():
    # CinST->STinC: 4 pool stages; 3 of them weighted by earlier gates; 2 (T, H, W) recomputed in backward.
    assert design_passes("CinST->STinC", "fwd-infer") == {"forward": 6, "backward": 0, "total": 6}
    assert design_passes("CinST->STinC", "fwd-train")["total"] == 6
    assert design_passes("CinST->STinC", "fwd-bwd") == {"forward": 6, "backward": 2 + 3 + 2 + 2, "total": 15}
    # C: one stage pooling plain v, so its weight_grad needs no extra read.
    assert design_passes("C", "fwd-bwd") == {"forward": 3, "backward": 4, "total": 7}
    assert design_passes("C+ST", "fwd-bwd") == {"forward": 4, "backward": 4 + 1, "total": 9}
    assert design_bytes("CinST->STinC", (64, 64, 56, 56), torch.bfloat16, "fwd-bwd") == 15 * 64 * 64 * 56 * 56 * 2
    with pytest.raises(ValueError):
        design_passes("C", "backward")


def test_runner_smoke_on_cpu(tmp_path, capsys, monkeypatch):
    # Stand-in for a fused backend: the plain-torch primitives through the real executor,
    # so the fused rows' code path runs too (whatever the real "native" backend is).
    fake = backends.FusedBackend("native", TorchPrimitives(), lambda device: None)
    monkeypatch.setitem(backends.stand_ins, "native", fake)
    payload = run.main(["--device", "cpu", "--shapes", "tiny", "--variants", "CinST->STinC", "--dtypes", "float32",
                        "--modes", "fwd-infer,fwd-bwd", "--backends", "eager,authors,triton,native,native-paths",
                        "--reps", "2", "--warmup", "1", "--threads", "1", "--out", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert "| variant | shape | dtype | mode | impl |" in stdout and "kernel timings need CUDA" in stdout

    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(payload))
    meta = data["meta"]
    assert meta["device_type"] == "cpu" and meta["torch"] == torch.__version__
    assert "benchmarks.run" in meta["command"] and meta["date"]
    assert [c["shape"] for c in data["copy_bandwidth"]] == ["8x8x8x8"] and data["copy_bandwidth"][0]["gbps"] > 0
    rows = {(r["mode"], r["impl"]): r for r in data["results"]}
    impls = ("eager", "authors", "triton", "native", "native-walk", "native-1launch")
    assert set(rows) == {(m, i) for m in ("fwd-infer", "fwd-bwd") for i in impls}
    for mode, passes in (("fwd-infer", 6), ("fwd-bwd", 15)):  # fwd-bwd: 2 recomputed stages read x again
        eager = rows[(mode, "eager")]
        assert eager["status"] == "ok", eager["reason"]
        assert eager["reps"] == 2 and 0 < eager["min_ms"] <= eager["median_ms"] <= eager["max_ms"]
        assert eager["speedup_eager"] == pytest.approx(1.0) and eager["speedup_compiled"] is None
        assert eager["design_passes"] == passes and eager["gbps"] > 0 and eager["roofline_frac"] > 0
        assert eager["launches"] > 0 and eager["launches_kind"] == "aten ops (cpu)"
        assert eager["peak_mem_bytes"] is None and eager["targets"] == []
        authors = rows[(mode, "authors")]  # the authors'-style eager module: same result
        assert authors["status"] == "ok" and authors["max_abs_diff"] < 1e-4 and authors["speedup_authors"] == 1.0
        assert eager["speedup_authors"] == pytest.approx(authors["median_ms"] / eager["median_ms"])
        # triton never times on CPU: missing, or only its interpreter -> reported, not run
        assert rows[(mode, "triton")]["status"] == "not available" and rows[(mode, "triton")]["reason"]
        for path in ("native-walk", "native-1launch"):  # the CUDA path choice: CUDA only
            assert rows[(mode, path)]["status"] == "not available" and "CUDA only" in rows[(mode, path)]["reason"]
        fused = rows[(mode, "native")]
        assert fused["status"] == "ok", fused["reason"]
        assert fused["note"] == "ran native" and fused["max_abs_diff"] < 1e-4  # output / grad_x vs eager
        assert fused["speedup_eager"] > 0 and fused["speedup_compiled"] is None and fused["targets"] == []

    md = (tmp_path / "results.md").read_text()
    assert md.count("| CinST->STinC | 8x8x8x8 | float32 |") == 6 and "No target applies" in md
    assert "- `triton` (2 cases): " in md  # not-available backends: listed once, not as rows
    png = (tmp_path / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def _row(impl, ms, shape="64x64x56x56", mode="fwd-bwd"):
    return {"variant": "CinST->STinC", "shape": shape, "dtype": "float32", "mode": mode, "impl": impl,
            "status": "ok", "median_ms": ms, "design_bytes": 13 * 10**9}


def test_speedups_and_target_checks():
    rows = [_row("eager", 100.0), _row("compile-default", 30.0), _row("compile-max-autotune", 20.0),
            _row("triton", 8.0), _row("native", 12.5), _row("triton", 1.0, shape="64x512x7x7")]
    report.add_derived(rows, {("64x64x56x56", "float32"): 2000.0})
    triton, native = rows[3], rows[4]
    assert triton["compiled_peer"] == "compile-max-autotune"
    assert triton["speedup_eager"] == pytest.approx(12.5) and triton["speedup_compiled"] == pytest.approx(2.5)
    assert triton["gbps"] == pytest.approx(1625.0) and triton["roofline_frac"] == pytest.approx(0.8125)
    assert [c["met"] for c in report.target_checks(triton, "cuda")] == [True, True, True]
    checks = report.target_checks(native, "cuda")
    assert [c["met"] for c in checks] == [False, False, False]  # 8x, 1.6x, 52%
    assert [c["verdict"].split(" (")[0] for c in checks] == ["missed by 20%", "missed by 20%", "missed by 26%"]
    # Smaller shapes: speedup targets only; unknown baseline: said so. No targets on CPU or for eager.
    small = report.target_checks(rows[5], "cuda")
    assert [c["target"] for c in small] == ["fwd+bwd speedup over eager", "fwd+bwd speedup over the compiled peer"]
    assert small[0]["met"] is None and "not measured" in small[0]["verdict"]
    assert report.target_checks(triton, "cpu") == [] and report.target_checks(rows[0], "cuda") == []


@pytest.mark.parametrize("impl", ["eager", "authors"])
def test_bf16_input_runs_on_the_fp32_module(impl):
    """bf16 cases feed a bf16 input to the module as-is (fp32 parameters; the authors'-style
    module under autocast); every mode works."""
    from benchmarks.cases import make_input, make_module, make_step, prepare_impl
    for mode in ("fwd-infer", "fwd-train", "fwd-bwd"):
        module, fn = prepare_impl(make_module("CinST->STinC", mode, torch.device("cpu")), impl)
        assert all(p.dtype == torch.float32 for p in module.parameters())
        result = make_step(module, fn, make_input((8, 4, 5, 6), torch.bfloat16, torch.device("cpu")), mode)()
        out = result[0] if mode == "fwd-bwd" else result
        assert out.dtype == torch.bfloat16 and out.shape == (8, 4, 5, 6) and torch.isfinite(out.float()).all()
        if mode == "fwd-bwd":  # grad_x, then every parameter's gradient, in the parameter's dtype
            assert all(g.dtype == torch.float32 for g in result[1:]) and len(result) == 1 + 4 * 2 * 3


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_headline_schedule_under_a_time_budget(tmp_path, monkeypatch):
    """gpu_run.sh's headline run, its measurements replaced by a clock that advances as the
    GPU machine's would (a cold torch.compile costs tens of seconds): every cheap row of the
    24 cases is measured before any compile starts, the compiled peers then fill the time
    left, fwd-bwd float32 largest shape first, and a compile row that would not finish in
    the time left is skipped, saying why."""
    clock = FakeClock()
    monkeypatch.setattr(run, "time", clock)
    cost = {"eager": 2.0, "authors": 3.0, "native": 1.0, "compile-default": 40.0, "compile-max-autotune": 90.0}
    measured = []

    def fake_measure(timer, base, impl, x, mode, reps, warmup, reference):
        measured.append((impl, mode, "x".join(map(str, x.shape)), str(x.dtype).removeprefix("torch.")))
        clock.now += cost[impl]
        times = {k: 1.0 for k in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms")}
        return ({"first_call_s": cost[impl], "max_abs_diff": None if reference is None else 0.0, **times,
                 "reps": reps, "peak_mem_bytes": None, "launches": 1, "launches_kind": "fake"}, torch.zeros(1))

    monkeypatch.setattr(run, "measure_impl", fake_measure)
    monkeypatch.setattr(run, "measure_copy", lambda timer, shape, dtype, device, reps, warmup: {
        "shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."), "median_ms": 1.0,
        "gbps": 1.0})
    monkeypatch.setattr(run, "make_input", lambda shape, dtype, device: torch.empty(shape, dtype=dtype,
                                                                                    device="meta"))
    monkeypatch.setattr(run, "unavailable_reason", lambda impl, device, interpreter=False:
                        "not here" if impl == "triton" else None)
    payload = run.main(["--device", "cpu", "--shapes", "spec", "--dtypes", "float32,bfloat16",
                        "--modes", "fwd-bwd,fwd-infer,fwd-train", "--backends", "all", "--reps", "2",
                        "--time-budget", "200", "--no-plot", "--out", str(tmp_path)])
    rows = payload["results"]
    assert len(rows) == 24 * 6 and not [r for r in rows if r["status"] == "pending"]
    cheap = [r for r in rows if r["impl"] in ("eager", "authors", "native")]
    assert all(r["status"] == "ok" for r in cheap)  # 24 x 6 s = 144 s, within the budget
    first_compile = next(i for i, m in enumerate(measured) if m[0].startswith("compile"))
    assert first_compile == len(cheap) and all(m[0].startswith("compile") for m in measured[first_compile:])
    compiled = [r for r in rows if r["impl"].startswith("compile")]
    ok = [(r["impl"], r["mode"], r["shape"], r["dtype"]) for r in compiled if r["status"] == "ok"]
    assert ok == [("compile-default", "fwd-bwd", "64x64x56x56", "float32")]  # 144 + 40 = 184 s
    reasons = {r["reason"] for r in compiled if r["status"] == "skipped"}
    # The same mode's compile, else another mode's, else another compile mode's, is the estimate.
    assert reasons == {"time budget: 16 s left, compile-default fwd-bwd took 40 s to compile"}
    assert measured[-1] == ("compile-default", "fwd-bwd", "64x64x56x56", "float32")
    peer = next(r for r in rows if r["impl"] == "native" and r["mode"] == "fwd-bwd" and r["dtype"] == "float32"
                and r["shape"] == "64x64x56x56")
    assert peer["compiled_peer"] == "compile-default" and peer["speedup_authors"] == 1.0


def test_cpu_native_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/cpu_native.py end to end on tiny shapes (no torch.compile: minutes on CPU)."""
    from benchmarks import cpu_native
    monkeypatch.setattr(sys, "argv", ["cpu_native.py", "--threads", "1", "--rounds", "2", "--steps", "1",
                                      "--warmup", "1", "--no-compile", "--shapes", "8,5,7,7;8,3,6,9",
                                      "--results-dir", str(tmp_path), "--tag", "smoke"])
    cpu_native.main()
    info = json.loads((tmp_path / "cpu_native_smoke.json").read_text())
    assert [r["shape"] for r in info["results"]] == [[8, 5, 7, 7], [8, 3, 6, 9]]
    for row in info["results"]:
        assert row["eager_ms"] > 0 and row["native_ms"] > 0 and row["speedup_vs_eager"] > 0
        assert "compiled_ms" not in row
    assert "| (8, 5, 7, 7) |" in (tmp_path / "cpu_native_smoke.md").read_text()


def test_cpu_native_round_warmup_steps_are_untimed():
    """--round-warmup: each module's turn in a round opens with that many untimed steps;
    only `steps` per round are timed."""
    from benchmarks import cpu_native

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.w

    modules = {"eager": Counting(), "native": Counting()}
    x, grad = torch.ones(3), torch.ones(3)
    timed = cpu_native.time_interleaved(modules, x, grad, rounds=2, steps=3, warmup=1, round_warmup=2)
    for name, module in modules.items():
        assert module.calls == 1 + 2 * (2 + 3)
        assert len(timed["times"][name]) == 2 * 3 and len(timed["ratios"][name]) == 2
    plain = cpu_native.time_interleaved(modules, x, grad, rounds=2, steps=3, warmup=1)
    assert modules["native"].calls == 11 + 1 + 2 * 3 and len(plain["times"]["native"]) == 6


def test_cpu_contention_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/cpu_contention.py end to end on a tiny shape, with one spinning process
    that it stops again; the caller's thread count is restored."""
    from benchmarks import cpu_contention
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["cpu_contention.py", "--shape", "8,3,5,5", "--rounds", "2", "--busy", "1",
                                      "--results-dir", str(tmp_path), "--tag", "smoke"])
    cpu_contention.main()
    info = json.loads((tmp_path / "cpu_contention_smoke.json").read_text())
    assert [r["backend"] for r in info["results"]] == ["reference", "native"]
    for row in info["results"]:
        assert row["ms_1"] > 0 and row["ms_2"] > 0 and row["slowdown"] > 0
    assert all(len(v) == 2 for v in info["times_ms"].values())
    assert "| native |" in (tmp_path / "cpu_contention_smoke.md").read_text()
    assert torch.get_num_threads() == threads
    assert not [p for p in multiprocessing.active_children() if p.is_alive()], "a spinner was left running"


def test_cpu_passes_benchmark_smoke(tmp_path):
    """benchmarks/cpu_passes.py end to end on a tiny shape: every pass timed, the commit recorded."""
    from benchmarks import cpu_passes
    threads = torch.get_num_threads()
    cpu_passes.main(["--shapes", "8,5,7,9", "--rounds", "2", "--calls", "1", "--results-dir", str(tmp_path),
                     "--tag", "smoke"])
    info = json.loads((tmp_path / "cpu_passes_smoke.json").read_text())
    assert len(info["results"]) == 12 and all(r["median_ms"] > 0 for r in info["results"])
    assert "commit" in info
    assert "| (8, 5, 7, 9) | pool W only, C weight |" in (tmp_path / "cpu_passes_smoke.md").read_text()
    torch.set_num_threads(threads)


def test_native_ab_renames_the_base_op_library(tmp_path):
    """benchmarks/native_ab.py: the base revision's csrc/ registers its ops as aia_native_base
    (every TORCH_LIBRARY macro renamed, nothing left under aia_native), so both builds load."""
    import re

    from benchmarks import native_ab
    csrc = native_ab.base_sources(native_ab.resolve("HEAD"), tmp_path)
    macros = [m for path in csrc.rglob("*.*") for m in re.findall(r"TORCH_LIBRARY\w*\(\s*(\w+)", path.read_text())]
    assert macros and set(macros) == {native_ab.BASE_NAMESPACE}
    # the base's sources as native_ab finds them (any layout) are, for HEAD, what the build compiles
    from aia_kernels.native.build_config import CPU_SOURCES
    assert sorted(p.name for p in native_ab.base_cpu_sources(csrc)) == sorted(CPU_SOURCES)


def test_native_ab_times_single_passes(monkeypatch):
    """benchmarks/native_ab.py --passes: one row per matching pass of cpu_passes.py, each timed
    with both builds (here the working tree's twice: building a base takes minutes)."""
    import contextlib

    from benchmarks import native_ab
    monkeypatch.setattr(native_ab, "ops_of", lambda build: contextlib.nullcontext())
    rows = native_ab.measure_passes(["pool T/H/W"], (8, 12, 5, 5), rounds=2, steps=1)
    assert [r["mode"] for r in rows] == ["pool T/H/W, C weight", "pool T/H/W, ST weight"]
    assert all(r["head_median_ms"] > 0 and r["base_median_ms"] > 0 and r["ratio_head_to_base"] > 0 for r in rows)


def test_network_revisions_smoke(tmp_path):
    """benchmarks/network_revisions.py end to end: HEAD extracted as the base, one process of
    each checkout, their per-round overheads reported and written."""
    from benchmarks import native_ab, network_revisions
    network_revisions.main(["--base", "HEAD", "--backend", "reference", "--size", "32", "--frames", "2",
                            "--pairs", "1", "--rounds", "2", "--results-dir", str(tmp_path), "--tag", "smoke"])
    info = json.loads((tmp_path / "network_revisions_smoke.json").read_text())
    assert info["base_commit"] == native_ab.resolve("HEAD")
    for name in ("base", "head"):
        (run,) = info["runs"][name]
        assert len(run["times"]["plain"]) == len(run["times"]["aia"]) == 2
        assert all(t > 0 for t in run["times"]["plain"] + run["times"]["aia"])
        assert info[name]["rounds"] == 2 and len(info[name]["overhead_per_process"]) == 1
    assert "| base |" in (tmp_path / "network_revisions_smoke.md").read_text()


def test_onnx_network_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/onnx_network.py end to end on narrow networks: both exported, checked against
    PyTorch, timed in ONNX Runtime and in PyTorch (native), one row per runtime and network."""
    from benchmarks import onnx_network

    from aia_testing import small_tsm
    monkeypatch.setattr(onnx_network, "build_pair", lambda arch, variant, frames: {
        "plain": small_tsm(None, frames), "aia": small_tsm(variant, frames)})
    threads = torch.get_num_threads()
    onnx_network.main(["--size", "16", "--frames", "2", "--threads", "1", "--rounds", "2", "--warmup", "0",
                       "--results-dir", str(tmp_path), "--tag", "smoke"])
    info = json.loads((tmp_path / "onnx_network_smoke.json").read_text())
    rows = {(r["runtime"], r["network"]): r for r in info["results"]}
    assert set(rows) == {(a, b) for a in ("onnxruntime", "pytorch") for b in ("plain", "aia")}
    assert all(r["median_ms"] > 0 for r in rows.values()) and rows["onnxruntime", "plain"]["overhead"] == 0
    assert rows["onnxruntime", "aia"]["onnx_relative_difference"] <= 1e-4 and "onnxruntime" in info
    assert torch.get_num_threads() == threads


def test_cpu_step_probe_smoke(tmp_path, monkeypatch):
    """benchmarks/cpu_step_probe.py end to end on a tiny shape."""
    from benchmarks import cpu_step_probe
    monkeypatch.setattr(sys, "argv", ["cpu_step_probe.py", "--shape", "8,5,7,7", "--steps", "2", "--rounds", "1",
                                      "--results-dir", str(tmp_path), "--tag", "smoke"])
    cpu_step_probe.main()
    row = json.loads((tmp_path / "cpu_step_probe_smoke.json").read_text())["result"]
    assert row["shape"] == [8, 5, 7, 7] and len(row["native_after_eager_ms"]) == 3
    assert row["native_alone_ms"] > 0 and row["python_autograd_overhead_ms"] > 0


def test_native_path_impls_set_the_switch(monkeypatch):
    """native-walk / native-1launch run the native module with AIA_NATIVE_CUDA_PERSISTENT
    = 0 / 1 at each call; plain native with what the user had (here: unset)."""
    from benchmarks import cases
    monkeypatch.setattr(cases, "_USER_PATH_SETTING", None)
    monkeypatch.setenv(cases.PATH_ENV, "")  # recorded, so teardown restores what was there
    monkeypatch.delenv(cases.PATH_ENV)
    base = cases.make_module("C", "fwd-infer", torch.device("cpu"))
    x = torch.randn(8, 3, 4, 5)
    for impl, expected in (("native-walk", "0"), ("native-1launch", "1"), ("native", None), ("native-1launch", "1")):
        module, fn = cases.prepare_impl(base, impl)
        assert module.backend == "native"
        fn(x)
        assert os.environ.get(cases.PATH_ENV) == expected, impl
    assert cases.parse_list("all", cases.IMPLS, cases.IMPL_GROUPS, "backend") == [
        "eager", "authors", "compile-default", "compile-max-autotune", "triton", "native"]
    assert cases.parse_list("native-paths", cases.IMPLS, cases.IMPL_GROUPS, "backend") == ["native-walk",
                                                                                          "native-1launch"]


def test_network_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/network.py end to end on tiny settings (TSM-R50 at 32x32, 2 frames, one
    round), the fused backend stood in by the plain-torch primitives: every configuration
    runs, the files are written, and the saved-bytes column shows the recompute at work."""
    from benchmarks import network
    monkeypatch.setitem(backends.stand_ins, "native",
                        backends.FusedBackend("native", TorchPrimitives(), lambda device: None))
    network.main(["--device", "cpu", "--archs", "tsm", "--frames", "2", "--size-eval", "32", "--size-train", "32",
                  "--threads", "1", "--rounds", "1", "--warmup", "0", "--results-dir", str(tmp_path),
                  "--tag", "smoke"])
    info = json.loads((tmp_path / "network_cpu_smoke.json").read_text())
    rows = {(r["mode"], r["config"]): r for r in info["results"]}
    # recompute=False only changes what a backward reads: no eval row for it; plain-again: the noise floor
    assert set(rows) == ({("eval", c) for c in ("plain", "plain-again", "reference", "native")}
                         | {("train", c) for c in ("plain", "plain-again", "reference", "native", "native-keep")})
    for mode in ("eval", "train"):
        again = rows[mode, "plain-again"]
        assert again["aia_forward_ms"] is None and again["median_ms"] > 0 and again["overhead"] > -1
    for row in rows.values():
        assert row["median_ms"] > 0 and row["threads"] == 1
        assert row["faults_per_step"] is not None and row["faults_per_step"] >= 0
    # time inside the AIA modules: none for plain; the fused op's backward node is timed, the
    # reference's backward (many nodes) is not; forward time below the step's
    for mode in ("eval", "train"):
        assert rows[mode, "plain"]["aia_forward_ms"] is None and rows[mode, "plain"]["aia_backward_ms"] is None
        for config in ("reference", "native", "native-keep")[:3 if mode == "train" else 2]:
            assert 0 < rows[mode, config]["aia_forward_ms"] < rows[mode, config]["median_ms"] * 5
    assert rows["eval", "native"]["aia_backward_ms"] is None and rows["train", "reference"]["aia_backward_ms"] is None
    assert rows["eval", "native"]["aia_forward_again_ms"] > 0
    assert rows["train", "native"]["aia_forward_again_ms"] is None  # not without autograd
    assert rows["train", "native"]["aia_backward_ms"] > 0 and rows["train", "native-keep"]["aia_backward_ms"] > 0
    # by input shape: every AIA module counted once, in the network and alone; backward where timed
    for (mode, config), row in rows.items():
        shapes = row["aia_by_shape"]
        if config.startswith("plain"):
            assert shapes == []
            continue
        assert sum(s["modules"] for s in shapes) == 16 and len({tuple(s["shape"]) for s in shapes}) == len(shapes)
        for s in shapes:
            assert s["forward_ms"] > 0 and s["alone_forward_ms"] > 0 and s["cold_forward_ms"] > 0
            timed_backward = mode == "train" and config != "reference"
            assert (s["backward_ms"] is not None) == timed_backward == (s["alone_backward_ms"] is not None) \
                == (s["cold_backward_ms"] is not None)
    train = {c: rows["train", c]["saved_bytes"] for c in ("plain", "plain-again", "reference", "native", "native-keep")}
    assert train["plain"] == train["plain-again"] < train["native"] < train["native-keep"] < train["reference"]
    assert info["command"] and info["torch"] == torch.__version__
    text = (tmp_path / "network_cpu_smoke.md").read_text()
    assert "| tsm | train | 32 | 1 | native |" in text and "| in network / cold |" in text
    assert info["cold_mib"] == 64 and "a buffer of 64 MiB written before each forward" in text


def test_memory_report_smoke(tmp_path, monkeypatch):
    """benchmarks/memory.py on one tiny shape: the recompute keeps less than keeping every stage."""
    from benchmarks import memory
    monkeypatch.setitem(backends.stand_ins, "native",
                        backends.FusedBackend("native", TorchPrimitives(), lambda device: None))
    memory.main(["--shapes", "8,6,5,4", "--variants", "C,CinST->STinC", "--results-dir", str(tmp_path),
                 "--tag", "smoke"])
    info = json.loads((tmp_path / "memory_cpu_smoke.json").read_text())
    rows = {r["variant"]: r for r in info["results"]}
    assert rows["C"]["native"] == rows["C"]["native-keep"]  # nothing to recompute
    paper = rows["CinST->STinC"]
    assert paper["input_bytes"] < paper["native"] < paper["native-keep"] < paper["reference"]
    assert "| CinST->STinC | (8, 6, 5, 4) |" in (tmp_path / "memory_cpu_smoke.md").read_text()


def test_results_command_names_timing_environment(monkeypatch):
    """A results file's command starts with the environment settings that change timings
    (allocator tunables, preloads, thread counts), so that it reruns as it ran."""
    from benchmarks.run import machine_meta
    for name in ("GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    plain = machine_meta(torch.device("cpu"), ["--x"], entry=("b.py",))["command"]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    tuned = machine_meta(torch.device("cpu"), ["--x"], entry=("b.py",))["command"]
    assert tuned == "GLIBC_TUNABLES=glibc.malloc.trim_threshold=1 " + plain
    assert plain.endswith("b.py --x") and "GLIBC_TUNABLES" not in plain


def test_source_commit_dirty_only_for_code(tmp_path):
    """Results record the commit that ran, "+dirty" when its code differs from it; a new
    or edited results file or doc is not a code change."""
    import shutil
    import subprocess
    if shutil.which("git") is None:
        pytest.skip("needs git")

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for path in ("aia_kernels/a.py", "benchmarks/b.py", "benchmarks/results/r.md", "docs/d.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    clean = run.source_commit(str(tmp_path))
    assert clean and len(clean) == 12 and not clean.endswith("+dirty")
    (tmp_path / "benchmarks/results/r.md").write_text("2\n")
    (tmp_path / "docs/d.md").write_text("2\n")
    assert run.source_commit(str(tmp_path)) == clean
    (tmp_path / "benchmarks/b.py").write_text("2\n")
    assert run.source_commit(str(tmp_path)) == clean + "+dirty"


def test_network_keep_configs_for_every_fused_backend():
    """Each fused backend also runs with recompute=False ("<backend>-keep"), the reference
    never: on CUDA that times Triton's recompute against keeping every stage."""
    from aia_kernels import aia_modules
    from benchmarks.network import build_configs
    configs = build_configs("tsn", "C", 2, ["reference", "native", "triton"], True, torch.device("cpu"))
    assert [c.name for c in configs] == ["plain", "reference", "native", "triton", "native-keep", "triton-keep"]
    for config in configs[1:]:
        modes = {(m.backend, m.recompute) for _, m in aia_modules(config.model)}
        assert modes == {(config.backend, not config.name.endswith("-keep"))}
    assert [c.name for c in build_configs("tsn", "C", 2, ["native"], False, torch.device("cpu"))] == ["plain", "native"]
    configs = build_configs("tsn", "C", 2, ["native"], False, torch.device("cpu"), noise_floor=True)
    assert [c.name for c in configs] == ["plain", "plain-again", "native"]
    assert configs[1].model is not configs[0].model and not aia_modules(configs[1].model)
    assert all(torch.equal(a, b) for a, b in zip(configs[0].model.state_dict().values(),
                                                  configs[1].model.state_dict().values()))
