"""The full-size elementwise pass: ``out = sum_k weight_k * source_k`` in one pass.

``apply`` is one term with source = v (read v once, write out once). ``input_grad``
passes every term at once: the first source is grad_out (read once), the others
are pooled gradients expanded on the fly from small tensors, so grad_x costs one
read and one write of full-size memory whatever the number of terms. Terms travel
as a tuple of per-term argument tuples; what each is (factor kinds, combine,
source kind) is packed 8 bits per term into the constexpr CODE. Tiles follow
``channel_reduce_kernel``'s (BLOCK_C, BLOCK_HW) layout, coalesced for contiguous
and channels_last tensors alike.
"""
import triton
import triton.language as tl

from .weights import upstream_at, weight_at

TERM_CODE_BITS = 8


def term_code(f0: int, f1: int, mean: bool, up: int) -> int:
    """Bits of one term: F0 (2), F1 (2), MEAN (1), UP (2)."""
    return f0 | f1 << 2 | int(mean) << 4 | up << 5


@triton.jit
def weighted_sum_kernel(out_ptr, son, sot, soc, soh, sow, terms, T, C, H, W,
                        CODE: tl.constexpr, NUM_TERMS: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """terms[k] = (z0..z5, s0..s5 of the weight, u0..u2, a0..a2, 5 strides of the source)."""
    nt = tl.program_id(0).to(tl.int64)
    n = nt // T
    t = nt % T
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    h = hw // W
    w = hw % W
    mask = (c < C) & (hw < H * W)
    total = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for k in tl.static_range(NUM_TERMS):
        a = terms[k]
        # Term k's bits, inlined: a constexpr named inside the loop could not be
        # reassigned on the next iteration (the compiler rejects it; the interpreter does not).
        source = upstream_at((CODE >> (8 * k + 5)) & 3, a[12], a[13], a[14], a[15], a[16], a[17],
                             a[18], a[19], a[20], a[21], a[22], n, t, c, h, w, T, C, H, W, mask, ACC)
        total += source * weight_at(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11],
                                    (CODE >> (8 * k)) & 3, (CODE >> (8 * k + 2)) & 3, (CODE >> (8 * k + 4)) & 1, -1,
                                    n, t, c, h, w, T, C, H, W, mask, ACC)
    tl.store(out_ptr + n * son + t * sot + c * soc + h * soh + w * sow, total, mask=mask)
