"""Which backends exist, and which one runs.

``BACKEND_MODULES`` is the one table of fused backends: a name and the module that
implements it. Such a module exposes

- ``primitives``: the six primitives of ``aia_kernels.primitives`` (optionally with the
  whole-plan ops ``forward_plan``/``backward_plan``), and
- ``unavailable_reason(device)``: None when it can run on ``device``, else why not,

and imports nothing from this file: the registry imports it on first use, so an optional
dependency (triton) costs nothing until its backend is asked for, and an import that
fails makes the backend unavailable with that error (type and message) as the reason.
Asking for a backend that cannot run raises; only ``"auto"`` falls back, visibly.

Test hook: ``stand_ins`` maps a backend name to any object with ``primitives`` and
``unavailable_reason`` (:class:`FusedBackend` builds one), served instead of the module;
``monkeypatch.setitem(backends.stand_ins, "native", FusedBackend(...))`` scopes it to
one test. To simulate a backend whose import fails, point its ``BACKEND_MODULES`` entry
at a module that does not exist.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .warnings_once import warn_once

# The fused backends: name -> the module that implements it (see above).
BACKEND_MODULES = {"triton": "aia_kernels.triton", "native": "aia_kernels.native"}
FUSED_BACKENDS = tuple(BACKEND_MODULES)
BACKENDS = ("reference", *FUSED_BACKENDS, "auto")
# What "auto" tries for a device type, fastest first; the reference path when none can run.
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("native",)}


class Backend(Protocol):
    primitives: object

    def unavailable_reason(self, device: torch.device) -> str | None: ...


@dataclass
class FusedBackend:
    """A backend that is not a module: a stand-in in tests (see ``stand_ins``)."""
    name: str
    primitives: object
    # Returns None when the backend can run on this device, else the reason it cannot.
    unavailable_reason: Callable[[torch.device], str | None]


stand_ins: dict[str, Backend] = {}
# By module name: the imported module, or why importing it failed.
_imported: dict[str, Backend | str] = {}


def check_backend_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown AIA backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _load(name: str) -> Backend | str:
    """The backend ``name`` (a fused one), or why it could not be imported."""
    if name in stand_ins:
        return stand_ins[name]
    module_name = BACKEND_MODULES[name]
    if module_name not in _imported:
        try:
            _imported[module_name] = importlib.import_module(module_name)
        except Exception as exc:  # any failure: the backend is unavailable, and says why
            _imported[module_name] = f"importing {module_name} failed: {type(exc).__name__}: {exc}"
    return _imported[module_name]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not."""
    if check_backend_name(name) in ("reference", "auto"):
        return None
    backend = _load(name)
    return backend if isinstance(backend, str) else backend.unavailable_reason(device)


def get(name: str, device: torch.device) -> Backend:
    """The fused backend ``name`` for ``device``, or a RuntimeError saying why it cannot run."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"{name!r} is not a fused AIA backend; expected one of {', '.join(FUSED_BACKENDS)}")
    backend = _load(name)
    reason = backend if isinstance(backend, str) else backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"AIA backend {name!r} cannot run on {device}: {reason}")
    return backend


def is_available(name: str, device: torch.device) -> bool:
    return unavailable_reason(name, device) is None


def resolve(requested: str, device: torch.device) -> str:
    """The concrete backend that runs for ``requested`` on ``device``."""
    check_backend_name(requested)
    if requested != "auto":
        if requested != "reference":
            get(requested, device)  # raises if missing or unusable here
        return requested
    reasons = {}
    for name in AUTO_ORDER.get(device.type, ()):
        reasons[name] = unavailable_reason(name, device)
        if reasons[name] is None:
            return name
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items()) or "none is made for it"
    warn_once(f"auto-{device.type}",
              f"aia_kernels: no fused backend can run on {device.type} ({why}); backend='auto' uses the "
              f"slower pure-PyTorch reference (module.last_backend says which backend ran)")
    return "reference"
