"""The primitive contract in plain PyTorch.

Readable rather than fast: it materialises full-size tensors freely. It is the
oracle the fused backends' primitives are tested against, and it produces the
fake (meta) outputs of the fused ops under ``torch.compile``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import (
    AXIS_DIM,
    BN_BATCH,
    BN_NONE,
    BN_RUNNING,
    GATE_CONV_AXES,
    GateForward,
    GateGrads,
    GateValue,
    Upstream,
    WeightValue,
    acc_dtype,
)


def _perm(axis: str) -> tuple[int, ...]:
    """v's dims -> (N, pooled axis, D1, D2, D3)."""
    return (0, AXIS_DIM[axis], *(AXIS_DIM[a] for a in GATE_CONV_AXES[axis]))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def to_gate_layout(t: torch.Tensor, axis: str) -> torch.Tensor:
    """A v-shaped tensor as (N, L, D1, D2, D3), L the length of ``axis``."""
    return t.permute(_perm(axis))


def from_gate_layout(t: torch.Tensor, axis: str) -> torch.Tensor:
    """(N, L, D1, D2, D3) back to v's dim order (L may be 1, to broadcast)."""
    return t.permute(_inverse(_perm(axis)))


def gate_values(gate: GateValue) -> torch.Tensor:
    """The gate in (0, 1), broadcastable to v."""
    a, b = gate.scale_shift.unbind()
    return from_gate_layout(torch.sigmoid(a * gate.z + b).unsqueeze(1), gate.axis)


def factor_values(factor: tuple[GateValue, ...]) -> torch.Tensor:
    values = [gate_values(g) for g in factor]
    return values[0] if len(values) == 1 else sum(values) / len(values)


def weight_values(weight: WeightValue) -> torch.Tensor | float:
    if not weight.factors:
        return 1.0
    values = [factor_values(f) for f in weight.factors]
    total = values[0]
    for value in values[1:]:
        total = total * value if weight.combine == "prod" else total + value
    return total if weight.combine == "prod" else total / len(values)


def factor_partials(weight: WeightValue) -> list[torch.Tensor | float]:
    """d weight / d factor_i for each factor."""
    n = len(weight.factors)
    if weight.combine == "mean":
        return [1.0 / n] * n
    values = [factor_values(f) for f in weight.factors]
    partials = []
    for i in range(n):
        others = [values[j] for j in range(n) if j != i]
        partials.append(others[0] if others else 1.0)
    return partials


def upstream_values(upstream: Upstream, v: torch.Tensor) -> torch.Tensor:
    """The full-size gradient that ``upstream`` stands for."""
    if isinstance(upstream, torch.Tensor):
        return upstream.to(acc_dtype(v.dtype))
    total = torch.zeros(v.shape, dtype=acc_dtype(v.dtype), device=v.device)
    for item in upstream:
        grad = to_gate_layout(total, item.axis)
        length = grad.shape[1]
        grad += item.grad[:, 1:2] / length                                  # mean: spread evenly
        grad.scatter_add_(1, item.argmax.long().unsqueeze(1), item.grad[:, 0:1])  # max: to argmax
    return total


def _fold_bn(bn_mode, z, bn_weight, bn_bias, running_mean, running_var, eps):
    if bn_mode == BN_NONE:
        return torch.stack([z.new_ones(()), z.new_zeros(())]), z.new_zeros(2)
    if bn_mode == BN_BATCH:
        mean, var = z.mean(), z.var(unbiased=False)
    elif bn_mode == BN_RUNNING:
        mean, var = running_mean.to(z.dtype).reshape(()), running_var.to(z.dtype).reshape(())
    else:
        raise ValueError(f"unknown BN mode {bn_mode}")
    return fold_bn_with(z, bn_weight, bn_bias, mean, var, eps)


def fold_bn_with(z, bn_weight, bn_bias, mean, var, eps):
    """(scale, shift) of BN normalising ``z`` with ``mean`` and ``var``, and (mean, var)."""
    acc = z.dtype
    gamma = bn_weight.to(acc).reshape(()) if bn_weight is not None else z.new_ones(())
    beta = bn_bias.to(acc).reshape(()) if bn_bias is not None else z.new_zeros(())
    scale = gamma * torch.rsqrt(var + eps)
    return torch.stack([scale, beta - mean * scale]), torch.stack([mean, var])


def conv_backward(pooled, conv_weight, dz, need_pooled: bool, need_conv: bool):
    """(d loss / d pooled, d loss / d conv weight) of a gate's conv, given d loss / d z."""
    dz = dz.unsqueeze(1)
    w = conv_weight.to(dz.dtype)
    d_pooled = torch.nn.grad.conv3d_input(pooled.shape, w, dz, padding=1) if need_pooled else None
    d_conv = torch.nn.grad.conv3d_weight(pooled, w.shape, dz, padding=1) if need_conv else None
    return d_pooled, d_conv


class TorchPrimitives:
    name = "torch"

    def pool(self, v, weight, axes):
        y = weight_values(weight) * v.to(acc_dtype(v.dtype))
        result = []
        for axis in axes:
            p = to_gate_layout(y, axis)
            mx, idx = p.max(dim=1)
            result.append((torch.stack([mx, p.mean(dim=1)], dim=1).contiguous(), idx.to(torch.int32)))
        return result

    def gate_forward(self, pooled, conv_weight, bn_mode, bn_weight, bn_bias, running_mean, running_var, eps):
        z = F.conv3d(pooled, conv_weight.to(pooled.dtype), padding=1)[:, 0]
        scale_shift, stats = _fold_bn(bn_mode, z, bn_weight, bn_bias, running_mean, running_var, eps)
        return GateForward(z.contiguous(), scale_shift, stats)

    def apply(self, v, weight, out):
        out.copy_(weight_values(weight) * v.to(acc_dtype(v.dtype)))

    def weight_grad(self, v, upstream, weight):
        uv = upstream_values(upstream, v) * v.to(acc_dtype(v.dtype))
        grads = []
        for factor, partial in zip(weight.factors, factor_partials(weight)):
            q = uv * partial / len(factor)  # an ST factor is the mean of its three gates
            grads.append([to_gate_layout(q, g.axis).sum(dim=1).contiguous() for g in factor])
        return grads

    def gate_backward(self, gate_grad, pooled, gate, bn_stats, conv_weight, bn_mode, bn_weight, eps, needs):
        z = gate.z
        a, b = gate.scale_shift.unbind()
        g = torch.sigmoid(a * z + b)
        dy = gate_grad * g * (1 - g)  # d loss / d (BN output)
        dbn_w = dbn_b = None
        if bn_mode == BN_NONE:
            dz = dy
        else:
            mean, var = bn_stats.unbind()
            rstd = torch.rsqrt(var + eps)
            zhat = (z - mean) * rstd
            gamma = bn_weight.to(z.dtype).reshape(()) if bn_weight is not None else z.new_ones(())
            dzhat = dy * gamma
            if bn_mode == BN_BATCH:  # mean and var depend on z too
                dz = rstd * (dzhat - dzhat.mean() - zhat * (dzhat * zhat).mean())
            else:
                dz = dzhat * rstd
            dbn_w = (dy * zhat).sum().reshape(1) if needs[2] else None
            dbn_b = dy.sum().reshape(1) if needs[3] else None
        d_pooled, d_conv = conv_backward(pooled, conv_weight, dz, needs[0], needs[1])
        return GateGrads(d_pooled, d_conv, dbn_w, dbn_b)

    def input_grad(self, terms, out):
        v_like = out
        total = 0.0
        for weight, upstream in terms:
            total = total + weight_values(weight) * upstream_values(upstream, v_like)
        out.copy_(total)
