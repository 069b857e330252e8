"""How many threads the native CPU plan ops use: torch's intra-op threads, or the calling
thread alone, chosen per op and input by timing both.

Why: a native module makes about fifteen parallel regions per step, each a few hundred
microseconds. When another process keeps one of the cores busy, the thread sharing its core
is descheduled for whole time slices and every region waits for it: with 2 threads on 2
cores and one core busy, a step was measured 1.89x slower than with 1 thread
(benchmarks/cpu_contention.py; docs/native.md). Results do not depend on the thread count
(fixed partial sums), so switching changes no result.

How: for each (op, plan, shape, strides, dtype) key the policy times the plan op with
torch's threads and with ``torch.set_num_threads(1)`` around it (after one warm-up call of
each), then runs the faster one, timing it on every call and the other again
``EXPLORE_EVERY`` calls after a decision, then at doubling intervals up to ``EXPLORE_MAX``,
so that it follows the machine's load. ``torch.set_num_threads`` sets OpenMP's thread count of
the calling thread (and torch's default for threads started meanwhile); the count is
restored after the op. With torch set to 1 thread, or ``AIA_NATIVE_ADAPTIVE_THREADS=0``, the
policy does nothing. ``decisions()`` says what it chose for each key.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque
from typing import Callable

import torch

TORCH, SERIAL = "torch threads", "calling thread"
EXPLORE_EVERY = 32  # calls until the setting not in use is measured again; doubles while
EXPLORE_MAX = 256   # the decision holds (up to this), back to EXPLORE_EVERY when it changes
WINDOW = 3          # the last timings of each arm that decide (their median)


def enabled() -> bool:
    return os.environ.get("AIA_NATIVE_ADAPTIVE_THREADS", "1") != "0"


class _Key:
    __slots__ = ("calls", "times", "decided", "every", "next_explore")

    def __init__(self):
        self.calls = 0
        self.times = {TORCH: deque(maxlen=WINDOW), SERIAL: deque(maxlen=WINDOW)}
        self.decided, self.every, self.next_explore = None, EXPLORE_EVERY, 0

    def best(self) -> str:
        return min(self.times, key=lambda arm: statistics.median(self.times[arm]))

    def choose(self) -> tuple[str, bool]:
        """(arm, timed): the first call of each arm warms up (not timed), then each is timed
        until it has WINDOW samples; afterwards the best (timed: if it gets slower, that shows
        at once), and the other now and then (it may have got faster)."""
        n = self.calls
        if n < 2:
            return (TORCH if n == 0 else SERIAL), False
        for arm in (TORCH, SERIAL):
            if len(self.times[arm]) < WINDOW:
                return arm, True
        best = self.best()
        if best != self.decided:
            self.decided, self.every, self.next_explore = best, EXPLORE_EVERY, n + EXPLORE_EVERY
        if n >= self.next_explore:
            self.every = min(2 * self.every, EXPLORE_MAX)
            self.next_explore = n + self.every
            return (SERIAL if best == TORCH else TORCH), True
        return best, True


class ThreadPolicy:
    """Runs native CPU plan ops on the faster of the two thread settings (module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 get_threads: Callable[[], int] = torch.get_num_threads,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self._clock, self._get_threads, self._set_threads = clock, get_threads, set_threads
        self._keys: dict[tuple, _Key] = {}

    def run(self, key: tuple, op: Callable):
        """``op()`` under the chosen setting; ``key`` identifies the op and its input."""
        threads = self._get_threads()
        if threads <= 1 or not enabled():
            return op()
        state = self._keys.setdefault(key, _Key())
        arm, timed = state.choose()
        state.calls += 1
        serial = arm == SERIAL
        if serial:
            self._set_threads(1)
        start = self._clock()
        try:
            result = op()
        finally:
            if serial:
                self._set_threads(threads)
        if timed:
            state.times[arm].append(self._clock() - start)
        return result

    def decisions(self) -> dict[tuple, str]:
        """Per key, the setting the policy would run next (once both are measured)."""
        return {key: state.best() for key, state in self._keys.items()
                if all(len(t) == WINDOW for t in state.times.values())}

    def reset(self) -> None:
        self._keys.clear()


POLICY = ThreadPolicy()  # the one the native backend uses
