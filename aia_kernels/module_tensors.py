"""Reading a module's registered parameters and buffers without ``nn.Module.__getattr__``.

A fused AIA step reads about 80 of them (each gate's conv weight, BN weight, bias and
running statistics); through ``__getattr__`` (a Python call and up to three dict lookups
each) they were a tenth of the Python around the kernels of a small module.
"""
from __future__ import annotations

from torch import nn


def registered(module: nn.Module, name: str):
    """``getattr(module, name)`` for a registered parameter or buffer (None where registered
    as None); anything else (a parametrization, a plain attribute) through ``getattr``."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)
