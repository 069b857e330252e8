"""The generic executor: any variant's forward and backward as a walk of its plan.

One executor serves every variant and every backend: it walks the variant's
:class:`~aia_kernels.plan.Plan` and calls the backend's primitives
(``aia_kernels.primitives``). Only ``out`` (forward) and ``grad_x`` (backward)
are full-size. What the backward needs besides the input is kept as small tensors
per gate: the folded BN scale/shift always; the pooled P, argmax and conv output z
only for the stages the plan keeps, those of the other stages (``Stage.recompute``)
are pooled again from the input at the start of the backward (:func:`recompute`).
The torch.library ops and autograd around it are in ``fused.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layouts import clip_view
from .plan import Plan, Weight
from .primitives import BN_BATCH, BN_NONE, GateValue, PooledGrad, WeightValue, gate_shape, gate_sizes

SAVED_PER_GATE = 4  # pooled P, argmax, z, scale_shift (the first three empty where the stage is recomputed)


def _weight_value(weight: Weight, gates: list[GateValue]) -> WeightValue:
    return WeightValue(tuple(tuple(gates[i] for i in f) for f in weight.factors), weight.combine)


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """Parameter gradients in the parameter's dtype, whatever the accumulation dtype."""
    return grad if grad is None or like is None else grad.to(like.dtype)


def _check_batch_stats(plan: Plan, v_shape, bn_modes) -> None:
    """BatchNorm in train mode needs more than one value per channel (as nn.BatchNorm3d)."""
    sizes = gate_sizes(v_shape, plan.gate_axes)
    if 1 not in sizes:
        return
    for g, axis in enumerate(plan.gate_axes):
        if bn_modes[g] == BN_BATCH and sizes[g] == 1:
            shape = gate_shape(v_shape, axis)
            raise ValueError(f"Expected more than 1 value per channel when training the {axis} gate's "
                             f"BatchNorm (its input has shape {(shape[0], 1, *shape[1:])})")


def run_forward(prims, plan: Plan, x: Tensor, num_segments: int, conv_weights, bn_weights, bn_biases,
                running_means, running_vars, bn_modes, eps, sync=None):
    """``x``: (N*T, C, H, W), or an (N, T, C, H, W) view with any strides (T = num_segments);
    ``out`` is allocated like ``x`` (same strides where x is dense).

    Returns ``(out, saved, bn_stats)``: ``saved`` holds SAVED_PER_GATE small tensors per
    gate (P, argmax and z empty for a stage the backward recomputes); ``bn_stats`` (gates, 2)
    the mean and variance that normalised each gate's z
    (batch statistics, biased, in train mode; running statistics in eval mode).

    A backend whose primitives offer ``forward_plan`` (the native one) runs the whole
    plan in one call instead; it walks the stages in the same order. ``sync``
    (``sync_bn.GateStatsSync``, or None) computes the gates whose BN syncs across ranks;
    the walk below is then taken."""
    v = clip_view(x, num_segments)
    batch_modes = bn_modes if sync is None else [BN_NONE if g in sync else m for g, m in enumerate(bn_modes)]
    _check_batch_stats(plan, v.shape, batch_modes)  # a synced gate checks its global count
    if hasattr(prims, "forward_plan") and sync is None:
        return prims.forward_plan(plan, x, num_segments, conv_weights, bn_weights, bn_biases, running_means,
                                  running_vars, bn_modes, eps)
    n_gates = len(plan.gate_axes)
    gates: list[GateValue | None] = [None] * n_gates
    saved: list[Tensor | None] = [None] * (SAVED_PER_GATE * n_gates)
    stats: list[Tensor | None] = [None] * n_gates
    for stage in plan.stages:
        pooled = prims.pool(v, _weight_value(stage.weight, gates), stage.axes)
        for axis, g, (p, argmax) in zip(stage.axes, stage.gates, pooled):
            if sync is not None and g in sync:
                fw = sync.gate_forward(prims, g, p, conv_weights[g], bn_weights[g], bn_biases[g], eps[g])
            else:
                fw = prims.gate_forward(p, conv_weights[g], bn_modes[g], bn_weights[g], bn_biases[g],
                                        running_means[g], running_vars[g], eps[g])
            gates[g] = GateValue(axis, fw.z, fw.scale_shift)
            kept = [p.new_empty(0), argmax.new_empty(0), fw.z.new_empty(0)] if stage.recompute else [p, argmax, fw.z]
            saved[SAVED_PER_GATE * g:SAVED_PER_GATE * (g + 1)] = [*kept, fw.scale_shift]
            stats[g] = fw.bn_stats
    out = torch.empty_like(x)
    prims.apply(v, _weight_value(plan.output, gates), out.view(v.shape))
    return out, saved, torch.stack(stats)


def recompute(prims, plan: Plan, v: Tensor, conv_weights, saved) -> list[Tensor]:
    """``saved`` with the pooled tensors, argmaxes and z of every recomputed stage filled in.

    Such a stage is pooled again in plan order (its weight's gates are kept, or recomputed by
    an earlier stage) and its gates' z recomputed by their conv, with the kernels the forward
    used: bitwise what the forward computed. The gates' kept ``scale_shift`` stands for the
    BN, which is not run again: no BN statistic is computed or updated here."""
    if not any(stage.recompute for stage in plan.stages):
        return saved
    saved = list(saved)
    gates = [GateValue(axis, z, ss) for axis, z, ss in
             zip(plan.gate_axes, saved[2::SAVED_PER_GATE], saved[3::SAVED_PER_GATE])]
    for stage in plan.stages:
        if not stage.recompute:
            continue
        pooled = prims.pool(v, _weight_value(stage.weight, gates), stage.axes)
        for axis, g, (p, argmax) in zip(stage.axes, stage.gates, pooled):
            z = prims.gate_forward(p, conv_weights[g], BN_NONE, None, None, None, None, 0.0).z
            saved[SAVED_PER_GATE * g:SAVED_PER_GATE * g + 3] = [p, argmax, z]
            gates[g] = GateValue(axis, z, saved[SAVED_PER_GATE * g + 3])
    return saved


def run_backward(prims, plan: Plan, grad_out: Tensor, x: Tensor, num_segments: int, conv_weights,
                 bn_weights, bn_modes, eps, saved, bn_stats, needs, sync=None):
    """``needs`` = [x] + [conv weight] * G + [bn weight] * G + [bn bias] * G; a backend's
    ``backward_plan`` replaces the walk below (recompute included), as ``forward_plan`` does
    in run_forward; ``sync``: the forward's."""
    if hasattr(prims, "backward_plan") and sync is None:
        return prims.backward_plan(plan, grad_out, x, num_segments, conv_weights, bn_weights, bn_modes, eps, saved,
                                   bn_stats, needs)
    v = clip_view(x, num_segments)
    dout = clip_view(grad_out, num_segments)
    saved = recompute(prims, plan, v, conv_weights, saved)
    n_gates = len(plan.gate_axes)
    need_x = needs[0]
    need_conv, need_bn_w, need_bn_b = (needs[1 + k * n_gates:1 + (k + 1) * n_gates] for k in range(3))
    pooled = saved[0::SAVED_PER_GATE]
    argmaxes = saved[1::SAVED_PER_GATE]
    gates = [GateValue(axis, z, ss) for axis, z, ss in
             zip(plan.gate_axes, saved[2::SAVED_PER_GATE], saved[3::SAVED_PER_GATE])]
    gate_grads: list[Tensor | None] = [None] * n_gates  # d loss / d gate, summed over its uses

    def add_weight_grads(weight: Weight, upstream) -> None:
        if not weight.factors:
            return
        grads = prims.weight_grad(v, upstream, _weight_value(weight, gates))
        for ids, factor_grads in zip(weight.factors, grads):
            for g, grad in zip(ids, factor_grads):
                gate_grads[g] = grad if gate_grads[g] is None else gate_grads[g] + grad

    add_weight_grads(plan.output, dout)
    terms = [(plan.output, dout)]
    d_conv, d_bn_w, d_bn_b = [None] * n_gates, [None] * n_gates, [None] * n_gates
    # Reverse order: a gate's gradient is complete once every later stage is done.
    for stage in reversed(plan.stages):
        need_pooled = need_x or bool(stage.weight.factors)
        pooled_grads = []
        for axis, g in zip(stage.axes, stage.gates):
            gate_needs = (need_pooled, need_conv[g], need_bn_w[g], need_bn_b[g])
            if sync is not None and g in sync:
                grads = sync.gate_backward(prims, g, gate_grads[g], pooled[g], gates[g], bn_stats[g], conv_weights[g],
                                           bn_weights[g], eps[g], gate_needs)
            else:
                grads = prims.gate_backward(gate_grads[g], pooled[g], gates[g], bn_stats[g], conv_weights[g],
                                            bn_modes[g], bn_weights[g], eps[g], gate_needs)
            d_conv[g] = _cast(grads.conv_weight, conv_weights[g])
            d_bn_w[g] = _cast(grads.bn_weight, bn_weights[g])
            d_bn_b[g] = _cast(grads.bn_bias, bn_weights[g])
            pooled_grads.append(PooledGrad(axis, grads.pooled, argmaxes[g]))
        if need_pooled:
            add_weight_grads(stage.weight, pooled_grads)
            terms.append((stage.weight, pooled_grads))
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x)
        prims.input_grad([(_weight_value(w, gates), up) for w, up in terms], grad_x.view(v.shape))
    return grad_x, d_conv, d_bn_w, d_bn_b
