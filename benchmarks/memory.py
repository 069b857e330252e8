"""Bytes one AIA module keeps for backward, per variant, module shape and backend.

    python benchmarks/memory.py                  # CPU: reference, native, native-keep
    python benchmarks/memory.py --device cuda    # + triton

A train-mode forward of one module (float32, ``--segments`` frames) under
benchmarks/saved_bytes.py's hook: the bytes of every storage autograd keeps (each once, the
input included), and that over the input's bytes. ``native-keep`` is the native backend
with every stage's tensors kept (``plan.without_recompute``: the layout before the backward
recomputed the T, H, W stages). The module-level budget (issue 20, tested in
tests/test_training_memory.py) is 1.15x at (8, 64, 40, 40). Whole networks against the
plain network: benchmarks/network.py. Writes benchmarks/results/memory_<device>_<tag>.json
and .md (machine, versions, date, command).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aia_kernels  # noqa: E402
from aia_kernels import backends  # noqa: E402
from benchmarks.network import write_results  # noqa: E402
from benchmarks.run import machine_meta  # noqa: E402
from benchmarks.saved_bytes import saved_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The setting (TSM-R50 layer1 at 160x160), the spec's ResNet-50 shapes at 224x224,
# and layer4 at 160x160 (5x5), all at one clip of 8 frames.
SHAPES = [(8, 64, 40, 40), (8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7), (8, 512, 5, 5)]
BUDGET = 1.15


def module_saved(variant: str, backend: str, shape, segments: int, device, keep: bool) -> int:
    torch.manual_seed(0)
    module = aia_kernels.build(variant, num_segments=segments, backend=backend, recompute=not keep).to(device).train()
    x = torch.randn(shape, device=device, requires_grad=True)
    saved, _ = saved_bytes(lambda: module(x))
    if module.last_backend != backend:
        raise RuntimeError(f"{variant} ran on {module.last_backend}, not {backend}")
    return saved


def markdown(info: dict) -> str:
    configs = info["configs"]
    lines = [f"# Bytes kept for backward by one AIA module, {info['device_name']}", "",
             f"{info['date']}; torch {info['torch']}; float32, train mode, {info['segments']} segments; saved bytes "
             f"over the input's bytes (the input included; budget {BUDGET}x). Command: `{info['command']}`", "",
             "| variant | input (N*T, C, H, W) | " + " | ".join(configs) + " |",
             "|---|---|" + "---|" * len(configs)]
    for r in info["results"]:
        cells = [f"{r[c] / r['input_bytes']:.3f}x" for c in configs]
        lines.append(f"| {r['variant']} | {tuple(r['shape'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(aia_kernels.VARIANTS))
    parser.add_argument("--shapes", default=None, help="N*T,C,H,W;... (default: see SHAPES)")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--configs", default=None,
                        help="of reference,native,native-keep,triton (default: those available)")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.configs is None:  # those available (native on CUDA needs AIA_NATIVE_CUDA=1)
        native = backends.is_available("native", device)
        args.configs = ",".join(["reference"] + (["native", "native-keep"] if native else [])
                                + (["triton"] if device.type == "cuda" and backends.is_available("triton", device)
                                   else []))
    configs = args.configs.split(",")
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    rows = []
    for shape in shapes:
        for variant in args.variants.split(","):
            row = {"variant": variant, "shape": list(shape), "input_bytes": 4 * int(torch.Size(shape).numel())}
            for config in configs:
                backend = "native" if config == "native-keep" else config
                row[config] = module_saved(variant, backend, shape, args.segments, device, config == "native-keep")
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = machine_meta(device, sys.argv[1:] if argv is None else argv, entry=("benchmarks/memory.py",))
    info = {**meta, "segments": args.segments, "dtype": "float32", "configs": configs, "budget": BUDGET,
            "results": rows}
    write_results(info, markdown(info), args.results_dir, f"memory_{device.type}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
