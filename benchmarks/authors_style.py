"""AIA written the way the authors' released code writes it: the eager module a user would
run instead of ``aia_kernels``, timed as the ``authors`` peer of the benchmarks.

One ``nn.Module`` per unit with its own ``forward``, in the released code's sequence of
tensor operations: each gate pools its axis with ``torch.max`` and ``torch.mean`` concatenated
(max first), ``permute(...).contiguous()`` into the conv's layout, ``Conv3d``, ``BatchNorm3d``,
``sigmoid``, permutes back (``.contiguous()``) and is expanded to the input's shape; a unit
whose gates read a weighted input recomputes that product for each gate; the spatio-temporal
weights are ``1 / 3 * x * (y_T + y_H + y_W)``. What it computes is the contract
(``tests/test_authors_style.py`` checks it against the reference); the code is written here,
not copied. Parameter names and order are the spec's, so ``load_state_dict`` of an
``aia_kernels`` module's state works (``copy_of``).
"""
from __future__ import annotations

import torch
from torch import nn

from aia_kernels.variants import UNIT_GATES


def avg_max_pool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max and mean along ``dim``, kept as a size-2 axis there (max first)."""
    return torch.cat((torch.max(x, dim)[0].unsqueeze(dim), torch.mean(x, dim).unsqueeze(dim)), dim=dim)


# Per gate: the pooled dim of x = (b, t, c, h, w), the permutation that puts the pooled
# pair first and the conv's axes after it (spec table "One gate"), and the one back.
GATE_LAYOUT = {
    "C": (2, (0, 2, 1, 3, 4), (0, 2, 1, 3, 4)),  # (b, 2, t, h, w) -> (b, t, 1, h, w)
    "T": (1, None, None),                        # (b, 2, c, h, w) is already the conv's layout
    "H": (3, (0, 3, 1, 2, 4), (0, 2, 3, 1, 4)),  # (b, 2, t, c, w) -> (b, t, c, 1, w)
    "W": (4, (0, 4, 1, 3, 2), (0, 2, 4, 3, 1)),  # (b, 2, t, h, c) -> (b, t, c, h, 1)
}


class AuthorsUnit(nn.Module):
    """One unit (``kind`` C, ST, CinST or STinC) on ``(N*T, C, H, W)`` inputs."""

    def __init__(self, kind: str, num_segments: int = 8, use_BN: bool = True):
        super().__init__()
        self.kind, self.num_segments, self.use_BN = kind, num_segments, use_BN
        for g in UNIT_GATES[kind]:
            setattr(self, f"{g}_conv", nn.Conv3d(2, 1, kernel_size=3, stride=1, padding=1, bias=False))
            if use_BN:
                setattr(self, f"{g}_bn", nn.BatchNorm3d(1))
        self.sigmoid = nn.Sigmoid()

    def gate(self, axis: str, x: torch.Tensor) -> torch.Tensor:
        """The gate of ``axis`` computed from ``x`` (b, t, c, h, w), expanded to ``x``'s shape."""
        dim, forward, back = GATE_LAYOUT[axis]
        y = avg_max_pool(x, dim)
        if forward is not None:
            y = y.permute(*forward).contiguous()
        y = getattr(self, f"{axis}_conv")(y)
        if self.use_BN:
            y = getattr(self, f"{axis}_bn")(y)
        y = self.sigmoid(y)
        if back is not None:
            y = y.permute(*back).contiguous()
        return y.expand_as(x)

    def spatiotemporal(self, x: torch.Tensor, source) -> torch.Tensor:
        """``1 / 3 * x * (y_T + y_H + y_W)``, each gate computed from ``source()`` (re-evaluated per gate)."""
        return 1 / 3 * x * (self.gate("T", source()) + self.gate("H", source()) + self.gate("W", source()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, c, h, w = x.size()
        x = x.view(bn // self.num_segments, self.num_segments, c, h, w)
        if self.kind == "C":
            out = x * self.gate("C", x)
        elif self.kind == "ST":
            out = self.spatiotemporal(x, lambda: x)
        elif self.kind == "CinST":
            yc = self.gate("C", x)
            out = self.spatiotemporal(x, lambda: x * yc)
        else:  # STinC
            u = self.spatiotemporal(x, lambda: x)
            out = x * self.gate("C", u)
        return out.view(bn, c, h, w)


class AuthorsCombined(nn.Module):
    """``A->B``: ``eft2(eft1(x))``; ``A+B``: ``0.5 * eft1(x) + 0.5 * eft2(x)``."""

    def __init__(self, combine: str, first: str, second: str, num_segments: int = 8, use_BN: bool = True):
        super().__init__()
        self.combine = combine
        self.eft1 = AuthorsUnit(first, num_segments, use_BN)
        self.eft2 = AuthorsUnit(second, num_segments, use_BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.combine == "->":
            return self.eft2(self.eft1(x))
        return 0.5 * self.eft1(x) + 0.5 * self.eft2(x)


def copy_of(module) -> nn.Module:
    """The authors'-style module of an ``aia_kernels`` module: same units (``eft1``, ``eft2``
    as the module has them), parameters, buffers, device, dtype and training flags (each
    submodule's own)."""
    kinds = [kind for kind, _ in module.units()]
    if module.combine is None:
        other = AuthorsUnit(kinds[0], module.num_segments, module.use_BN)
    else:
        other = AuthorsCombined(module.combine, *kinds, module.num_segments, module.use_BN)
    first = next(module.parameters())
    other.to(device=first.device, dtype=first.dtype)
    other.load_state_dict(module.state_dict(), strict=True)
    named = dict(module.named_modules())
    for name, sub in other.named_modules():
        sub.training = named[name].training if name in named else module.training
    return other
