"""Backend names, the registry of fused backends, and what ``"auto"`` picks.

A fused backend is a set of primitives (see ``aia_kernels.primitives``) plus a test
of whether it can run on a given device. Backends register themselves here when
their package is imported; asking for one that is missing or cannot run on the
input's device raises, it never falls back silently.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "native", "auto")
FUSED_BACKENDS = ("triton", "native")


@dataclass
class FusedBackend:
    name: str
    primitives: object
    # Returns None when the backend can run on this device, else the reason it cannot.
    unavailable_reason: Callable[[torch.device], str | None]


_registry: dict[str, FusedBackend] = {}
_warned: set[str] = set()


def register(backend: FusedBackend) -> None:
    _registry[backend.name] = backend


def check_backend_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown AIA backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _load(name: str) -> FusedBackend | None:
    """Import the backend's package on first use; it registers itself."""
    if name not in _registry:
        try:
            if name == "triton":
                import aia_kernels.triton  # noqa: F401
            elif name == "native":
                import aia_kernels.native  # noqa: F401
        except ImportError:
            pass
    return _registry.get(name)


def get(name: str, device: torch.device) -> FusedBackend:
    """The fused backend ``name`` for ``device``, or a clear error."""
    backend = _load(name)
    if backend is None:
        raise NotImplementedError(f"AIA backend {name!r} is not implemented in this build of aia_kernels")
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"AIA backend {name!r} cannot run on {device}: {reason}")
    return backend


def is_available(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    backend = _load(name)
    return backend is not None and backend.unavailable_reason(device) is None


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def auto_order(device: torch.device) -> tuple[str, ...]:
    """Backends ``"auto"`` tries, fastest first, for a device type."""
    if device.type == "cuda":
        return ("triton",)
    return ("native",)


def resolve(requested: str, device: torch.device) -> str:
    """The concrete backend that runs for ``requested`` on ``device``."""
    check_backend_name(requested)
    if requested != "auto":
        if requested != "reference":
            get(requested, device)  # raises if missing or unusable here
        return requested
    for name in auto_order(device):
        if is_available(name, device):
            return name
    warn_once(f"auto-{device.type}",
              f"aia_kernels: no fused backend can run on {device.type}; backend='auto' uses the "
              f"slower pure-PyTorch reference (module.last_backend says which backend ran)")
    return "reference"
