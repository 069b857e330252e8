"""Pure-PyTorch AIA, written to be read line by line against ``docs/semantics.md``.

This is the correctness oracle for every fused backend. It favours clarity over
speed: it materialises every intermediate the spec names, exactly as the authors'
released code does, and lets autograd and ``nn.BatchNorm3d`` do the rest.

Shapes: ``x`` is ``(N*T, C, H, W)``, or already the ``(N, T, C, H, W)`` view of a 5-D
input (``layouts.py``); ``v`` is the ``(N, T, C, H, W)`` view.
"""
from __future__ import annotations

import torch
from torch import nn

from .layouts import clip_view

# Dimension of each axis in v = (N, T, C, H, W).
AXIS_DIM = {"T": 1, "C": 2, "H": 3, "W": 4}

# docs/semantics.md, table "One gate": the three axes the conv slides over, in order, for the
# gate that pools the given axis. The W gate reads (T, H, C): H before C.
CONV_AXES = {"C": "THW", "T": "CHW", "H": "TCW", "W": "THC"}


def gate_permutation(axis: str) -> tuple[int, ...]:
    """Permutation of v's dims to (N, pooled axis, D1, D2, D3)."""
    return (0, AXIS_DIM[axis], *(AXIS_DIM[a] for a in CONV_AXES[axis]))


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, written only where it converts: torch.export records even a same-dtype
    ``.to`` (as ``aten._assert_tensor_metadata``, not a core aten op; docs/deploy.md)."""
    return t if t.dtype == dtype else t.to(dtype)


def pool(v: torch.Tensor, axis: str) -> torch.Tensor:
    """Max and mean of ``v`` along ``axis``, stacked max first: ``(N, 2, D1, D2, D3)``.

    ``torch.max`` returns the first maximal index on ties, and its gradient goes
    to that index only; the fused backends follow the same rule.
    """
    p = v.permute(gate_permutation(axis))
    return torch.cat([p.max(dim=1, keepdim=True).values, p.mean(dim=1, keepdim=True)], dim=1)


def gate(pooled: torch.Tensor, conv: nn.Conv3d, bn: nn.BatchNorm3d | None) -> torch.Tensor:
    """``sigmoid(BN(conv(P)))``: weights in (0, 1) of shape ``(N, 1, D1, D2, D3)``."""
    y = conv(_as_dtype(pooled, conv.weight.dtype))
    if bn is not None:
        y = bn(y)
    return torch.sigmoid(y)


def axis_weights(u: torch.Tensor, axis: str, unit: nn.Module) -> torch.Tensor:
    """``Y_axis(u)``: the gate of ``axis`` computed from ``u``, broadcastable to ``u``."""
    g = gate(pool(u, axis), getattr(unit, f"{axis}_conv"), getattr(unit, f"{axis}_bn", None))
    # g is laid out as (N, 1, D1, D2, D3); put its dims back in v's order (inverse
    # permutation, computed in Python so that torch.compile traces it without a graph break).
    perm = gate_permutation(axis)
    return g.permute(tuple(perm.index(d) for d in range(len(perm))))


def channel_weights(u: torch.Tensor, unit: nn.Module) -> torch.Tensor:
    """``Y_C(u)``."""
    return axis_weights(u, "C", unit)


def spatiotemporal_weights(u: torch.Tensor, unit: nn.Module) -> torch.Tensor:
    """``Y_ST(u) = (Y_T(u) + Y_H(u) + Y_W(u)) / 3``."""
    return (axis_weights(u, "T", unit) + axis_weights(u, "H", unit) + axis_weights(u, "W", unit)) / 3


def unit_weights(kind: str, unit: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """The weights M of one unit (docs/semantics.md, "The four units"): ``unit(v) = M * v``."""
    if kind == "C":
        return channel_weights(v, unit)
    if kind == "ST":
        return spatiotemporal_weights(v, unit)
    if kind == "CinST":
        return spatiotemporal_weights(channel_weights(v, unit) * v, unit)
    if kind == "STinC":
        return channel_weights(spatiotemporal_weights(v, unit) * v, unit)
    raise ValueError(f"unknown AIA unit {kind!r}")


def apply_unit(kind: str, unit: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """One unit: a new tensor ``M * v``, in ``v``'s dtype."""
    return _as_dtype(unit_weights(kind, unit, v) * v, v.dtype)


def aia_forward(x: torch.Tensor, num_segments: int, combine: str | None,
                units: list[tuple[str, nn.Module]]) -> torch.Tensor:
    """A variant on ``x`` of shape ``(N*T, C, H, W)`` or ``(N, T, C, H, W)``; the output has
    ``x``'s shape and memory layout.

    ``units`` holds one ``(kind, module)`` for a single unit, or two for a combined
    variant with ``combine`` "->" (``B(A(x))``) or "+" (``0.5*A(x) + 0.5*B(x)``).
    """
    v = clip_view(x, num_segments)
    if combine is None:
        out = apply_unit(*units[0], v)
    elif combine == "->":
        out = apply_unit(*units[1], apply_unit(*units[0], v))
    elif combine == "+":
        out = 0.5 * apply_unit(*units[0], v) + 0.5 * apply_unit(*units[1], v)
    else:
        raise ValueError(f"unknown combination {combine!r}")
    if x.dim() == 5:  # an (N, T, C, H, W) view: the output takes its strides, as a fused backend's
        return out if out.stride() == x.stride() else torch.empty_like(x).copy_(out)
    out = out.reshape(x.shape)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)  # keep the input's memory format
    return out
