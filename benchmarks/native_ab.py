"""CPU: the native kernels of a git revision against the working tree's, in one process.

On a shared machine the same build timed in two processes can differ by more than the
change being judged (docs/benchmarks.md, the AMD EPYC section). So this script builds the
base revision's ``csrc/`` as a second extension, its ops registered as ``aia_native_base``,
and runs whole module steps (the module, autograd, the plan ops) with one build and then
the other, round by round, on the same module and input.

    python benchmarks/native_ab.py --base HEAD~1
    python benchmarks/native_ab.py --base 9cb9f1b --modes eval --threads 2 --rounds 20
    python benchmarks/native_ab.py --base HEAD --passes "pool T/H/W" --steps 5   # single passes

The base must declare the ops the working tree's Python calls, with the same arguments.
The thread policy is switched off (``AIA_NATIVE_ADAPTIVE_THREADS=0``): it would time the two
builds as one op. Writes benchmarks/results/native_ab_<tag>.json and .md (machine, versions,
both commits, command).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aia_kernels  # noqa: E402
from aia_kernels import native  # noqa: E402
from aia_kernels.native.build_config import CXX_FLAGS, LD_FLAGS  # noqa: E402
from benchmarks.cpu_passes import SHAPES, T  # noqa: E402
from benchmarks.cpu_passes import cases as pass_cases  # noqa: E402
from benchmarks.network import write_results  # noqa: E402
from benchmarks.run import machine_meta  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BASE_NAMESPACE = "aia_native_base"


def resolve(rev: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def extract(commit: str, dest: Path, paths: list[str]) -> Path:
    """``paths`` (folders of the repository) as they are at ``commit``, written under ``dest``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def base_sources(commit: str, dest: Path) -> Path:
    """``csrc/`` of ``commit`` in ``dest``, its op library renamed to BASE_NAMESPACE."""
    csrc = extract(commit, dest, ["csrc"]) / "csrc"
    pattern = re.compile(r"\b(TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?)\(\s*aia_native\s*,")
    for path in csrc.rglob("*"):
        if path.suffix in (".cpp", ".cu", ".h"):
            path.write_text(pattern.sub(rf"\1({BASE_NAMESPACE},", path.read_text()))
    return csrc


def base_cpu_sources(csrc: Path) -> list[Path]:
    """The base's CPU sources: every ``csrc/*.cpp`` (the CUDA ones are ``.cu``; the emulator's
    wrappers are in a subfolder), so a base from before a source file was split or added builds."""
    return sorted(csrc.glob("*.cpp"))


def build_base(commit: str, build_root: Path, verbose: bool, cxx_flags: list[str]) -> None:
    from torch.utils.cpp_extension import load as load_extension
    csrc = base_sources(commit, build_root)
    directory = build_root / "build"
    directory.mkdir(exist_ok=True)
    load_extension(name=f"{BASE_NAMESPACE}_{commit[:10]}", sources=[str(p) for p in base_cpu_sources(csrc)],
                   extra_cflags=cxx_flags, extra_ldflags=LD_FLAGS, extra_include_paths=[str(csrc)],
                   build_directory=str(directory), is_python_module=False, verbose=verbose)


@contextlib.contextmanager
def ops_of(build: str):
    """``torch.ops.aia_native`` names the base build's ops inside (the package looks the ops
    up by that name at each call)."""
    if build == "head":
        yield
        return
    head = torch.ops.aia_native
    setattr(torch.ops, "aia_native", getattr(torch.ops, BASE_NAMESPACE))
    assert torch.ops.aia_native.plan_forward.default.name() == f"{BASE_NAMESPACE}::plan_forward"
    try:
        yield
    finally:
        setattr(torch.ops, "aia_native", head)


def step_fn(mode: str, module, x: torch.Tensor, grad: torch.Tensor):
    if mode == "train":
        x = x.detach().requires_grad_()

        def step():
            module(x).backward(grad)
    else:
        def step():
            with torch.no_grad():
                module(x)
    return step


def interleave(step, rounds: int, steps: int) -> dict:
    """Times of ``step`` (ms) with one build then the other, round by round (order
    alternating); the median over rounds of the ratio of the round's medians."""
    for build in ("head", "base"):  # warm-up: workspaces, first-touch pages
        with ops_of(build):
            for _ in range(2):
                step()
    times = {"head": [], "base": []}
    ratios = []
    for r in range(rounds):
        medians = {}
        for build in (("head", "base") if r % 2 else ("base", "head")):
            with ops_of(build):
                samples = []
                for _ in range(steps):
                    start = time.perf_counter()
                    step()
                    samples.append(1e3 * (time.perf_counter() - start))
            times[build] += samples
            medians[build] = statistics.median(samples)
        ratios.append(medians["head"] / medians["base"])
    row = {"ratio_head_to_base": statistics.median(ratios)}
    for build, ms in times.items():
        q = statistics.quantiles(ms, n=4)
        row[f"{build}_median_ms"], row[f"{build}_iqr_ms"] = statistics.median(ms), q[2] - q[0]
    return row


def measure(mode: str, shape, variant: str, rounds: int, steps: int) -> dict:
    torch.manual_seed(0)
    module = aia_kernels.build(variant, num_segments=8, backend="native").train(mode == "train")
    x, grad = torch.randn(shape), torch.randn(shape)
    return {"mode": mode, "shape": list(shape), **interleave(step_fn(mode, module, x, grad), rounds, steps)}


def measure_passes(names: list[str], shape, rounds: int, steps: int) -> list[dict]:
    """One row per pass of benchmarks/cpu_passes.py whose name holds one of ``names``."""
    torch.manual_seed(0)
    native.load()
    prims = native.NativePrimitives()
    v = torch.randn(shape[0] // T, T, *shape[1:])
    return [{"mode": name, "shape": list(shape), **interleave(call, rounds, steps)}
            for name, call in pass_cases(prims, v).items() if any(part in name for part in names)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose csrc/ is the base")
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--shapes", default=";".join(SHAPES), help="N*T,C,H,W;... (N*T a multiple of 8)")
    parser.add_argument("--modes", default="eval,train", help="eval (forward, no_grad) and/or train (forward+backward)")
    parser.add_argument("--passes", default=None,
                        help="instead of module steps, single passes of benchmarks/cpu_passes.py whose names "
                             "hold one of these comma-separated words (e.g. 'pool T/H/W')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="steps per build and round (their median is a sample)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: date)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--base-cxxflags", default=None,
                        help="the base build's C++ flags (default: the working tree's, native/build_config.py)")
    parser.add_argument("--verbose", action="store_true", help="show the base build's compiler output")
    args = parser.parse_args(argv)
    os.environ["AIA_NATIVE_ADAPTIVE_THREADS"] = "0"  # read at each call; recorded in the command
    torch.set_num_threads(args.threads)
    base = resolve(args.base)
    meta = machine_meta(torch.device("cpu"), sys.argv[1:] if argv is None else argv,
                        entry=("benchmarks/native_ab.py",))
    native.load()
    with tempfile.TemporaryDirectory(prefix="aia_native_base_") as tmp:
        print(f"building the native kernels of {base[:10]} ...", file=sys.stderr)
        base_flags = CXX_FLAGS if args.base_cxxflags is None else shlex.split(args.base_cxxflags)
        build_base(base, Path(tmp), args.verbose, base_flags)
        load_before = os.getloadavg()
        shapes = [tuple(int(s) for s in text.split(",")) for text in args.shapes.split(";")]
        if args.passes:
            rows = [row for shape in shapes
                    for row in measure_passes(args.passes.split(","), shape, args.rounds, args.steps)]
        else:
            rows = [measure(mode, shape, args.variant, args.rounds, args.steps)
                    for mode in args.modes.split(",") for shape in shapes]
    info = {**meta, "base_commit": base, "threads": args.threads, "variant": args.variant, "passes": args.passes,
            "dtype": "float32",
            "head_cxx_flags": CXX_FLAGS, "base_cxx_flags": base_flags,
            "measure": (f"{args.rounds} rounds, each running {args.steps} steps with one build then the other "
                        f"(order alternating); times: median (IQR) of all steps; head/base: median over rounds of "
                        f"the ratio of the round's medians; load average before/after "
                        f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}"),
            "results": rows}
    what = f"single passes ({args.passes})" if args.passes else args.variant
    lines = [f"# CPU: native kernels of the working tree (head) vs {base[:10]} (base), {what}, float32, "
             f"{meta['device_name']}, {args.threads} thread(s)", "",
             f"{meta['date']}; torch {meta['torch']}; head commit {meta['commit']}, base commit {base[:12]}; "
             f"C++ flags: head `{' '.join(CXX_FLAGS)}`, base `{' '.join(base_flags)}`; "
             f"{info['measure']}. Command: `{meta['command']}`", "",
             f"| {'pass' if args.passes else 'mode'} | input (N*T, C, H, W) | base ms (IQR) | head ms (IQR) "
             "| head / base |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {tuple(r['shape'])} | {r['base_median_ms']:.2f} ({r['base_iqr_ms']:.2f}) | "
              f"{r['head_median_ms']:.2f} ({r['head_iqr_ms']:.2f}) | {r['ratio_head_to_base']:.3f} |" for r in rows]
    write_results(info, "\n".join(lines) + "\n", args.results_dir, "native_ab", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
