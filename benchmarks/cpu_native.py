"""CPU benchmark of the native backend: forward + backward of an AIA module (train
mode) vs the eager reference and vs ``torch.compile`` of the reference.

    python benchmarks/cpu_native.py                       # spec shapes, N*T = 8, T = 8
    python benchmarks/cpu_native.py --threads 1 --rounds 12
    python benchmarks/cpu_native.py --threads 1 --round-warmup 2   # steady state, no cold first steps

Writes benchmarks/results/cpu_native_<tag>.json and .md (machine, torch, date, command).
Not a test: timings depend on the machine and on what else runs on it (the load
average before and after is recorded).
"""
from __future__ import annotations

import argparse
import copy
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
from benchmarks.run import cpu_model, source_commit  # noqa: E402

SHAPES = [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)]
RESULTS = Path(__file__).resolve().parent / "results"


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def fwd_bwd_step(module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """One timed forward + backward. The gradients are set to None first, untimed, as
    `optimizer.zero_grad()` does in training: otherwise each step would also add its input
    gradient into `x.grad`, a full-size pass that no module in a network makes (records
    before stop 44 include it: docs/benchmarks.md)."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    module(x).backward(grad)
    return time.perf_counter() - start


def time_interleaved(modules: dict, x: torch.Tensor, grad: torch.Tensor, rounds: int, steps: int,
                     warmup: int, round_warmup: int = 0) -> dict:
    """Per module: step times (s), measured in `rounds` rounds of `steps` steps that
    alternate between the modules, so that a slow phase of this shared machine (timings
    of the same code vary by 10-30% over seconds) hits every module alike; and per
    module, the ratios of its median step time to the native one, round by round.
    `round_warmup` untimed steps open each module's turn in a round: without them the
    first steps after another module pay for its evictions (on the AVX-512 Xeon a native
    step right after an eager one took 1.4x-1.5x its time alone, the next ones 1.1x and
    1.05x; docs/benchmarks.md, stop 44)."""
    x = x.detach().requires_grad_()
    for name, module in modules.items():
        for _ in range(warmup):
            fwd_bwd_step(module, x, grad)
    times = {name: [] for name in modules}
    per_round = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            for _ in range(round_warmup):
                fwd_bwd_step(module, x, grad)
            round_times = [fwd_bwd_step(module, x, grad) for _ in range(steps)]
            times[name] += round_times
            per_round[name].append(statistics.median(round_times))
    ratios = {name: [a / b for a, b in zip(per_round[name], per_round["native"])] for name in modules}
    return {"times": times, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="rounds alternating between the implementations")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--round-warmup", type=int, default=0,
                        help="untimed steps at the start of each implementation's turn in a round "
                             "(steady state; default 0: the first timed step follows the other implementation)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager reference")
    parser.add_argument("--keep", action="store_true",
                        help="add native-keep: native with every stage kept for backward (recompute=False)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: date and threads)")
    parser.add_argument("--shapes", default=None,
                        help="inputs as N*T,C,H,W;... (default: the spec's ResNet-50 shapes at N*T = 8)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
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
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    for shape in shapes:
        torch.manual_seed(0)
        x = torch.randn(shape)
        grad = torch.randn(shape)
        ref = aia_kernels.build(args.variant, num_segments=args.segments, backend="reference").train()
        fused = aia_kernels.build(args.variant, num_segments=args.segments, backend="native").train()
        fused.load_state_dict(ref.state_dict())
        row = {"shape": list(shape)}
        modules = {} if args.no_eager else {"eager": ref}
        if not args.no_compile:
            # The reference calls one gate function per (unit, axis): allow its recompiles,
            # and start each shape afresh, so nothing falls back to eager silently.
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = 256
            torch._dynamo.config.accumulated_recompile_limit = 4096
            compiled = torch.compile(ref)
            row["compile_time_s"] = fwd_bwd_step(compiled, x.detach().requires_grad_(), grad)
            modules["compiled"] = compiled
        modules["native"] = fused
        if args.keep:
            modules["native-keep"] = copy.deepcopy(fused)
            modules["native-keep"].recompute = False
        timed = time_interleaved(modules, x, grad, args.rounds, args.steps, args.warmup, args.round_warmup)
        assert fused.last_backend == "native"
        for name in modules:
            row[f"{name}_ms"] = 1e3 * statistics.median(timed["times"][name])
            row[f"{name}_ms_iqr"] = 1e3 * iqr(timed["times"][name])
        for name in modules:
            if name != "native":
                row[f"speedup_vs_{name.replace('-', '_')}"] = statistics.median(timed["ratios"][name])
        print(json.dumps(row), flush=True)
        rows.append(row)

    names = list(modules)
    now = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "date_utc": now.isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "variant": args.variant, "num_segments": args.segments, "dtype": "float32", "mode": "train",
        "measure": (f"forward+backward steps in {args.rounds} rounds alternating {', '.join(names)} "
                    f"({args.steps} steps each per round, after {args.warmup} warm-up steps"
                    + (f"; each turn opened by {args.round_warmup} untimed steps" if args.round_warmup else "")
                    + "); times: median "
                    "(IQR) of all steps; speedups: median over rounds of the per-round ratio"),
        "round_warmup": args.round_warmup,
        "threads": threads, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "commit": source_commit(),
        "native_cxxflags": native.CXX_FLAGS, "native_build_s": round(build_s, 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "results": rows,
    }
    tag = args.tag or f"{now:%Y%m%d}_t{threads}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"cpu_native_{tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [f"# CPU: native vs reference, {args.variant}, float32, train, forward+backward",
             "",
             f"{info['date_utc']}, {info['cpu']} ({info['cpu_count']} cores), {threads} thread(s), "
             f"torch {info['torch']}, commit {info['commit']}; {info['measure']}; load average before/after "
             f"{load_before[0]:.2f}/{info['loadavg_after'][0]:.2f}. Command: `{info['command']}`",
             "",
             "| input (N*T, C, H, W) | " + " | ".join(f"{n} ms (IQR)" for n in names) + " | "
             + " | ".join(f"native vs {n}" for n in names if n != "native") + " |",
             "|---|" + "---|" * (2 * len(names) - 1)]

    def ms(r, name):
        return f"{r[name + '_ms']:.1f} ({r[name + '_ms_iqr']:.1f})" if name + "_ms" in r else "-"

    for r in rows:
        ratios = [f"{r['speedup_vs_' + n.replace('-', '_')]:.2f}x" for n in names if n != "native"]
        lines.append(f"| {tuple(r['shape'])} | " + " | ".join(ms(r, n) for n in names) + " | "
                     + " | ".join(ratios) + " |")
    (args.results_dir / f"cpu_native_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
