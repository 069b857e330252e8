"""``load_state_dict`` that either loads everything or changes nothing.

``nn.Module.load_state_dict`` copies every entry that fits and only then raises for the
ones that did not (a wrong shape, a missing or unexpected key, a value that cannot be
copied): the module is left half old, half new. Here every parameter and buffer (the
objects, which an optimizer may hold, and their values) is kept aside first and put back
if loading raises, whatever raised (a load post-hook included).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def load_state_dict_atomically(module: nn.Module, state_dict, strict: bool = True, assign: bool = False,
                               load: Callable | None = None):
    """``(load or nn.Module.load_state_dict)(state_dict, strict, assign)`` on ``module``; if it
    raises, every parameter and buffer of ``module`` is as before (same objects, same values)."""
    before = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    values = {id(t): t.detach().clone() for _, params, buffers in before
              for t in (*params.values(), *buffers.values()) if t is not None}
    try:
        if load is None:
            return nn.Module.load_state_dict(module, state_dict, strict=strict, assign=assign)
        return load(state_dict, strict=strict, assign=assign)
    except BaseException:
        with torch.no_grad():
            for m, params, buffers in before:
                m._parameters.update(params)  # assign=True may have replaced the objects
                m._buffers.update(buffers)
                for t in (*params.values(), *buffers.values()):
                    if t is not None:
                        t.copy_(values[id(t)])
        raise


class AtomicLoadStateDict:
    """Mixin for an ``nn.Module``: its ``load_state_dict`` loads everything or changes nothing."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return load_state_dict_atomically(self, state_dict, strict, assign, load=super().load_state_dict)
