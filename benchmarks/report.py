"""Derived figures (speedups, roofline fraction), target checks, and the three outputs:
a markdown table, a JSON file and a PNG plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cases import COMPILE_MODES, FUSED, HEADLINE, SPEC_SHAPES, shape_str

# The targets for the headline variant (benchmark figures, not test assertions).
TARGET_SPEEDUP_EAGER = 10.0      # fwd-bwd, fused vs eager reference
TARGET_SPEEDUP_COMPILED = 2.0    # fwd-bwd, fused vs the compiled peer
TARGET_ROOFLINE = 0.70           # design bytes / time, as a fraction of copy bandwidth
ROOFLINE_SHAPES = tuple(shape_str(s) for s in SPEC_SHAPES[:2])  # the two largest


def case_key(row: dict) -> tuple:
    return row["variant"], row["shape"], row["dtype"], row["mode"]


def add_derived(rows: list[dict], copy_gbps: dict[tuple[str, str], float]) -> None:
    """Fill speedups over eager and over the compiled peer, achieved GB/s and the roofline
    fraction, in place. ``copy_gbps[(shape, dtype)]`` is the measured ``x.clone()`` bandwidth."""
    by_case: dict[tuple, list[dict]] = {}
    for row in rows:
        by_case.setdefault(case_key(row), []).append(row)
    for case_rows in by_case.values():
        ok = {r["impl"]: r for r in case_rows if r["status"] == "ok"}
        eager, authors = ok.get("eager"), ok.get("authors")
        compiled = [ok[i] for i in COMPILE_MODES if i in ok]
        peer = min(compiled, key=lambda r: r["median_ms"]) if compiled else None
        for row in case_rows:
            row["compiled_peer"] = peer["impl"] if peer else None
            if row["status"] != "ok":
                continue
            t = row["median_ms"]
            row["speedup_eager"] = eager["median_ms"] / t if eager else None
            row["speedup_authors"] = authors["median_ms"] / t if authors else None
            row["speedup_compiled"] = peer["median_ms"] / t if peer else None
            row["gbps"] = row["design_bytes"] / (t * 1e-3) / 1e9
            bw = copy_gbps.get((row["shape"], row["dtype"]))
            row["copy_gbps"] = bw
            row["roofline_frac"] = row["gbps"] / bw if bw else None


def _check(name: str, value: float | None, target: float, unit: str, baseline: str) -> dict:
    if value is None:
        return {"target": name, "goal": target, "value": None, "met": None,
                "verdict": f"unknown: {baseline} not measured"}
    met = value >= target
    shown = f"{value:.2f}{unit}" if unit == "x" else f"{value:.0%}"
    goal = f"{target:g}{unit}" if unit == "x" else f"{target:.0%}"
    verdict = f"met ({shown} >= {goal})" if met else \
        f"missed by {1 - value / target:.0%} ({shown} < {goal})"
    return {"target": name, "goal": target, "value": value, "met": met, "verdict": verdict}


def target_checks(row: dict, device_type: str) -> list[dict]:
    """The issue's targets that apply to one result: fused backends on the headline variant,
    on CUDA, at the spec shapes. Speedups are checked for ``fwd-bwd``; the roofline fraction
    for every mode at the two largest shapes. Each check says met or missed by how much."""
    if (device_type != "cuda" or row["impl"] not in FUSED or row["variant"] != HEADLINE
            or row["status"] != "ok" or row["shape"] not in {shape_str(s) for s in SPEC_SHAPES}):
        return []
    checks = []
    if row["mode"] == "fwd-bwd":
        checks.append(_check("fwd+bwd speedup over eager", row.get("speedup_eager"),
                             TARGET_SPEEDUP_EAGER, "x", "eager"))
        checks.append(_check("fwd+bwd speedup over the compiled peer", row.get("speedup_compiled"),
                             TARGET_SPEEDUP_COMPILED, "x", "compiled peer"))
    if row["shape"] in ROOFLINE_SHAPES:
        checks.append(_check("design bytes / copy bandwidth", row.get("roofline_frac"),
                             TARGET_ROOFLINE, "%", "copy bandwidth"))
    return checks


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def markdown(payload: dict) -> str:
    """The report: machine, copy bandwidth, one row per result, then the target checks."""
    meta = payload["meta"]
    lines = [f"# AIA benchmark: {meta['device_name']} ({meta['device_type']})", ""]
    if meta["device_type"] != "cuda":
        lines += ["**CPU run: kernel timings need CUDA.** These are CPU smoke numbers (reference and any "
                  "backend that runs on CPU), not GPU results.", ""]
    lines += [f"torch {meta['torch']}, triton {meta['triton'] or 'n/a'}, date {meta['date']}", "",
              f"command: `{meta['command']}`", "",
              "## Copy bandwidth (`x.clone()`, read + write)", "",
              "| shape | dtype | median ms | GB/s |", "|---|---|---:|---:|"]
    for c in payload["copy_bandwidth"]:
        lines.append(f"| {c['shape']} | {c['dtype']} | {c['median_ms']:.4f} | {c['gbps']:.1f} |")
    lines += ["", "## Results", "",
              "Time: median over repetitions [q1, q3]. vs eager / vs authors / vs compiled: speedup over the "
              "reference (eager PyTorch), over the same module written the authors' way (eager), and over the "
              "compiled peer (the faster torch.compile mode). GB/s: design bytes / median time; % copy: that over the "
              "copy bandwidth. Peak MB: max_memory_allocated above the inputs (CUDA). Launches: GPU kernels "
              "(CUDA) or top-level aten ops (CPU). First call: wall time of the first call (compile time "
              "for torch.compile), excluded from the timings.", "",
              "| variant | shape | dtype | mode | impl | ms [q1, q3] | vs eager | vs authors | vs compiled | GB/s | "
              "% copy | peak MB | launches | first call s | max abs diff | note |",
              "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    not_run: dict[tuple[str, str], int] = {}
    for r in payload["results"]:
        if r["status"] == "not available":  # listed once below the table, not once per case
            key = (r["impl"], r["reason"])
            not_run[key] = not_run.get(key, 0) + 1
            continue
        if r["status"] == "ok":
            time = f"{r['median_ms']:.3f} [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}]"
            peak = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
            cells = [time, _fmt(r["speedup_eager"], ".2f"), _fmt(r.get("speedup_authors"), ".2f"),
                     _fmt(r["speedup_compiled"], ".2f"),
                     _fmt(r["gbps"], ".1f"), _fmt(r["roofline_frac"], ".0%"), _fmt(peak, ".1f"),
                     _fmt(r["launches"], "d"), _fmt(r["first_call_s"], ".2f"),
                     _fmt(r["max_abs_diff"], ".2e"), r.get("note") or ""]
        else:
            cells = ["-"] * 10 + [f"{r['status']}: {r['reason']}"]
        lines.append("| " + " | ".join([r["variant"], r["shape"], r["dtype"], r["mode"], r["impl"], *cells]) + " |")
    if not_run:
        lines += ["", "Not available (not timed):", ""]
        lines += [f"- `{impl}` ({count} cases): {reason}" for (impl, reason), count in not_run.items()]
    lines += ["", "## Targets", ""]
    checks = [(r, c) for r in payload["results"] for c in r.get("targets", [])]
    if not checks:
        lines.append(f"No target applies to this run: the targets are for the fused backends on "
                     f"`{HEADLINE}` at the spec shapes on CUDA.")
    else:
        lines += ["| shape | dtype | mode | impl | target | verdict |", "|---|---|---|---|---|---|"]
        for r, c in checks:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['impl']} | {c['target']} | "
                         f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def write_json(payload: dict, path: Path) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")


def plot(payload: dict, path: Path) -> None:
    """Speedup over eager per shape and impl, and the roofline fraction, for each mode
    (the headline variant if it was run, else the first variant)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in payload["results"] if r["status"] == "ok"]
    variants = list(dict.fromkeys(r["variant"] for r in payload["results"]))
    variant = HEADLINE if HEADLINE in variants else (variants[0] if variants else "")
    modes = list(dict.fromkeys(r["mode"] for r in payload["results"])) or ["-"]
    fig, axes = plt.subplots(len(modes), 2, figsize=(13, 3.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        rows = [r for r in ok if r["variant"] == variant and r["mode"] == mode]
        groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / max(len(impls), 1)
        for col, (key, label) in enumerate((("speedup_eager", "speedup over eager (x)"),
                                            ("roofline_frac", "design GB/s / copy GB/s"))):
            ax = axes[i][col]
            for j, impl in enumerate(impls):
                values = {f"{r['shape']}\n{r['dtype']}": r.get(key) for r in rows if r["impl"] == impl}
                xs = [g + j * width for g in range(len(groups))]
                ax.bar(xs, [values.get(g) or 0.0 for g in groups], width, label=impl)
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{variant} {mode}", fontsize=9)
            if col == 0:
                ax.axhline(1.0, color="gray", lw=0.8)
                if variant == HEADLINE and mode == "fwd-bwd":
                    ax.axhline(TARGET_SPEEDUP_EAGER, color="red", ls="--", lw=0.8, label="target")
            else:
                ax.axhline(TARGET_ROOFLINE, color="red", ls="--", lw=0.8, label="target")
            if impls:
                ax.legend(fontsize=7)
    _save(fig, payload, path)
    if len(variants) > 1:
        _plot_variants(plt, payload, ok, variants, modes, path.with_name("variants.png"))


def _save(fig, payload: dict, path: Path) -> None:
    meta = payload["meta"]
    fig.suptitle(f"AIA benchmark on {meta['device_name']} ({meta['device_type']}), {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)


def _plot_variants(plt, payload: dict, ok: list[dict], variants: list[str], modes: list[str], path: Path) -> None:
    """Speedup over eager of every variant, per mode, at the first shape and dtype of the run."""
    shape, dtype = payload["results"][0]["shape"], payload["results"][0]["dtype"]
    fig, axes = plt.subplots(len(modes), 1, figsize=(13, 3.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        rows = [r for r in ok if r["mode"] == mode and r["shape"] == shape and r["dtype"] == dtype]
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / max(len(impls), 1)
        ax = axes[i][0]
        for j, impl in enumerate(impls):
            values = {r["variant"]: r.get("speedup_eager") for r in rows if r["impl"] == impl}
            ax.bar([v + j * width for v in range(len(variants))], [values.get(v) or 0.0 for v in variants],
                   width, label=impl)
        ax.set_xticks([v + 0.4 - width / 2 for v in range(len(variants))], variants, fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("speedup over eager (x)")
        ax.set_title(f"all variants, {mode}, {shape} {dtype}", fontsize=9)
        if impls:
            ax.legend(fontsize=7)
    _save(fig, payload, path)


def write_all(payload: dict, out_dir: Path, plot_png: bool = True) -> str:
    """Derive, check targets, and write ``results.md``, ``results.json`` (and ``summary.png``);
    returns the markdown."""
    copy_gbps = {(c["shape"], c["dtype"]): c["gbps"] for c in payload["copy_bandwidth"]}
    add_derived(payload["results"], copy_gbps)
    for row in payload["results"]:
        row["targets"] = target_checks(row, payload["meta"]["device_type"])
    text = markdown(payload)
    (out_dir / "results.md").write_text(text)
    write_json(payload, out_dir / "results.json")
    if plot_png:
        try:
            plot(payload, out_dir / "summary.png")
        except ImportError as exc:  # matplotlib missing: the table and JSON still stand
            print(f"benchmarks: no plot ({exc})", file=sys.stderr)
    return text


if __name__ == "__main__":  # python -m benchmarks.report DIR: re-render DIR/results.json
    for arg in sys.argv[1:]:
        folder = Path(arg)
        print(write_all(json.loads((folder / "results.json").read_text()), folder))
