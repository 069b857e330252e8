"""Input checks shared by every backend: a clear error instead of a wrong answer."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def check_num_segments(num_segments: int) -> int:
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
    return num_segments


def check_input(x: torch.Tensor, num_segments: int, params: Iterable[torch.Tensor] = ()) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem with ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"AIA expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"AIA expects input of shape (N*T, C, H, W) (rank 4), got rank {x.dim()} "
                         f"with shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"AIA expects a floating-point input (float16, bfloat16, float32, float64), "
                        f"got {x.dtype}")
    if x.shape[0] % num_segments != 0:
        raise ValueError(f"N*T = {x.shape[0]} (dim 0 of the input) is not divisible by "
                         f"num_segments = {num_segments}")
    if x.numel() == 0:
        raise ValueError(f"AIA expects a non-empty input, got shape {tuple(x.shape)}")
    p = next(iter(params), None)  # the module's device (a module split across devices fails in its kernels)
    if p is not None and p.device != x.device:
        raise ValueError(f"input is on {x.device} but the module's parameters are on {p.device}; "
                         f"move them to the same device (module.to(x.device))")
