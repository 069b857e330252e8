"""The primitive contract every fused backend implements.

The generic executor (``aia_kernels.fused``) runs any variant's plan with six
primitives. Full-size tensors are touched only by ``pool``, ``apply``,
``weight_grad`` and ``input_grad``; ``gate_forward``/``gate_backward`` work on the
small pooled tensors. A backend is any object with these six methods
(:class:`Primitives`); ``torch_impl.TorchPrimitives`` is the plain-PyTorch one,
used as the oracle in tests and for fake (meta) tensors under ``torch.compile``.

Conventions (``v`` is the input viewed as ``(N, T, C, H, W)``, any strides):

- Accumulation dtype ``acc``: float64 for float64 inputs, else float32. Every
  small tensor below is ``acc``-typed and contiguous.
- Gate layout: a gate that pools ``axis`` lives on ``(N, D1, D2, D3)`` with the
  spec's conv axes: C -> (T, H, W), T -> (C, H, W), H -> (T, C, W), W -> (T, H, C).
- A gate is passed as :class:`GateValue`: its conv output ``z`` (pre-BN) and
  ``scale_shift`` = (a, b) so that the gate is ``sigmoid(a * z + b)``; BN in any
  mode folds into (a, b), which lets consumers apply the gate on the fly.
- Pooled tensor ``P``: ``(N, 2, D1, D2, D3)``, channel 0 the max, 1 the mean
  (the conv's input). ``argmax``: int32 ``(N, D1, D2, D3)``, index along the
  pooled axis of the first maximum.
- Weights: :class:`WeightValue` = product ("prod") or mean ("mean") of at most two
  factors; a factor is one C gate or the mean of (T, H, W) gates.
- Upstream gradient of a full-size tensor: either a full tensor (``dout``) or
  :class:`PooledGrad` items: the gradient of a pooled tensor, expanded on the fly
  (mean part spread evenly, max part to ``argmax``).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Protocol, Sequence, Union

import torch

# Axes each gate slides its conv over, and their dim in v = (N, T, C, H, W).
GATE_CONV_AXES = {"C": "THW", "T": "CHW", "H": "TCW", "W": "THC"}
AXIS_DIM = {"T": 1, "C": 2, "H": 3, "W": 4}

# How BN enters a gate: none, batch statistics (train), running statistics (eval).
BN_NONE, BN_BATCH, BN_RUNNING = 0, 1, 2


class GateValue(NamedTuple):
    axis: str
    z: torch.Tensor            # (N, D1, D2, D3) conv output
    scale_shift: torch.Tensor  # (2,): gate = sigmoid(scale * z + shift)


class WeightValue(NamedTuple):
    factors: tuple[tuple[GateValue, ...], ...]
    combine: str  # "prod" | "mean"


class PooledGrad(NamedTuple):
    axis: str
    grad: torch.Tensor    # (N, 2, D1, D2, D3): d loss / d P
    argmax: torch.Tensor  # (N, D1, D2, D3) int32


Upstream = Union[torch.Tensor, Sequence[PooledGrad]]


class GateForward(NamedTuple):
    z: torch.Tensor
    scale_shift: torch.Tensor
    bn_stats: torch.Tensor  # (2,): the mean and variance that normalised z: batch (biased) or
                            # running statistics; zeros without BN


class GateGrads(NamedTuple):
    pooled: torch.Tensor | None       # d loss / d P
    conv_weight: torch.Tensor | None  # (1, 2, 3, 3, 3)
    bn_weight: torch.Tensor | None    # (1,)
    bn_bias: torch.Tensor | None      # (1,)


class Primitives(Protocol):
    def pool(self, v: torch.Tensor, weight: WeightValue, axes: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each axis in ``axes``: (P, argmax) of ``weight * v``, in one read of ``v``."""

    def gate_forward(self, pooled: torch.Tensor, conv_weight: torch.Tensor, bn_mode: int,
                     bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                     running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                     eps: float) -> GateForward:
        """Conv3d(2->1, 3x3x3, pad 1) of ``pooled``, and BN folded into (scale, shift)."""

    def apply(self, v: torch.Tensor, weight: WeightValue, out: torch.Tensor) -> None:
        """``out = weight * v`` (``out`` has v's shape and dtype)."""

    def weight_grad(self, v: torch.Tensor, upstream: Upstream,
                    weight: WeightValue) -> list[list[torch.Tensor]]:
        """d loss / d gate for every gate of every factor of ``weight``, where the loss
        reaches ``weight * v`` through ``upstream``; each in its gate's layout."""

    def gate_backward(self, gate_grad: torch.Tensor, pooled: torch.Tensor, gate: GateValue,
                      bn_stats: torch.Tensor, conv_weight: torch.Tensor, bn_mode: int,
                      bn_weight: torch.Tensor | None, eps: float,
                      needs: tuple[bool, bool, bool, bool]) -> GateGrads:
        """Backward of gate_forward + sigmoid. ``bn_stats`` = (mean, var) that normalised
        ``z`` (batch or running); ``needs`` = (pooled, conv, bn weight, bn bias)."""

    def input_grad(self, terms: Sequence[tuple[WeightValue, Upstream]], out: torch.Tensor) -> None:
        """``out = sum(weight * upstream)`` over ``terms``, written once."""


PRIMITIVES = ("pool", "gate_forward", "apply", "weight_grad", "gate_backward", "input_grad")


class PrimitivesOnly:
    """A backend's six primitives without its whole-plan ops (``forward_plan``,
    ``backward_plan``), so the executor walks the plan one primitive at a time: tests
    compare the two paths, and a profiler sees each primitive call."""

    def __init__(self, prims):
        self._prims = prims

    def __getattr__(self, name):
        if name in PRIMITIVES:
            return getattr(self._prims, name)
        raise AttributeError(name)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gate_shape(v_shape: Sequence[int], axis: str) -> tuple[int, ...]:
    n = v_shape[0]
    return (n, *(v_shape[AXIS_DIM[a]] for a in GATE_CONV_AXES[axis]))


@functools.lru_cache(maxsize=1024)
def _gate_sizes(v_shape: tuple[int, ...], axes: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(math.prod(gate_shape(v_shape, axis)) for axis in axes)


def gate_sizes(v_shape: Sequence[int], axes: Sequence[str]) -> tuple[int, ...]:
    """Entries of each gate pooling ``axes[g]`` (its BN's batch count), computed once per
    shape: every training step asks (symbolic sizes under torch.compile are not cached)."""
    try:
        return _gate_sizes(tuple(v_shape), tuple(axes))
    except TypeError:  # unhashable (symbolic) sizes
        return _gate_sizes.__wrapped__(v_shape, axes)
