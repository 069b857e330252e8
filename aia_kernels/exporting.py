"""What an AIA module computes while it is being exported.

An exported model must run without this package: in ONNX Runtime, in another process or
on another machine. So while ``torch.export`` traces a module (``torch.onnx.export(...,
dynamo=True)`` and ``torch.export.export`` alike) or ``torch.jit.trace`` records it, AIA
modules run the reference path (``reference.py``): pooling, Conv3d, BatchNorm, sigmoid
and products, all plain aten ops, which ``run_decompositions()`` lowers to core aten and
the ONNX exporter to standard ONNX operators. Eager mode and ``torch.compile`` keep the
fused custom ops (docs/deploy.md).
"""
from __future__ import annotations

import torch
from torch import nn


def is_exporting() -> bool:
    """True while ``torch.export`` (strict or not) or ``torch.jit.trace`` traces the caller."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def check_exportable(variant: str, bns: list[nn.Module | None]) -> None:
    """Raise if a gate BatchNorm (``bns``, None for a gate without one) is in training mode:
    the exported graph would normalise with each batch's statistics and carry the running
    statistics' update, which no deployed model should. A SyncBatchNorm in eval mode is a
    plain BatchNorm over its running statistics and exports as one."""
    training = [bn for bn in bns if bn is not None and bn.training]
    if not training:
        return
    kinds = sorted({type(bn).__name__ for bn in training})
    raise RuntimeError(
        f"aia_kernels: cannot export the {variant!r} AIA module in training mode: {len(training)} of its gate "
        f"BatchNorms ({', '.join(kinds)}) are training, so the exported graph would normalise with batch "
        f"statistics. Call model.eval() before torch.export.export / torch.onnx.export.")
