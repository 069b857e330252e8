"""Command-line benchmark runner: ``python -m benchmarks.run --help``.

Times every requested (variant, shape, dtype, mode) on every requested implementation
in one process, measures the copy bandwidth of each (shape, dtype), and writes
``results.md`` (also printed), ``results.json`` and ``summary.png`` to ``--out``.
Without CUDA it says so and runs on CPU (default shapes: ``small``, N*T = 8).

Order (so that a time budget cuts the least valuable rows): the copy bandwidths, then the
cheap rows of every case (eager, authors, the fused backends: no compile step), then the
``torch.compile`` rows, whose first call compiles for tens of seconds: ``compile-default``
before ``compile-max-autotune``, each in the order of ``--modes`` and ``--dtypes``, largest
shape first. A row not started within ``--time-budget`` is reported as skipped, as is a
compile row when less time is left than that compile mode took before for that mode. The
report is rewritten after every row (rows not reached yet say "pending").
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import aia_kernels

from . import report
from .bytes_model import MODES, copy_bytes, design_bytes, design_passes
from .cases import (
    COMPILE_MODES,
    DTYPES,
    FUSED,
    HEADLINE,
    IMPL_GROUPS,
    IMPLS,
    NATIVE_PATHS,
    NUM_SEGMENTS,
    make_input,
    make_module,
    make_step,
    parse_list,
    parse_shapes,
    prepare_impl,
    shape_str,
    unavailable_reason,
)
from .timing import Timer, summarize

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CUDA_NOTE = ("no CUDA device: kernel timings need CUDA; running on CPU (reference and any backend "
             "that runs on CPU) as a smoke run, not a performance result")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=HEADLINE,
                   help=f"comma-separated variants or 'all' (default {HEADLINE})")
    p.add_argument("--shapes", default=None,
                   help="comma-separated: spec (the four ResNet-50 shapes), small (same with N*T=8), tiny, "
                        "or NTxCxHxW (default: spec on CUDA, small on CPU)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32, bfloat16 or all")
    p.add_argument("--modes", default=",".join(MODES), help=f"{', '.join(MODES)} or all (in this order)")
    p.add_argument("--backends", default="all",
                   help=f"implementations: {', '.join(IMPLS)}; groups: {', '.join(IMPL_GROUPS)}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 30 CUDA, 10 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 CUDA, 2 CPU)")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/<date>_<device>)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are reported as skipped")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of torch.compile time; after it, compile cases are reported as skipped")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    p.add_argument("--interpreter", action="store_true",
                   help="on CPU, run triton through Triton's interpreter (TRITON_INTERPRET=1) in one case, the first "
                        "fwd-infer one if asked (the interpreter takes seconds a call): a dry run of the code "
                        "(gpu_run.sh --dry-run), its times mean nothing")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name and its widest vector ISA (the native C++ kernels' fast paths need
    AVX-512; with AVX2 only they run element loops in places, several times slower)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name}, {isa}" if isa else name


def source_commit(root: str | None = None) -> str | None:
    """The git commit of the aia_kernels checkout that runs, "+dirty" with uncommitted
    changes to its code (aia_kernels/, csrc/, benchmarks/; docs and results files do not
    count); None outside a git checkout (an installed wheel)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(aia_kernels.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--",
                                "aia_kernels", "csrc", "benchmarks", ":(exclude)benchmarks/results",
                                ":(exclude)aia_kernels/experiments/results"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


# Environment settings that change timings; a results file's command starts with those set.
TIMING_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "AIA_NATIVE_ADAPTIVE_THREADS",
              "AIA_NATIVE_CXXFLAGS", "AIA_NATIVE_CUDA", "TRITON_INTERPRET")


def machine_meta(device: torch.device, argv, entry: tuple[str, ...] = ("-m", "benchmarks.run")) -> dict:
    """Device, versions, date, a machine description without the hostname, and the exact
    command (``[VAR=value ...] python <entry> <argv>``, with the TIMING_ENV variables set)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        cpu_model(),
        "driver": _nvidia_driver() if device.type == "cuda" else None,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "aia_kernels": os.path.dirname(aia_kernels.__file__),
        "commit": source_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([*(f"{k}={os.environ[k]}" for k in TIMING_ENV if k in os.environ), sys.executable,
                               *entry, *argv]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["sm_count"] = props.multi_processor_count
    return meta


def default_out_dir(meta: dict) -> Path:
    """``benchmarks/results/<date>_<device>``, the device name as a lower-case slug."""
    return RESULTS_DIR / (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d") + "_" +
                          "".join(c if c.isalnum() else "-" for c in meta["device_name"]).strip("-").lower())


def _first_tensor(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def measure_copy(timer: Timer, shape, dtype, device, reps: int, warmup: int) -> dict:
    x = make_input(shape, dtype, device)
    stats = summarize(timer.times_ms(lambda: x.clone(), reps, warmup))
    gbps = copy_bytes(shape, dtype) / (stats["median_ms"] * 1e-3) / 1e9
    return {"shape": shape_str(shape), "dtype": str(dtype).removeprefix("torch."), **stats, "gbps": gbps}


def measure_impl(timer: Timer, base, impl: str, x, mode: str, reps: int, warmup: int, reference):
    """Time one implementation; returns (row fields, first-call output for the next comparison)."""
    module, fn = prepare_impl(base, impl)
    step = make_step(module, fn, x, mode)
    paths_before = _native_cuda_paths() if impl in NATIVE_PATHS else None
    first_s, out = timer.first_call(step)
    out = _first_tensor(out).detach()
    fields = {"first_call_s": first_s}
    fields["max_abs_diff"] = None if reference is None else \
        (out.float() - reference.float()).abs().max().item()
    fields.update(summarize(timer.times_ms(step, reps, warmup)))
    fields["peak_mem_bytes"] = timer.peak_memory_bytes(step)
    fields["launches"], fields["launches_kind"] = timer.launches(step)
    if impl in FUSED or impl in NATIVE_PATHS:
        fields["note"] = f"ran {getattr(module, 'last_backend', None)}"
        if impl == "triton" and x.device.type == "cpu":
            fields["note"] += " through Triton's interpreter: not a timing"
    if impl == "authors" and x.dtype != torch.float32:
        fields["note"] = f"under autocast({str(x.dtype).removeprefix('torch.')})"
    if paths_before is not None:  # which CUDA paths the first call took: [walk, one launch] calls
        after = _native_cuda_paths()
        fields["note"] += (f"; forward {[a - b for a, b in zip(after[0], paths_before[0])]}, "
                           f"backward {[a - b for a, b in zip(after[1], paths_before[1])]} [walk, one launch]")
    return fields, out


def _native_cuda_paths() -> tuple[list[int], list[int]]:
    ops = torch.ops.aia_native
    return list(ops.plan_forward_cuda_paths()), list(ops.plan_backward_cuda_paths())


def case_order(variants, modes, shapes, dtypes) -> list[tuple]:
    """Every (variant, mode, shape, dtype), most valuable first: modes and dtypes in the order
    asked for, then shapes in the order given (spec: largest first)."""
    return [(variant, mode, shape, dt) for variant in variants for mode in modes for dt in dtypes for shape in shapes]


def task_order(cases: list[tuple], impls: list[str]) -> list[tuple[tuple, str]]:
    """(case, impl) in run order: the cheap impls of every case, then each compile mode over
    the cases, largest shape first within the same variant, mode and dtype."""
    cheap = [(case, impl) for case in cases for impl in impls if impl not in COMPILE_MODES]
    groups = list(dict.fromkeys((variant, mode, dt) for variant, mode, _, dt in cases))
    by_size = sorted(cases, key=lambda c: (groups.index((c[0], c[1], c[3])), -math.prod(c[2])))
    return cheap + [(case, impl) for impl in impls if impl in COMPILE_MODES for case in by_size]


def new_row(case, impl: str) -> dict:
    variant, mode, shape, dt = case
    return {"variant": variant, "shape": shape_str(shape), "dtype": dt, "mode": mode, "impl": impl,
            "design_passes": design_passes(variant, mode)["total"],
            "design_bytes": design_bytes(variant, shape, DTYPES[dt], mode),
            "status": "pending", "reason": "not reached: the run ended before this row"}


class Budget:
    """The run's clock: ``--time-budget`` for starting any row, ``--compile-budget`` for the
    compile rows' first calls, and the longest compile so far, to skip a compile row that
    would not finish in the time left."""

    def __init__(self, seconds: float | None, compile_seconds: float | None, clock=None):
        self.seconds, self.compile_seconds = seconds, compile_seconds
        self.clock = clock or time.perf_counter
        self.start = self.clock()
        self.compile_spent = 0.0
        self.longest_compile: dict[tuple[str, str], float] = {}  # (impl, mode) -> first-call seconds

    def elapsed(self) -> float:
        return self.clock() - self.start

    def compile_estimate(self, impl: str, mode: str) -> tuple[float, str] | None:
        """The longest compile so far of ``impl`` in ``mode``, else of ``impl``, else of any
        compile row: (seconds, which)."""
        for keys in ([(impl, mode)], [k for k in self.longest_compile if k[0] == impl], list(self.longest_compile)):
            known = [k for k in keys if k in self.longest_compile]
            if known:
                key = max(known, key=self.longest_compile.get)
                return self.longest_compile[key], " ".join(key)
        return None

    def skip_reason(self, impl: str, mode: str) -> str | None:
        left = None if self.seconds is None else self.seconds - self.elapsed()
        if left is not None and left <= 0:
            return f"time budget ({self.seconds:g} s) used up"
        if impl not in COMPILE_MODES:
            return None
        if self.compile_seconds is not None and self.compile_spent > self.compile_seconds:
            return f"compile budget ({self.compile_seconds:g} s) used up"
        estimate = self.compile_estimate(impl, mode)
        if left is not None and estimate is not None and estimate[0] > left:
            return f"time budget: {left:.0f} s left, {estimate[1]} took {estimate[0]:.0f} s to compile"
        return None

    def record(self, impl: str, mode: str, first_call_s: float) -> None:
        if impl in COMPILE_MODES:
            self.compile_spent += first_call_s
            key = (impl, mode)
            self.longest_compile[key] = max(first_call_s, self.longest_compile.get(key, 0.0))


def run_task(timer: Timer, case, impl: str, row: dict, reps: int, warmup: int, budget: Budget,
             references: dict, interpreter: bool) -> None:
    """Measure one row in place. ``references[case]``: eager's first output (the comparison
    of every other impl); every impl runs a copy of the same module."""
    variant, mode, shape, dt = case
    device = timer.device
    reason = unavailable_reason(impl, device, interpreter)
    status = "not available" if reason else "ok"
    if not reason:
        reason = budget.skip_reason(impl, mode)
        status = "skipped" if reason else "ok"
    if not reason:
        try:
            x = make_input(shape, DTYPES[dt], device)
            fields, out = measure_impl(timer, make_module(variant, mode, device), impl, x, mode, reps, warmup,
                                       references.get(case))
            row.update(fields)
            if impl == "eager":
                references[case] = out
            budget.record(impl, mode, fields["first_call_s"])
        except Exception as exc:  # report it, keep going
            status, reason = "error", f"{type(exc).__name__}: {str(exc)[:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    row["status"], row["reason"] = status, reason
    done = f"{row['median_ms']:.3f} ms" if status == "ok" else f"{status}: {reason}"
    print(f"benchmarks: [{budget.elapsed():5.0f} s] {variant} {mode} {shape_str(shape)} {dt} {impl}: {done}",
          file=sys.stderr)


def main(argv=None) -> dict:
    """Run the benchmarks of ``argv`` (default ``sys.argv[1:]``), write the report, return its payload."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only


def _main(args: argparse.Namespace, argv: list[str]) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if not cuda:
        print(f"benchmarks: {CUDA_NOTE}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = parse_list(args.variants, aia_kernels.VARIANTS, name="variant")
    shapes = parse_shapes(args.shapes or ("spec" if cuda else "small"))
    dtypes = parse_list(args.dtypes, tuple(DTYPES), name="dtype")
    modes = parse_list(args.modes, MODES, name="mode")
    impls = parse_list(args.backends, IMPLS, IMPL_GROUPS, "backend")
    if "eager" not in impls:
        impls.insert(0, "eager")  # the baseline of every speedup
    reps = args.reps or (30 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    meta = machine_meta(device, argv)
    meta["bytes_model"] = "full-size passes from the plan (benchmarks/bytes_model.py); small tensors ignored"
    meta.update(reps=reps, warmup=warmup, num_segments=NUM_SEGMENTS, l2_flush=cuda, cpu_threads=torch.get_num_threads(),
                timer="cuda events" if cuda else "time.perf_counter")
    if not cuda:
        meta["note"] = CUDA_NOTE
    out_dir = Path(args.out) if args.out else default_out_dir(meta)
    out_dir.mkdir(parents=True, exist_ok=True)

    budget, references = Budget(args.time_budget, args.compile_budget), {}
    timer = Timer(device)
    cases = case_order(variants, modes, shapes, dtypes)
    rows = {(case, impl): new_row(case, impl) for case in cases for impl in impls}
    payload = {"meta": meta, "copy_bandwidth": [], "results": list(rows.values())}  # rows are filled in place
    for shape in shapes:
        for dt in dtypes:
            payload["copy_bandwidth"].append(measure_copy(timer, shape, DTYPES[dt], device, reps, warmup))

    report.write_all(payload, out_dir, plot_png=False)
    interpreted = next((c for c in cases if c[1] == "fwd-infer"), cases[0]) if args.interpreter else None
    for case, impl in task_order(cases, impls):
        run_task(timer, case, impl, rows[(case, impl)], reps, warmup, budget, references, case == interpreted)
        report.write_all(payload, out_dir, plot_png=False)  # partial results survive a kill
    meta["elapsed_s"] = round(budget.elapsed(), 1)
    text = report.write_all(payload, out_dir, plot_png=not args.no_plot)
    print(text)
    print(f"benchmarks: wrote {out_dir}/results.md, results.json" + ("" if args.no_plot else ", summary.png"),
          file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
