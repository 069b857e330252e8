"""CPU: a whole network's AIA overhead at a git revision against the working tree's.

``network.py`` times one checkout. To ask "is the train step slower than at revision X"
(issue 20: less memory kept, with speed no worse than before), the two checkouts must be
timed on the same machine in the same hour. Absolute times of two processes are not
comparable here (docs/benchmarks.md, the AMD EPYC section), ratios inside one process
are: so each process times the plain network and the network with AIA in interleaved
rounds and reports the per-round ratio, and processes of the two checkouts alternate.

    python benchmarks/network_revisions.py --base 5550f68
    python benchmarks/network_revisions.py --base HEAD~3 --mode eval --pairs 4

The base revision is extracted with ``git archive`` (its ``aia_kernels/`` and ``csrc/``)
and runs with its own native build folder. Only the API both checkouts share is used:
``aia_kernels.models.tsm_resnet50(num_classes, num_segments, variant, backend=...)`` and
``aia_modules``. Writes benchmarks/results/network_revisions_<tag>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 174


def child(root: str, mode: str, size: int, frames: int, variant: str, backend: str, rounds: int,
          threads: int) -> dict:
    """Runs in the checkout at ``root``: per round, one step of the plain network and one of
    the network with AIA (same weights), in alternating order."""
    sys.path.insert(0, root)
    import torch
    from torch import nn

    import aia_kernels
    from aia_kernels.models import tsm_resnet50
    assert Path(aia_kernels.__file__).resolve().is_relative_to(Path(root).resolve()), aia_kernels.__file__
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    aia = tsm_resnet50(CLASSES, frames, variant, backend=backend)
    plain = tsm_resnet50(CLASSES, frames, None)
    plain.load_state_dict({k: v for k, v in aia.state_dict().items() if k in plain.state_dict()}, strict=True)
    x = torch.randn(1, frames, 3, size, size)
    y = torch.randint(0, CLASSES, (1,))

    # network.step_function's step, written again: this process must not import the working
    # tree's benchmarks package, which needs the working tree's aia_kernels, not the base's.
    def step_of(model):
        model.train(mode == "train")
        if mode == "eval":
            def step():
                with torch.no_grad():
                    model(x)
        else:
            def step():
                loss = nn.functional.cross_entropy(model(x), y)
                model.zero_grad(set_to_none=True)
                loss.backward()
        return step

    steps = {"plain": step_of(plain), "aia": step_of(aia)}
    for step in steps.values():
        step()  # warm-up (and the native build's first use)
    ran = {m.last_backend for _, m in aia_kernels.aia_modules(aia)}
    if ran != {backend}:
        raise RuntimeError(f"AIA ran on {sorted(ran)}, expected {backend}")
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {"times": times, "torch": torch.__version__}


def run_child(root: Path, build_dir: Path, args) -> dict:
    env = dict(os.environ, AIA_KERNELS_BUILD_DIR=str(build_dir), OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(root))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), "--mode", args.mode,
               "--size", str(args.size), "--frames", str(args.frames), "--variant", args.variant,
               "--backend", args.backend, "--rounds", str(args.rounds), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run in {root} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overheads(times: dict) -> list[float]:
    """Per round, AIA's step time over the plain one's, minus one."""
    return [a / p - 1.0 for a, p in zip(times["aia"], times["plain"])]


def summary(runs: list[dict]) -> dict:
    per_round = [o for run in runs for o in overheads(run["times"])]
    return {"overhead_median": statistics.median(per_round),
            "overhead_per_process": [statistics.median(overheads(run["times"])) for run in runs],
            "plain_ms_median": statistics.median(t for run in runs for t in run["times"]["plain"]),
            "aia_ms_median": statistics.median(t for run in runs for t in run["times"]["aia"]),
            "rounds": len(per_round)}


def markdown(info: dict) -> str:
    def pct(v):
        return f"{100 * v:+.1f}%"
    lines = [f"# Whole network across revisions: TSM-ResNet-50 with {info['variant']} ({info['backend']}), "
             f"{info['mode']}, {info['size']}x{info['size']}, {info['frames']} frames, {info['device_name']}, "
             f"{info['threads']} thread(s)",
             "",
             f"{info['date']}; torch {info['torch']}; {info['measure']}. Command: `{info['command']}`",
             "",
             "| checkout | commit | overhead vs plain | per process | plain ms | AIA ms | rounds |",
             "|---|---|---|---|---|---|---|"]
    for name, commit in (("base", info["base_commit"][:12]), ("head", info["commit"])):
        s = info[name]
        lines.append(f"| {name} | {commit} | {pct(s['overhead_median'])} | "
                     + ", ".join(pct(v) for v in s["overhead_per_process"])
                     + f" | {s['plain_ms_median']:.1f} | {s['aia_ms_median']:.1f} | {s['rounds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="git revision to compare the working tree with")
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--size", type=int, help="frame size (default: 160 train, 224 eval)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=4, help="base/working-tree process pairs")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per process")
    parser.add_argument("--tag", default=None, help="results file suffix (default: date)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 160 if args.mode == "train" else 224
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.size, args.frames, args.variant, args.backend,
                               args.rounds, args.threads)))
        return 0
    if not args.base:
        parser.error("--base is required")

    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.native_ab import extract, resolve
    from benchmarks.network import write_results
    from benchmarks.run import machine_meta
    base_commit = resolve(args.base)
    meta = machine_meta(torch.device("cpu"), sys.argv[1:] if argv is None else argv,
                        entry=("benchmarks/network_revisions.py",))
    load_before = os.getloadavg()[0]
    runs = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="aia_revisions_") as tmp:
        roots = {"base": (extract(base_commit, Path(tmp) / "base", ["aia_kernels", "csrc"]), Path(tmp) / "build-base"),
                 "head": (REPO, Path(tmp) / "build-head")}
        for i in range(args.pairs):
            for name in ("base", "head"):
                runs[name].append(run_child(*roots[name], args))
                print(f"pair {i + 1}/{args.pairs} {name}: "
                      f"{100 * statistics.median(overheads(runs[name][-1]['times'])):+.1f}%", file=sys.stderr)
    info = {**meta, "base_commit": base_commit, "threads": args.threads, "mode": args.mode, "size": args.size,
            "frames": args.frames, "variant": args.variant, "backend": args.backend,
            "measure": (f"{args.pairs} pairs of processes (base, then working tree), each {args.rounds} rounds of "
                        f"one plain and one AIA step (order alternating) after a warm-up step of each; overhead: "
                        f"median over rounds of the per-round ratio to plain, each ratio inside one process; "
                        f"per process: its median; ms: medians of all steps (between processes not comparable "
                        f"as reliably as the ratios); load average before/after {load_before:.1f}/"
                        f"{os.getloadavg()[0]:.1f}"),
            "base": summary(runs["base"]), "head": summary(runs["head"]), "runs": runs}
    write_results(info, markdown(info), args.results_dir, "network_revisions", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
