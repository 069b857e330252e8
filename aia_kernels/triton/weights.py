"""@triton.jit helpers shared by every full-size kernel: the value of a gate, a
factor or a whole weight at a tile of positions, and the full-size upstream
gradient that a set of pooled gradients stands for.

Positions are broadcastable index tensors ``n, t, c, h, w`` of v = (N, T, C, H, W);
the helpers compute each small tensor's offset in its gate layout (primitives
contract: C -> (N, T, H, W), T -> (N, C, H, W), H -> (N, T, C, W), W -> (N, T, H, C)),
so no weight is ever materialised at full size.

A weight is passed to a kernel as six (z, scale_shift) pointer pairs, three slots per
factor, plus constexprs: F0/F1 the kind of each factor (NO_FACTOR, C_FACTOR: one C
gate in slot 0, ST_FACTOR: T, H, W gates in slots 0..2) and MEAN (combine). An
upstream is UP_FULL (a strided tensor) or UP_C / UP_THW (PooledGrad items: grad
pointer and argmax pointer per axis).
"""
import triton
import triton.language as tl

NO_FACTOR, C_FACTOR, ST_FACTOR = 0, 1, 2
UP_FULL, UP_C, UP_THW = 0, 1, 2
# Which factor's gradient a reduction computes (weight_grad); -1 in forward passes.
NO_EXCLUDE = -1


@triton.jit
def gate_offset(AXIS: tl.constexpr, n, t, c, h, w, T, C, H, W):
    """(offset inside one batch item's block, block size) in the gate layout of AXIS:
    0 = C, 1 = T, 2 = H, 3 = W."""
    if AXIS == 0:    # C gate: (N, T, H, W)
        rel = (t * H + h) * W + w
        size = T * H * W
    elif AXIS == 1:  # T gate: (N, C, H, W)
        rel = (c * H + h) * W + w
        size = C * H * W
    elif AXIS == 2:  # H gate: (N, T, C, W)
        rel = (t * C + c) * W + w
        size = T * C * W
    else:            # W gate: (N, T, H, C)
        rel = (t * H + h) * C + c
        size = T * H * C
    return rel, size


@triton.jit
def gate_at(z_ptr, ss_ptr, AXIS: tl.constexpr, n, t, c, h, w, T, C, H, W, mask, ACC: tl.constexpr):
    """sigmoid(a * z + b): BN (any mode) is folded into (a, b) by gate_forward."""
    rel, size = gate_offset(AXIS, n, t, c, h, w, T, C, H, W)
    z = tl.load(z_ptr + n * size + rel, mask=mask, other=0.0).to(ACC)
    a = tl.load(ss_ptr).to(ACC)
    b = tl.load(ss_ptr + 1).to(ACC)
    return 1.0 / (1.0 + tl.exp(-(a * z + b)))


@triton.jit
def factor_at(KIND: tl.constexpr, z0, s0, z1, s1, z2, s2, n, t, c, h, w, T, C, H, W, mask,
              ACC: tl.constexpr):
    """One C gate, or the mean of the T, H and W gates (Y_ST)."""
    if KIND == 1:
        value = gate_at(z0, s0, 0, n, t, c, h, w, T, C, H, W, mask, ACC)
    else:
        value = (gate_at(z0, s0, 1, n, t, c, h, w, T, C, H, W, mask, ACC)
                 + gate_at(z1, s1, 2, n, t, c, h, w, T, C, H, W, mask, ACC)
                 + gate_at(z2, s2, 3, n, t, c, h, w, T, C, H, W, mask, ACC)) / 3.0
    return value


@triton.jit
def weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5,
              F0: tl.constexpr, F1: tl.constexpr, MEAN: tl.constexpr, EXCLUDE: tl.constexpr,
              n, t, c, h, w, T, C, H, W, mask, ACC: tl.constexpr):
    """The weight (product or mean of F0, F1). With EXCLUDE = i it is instead
    d weight / d factor_i: the other factor for a product, 1 / #factors for a mean."""
    NF: tl.constexpr = (F0 != 0) + (F1 != 0)
    if NF == 0:
        value = tl.full([1], 1.0, ACC)
    elif MEAN and EXCLUDE >= 0:
        value = tl.full([1], 1.0 / NF, ACC)
    else:
        if EXCLUDE == 0 or F0 == 0:
            value = tl.full([1], 1.0, ACC)
        else:
            value = factor_at(F0, z0, s0, z1, s1, z2, s2, n, t, c, h, w, T, C, H, W, mask, ACC)
        if F1 != 0 and EXCLUDE != 1:
            second = factor_at(F1, z3, s3, z4, s4, z5, s5, n, t, c, h, w, T, C, H, W, mask, ACC)
            if MEAN:
                value = (value + second) / NF
            else:
                value = value * second
    return value


@triton.jit
def pooled_grad_at(g_ptr, arg_ptr, AXIS: tl.constexpr, n, t, c, h, w, T, C, H, W, mask,
                   ACC: tl.constexpr):
    """Gradient at v's positions of a pooled tensor's gradient (N, 2, D1, D2, D3):
    the mean part spread evenly, the max part to the argmax only."""
    rel, size = gate_offset(AXIS, n, t, c, h, w, T, C, H, W)
    if AXIS == 0:
        index = c
        length = C
    elif AXIS == 1:
        index = t
        length = T
    elif AXIS == 2:
        index = h
        length = H
    else:
        index = w
        length = W
    g_max = tl.load(g_ptr + 2 * n * size + rel, mask=mask, other=0.0).to(ACC)
    g_mean = tl.load(g_ptr + (2 * n + 1) * size + rel, mask=mask, other=0.0).to(ACC)
    arg = tl.load(arg_ptr + n * size + rel, mask=mask, other=-1)
    return g_mean / length + tl.where(arg == index, g_max, 0.0)


@triton.jit
def upstream_at(UP: tl.constexpr, u0, u1, u2, a0, a1, a2, sun, sut, suc, suh, suw,
                n, t, c, h, w, T, C, H, W, mask, ACC: tl.constexpr):
    """The full-size upstream gradient at a tile: a strided tensor, or pooled grads."""
    if UP == 0:
        value = tl.load(u0 + n * sun + t * sut + c * suc + h * suh + w * suw, mask=mask, other=0.0).to(ACC)
    elif UP == 1:
        value = pooled_grad_at(u0, a0, 0, n, t, c, h, w, T, C, H, W, mask, ACC)
    else:
        value = (pooled_grad_at(u0, a0, 1, n, t, c, h, w, T, C, H, W, mask, ACC)
                 + pooled_grad_at(u1, a1, 2, n, t, c, h, w, T, C, H, W, mask, ACC)
                 + pooled_grad_at(u2, a2, 3, n, t, c, h, w, T, C, H, W, mask, ACC))
    return value


@triton.jit
def result_block(n, k, N, POOL: tl.constexpr):
    """Block index of batch item n, channel k in a reduction's result. Pooled tensors are
    (N, 2, ...) = [max, mean] (the conv's input layout); gradients are (K, N, ...) so
    that each factor's gradient (K = 2 when one pass serves two factors) is contiguous."""
    if POOL:
        index = 2 * n + k
    else:
        index = k * N + n
    return index
