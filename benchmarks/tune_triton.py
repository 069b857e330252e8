"""Offline tile tuning of the Triton kernels: ``python -m benchmarks.tune_triton --help``.

For every shape (default: the spec's four ResNet-50 shapes, N*T = 64, T = 8), dtype
(float32, bfloat16), layout (contiguous, channels_last) and kernel kind, it times the
heuristic tile (``aia_kernels/triton/tiles.py``) and a small grid of candidate tiles
through ``TritonPrimitives``, and writes the candidates that win into the table the
package reads (``aia_kernels/triton/tuned_tiles.json``; see ``tiles.py``: a fixed table,
never run-time autotuning, keeps results bitwise reproducible for a shape).

What each kind times (summed; CinST->STinC's weights, random gates):
  channel         ``pool`` along C of ``Y_ST * v`` + the C pass of ``weight_grad`` of the
                  output weight ``Y_ST * Y_C`` (full upstream gradient)
  spatiotemporal  ``pool`` along T, H, W of ``Y_C * v`` + the T/H/W pass of that weight_grad
  elementwise     ``apply`` of the output weight + ``input_grad`` with two terms
                  (full ``grad_out``, and a C-gated pooled T/H/W gradient)

Candidate grid (per key, the heuristic tile and duplicates left out): the tile's side
along the contiguous dim of memory (P) takes its cap, cap/2, cap/4 and cap/8; the other
free side fills the tile up to E elements (at least 1, at most the next power of two
of its dim), for (E, num_warps) in (1024, 4), (1024, 8), (2048, 8), (4096, 8) (the
heuristics' sizes and the larger tiles they used before ptxas showed those spilling):

  kind / layout                    P (cap)                              filled side
  channel, elementwise / contig.   BLOCK_HW (min(pow2(H*W), 1024))      BLOCK_C
  channel, elementwise / ch.last   BLOCK_C  (min(pow2(C), 128))         BLOCK_HW
  spatiotemporal / contiguous      BLOCK_H  (min(pow2(H), 4096/BLOCK_W)) BLOCK_C
  spatiotemporal / channels_last   BLOCK_C  (min(pow2(C), 64))          BLOCK_H
  (spatiotemporal: BLOCK_W = pow2(W) always, the kernel reduces whole rows)

That is at most 16 candidates per key. Each candidate's outputs are checked against the
heuristic tile's (float32 results: allclose at 1e-4; bfloat16: 1.6e-2 abs / 8e-3 rel;
argmaxes equal): a mismatch disqualifies it. Times: ``triton.testing.do_bench``
(median, L2 flushed before each call; ``--warmup-ms``, ``--rep-ms``). The fastest valid
candidate is kept only if it beats the heuristic by ``--margin`` (3%) and still does when
both are timed again; otherwise the heuristic stays (and a previous entry of that key
is dropped). Keys run contiguous first (what the headline benchmark feeds), then by
dtype, kind and shape; ``--time-budget`` stops the sweep before a key or candidate that
would start after it, and the report lists the keys not tuned.

Writes (after every key, so a killed run keeps what it finished): the table at
``--table`` (default: the package's), merged into the existing one (entries of keys swept
now replaced, others kept; device, torch/triton versions, date and command recorded under
``runs``), a copy of it and ``tuning.md`` / ``tuning.json`` (every candidate's time) in
``--results-dir`` (default ``benchmarks/results/<date>_<device>/tuning/``).

Without CUDA it refuses (interpreter timings mean nothing), except ``--dry-run``: tiny
shapes, two candidates per key, on CPU through Triton's interpreter, output only into
``--results-dir`` (for CI: it exercises the code, its timings mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from .cases import DTYPES, NUM_SEGMENTS, make_input, parse_list, parse_shapes, shape_str
from .run import default_out_dir, machine_meta
from .timing import Timer

LAYOUTS = ("contiguous", "channels_last")
KINDS = ("channel", "spatiotemporal", "elementwise")
GRID = ((1024, 4), (1024, 8), (2048, 8), (4096, 8))  # (tile elements, num_warps)
# Cap of the block along the contiguous dim (spatiotemporal/contiguous: of BLOCK_H * BLOCK_W).
CAPS = {("channel", "contiguous"): 1024, ("channel", "channels_last"): 128,
        ("spatiotemporal", "contiguous"): 4096, ("spatiotemporal", "channels_last"): 64}
MARGIN = 0.03
TIME_BUDGET_S = 200.0
DRY_RUN_SHAPES = "8x5x3x7"
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
              torch.float64: dict(atol=1e-10, rtol=1e-8)}
REFUSAL = ("tune_triton: no CUDA device: refusing to tune, since timings through Triton's interpreter "
           "mean nothing (no table written). --dry-run exercises the code on tiny shapes.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_triton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"as benchmarks.run (default spec; dry run {DRY_RUN_SHAPES})")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32, bfloat16 or all")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="contiguous, channels_last or all")
    p.add_argument("--kinds", default=",".join(KINDS), help="channel, spatiotemporal, elementwise or all")
    p.add_argument("--time-budget", type=float, default=TIME_BUDGET_S,
                   help=f"seconds of sweeping (default {TIME_BUDGET_S:g}: the whole run fits ~4 minutes)")
    p.add_argument("--margin", type=float, default=MARGIN,
                   help=f"required speedup over the heuristic (default {MARGIN})")
    p.add_argument("--warmup-ms", type=float, default=10, help="do_bench warmup per timing (ms)")
    p.add_argument("--rep-ms", type=float, default=40, help="do_bench repetition time per timing (ms)")
    p.add_argument("--table", default=None, help="table to merge into (default: the package's tuned_tiles.json; "
                                                 "dry run: RESULTS_DIR/tuned_tiles.json)")
    p.add_argument("--results-dir", default=None, help="report dir (default benchmarks/results/<date>_<device>/tuning)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes, two candidates per key, CPU interpreter; needs --results-dir")
    return p.parse_args(argv)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def candidate_tiles(tiles, kind: str, v) -> list:
    """The grid of the module docstring for a launch of ``kind`` on ``v`` (heuristic excluded)."""
    _, _, c, h, w = v.shape
    layout = tiles.layout(v)
    if kind == "spatiotemporal":
        row = _pow2(w)  # BLOCK_W: whole rows
        sides = (("BLOCK_C", c), ("BLOCK_H", h)) if layout == "channels_last" else (("BLOCK_H", h), ("BLOCK_C", c))
        cap = CAPS[kind, layout] if layout == "channels_last" else max(1, CAPS[kind, layout] // row)
    else:
        row = 1
        sides = (("BLOCK_C", c), ("BLOCK_HW", h * w)) if layout == "channels_last" else \
            (("BLOCK_HW", h * w), ("BLOCK_C", c))
        cap = CAPS["channel", layout]
    (free, free_size), (fill, fill_size) = sides
    top = min(_pow2(free_size), cap)
    key, heuristic, found = tiles.key(kind, v), tiles.heuristic_tile(kind, v), []
    for side in dict.fromkeys(max(1, top >> i) for i in range(4)):
        for elements, warps in GRID:
            blocks = {free: side, fill: min(max(1, elements // (side * row)), _pow2(fill_size)), "BLOCK_W": row}
            tile = tiles.Tile(kind, tuple(blocks[name] for name in tiles.BLOCK_NAMES[kind]), warps)
            if tile != heuristic and tile not in found and tiles.entry_problem(tiles.tile_entry(key, tile)) is None:
                found.append(tile)
    return found


def workload(primitives, kind: str, shape, dtype, layout: str, device):
    """(v, {primitive: callable returning the tensors to compare}) for one key."""
    from aia_kernels.primitives import AXIS_DIM, GateValue, PooledGrad, WeightValue, gate_shape

    def full(seed):
        x = make_input(shape, dtype, device, seed)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        return x.view(shape[0] // NUM_SEGMENTS, NUM_SEGMENTS, *shape[1:])
    v, grad_out = full(0), full(1)
    gen = torch.Generator().manual_seed(2)

    def randn(*size):
        return torch.randn(size, generator=gen).to(device)

    def gate(axis):
        return GateValue(axis, randn(*gate_shape(v.shape, axis)), torch.tensor([0.8, -0.3], device=device))
    c_factor, st_factor = (gate("C"),), tuple(gate(a) for a in "THW")
    w_c, w_st = WeightValue((c_factor,), "prod"), WeightValue((st_factor,), "prod")
    w_out = WeightValue((st_factor, c_factor), "prod")
    if kind == "channel":
        return v, {"pool": lambda: list(primitives.pool(v, w_st, "C")[0]),
                   "weight_grad": lambda: [primitives._reduce_channels(v, w_out, grad_out, False, 1)[0]]}
    if kind == "spatiotemporal":
        return v, {"pool": lambda: [t for pair in primitives.pool(v, w_c, "THW") for t in pair],
                   "weight_grad": lambda: [o for o, _ in primitives._reduce_spatiotemporal(v, w_out, grad_out,
                                                                                           False, 0)]}
    pooled = []
    for axis in "THW":
        n, *rest = gate_shape(v.shape, axis)
        argmax = torch.randint(0, v.shape[AXIS_DIM[axis]], (n, *rest), generator=gen, dtype=torch.int32)
        pooled.append(PooledGrad(axis, randn(n, 2, *rest), argmax.to(device)))
    out, grad_x = torch.empty_like(v), torch.empty_like(v)

    def apply():
        primitives.apply(v, w_out, out)
        return [out]

    def input_grad():
        primitives.input_grad([(w_out, grad_out), (w_c, pooled)], grad_x)
        return [grad_x]
    return v, {"apply": apply, "input_grad": input_grad}


def mismatch(reference: list, got: list) -> str | None:
    """Why ``got`` does not match the heuristic tile's outputs (None when it does)."""
    for i, (a, b) in enumerate(zip(reference, got)):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i}: argmax differs at {int((a != b).sum())} positions"
        elif not torch.allclose(a.double(), b.double(), **TOLERANCES[a.dtype]):
            return f"output {i}: max abs diff {(a.double() - b.double()).abs().max().item():.3g}"
    return None


def _tile_json(tiles, tile) -> dict:
    return {"blocks": dict(zip(tiles.BLOCK_NAMES[tile.kind], tile.blocks)), "num_warps": tile.num_warps}


class _Probe(dict):
    """A one-entry table that counts its hits: a candidate that is never looked up would time
    the heuristic under the candidate's name."""

    def __init__(self, key, tile):
        super().__init__({key: tile})
        self.hits = 0

    def get(self, key, default=None):
        found = super().get(key, default)
        self.hits += found is not default
        return found


class Tuner:
    def __init__(self, args, device, tiles, primitives):
        self.args, self.device, self.tiles, self.primitives = args, device, tiles, primitives
        self.start = time.perf_counter()
        if device.type == "cuda":
            from triton.testing import do_bench
            self._bench = lambda fn: do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        else:  # dry run: the interpreter; one call each, the numbers mean nothing
            timer = Timer(device)
            self._bench = lambda fn: statistics.median(timer.times_ms(fn, 1, 0))

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.time_budget

    def time_tile(self, key, tile, prims: dict) -> tuple[float, dict]:
        """(total ms, {primitive: ms}) with ``tile`` at ``key`` (None: the heuristic)."""
        with self.tiles.using_table({} if tile is None else {key: tile}):
            times = {name: self._bench(fn) for name, fn in prims.items()}
        return sum(times.values()), times

    def outputs(self, key, tile, prims: dict) -> list:
        table = {} if tile is None else _Probe(key, tile)
        with self.tiles.using_table(table):
            outs = [t.clone() for fn in prims.values() for t in fn()]
        if tile is not None and table.hits < len(prims):
            raise RuntimeError(f"the wrappers did not look up {key} (tuner and tiles.key disagree)")
        return outs

    def tune_key(self, kind, layout, dt, shape) -> dict:
        tiles = self.tiles
        v, prims = workload(self.primitives, kind, shape, DTYPES[dt], layout, self.device)
        key = tiles.key(kind, v)
        row = {"kind": kind, "layout": layout, "dtype": dt, "shape": shape_str(shape),
               **dict(zip(tiles.KEY_FIELDS, key)), "heuristic": _tile_json(tiles, tiles.heuristic_tile(kind, v)),
               "candidates": []}
        if tiles.layout(v) != layout:  # e.g. C == 1: channels_last is the contiguous layout
            return {**row, "status": f"skipped: the {layout} input is seen as {tiles.layout(v)}"}
        try:
            reference = self.outputs(key, None, prims)
            row["heuristic"]["ms"], row["heuristic"]["primitives"] = self.time_tile(key, None, prims)
        except Exception as exc:
            return {**row, "status": f"not tuned: the heuristic tile failed: {type(exc).__name__}: {str(exc)[:200]}"}
        return self._sweep(key, kind, v, prims, reference, row)

    def _sweep(self, key, kind, v, prims, reference, row) -> dict:
        tiles = self.tiles
        candidates = candidate_tiles(tiles, kind, v)
        if self.args.dry_run:  # two, preferring other block sizes than the heuristic's (another summation order)
            other = [t for t in candidates if t.blocks != tiles.heuristic_tile(kind, v).blocks]
            candidates = other[:1] + other[-1:] if len(other) > 1 else (other + candidates)[:2]
        for tile in candidates:
            if self.over_budget():
                return {**row, "status": "not tuned: the time budget ran out during its sweep"}
            cand = _tile_json(tiles, tile)
            try:
                problem = mismatch(reference, self.outputs(key, tile, prims))
                if problem is None:
                    cand["ms"], cand["primitives"] = self.time_tile(key, tile, prims)
                cand["status"] = "ok" if problem is None else f"mismatch: {problem}"
            except Exception as exc:  # e.g. out of resources: the candidate is out, the sweep goes on
                cand["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            row["candidates"].append(cand)
        valid = [(c["ms"], i) for i, c in enumerate(row["candidates"]) if c["status"] == "ok"]
        if not valid:
            return {**row, "status": "not tuned: no valid candidate (each one's status is in tuning.json)"}
        best_ms, best = min(valid)
        best_tile = candidates[best]
        row["best"] = row["candidates"][best]
        row["speedup"] = row["heuristic"]["ms"] / best_ms
        if best_ms > row["heuristic"]["ms"] * (1 - self.args.margin):
            return {**row, "status": f"heuristic kept (best {row['speedup']:.3f}x, under the margin)"}
        # Confirm: both timed again, the heuristic first; the win must hold.
        again_h, _ = self.time_tile(key, None, prims)
        again_b, _ = self.time_tile(key, best_tile, prims)
        row["confirm"] = {"heuristic_ms": again_h, "best_ms": again_b, "speedup": again_h / again_b}
        if again_b > again_h * (1 - self.args.margin):
            return {**row, "status": f"heuristic kept (win not confirmed: {again_h / again_b:.3f}x)"}
        return {**row, "status": "tuned", "entry": {**tiles.tile_entry(key, best_tile), "heuristic_ms": again_h,
                                                    "tuned_ms": again_b, "speedup": round(again_h / again_b, 4)}}


def _table_text(data: dict) -> str:
    """JSON with one line per entry (readable diffs)."""
    head = json.dumps({k: v for k, v in data.items() if k != "entries"}, indent=1)[:-2]
    entries = ",\n".join("  " + json.dumps(e) for e in data["entries"])
    return f'{head},\n "entries": [\n{entries}\n ]\n}}\n' if entries else f'{head},\n "entries": []\n}}\n'


def read_existing(path: Path) -> dict:
    if not path.exists():
        return {"entries": [], "runs": []}
    data = json.loads(path.read_text())  # a broken table raises: never overwrite what we cannot read
    if not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: no 'entries' list")
    return data


def merged_table(tiles, existing: dict, run: dict, rows: list[dict]) -> dict:
    """Entries of the keys swept now replaced (tuned: the new entry; heuristic kept: none)."""
    swept = {tuple(r[f] for f in tiles.KEY_FIELDS) for r in rows
             if r["status"] == "tuned" or r["status"].startswith("heuristic kept")}
    kept = [e for e in existing["entries"] if tuple(e.get(f) for f in tiles.KEY_FIELDS) not in swept]
    runs = [*existing.get("runs", []), *([run] if rows else [])]  # a run that swept nothing is not recorded
    new = [{**r["entry"], "run": len(runs) - 1} for r in rows if r["status"] == "tuned"]
    order = {k: i for i, k in enumerate(KINDS)}
    entries = sorted(kept + new, key=lambda e: (str(e.get("device")), order.get(e.get("kind"), 9), str(e.get("layout")),
                                                str(e.get("dtype")), e.get("C", 0), e.get("H", 0), e.get("W", 0)))
    return {"about": "Triton tiles tuned on real hardware by benchmarks/tune_triton.py, looked up by "
                     "aia_kernels/triton/tiles.py; keys: " + ", ".join(tiles.KEY_FIELDS) + ". Do not edit by hand.",
            "format": 1, "runs": runs, "entries": entries}


def _tile_cell(tile: dict) -> str:
    return "(" + ", ".join(map(str, tile["blocks"].values())) + f") {tile['num_warps']}w"


def report_md(meta: dict, settings: dict, rows: list[dict], not_tuned: list[str]) -> str:
    lines = [f"# Triton tile tuning: {meta['device_name']}", "",
             f"- date: {meta['date']}; torch {meta['torch']}, triton {meta['triton']}",
             f"- command: `{meta['command']}`",
             f"- margin {settings['margin']:.0%}; grid: (tile elements, num_warps) in {settings['grid']} for 4 sizes "
             f"of the block along the contiguous dim; do_bench median, L2 flushed, warmup {settings['warmup_ms']:g} "
             f"ms, rep {settings['rep_ms']:g} ms",
             f"- sweep: {settings['elapsed_s']:.0f} s of a {settings['time_budget_s']:g} s budget", ""]
    if settings["dry_run"]:
        lines += ["**Dry run** (CPU, Triton interpreter, tiny shapes): the timings mean nothing.", ""]
    lines += ["| kind | layout | dtype | shape | heuristic tile | ms | best candidate | ms | speedup | result |",
              "|---|---|---|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        h, b = r["heuristic"], r.get("best")
        h_ms = f"{h['ms']:.4f}" if "ms" in h else "-"
        best = f"{_tile_cell(b)} | {b['ms']:.4f} | {r['speedup']:.3f}x" if b else "- | - | -"
        lines.append(f"| {r['kind']} | {r['layout']} | {r['dtype']} | {r['shape']} | {_tile_cell(h)} | {h_ms} | "
                     f"{best} | {r['status']} |")
    lines += ["", "Tiles: blocks in kernel order (channel, elementwise: BLOCK_C, BLOCK_HW; spatiotemporal: "
              "BLOCK_C, BLOCK_H, BLOCK_W), then num_warps. A win is timed again (heuristic, then the winner) and "
              "must beat the heuristic by the margin both times; the table records the second timing."]
    if not_tuned:
        lines += ["", f"## Not tuned ({len(not_tuned)} keys)", ""] + [f"- {k}" for k in not_tuned]
    return "\n".join(lines) + "\n"


def _setup(args):
    """(device, tiles module, TritonPrimitives()), or an exit code."""
    if args.dry_run:
        if args.results_dir is None:
            print("tune_triton: --dry-run writes only into --results-dir; give one", file=sys.stderr)
            return 2
        if "aia_kernels.triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("tune_triton: --dry-run runs Triton's interpreter, which must be on before the kernels "
                  "are imported: run it in a fresh process", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    from aia_kernels.triton import TritonPrimitives, tiles
    return device, tiles, TritonPrimitives()


class Output:
    """The table (merged), its copy and the report, rewritten after every key."""

    def __init__(self, tiles, table_path: Path, results_dir: Path, meta: dict, settings: dict, order: list):
        self.tiles, self.table_path, self.results_dir = tiles, table_path, results_dir
        self.existing = read_existing(table_path)
        self.meta, self.settings, self.order = meta, settings, order
        self.run = {"device": settings["device"], **{k: meta[k] for k in ("device_name", "torch", "triton",
                                                                          "cuda_runtime", "driver", "date", "command")}}
        self.run["dry_run"] = settings["dry_run"]

    def write(self, rows: list[dict], elapsed_s: float) -> str:
        self.settings["elapsed_s"] = round(elapsed_s, 1)
        started = {(r["layout"], r["dtype"], r["kind"], r["shape"]): r["status"] for r in rows}
        not_tuned = []
        for lay, dt, kind, shape in self.order:
            status = started.get((lay, dt, kind, shape_str(shape)), "not tuned: not started (time budget)")
            if status.startswith("not tuned"):
                not_tuned.append(f"{kind} {lay} {dt} {shape_str(shape)}: {status.removeprefix('not tuned: ')}")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.table_path.with_name(self.table_path.name + ".tmp")
        tmp.write_text(_table_text(merged_table(self.tiles, self.existing, self.run, rows)))
        os.replace(tmp, self.table_path)
        copy = self.results_dir / "tuned_tiles.json"
        if self.table_path.resolve() != copy.resolve():
            shutil.copyfile(self.table_path, copy)
        (self.results_dir / "tuning.json").write_text(json.dumps(
            {"meta": self.meta, "settings": self.settings, "keys": rows, "not_tuned": not_tuned}, indent=1) + "\n")
        text = report_md(self.meta, self.settings, rows, not_tuned)
        (self.results_dir / "tuning.md").write_text(text)
        return text


def main(argv=None) -> int:
    """Tune (argv: default ``sys.argv[1:]``); 0 when done (budget cuts included), 2 when refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup = _setup(args)
    if isinstance(setup, int):
        return setup
    device, tiles, primitives = setup
    shapes = parse_shapes(args.shapes or (DRY_RUN_SHAPES if args.dry_run else "spec"))
    dtypes = parse_list(args.dtypes, tuple(DTYPES), name="dtype")
    layouts = parse_list(args.layouts, LAYOUTS, name="layout")
    kinds = parse_list(args.kinds, KINDS, name="kind")
    meta = machine_meta(device, argv, entry=("-m", "benchmarks.tune_triton"))
    results_dir = Path(args.results_dir) if args.results_dir else default_out_dir(meta) / "tuning"
    table_path = Path(args.table) if args.table else (results_dir / "tuned_tiles.json" if args.dry_run
                                                      else tiles.PACKAGE_TABLE)
    if args.dry_run and table_path.resolve() == tiles.PACKAGE_TABLE:
        print("tune_triton: a dry run never writes the package's table", file=sys.stderr)
        return 2
    settings = {"margin": args.margin, "grid": [list(g) for g in GRID],
                "caps": {f"{kind}/{lay}": cap for (kind, lay), cap in CAPS.items()}, "warmup_ms": args.warmup_ms,
                "rep_ms": args.rep_ms, "time_budget_s": args.time_budget, "dry_run": args.dry_run,
                "table": str(table_path), "device": tiles.device_name(device)}
    order = [(lay, dt, kind, shape) for lay in layouts for dt in dtypes for kind in kinds for shape in shapes]
    output = Output(tiles, table_path, results_dir, meta, settings, order)
    tuner, rows = Tuner(args, device, tiles, primitives), []
    for i, (lay, dt, kind, shape) in enumerate(order):
        if tuner.over_budget():
            break
        rows.append(tuner.tune_key(kind, lay, dt, shape))
        print(f"tune_triton: [{i + 1}/{len(order)}] {kind} {lay} {dt} {shape_str(shape)}: {rows[-1]['status']}",
              file=sys.stderr)
        output.write(rows, time.perf_counter() - tuner.start)
    print(output.write(rows, time.perf_counter() - tuner.start))
    print(f"tune_triton: table {table_path}; report {results_dir}/tuning.md, tuning.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
