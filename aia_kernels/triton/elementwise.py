"""The full-size elementwise passes: ``out = weight * source``.

``apply`` is this with source = v (one read of v, one write of out). ``input_grad``
runs it once per term: the first term writes ``out`` (source = grad_out, read once,
or expanded pooled grads, read from small tensors), each later term reads ``out``
back and adds its weight * expanded pooled grads (ACCUMULATE). Tiles follow
``channel_reduce_kernel``'s (BLOCK_C, BLOCK_HW) layout, so they are coalesced for
contiguous and channels_last tensors alike.
"""
import triton
import triton.language as tl

from .weights import upstream_at, weight_at


@triton.jit
def weighted_kernel(
        out_ptr, son, sot, soc, soh, sow,
        z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5,
        u0, u1, u2, a0, a1, a2, sun, sut, suc, suh, suw,
        T, C, H, W,
        F0: tl.constexpr, F1: tl.constexpr, MEAN: tl.constexpr, UP: tl.constexpr,
        ACCUMULATE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    nt = tl.program_id(0).to(tl.int64)
    n = nt // T
    t = nt % T
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    h = hw // W
    w = hw % W
    mask = (c < C) & (hw < H * W)
    value = upstream_at(UP, u0, u1, u2, a0, a1, a2, sun, sut, suc, suh, suw,
                        n, t, c, h, w, T, C, H, W, mask, ACC)
    value = value * weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5, F0, F1, MEAN, -1,
                              n, t, c, h, w, T, C, H, W, mask, ACC)
    out = out_ptr + n * son + t * sot + c * soc + h * soh + w * sow
    if ACCUMULATE:
        value += tl.load(out, mask=mask, other=0.0).to(ACC)
    tl.store(out, value, mask=mask)
