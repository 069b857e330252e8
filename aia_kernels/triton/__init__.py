"""The fused Triton backend: the six primitives of ``aia_kernels.primitives`` as
Triton kernels: ``backend="triton"`` (``aia_kernels/backends.py`` imports this module
on first use and reads ``primitives`` and ``unavailable_reason``).

Files: ``weights.py`` (jit helpers: gate/factor/weight values and expanded pooled
gradients at a tile), ``reduce_channels.py`` and ``reduce_spatiotemporal.py``
(``pool`` and ``weight_grad``: one kernel per reduced axis set, parameterised by
what it reduces), ``elementwise.py`` (``apply`` and ``input_grad``), ``gate.py``
(conv 2->1 forward/backward and BN fold), ``tiles.py`` (block shapes and num_warps:
the tuned table, else heuristics). This
module holds the host wrappers: they allocate outputs and launch, nothing else.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..primitives import BN_BATCH, BN_NONE, GateForward, GateGrads, PooledGrad, WeightValue, acc_dtype
from . import tiles
from .elementwise import TERM_CODE_BITS, term_code, weighted_sum_kernel
from .gate import bn_backward_kernel, bn_fold_kernel, conv_backward_kernel, conv_forward_kernel
from .reduce_channels import channel_reduce_kernel
from .reduce_spatiotemporal import spatiotemporal_reduce_kernel
from .weights import C_FACTOR, NO_EXCLUDE, NO_FACTOR, ST_FACTOR, UP_C, UP_FULL, UP_THW

GATE_BLOCK = 256  # positions per program in the small gate kernels


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


class _Dummies:
    """Placeholders for unused pointer arguments (never read)."""

    def __init__(self, device, acc):
        self.float = torch.empty(1, dtype=acc, device=device)
        self.int = torch.empty(1, dtype=torch.int32, device=device)


def _weight_args(weight: WeightValue, dummy: _Dummies) -> tuple[list, dict]:
    """Six z pointers, six scale_shift pointers (three slots per factor) and the constexprs."""
    if len(weight.factors) > 2:
        raise ValueError("a weight has at most two factors")
    zs, ss, kinds = [], [], []
    for f in range(2):
        gates = weight.factors[f] if f < len(weight.factors) else ()
        axes = "".join(g.axis for g in gates)
        if axes not in ("", "C", "THW"):
            raise ValueError(f"a factor is one C gate or the T, H, W gates, got {axes!r}")
        kinds.append({"": NO_FACTOR, "C": C_FACTOR, "THW": ST_FACTOR}[axes])
        slots = list(gates) + [None] * (3 - len(gates))
        zs += [g.z if g is not None else dummy.float for g in slots]
        ss += [g.scale_shift if g is not None else dummy.float for g in slots]
    return zs + ss, dict(F0=kinds[0], F1=kinds[1], MEAN=weight.combine == "mean")


def _upstream_args(upstream, dummy: _Dummies) -> tuple[list, dict]:
    """Three grad pointers, three argmax pointers, five strides, and UP."""
    if upstream is None:
        return [dummy.float] * 3 + [dummy.int] * 3 + [0] * 5, dict(UP=UP_FULL)
    if isinstance(upstream, torch.Tensor):
        return [upstream, dummy.float, dummy.float] + [dummy.int] * 3 + list(upstream.stride()), dict(UP=UP_FULL)
    items: list[PooledGrad] = list(upstream)
    axes = "".join(item.axis for item in items)
    if axes not in ("C", "THW"):
        raise ValueError(f"pooled upstream gradients come from the C axis or from T, H, W; got {axes!r}")
    grads = [item.grad.contiguous() for item in items] + [dummy.float] * (3 - len(items))
    args = [item.argmax.contiguous() for item in items] + [dummy.int] * (3 - len(items))
    return grads + args + [0] * 5, dict(UP=UP_C if axes == "C" else UP_THW)


def _first_max_over_blocks(part: torch.Tensor, arg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-row-block H pools (B, N, 2, ...) / (B, N, ...): max with the first
    block's index on ties, means summed in block order (each block stored sum / H)."""
    maxes = part[:, :, 0]
    best = maxes.amax(0)
    first = (maxes == best).to(torch.int32).argmax(0)  # argmax returns the first maximal index
    return (torch.stack([best, part[:, :, 1].sum(0)], dim=1),
            arg.gather(0, first.unsqueeze(0)).squeeze(0))


class TritonPrimitives:
    name = "triton"

    # -- full-size passes ---------------------------------------------------------------
    def _reduce_channels(self, v, weight, upstream, pool: bool, exclude: int, both: bool = False):
        n, t, c, h, w = v.shape
        acc = acc_dtype(v.dtype)
        dummy = _Dummies(v.device, acc)
        shape = (n, 2, t, h, w) if pool else (1 + both, n, t, h, w)
        out = torch.empty(shape, dtype=acc, device=v.device)
        arg = torch.empty((n, t, h, w), dtype=torch.int32, device=v.device) if pool else dummy.int
        w_args, w_flags = _weight_args(weight, dummy)
        u_args, u_flags = _upstream_args(upstream, dummy)
        tile = tiles.channel_tile(v)
        _, block_hw = tile.blocks
        grid = (n * t, triton.cdiv(h * w, block_hw))
        channel_reduce_kernel[grid](v, *v.stride(), *w_args, *u_args, out, arg, n, t, c, h, w,
                                    EXCLUDE=exclude, POOL=pool, BOTH=both, ACC=_tl_acc(v.dtype),
                                    **tile.kwargs, **w_flags, **u_flags)
        return out, arg

    def _reduce_spatiotemporal(self, v, weight, upstream, pool: bool, exclude: int, both: bool = False):
        """[(T result, argmax), (H ...), (W ...)]; results (N, 2, ...) pooled, (K, N, ...) gradients."""
        n, t, c, h, w = v.shape
        acc = acc_dtype(v.dtype)
        dummy = _Dummies(v.device, acc)
        lead = (n, 2) if pool else (1 + both, n)
        tile = tiles.spatiotemporal_tile(v)
        block_c, block_h, _ = tile.blocks
        h_blocks = triton.cdiv(h, block_h)
        out_t = torch.empty((*lead, c, h, w), dtype=acc, device=v.device)
        out_h = torch.empty((h_blocks, *lead, t, c, w), dtype=acc, device=v.device)
        out_w = torch.empty((*lead, t, h, c), dtype=acc, device=v.device)
        arg_t, arg_h, arg_w = dummy.int, dummy.int, dummy.int
        if pool:
            arg_t = torch.empty((n, c, h, w), dtype=torch.int32, device=v.device)
            arg_h = torch.empty((h_blocks, n, t, c, w), dtype=torch.int32, device=v.device)
            arg_w = torch.empty((n, t, h, c), dtype=torch.int32, device=v.device)
        w_args, w_flags = _weight_args(weight, dummy)
        u_args, u_flags = _upstream_args(upstream, dummy)
        grid = (n, triton.cdiv(c, block_c), h_blocks)
        spatiotemporal_reduce_kernel[grid](v, *v.stride(), *w_args, *u_args, out_t, arg_t, out_h, arg_h,
                                           out_w, arg_w, n, t, c, h, w, EXCLUDE=exclude, POOL=pool, BOTH=both,
                                           ACC=_tl_acc(v.dtype), **tile.kwargs, **w_flags, **u_flags)
        if h_blocks == 1:
            out_h = out_h[0]
            arg_h = arg_h[0] if pool else arg_h
        elif pool:
            out_h, arg_h = _first_max_over_blocks(out_h, arg_h)
        else:
            out_h = out_h.sum(0)
        return [(out_t, arg_t), (out_h, arg_h), (out_w, arg_w)]

    def pool(self, v, weight, axes):
        if axes == "C":
            return [self._reduce_channels(v, weight, None, True, NO_EXCLUDE)]
        if axes == "THW":
            return self._reduce_spatiotemporal(v, weight, None, True, NO_EXCLUDE)
        raise ValueError(f"pool axes are 'C' or 'THW', got {axes!r}")

    def weight_grad(self, v, upstream, weight):
        """A C reduction for C factors, a T/H/W one for ST factors; two factors of the same
        kind share one pass (one read of v and of a full upstream)."""
        kinds = [len(f) for f in weight.factors]
        both = len(kinds) == 2 and kinds[0] == kinds[1]
        grads = []
        for i, kind in enumerate(kinds):
            if both and i == 1:
                break
            if kind == 1:
                out, _ = self._reduce_channels(v, weight, upstream, False, i, both)
                grads += [[out[k]] for k in range(out.shape[0])]
            else:
                outs = [out for out, _ in self._reduce_spatiotemporal(v, weight, upstream, False, i, both)]
                grads += [[out[k] for out in outs] for k in range(outs[0].shape[0])]
        return grads

    def _weighted_sum(self, out, terms):
        n, t, c, h, w = out.shape
        dummy = _Dummies(out.device, acc_dtype(out.dtype))
        term_args, code = [], 0
        for k, (weight, source) in enumerate(terms):
            w_args, w_flags = _weight_args(weight, dummy)
            u_args, u_flags = _upstream_args(source, dummy)
            term_args.append(tuple(w_args + u_args))
            code |= term_code(w_flags["F0"], w_flags["F1"], w_flags["MEAN"], u_flags["UP"]) << (TERM_CODE_BITS * k)
        tile = tiles.elementwise_tile(out)
        block_c, block_hw = tile.blocks
        grid = (n * t, triton.cdiv(h * w, block_hw), triton.cdiv(c, block_c))
        weighted_sum_kernel[grid](out, *out.stride(), tuple(term_args), t, c, h, w, CODE=code,
                                  NUM_TERMS=len(term_args), ACC=_tl_acc(out.dtype), **tile.kwargs)

    def apply(self, v, weight, out):
        self._weighted_sum(out, [(weight, v)])

    def input_grad(self, terms, out):
        """All terms in one pass: full-size traffic is the read of grad_out and the write of out."""
        self._weighted_sum(out, terms)

    # -- small gate tensors -------------------------------------------------------------
    def gate_forward(self, pooled, conv_weight, bn_mode, bn_weight, bn_bias, running_mean, running_var, eps):
        pooled = pooled.contiguous()
        acc = pooled.dtype
        dummy = _Dummies(pooled.device, acc)
        n, _, d1, d2, d3 = pooled.shape
        m = n * d1 * d2 * d3
        programs = triton.cdiv(m, GATE_BLOCK)
        z = torch.empty((n, d1, d2, d3), dtype=acc, device=pooled.device)
        parts = torch.empty((programs, 3), dtype=acc, device=pooled.device) if bn_mode == BN_BATCH else dummy.float
        conv_forward_kernel[(programs,)](pooled, conv_weight.contiguous(), z, parts, m, d1, d2, d3,
                                         STATS=bn_mode == BN_BATCH, ACC=_tl_acc(acc), BLOCK=GATE_BLOCK)
        scale_shift = torch.empty(2, dtype=acc, device=pooled.device)
        stats = torch.empty(2, dtype=acc, device=pooled.device)
        bn_fold_kernel[(1,)](parts, programs, bn_weight if bn_weight is not None else dummy.float,
                             bn_bias if bn_bias is not None else dummy.float,
                             running_mean if running_mean is not None else dummy.float,
                             running_var if running_var is not None else dummy.float,
                             scale_shift, stats, float(eps), MODE=bn_mode, HAS_GAMMA=bn_weight is not None,
                             HAS_BETA=bn_bias is not None, ACC=_tl_acc(acc), BLOCK=256)
        return GateForward(z, scale_shift, stats)

    def gate_backward(self, gate_grad, pooled, gate, bn_stats, conv_weight, bn_mode, bn_weight, eps, needs):
        z = gate.z
        acc = z.dtype
        dummy = _Dummies(z.device, acc)
        gate_grad = gate_grad.contiguous()
        pooled = pooled.contiguous()
        m = z.numel()
        programs = triton.cdiv(m, GATE_BLOCK)
        flags = dict(MODE=bn_mode, HAS_GAMMA=bn_weight is not None, ACC=_tl_acc(acc), BLOCK=GATE_BLOCK)
        common = (gate_grad, z, gate.scale_shift, bn_stats, bn_weight if bn_weight is not None else dummy.float)
        sums = dummy.float
        if bn_mode != BN_NONE:
            parts = torch.empty((programs, 2), dtype=acc, device=z.device)
            bn_backward_kernel[(programs,)](*common, dummy.float, parts, m, float(eps), PHASE=0, **flags)
            sums = parts.sum(0)  # (sum dy, sum dy * zhat): fixed-order, deterministic
        d_pooled = d_conv = None
        if needs[0] or needs[1]:
            dz = torch.empty_like(z)
            bn_backward_kernel[(programs,)](*common, sums, dz, m, float(eps), PHASE=1, **flags)
            d_pooled = torch.empty_like(pooled) if needs[0] else dummy.float
            d_parts = torch.empty((programs, 54), dtype=acc, device=z.device) if needs[1] else dummy.float
            _, _, d1, d2, d3 = pooled.shape
            conv_backward_kernel[(programs,)](pooled, conv_weight.contiguous(), dz, d_pooled, d_parts, m,
                                              d1, d2, d3, NEED_INPUT=needs[0], NEED_WEIGHT=needs[1],
                                              ACC=_tl_acc(acc), BLOCK=GATE_BLOCK)
            d_pooled = d_pooled if needs[0] else None
            d_conv = d_parts.sum(0).view(1, 2, 3, 3, 3) if needs[1] else None
        with_bn = bn_mode != BN_NONE
        return GateGrads(d_pooled, d_conv,
                         sums[1:2].clone() if with_bn and needs[2] else None,
                         sums[0:1].clone() if with_bn and needs[3] else None)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split(".")[:2])


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels here, else None. Before Triton 3.7
    the interpreter turns a loop bound that is a kernel argument (``range(0, C, BLOCK_C)``,
    in every reduction here) into an int by ``int()`` of a 1-element array, which NumPy 2.4
    refuses (triton-lang/triton#9171): every launch would fail with an obscure TypeError."""
    import numpy

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} "
                "(triton-lang/triton#9171, fixed in Triton 3.7): install numpy<2.4 or triton>=3.7")
    return None


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return interpreter_problem()
    return ("Triton kernels need a CUDA tensor; set TRITON_INTERPRET=1 before importing triton to run "
            "them on the CPU through Triton's interpreter")


# What the backend registry (aia_kernels/backends.py) reads from this module.
primitives = TritonPrimitives()
