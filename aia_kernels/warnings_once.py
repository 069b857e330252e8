"""Warnings given once per process: a slower path taken, a setting ignored.

Shared by the registry, the modules and the backends, so it imports nothing of the package.
Tests that need a warning again reset ``_warned`` (``monkeypatch.setattr(warnings_once,
"_warned", set())``).
"""
from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A RuntimeWarning with ``message`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
