"""What aia_kernels is for, in under a minute: ``python -m aia_kernels.demo``.

1. Which backends run on this device (and why the others do not).
2. That each one agrees with the reference: every variant, forward and backward, on a
   small clip (a backend that runs through Triton's interpreter, which takes minutes a
   variant, is checked on the first variant only).
3. What the fused path gains on a whole network: a TSM-ResNet-50 with ``CinST->STinC`` in
   its 16 blocks, eval forward of one clip, the reference against the backend ``auto``
   picks, and the same backbone without AIA, timed in interleaved rounds.

Options: ``--device`` (default: cuda if available), ``--variants``, ``--resolution`` and
``--frames`` of the network's clip, ``--rounds``, ``--threads`` (CPU).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from . import VARIANTS, AIAModule, backends, build

SHAPE = (8, 8, 7, 7)  # the agreement check's input: 2 clips of 4 frames
SEGMENTS = 4
NETWORK_VARIANT = "CinST->STinC"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m aia_kernels.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--resolution", type=int, default=112, help="frame height and width of the network's clip")
    parser.add_argument("--frames", type=int, default=8, help="frames of the network's clip (num_segments)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interpreted(name: str, device: torch.device) -> bool:
    return name == "triton" and device.type == "cpu"  # on CPU Triton only runs through its interpreter


def _forward_backward(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def agreement(device: torch.device, variants, fused: list[str]) -> list[dict]:
    """Largest absolute differences from the reference of the output, the input gradient and
    any parameter gradient, per variant and fused backend (float32, train mode)."""
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device=device)
    grad_out = torch.randn(SHAPE, device=device)
    rows = []
    print(f"{'variant':14s} {'backend':8s} {'max|dy|':>9s} {'max|dx|':>9s} {'max|dw|':>9s}")
    for index, variant in enumerate(variants):
        reference = build(variant, num_segments=SEGMENTS, backend="reference").to(device)
        ref_out, ref_grad, ref_params = _forward_backward(copy.deepcopy(reference), x, grad_out)
        for name in fused:
            if index > 0 and _interpreted(name, device):
                continue
            module = copy.deepcopy(reference)
            module.backend = name
            out, grad, params = _forward_backward(module, x, grad_out)
            row = dict(variant=variant, backend=module.last_backend, out_err=(out - ref_out).abs().max().item(),
                       grad_err=(grad - ref_grad).abs().max().item(),
                       param_err=max((params[n] - g).abs().max().item() for n, g in ref_params.items()))
            rows.append(row)
            print(f"{variant:14s} {row['backend']:8s} {row['out_err']:9.1e} {row['grad_err']:9.1e} "
                  f"{row['param_err']:9.1e}")
    return rows


def _set_backend(model: torch.nn.Module, name: str) -> None:
    for module in model.modules():
        if isinstance(module, AIAModule):
            module.backend = name


def network_speed(device: torch.device, fused: str, resolution: int, frames: int, rounds: int) -> dict:
    """Median eval-forward time of one clip through TSM-ResNet-50: AIA on the reference, AIA
    on ``fused``, and no AIA; one warm-up call each, then ``rounds`` interleaved rounds."""
    from .models import tsm_resnet50
    torch.manual_seed(0)
    with_aia = tsm_resnet50(num_classes=174, num_segments=frames, variant=NETWORK_VARIANT,
                            backend="reference").to(device).eval()
    plain = tsm_resnet50(num_classes=174, num_segments=frames, variant=None).to(device).eval()
    fused_model = copy.deepcopy(with_aia)
    _set_backend(fused_model, fused)
    clip = torch.randn(1, frames, 3, resolution, resolution, device=device)
    models = {"reference": with_aia, fused: fused_model, "no AIA": plain}
    times = {name: [] for name in models}
    with torch.no_grad():
        scores = {name: model(clip) for name, model in models.items()}  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                _sync(device)
                start = time.perf_counter()
                model(clip)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    score_err = (scores[fused] - scores["reference"]).abs().max().item()
    return dict(ms=ms, fused=fused, speedup=ms["reference"] / ms[fused], score_err=score_err, rounds=rounds,
                aia_share={name: (ms[name] - ms["no AIA"]) / ms[name] for name in ("reference", fused)})


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"aia_kernels demo on {device}{threads}, torch {torch.__version__}\n")

    print("1. Backends")
    reasons = {}
    for name in backends.FUSED_BACKENDS:
        try:
            backends.get(name, device)
            reasons[name] = None
        except RuntimeError as err:
            reasons[name] = str(err)
    print("   reference: runs (pure PyTorch, the contract's oracle)")
    for name, reason in reasons.items():
        how = " through Triton's interpreter (slow; not kernel speed)" if _interpreted(name, device) else ""
        print(f"   {name}: " + (f"runs{how}" if reason is None else f"not here: {reason}"))
    fused = [name for name, reason in reasons.items() if reason is None]

    print(f"\n2. Agreement with the reference: float32, train mode, input {SHAPE}, num_segments={SEGMENTS}")
    rows = agreement(device, args.variants, fused) if fused and args.variants else []
    if not fused:
        print("   no fused backend runs here: nothing to compare")
    elif any(_interpreted(name, device) for name in fused) and len(args.variants) > 1:
        print(f"   (triton through the interpreter: {args.variants[0]} only)")

    auto = backends.resolve("auto", device) if fused else "reference"
    network = None
    print(f"\n3. A whole network: TSM-ResNet-50 with {NETWORK_VARIANT} in 16 blocks, eval forward of one clip "
          f"(1 x {args.frames} x 3 x {args.resolution} x {args.resolution}), median of {args.rounds} "
          f"interleaved rounds")
    if auto == "reference":
        print("   no fused backend for backend='auto' here: nothing to compare")
    else:
        network = network_speed(device, auto, args.resolution, args.frames, args.rounds)
        ms, share = network["ms"], network["aia_share"]
        print(f"   reference (eager PyTorch): {ms['reference']:9.1f} ms   AIA's share {share['reference']:5.0%}")
        print(f"   {auto + ' (fused)':26s} {ms[auto]:9.1f} ms   AIA's share {share[auto]:5.0%}")
        print(f"   no AIA (the backbone):     {ms['no AIA']:9.1f} ms")
        print(f"   -> the fused network is {network['speedup']:.2f}x the speed of the eager one "
              f"(class scores differ by at most {network['score_err']:.1e})")
        if device.type == "cpu":
            print(f"   ({torch.get_num_threads()} threads; times on a shared machine vary from run to run)")
    print(f"\ndemo took {time.perf_counter() - started:.0f} s")
    return dict(device=device, threads=torch.get_num_threads(), backends=reasons, rows=rows, network=network,
                interpreter=os.environ.get("TRITON_INTERPRET") == "1")


if __name__ == "__main__":
    main()
