"""Deployment on a CPU: a whole network exported to ONNX and run in ONNX Runtime, plain
against AIA, beside the same networks in PyTorch with the native backend.

    python benchmarks/onnx_network.py                       # TSM-ResNet-50, CinST->STinC, 224x224, 1 and 2 threads
    python benchmarks/onnx_network.py --archs tsn,tsm --threads 4 --rounds 12

An exported model holds the reference path's standard operators, not the fused kernels
(docs/deploy.md), so what AIA costs there is ONNX Runtime's business: this measures it.
Both networks are exported with ``aia_kernels.export.export_onnx`` (what
``python -m aia_kernels.export`` writes) and share their backbone weights; each ONNX
file's scores are checked against PyTorch's first. Eval forward of one clip of ``--frames``
frames, in interleaved rounds (every configuration once a round, the order alternating);
per configuration: median time, IQR, and the overhead over the plain network of the same
runtime (median over rounds of the per-round ratio). ONNX Runtime runs with
``intra_op_num_threads`` set to the thread count, PyTorch with ``torch.set_num_threads``.
Needs the ``export`` extras (onnx, onnxscript, onnxruntime). Writes
benchmarks/results/onnx_network_<tag>.json and .md (machine, versions, date, command).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aia_kernels import aia_modules  # noqa: E402
from aia_kernels.export import compare_with_onnxruntime, export_onnx  # noqa: E402
from benchmarks.network import build_configs, write_results  # noqa: E402
from benchmarks.run import machine_meta  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build_pair(arch: str, variant: str, frames: int) -> dict[str, torch.nn.Module]:
    """The plain network and the AIA one (native backend), eval mode, backbone weights shared
    (the network benchmark's configurations)."""
    plain, aia = build_configs(arch, variant, frames, ["native"], False, torch.device("cpu"))
    return {"plain": plain.model.eval(), "aia": aia.model.eval()}


def sessions(paths: dict[str, Path], threads: int) -> dict:
    import onnxruntime
    result = {}
    for name, path in paths.items():
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        result[name] = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return result


def time_rounds(steps: dict, rounds: int, warmup: int) -> dict:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 else list(steps)[::-1]):
            start = time.perf_counter()
            steps[name]()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="tsm", help="tsn, tsm or both")
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tag", default=None, help="results file suffix (default: date)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import onnxruntime
    meta = machine_meta(torch.device("cpu"), sys.argv[1:] if argv is None else argv,
                        entry=("benchmarks/onnx_network.py",))
    threads_before = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="aia_onnx_") as tmp:
        for arch in args.archs.split(","):
            models = build_pair(arch, args.variant, args.frames)
            clips = torch.randn(1, args.frames, 3, args.size, args.size)
            paths, checks = {}, {}
            for name, model in models.items():
                paths[name] = Path(tmp) / f"{arch}_{name}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    export_onnx(model, paths[name], args.frames, args.size)
                checks[name] = compare_with_onnxruntime(model, paths[name], clips)[1]
                if checks[name] > 1e-4:
                    raise RuntimeError(f"{arch} {name}: ONNX Runtime differs from PyTorch by {checks[name]:.2e} "
                                       "of the largest score")
            feed = clips.numpy()
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                ort = sessions(paths, threads)
                steps = {f"onnxruntime-{name}": (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}))
                         for name, s in ort.items()}

                def torch_step(model):
                    def step():
                        with torch.no_grad():
                            model(clips)
                    return step
                steps.update({f"pytorch-{name}": torch_step(m) for name, m in models.items()})
                times = time_rounds(steps, args.rounds, args.warmup)
                ran = {m.last_backend for _, m in aia_modules(models["aia"])}
                if ran != {"native"}:
                    raise RuntimeError(f"{arch}: the PyTorch AIA network ran {sorted(ran)}, not the native backend")
                for name, ms in times.items():
                    runtime, kind = name.split("-")
                    plain = times[f"{runtime}-plain"]
                    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
                    rows.append({"arch": arch, "threads": threads, "runtime": runtime, "network": kind,
                                 "median_ms": statistics.median(ms), "iqr_ms": q[2] - q[0],
                                 "overhead": statistics.median(a / p for a, p in zip(ms, plain)) - 1,
                                 "onnx_relative_difference": checks[kind] if runtime == "onnxruntime" else None})
    torch.set_num_threads(threads_before)
    info = {**meta, "onnxruntime": onnxruntime.__version__, "variant": args.variant, "frames": args.frames,
            "size": args.size,
            "measure": (f"eval forward of 1 clip, {args.rounds} interleaved rounds (order alternating) after "
                        f"{args.warmup} warm-up step(s); median (IQR) of all steps; overhead: median over rounds "
                        "of the per-round ratio to the plain network in the same runtime"),
            "results": rows}
    lines = [f"# Deployment: ONNX Runtime vs PyTorch (native backend), plain vs AIA ({args.variant}), 1 clip x "
             f"{args.frames} frames, {args.size}x{args.size}, {meta['device_name']}", "",
             f"{meta['date']}; torch {meta['torch']}; onnxruntime {onnxruntime.__version__}; commit {meta['commit']}; "
             f"{info['measure']}. Command: `{meta['command']}`", "",
             "| arch | threads | runtime | network | median ms (IQR) | overhead vs plain |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['threads']} | {r['runtime']} | {r['network']} | {r['median_ms']:.1f} "
              f"({r['iqr_ms']:.1f}) | {100 * r['overhead']:+.1f}% |" for r in rows]
    write_results(info, "\n".join(lines) + "\n", args.results_dir, "onnx_network", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
