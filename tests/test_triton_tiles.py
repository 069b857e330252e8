"""The tuned-tile table of the Triton backend (``aia_kernels/triton/tiles.py``) and its
tuner (``benchmarks/tune_triton.py``): lookup, what the host wrappers launch with,
results with tuned tiles, invalid entries, ``AIA_TRITON_TILES=default``, the tuner's
refusal without CUDA, and its dry run through the interpreter. Tiny shapes."""
import json
import os
import warnings

import pytest
import torch

pytest.importorskip("aia_kernels.triton")

import aia_kernels.triton as triton_backend
from aia_kernels.triton import tiles
from benchmarks import tune_triton

from aia_testing import NUM_SEGMENTS, SHAPE, compare_with_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V_SHAPE = (SHAPE[0] // NUM_SEGMENTS, NUM_SEGMENTS, *SHAPE[1:])  # (2, 3, 5, 4, 7)
# Not the heuristic tiles: several C chunks, H row blocks, H*W blocks; 2 warps.
TUNED = {"channel": tiles.Tile("channel", (2, 8), 2), "spatiotemporal": tiles.Tile("spatiotemporal", (2, 1, 8), 2),
         "elementwise": tiles.Tile("elementwise", (4, 4), 2)}


@pytest.fixture(autouse=True)
def fresh_table(monkeypatch):
    """Each test reads its own table; the next tests read the default again."""
    monkeypatch.delenv(tiles.TABLE_ENV, raising=False)
    tiles.reset_table()
    yield
    tiles.reset_table()


def v_of(layout="contiguous", dtype=torch.float64, shape=SHAPE):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.view(shape[0] // NUM_SEGMENTS, NUM_SEGMENTS, *shape[1:])


def write_table(path, entries):
    path.write_text(json.dumps({"format": 1, "runs": [], "entries": entries}))
    return path


def use_table(monkeypatch, path):
    monkeypatch.setenv(tiles.TABLE_ENV, str(path))
    tiles.reset_table()


def tuned_entries(layout="contiguous", dtype="float64"):
    key = (tiles.device_name(torch.device(DEVICE)), None, layout, dtype, *SHAPE[1:])
    return [tiles.tile_entry((key[0], kind, *key[2:]), tile) for kind, tile in TUNED.items()]


def test_lookup_uses_the_table_for_its_key_only(tmp_path, monkeypatch):
    use_table(monkeypatch, write_table(tmp_path / "t.json", tuned_entries()))
    v = v_of()
    assert tiles.channel_tile(v) == TUNED["channel"]
    assert tiles.spatiotemporal_tile(v) == TUNED["spatiotemporal"]
    assert tiles.elementwise_tile(v) == TUNED["elementwise"]
    # Another layout, dtype or shape: the heuristics.
    for other in (v_of("channels_last"), v_of(dtype=torch.float32), v_of(shape=(6, 5, 4, 8))):
        for kind, lookup in (("channel", tiles.channel_tile), ("elementwise", tiles.elementwise_tile)):
            assert lookup(other) == tiles.heuristic_tile(kind, other)
    assert tiles.heuristic_tile("channel", v) != TUNED["channel"]
    assert TUNED["channel"].kwargs == {"BLOCK_C": 2, "BLOCK_HW": 8, "num_warps": 2}


def test_device_name_on_cuda(monkeypatch):
    monkeypatch.setattr(tiles, "_device_names", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Fake 80GB")
    assert tiles.device_name(torch.device("cuda", 3)) == "NVIDIA Fake 80GB"
    assert tiles.device_name(torch.device("cpu")) == "cpu"


class LaunchSpy:
    """Stands in for a kernel: records the BLOCK_*/num_warps of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k == "num_warps"})
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_wrappers_launch_tuned_tiles_and_match_the_reference(tmp_path, monkeypatch, layout):
    use_table(monkeypatch, write_table(tmp_path / "t.json", tuned_entries(layout)))
    spies = {}
    for kind, name in (("channel", "channel_reduce_kernel"), ("spatiotemporal", "spatiotemporal_reduce_kernel"),
                       ("elementwise", "weighted_sum_kernel")):
        spies[kind] = LaunchSpy(getattr(triton_backend, name))
        monkeypatch.setattr(triton_backend, name, spies[kind])
    x = v_of(layout).view(SHAPE)
    compare_with_reference("CinST", "triton", x=x, device=DEVICE)  # forward + backward: all three kinds
    for kind, spy in spies.items():
        assert spy.launches and all(launch == TUNED[kind].kwargs for launch in spy.launches), kind


INVALID = {
    "not a power of two": dict(kind="channel", blocks={"BLOCK_C": 3, "BLOCK_HW": 8}),
    "needs whole rows": dict(kind="spatiotemporal", blocks={"BLOCK_C": 1, "BLOCK_H": 1, "BLOCK_W": 4}),
    "elements per tile": dict(kind="elementwise", blocks={"BLOCK_C": 128, "BLOCK_HW": 64}),
    "num_warps": dict(kind="channel", num_warps=3),
    "blocks of a channel tile": dict(kind="channel", blocks={"BLOCK_C": 2, "BLOCK_H": 8}),
    "unknown kind": dict(kind="reduce"),
    "unknown layout": dict(layout="nhwc"),
    "missing num_warps": dict(num_warps=None),
    "programs along a dim": dict(kind="channel", H=4096, W=4096, blocks={"BLOCK_C": 8, "BLOCK_HW": 64}),
}


def test_invalid_entries_are_ignored_with_one_warning_each(tmp_path, monkeypatch):
    valid = tuned_entries()
    entries = []
    for change in INVALID.values():
        entry = {**valid[0], **change}
        entries.append({k: v for k, v in entry.items() if v is not None})
    path = write_table(tmp_path / "t.json", entries + valid + valid[:1])
    use_table(monkeypatch, path)
    v = v_of()
    with pytest.warns(RuntimeWarning) as record:
        assert tiles.channel_tile(v) == TUNED["channel"]  # the valid entries still count
    messages = [str(w.message) for w in record]
    assert len(messages) == len(INVALID) + 1  # + the duplicate
    for message, reason in zip(messages, [*INVALID, "second entry for the same key"]):
        assert str(path) in message and reason in message, (reason, message)
    tiles.reset_table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read again: no second warning
        assert tiles.spatiotemporal_tile(v) == TUNED["spatiotemporal"]


@pytest.mark.parametrize("content", [None, "{not json", '{"entries": 3}'], ids=["missing", "bad-json", "no-list"])
def test_unreadable_table_warns_and_uses_heuristics(tmp_path, monkeypatch, content):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    use_table(monkeypatch, path)
    v = v_of()
    with pytest.warns(RuntimeWarning, match="cannot read"):
        assert tiles.channel_tile(v) == tiles.heuristic_tile("channel", v)


def test_default_ignores_every_table(tmp_path, monkeypatch):
    """The package's table (here a stand-in) is read when AIA_TRITON_TILES is unset, not with =default."""
    monkeypatch.setattr(tiles, "PACKAGE_TABLE", write_table(tmp_path / "tuned_tiles.json", tuned_entries()))
    v = v_of()
    assert tiles.channel_tile(v) == TUNED["channel"]
    use_table(monkeypatch, "default")
    assert tiles.table_path() is None
    assert tiles.channel_tile(v) == tiles.heuristic_tile("channel", v)


def test_shipped_table_is_valid_and_from_real_hardware():
    """The package's table, when there is one: every entry valid, written by a non-dry run on a GPU."""
    if not tiles.PACKAGE_TABLE.exists():
        return  # none shipped yet (no GPU has tuned): the heuristics apply
    data = json.loads(tiles.PACKAGE_TABLE.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tiles.read_table(tiles.PACKAGE_TABLE)) == len(data["entries"])
    for entry in data["entries"]:
        run = data["runs"][entry["run"]]
        assert not run["dry_run"] and run["device"] == entry["device"] != "cpu"


def test_candidate_grid_on_the_spec_shapes():
    """At most 16 candidates per key, all valid table entries, none the heuristic tile."""
    assert tune_triton.KINDS == tiles.KINDS and tune_triton.LAYOUTS == tiles.LAYOUTS
    for shape in ((64, 64, 56, 56), (64, 512, 7, 7)):
        for layout in ("contiguous", "channels_last"):
            x = torch.empty(shape, device="meta")
            x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
            v = x.view(8, 8, *shape[1:])
            for kind in tiles.KINDS:
                found = tune_triton.candidate_tiles(tiles, kind, v)
                assert 4 <= len(found) <= 16 and tiles.heuristic_tile(kind, v) not in found
                assert all(tiles.entry_problem(tiles.tile_entry(tiles.key(kind, v), t)) is None for t in found)


def test_tuner_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = tiles.PACKAGE_TABLE.exists() and tiles.PACKAGE_TABLE.read_bytes()
    assert tune_triton.main(["--results-dir", str(tmp_path / "out")]) == 2
    assert "refusing to tune" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert (tiles.PACKAGE_TABLE.exists() and tiles.PACKAGE_TABLE.read_bytes()) == before
    assert tune_triton.main(["--dry-run"]) == 2  # a dry run needs its own --results-dir
    assert tune_triton.main(["--dry-run", "--results-dir", str(tmp_path), "--table", str(tiles.PACKAGE_TABLE)]) == 2


needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the dry run goes through Triton's interpreter, not on in this (GPU) process; gpu_run.sh tunes for real")


@needs_interpreter
def test_tuner_dry_run(tmp_path, capsys):
    out = tmp_path / "tuning"
    argv = ["--dry-run", "--results-dir", str(out), "--dtypes", "float32", "--layouts", "channels_last"]
    assert tune_triton.main(argv) == 0
    assert "| channel | channels_last | float32 | 8x5x3x7 |" in capsys.readouterr().out
    report = json.loads((out / "tuning.json").read_text())
    assert report["settings"]["dry_run"] and "tune_triton" in report["meta"]["command"]
    assert [r["kind"] for r in report["keys"]] == list(tiles.KINDS) and report["not_tuned"] == []
    for row in report["keys"]:
        assert row["status"] == "tuned" or row["status"].startswith("heuristic kept"), row["status"]
        assert len(row["candidates"]) == 2 and all(c["status"] == "ok" and c["ms"] > 0 for c in row["candidates"])
        assert row["heuristic"]["ms"] > 0 and set(row["heuristic"]["primitives"]) in ({"pool", "weight_grad"},
                                                                                       {"apply", "input_grad"})
    table = json.loads((out / "tuned_tiles.json").read_text())
    assert table["runs"][0]["dry_run"] and table["runs"][0]["device"] == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tiles.read_table(out / "tuned_tiles.json")) == len(table["entries"])
    assert "Dry run" in (out / "tuning.md").read_text()


@needs_interpreter
def test_tuner_writes_merges_and_the_package_reads(tmp_path, monkeypatch):
    """With a stand-in clock on which every candidate wins: entries written for the swept keys, an old
    entry of a swept key replaced, others kept; the table then drives the lookups."""
    monkeypatch.setattr(tune_triton.Tuner, "time_tile",
                        lambda self, key, tile, prims: (1.0 if tile is None else 0.5, {name: 0.0 for name in prims}))
    key = ("cpu", "channel", "contiguous", "float32", 5, 3, 7)
    stale = tiles.tile_entry(key, tiles.Tile("channel", (1, 32), 4))
    other = tiles.tile_entry(("NVIDIA X", *key[1:]), tiles.Tile("channel", (1, 32), 4))
    table = write_table(tmp_path / "table.json", [stale, other])
    argv = ["--dry-run", "--results-dir", str(tmp_path / "r"), "--table", str(table), "--dtypes", "float32",
            "--layouts", "contiguous", "--kinds", "channel,elementwise"]
    assert tune_triton.main(argv) == 0
    data = json.loads(table.read_text())
    rows = json.loads((tmp_path / "r" / "tuning.json").read_text())["keys"]
    assert [r["status"] for r in rows] == ["tuned", "tuned"]
    assert len(data["entries"]) == 3 and other in data["entries"] and stale not in data["entries"]
    assert (tmp_path / "r" / "tuned_tiles.json").read_text() == table.read_text()  # the copy for the archive
    use_table(monkeypatch, table)
    v = torch.randn(1, 8, 5, 3, 7, device=DEVICE)  # the dry run's shape 8x5x3x7, T = 8
    for row, lookup in zip(rows, (tiles.channel_tile, tiles.elementwise_tile)):
        assert lookup(v) == tiles.entry_tile({**row["best"], "kind": row["kind"]})
    # A cut budget: nothing swept, the table's entries untouched, every key listed as not tuned.
    assert tune_triton.main([*argv, "--time-budget", "0"]) == 0
    assert json.loads(table.read_text())["entries"] == data["entries"]
    assert len(json.loads((tmp_path / "r" / "tuning.json").read_text())["not_tuned"]) == 2
