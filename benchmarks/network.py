"""Whole networks: the plain ResNet-50 against the same network with AIA on each backend.

    python benchmarks/network.py                          # CPU: TSN and TSM, 1 clip x 8 frames,
                                                          # eval 224x224, train 160x160, 1 and N threads
    python benchmarks/network.py --device cuda --clips 8 --size-eval 224 --size-train 224

For each architecture (TSN, TSM ResNet-50 with ``--variant`` in every Bottleneck that the
spec's placement rule gives it), each mode (eval forward under ``torch.no_grad``; train
step: forward, cross-entropy, backward) and, on CPU, each thread count, the configurations
(``plain``: no AIA; ``reference``, ``native``, and ``triton`` on CUDA; ``native-keep``,
``triton-keep``: that fused backend with every stage's tensors kept for backward,
``recompute=False``, the memory layout before the backward recomputed its T, H, W stages;
train step only, since an eval forward under ``no_grad`` takes the inference plan either way;
``plain-again``: a second instance of the plain network, timed like the others, whose
"overhead" is the run's noise floor: on a shared machine identical configurations differ by
several percent from run to run, and this shows by how much in the run itself)
run in interleaved rounds: each round times ``--steps`` steps of every configuration in turn, so a slow phase
of a shared machine hits all alike. Reported per configuration: median step time, IQR, the
overhead over plain (median over rounds of the per-round ratio), peak memory of one step
(CUDA: ``max_memory_allocated`` above the memory before it; CPU on Linux: the process's
peak resident set above its size before the step, after ``malloc_trim``, with ``VmHWM``
reset through ``/proc/self/clear_refs``) and, for the train step, the bytes saved for backward
(benchmarks/saved_bytes.py, each storage once). Where the overhead goes: the time inside
the AIA modules (a few further steps with hooks: forward; in eval each module's forward
again at once on the same input, the same work without the other layers in between;
backward where a module's backward is one fused autograd node), the same split by the
modules' input shape beside one module of each shape run alone in a warm loop (what a
microbenchmark sees; the ratio is what the layers between two modules cost them) and alone
with its caches cold (a buffer written before each forward and each backward, 64 MiB on CPU,
256 MiB on CUDA: what of that cost is the caches refilled), the bytes model's floor
for those modules at the copy bandwidth measured on their inputs, and the minor page
faults per step (CPU: the allocator's fresh pages, which AIA also changes in the layers
around it). All configurations share the same weights. Writes
benchmarks/results/network_<device>_<tag>.json and .md (machine, versions, date, command).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's aia_kernels and benchmarks
from aia_kernels import aia_modules  # noqa: E402
from aia_kernels import backends as aia_backends  # noqa: E402
from aia_kernels.models import tsm_resnet50, tsn_resnet50  # noqa: E402
from benchmarks import bytes_model  # noqa: E402
from benchmarks.run import machine_meta  # noqa: E402
from benchmarks.saved_bytes import saved_bytes  # noqa: E402
from benchmarks.timing import FLUSH_BYTES, Timer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = {"tsn": tsn_resnet50, "tsm": tsm_resnet50}
CLASSES = 174


class Config:
    """One network configuration: a model and the AIA backend it must run (None: plain)."""

    def __init__(self, name: str, model: nn.Module, backend: str | None):
        self.name, self.model, self.backend = name, model, backend

    def check_backend(self) -> None:
        ran = {m.last_backend for _, m in aia_modules(self.model)}
        expected = set() if self.backend is None else {self.backend}
        if ran != expected:
            raise RuntimeError(f"{self.name}: AIA ran on {sorted(ran)}, expected {sorted(expected)}")


def build_configs(arch: str, variant: str, frames: int, backends: list[str], keep: bool, device,
                  noise_floor: bool = False) -> list[Config]:
    """plain (and plain-again if ``noise_floor``) + one configuration per backend, all with the
    weights of the first AIA model."""
    torch.manual_seed(0)
    aia = ARCHS[arch](CLASSES, frames, variant, backends[0] if backends else "reference").to(device)
    plain = ARCHS[arch](CLASSES, frames, None).to(device)
    plain.load_state_dict({k: v for k, v in aia.state_dict().items() if k in plain.state_dict()}, strict=True)
    configs = [Config("plain", plain, None)]
    if noise_floor:
        configs.append(Config("plain-again", copy.deepcopy(plain), None))
    # A fused backend also runs with recompute=False ("<backend>-keep") where keep is asked.
    runs = [(b, b, True) for b in backends] + [(f"{b}-keep", b, False) for b in backends if keep and b != "reference"]
    for name, backend, recompute in runs:
        model = copy.deepcopy(aia)
        for _, m in aia_modules(model):
            m.backend, m.recompute = backend, recompute
        configs.append(Config(name, model, backend))
    return configs


def step_function(config: Config, mode: str, x: torch.Tensor, y: torch.Tensor):
    model = config.model
    if mode == "eval":
        model.eval()

        def step():
            with torch.no_grad():
                return model(x)
    else:
        model.train()

        def step():
            loss = nn.functional.cross_entropy(model(x), y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            return loss
    return step


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device) -> float:
    """perf_counter after the device's queued work is done."""
    _sync(device)
    return time.perf_counter()


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_bytes(step, device) -> int | None:
    """Peak memory of one call of ``step`` above the memory before it (see the module doc)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        # Free heap pages back to the OS first, so that the step's reuse of them counts.
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except (OSError, AttributeError):
        return None
    before = _rss_kib("VmRSS")
    step()
    peak = _rss_kib("VmHWM")
    return None if before is None or peak is None else 1024 * (peak - before)


def train_saved_bytes(config: Config, x, y) -> int:
    config.model.train()
    saved, loss = saved_bytes(lambda: nn.functional.cross_entropy(config.model(x), y))
    config.model.zero_grad(set_to_none=True)
    loss.backward()
    return saved


def _minor_faults() -> int | None:
    """The process's minor page faults so far (Unix), None elsewhere."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(steps: dict, rounds: int, per_round: int, warmup: int, device) -> dict:
    """Per configuration: every step time (ms), the per-round medians and the minor page
    faults of each step (the allocator's fresh pages: on CPU a share of a step that AIA
    changes in the layers around it too, see docs/benchmarks.md)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    medians = {name: [] for name in steps}
    faults = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            round_times = []
            for _ in range(per_round):
                _sync(device)
                faults_before = _minor_faults()
                start = time.perf_counter()
                step()
                _sync(device)
                round_times.append((time.perf_counter() - start) * 1e3)
                if faults_before is not None:
                    faults[name].append(_minor_faults() - faults_before)
            times[name] += round_times
            medians[name].append(statistics.median(round_times))
    return {"times": times, "medians": medians, "faults": faults}


def time_inside_aia(model: nn.Module, step, calls: int, device) -> dict:
    """Milliseconds per step spent inside the network's AIA modules, median of ``calls``
    probe steps after the timed ones: ``forward`` (forward hooks), ``again`` (without
    autograd: each module's forward run a second time at once on the same input, untimed
    by the step: the same work right after itself instead of after the network's other
    layers) and ``backward`` (hooks on the output's autograd node, where a module's
    backward is that one node: the fused backends); None where not measured; ``inputs``:
    the modules' inputs (shape, dtype) in one step. With the other layers' time it splits
    a network's overhead into the modules' own time and their effect on the rest."""
    modules = [module for _, module in aia_modules(model)]
    if not modules:
        return {"forward": None, "again": None, "backward": None, "inputs": [], "by_shape": {}, "first_of_shape": {}}
    spent = {"forward": 0.0, "again": 0.0, "backward": 0.0, "timed_nodes": 0, "again_runs": 0}
    starts: dict = {}
    inputs_seen: list = []
    # per input shape, this step's seconds: forward and backward over that shape's modules
    by_shape: dict = {}
    shape_of: dict = {}
    first_of_shape: dict = {}  # shape -> (a module of that input shape, the input's dtype)

    def before_forward(module, inputs):
        inputs_seen.append((tuple(inputs[0].shape), inputs[0].dtype))
        shape_of[module] = tuple(inputs[0].shape)
        first_of_shape.setdefault(shape_of[module], (module, inputs[0].dtype))
        starts[module] = _now(device)

    def after_forward(module, inputs, output):
        took = _now(device) - starts.pop(module)
        spent["forward"] += took
        shape = shape_of[module]
        by_shape.setdefault(shape, {"forward": 0.0, "backward": 0.0})["forward"] += took
        if not torch.is_grad_enabled():
            start = _now(device)
            module.forward(*inputs)  # not through __call__: no hooks
            spent["again"] += _now(device) - start
            spent["again_runs"] += 1
        node = getattr(output, "grad_fn", None)
        if not isinstance(node, torch.autograd.function.BackwardCFunction):  # not one fused op's node
            return

        def before_backward(grad_outputs):
            starts[node] = _now(device)

        def after_backward(grad_inputs, grad_outputs):
            took = _now(device) - starts.pop(node)
            spent["backward"] += took
            spent["timed_nodes"] += 1
            by_shape[shape]["backward"] += took

        node.register_prehook(before_backward)
        node.register_hook(after_backward)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before_forward),
                                            m.register_forward_hook(after_forward))]
    times: dict = {"forward": [], "again": [], "backward": []}
    shape_times: dict = {}
    try:
        for _ in range(calls):
            spent.update(forward=0.0, again=0.0, backward=0.0, timed_nodes=0, again_runs=0)
            inputs_seen.clear()
            by_shape.clear()
            step()
            for key in times:
                times[key].append(spent[key] * 1e3)
            for shape, t in by_shape.items():
                shape_times.setdefault(shape, []).append(t)
    finally:
        for h in handles:
            h.remove()
    counts = {shape: sum(1 for s, _ in inputs_seen if s == shape) for shape in shape_times}
    per_module = {shape: {key: statistics.median(t[key] for t in ts) * 1e3 / counts[shape]
                          for key in ("forward", "backward")} for shape, ts in shape_times.items()}
    return {"forward": statistics.median(times["forward"]),
            "again": statistics.median(times["again"]) if spent["again_runs"] else None,
            "backward": statistics.median(times["backward"]) if spent["timed_nodes"] else None,
            "inputs": list(inputs_seen),
            "by_shape": {shape: {"modules": counts[shape], **ms} for shape, ms in per_module.items()},
            "first_of_shape": first_of_shape}


# Written before each call of a module run alone with cold caches. CPU: 64 MiB, about what the
# layers between two modules of the network's first stage write (conv3's output alone is 25.7
# MB at 56x56), more than the L2 and the L3 share one core of the 2-core CPU VM reached (reads
# of 32 MiB ran at L3 speed, of 64 MiB at DRAM's: docs/benchmarks.md); 256 MiB evicted the
# Python and torch code and data too, which the network's layers keep warm. CUDA: 256 MiB,
# more than an H200's L2: benchmarks/timing.py's flush.
COLD_BYTES = {"cpu": 64 * 2**20, "cuda": FLUSH_BYTES}


def cold_bytes(device) -> int:
    return COLD_BYTES.get(torch.device(device).type, COLD_BYTES["cuda"])


def cache_flusher(device):
    """A function that writes COLD_BYTES on ``device`` (and waits for it): afterwards a module's
    data, workspaces and (CPU) code come from beyond the caches, as after a network's other layers."""
    buffer = torch.empty(cold_bytes(device), dtype=torch.uint8, device=device)

    def flush():
        buffer.zero_()  # a store to every line, whatever the line held
        _sync(device)

    return flush


def time_alone(module: nn.Module, shape: tuple, dtype, mode: str, calls: int, device, flush=None) -> dict:
    """One AIA module run alone on a random input of ``shape``, ``calls`` times after two
    warm-up calls: median forward ms and (train) backward ms. Without ``flush`` the calls come
    one after another, data and code warm, as a microbenchmark sees them; with it (e.g.
    :func:`cache_flusher`), ``flush()`` runs untimed before each forward and each backward.
    Against ``time_inside_aia``'s per-shape times they show what the network's other layers
    between two modules cost the modules (caches, clock)."""
    x = torch.randn(shape, device=device).to(dtype)
    forward, backward = [], []
    before = flush or (lambda: None)

    for call in range(calls + 2):
        before()
        if mode == "eval":
            start = _now(device)
            with torch.no_grad():
                module(x)
            took_fwd, took_bwd = _now(device) - start, None
        else:
            xg = x.detach().requires_grad_()
            start = _now(device)
            y = module(xg)
            took_fwd = _now(device) - start
            grad = torch.ones_like(y)
            before()
            start = _now(device)
            y.backward(grad)
            took_bwd = _now(device) - start
        if call >= 2:
            forward.append(took_fwd * 1e3)
            if took_bwd is not None:
                backward.append(took_bwd * 1e3)
    return {"forward": statistics.median(forward), "backward": statistics.median(backward) if backward else None}


def bytes_floor_ms(variant: str, inputs: list, mode: str, device, reps: int = 20) -> float | None:
    """The AIA modules' time per step if they moved only the bytes model's full-size passes
    (benchmarks/bytes_model.py) at the copy bandwidth this machine reaches on each module's
    input (``copy_`` into a preallocated tensor, median of ``reps`` timed as the roofline's
    copies are, benchmarks/timing.py; a copy is one read and one write, so a pass costs half
    a copy)."""
    if not inputs:
        return None
    passes = bytes_model.design_passes(variant, "fwd-infer" if mode == "eval" else "fwd-bwd")["total"]
    timer = Timer(device)
    copy_ms = {}
    for shape, dtype in set(inputs):
        src = torch.randn(shape, device=device).to(dtype)
        dst = torch.empty_like(src)
        copy_ms[shape, dtype] = statistics.median(timer.times_ms(lambda: dst.copy_(src), reps, warmup=2))
    return sum(passes * copy_ms[key] / 2 for key in inputs)


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def run_case(arch, mode, threads, args, device) -> list[dict]:
    if threads is not None:
        torch.set_num_threads(threads)
    size = args.size_eval if mode == "eval" else args.size_train
    configs = build_configs(arch, args.variant, args.frames, args.backends, args.keep and mode == "train", device,
                            args.noise_floor)
    torch.manual_seed(1)
    x = torch.randn(args.clips * args.frames, 3, size, size, device=device)
    y = torch.randint(0, CLASSES, (args.clips,), device=device)
    steps = {c.name: step_function(c, mode, x, y) for c in configs}
    timed = time_interleaved(steps, args.rounds, args.steps, args.warmup, device)
    flush = cache_flusher(device)
    rows = []
    for c in configs:
        c.check_backend()
        ratios = [a / b for a, b in zip(timed["medians"][c.name], timed["medians"]["plain"])]
        row = {"arch": arch, "mode": mode, "size": size, "threads": threads, "config": c.name,
               "median_ms": statistics.median(timed["times"][c.name]), "iqr_ms": _iqr(timed["times"][c.name]),
               "overhead": statistics.median(ratios) - 1.0, "peak_bytes": peak_bytes(steps[c.name], device),
               "faults_per_step": statistics.median(timed["faults"][c.name]) if timed["faults"][c.name] else None}
        inside = time_inside_aia(c.model, steps[c.name], args.probe_steps, device)
        row["aia_forward_ms"], row["aia_forward_again_ms"] = inside["forward"], inside["again"]
        row["aia_backward_ms"] = inside["backward"]
        row["bytes_floor_ms"] = bytes_floor_ms(args.variant, inside["inputs"], mode, device)
        row["aia_by_shape"] = []
        has_backward = bool(row["aia_backward_ms"])
        for shape, times in inside["by_shape"].items():
            module, dtype = inside["first_of_shape"][shape]
            alone = time_alone(module, shape, dtype, mode, args.probe_steps * 3, device)
            cold = time_alone(module, shape, dtype, mode, args.probe_steps * 3, device, flush)
            row["aia_by_shape"].append({"shape": list(shape), "modules": times["modules"],
                                        "forward_ms": times["forward"],
                                        "backward_ms": times["backward"] if has_backward else None,
                                        "alone_forward_ms": alone["forward"],
                                        "alone_backward_ms": alone["backward"] if has_backward else None,
                                        "cold_forward_ms": cold["forward"],
                                        "cold_backward_ms": cold["backward"] if has_backward else None})
        if mode == "train":
            row["saved_bytes"] = train_saved_bytes(c, x, y)
        rows.append(row)
    plain = rows[0]
    for row in rows:
        if plain.get("saved_bytes"):
            row["saved_over_plain"] = row["saved_bytes"] / plain["saved_bytes"] - 1.0
        if plain["peak_bytes"] and row["peak_bytes"] is not None:
            row["peak_over_plain"] = row["peak_bytes"] / plain["peak_bytes"] - 1.0
        print(json.dumps(row), flush=True)
    return rows


def write_results(info: dict, text: str, results_dir: Path, prefix: str, tag: str | None) -> None:
    """``<prefix>_<tag>.json`` (``info``) and ``.md`` (``text``, also printed); tag: today by default."""
    tag = tag or time.strftime("%Y%m%d", time.gmtime())
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{prefix}_{tag}.json").write_text(json.dumps(info, indent=1) + "\n")
    (results_dir / f"{prefix}_{tag}.md").write_text(text)
    print(text)


def markdown(info: dict) -> str:
    def mib(b):
        return "-" if b is None else f"{b / 2**20:.1f}"

    def pct(v):
        return "-" if v is None else f"{100 * v:+.1f}%"

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    def ms2(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"# Whole network: plain vs AIA ({info['variant']}), {info['clips']} clip(s) x {info['frames']} "
             f"frames, {info['device_name']}", "",
             f"{info['date']}; torch {info['torch']}; commit {info.get('commit')}; {info['measure']}. "
             f"Command: `{info['command']}`", "",
             "| arch | mode | size | threads | config | median ms (IQR) | overhead vs plain | inside AIA: "
             "forward ms | forward again ms | backward ms | bytes-model floor ms | page faults / step | peak MiB "
             "| saved for backward MiB | saved vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in info["results"]:
        faults = r.get("faults_per_step")
        lines.append(f"| {r['arch']} | {r['mode']} | {r['size']} | {r['threads'] or '-'} | {r['config']} "
                     f"| {r['median_ms']:.1f} ({r['iqr_ms']:.1f}) | {pct(r['overhead'])} "
                     f"| {ms(r.get('aia_forward_ms'))} | {ms(r.get('aia_forward_again_ms'))} "
                     f"| {ms(r.get('aia_backward_ms'))} "
                     f"| {ms(r.get('bytes_floor_ms'))} "
                     f"| {'-' if faults is None else f'{faults:.0f}'} | {mib(r['peak_bytes'])} "
                     f"| {mib(r.get('saved_bytes'))} | {pct(r.get('saved_over_plain'))} |")
    by_shape = [(r, s) for r in info["results"] for s in r.get("aia_by_shape", [])]
    if by_shape:
        lines += ["", "AIA modules by input shape: ms per module, inside the network (the hooks' steps), the "
                  "same module alone in a warm loop on a random input, and alone with its caches cold (a buffer "
                  f"of {info.get('cold_mib', '?')} MiB written before each forward and each backward, untimed). "
                  "In network / alone is the cost of the network's other layers between two modules; in network "
                  "/ cold is what of it is left when the caches are refilled either way (the clock, what the "
                  "layers leave behind).", "",
                  "| arch | mode | config | input | modules | forward ms in network / alone / cold | backward ms "
                  "in network / alone / cold | in network / alone (forward + backward) | in network / cold |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r, s in by_shape:
            inside = s["forward_ms"] + (s["backward_ms"] or 0.0)
            alone = s["alone_forward_ms"] + (s["alone_backward_ms"] or 0.0)
            cold = s.get("cold_forward_ms")
            cold_total = None if cold is None else cold + (s.get("cold_backward_ms") or 0.0)
            backward = f"{ms2(s['backward_ms'])} / {ms2(s['alone_backward_ms'])} / {ms2(s.get('cold_backward_ms'))}"
            lines.append(f"| {r['arch']} | {r['mode']} | {r['config']} | {tuple(s['shape'])} | {s['modules']} "
                         f"| {s['forward_ms']:.2f} / {s['alone_forward_ms']:.2f} / {ms2(cold)} | {backward} "
                         f"| {inside / alone:.2f} | {'-' if cold_total is None else f'{inside / cold_total:.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", default="CinST->STinC")
    parser.add_argument("--archs", default="tsn,tsm")
    parser.add_argument("--modes", default="eval,train")
    parser.add_argument("--backends", default=None,
                        help="AIA backends (default: reference,native on CPU; reference,native,triton on CUDA, "
                             "those available: native on CUDA needs AIA_NATIVE_CUDA=1)")
    parser.add_argument("--no-keep", dest="keep", action="store_false",
                        help="skip native-keep and triton-keep (every stage kept for backward: recompute=False)")
    parser.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                        help="skip plain-again (a second plain network: the run's noise floor)")
    parser.add_argument("--clips", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size-eval", type=int, default=224)
    parser.add_argument("--size-train", type=int, default=160)
    parser.add_argument("--threads", default=None,
                        help="CPU thread counts, comma-separated (default: 1 and the number of cores)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--probe-steps", type=int, default=3,
                        help="untimed steps with hooks measuring the time inside the AIA modules (median)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: date)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    if args.backends is None:  # on CUDA, native only where the user opted in (AIA_NATIVE_CUDA=1)
        candidates = ("reference", "native", "triton") if device.type == "cuda" else ("reference", "native")
        args.backends = ",".join(b for b in candidates if aia_backends.is_available(b, device))
    args.backends = [b for b in args.backends.split(",") if b]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        thread_counts = [None]
    else:
        thread_counts = ([int(t) for t in args.threads.split(",")] if args.threads
                         else sorted({1, os.cpu_count() or 1}))
    meta = machine_meta(device, sys.argv[1:] if argv is None else argv, entry=("benchmarks/network.py",))
    load_before = os.getloadavg()
    rows = []
    for threads in thread_counts:
        for arch in args.archs.split(","):
            for mode in args.modes.split(","):
                rows += run_case(arch, mode, threads, args, device)
    info = {**meta, "variant": args.variant, "clips": args.clips, "frames": args.frames, "dtype": "float32",
            "measure": (f"{args.rounds} interleaved rounds of {args.steps} step(s) per configuration after "
                        f"{args.warmup} warm-up step(s); median (IQR) of all steps; overhead: median over rounds "
                        f"of the per-round ratio to plain; inside AIA: median of {args.probe_steps} further steps "
                        f"with hooks on the AIA modules (forward; eval: each forward again at once on its "
                        f"input) and their fused autograd node (backward); "
                        f"bytes-model floor: the design's full-size passes (benchmarks/bytes_model.py) for "
                        f"every AIA module at the copy bandwidth measured on its input; page faults: "
                        f"median of the timed steps' minor faults; peak: one step; load average before/after "
                        f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}"),
            "cold_mib": cold_bytes(device) // 2**20,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": rows}
    write_results(info, markdown(info), args.results_dir, f"network_{device.type}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
