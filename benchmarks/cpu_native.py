"""CPU benchmark of the native backend: forward + backward of an AIA module (train
mode) vs the eager reference and vs ``torch.compile`` of the reference.

    python benchmarks/cpu_native.py                       # spec shapes, N*T = 8, T = 8
    python benchmarks/cpu_native.py --threads 1 --reps 10

Writes benchmarks/results/cpu_native_<tag>.json and .md (machine, torch, date, command).
Not a test: timings depend on the machine and on what else runs on it (the load
average before and after is recorded).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aia_kernels  # noqa: E402

SHAPES = [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)]
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_fwd_bwd(module, x: torch.Tensor, grad: torch.Tensor, reps: int, warmup: int) -> list[float]:
    x = x.detach().requires_grad_()
    for _ in range(warmup):
        module(x).backward(grad)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        module(x).backward(grad)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--tag", default=None, help="results file suffix (default: date and threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import aia_kernels.native as native
    start = time.perf_counter()
    native.load()
    build_s = time.perf_counter() - start

    load_before = os.getloadavg()
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape)
        grad = torch.randn(shape)
        ref = aia_kernels.build(args.variant, num_segments=args.segments, backend="reference").train()
        fused = aia_kernels.build(args.variant, num_segments=args.segments, backend="native").train()
        fused.load_state_dict(ref.state_dict())
        row = {"shape": list(shape)}
        row["eager_ms"] = 1e3 * statistics.median(time_fwd_bwd(ref, x, grad, args.reps, args.warmup))
        if not args.no_compile:
            # The reference calls one gate function per (unit, axis): allow its recompiles,
            # and start each shape afresh, so nothing falls back to eager silently.
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = 256
            torch._dynamo.config.accumulated_recompile_limit = 4096
            compiled = torch.compile(ref)
            start = time.perf_counter()
            time_fwd_bwd(compiled, x, grad, 1, 0)
            row["compile_time_s"] = time.perf_counter() - start
            row["compiled_ms"] = 1e3 * statistics.median(time_fwd_bwd(compiled, x, grad, args.reps, args.warmup))
        row["native_ms"] = 1e3 * statistics.median(time_fwd_bwd(fused, x, grad, args.reps, args.warmup))
        assert fused.last_backend == "native"
        row["speedup_vs_eager"] = row["eager_ms"] / row["native_ms"]
        if "compiled_ms" in row:
            row["speedup_vs_compiled"] = row["compiled_ms"] / row["native_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)

    now = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "date_utc": now.isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "variant": args.variant, "num_segments": args.segments, "dtype": "float32", "mode": "train",
        "measure": f"median of {args.reps} forward+backward steps after {args.warmup} warm-up steps",
        "threads": threads, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "native_cxxflags": native.CXX_FLAGS, "native_build_s": round(build_s, 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "results": rows,
    }
    tag = args.tag or f"{now:%Y%m%d}_t{threads}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cpu_native_{tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [f"# CPU: native vs reference, {args.variant}, float32, train, forward+backward",
             "",
             f"{info['date_utc']}, {info['cpu']} ({info['cpu_count']} cores), {threads} thread(s), "
             f"torch {info['torch']}; {info['measure']}; load average before/after "
             f"{load_before[0]:.2f}/{info['loadavg_after'][0]:.2f}. Command: `{info['command']}`",
             "",
             "| input (N*T, C, H, W) | eager ms | compiled ms | native ms | native vs eager | native vs compiled |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        comp = f"{r['compiled_ms']:.1f}" if "compiled_ms" in r else "-"
        vs_comp = f"{r['speedup_vs_compiled']:.2f}x" if "speedup_vs_compiled" in r else "-"
        lines.append(f"| {tuple(r['shape'])} | {r['eager_ms']:.1f} | {comp} | {r['native_ms']:.1f} | "
                     f"{r['speedup_vs_eager']:.2f}x | {vs_comp} |")
    (RESULTS / f"cpu_native_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
