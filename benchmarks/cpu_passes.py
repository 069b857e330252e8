"""CPU: one full-size pass of the native backend at a time, so that a module's time can be
split by pass and by pooled axis (where does a T/H/W pooling pass spend its time: the T
running max, the H columns or the W rows?).

    python benchmarks/cpu_passes.py                      # the four spec shapes, 1 thread
    python benchmarks/cpu_passes.py --shapes 8,64,56,56 --rounds 20

Times the ``native`` primitives on float32 clips (N*T = 8, T = 8): ``apply`` and ``pool``
with a C-gate weight and a T/H/W (ST) weight, ``pool`` along each axis alone, in interleaved
rounds (every case once per round, median over rounds). A pass that only reads ``v``
(pool H: registers only) is the floor a pooling pass can get to on this machine.
Writes benchmarks/results/cpu_passes_<tag>.json and .md (machine, versions, commit, command).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aia_kernels import backends  # noqa: E402
from aia_kernels.primitives import GateValue, PooledGrad, WeightValue, gate_shape  # noqa: E402
from benchmarks.network import write_results  # noqa: E402
from benchmarks.run import machine_meta  # noqa: E402

SHAPES = ["8,64,56,56", "8,128,28,28", "8,256,14,14", "8,512,7,7"]
RESULTS = Path(__file__).resolve().parent / "results"
T = 8


def cases(prims, v: torch.Tensor) -> dict:
    """name -> a call of one pass over ``v`` (N, T, C, H, W)."""
    def gate(axis):
        return GateValue(axis, torch.randn(gate_shape(v.shape, axis)), torch.tensor([1.0, 0.1]))

    def pooled_grad(axis):
        shape = gate_shape(v.shape, axis)
        index = torch.randint(0, v.shape[" TCHW".index(axis)], shape, dtype=torch.int32)
        return PooledGrad(axis, torch.randn(shape[0], 2, *shape[1:]), index)

    c_weight = WeightValue(((gate("C"),),), "prod")
    st_weight = WeightValue(((gate("T"), gate("H"), gate("W")),), "prod")
    st_c_weight = WeightValue(((gate("T"), gate("H"), gate("W")), (gate("C"),)), "prod")
    thw_grads = [pooled_grad(axis) for axis in "THW"]
    grad_out, out = torch.randn_like(v), torch.empty_like(v)
    return {
        "apply, C weight": lambda: prims.apply(v, c_weight, out),
        "apply, ST weight": lambda: prims.apply(v, st_weight, out),
        "pool C, C weight": lambda: prims.pool(v, c_weight, "C"),
        "pool T/H/W, C weight": lambda: prims.pool(v, c_weight, "THW"),
        "pool T/H/W, ST weight": lambda: prims.pool(v, st_weight, "THW"),
        "pool T only, C weight": lambda: prims.pool(v, c_weight, "T"),
        "pool H only, C weight": lambda: prims.pool(v, c_weight, "H"),
        "pool W only, C weight": lambda: prims.pool(v, c_weight, "W"),
        # the backward's passes: gate gradients against grad_out or pooled gradients, then grad_x
        "weight_grad, ST*C weight, grad_out": lambda: prims.weight_grad(v, grad_out, st_c_weight),
        "weight_grad, ST weight, T/H/W pooled": lambda: prims.weight_grad(v, thw_grads, st_weight),
        "weight_grad, C weight, T/H/W pooled": lambda: prims.weight_grad(v, thw_grads, c_weight),
        "input_grad, ST*C weight, grad_out": lambda: prims.input_grad([(st_c_weight, grad_out)], out),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=";".join(SHAPES), help="N*T,C,H,W;... (N*T a multiple of 8)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5, help="calls per case and round (their mean is one sample)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: date)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prims = backends.get("native", torch.device("cpu")).primitives
    meta = machine_meta(torch.device("cpu"), sys.argv[1:] if argv is None else argv,
                        entry=("benchmarks/cpu_passes.py",))
    load_before = os.getloadavg()
    rows = []
    for text in args.shapes.split(";"):
        shape = tuple(int(s) for s in text.split(","))
        v = torch.randn(shape[0] // T, T, *shape[1:])
        calls = cases(prims, v)
        for call in calls.values():  # warm-up: workspaces, first-touch pages
            call()
        samples = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                samples[name].append(1e3 * (time.perf_counter() - start) / args.calls)
        for name, ms in samples.items():
            q = statistics.quantiles(ms, n=4)
            rows.append({"shape": list(shape), "pass": name, "median_ms": statistics.median(ms), "iqr_ms": q[2] - q[0]})
    info = {**meta, "threads": args.threads, "dtype": "float32",
            "measure": (f"{args.rounds} interleaved rounds, each case {args.calls} calls a round (their mean is one "
                        f"sample); median (IQR) over rounds; load average before/after "
                        f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}"),
            "results": rows}
    lines = [f"# CPU: one native pass at a time, float32, {meta['device_name']}, {args.threads} thread(s)", "",
             f"{meta['date']}; torch {meta['torch']}; commit {meta['commit']}; {info['measure']}. "
             f"Command: `{meta['command']}`", "",
             "| input (N*T, C, H, W) | pass | median ms (IQR) |", "|---|---|---|"]
    lines += [f"| {tuple(r['shape'])} | {r['pass']} | {r['median_ms']:.3f} ({r['iqr_ms']:.3f}) |" for r in rows]
    write_results(info, "\n".join(lines) + "\n", args.results_dir, "cpu_passes", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
