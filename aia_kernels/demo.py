"""Demo: every AIA variant on every backend this machine can run.

    python -m aia_kernels.demo [--device cuda] [--shape 16 32 14 14] [--segments 8]

Builds each variant, runs forward and backward on a random clip with each backend,
and prints the backend that ran, the largest absolute difference from the
reference (output and input gradient) and the time of one forward+backward.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from . import VARIANTS, backends, build


def _forward_backward(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = module(x)
    out.backward(grad_out)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out.detach(), x.grad, time.perf_counter() - start


def _unavailable(name: str, device: torch.device) -> str | None:
    try:
        backends.get(name, device)
    except (NotImplementedError, RuntimeError) as err:
        return str(err)
    return None


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 16, 14, 14], metavar=("NT", "C", "H", "W"))
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.shape, device=device)
    grad_out = torch.randn(args.shape, device=device)
    fused = [name for name in backends.FUSED_BACKENDS]
    skipped = {name: _unavailable(name, device) for name in fused}
    for name, reason in skipped.items():
        if reason:
            print(f"[{name}] not run: {reason}")
    print(f"input {tuple(args.shape)} on {device}, num_segments={args.segments}, float32, train mode")
    if device.type == "cpu" and not skipped.get("triton"):
        print("note: on the CPU, triton runs through Triton's interpreter: its times are not kernel timings")
    print()
    print(f"{'variant':14s} {'backend':10s} {'max|dy|':>10s} {'max|dx|':>10s} {'fwd+bwd ms':>11s}")
    rows = []
    for variant in args.variants:
        reference = build(variant, num_segments=args.segments, backend="reference").to(device)
        for name in ["reference"] + [n for n in fused if not skipped[n]]:
            module = copy.deepcopy(reference)
            module.backend = name
            _forward_backward(module, x, grad_out)  # warm-up (first call compiles kernels)
            ref_out, ref_grad, _ = _forward_backward(copy.deepcopy(reference), x, grad_out)
            out, grad, seconds = _forward_backward(module, x, grad_out)
            row = dict(variant=variant, backend=module.last_backend,
                       out_err=(out - ref_out).abs().max().item(), grad_err=(grad - ref_grad).abs().max().item(),
                       ms=seconds * 1e3)
            rows.append(row)
            print(f"{variant:14s} {row['backend']:10s} {row['out_err']:10.2e} {row['grad_err']:10.2e} "
                  f"{row['ms']:11.2f}")
    return rows


if __name__ == "__main__":
    main()
