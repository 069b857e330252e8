"""A variant as data: the pool stages it runs and the weights each stage applies.

Every AIA variant computes ``out = W * v`` where ``W`` is built from gates, and each
gate comes from pooling ``W_s * v`` for weights ``W_s`` known at that point
(docs/semantics.md, "The ten variants"). A :class:`Plan` lists those stages in order. Fused
backends never see variant names: the generic executor (``fused.py``) walks the
plan and calls the same few primitives for every variant.

Gates are numbered in state_dict order (unit by unit, C, T, H, W within a unit).
A *factor* is one C gate ``(c,)`` or the spatio-temporal mean of three gates
``(t, h, w)``; a :class:`Weight` is the product (sequential) or the mean (parallel)
of at most two factors, which is all the ten variants need.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .variants import UNIT_GATES, parse_variant

Factor = tuple[int, ...]


@dataclass(frozen=True)
class Weight:
    factors: tuple[Factor, ...] = ()
    combine: str = "prod"  # "prod" or "mean"


@dataclass(frozen=True)
class Stage:
    """Pool ``weight * v`` along ``axes`` ("C" or "THW"); gate ``gates[i]`` comes from ``axes[i]``."""
    axes: str
    weight: Weight
    gates: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    variant: str
    gate_axes: tuple[str, ...]  # axis of each gate, by gate number
    stages: tuple[Stage, ...]
    output: Weight


def _unit_stages(kind: str, gate_ids: dict[str, int], prev: tuple[Factor, ...]):
    """Stages of one unit applied to ``prev``-weighted input, and the unit's own factor."""
    c = (gate_ids["C"],) if "C" in gate_ids else None
    st = tuple(gate_ids[a] for a in "THW") if "T" in gate_ids else None
    if kind == "C":
        return [Stage("C", Weight(prev), c)], c
    if kind == "ST":
        return [Stage("THW", Weight(prev), st)], st
    if kind == "CinST":  # Y_ST(Y_C(v) * v) * v
        return [Stage("C", Weight(prev), c), Stage("THW", Weight(prev + (c,)), st)], st
    if kind == "STinC":  # Y_C(Y_ST(v) * v) * v
        return [Stage("THW", Weight(prev), st), Stage("C", Weight(prev + (st,)), c)], c
    raise ValueError(f"unknown AIA unit {kind!r}")


@lru_cache(maxsize=None)
def build_plan(variant: str) -> Plan:
    combine, units = parse_variant(variant)
    gate_axes: list[str] = []
    stages: list[Stage] = []
    factors: list[Factor] = []
    for kind in units:
        ids = {axis: len(gate_axes) + i for i, axis in enumerate(UNIT_GATES[kind])}
        gate_axes += UNIT_GATES[kind]
        # In A->B, unit B sees A's output, so its stages are weighted by A's factor.
        prev = tuple(factors) if combine == "->" else ()
        unit_stages, factor = _unit_stages(kind, ids, prev)
        stages += unit_stages
        factors.append(factor)
    output = Weight(tuple(factors), "mean" if combine == "+" else "prod")
    return Plan(variant, tuple(gate_axes), tuple(stages), output)
