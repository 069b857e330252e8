"""Gate BatchNorms synced across ranks, on the fused backends.

A gate whose BN is a SyncBatchNorm in training (torch's, or one marked
``is_sync_batchnorm``) under ``torch.distributed`` with more than one rank normalises its
conv output with the statistics of the whole global batch. The fused executor keeps its
full-size passes in the backend's kernels and hands only such a gate's small tensors to
:class:`GateStatsSync`:

- forward: the backend's conv (``gate_forward`` without BN) gives ``z``; every rank's
  (count, mean, M2) is gathered and combined (Chan et al.), and BN folds into the gate's
  (scale, shift) with the global mean and biased variance; the running statistics use
  the global count (``counts``);
- backward: as ``nn.SyncBatchNorm``, the two sums the BN backward takes over the batch
  (of ``dy * gamma`` and of that times the normalised ``z``) are all-reduced; the BN
  weight and bias gradients stay local (DDP averages them with the other gradients).

Gate tensors are 1/L of the input (L the pooled axis), so this runs in plain torch ops.
One collective per gate in each direction, as ``nn.SyncBatchNorm`` has per BN layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .primitives import BN_NONE, GateForward, GateGrads, GateValue
from .primitives.torch_impl import conv_backward, fold_bn_with


def syncs_statistics(bn: nn.Module | None) -> bool:
    """``bn`` reduces its batch statistics across more than one rank in this step."""
    dist = torch.distributed
    return (bn is not None and bn.training and dist.is_available() and dist.is_initialized()
            and (isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "is_sync_batchnorm", False))
            and dist.get_world_size(_group(bn)) > 1)


def _group(bn: nn.Module):
    return getattr(bn, "process_group", None) or torch.distributed.group.WORLD


def gate_sync(bns: list[nn.Module | None]) -> GateStatsSync | None:
    """A :class:`GateStatsSync` for a module's gate BNs where one syncs in this step, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    sync = GateStatsSync(bns)
    return sync if sync.groups else None


class GateStatsSync:
    """Cross-rank statistics for the gates (by index) whose BN syncs; one per forward call."""

    def __init__(self, bns: list[nn.Module | None]):
        self.groups = {g: _group(bn) for g, bn in enumerate(bns) if syncs_statistics(bn)}
        self.counts: dict[int, int] = {}  # gate -> element count of the global batch (this forward's)

    def __contains__(self, gate: int) -> bool:
        return gate in self.groups

    def gate_forward(self, prims, gate: int, pooled: Tensor, conv_weight: Tensor, bn_weight: Tensor | None,
                     bn_bias: Tensor | None, eps: float) -> GateForward:
        z = prims.gate_forward(pooled, conv_weight, BN_NONE, None, None, None, None, 0.0).z
        mean = z.mean()
        local = torch.stack([z.new_tensor(float(z.numel())), mean, ((z - mean) ** 2).sum()])
        group = self.groups[gate]
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, local, group=group)
        counts, means, m2s = torch.stack(parts).unbind(1)
        total = counts.sum()
        self.counts[gate] = int(total.item())  # one device sync: the running statistics need it as a number
        if self.counts[gate] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training a synced gate BatchNorm "
                             f"(its input has {self.counts[gate]} value(s) over all ranks)")
        mean = (counts * means).sum() / total
        var = (m2s + counts * (means - mean) ** 2).sum() / total  # biased, as BN normalises
        scale_shift, stats = fold_bn_with(z, bn_weight, bn_bias, mean, var, eps)
        return GateForward(z, scale_shift, stats)

    def gate_backward(self, prims, gate: int, gate_grad: Tensor, pooled: Tensor, value: GateValue, bn_stats: Tensor,
                      conv_weight: Tensor, bn_weight: Tensor | None, eps: float,
                      needs: tuple[bool, bool, bool, bool]) -> GateGrads:
        z = value.z
        a, b = value.scale_shift.unbind()
        g = torch.sigmoid(a * z + b)
        dy = gate_grad * g * (1 - g)  # d loss / d (BN output)
        mean, var = bn_stats.unbind()
        rstd = torch.rsqrt(var + eps)
        zhat = (z - mean) * rstd
        dzhat = dy * (bn_weight.to(z.dtype).reshape(()) if bn_weight is not None else 1.0)
        sums = torch.stack([dzhat.sum(), (dzhat * zhat).sum()])
        torch.distributed.all_reduce(sums, group=self.groups[gate])
        total = self.counts[gate]
        dz = rstd * (dzhat - sums[0] / total - zhat * (sums[1] / total))
        d_pooled, d_conv = conv_backward(pooled, conv_weight, dz, needs[0], needs[1])
        return GateGrads(d_pooled, d_conv, (dy * zhat).sum().reshape(1) if needs[2] else None,
                         dy.sum().reshape(1) if needs[3] else None)
