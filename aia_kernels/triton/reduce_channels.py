"""Reduce a gated full-size tensor along C, in one read: the C-axis ``pool``
(max, first argmax, mean of weight * v) and the C gate's ``weight_grad``
(sum of upstream * v * d weight / d factor).

A program owns one (n, t) frame and a block of H*W positions and walks C in
chunks of BLOCK_C; the tile is (BLOCK_C, BLOCK_HW), so loads are coalesced along
H*W for contiguous inputs and along C for channels_last (block sizes follow the
strides, see ``tiles.py``). Results land directly in their output, (N, 2, T, H, W)
pooled or (K, N, T, H, W) gradients: no partial buffers, no atomics.
"""
import triton
import triton.language as tl

from .weights import result_block, upstream_at, weight_at


@triton.jit
def channel_reduce_kernel(
        v_ptr, svn, svt, svc, svh, svw,
        z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5,
        u0, u1, u2, a0, a1, a2, sun, sut, suc, suh, suw,
        out_ptr, arg_ptr, N, T, C, H, W,
        F0: tl.constexpr, F1: tl.constexpr, MEAN: tl.constexpr, EXCLUDE: tl.constexpr,
        UP: tl.constexpr, POOL: tl.constexpr, BOTH: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """POOL: out (N, 2, T, H, W) = [max, mean] of weight * v over C, arg = first argmax.
    Otherwise: out (K, N, T, H, W) = sum over C of upstream * v * d weight / d factor EXCLUDE,
    and with BOTH (two C factors) also for factor 1 (K = 2)."""
    nt = tl.program_id(0).to(tl.int64)
    n = nt // T
    t = nt % T
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    h = hw // W
    w = hw % W
    hw_mask = hw < H * W
    frame = v_ptr + n * svn + t * svt + h * svh + w * svw
    best = tl.full([BLOCK_HW], float("-inf"), ACC)
    best_arg = tl.zeros([BLOCK_HW], tl.int32)
    total = tl.zeros([BLOCK_HW], ACC)
    total2 = tl.zeros([BLOCK_HW], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[:, None]
        mask = (c < C) & hw_mask
        x = tl.load(frame + c * svc, mask=mask, other=0.0).to(ACC)
        if POOL:
            y = x * weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5, F0, F1, MEAN, EXCLUDE,
                              n, t, c, h, w, T, C, H, W, mask, ACC)
            chunk_max, chunk_arg = tl.max(tl.where(mask, y, float("-inf")), axis=0, return_indices=True,
                                          return_indices_tie_break_left=True)
            better = chunk_max > best  # strict: an earlier chunk keeps ties (first argmax)
            best = tl.where(better, chunk_max, best)
            best_arg = tl.where(better, chunk_arg + c0, best_arg)
            total += tl.sum(tl.where(mask, y, 0.0), axis=0)
        else:
            x = tl.where(mask, x * upstream_at(UP, u0, u1, u2, a0, a1, a2, sun, sut, suc, suh, suw,
                                               n, t, c, h, w, T, C, H, W, mask, ACC), 0.0)
            total += tl.sum(x * weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5, F0, F1, MEAN,
                                          EXCLUDE, n, t, c, h, w, T, C, H, W, mask, ACC), axis=0)
            if BOTH:
                total2 += tl.sum(x * weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5, F0, F1, MEAN,
                                               1, n, t, c, h, w, T, C, H, W, mask, ACC), axis=0)
    hw1 = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    out_mask = hw1 < H * W
    size = T * H * W
    rel = t * H * W + hw1
    if POOL:
        tl.store(out_ptr + result_block(n, 0, N, POOL) * size + rel, best, mask=out_mask)
        tl.store(out_ptr + result_block(n, 1, N, POOL) * size + rel, total / C, mask=out_mask)
        tl.store(arg_ptr + n * size + rel, best_arg, mask=out_mask)
    else:
        tl.store(out_ptr + result_block(n, 0, N, POOL) * size + rel, total, mask=out_mask)
        if BOTH:
            tl.store(out_ptr + result_block(n, 1, N, POOL) * size + rel, total2, mask=out_mask)
