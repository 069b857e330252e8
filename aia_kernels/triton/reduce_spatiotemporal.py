"""Reduce a gated full-size tensor along T, H and W together, in one read: the
THW ``pool`` (three pooled tensors and argmaxes of weight * v) and the T/H/W
gates' ``weight_grad`` (three sums of upstream * v * d weight / d factor / 3).

A program owns one n, a block of channels and a block of rows (BLOCK_H) with
whole rows (BLOCK_W >= W), and walks T: each (BLOCK_C, BLOCK_H, BLOCK_W) tile
gives the W reduction (along its rows) and a partial H reduction at once, and
the T reduction accumulates in registers across the loop. When H does not fit
in one row block the H results of each block go to a partial buffer
(H_BLOCKS, <result layout>) that the host combines in a fixed order (first argmax
kept): deterministic, no atomics. With one row block it *is* the output.
"""
import triton
import triton.language as tl

from .weights import result_block, upstream_at, weight_at


@triton.jit
def spatiotemporal_reduce_kernel(
        v_ptr, svn, svt, svc, svh, svw,
        z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5,
        u0, u1, u2, a0, a1, a2, sun, sut, suc, suh, suw,
        out_t, arg_t, out_h, arg_h, out_w, arg_w, N, T, C, H, W,
        F0: tl.constexpr, F1: tl.constexpr, MEAN: tl.constexpr, EXCLUDE: tl.constexpr,
        UP: tl.constexpr, POOL: tl.constexpr, BOTH: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """POOL: (N, 2, ...) [max, mean] + argmax per gate layout. Otherwise (K, N, ...): the sums
    for factor EXCLUDE, and with BOTH (two ST factors) also for factor 1 (K = 2)."""
    K: tl.constexpr = 1 + POOL + BOTH
    SUM: tl.constexpr = 1 * POOL  # channel of the (first) sum: after the max when pooling
    n = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None, None]
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
    w = tl.arange(0, BLOCK_W)[None, None, :]
    mask = (c < C) & (h < H) & (w < W)
    base = v_ptr + n * svn + c * svc + h * svh + w * svw
    # 2-D index views for the W result (c, h) and the H result (c, w).
    c_ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    h_ch = hb * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    w_cw = tl.arange(0, BLOCK_W)[None, :]
    mask_ch = (c_ch < C) & (h_ch < H)
    mask_cw = (c_ch < C) & (w_cw < W)
    t_best = tl.full([BLOCK_C, BLOCK_H, BLOCK_W], float("-inf"), ACC)
    t_arg = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], tl.int32)
    t_total = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], ACC)
    t_total2 = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], ACC)
    h_size = T * C * W
    w_size = T * H * C
    h_part = out_h + hb * N * K * h_size
    h_arg_part = arg_h + hb * N * h_size
    # Pooling stores means; weight_grad stores plain sums.
    if POOL:
        t_div = T
        h_div = H
        w_div = W
    else:
        t_div = 1
        h_div = 1
        w_div = 1
    for t in range(T):
        x = tl.load(base + t * svt, mask=mask, other=0.0).to(ACC)
        w_rel = (t * H + h_ch) * C + c_ch
        h_rel = (t * C + c_ch) * W + w_cw
        if POOL:
            y = x * weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5, F0, F1, MEAN, EXCLUDE,
                              n, t, c, h, w, T, C, H, W, mask, ACC)
            y_max = tl.where(mask, y, float("-inf"))
            better = y_max > t_best  # strict: an earlier t keeps ties (first argmax)
            t_best = tl.where(better, y_max, t_best)
            t_arg = tl.where(better, t, t_arg)
            w_max, w_arg = tl.max(y_max, axis=2, return_indices=True, return_indices_tie_break_left=True)
            tl.store(out_w + result_block(n, 0, N, POOL) * w_size + w_rel, w_max, mask=mask_ch)
            tl.store(arg_w + n * w_size + w_rel, w_arg, mask=mask_ch)
            h_max, h_arg = tl.max(y_max, axis=1, return_indices=True, return_indices_tie_break_left=True)
            tl.store(h_part + result_block(n, 0, N, POOL) * h_size + h_rel, h_max, mask=mask_cw)
            tl.store(h_arg_part + n * h_size + h_rel, h_arg + hb * BLOCK_H, mask=mask_cw)
            y = tl.where(mask, y, 0.0)
        else:
            # d/d gate of an ST factor: each of its three gates carries 1/3 of it.
            x = tl.where(mask, x * upstream_at(UP, u0, u1, u2, a0, a1, a2, sun, sut, suc, suh, suw,
                                               n, t, c, h, w, T, C, H, W, mask, ACC), 0.0) / 3.0
            y = x * weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5, F0, F1, MEAN, EXCLUDE,
                              n, t, c, h, w, T, C, H, W, mask, ACC)
            if BOTH:
                y2 = x * weight_at(z0, z1, z2, z3, z4, z5, s0, s1, s2, s3, s4, s5, F0, F1, MEAN, 1,
                                   n, t, c, h, w, T, C, H, W, mask, ACC)
                t_total2 += y2
                tl.store(out_w + result_block(n, 1, N, POOL) * w_size + w_rel, tl.sum(y2, axis=2), mask=mask_ch)
                tl.store(h_part + result_block(n, 1, N, POOL) * h_size + h_rel, tl.sum(y2, axis=1), mask=mask_cw)
        t_total += y
        tl.store(out_w + result_block(n, SUM, N, POOL) * w_size + w_rel, tl.sum(y, axis=2) / w_div,
                 mask=mask_ch)
        tl.store(h_part + result_block(n, SUM, N, POOL) * h_size + h_rel, tl.sum(y, axis=1) / h_div,
                 mask=mask_cw)
    t_size = C * H * W
    t_rel = (c * H + h) * W + w
    if POOL:
        tl.store(out_t + result_block(n, 0, N, POOL) * t_size + t_rel, t_best, mask=mask)
        tl.store(arg_t + n * t_size + t_rel, t_arg, mask=mask)
    if BOTH:
        tl.store(out_t + result_block(n, 1, N, POOL) * t_size + t_rel, t_total2, mask=mask)
    tl.store(out_t + result_block(n, SUM, N, POOL) * t_size + t_rel, t_total / t_div, mask=mask)
