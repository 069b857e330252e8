"""The fused forward and backward of an AIA module: torch.library ops and autograd.

Ops: ``aia_kernels::fused_forward`` and ``aia_kernels::fused_backward`` run the plan
executor (``executor.py``) on a backend's primitives, with fake kernels (the plain-torch
primitives on fake tensors) and autograd registered, so ``torch.compile(fullgraph=True)``
traces modules that use them. In eager mode :class:`_EagerFused` runs the same executor
with less Python per call (docs/design.md, "The executor", measures both paths).
:func:`fused_forward`, called by ``AIAModule.forward``, picks the path and then updates
the BN running statistics (``running_stats.py``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .executor import run_backward, run_forward
from .layouts import clip_segments, clip_shape
from .module_tensors import registered
from .plan import build_plan, for_inference
from .primitives import gate_sizes
from .primitives.torch_impl import TorchPrimitives
from .running_stats import bn_mode, tracks_running_stats, update_running_stats
from .sync_bn import gate_sync


def _primitives(backend: str, device: torch.device):
    return backends.get(backend, device).primitives


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Ops cannot return None in a list: an empty tensor stands for 'not computed'."""
    return like.new_empty(0) if t is None else t


def autocast_off(device_type: str):
    """Autocast off inside the ops (the kernels pick their own precision); no context where it
    is off already (entering one costs several us, twice a step)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


@torch.library.custom_op("aia_kernels::fused_forward", mutates_args=())
def fused_forward_op(x: Tensor, variant: str, num_segments: int, backend: str, conv_weights: list[Tensor],
                     bn_weights: list[Optional[Tensor]], bn_biases: list[Optional[Tensor]],
                     running_means: list[Optional[Tensor]], running_vars: list[Optional[Tensor]],
                     bn_modes: list[int], eps: list[float],
                     recompute: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    with autocast_off(x.device.type):
        return run_forward(_primitives(backend, x.device), build_plan(variant, recompute), x, num_segments,
                           conv_weights, bn_weights, bn_biases, running_means, running_vars, bn_modes, eps)


@fused_forward_op.register_fake
def _(x, variant, num_segments, backend, conv_weights, bn_weights, bn_biases, running_means, running_vars,
      bn_modes, eps, recompute):
    return run_forward(TorchPrimitives(), build_plan(variant, recompute), x, num_segments, conv_weights, bn_weights,
                       bn_biases, running_means, running_vars, bn_modes, eps)


@torch.library.custom_op("aia_kernels::fused_backward", mutates_args=())
def fused_backward_op(grad_out: Tensor, x: Tensor, variant: str, num_segments: int, backend: str,
                      conv_weights: list[Tensor], bn_weights: list[Optional[Tensor]], bn_modes: list[int],
                      eps: list[float], saved: list[Tensor], bn_stats: Tensor, needs: list[bool],
                      recompute: bool) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    with autocast_off(x.device.type):
        return _backward_impl(_primitives(backend, x.device), grad_out, x, variant, num_segments, conv_weights,
                              bn_weights, bn_modes, eps, saved, bn_stats, needs, recompute)


def _backward_impl(prims, grad_out, x, variant, num_segments, conv_weights, bn_weights, bn_modes, eps, saved,
                   bn_stats, needs, recompute):
    gx, d_conv, d_bn_w, d_bn_b = run_backward(prims, build_plan(variant, recompute), grad_out, x, num_segments,
                                              conv_weights, bn_weights, bn_modes, eps, saved, bn_stats, needs)
    return (_or_empty(gx, x), [_or_empty(t, x) for t in d_conv],
            [_or_empty(t, x) for t in d_bn_w], [_or_empty(t, x) for t in d_bn_b])


@fused_backward_op.register_fake
def _(grad_out, x, variant, num_segments, backend, conv_weights, bn_weights, bn_modes, eps, saved, bn_stats,
      needs, recompute):
    return _backward_impl(TorchPrimitives(), grad_out, x, variant, num_segments, conv_weights, bn_weights,
                          bn_modes, eps, saved, bn_stats, needs, recompute)


def _setup_context(ctx, inputs, output):
    x, variant, num_segments, backend, conv_weights, bn_weights, bn_biases, running_means, running_vars, \
        bn_modes, eps, recompute = inputs
    _, saved, bn_stats = output
    n = len(conv_weights)
    ctx.meta = (variant, num_segments, backend, bn_modes, eps, n, recompute)
    # torch.library treats a list input holding only None as one leaf; its gradient must be None too.
    ctx.list_is_leaf = [all(t is None for t in ts) for ts in (bn_weights, bn_biases, running_means, running_vars)]
    ctx.needs = ([x.requires_grad] + [w.requires_grad for w in conv_weights]
                 + [w is not None and w.requires_grad for w in bn_weights]
                 + [b is not None and b.requires_grad for b in bn_biases])
    ctx.save_for_backward(x, bn_stats, *conv_weights, *bn_weights, *saved)
    # Only `out` is differentiable: no zero gradients made for `saved` and `bn_stats`.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_saved, grad_stats):
    variant, num_segments, backend, bn_modes, eps, n, recompute = ctx.meta
    x, bn_stats, *rest = ctx.saved_tensors
    if grad_out is None:  # only saved/bn_stats reached the loss (not differentiable): zero flows back
        grad_out = torch.zeros_like(x)
    conv_weights, bn_weights, saved = rest[:n], rest[n:2 * n], rest[2 * n:]
    gx, d_conv, d_bn_w, d_bn_b = fused_backward_op(grad_out, x, variant, num_segments, backend, list(conv_weights),
                                                   list(bn_weights), bn_modes, eps, list(saved), bn_stats,
                                                   ctx.needs, recompute)
    needs = ctx.needs

    def pick(grads, flags, is_leaf=False):
        return None if is_leaf else [grad if flag else None for grad, flag in zip(grads, flags)]

    leaf_w, leaf_b, leaf_rm, leaf_rv = ctx.list_is_leaf
    return (gx if needs[0] else None, None, None, None, pick(d_conv, needs[1:1 + n]),
            pick(d_bn_w, needs[1 + n:1 + 2 * n], leaf_w), pick(d_bn_b, needs[1 + 2 * n:], leaf_b),
            pick([None] * n, [False] * n, leaf_rm), pick([None] * n, [False] * n, leaf_rv), None, None,
            None)


fused_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(meta, x, params):
    """run_forward for :class:`_EagerFused` (and for inference, which needs no autograd node):
    ``meta`` as that class takes it, ``params`` the conv weights, BN weights, BN biases."""
    variant, num_segments, backend, running_means, running_vars, bn_modes, eps, sync, recompute, inference = meta
    n = len(bn_modes)
    conv_weights, bn_weights, bn_biases = list(params[:n]), list(params[n:2 * n]), list(params[2 * n:])
    plan = for_inference(variant) if inference else build_plan(variant, recompute)
    with autocast_off(x.device.type):
        return run_forward(_primitives(backend, x.device), plan, x, num_segments, conv_weights, bn_weights,
                           bn_biases, running_means, running_vars, bn_modes, eps, sync)


class _EagerFused(torch.autograd.Function):
    """The fused forward/backward for eager autograd, without torch.library's Python
    autograd wrapper (it flattens every list argument and output with pytree: half of the
    Python and autograd time of a library-op train step at 7x7, measured in
    benchmarks/results/autograd_paths_20261130_8x512x7x7_t1.md). Same computation as the
    custom ops (``run_forward``/``run_backward``); under torch.compile the ops are used."""

    @staticmethod
    def forward(ctx, meta, x, *params):
        out, saved, bn_stats = _eager_forward(meta, x, params)
        n = len(meta[5])  # bn_modes: one per gate
        conv_weights, bn_weights = params[:n], params[n:2 * n]
        ctx.meta = meta
        ctx.needs = [x.requires_grad] + [p is not None and p.requires_grad for p in params]
        ctx.save_for_backward(x, bn_stats, *conv_weights, *bn_weights, *saved)
        ctx.mark_non_differentiable(bn_stats)
        return out, bn_stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats):
        variant, num_segments, backend, _, _, bn_modes, eps, sync, recompute, _ = ctx.meta
        n = len(bn_modes)
        x, bn_stats, *rest = ctx.saved_tensors
        with autocast_off(x.device.type):
            gx, d_conv, d_bn_w, d_bn_b = run_backward(
                _primitives(backend, x.device), build_plan(variant, recompute), grad_out, x, num_segments,
                list(rest[:n]), list(rest[n:2 * n]), bn_modes, eps, list(rest[2 * n:]), bn_stats, ctx.needs, sync)
        grads = [gx, *d_conv, *d_bn_w, *d_bn_b]
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs)))


def op_arguments(gates) -> tuple[list, ...]:
    """The fused ops' per-gate arguments for an AIA module's ``gates()``: (conv weights, BN
    weights, BN biases, running means, running variances, BN modes, eps)."""
    bns = [bn for _, _, bn in gates]

    def of_bns(name):
        return [None if bn is None else registered(bn, name) for bn in bns]

    return ([registered(conv, "weight") for _, conv, _ in gates], of_bns("weight"), of_bns("bias"),
            of_bns("running_mean"), of_bns("running_var"), [bn_mode(bn) for bn in bns],
            [bn.eps if bn is not None else 0.0 for bn in bns])


def forward_with_library_op(module, x: Tensor, backend: str, args) -> tuple[Tensor, Tensor]:
    """(out, bn_stats) through ``aia_kernels::fused_forward`` and its registered autograd;
    ``args``: :func:`op_arguments`."""
    out, _, bn_stats = torch.ops.aia_kernels.fused_forward(x, module.variant, clip_segments(x, module.num_segments),
                                                           backend, *args, module.recompute)
    return out, bn_stats


def forward_with_autograd_function(module, x: Tensor, backend: str, args, sync=None) -> tuple[Tensor, Tensor]:
    """(out, bn_stats) through :class:`_EagerFused`: the same executor, less Python per call;
    ``sync``: :class:`sync_bn.GateStatsSync` where gate BNs sync across ranks."""
    conv_weights, bn_weights, bn_biases, running_means, running_vars, bn_modes, eps = args
    # No backward can follow: the inference plan (nothing kept, no max positions tracked).
    inference = not (torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in (*conv_weights, *bn_weights, *bn_biases))))
    meta = (module.variant, clip_segments(x, module.num_segments), backend, running_means, running_vars, bn_modes,
            eps, sync, module.recompute, inference)
    if inference:  # no autograd node to build (Function.apply costs tens of us a call)
        out, _, bn_stats = _eager_forward(meta, x, (*conv_weights, *bn_weights, *bn_biases))
        return out, bn_stats
    return _EagerFused.apply(meta, x, *conv_weights, *bn_weights, *bn_biases)


# The eager path (docs/design.md, "The executor"); benchmarks/autograd_paths.py swaps in the library op to time both.
EAGER_FORWARD = forward_with_autograd_function


def fused_forward(module, x: Tensor, backend: str) -> Tensor:
    """Forward of an AIA module with a fused backend (called by ``AIAModule.forward``) on
    ``x``, (N*T, C, H, W) or the (N, T, C, H, W) view of a 5-D input (``layouts.py``):
    the library op under torch.compile (traceable, with fake kernels), else
    ``EAGER_FORWARD``; then the BN running statistics. Gate BNs that sync across ranks
    (``sync_bn.py``) take the autograd Function, in eager mode only (AIAModule.forward
    runs the reference path for them under torch.compile)."""
    gates = module.gates()
    bns = [bn for _, _, bn in gates]
    args = op_arguments(gates)
    sync = gate_sync(bns)
    if sync is not None:
        out, bn_stats = forward_with_autograd_function(module, x, backend, args, sync)
    else:
        forward = forward_with_library_op if torch.compiler.is_compiling() else EAGER_FORWARD
        out, bn_stats = forward(module, x, backend, args)
    if any(map(tracks_running_stats, bns)):
        v_shape = clip_shape(x.shape, clip_segments(x, module.num_segments))
        counts = list(gate_sizes(v_shape, [axis for axis, _, _ in gates]))
        if sync is not None:
            counts = [sync.counts.get(g, count) for g, count in enumerate(counts)]  # the global batch's
        update_running_stats(bns, bn_stats, counts)
    return out
