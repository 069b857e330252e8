"""The input layouts AIA takes, all read as one view ``v`` of shape (N, T, C, H, W).

- ``(N*T, C, H, W)``, 2D networks (TSN, TSM): the T frames of a clip are consecutive
  along dim 0, T = ``num_segments``;
- ``(N, C, T, H, W)``, ``"NCTHW"``: the Conv3d layout of 3D networks, the default for
  5-D tensors; contiguous or ``channels_last_3d``;
- ``(N, T, C, H, W)``, ``"NTCHW"``: frames stacked along dim 1.

A 5-D input carries its own T. Every layout becomes ``v`` by a view (a split of dim 0,
or a transpose of dims 1 and 2), never a copy, and the output is mapped back the same
way; the kernels read and write ``v`` through its strides, so no backend copies the
input or the output (docs/design.md, "Input layouts").
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# 5-D layouts by name; None (a module's default) reads 4-D input as (N*T, C, H, W) and 5-D as "NCTHW".
LAYOUTS = ("NCTHW", "NTCHW")
DEFAULT_5D_LAYOUT = "NCTHW"
# The T of 4-D input when a module is given neither num_segments nor a layout (the package's default).
DEFAULT_NUM_SEGMENTS = 8


def check_layout(layout: str | None) -> str | None:
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown AIA input layout {layout!r}; expected one of {LAYOUTS} (or None: "
                         f"(N*T, C, H, W) for 4-D input, (N, C, T, H, W) for 5-D input)")
    return layout


def to_clip_view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A 5-D input in ``layout`` as its (N, T, C, H, W) view (the same storage)."""
    return x.transpose(1, 2) if layout == "NCTHW" else x


def from_clip_view(v: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of :func:`to_clip_view`: an (N, T, C, H, W) tensor seen in ``layout``."""
    return v.transpose(1, 2) if layout == "NCTHW" else v


def clip_shape(shape: Sequence[int], num_segments: int) -> tuple[int, ...]:
    """The shape of ``v`` for an input of ``shape``: 4-D (N*T, C, H, W) split by
    ``num_segments``, or an (N, T, C, H, W) view whose T must be ``num_segments``."""
    if len(shape) == 5:
        if shape[1] != num_segments:
            raise ValueError(f"the (N, T, C, H, W) view {tuple(shape)} has T = {shape[1]}, "
                             f"but num_segments = {num_segments}")
        return tuple(shape)
    nt, c, h, w = shape
    return (nt // num_segments, num_segments, c, h, w)


def clip_view(x: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``v``: a 4-D input viewed as (N, T, C, H, W), or an (N, T, C, H, W) view as it is."""
    shape = clip_shape(x.shape, num_segments)
    return x if x.dim() == 5 else x.view(shape)


def clip_segments(x: torch.Tensor, num_segments: int | None) -> int:
    """T of an input that the fused ops receive: dim 1 of an (N, T, C, H, W) view, else ``num_segments``."""
    return x.shape[1] if x.dim() == 5 else num_segments
