"""Parameters and multiply-adds of TSN-ResNet-50 (or a 3D ResNet-50) with each AIA variant.

    python -m aia_kernels.models.report [--frames 8] [--size 224] [--classes 174] [--network tsn]

``--network``: ``tsn`` (TSN-ResNet-50, the paper's Table I), ``i3d`` or ``slow``
(``i3d_resnet50`` in that ``arch``: AIA on 5-D features), or ``all``.

Counted analytically from the shapes seen in one forward on the ``meta`` device
(nothing is computed, so it takes about a second per model):

* ``conv/fc MACs``: multiply-adds of every network Conv2d/Conv3d (out elements x in
  channels/groups x kernel volume) and Linear (batch x in x out): the usual "FLOPs" of ResNet papers;
* ``AIA conv3d MACs``: the gates' ``Conv3d(2, 1, 3)`` (54 multiply-adds per output);
* ``AIA elementwise``: per gate, 2 ops per input element for its max and mean pooling;
  1 per element for each full-size product (applying weights, and the inner product
  ``Y_C(v) * v`` / ``Y_ST(v) * v`` of CinST / STinC); 3 per element for ``Y_ST``
  (two adds and a scale) each time it is formed at full size; 3 per element for the
  ``A+B`` blend; the gates' own BN and sigmoid (on pooled-size tensors) are included;
* ``other elementwise``: the network's BN (2 per element), ReLU, residual adds,
  max/avg pooling (one op per input element read); the TSN average (negligible) is not counted;
* ``paper-style``: MACs (conv/fc and AIA conv3d) plus 2 ops per BatchNorm output element,
  network and gates (thop's convention): this reproduces the paper's Table I.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch import nn

from ..modules import AIAModule, aia_modules
from ..variants import VARIANTS
from .i3d import i3d_resnet50
from .resnet import Bottleneck
from .tsn import tsn_resnet50

# The paper's Table I, GFLOPs of TSN-ResNet-50 at 8 x 224 x 224.
PAPER_TABLE_I = {"plain": 32.88, "CinST": 33.01, "CinST->STinC": 33.15}

# Full-size elementwise ops of one unit per input element (see the module docstring).
UNIT_ELEMENTWISE = {"C": 2 + 1, "ST": 6 + 3 + 1, "CinST": 2 + 1 + 6 + 3 + 1, "STinC": 6 + 3 + 1 + 2 + 1}

# network: (title, model for (variant, classes, frames), the shape of one clip (frames, size)).
NETWORKS = {
    "tsn": ("TSN-ResNet-50", lambda v, classes, frames: tsn_resnet50(classes, num_segments=frames, variant=v,
                                                                     backend="reference"),
            lambda frames, size: (1, frames, 3, size, size)),
    "i3d": ("I3D-ResNet-50", lambda v, classes, frames: i3d_resnet50(classes, v, arch="i3d", backend="reference"),
            lambda frames, size: (1, 3, frames, size, size)),
    "slow": ("Slow-pathway ResNet-50", lambda v, classes, frames: i3d_resnet50(classes, v, arch="slow",
                                                                              backend="reference"),
             lambda frames, size: (1, 3, frames, size, size)),
}


def count(model: nn.Module, frames: int, size: int, clip_shape=None) -> dict[str, float]:
    """Operation counts of one clip of ``frames`` frames of ``size`` x ``size`` (see the module
    docstring); ``clip_shape``: the model's input shape, (1, frames, 3, size, size) unless given."""
    counts: dict[str, float] = defaultdict(float)
    tops = [m for _, m in aia_modules(model)]
    aia_parts = {id(m) for a in tops for m in a.modules()}

    def hook(module, inputs, y):
        x = inputs[0]
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            k = module.in_channels // module.groups
            for s in module.kernel_size:
                k *= s
            if id(module) in aia_parts:
                counts["AIA conv3d MACs"] += y.numel() * k
                counts["AIA elementwise"] += y.numel()  # the gate's sigmoid
            else:
                counts["conv/fc MACs"] += y.numel() * k
        elif isinstance(module, nn.Linear):
            counts["conv/fc MACs"] += y.numel() * module.in_features
        elif isinstance(module, AIAModule):
            ops = sum(UNIT_ELEMENTWISE[kind] for kind, _ in module.units()) + (3 if module.combine == "+" else 0)
            counts["AIA elementwise"] += ops * x.numel()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            counts["AIA BN elements" if id(module) in aia_parts else "BN elements"] += y.numel()
        elif isinstance(module, nn.ReLU):
            counts["other elementwise"] += y.numel()
        elif isinstance(module, Bottleneck):
            counts["other elementwise"] += y.numel()  # the residual add
        elif isinstance(module, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool3d)):
            counts["other elementwise"] += x.numel()

    # Each AIA module once (a combined one counts its units), and every other module.
    hooks = [m.register_forward_hook(hook) for m in tops + [m for m in model.modules() if not isinstance(m, AIAModule)]]
    try:
        with torch.no_grad():
            model(torch.empty(clip_shape or (1, frames, 3, size, size), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return dict(counts)


def report(frames: int = 8, size: int = 224, classes: int = 174, network: str = "tsn",
           variants=(None, *VARIANTS)) -> list[dict]:
    """One row per model (plain, then the ten variants): parameters and operation counts."""
    _, make, clip_shape = NETWORKS[network]
    rows = []
    for variant in variants:
        with torch.device("meta"):  # shapes only: no memory, no initialisation work
            model = make(variant, classes, frames).eval()
        c = defaultdict(float, count(model, frames, size, clip_shape(frames, size)))
        macs = c["conv/fc MACs"] + c["AIA conv3d MACs"]
        rows.append({"variant": variant or "plain", "params": sum(p.numel() for p in model.parameters()),
                     "conv/fc MACs": c["conv/fc MACs"], "AIA conv3d MACs": c["AIA conv3d MACs"], "MACs": macs,
                     # thop's convention: MACs plus 2 ops per BatchNorm output element
                     "paper-style": macs + 2 * (c["BN elements"] + c["AIA BN elements"]),
                     "AIA elementwise": c["AIA elementwise"] + 2 * c["AIA BN elements"],
                     "other elementwise": c["other elementwise"] + 2 * c["BN elements"]})
    return rows


def format_report(rows: list[dict], frames: int, size: int, classes: int, network: str = "tsn") -> str:
    plain = rows[0]
    table_one = PAPER_TABLE_I if network == "tsn" else {}
    out = [f"{NETWORKS[network][0]}, {classes} classes, one clip of {frames} frames x {size}x{size}; G = 1e9",
           f"{'variant':<14}{'params':>12}{'+AIA':>7}{'conv/fc':>9}{'AIA c3d':>9}{'MACs':>9}{'+AIA':>7}"
           f"{'paper-style':>12}{'Table I':>8}{'AIA elem':>9}{'other elem':>11}",
           f"{'':<14}{'':>12}{'params':>7}{'GMACs':>9}{'GMACs':>9}{'G':>9}{'%':>7}{'G':>12}{'G':>8}"
           f"{'G':>9}{'G':>11}"]
    for r in rows:
        paper = table_one.get(r["variant"])
        out.append(f"{r['variant']:<14}{r['params']:>12,}{r['params'] - plain['params']:>7,}"
                   f"{r['conv/fc MACs'] / 1e9:>9.3f}{r['AIA conv3d MACs'] / 1e9:>9.4f}{r['MACs'] / 1e9:>9.3f}"
                   f"{100 * (r['MACs'] - plain['MACs']) / plain['MACs']:>7.2f}{r['paper-style'] / 1e9:>12.3f}"
                   f"{'-' if paper is None else f'{paper:.2f}':>8}{r['AIA elementwise'] / 1e9:>9.3f}"
                   f"{r['other elementwise'] / 1e9:>11.3f}")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=174)
    parser.add_argument("--network", choices=[*NETWORKS, "all"], default="tsn")
    args = parser.parse_args(argv)
    networks = list(NETWORKS) if args.network == "all" else [args.network]
    print("\n\n".join(format_report(report(args.frames, args.size, args.classes, n), args.frames, args.size,
                                    args.classes, n) for n in networks))


if __name__ == "__main__":
    main()
