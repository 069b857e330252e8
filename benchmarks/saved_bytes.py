"""Bytes kept for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``.

:func:`saved_bytes` runs a forward under a pack hook that records the storage of every
tensor autograd saves; each storage counts once (a tensor saved by two nodes, or two views
of one storage, are one allocation), with its whole size. Parameters saved by a node
count too, on both sides of a comparison. The tests (tests/test_training_memory.py) and
the benchmarks (benchmarks/network.py, benchmarks/memory.py) use it.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def saved_bytes(forward: Callable[[], T]) -> tuple[int, T]:
    """(bytes of the distinct storages autograd saved while ``forward()`` ran, its result)."""
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(storages.values()), result
