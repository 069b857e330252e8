"""Tile shapes (block sizes and num_warps) of the full-size kernels.

Each launch asks for the tile of one *kind* of kernel: ``channel_tile`` (the C
reduction, ``channel_reduce_kernel``), ``spatiotemporal_tile`` (the T/H/W reduction)
and ``elementwise_tile`` (``apply`` / ``input_grad``). A tile is looked up first in a
table of tiles tuned offline on real hardware (``benchmarks/tune_triton.py``), keyed by

    (device name, kind, layout, dtype name, C, H, W)

(device name: ``torch.cuda.get_device_name`` on CUDA, ``"cpu"`` for the interpreter;
layout: ``"channels_last"`` when C is the innermost dim, else ``"contiguous"``), and
otherwise comes from the heuristics below: the contiguous dim gets the long side of
the tile so loads coalesce (H*W for NCHW tensors, C for channels_last), and tiles hold
at most a few thousand elements so the accumulators stay in registers.

**Why a table and not ``triton.autotune``.** The backend promises bitwise-reproducible
results for a given shape. ``triton.autotune`` picks a config by timing at run time, so
two processes (or two runs on a busy GPU) could pick different tiles, and the
reductions sum in a different order with a different tile (the C chunk of the channel
kernel, the H row blocks of the T/H/W kernel). A table fixes the tile for a shape on a
device: results are reproducible for a given shape, device and table. A new table (or
a new heuristic) may change the last bits of reductions, as any change of tile does.

**The table.** ``tuned_tiles.json`` beside this file (absent until a tuner has run on a
GPU), or the file named by ``AIA_TRITON_TILES=/path/to/table.json``;
``AIA_TRITON_TILES=default`` ignores every table (heuristics only). It is read once per
process, on the first lookup (``reset_table()`` reads it again). Entries that would not
launch correctly are ignored, with one warning each: block sizes must be powers of two,
the T/H/W kernel needs whole rows (``BLOCK_W >= W``), a tile holds at most
``MAX_TILE_ELEMENTS`` elements (the T/H/W kernel's whole rows excepted), ``num_warps`` is
a power of two up to 32, and the grid's second and third dims stay within CUDA's 65535.
A lookup is one dict access on a key built from the tensor's shape, strides and dtype.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from ..warnings_once import warn_once

KINDS = ("channel", "spatiotemporal", "elementwise")
LAYOUTS = ("contiguous", "channels_last")
BLOCK_NAMES = {"channel": ("BLOCK_C", "BLOCK_HW"), "elementwise": ("BLOCK_C", "BLOCK_HW"),
               "spatiotemporal": ("BLOCK_C", "BLOCK_H", "BLOCK_W")}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}
KEY_FIELDS = ("device", "kind", "layout", "dtype", "C", "H", "W")
# The largest tile the heuristics and the tuner's grid use (the T/H/W kernel may exceed it
# by whole rows: a row longer than this is one tile row).
MAX_TILE_ELEMENTS = 4096
# The heuristics' tile sizes, set by ptxas's register report for sm_90 (no GPU timing yet):
# the heaviest kernels at the spec shapes (the T/H/W weight gradients of two-factor
# weights, input_grad's five-term sum) hold 30-60 registers per element a thread owns.
# Tiles of 4096 (T/H/W, contiguous) and 2048 (C, elementwise) elements on 8 warps reached
# the 255-register cap and spilled up to 344 bytes a thread; at these sizes nothing spills
# more than 24 bytes (tests/test_triton_compile.py checks all ten variants at the spec
# shapes). channels_last T/H/W tiles keep 4096: 8 channels a row take 8 rows of a 56-wide
# plane, and halving the rows would double the H partials (a quarter of the full size at
# 56x56) to save a 16-24 byte spill in 3 of 192 specializations.
SPATIOTEMPORAL_TILE_ELEMENTS = 2048
SPATIOTEMPORAL_CHANNELS_LAST_TILE_ELEMENTS = 4096
CHANNEL_TILE_ELEMENTS = 1024
MAX_WARPS = 32
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's second and third dims
TABLE_ENV = "AIA_TRITON_TILES"
PACKAGE_TABLE = Path(__file__).resolve().with_name("tuned_tiles.json")


@dataclass(frozen=True)
class Tile:
    """Block sizes (in ``BLOCK_NAMES[kind]`` order) and num_warps of one launch."""
    kind: str
    blocks: tuple[int, ...]
    num_warps: int

    @property
    def kwargs(self) -> dict[str, int]:
        """The launch's keyword arguments: ``BLOCK_*=..., num_warps=...``."""
        return {**dict(zip(BLOCK_NAMES[self.kind], self.blocks)), "num_warps": self.num_warps}

    @property
    def elements(self) -> int:
        return math.prod(self.blocks)


# ---- heuristics ------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _channels_last(v) -> bool:
    """C is the innermost dim in memory (and there is more than one C and position)."""
    _, _, c, h, w = v.shape
    return v.stride(2) == 1 and c > 1 and h * w > 1


def layout(v) -> str:
    return "channels_last" if _channels_last(v) else "contiguous"


def num_warps(tile_elements: int) -> int:
    """8 warps from 1024 elements on: 4 to 16 elements a thread in the heuristics' tiles."""
    return 8 if tile_elements >= 1024 else 4


def _heuristic_tile(kind: str, blocks: tuple[int, ...]) -> Tile:
    return Tile(kind, blocks, num_warps(math.prod(blocks)))


def _channel_blocks(v) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): the C reduction and the elementwise passes (the same tile today)."""
    _, _, c, h, w = v.shape
    budget = CHANNEL_TILE_ELEMENTS
    if _channels_last(v):
        block_c = min(_pow2(c), 64)
        return block_c, min(_pow2(h * w), max(1, budget // block_c))
    block_hw = min(_pow2(h * w), budget)
    return min(_pow2(c), max(1, budget // block_hw)), block_hw


def _spatiotemporal_blocks(v) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W) for the T/H/W reduction: whole rows, as many rows as fit."""
    _, _, c, h, w = v.shape
    block_w = _pow2(w)
    if _channels_last(v):
        # 8 channels = one 32-byte sector of float32 per (h, w): full sectors, more rows per tile.
        block_c = min(_pow2(c), 8)
        budget = SPATIOTEMPORAL_CHANNELS_LAST_TILE_ELEMENTS
        return block_c, min(_pow2(h), max(1, budget // (block_w * block_c))), block_w
    budget = SPATIOTEMPORAL_TILE_ELEMENTS
    block_h = min(_pow2(h), max(1, budget // block_w))
    # Channels are far apart in this layout: a quarter of the budget across them.
    return min(_pow2(c), max(1, budget // 4 // (block_h * block_w))), block_h, block_w


_HEURISTICS = {"channel": _channel_blocks, "elementwise": _channel_blocks, "spatiotemporal": _spatiotemporal_blocks}


def heuristic_tile(kind: str, v) -> Tile:
    """The tile the package uses for ``v`` when no table entry matches."""
    return _heuristic_tile(kind, _HEURISTICS[kind](v))


# ---- the table -------------------------------------------------------------------------

_table: dict[tuple, Tile] | None = None  # None: not read yet
_device_names: dict[torch.device, str] = {}


def device_name(device: torch.device) -> str:
    """The key's device field: the CUDA device's name, ``"cpu"`` for the interpreter."""
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name


def key(kind: str, v) -> tuple:
    """The table key of a launch of ``kind`` on ``v`` (N, T, C, H, W)."""
    _, _, c, h, w = v.shape
    return (device_name(v.device), kind, layout(v), DTYPE_NAMES.get(v.dtype, str(v.dtype)), c, h, w)


def _is_pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def entry_problem(entry) -> str | None:
    """Why a table entry cannot be used (None when it can). ``entry``: a dict with the
    ``KEY_FIELDS``, ``blocks`` ({BLOCK_*: n}) and ``num_warps``."""
    if not isinstance(entry, dict):
        return "not an object"
    missing = [f for f in (*KEY_FIELDS, "blocks", "num_warps") if f not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    kind, blocks = entry["kind"], entry["blocks"]
    if kind not in KINDS:
        return f"unknown kind {kind!r}"
    if entry["layout"] not in LAYOUTS:
        return f"unknown layout {entry['layout']!r}"
    if entry["dtype"] not in DTYPE_NAMES.values():
        return f"unknown dtype {entry['dtype']!r}"
    if not isinstance(entry["device"], str):
        return "device is not a string"
    sizes = {d: entry[d] for d in "CHW"}
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes.values()):
        return f"C, H, W must be positive integers, got {sizes}"
    if not isinstance(blocks, dict) or set(blocks) != set(BLOCK_NAMES[kind]):
        return f"blocks of a {kind} tile are {', '.join(BLOCK_NAMES[kind])}, got {blocks!r}"
    bad = [name for name, n in blocks.items() if not _is_pow2(n)]
    if bad:
        return f"{', '.join(bad)} not a power of two"
    if not _is_pow2(entry["num_warps"]) or entry["num_warps"] > MAX_WARPS:
        return f"num_warps must be a power of two up to {MAX_WARPS}, got {entry['num_warps']!r}"
    c, h, w = sizes["C"], sizes["H"], sizes["W"]
    limit = MAX_TILE_ELEMENTS
    if kind == "spatiotemporal":
        if blocks["BLOCK_W"] < w:
            return f"BLOCK_W = {blocks['BLOCK_W']} < W = {w}: the T/H/W kernel needs whole rows"
        limit = max(limit, blocks["BLOCK_W"])
        grid_yz = (triton.cdiv(c, blocks["BLOCK_C"]), triton.cdiv(h, blocks["BLOCK_H"]))
    else:
        grid_yz = (triton.cdiv(h * w, blocks["BLOCK_HW"]), triton.cdiv(c, blocks["BLOCK_C"]))
    elements = math.prod(blocks.values())
    if elements > limit:
        return f"{elements} elements per tile, more than {limit}"
    if max(grid_yz) > MAX_GRID_YZ:
        return f"the grid would have {max(grid_yz)} programs along a dim (CUDA allows {MAX_GRID_YZ})"
    return None


def entry_key(entry: dict) -> tuple:
    return tuple(entry[f] for f in KEY_FIELDS)


def entry_tile(entry: dict) -> Tile:
    kind = entry["kind"]
    return Tile(kind, tuple(entry["blocks"][name] for name in BLOCK_NAMES[kind]), entry["num_warps"])


def tile_entry(key: tuple, tile: Tile) -> dict:
    """The table entry of ``tile`` at ``key`` (the inverse of ``entry_key``/``entry_tile``)."""
    return {**dict(zip(KEY_FIELDS, key)), "blocks": dict(zip(BLOCK_NAMES[tile.kind], tile.blocks)),
            "num_warps": tile.num_warps}


def table_path() -> Path | None:
    """The table file in use: ``AIA_TRITON_TILES``, else the package's; None for ``default``."""
    setting = os.environ.get(TABLE_ENV, "")
    if setting == "default":
        return None
    return Path(setting) if setting else PACKAGE_TABLE


def _warn(message: str) -> None:
    warn_once(message, f"aia_kernels: {message}")


def read_table(path: Path) -> dict[tuple, Tile]:
    """{key: Tile} of the valid entries of a table file; a warning for each entry ignored."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not isinstance(entries, list):
            raise TypeError("'entries' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _warn(f"tuned Triton tiles: cannot read {path} ({type(exc).__name__}: {exc}); using the heuristic tiles")
        return {}
    table: dict[tuple, Tile] = {}
    for i, entry in enumerate(entries):
        problem = entry_problem(entry)
        if problem is None and entry_key(entry) in table:
            problem = "a second entry for the same key"
        if problem is not None:
            _warn(f"tuned Triton tiles: entry {i} of {path} ignored ({problem}); its shape uses the heuristic tile")
            continue
        table[entry_key(entry)] = entry_tile(entry)
    return table


def _load() -> dict[tuple, Tile]:
    global _table
    path = table_path()
    if path is None or (path == PACKAGE_TABLE and not path.exists()):
        _table = {}
    else:
        _table = read_table(path)  # a missing AIA_TRITON_TILES file warns
    return _table


def reset_table() -> None:
    """Forget the table read so far: the next lookup reads ``AIA_TRITON_TILES`` and the file again."""
    global _table
    _table = None


@contextlib.contextmanager
def using_table(table: dict[tuple, Tile]):
    """Look tiles up in ``table`` ({key: Tile}) within the block, instead of the file's
    (the tuner times candidates through it; ``{}``: heuristics only)."""
    global _table
    saved, _table = _table, table
    try:
        yield
    finally:
        _table = saved


def _tile(kind: str, v) -> Tile:
    table = _table if _table is not None else _load()
    if table:
        tuned = table.get(key(kind, v))
        if tuned is not None:
            return tuned
    return heuristic_tile(kind, v)


def channel_tile(v) -> Tile:
    """Tile (BLOCK_C, BLOCK_HW) of the C reduction (``pool``/``weight_grad`` along C)."""
    return _tile("channel", v)


def spatiotemporal_tile(v) -> Tile:
    """Tile (BLOCK_C, BLOCK_H, BLOCK_W) of the T/H/W reduction: whole rows (BLOCK_W >= W)."""
    return _tile("spatiotemporal", v)


def elementwise_tile(out) -> Tile:
    """Tile (BLOCK_C, BLOCK_HW) of the elementwise pass (``apply``/``input_grad``), from ``out``."""
    return _tile("elementwise", out)
