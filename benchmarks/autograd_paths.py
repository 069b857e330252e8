"""The two eager autograd paths of the fused ops, timed against each other on the CPU.

    python benchmarks/autograd_paths.py                     # CinST->STinC, (8, 512, 7, 7), 1 thread
    python benchmarks/autograd_paths.py --shape 8,256,14,14

Paths (``aia_kernels/fused.py``): "function", the ``torch.autograd.Function`` that eager
mode uses, and "library", the ``aia_kernels::fused_forward`` op with the autograd that
``torch.library.register_autograd`` gives it (what torch.compile traces), called eagerly.
Both run the same executor and kernels; the script checks that their outputs, gradients
and BN buffers are bitwise equal. Measured per path, in rounds that alternate which path
goes first (float32, train mode, forward + backward of one native module):

  - step: the whole train step;
  - python: the step with the native plan ops answered from a cache of their first
    results (a stand-in backend), so only the Python and autograd around the kernels run.

Writes benchmarks/results/autograd_paths_<tag>.json and .md (machine, versions, date, command).
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
from aia_kernels import backends, fused, native  # noqa: E402
from benchmarks.cpu_native import RESULTS, iqr  # noqa: E402
from benchmarks.run import cpu_model  # noqa: E402

PATHS = {"function": fused.forward_with_autograd_function, "library": fused.forward_with_library_op}


class CachedPlanOps:
    """The native whole-plan ops, answered from their first results: no kernel runs."""

    def __init__(self):
        self._real = native.primitives
        self._cache = {}

    def forward_plan(self, *args):
        if "forward" not in self._cache:
            self._cache["forward"] = self._real.forward_plan(*args)
        return self._cache["forward"]

    def backward_plan(self, *args):
        if "backward" not in self._cache:
            self._cache["backward"] = self._real.backward_plan(*args)
        return self._cache["backward"]


def step_s(module, x, grad, path: str) -> float:
    fused.EAGER_FORWARD = PATHS[path]
    try:
        start = time.perf_counter()
        module(x).backward(grad)
        return time.perf_counter() - start
    finally:
        fused.EAGER_FORWARD = PATHS["function"]


def one_step_results(module, x, grad, path: str) -> list[torch.Tensor]:
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x.grad = None
    module.zero_grad()
    fused.EAGER_FORWARD = PATHS[path]
    try:
        out = module(x)
    finally:
        fused.EAGER_FORWARD = PATHS["function"]
    out.backward(grad)
    results = [out.detach(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    results += [v.clone() for v in module.state_dict().values()]
    module.load_state_dict(state)
    return results


def interleaved(module, x, grad, rounds: int, steps: int) -> dict:
    """{path: [median step time of each round (s)]}; the first path alternates by round."""
    per_round = {path: [] for path in PATHS}
    for r in range(rounds):
        order = list(PATHS) if r % 2 == 0 else list(reversed(PATHS))
        for path in order:
            per_round[path].append(statistics.median(step_s(module, x, grad, path) for _ in range(steps)))
    return per_round


def summary(per_round: dict) -> dict:
    row = {f"{path}_ms": 1e3 * statistics.median(t) for path, t in per_round.items()}
    row.update({f"{path}_ms_iqr": 1e3 * iqr(t) for path, t in per_round.items()})
    ratios = [b - a for a, b in zip(per_round["function"], per_round["library"])]
    row["library_minus_function_ms"] = 1e3 * statistics.median(ratios)
    row["library_minus_function_ms_iqr"] = 1e3 * iqr(ratios)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--shape", default="8,512,7,7", help="N*T,C,H,W")
    parser.add_argument("--steps", type=int, default=20, help="steps per path per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(shape).requires_grad_()
    grad = torch.randn(shape)
    module = aia_kernels.build(args.variant, num_segments=args.segments, backend="native").train()

    a, b = (one_step_results(module, x, grad, path) for path in PATHS)
    assert module.last_backend == "native"
    assert len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b)), "the two paths differ"
    for path in PATHS:  # warm-up
        for _ in range(5):
            step_s(module, x, grad, path)
    step = summary(interleaved(module, x, grad, args.rounds, args.steps))
    backends.stand_ins["native"] = backends.FusedBackend("native", CachedPlanOps(), native.unavailable_reason)
    try:
        for path in PATHS:
            for _ in range(5):
                step_s(module, x, grad, path)
        python = summary(interleaved(module, x, grad, args.rounds, args.steps))
    finally:
        del backends.stand_ins["native"]

    now = datetime.datetime.now(datetime.timezone.utc)
    info = {"date_utc": now.isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
            "variant": args.variant, "num_segments": args.segments, "shape": list(shape),
            "threads": torch.get_num_threads(), "steps_per_round": args.steps, "rounds": args.rounds,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "loadavg": os.getloadavg(),
            "bitwise_equal": True, "step": step, "python_overhead": python}
    tag = args.tag or f"{now:%Y%m%d}_{'x'.join(map(str, shape))}_t{args.threads}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"autograd_paths_{tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    share = python["library_minus_function_ms"] / python["library_ms"]
    lines = [f"# Eager autograd paths: {args.variant}, {shape}, float32, train, forward+backward, "
             f"{info['threads']} thread(s)", "",
             f"{info['date_utc']}, {info['cpu']} ({info['cpu_count']} cores), Python {info['python']}, "
             f"torch {info['torch']}, load average {tuple(round(v, 2) for v in info['loadavg'])}. "
             f"Command: `{info['command']}`", "",
             f"{args.rounds} rounds of {args.steps} steps per path, alternating which path goes first; "
             "medians over rounds of each round's median (IQR over rounds). Outputs, gradients and BN buffers "
             "of the two paths: bitwise equal.", "",
             "| measure (ms per step) | autograd.Function | torch.library op | library - function |",
             "|---|---|---|---|"]
    for name, row in (("whole step", step), ("Python and autograd only (kernels cached)", python)):
        lines.append(f"| {name} | {row['function_ms']:.3f} ({row['function_ms_iqr']:.3f}) | "
                     f"{row['library_ms']:.3f} ({row['library_ms_iqr']:.3f}) | "
                     f"{row['library_minus_function_ms']:.3f} ({row['library_minus_function_ms_iqr']:.3f}) |")
    lines += ["", f"With the library op, its autograd wrapper's extra cost is {100 * share:.0f}% of the step's "
              f"Python and autograd time, {100 * step['library_minus_function_ms'] / step['library_ms']:.1f}% "
              "of the whole step."]
    (args.results_dir / f"autograd_paths_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return info


if __name__ == "__main__":
    main()
