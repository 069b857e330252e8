"""Timers, statistics, peak memory and launch counts, for CUDA and (smoke tests) CPU.

CUDA: CUDA events around each repetition, with the L2 cache flushed before each one
by writing a 256 MB buffer (outside the timed region), after ``warmup`` untimed calls.
CPU: ``time.perf_counter`` around each call, no synchronisation (none is needed) and
no cache flush.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

FLUSH_BYTES = 256 * 1024 * 1024
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines off stderr


class Timer:
    """``times_ms(fn, reps, warmup)``: one time per repetition, in milliseconds."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._flush = None
        if self.cuda:
            self._flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush_cache(self) -> None:
        """Evict the inputs from L2, so each repetition reads them from DRAM (CUDA only)."""
        if self._flush is not None:
            self._flush.zero_()

    def first_call(self, fn: Callable[[], object]) -> tuple[float, object]:
        """(wall seconds, result) of one synchronised call: with ``torch.compile`` this is the
        compile time (plus one execution), reported apart from the timings."""
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result

    def times_ms(self, fn: Callable[[], object], reps: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            self.flush_cache()
            start.record()
            fn()
            end.record()
        self.sync()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]

    def peak_memory_bytes(self, fn: Callable[[], object]) -> int | None:
        """Peak of ``torch.cuda.max_memory_allocated`` during one call, above what was
        allocated before it (CUDA only; None on CPU)."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        result = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del result
        return peak

    def launches(self, fn: Callable[[], object]) -> tuple[int, str]:
        """Work items of one call, counted with ``torch.profiler``: on CUDA the GPU kernels
        (memsets and memcopies included), on CPU the top-level ``aten::`` operators."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sync()
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            self.sync()
        events = prof.events()
        if self.cuda:
            gpu = torch.autograd.DeviceType.CUDA
            return sum(1 for e in events if e.device_type == gpu), "cuda kernels"
        return sum(1 for e in events if e.name.startswith("aten::") and _top_level(e)), "aten ops (cpu)"


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median, quartiles (IQR) and extremes of the repetitions."""
    ordered = sorted(times_ms)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median_ms": statistics.median(ordered), "q1_ms": q1, "q3_ms": q3,
            "min_ms": ordered[0], "max_ms": ordered[-1], "reps": len(ordered)}
