"""BatchNorm running statistics of the gate BNs, updated as ``nn.BatchNorm3d`` does.

The fused ops return the batch statistics that normalised each gate (``bn_stats``); the
module's buffers are updated here, after the op, in the buffers' own dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .module_tensors import registered
from .primitives import BN_BATCH, BN_NONE, BN_RUNNING


def bn_mode(bn: nn.BatchNorm3d | None) -> int:
    """How a BN layer normalises now, as ``nn.BatchNorm3d.forward`` decides it."""
    if bn is None:
        return BN_NONE
    if bn.training or registered(bn, "running_mean") is None:
        return BN_BATCH
    return BN_RUNNING


def tracks_running_stats(bn: nn.BatchNorm3d | None) -> bool:
    """``bn`` updates its running statistics in this step."""
    return bn is not None and bn.training and bn.track_running_stats and registered(bn, "running_mean") is not None


def _update_one(bn: nn.BatchNorm3d, stats: Tensor, count: int) -> None:
    """What ``nn.BatchNorm3d`` does to its buffers in a training step."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        # momentum=None: cumulative average; the factor in the buffers' dtype (1 / int64 tensor is float32)
        factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype) if bn.momentum is None else bn.momentum
        mean, var = stats[0], stats[1] * (count / (count - 1))  # running var is unbiased
        bn.running_mean.mul_(1 - factor).add_(factor * mean.to(bn.running_mean.dtype))
        bn.running_var.mul_(1 - factor).add_(factor * var.to(bn.running_var.dtype))


def _native_op(stats: Tensor):
    """The native op doing the foreach path below in one call (same results bit for bit), where
    it applies: eager mode, CPU statistics in float32 or float64, the extension loaded."""
    if stats.device.type != "cpu" or stats.dtype not in (torch.float32, torch.float64) \
            or torch.compiler.is_compiling():
        return None
    from . import native
    return native.running_stats_op()


def update_running_stats(bns: list, stats: Tensor, counts: list[int]) -> None:
    """:func:`_update_one` for every gate BN that tracks statistics in this step;
    those with a fixed momentum and float32 buffers (the usual case) in a few foreach ops, or
    on the CPU in one native op, since a step's many tiny per-BN ops cost more than they compute."""
    todo = [i for i, bn in enumerate(bns) if tracks_running_stats(bn)]
    means = {i: registered(bns[i], "running_mean") for i in todo}
    batched = [i for i in todo if bns[i].momentum is not None and means[i].dtype == torch.float32]
    for i in todo:
        if i not in batched:
            _update_one(bns[i], stats[i], counts[i])
    if not batched:
        return
    op = _native_op(stats)
    if op is not None:
        op(stats, [means[i] for i in batched], [registered(bns[i], "running_var") for i in batched],
           [registered(bns[i], "num_batches_tracked") for i in batched], [float(bns[i].momentum) for i in batched],
           batched, [counts[i] for i in batched])
        return
    with torch.no_grad():
        torch._foreach_add_([bns[i].num_batches_tracked for i in batched], 1)
        keep = [1 - bns[i].momentum for i in batched]
        # running var is unbiased: var * count / (count - 1)
        scale = stats.new_tensor([[bns[i].momentum, bns[i].momentum * counts[i] / (counts[i] - 1)] for i in batched])
        new = (stats[batched] * scale).to(torch.float32)
        for buffers, column in (("running_mean", 0), ("running_var", 1)):
            tensors = [getattr(bns[i], buffers) for i in batched]
            torch._foreach_mul_(tensors, keep)
            torch._foreach_add_(tensors, list(new[:, column:column + 1].unbind(0)))
