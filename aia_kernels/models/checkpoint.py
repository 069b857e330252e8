"""Loading the authors' checkpoints (and torchvision ImageNet weights) with strict key checks."""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..state_loading import load_state_dict_atomically

# TSM's released code wraps a shifted block's conv1 as ``conv1.net``; our shift has no module.
_KEY_ALIASES = ((".conv1.net.", ".conv1."),)


@dataclass
class LoadReport:
    """What a checkpoint load found; ``ok`` when every expected key matched."""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # key, checkpoint shape (or why its value is no tensor), model shape
    mismatched: list[tuple[str, tuple | str, tuple]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def block(title, items):
            items = list(items)
            shown = "".join(f"\n    {item}" for item in items[:40])
            more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
            return f"\n  {title} ({len(items)}):{shown}{more}" if items else ""
        return (f"{len(self.loaded)} keys matched"
                + block("missing from the checkpoint", self.missing)
                + block("unexpected in the checkpoint", self.unexpected)
                + block("shape mismatch (checkpoint vs model)",
                        (f"{k}: {a if isinstance(a, str) else tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched)))


class CheckpointMismatch(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model (which is left unchanged)."""

    def __init__(self, report: LoadReport):
        super().__init__(f"checkpoint does not match the model (the model is unchanged): {report}")
        self.report = report


class CheckpointReadError(RuntimeError):
    """The checkpoint file cannot be read (truncated, corrupt, not a torch file)."""


def read_state_dict(path_or_state_dict) -> OrderedDict[str, torch.Tensor]:
    """A state_dict from a file or a dict: the authors' ``{"state_dict": ..., "epoch": ...}``
    layout or a bare state_dict; DataParallel's ``module.`` prefix removed. Its ``_metadata``
    (module versions, which say how a checkpoint was laid out) is kept under the same renames."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path_or_state_dict = _read_file(path_or_state_dict)
    if not isinstance(path_or_state_dict, Mapping):
        raise TypeError(f"expected a path or a state_dict mapping, got {type(path_or_state_dict).__name__}")
    state = path_or_state_dict.get("state_dict", path_or_state_dict)
    metadata = getattr(state, "_metadata", None)
    strip = "module." if state and all(k.startswith("module.") for k in state) else ""

    def rename(key: str) -> str:
        key = key[len(strip):] if key.startswith(strip) else key
        for old, new in _KEY_ALIASES:
            key = key.replace(old, new)
        return key

    out = OrderedDict((rename(k), v) for k, v in state.items())
    if metadata is not None:
        # Module names have no trailing dot; with the prefix stripped, "module" becomes the root
        # and the DataParallel wrapper's own entry ("") goes.
        out._metadata = OrderedDict((rename(name + ".")[:-1], meta) for name, meta in metadata.items()
                                    if not (strip and name == ""))
    return out


def _read_file(path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch.load's errors name neither the file nor the likely cause
        raise CheckpointReadError(f"cannot read the checkpoint {os.fspath(path)}: it is truncated, corrupt or not "
                                  f"a torch checkpoint ({type(exc).__name__}: {exc})") from exc


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor],
                            expected_keys: Iterable[str] | None = None, strict: bool = True) -> LoadReport:
    """Copy ``state`` into ``model``; every key of ``expected_keys`` (default: all of the
    model's) must be present with its shape and no other key may appear. Raises
    :class:`CheckpointMismatch` listing the differences when ``strict``, before anything is
    copied; whatever raises, the model is unchanged."""
    own = model.state_dict()
    expected = list(own) if expected_keys is None else list(expected_keys)
    report = LoadReport(missing=[k for k in expected if k not in state],
                        unexpected=[k for k in state if k not in own or k not in set(expected)])
    for key in expected:
        if key in state:
            if not isinstance(state[key], torch.Tensor):
                report.mismatched.append((key, f"not a tensor ({type(state[key]).__name__})", tuple(own[key].shape)))
            elif own[key].is_floating_point() and not state[key].is_floating_point():  # complex, integer, bool
                report.mismatched.append((key, f"dtype {state[key].dtype} for a {own[key].dtype} tensor",
                                          tuple(own[key].shape)))
            elif tuple(state[key].shape) != tuple(own[key].shape):
                report.mismatched.append((key, tuple(state[key].shape), tuple(own[key].shape)))
            else:
                report.loaded.append(key)
    if strict and not report.ok:
        raise CheckpointMismatch(report)
    loaded = OrderedDict((k, state[k]) for k in report.loaded)
    if hasattr(state, "_metadata"):
        loaded._metadata = state._metadata  # module versions: see modules.AIACombined._version
    # Atomic: a value that cannot be copied (or a failing load hook) leaves the model unchanged.
    load_state_dict_atomically(model, loaded, strict=False)
    return report


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True) -> LoadReport:
    """Load an authors'-code checkpoint (or a bare state_dict) into a model of this package.

    Accepts ``{"state_dict": {"module.base_model.conv1.weight": ..., "module.new_fc.weight": ...},
    "epoch": ...}`` as their TSN saves it, or the state_dict itself, with or without
    the ``module.`` prefix. With ``strict`` (the default) any missing, unexpected or
    shape-mismatched key raises :class:`CheckpointMismatch` with the full list.
    """
    return load_state_dict_checked(model, read_state_dict(path_or_state_dict), strict=strict)
