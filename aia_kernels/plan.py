"""A variant as data: the pool stages it runs and the weights each stage applies.

Every AIA variant computes ``out = W * v`` where ``W`` is built from gates, and each
gate comes from pooling ``W_s * v`` for weights ``W_s`` known at that point
(docs/semantics.md, "The ten variants"). A :class:`Plan` lists those stages in order. Fused
backends never see variant names: the generic executor (``executor.py``) walks the
plan and calls the same few primitives for every variant.

Gates are numbered in state_dict order (unit by unit, C, T, H, W within a unit).
A *factor* is one C gate ``(c,)`` or the spatio-temporal mean of three gates
``(t, h, w)``; a :class:`Weight` is the product (sequential) or the mean (parallel)
of at most two factors, which is all the ten variants need.

A stage either keeps its small tensors (pooled P, argmax, conv output z) for the backward
or has them recomputed there from ``v`` (``Stage.recompute``): a T, H, W stage's tensors
are (2 + 1 + 1) / T + 4 / H + 4 / W of the input (over half of it at T = 8), a C stage's
4 / C (6% at C = 64), so the T, H, W stages are recomputed (docs/design.md, "Memory").

The kernels assume those shapes in fixed-size arrays; the limits below say how far,
and :func:`build_plan` checks every plan against them (:func:`check_plan`), so a new
variant beyond them fails here with a clear message, not inside a backend. The plan
travels to C++ as ints (:func:`encode_plan`; decoded by ``csrc/aia_plan.cpp``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from .variants import UNIT_GATES, parse_variant

Factor = tuple[int, ...]

# ---- what the kernels take; each limit names the code that assumes it ----
AXES = "CTHW"  # a gate pools one axis; its code in the int encoding is its index (csrc/aia_common.h: kAxisC..kAxisW)
# A factor is one C gate or the mean of the T, H and W gates (kMaxFactorGates = 3 in csrc/aia_common.h;
# three gate slots per factor in aia_kernels/triton/weights.py).
FACTOR_AXES = ("C", "THW")
# A weight combines at most two factors (kMaxFactors in csrc/aia_common.h; the F0, F1 slots of the Triton kernels).
MAX_FACTORS = 2
COMBINES = ("prod", "mean")
# A stage pools along C, or along T, H and W in one read of v (its pooled gradients are at most
# kMaxItems = 3 items of one upstream in csrc/aia_common.h; one Triton kernel per axis set).
STAGE_AXES = ("C", "THW")
# Gates in one plan (parse_plan in csrc/aia_plan.cpp).
MAX_GATES = 16
# input_grad sums one (weight, upstream) term for the output and one per stage in one pass
# (kMaxTerms in csrc/aia_common.h: fixed arrays in the CPU and CUDA kernels; the Triton kernel packs
# 8 bits a term into a 64-bit constexpr), so a plan has at most MAX_INPUT_GRAD_TERMS - 1 stages.
MAX_INPUT_GRAD_TERMS = 8
MAX_STAGES = MAX_INPUT_GRAD_TERMS - 1
# Not limits: the native CUDA one-launch forward / backward take at most 8 gates and 8 / 4 stages
# (csrc/aia_cuda_persistent.cu); a larger plan runs the multi-launch walk instead.


@dataclass(frozen=True)
class Weight:
    factors: tuple[Factor, ...] = ()
    combine: str = "prod"  # "prod" or "mean"


@dataclass(frozen=True)
class Stage:
    """Pool ``weight * v`` along ``axes`` ("C" or "THW"); gate ``gates[i]`` comes from ``axes[i]``.
    ``recompute``: the backward pools the stage again (and recomputes its gates' z) instead of
    keeping its pooled tensors, argmaxes and z from the forward; its gates' folded BN
    ``scale_shift`` is kept either way."""
    axes: str
    weight: Weight
    gates: tuple[int, ...]
    recompute: bool = False


@dataclass(frozen=True)
class Plan:
    variant: str
    gate_axes: tuple[str, ...]  # axis of each gate, by gate number
    stages: tuple[Stage, ...]
    output: Weight


# Which stages the backward recomputes (see the module docstring): those pooling along T, H, W.
RECOMPUTED_AXES = ("THW",)


def _stage(axes: str, weight: Weight, gates: tuple[int, ...]) -> Stage:
    return Stage(axes, weight, gates, recompute=axes in RECOMPUTED_AXES)


def _unit_stages(kind: str, gate_ids: dict[str, int], prev: tuple[Factor, ...]):
    """Stages of one unit applied to ``prev``-weighted input, and the unit's own factor."""
    c = (gate_ids["C"],) if "C" in gate_ids else None
    st = tuple(gate_ids[a] for a in "THW") if "T" in gate_ids else None
    if kind == "C":
        return [_stage("C", Weight(prev), c)], c
    if kind == "ST":
        return [_stage("THW", Weight(prev), st)], st
    if kind == "CinST":  # Y_ST(Y_C(v) * v) * v
        return [_stage("C", Weight(prev), c), _stage("THW", Weight(prev + (c,)), st)], st
    if kind == "STinC":  # Y_C(Y_ST(v) * v) * v
        return [_stage("THW", Weight(prev), st), _stage("C", Weight(prev + (st,)), c)], c
    raise ValueError(f"unknown AIA unit {kind!r}")


def _weight_problem(weight: Weight, gate_axes: tuple[str, ...], known: set[int]) -> str | None:
    if weight.combine not in COMBINES:
        return f"combines its factors by {weight.combine!r}; the kernels take {' or '.join(COMBINES)}"
    if len(weight.factors) > MAX_FACTORS:
        return f"has {len(weight.factors)} factors; the kernels take at most {MAX_FACTORS}"
    for factor in weight.factors:
        if any(not isinstance(g, int) or not 0 <= g < len(gate_axes) for g in factor):
            return f"names a gate that does not exist: {factor}"
        axes = "".join(gate_axes[g] for g in factor)
        if axes not in FACTOR_AXES:
            return f"has a factor of the {axes or 'no'} gates; a factor is one C gate or the T, H, W gates"
        if not known.issuperset(factor):
            return f"uses gates {sorted(set(factor) - known)} before a stage computes them"
    return None


def check_plan(plan: Plan) -> Plan:
    """``plan``, if every backend can run it; else a ValueError naming the limit it breaks."""
    def fail(problem: str):
        raise ValueError(f"the plan of AIA variant {plan.variant!r} {problem}")

    if not 1 <= len(plan.gate_axes) <= MAX_GATES:
        fail(f"has {len(plan.gate_axes)} gates; the kernels take 1 to {MAX_GATES}")
    if any(axis not in AXES for axis in plan.gate_axes):
        fail(f"has gate axes {plan.gate_axes}; each is one of {', '.join(AXES)}")
    if len(plan.stages) > MAX_STAGES:
        fail(f"has {len(plan.stages)} stages; input_grad sums one term per stage and one for the output, "
             f"at most {MAX_INPUT_GRAD_TERMS} in all, so at most {MAX_STAGES} stages")
    computed: set[int] = set()
    for i, stage in enumerate(plan.stages):
        if stage.axes not in STAGE_AXES:
            fail(f"pools stage {i} along {stage.axes!r}; a stage pools along C or along THW")
        problem = _weight_problem(stage.weight, plan.gate_axes, computed)
        if problem:
            fail(f"weights stage {i} by a weight that {problem}")
        if len(stage.gates) != len(stage.axes) or any(
                not isinstance(g, int) or not 0 <= g < len(plan.gate_axes) or plan.gate_axes[g] != axis
                for g, axis in zip(stage.gates, stage.axes)):
            fail(f"computes gates {stage.gates} in stage {i}, which pools {stage.axes}: one gate of each axis")
        if not isinstance(stage.recompute, bool):
            fail(f"says recompute={stage.recompute!r} for stage {i}; True or False")
        if computed.intersection(stage.gates):
            fail(f"computes gates {sorted(computed.intersection(stage.gates))} twice")
        computed.update(stage.gates)
    if len(computed) != len(plan.gate_axes):
        fail(f"never computes gates {sorted(set(range(len(plan.gate_axes))) - computed)}")
    problem = _weight_problem(plan.output, plan.gate_axes, computed)
    if problem:
        fail(f"has an output weight that {problem}")
    return plan


@lru_cache(maxsize=None)
def build_plan(variant: str, recompute: bool = True) -> Plan:
    """The plan of ``variant``, checked against what the kernels take (:func:`check_plan`).
    ``recompute=False``: every stage's tensors kept for the backward (:func:`without_recompute`)."""
    if not recompute:
        return without_recompute(build_plan(variant))
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
    return check_plan(Plan(variant, tuple(gate_axes), tuple(stages), output))


@lru_cache(maxsize=None)
def for_inference(variant: str) -> Plan:
    """The plan of a forward that no backward follows (grad disabled, or nothing requires it):
    every stage marked recomputed, so the forward keeps nothing and the kernels skip what only a
    backward reads (the native pools then track no max positions). Same outputs bit for bit."""
    plan = build_plan(variant)
    return replace(plan, stages=tuple(replace(stage, recompute=True) for stage in plan.stages))


def without_recompute(plan: Plan) -> Plan:
    """``plan`` with every stage's tensors kept for the backward: the same results bit for bit
    (the recompute is deterministic) with more memory and no recompute passes; tests and
    benchmarks compare the two."""
    return replace(plan, stages=tuple(replace(stage, recompute=False) for stage in plan.stages))


# ---- the int encoding that aia_native::plan_forward / plan_backward read (csrc/aia_plan.cpp decodes it) ----
#   G, the axis code of each gate (index in AXES: 0 C, 1 T, 2 H, 3 W),
#   S, then per stage: its pooled axes (0: C, 1: T, H, W), its weight, its gate count and gate ids,
#   and 1 if the backward recomputes it (else 0), then the output weight;
#   a weight is: combine (0 prod, 1 mean), factor count, then per factor its size and gate ids.
# aia_native::plan_encoding_roundtrip decodes and re-encodes in C++; tests check it returns its input.

def _encode_weight(weight: Weight) -> list[int]:
    out = [COMBINES.index(weight.combine), len(weight.factors)]
    for factor in weight.factors:
        out += [len(factor), *factor]
    return out


@lru_cache(maxsize=None)
def encode_plan(plan: Plan) -> tuple[int, ...]:
    """``plan`` as the ints ``aia_native::plan_forward`` / ``plan_backward`` take."""
    out = [len(plan.gate_axes), *(AXES.index(a) for a in plan.gate_axes), len(plan.stages)]
    for stage in plan.stages:
        out += [STAGE_AXES.index(stage.axes), *_encode_weight(stage.weight), len(stage.gates), *stage.gates,
                int(stage.recompute)]
    return tuple(out + _encode_weight(plan.output))


def decode_plan(codes, variant: str = "") -> Plan:
    """The inverse of :func:`encode_plan` (the variant name is not encoded); unchecked."""
    codes = iter(codes)

    def weight() -> Weight:
        combine, n_factors = COMBINES[next(codes)], next(codes)
        return Weight(tuple(tuple(next(codes) for _ in range(next(codes))) for _ in range(n_factors)), combine)

    gate_axes = tuple(AXES[next(codes)] for _ in range(next(codes)))
    stages = []
    for _ in range(next(codes)):
        axes, stage_weight = STAGE_AXES[next(codes)], weight()
        gates = tuple(next(codes) for _ in range(next(codes)))
        stages.append(Stage(axes, stage_weight, gates, bool(next(codes))))
    plan = Plan(variant, gate_axes, tuple(stages), weight())
    if next(codes, None) is not None:
        raise ValueError("plan encoding too long")
    return plan
