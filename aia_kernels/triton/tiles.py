"""Tile shapes of the full-size kernels, chosen from v's sizes and strides.

The contiguous dim gets the long side of the tile so loads coalesce: H*W for
contiguous (NCHW) tensors, C for channels_last (stride of C == 1). Tiles hold at
most a few thousand elements so that the accumulators stay in registers.
"""
from __future__ import annotations

import triton


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _channels_last(v) -> bool:
    """C is the innermost dim in memory (and there is more than one C and position)."""
    _, _, c, h, w = v.shape
    return v.stride(2) == 1 and c > 1 and h * w > 1


def num_warps(tile_elements: int) -> int:
    return 8 if tile_elements >= 2048 else 4


def channel_tile(v) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for the C reduction and the elementwise passes."""
    _, _, c, h, w = v.shape
    if _channels_last(v):
        block_c = min(_pow2(c), 64)
        return block_c, min(_pow2(h * w), max(1, 2048 // block_c))
    block_hw = min(_pow2(h * w), 1024)
    return min(_pow2(c), max(1, 2048 // block_hw)), block_hw


def spatiotemporal_tile(v) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W) for the T/H/W reduction: whole rows, as many rows as fit."""
    _, _, c, h, w = v.shape
    block_w = _pow2(w)
    if _channels_last(v):
        # 8 channels = one 32-byte sector of float32 per (h, w): full sectors, more rows per tile.
        block_c = min(_pow2(c), 8)
        return block_c, min(_pow2(h), max(1, 4096 // (block_w * block_c))), block_w
    block_h = min(_pow2(h), max(1, 4096 // block_w))
    return min(_pow2(c), max(1, 1024 // (block_h * block_w))), block_h, block_w
