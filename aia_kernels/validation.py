"""Input checks shared by every backend: a clear error instead of a wrong answer."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .layouts import DEFAULT_5D_LAYOUT


def check_num_segments(num_segments: int) -> int:
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
    return num_segments


def check_input(x: torch.Tensor, num_segments: int | None, params: Iterable[torch.Tensor] = (),
                layout: str | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem with ``x``.

    ``layout`` None: 4-D input is (N*T, C, H, W) with T = ``num_segments``, 5-D input is
    (N, C, T, H, W). A named layout takes 5-D input only. A 5-D input's T must equal
    ``num_segments`` unless that is None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"AIA expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 5:
        _check_clip_shape(x, layout or DEFAULT_5D_LAYOUT, num_segments)
    elif layout is not None:
        raise ValueError(f"this AIA module expects 5-D input ({_dims(layout)}, layout={layout!r}), got rank "
                         f"{x.dim()} with shape {tuple(x.shape)}; a module built without a layout also "
                         f"takes (N*T, C, H, W)")
    elif x.dim() != 4:
        raise ValueError(f"AIA expects input of shape (N*T, C, H, W) (rank 4) or (N, C, T, H, W) (rank 5), "
                         f"got rank {x.dim()} with shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"AIA expects a floating-point input (float16, bfloat16, float32, float64), "
                        f"got {x.dtype}")
    if x.dim() == 4 and x.shape[0] % num_segments != 0:
        raise ValueError(f"N*T = {x.shape[0]} (dim 0 of the input) is not divisible by "
                         f"num_segments = {num_segments}")
    if x.numel() == 0:
        raise ValueError(f"AIA expects a non-empty input, got shape {tuple(x.shape)}")
    p = next(iter(params), None)  # the module's device (a module split across devices fails in its kernels)
    if p is not None and p.device != x.device:
        raise ValueError(f"input is on {x.device} but the module's parameters are on {p.device}; "
                         f"move them to the same device (module.to(x.device))")


def _dims(layout: str) -> str:
    return "(" + ", ".join(layout) + ")"


def _check_clip_shape(x: torch.Tensor, layout: str, num_segments: int | None) -> None:
    t = x.shape[layout.index("T")]
    read_as = f"the input of shape {tuple(x.shape)} read as {_dims(layout)} (layout {layout!r})"
    if t == 0:
        raise ValueError(f"{read_as} has T = 0 frames")
    if num_segments is not None and t != num_segments:
        other = "NTCHW" if layout == "NCTHW" else "NCTHW"
        raise ValueError(f"{read_as} has T = {t} frames, but the module was built with num_segments = "
                         f"{num_segments}; if the tensor is {_dims(other)}, set layout={other!r}, and to take "
                         f"T from every 5-D input, build the module without num_segments")
