"""How many threads the native CPU kernels use: torch's intra-op threads, or the calling
thread alone, chosen per op and input shape by timing both.

Why: a native module makes about fifteen parallel regions per step, each a few hundred
microseconds. When another process keeps one of the cores busy, the thread sharing its core
is descheduled for whole time slices and every region waits for it: with 2 threads on 2
cores and one core busy, a step was measured 1.89x slower than with 1 thread
(benchmarks/cpu_contention.py; docs/native.md). Results do not depend on the thread count
(fixed partial sums), so switching is free of numerical effects.

How: for each (op, shape, dtype) key the policy times the plan op with torch's threads and
with the calling thread alone (after one warm-up call of each), then runs the faster one,
measuring the other again every ``EXPLORE_EVERY`` calls so that it follows the machine's
load. With torch set to 1 thread, or ``AIA_NATIVE_ADAPTIVE_THREADS=0``, it does nothing.
``decisions()`` says what it chose for each key.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque
from typing import Callable

import torch

TORCH, SERIAL = "torch threads", "calling thread"
EXPLORE_EVERY = 32  # calls between two measurements of the arm not in use
WINDOW = 3          # the last timings of each arm that decide (their median)


def enabled() -> bool:
    return os.environ.get("AIA_NATIVE_ADAPTIVE_THREADS", "1") != "0"


class _Key:
    __slots__ = ("calls", "times")

    def __init__(self):
        self.calls = 0
        self.times = {TORCH: deque(maxlen=WINDOW), SERIAL: deque(maxlen=WINDOW)}

    def best(self) -> str:
        return min(self.times, key=lambda arm: statistics.median(self.times[arm]))

    def choose(self) -> tuple[str, bool]:
        """(arm, timed): the first calls of each arm warm up (not timed), then each is
        timed until it has WINDOW samples; afterwards the best, the other every EXPLORE_EVERY."""
        n = self.calls
        if n < 2:
            return (TORCH if n == 0 else SERIAL), False
        for arm in (TORCH, SERIAL):
            if len(self.times[arm]) < WINDOW:
                return arm, True
        best = self.best()
        if n % EXPLORE_EVERY == 0:
            return (SERIAL if best == TORCH else TORCH), True
        return best, True


class ThreadPolicy:
    """Runs native CPU plan ops on the faster of the two thread settings (module docstring)."""

    def __init__(self, set_serial: Callable[[bool], None], clock: Callable[[], float] = time.perf_counter,
                 threads: Callable[[], int] = torch.get_num_threads):
        self._set_serial, self._clock, self._threads = set_serial, clock, threads
        self._keys: dict[tuple, _Key] = {}

    def run(self, key: tuple, op: Callable):
        """``op()`` under the chosen setting; ``key`` identifies the op and its input shape."""
        if self._threads() <= 1 or not enabled():
            return op()
        state = self._keys.setdefault(key, _Key())
        arm, timed = state.choose()
        state.calls += 1
        serial = arm == SERIAL
        if serial:
            self._set_serial(True)
        start = self._clock()
        try:
            result = op()
        finally:
            if serial:
                self._set_serial(False)
        if timed:
            state.times[arm].append(self._clock() - start)
        return result

    def decisions(self) -> dict[tuple, str]:
        """Per key, the setting the policy would run next (once both are measured)."""
        return {key: state.best() for key, state in self._keys.items()
                if all(len(t) == WINDOW for t in state.times.values())}

    def reset(self) -> None:
        self._keys.clear()


def _set_cpu_serial(serial: bool) -> None:
    from . import load  # loaded by then (the ops that get here are its own), but not at import
    load()
    torch.ops.aia_native.set_cpu_serial(serial)


POLICY = ThreadPolicy(_set_cpu_serial)  # the one the native backend uses
