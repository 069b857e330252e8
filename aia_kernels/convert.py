"""Switch every AIA unit of a network to a fused backend, in place.

Ours (:class:`~aia_kernels.AIAModule`) get their ``backend`` set. Foreign modules
with the spec's parameter layout (``C_conv``/``T_conv``/``H_conv``/``W_conv`` children
that are ``Conv3d(2, 1, 3, padding=1, bias=False)``, optionally ``*_bn``
``BatchNorm3d(1)`` children), such as the units of the authors' code, are replaced
by our unit of the same kind that *reuses* their conv and BN submodules: the same
parameter and buffer objects, so weights, running statistics, ``requires_grad``,
``training`` flags and any optimizer holding the parameters stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import backends
from .modules import UNIT_CLASSES, AIAModule, runs_aia
from .variants import UNIT_GATES

SEGMENT_ATTRIBUTES = ("num_segments", "n_segment", "n_segments", "num_segment", "segments")
_KIND_BY_GATES = {"C": ("C",), "THW": ("ST",), "CTHW": ("CinST", "STinC")}


@dataclass
class ConvertReport:
    backend: str
    changed: list[tuple[str, str]] = field(default_factory=list)  # (module name, what was done)

    def __len__(self) -> int:
        return len(self.changed)

    def __str__(self) -> str:
        lines = [f"{len(self)} AIA module(s) switched to backend {self.backend!r}"]
        lines += [f"  {name or '<root>'}: {what}" for name, what in self.changed]
        return "\n".join(lines)


def _is_gate_conv(m) -> bool:
    return (isinstance(m, nn.Conv3d) and m.in_channels == 2 and m.out_channels == 1 and m.bias is None
            and m.kernel_size == (3, 3, 3) and m.padding == (1, 1, 1) and m.stride == (1, 1, 1)
            and m.dilation == (1, 1, 1) and m.groups == 1)


def _is_gate_bn(m) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features == 1


def foreign_unit_gates(module: nn.Module) -> str | None:
    """The gates (e.g. ``"CTHW"``) of a foreign module with the spec's layout, else None."""
    if isinstance(module, AIAModule):
        return None
    children = dict(module.named_children())
    gates = "".join(g for g in "CTHW" if _is_gate_conv(children.get(f"{g}_conv")))
    if gates not in _KIND_BY_GATES:
        return None
    bns = [children.get(f"{g}_bn") for g in gates]
    if any(bn is not None and not _is_gate_bn(bn) for bn in bns) or len({bn is None for bn in bns}) > 1:
        return None
    return gates


def _kind(name: str, module: nn.Module, gates: str, unit_kinds: dict) -> str:
    """A foreign unit's kind: from its gates, else from ``unit_kinds`` or its class name."""
    kinds = _KIND_BY_GATES[gates]
    if len(kinds) == 1:
        return kinds[0]
    hint = unit_kinds.get(name) or unit_kinds.get(type(module).__name__)
    if hint is None:
        cls = type(module).__name__.lower()
        found = [k for k in kinds if k.lower() in cls]
        hint = found[0] if len(found) == 1 else None
    if hint not in kinds:
        raise ValueError(f"{name}: a {type(module).__name__} with gates C, T, H, W may be CinST or STinC; "
                         f"say which with unit_kinds={{{name!r}: 'CinST'}} (or by class name)")
    return hint


def _num_segments(name: str, module: nn.Module, default: int | None) -> int:
    for attr in SEGMENT_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    if default is None:
        raise ValueError(f"{name}: cannot tell the number of segments of {type(module).__name__}; "
                         f"pass convert(..., num_segments=T)")
    return default


def _replace(name: str, module: nn.Module, gates: str, kind: str, num_segments: int, backend: str) -> AIAModule:
    use_bn = getattr(module, f"{gates[0]}_bn", None) is not None
    unit = UNIT_CLASSES[kind](num_segments, use_bn, backend)
    assert UNIT_GATES[kind] == gates
    for g in gates:  # reuse the very submodules: same parameters, buffers and flags
        setattr(unit, f"{g}_conv", getattr(module, f"{g}_conv"))
        if use_bn:
            setattr(unit, f"{g}_bn", getattr(module, f"{g}_bn"))
    unit.training = module.training  # children keep their own flags
    return unit


def convert(model: nn.Module, backend: str = "auto", *, num_segments: int | None = None,
            unit_kinds: dict[str, str] | None = None) -> ConvertReport:
    """Switch every AIA unit under ``model`` to ``backend`` in place; returns what changed.

    Foreign units are replaced by ours (sharing their conv/BN submodules); the number
    of segments is read from their ``num_segments``/``n_segment`` attribute or taken
    from ``num_segments``; ``unit_kinds`` (module name or class name -> "CinST"/"STinC")
    settles units with all four gates when the class name does not. A ``model`` that is
    itself a foreign unit cannot be replaced in place: wrap it in a container.
    """
    backends.check_backend_name(backend)
    unit_kinds = unit_kinds or {}
    report = ConvertReport(backend)
    replacements = []
    covered: set[int] = set()  # our AIA modules and everything under them
    for name, module in model.named_modules():
        if id(module) in covered:
            continue
        ours = runs_aia(module)
        if ours is not None:
            ours.backend = backend  # a combined module sets both of its units
            covered.update(id(m) for m in ours.modules())
            report.changed.append((name, f"{type(ours).__name__} {ours.variant!r}: backend set"))
            continue
        gates = foreign_unit_gates(module)
        if gates is not None:
            if not name:
                raise ValueError("the model itself is a foreign AIA unit; convert a container holding it")
            kind = _kind(name, module, gates, unit_kinds)
            replacements.append((name, _replace(name, module, gates, kind,
                                                _num_segments(name, module, num_segments), backend)))
            report.changed.append((name, f"{type(module).__name__} replaced by aia_kernels {kind}"))
    for name, unit in replacements:
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, unit)
    return report
