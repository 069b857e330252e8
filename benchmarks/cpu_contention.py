"""CPU: how much slower an AIA module gets with more threads while other processes keep
cores busy (issue 15 item 3: the native backend must lose no more than the reference).

    python benchmarks/cpu_contention.py                 # 1 vs 2 threads, 1 busy process
    python benchmarks/cpu_contention.py --busy 0        # the machine as it is

Starts ``--busy`` processes that spin on the CPU, then times forward+backward of the
reference and the native module at 1 and ``--threads`` threads in interleaved rounds
(torch.set_num_threads between steps, one process). Reported per backend: median step
time per thread count and the median over rounds of (time at N threads) / (time at 1).
Writes benchmarks/results/cpu_contention_<tag>.json and .md (machine, torch, date, command).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aia_kernels  # noqa: E402
from benchmarks.run import machine_meta  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def spin() -> None:
    while True:
        pass


def step_ms(module, x, grad, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        module(x).backward(grad)
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--shape", default="8,64,56,56", help="N*T,C,H,W")
    parser.add_argument("--threads", type=int, default=2, help="compared with 1 thread")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes started beside the benchmark")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", default="native=4,reference=1", help="timed steps per round, per backend")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps = {k: int(v) for k, v in (item.split("=") for item in args.steps.split(","))}
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    ref = aia_kernels.build(args.variant, num_segments=8, backend="reference").train()
    modules = {"reference": ref, "native": aia_kernels.build(args.variant, num_segments=8, backend="native").train()}
    modules["native"].load_state_dict(ref.state_dict())
    counts = (1, args.threads)
    threads_before = torch.get_num_threads()
    for name, module in modules.items():  # warm-up (and the native build) before the spinners start
        for t in counts:
            torch.set_num_threads(t)
            step_ms(module, x, grad, 1)
    assert modules["native"].last_backend == "native"
    load_before = os.getloadavg()
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    times = {(name, t): [] for name in modules for t in counts}
    try:
        time.sleep(1.0)
        for _ in range(args.rounds):
            for name, module in modules.items():
                for t in counts:
                    torch.set_num_threads(t)
                    step_ms(module, x, grad, 1)  # the thread count's first step is not timed
                    times[(name, t)].append(step_ms(module, x, grad, steps.get(name, 1)))
    finally:
        load_after = os.getloadavg()
        for p in spinners:
            p.terminate()
        for p in spinners:
            p.join()
        torch.set_num_threads(threads_before)
    rows = []
    for name in modules:
        one, many = times[(name, 1)], times[(name, args.threads)]
        rows.append({"backend": name, "ms_1": statistics.median(one), f"ms_{args.threads}": statistics.median(many),
                     "slowdown": statistics.median(b / a for a, b in zip(one, many))})
    meta = machine_meta(torch.device("cpu"), sys.argv[1:], entry=("benchmarks/cpu_contention.py",))
    info = {**meta, "variant": args.variant, "shape": list(shape), "threads": args.threads,
            "busy_processes": args.busy, "rounds": args.rounds, "steps": steps, "loadavg_before": load_before,
            "loadavg_after": load_after, "results": rows,
            "times_ms": {f"{name}@{t}": v for (name, t), v in times.items()}}
    tag = args.tag or f"{meta['date'][:10].replace('-', '')}_t{args.threads}_busy{args.busy}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"cpu_contention_{tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    n = args.threads
    lines = [f"# CPU under contention: {args.variant} forward+backward at {shape}, 1 vs {n} threads, "
             f"{args.busy} busy process(es)", "",
             f"{meta['date']}, {meta['device_name']} ({meta['cpu_count']} cores), torch {meta['torch']}; "
             f"{args.rounds} interleaved rounds, steps per round {steps}; slowdown: median over rounds of "
             f"(ms at {n} threads) / (ms at 1); load average before (no spinners yet) / after "
             f"{load_before[0]:.2f}/{load_after[0]:.2f}. Command: `{meta['command']}`", "",
             f"| backend | ms at 1 thread | ms at {n} threads | slowdown |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['ms_1']:.1f} | {r[f'ms_{n}']:.1f} | {r['slowdown']:.2f}x |")
    (args.results_dir / f"cpu_contention_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
