"""Time one training step of TSN-ResNet-50: plain vs AIA (eager reference) vs AIA (fused).

    python benchmarks/train_step.py [--variant CinST->STinC] [--clips 8] [--frames 8] [--size 224]
                                    [--iters 20] [--warmup 5] [--channels-last] [--json out.json]

For each of float32 and bf16 autocast, runs forward + backward + SGD step of
``aia_kernels.models.tsn_resnet50`` (174 classes) on ``clips x frames`` frames and
reports milliseconds per step (CUDA events, median over ``--iters`` after
``--warmup``), clips per second, peak GPU memory, and the backend AIA really ran
(``last_backend``). Needs CUDA: without it the script says so and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's aia_kernels
from aia_kernels import aia_modules  # noqa: E402
from aia_kernels.models import tsn_resnet50  # noqa: E402
from benchmarks.run import machine_meta  # noqa: E402  (device, driver, versions, date, command)

CONFIGS = (("plain TSN", None, "reference"), ("AIA eager (reference)", "variant", "reference"),
           ("AIA fused (auto)", "variant", "auto"))


def time_steps(model, x, y, dtype, warmup, iters):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/train_step.py: no CUDA device here; this benchmark times GPU training steps "
              "and reports nothing without one.")
        return 0
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.clips, args.frames, 3, args.size, args.size, device=device)
    x = x.flatten(0, 1).contiguous(memory_format=memory_format)
    y = torch.randint(0, 174, (args.clips,), device=device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; TSN-ResNet-50, {args.clips} clips x "
          f"{args.frames} frames x {args.size}x{args.size}, variant {args.variant}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}")
    print(f"{'model':<24}{'dtype':<10}{'backend ran':<14}{'ms/step':>10}{'clips/s':>10}{'peak GiB':>10}")
    rows = []
    for name, variant, backend in CONFIGS:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = tsn_resnet50(174, args.frames, args.variant if variant else None, backend)
            model = model.to(device).train()
            for m in model.modules():  # model.to(memory_format=...) refuses the gates' 5D Conv3d weights
                if isinstance(m, nn.Conv2d):
                    m.to(memory_format=memory_format)
            try:
                ms, peak = time_steps(model, x, y, dtype, args.warmup, args.iters)
            except (NotImplementedError, RuntimeError) as err:
                print(f"{name:<24}{str(dtype)[6:]:<10}skipped: {err}")
                continue
            ran = {m.last_backend for _, m in aia_modules(model)}
            ran = "/".join(sorted(ran)) or "-"
            rows.append({"model": name, "dtype": str(dtype)[6:], "backend": ran, "ms_per_step": ms,
                         "clips_per_s": args.clips * 1000 / ms, "peak_gib": peak})
            print(f"{name:<24}{str(dtype)[6:]:<10}{ran:<14}{ms:>10.1f}{args.clips * 1000 / ms:>10.1f}{peak:>10.2f}")
            del model
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            meta = machine_meta(torch.device("cuda"), sys.argv[1:] if argv is None else argv,
                                entry=("benchmarks/train_step.py",))
            json.dump({**meta, "args": vars(args), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
