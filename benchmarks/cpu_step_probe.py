"""Where a native CPU train step's time goes, beyond the alternating benchmark
(``cpu_native.py``): one shape, one thread by default.

    python benchmarks/cpu_step_probe.py                 # (8, 512, 7, 7), CinST->STinC
    python benchmarks/cpu_step_probe.py --shape 8,256,14,14

Measures (forward + backward, train mode, float32):
  - native and eager steps run alone, step after step (median, IQR);
  - native steps right after eager steps: rounds of 3 eager then 3 native steps, the
    median of the 1st, 2nd and 3rd native step (the 1st pays for its working set);
  - the Python and autograd overhead of a native step: the two plan ops replaced by
    their cached results, so only the Python around them runs;
  - the time per step of each native primitive (``torch.profiler`` self time), with
    the executor walking the plan one primitive at a time (same kernels as the plan ops;
    but each primitive call evaluates its gates' values, sigmoid included, where the plan
    ops do it once per direction, so the small ATen ops there overstate the plan's).
Writes benchmarks/results/cpu_step_probe_<tag>.json and .md (machine, date, command).
``--profile-steps N`` instead only runs N native steps after 5 warm-up steps, for an
external profiler (``perf record -g --delay=...``), and writes nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aia_kernels  # noqa: E402
from benchmarks.cpu_native import RESULTS, fwd_bwd_step, iqr  # noqa: E402
from benchmarks.run import cpu_model  # noqa: E402


def steps_ms(module, x, grad, n: int) -> list[float]:
    return [1e3 * fwd_bwd_step(module, x, grad) for _ in range(n)]


def overhead_ms(module, x, grad, n: int) -> list[float]:
    """Step times with the native plan ops answered from a cache of their first results."""
    from aia_kernels import fused, native
    prims = native.NativePrimitives()
    cache = {}
    real = {"forward_plan": prims.forward_plan, "backward_plan": prims.backward_plan}

    def cached(name):
        def call(*args):
            if name not in cache:
                cache[name] = real[name](*args)
            return cache[name]
        return call

    prims.forward_plan, prims.backward_plan = cached("forward_plan"), cached("backward_plan")
    original = fused._primitives
    fused._primitives = lambda backend, device: prims
    try:
        steps_ms(module, x, grad, 5)
        return steps_ms(module, x, grad, n)
    finally:
        fused._primitives = original


def primitive_ms(module, x, grad, n: int) -> dict[str, float]:
    """Self time per step (ms) of each native primitive op, over n steps."""
    from torch.profiler import profile

    from aia_kernels import fused, native
    from aia_kernels.primitives import PrimitivesOnly
    walk = PrimitivesOnly(native.NativePrimitives())
    original = fused._primitives
    fused._primitives = lambda backend, device: walk
    try:
        steps_ms(module, x, grad, 3)
        with profile() as prof:
            steps_ms(module, x, grad, n)
    finally:
        fused._primitives = original
    return {e.key.split("::")[1]: e.self_cpu_time_total / 1e3 / n
            for e in prof.key_averages() if e.key.startswith("aia_native::")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--shape", default="8,512,7,7", help="N*T,C,H,W")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--profile-steps", type=int, default=0, help="only run this many native steps (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(shape).requires_grad_()
    grad = torch.randn(shape)
    eager = aia_kernels.build(args.variant, num_segments=args.segments, backend="reference").train()
    native = aia_kernels.build(args.variant, num_segments=args.segments, backend="native").train()
    native.load_state_dict(eager.state_dict())
    steps_ms(native, x, grad, 5)
    assert native.last_backend == "native"
    if args.profile_steps:
        steps_ms(native, x, grad, args.profile_steps)
        return
    steps_ms(eager, x, grad, 3)

    alone = {"native": steps_ms(native, x, grad, args.steps), "eager": steps_ms(eager, x, grad, args.steps)}
    after = [[], [], []]
    for _ in range(args.rounds):
        steps_ms(eager, x, grad, 3)
        for i, t in enumerate(steps_ms(native, x, grad, 3)):
            after[i].append(t)
    overhead = overhead_ms(native, x, grad, args.steps)
    primitives = primitive_ms(native, x, grad, args.steps)

    row = {"shape": list(shape)}
    for name, times in alone.items():
        row[f"{name}_alone_ms"] = statistics.median(times)
        row[f"{name}_alone_ms_iqr"] = iqr(times)
    row["alone_speedup"] = row["eager_alone_ms"] / row["native_alone_ms"]
    row["native_after_eager_ms"] = [statistics.median(t) for t in after]
    row["python_autograd_overhead_ms"] = statistics.median(overhead)
    row["primitive_ms_per_step"] = primitives

    now = datetime.datetime.now(datetime.timezone.utc)
    info = {"date_utc": now.isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
            "variant": args.variant, "num_segments": args.segments, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "loadavg": os.getloadavg(), "result": row}
    tag = args.tag or f"{now:%Y%m%d}_{'x'.join(map(str, shape))}_t{args.threads}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"cpu_step_probe_{tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    a = row["native_after_eager_ms"]
    lines = [f"# CPU step probe: {args.variant}, {shape}, float32, train, forward+backward, "
             f"{info['threads']} thread(s)", "",
             f"{info['date_utc']}, {info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}. "
             f"Command: `{info['command']}`", "",
             "| measure | ms |", "|---|---|",
             f"| native step, run alone (median, IQR) | {row['native_alone_ms']:.2f} "
             f"({row['native_alone_ms_iqr']:.2f}) |",
             f"| eager step, run alone (median, IQR) | {row['eager_alone_ms']:.2f} ({row['eager_alone_ms_iqr']:.2f}) |",
             f"| native steps 1, 2, 3 after 3 eager steps (medians) | {a[0]:.2f}, {a[1]:.2f}, {a[2]:.2f} |",
             f"| Python and autograd overhead of a native step | {row['python_autograd_overhead_ms']:.3f} |",
             "", f"Run alone, native is {row['alone_speedup']:.2f}x faster than eager.", "",
             "Native primitives, walked one by one (torch.profiler self time per step):", "",
             "| primitive | ms per step |", "|---|---|",
             *(f"| {name} | {ms:.3f} |" for name, ms in sorted(primitives.items(), key=lambda kv: -kv[1]))]
    (args.results_dir / f"cpu_step_probe_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
