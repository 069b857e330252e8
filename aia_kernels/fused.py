"""The generic fused forward and backward of any AIA variant, as torch.library ops.

One executor serves every variant and every backend: it walks the variant's
:class:`~aia_kernels.plan.Plan` and calls the backend's primitives
(``aia_kernels.primitives``). Only ``out`` (forward) and ``grad_x`` (backward)
are full-size; what the backward needs is kept as small tensors per gate
(pooled P, argmax, conv output z, folded BN scale/shift) and the input itself.

Ops: ``aia_kernels::fused_forward`` and ``aia_kernels::fused_backward``, with fake
kernels (the plain-torch primitives on fake tensors) and autograd registered, so
``torch.compile(fullgraph=True)`` traces modules that use them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import backends
from .plan import Plan, Weight, build_plan
from .primitives import BN_BATCH, BN_NONE, BN_RUNNING, GateValue, PooledGrad, WeightValue, gate_shape
from .primitives.torch_impl import TorchPrimitives

SAVED_PER_GATE = 4  # pooled P, argmax, z, scale_shift


def _weight_value(weight: Weight, gates: list[GateValue]) -> WeightValue:
    return WeightValue(tuple(tuple(gates[i] for i in f) for f in weight.factors), weight.combine)


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """Parameter gradients in the parameter's dtype, whatever the accumulation dtype."""
    return grad if grad is None or like is None else grad.to(like.dtype)


def _view5(x: Tensor, num_segments: int) -> Tensor:
    nt, c, h, w = x.shape
    return x.view(nt // num_segments, num_segments, c, h, w)


def _check_batch_stats(plan: Plan, v_shape, bn_modes) -> None:
    """BatchNorm in train mode needs more than one value per channel (as nn.BatchNorm3d)."""
    for g, axis in enumerate(plan.gate_axes):
        shape = gate_shape(v_shape, axis)
        if bn_modes[g] == BN_BATCH and math.prod(shape) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training the {axis} gate's "
                             f"BatchNorm (its input has shape {(shape[0], 1, *shape[1:])})")


def run_forward(prims, plan: Plan, x: Tensor, num_segments: int, conv_weights, bn_weights, bn_biases,
                running_means, running_vars, bn_modes, eps):
    """Returns ``(out, saved, bn_stats)``: ``saved`` holds SAVED_PER_GATE small tensors per
    gate; ``bn_stats`` (gates, 2) the mean and variance that normalised each gate's z
    (batch statistics, biased, in train mode; running statistics in eval mode).

    A backend whose primitives offer ``forward_plan`` (the native one) runs the whole
    plan in one call instead; it walks the stages in the same order."""
    v = _view5(x, num_segments)
    _check_batch_stats(plan, v.shape, bn_modes)
    if hasattr(prims, "forward_plan"):
        return prims.forward_plan(plan, x, num_segments, conv_weights, bn_weights, bn_biases, running_means,
                                  running_vars, bn_modes, eps)
    n_gates = len(plan.gate_axes)
    gates: list[GateValue | None] = [None] * n_gates
    saved: list[Tensor | None] = [None] * (SAVED_PER_GATE * n_gates)
    stats: list[Tensor | None] = [None] * n_gates
    for stage in plan.stages:
        pooled = prims.pool(v, _weight_value(stage.weight, gates), stage.axes)
        for axis, g, (p, argmax) in zip(stage.axes, stage.gates, pooled):
            fw = prims.gate_forward(p, conv_weights[g], bn_modes[g], bn_weights[g], bn_biases[g],
                                    running_means[g], running_vars[g], eps[g])
            gates[g] = GateValue(axis, fw.z, fw.scale_shift)
            saved[SAVED_PER_GATE * g:SAVED_PER_GATE * (g + 1)] = [p, argmax, fw.z, fw.scale_shift]
            stats[g] = fw.bn_stats
    out = torch.empty_like(x)
    prims.apply(v, _weight_value(plan.output, gates), out.view(v.shape))
    return out, saved, torch.stack(stats)


def run_backward(prims, plan: Plan, grad_out: Tensor, x: Tensor, num_segments: int, conv_weights,
                 bn_weights, bn_modes, eps, saved, bn_stats, needs):
    """``needs`` = [x] + [conv weight] * G + [bn weight] * G + [bn bias] * G; a backend's
    ``backward_plan`` replaces the walk below, as ``forward_plan`` does in run_forward."""
    if hasattr(prims, "backward_plan"):
        return prims.backward_plan(plan, grad_out, x, num_segments, conv_weights, bn_weights, bn_modes, eps, saved,
                                   bn_stats, needs)
    v = _view5(x, num_segments)
    dout = _view5(grad_out, num_segments)
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
            grads = prims.gate_backward(gate_grads[g], pooled[g], gates[g], bn_stats[g], conv_weights[g], bn_modes[g],
                                        bn_weights[g], eps[g],
                                        (need_pooled, need_conv[g], need_bn_w[g], need_bn_b[g]))
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


def _primitives(backend: str, device: torch.device):
    return backends.get(backend, device).primitives


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Ops cannot return None in a list: an empty tensor stands for 'not computed'."""
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("aia_kernels::fused_forward", mutates_args=())
def fused_forward_op(x: Tensor, variant: str, num_segments: int, backend: str, conv_weights: list[Tensor],
                     bn_weights: list[Optional[Tensor]], bn_biases: list[Optional[Tensor]],
                     running_means: list[Optional[Tensor]], running_vars: list[Optional[Tensor]],
                     bn_modes: list[int], eps: list[float]) -> tuple[Tensor, list[Tensor], Tensor]:
    with torch.autocast(x.device.type, enabled=False):  # the kernels pick their own precision
        return run_forward(_primitives(backend, x.device), build_plan(variant), x, num_segments, conv_weights,
                           bn_weights, bn_biases, running_means, running_vars, bn_modes, eps)


@fused_forward_op.register_fake
def _(x, variant, num_segments, backend, conv_weights, bn_weights, bn_biases, running_means, running_vars,
      bn_modes, eps):
    return run_forward(TorchPrimitives(), build_plan(variant), x, num_segments, conv_weights, bn_weights,
                       bn_biases, running_means, running_vars, bn_modes, eps)


@torch.library.custom_op("aia_kernels::fused_backward", mutates_args=())
def fused_backward_op(grad_out: Tensor, x: Tensor, variant: str, num_segments: int, backend: str,
                      conv_weights: list[Tensor], bn_weights: list[Optional[Tensor]], bn_modes: list[int], eps: list[float], saved: list[Tensor], bn_stats: Tensor,
                      needs: list[bool]) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    with torch.autocast(x.device.type, enabled=False):
        return _backward_impl(_primitives(backend, x.device), grad_out, x, variant, num_segments, conv_weights,
                              bn_weights, bn_modes, eps, saved, bn_stats, needs)


def _backward_impl(prims, grad_out, x, variant, num_segments, conv_weights, bn_weights, bn_modes, eps, saved,
                   bn_stats, needs):
    gx, d_conv, d_bn_w, d_bn_b = run_backward(prims, build_plan(variant), grad_out, x, num_segments, conv_weights,
                                              bn_weights, bn_modes, eps, saved, bn_stats, needs)
    return (_or_empty(gx, x), [_or_empty(t, x) for t in d_conv],
            [_or_empty(t, x) for t in d_bn_w], [_or_empty(t, x) for t in d_bn_b])


@fused_backward_op.register_fake
def _(grad_out, x, variant, num_segments, backend, conv_weights, bn_weights, bn_modes, eps, saved, bn_stats,
      needs):
    return _backward_impl(TorchPrimitives(), grad_out, x, variant, num_segments, conv_weights, bn_weights,
                          bn_modes, eps, saved, bn_stats, needs)


def _setup_context(ctx, inputs, output):
    x, variant, num_segments, backend, conv_weights, bn_weights, bn_biases, running_means, running_vars, \
        bn_modes, eps = inputs
    _, saved, bn_stats = output
    n = len(conv_weights)
    ctx.meta = (variant, num_segments, backend, bn_modes, eps, n)
    # torch.library treats a list input holding only None as one leaf; its gradient must be None too.
    ctx.list_is_leaf = [all(t is None for t in ts) for ts in (bn_weights, bn_biases, running_means, running_vars)]
    ctx.needs = ([x.requires_grad] + [w.requires_grad for w in conv_weights]
                 + [w is not None and w.requires_grad for w in bn_weights]
                 + [b is not None and b.requires_grad for b in bn_biases])
    ctx.save_for_backward(x, bn_stats, *conv_weights, *bn_weights, *saved)
    # Only `out` is differentiable: no zero gradients made for `saved` and `bn_stats`.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_saved, grad_stats):
    variant, num_segments, backend, bn_modes, eps, n = ctx.meta
    x, bn_stats, *rest = ctx.saved_tensors
    if grad_out is None:  # only saved/bn_stats reached the loss (not differentiable): zero flows back
        grad_out = torch.zeros_like(x)
    conv_weights, bn_weights, saved = rest[:n], rest[n:2 * n], rest[2 * n:]
    gx, d_conv, d_bn_w, d_bn_b = fused_backward_op(grad_out, x, variant, num_segments, backend, list(conv_weights),
                                                   list(bn_weights), bn_modes, eps, list(saved), bn_stats,
                                                   ctx.needs)
    needs = ctx.needs

    def pick(grads, flags, is_leaf=False):
        return None if is_leaf else [grad if flag else None for grad, flag in zip(grads, flags)]

    leaf_w, leaf_b, leaf_rm, leaf_rv = ctx.list_is_leaf
    return (gx if needs[0] else None, None, None, None, pick(d_conv, needs[1:1 + n]),
            pick(d_bn_w, needs[1 + n:1 + 2 * n], leaf_w), pick(d_bn_b, needs[1 + 2 * n:], leaf_b),
            pick([None] * n, [False] * n, leaf_rm), pick([None] * n, [False] * n, leaf_rv), None, None)


fused_forward_op.register_autograd(_backward, setup_context=_setup_context)


def bn_mode(bn: nn.BatchNorm3d | None) -> int:
    """How a BN layer normalises now, as ``nn.BatchNorm3d.forward`` decides it."""
    if bn is None:
        return BN_NONE
    if bn.training or bn.running_mean is None:
        return BN_BATCH
    return BN_RUNNING


def _update_running_stats(bn: nn.BatchNorm3d, stats: Tensor, count: int) -> None:
    """What ``nn.BatchNorm3d`` does to its buffers in a training step."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        # momentum=None: cumulative average; the factor in the buffers' dtype (1 / int64 tensor is float32)
        factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype) if bn.momentum is None else bn.momentum
        mean, var = stats[0], stats[1] * (count / (count - 1))  # running var is unbiased
        bn.running_mean.mul_(1 - factor).add_(factor * mean.to(bn.running_mean.dtype))
        bn.running_var.mul_(1 - factor).add_(factor * var.to(bn.running_var.dtype))


def _update_all_running_stats(bns: list, stats: Tensor, counts: list[int]) -> None:
    """:func:`_update_running_stats` for every gate BN that tracks statistics in this step;
    those with a fixed momentum and float32 buffers (the usual case) in a few foreach ops,
    since a step's many tiny per-BN ops cost more than they compute."""
    todo = [i for i, bn in enumerate(bns)
            if bn is not None and bn.training and bn.track_running_stats and bn.running_mean is not None]
    batched = [i for i in todo if bns[i].momentum is not None and bns[i].running_mean.dtype == torch.float32]
    for i in todo:
        if i not in batched:
            _update_running_stats(bns[i], stats[i], counts[i])
    if not batched:
        return
    with torch.no_grad():
        torch._foreach_add_([bns[i].num_batches_tracked for i in batched], 1)
        keep = [1 - bns[i].momentum for i in batched]
        # running var is unbiased: var * count / (count - 1)
        scale = stats.new_tensor([[bns[i].momentum, bns[i].momentum * counts[i] / (counts[i] - 1)] for i in batched])
        new = (stats[batched] * scale).to(torch.float32)
        for buffers, column in (("running_mean", 0), ("running_var", 1)):
            tensors = [getattr(bns[i], buffers) for i in batched]
            torch._foreach_mul_(tensors, keep)
            torch._foreach_add_(tensors, list(new[:, column:column + 1].unbind(0)))


class _EagerFused(torch.autograd.Function):
    """The fused forward/backward for eager autograd, without torch.library's Python
    autograd wrapper (it flattens every list argument and output with pytree: about half
    of a step's Python overhead at 7x7). Same computation as the custom ops
    (``run_forward``/``run_backward``); under torch.compile the ops are used."""

    @staticmethod
    def forward(ctx, meta, x, *params):
        variant, num_segments, backend, running_means, running_vars, bn_modes, eps = meta
        n = len(bn_modes)
        conv_weights, bn_weights, bn_biases = list(params[:n]), list(params[n:2 * n]), list(params[2 * n:])
        with torch.autocast(x.device.type, enabled=False):
            out, saved, bn_stats = run_forward(_primitives(backend, x.device), build_plan(variant), x, num_segments,
                                               conv_weights, bn_weights, bn_biases, running_means, running_vars,
                                               bn_modes, eps)
        ctx.meta = meta
        ctx.needs = [x.requires_grad] + [p is not None and p.requires_grad for p in params]
        ctx.save_for_backward(x, bn_stats, *conv_weights, *bn_weights, *saved)
        ctx.mark_non_differentiable(bn_stats)
        return out, bn_stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats):
        variant, num_segments, backend, _, _, bn_modes, eps = ctx.meta
        n = len(bn_modes)
        x, bn_stats, *rest = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            gx, d_conv, d_bn_w, d_bn_b = run_backward(
                _primitives(backend, x.device), build_plan(variant), grad_out, x, num_segments, list(rest[:n]),
                list(rest[n:2 * n]), bn_modes, eps, list(rest[2 * n:]), bn_stats, ctx.needs)
        grads = [gx, *d_conv, *d_bn_w, *d_bn_b]
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs)))


def fused_forward(module, x: Tensor, backend: str) -> Tensor:
    """Forward of an AIA module with a fused backend (called by ``AIAModule.forward``)."""
    gates = module.gates()
    bns = [bn for _, _, bn in gates]
    conv_weights = [conv.weight for _, conv, _ in gates]
    bn_weights = [bn.weight if bn is not None else None for bn in bns]
    bn_biases = [bn.bias if bn is not None else None for bn in bns]
    running_means = [bn.running_mean if bn is not None else None for bn in bns]
    running_vars = [bn.running_var if bn is not None else None for bn in bns]
    bn_modes = [bn_mode(bn) for bn in bns]
    eps = [bn.eps if bn is not None else 0.0 for bn in bns]
    if torch.compiler.is_compiling():  # the custom op: traceable, with fake kernels
        out, _, bn_stats = torch.ops.aia_kernels.fused_forward(
            x, module.variant, module.num_segments, backend, conv_weights, bn_weights, bn_biases, running_means,
            running_vars, bn_modes, eps)
    else:
        meta = (module.variant, module.num_segments, backend, running_means, running_vars, bn_modes, eps)
        out, bn_stats = _EagerFused.apply(meta, x, *conv_weights, *bn_weights, *bn_biases)
    v_shape = (x.shape[0] // module.num_segments, module.num_segments, *x.shape[1:])
    _update_all_running_stats(bns, bn_stats, [math.prod(gate_shape(v_shape, axis)) for axis, _, _ in gates])
    return out
