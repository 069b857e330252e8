"""SyncBatchNorm that also syncs on CPU (gloo), and the converter that installs it.

``torch.nn.SyncBatchNorm`` reduces batch statistics across ranks only for GPU
inputs (on CPU it raises, and DDP refuses CPU modules holding one).
:class:`SyncBatchNorm` has its semantics on any device: in training mode under
``torch.distributed`` it reduces the per-channel sum, count and squared deviations
with autograd-aware all-reduces, so forward, backward and running statistics are
those of one batch norm over the concatenated batch. It marks itself with
``is_sync_batchnorm`` so that AIA modules run the reference path while training
across ranks (see ``AIAModule.forward``), where the BN statistics are then synced.
On GPUs ``nn.SyncBatchNorm`` (its fused CUDA kernels) works as well.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over inputs of 2 or more dims whose batch statistics are reduced across ranks."""

    is_sync_batchnorm = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked.item()
        group = self.process_group or dist.group.WORLD
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_full((1,), x.numel() / x.shape[1])
        totals = dist_fn.all_reduce(torch.cat([x.sum(dims), count]), group=group)
        n = totals[-1]
        mean = totals[:-1] / n
        var = dist_fn.all_reduce(((x - mean.view(shape)) ** 2).sum(dims), group=group) / n  # biased
        if n.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        out = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach().to(self.running_mean.dtype))
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` with :class:`SyncBatchNorm` (CPU too):
    every BatchNorm layer, the AIA gates' ``BatchNorm3d`` included, becomes one, keeping
    its parameters, running statistics and ``training`` flag."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
