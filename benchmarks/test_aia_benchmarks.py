"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

On CUDA: the spec shapes and a tiny one, every implementation that is available, the
L2 flushed before each round (pytest-benchmark's ``setup``, untimed); the measured call
ends with a device synchronisation. On CPU: only the tiny shape, the eager reference and
any fused backend that runs on CPU; GPU-only cases are skipped with the reason.
Each case records the design bytes and first-call (compile) time in ``extra_info``.
The runner (``python -m benchmarks.run``), with CUDA events, is the reference report;
this suite is for pytest-benchmark's comparison tooling (``--benchmark-compare``).

Variants: the headline ``CinST->STinC``; ``AIA_BENCH_VARIANTS=all`` (or a comma list) widens it.
"""
from __future__ import annotations

import os

import pytest
import torch

import aia_kernels

from .bytes_model import MODES, copy_bytes, design_bytes
from .cases import (
    COMPILE_MODES,
    DTYPES,
    HEADLINE,
    IMPLS,
    SHAPE_SETS,
    SPEC_SHAPES,
    make_input,
    make_module,
    make_step,
    parse_list,
    prepare_impl,
    shape_str,
    unavailable_reason,
)
from .timing import Timer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROUNDS, WARMUP = (30, 5) if CUDA else (5, 1)
VARIANTS = parse_list(os.environ.get("AIA_BENCH_VARIANTS", HEADLINE), aia_kernels.VARIANTS, name="variant")
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="spec shapes: kernel timings need CUDA")
SHAPES = [pytest.param(s, id=shape_str(s), marks=NEEDS_CUDA) for s in SPEC_SHAPES] + \
         [pytest.param(s, id=shape_str(s)) for s in SHAPE_SETS["tiny"]]


@pytest.fixture(scope="module")
def timer():
    return Timer(DEVICE)


def _skip_reason(impl: str) -> str | None:
    if not CUDA and impl in COMPILE_MODES:
        return "GPU-only case: the compiled peer is compared on CUDA"
    return unavailable_reason(impl, DEVICE)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_copy(benchmark, timer, shape, dtype):
    """``x.clone()``: the copy bandwidth that is the roofline."""
    x = make_input(shape, DTYPES[dtype], DEVICE)
    benchmark.extra_info["bytes"] = copy_bytes(shape, DTYPES[dtype])
    benchmark.pedantic(lambda: (x.clone(), timer.sync()), setup=timer.flush_cache, rounds=ROUNDS,
                       warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_aia(benchmark, timer, variant, shape, dtype, mode, impl):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    x = make_input(shape, DTYPES[dtype], DEVICE)
    module, fn = prepare_impl(make_module(variant, mode, DEVICE), impl)
    step = make_step(module, fn, x, mode)
    first_s, _ = timer.first_call(step)
    benchmark.extra_info.update(first_call_s=first_s, design_bytes=design_bytes(variant, shape, DTYPES[dtype], mode))
    benchmark.pedantic(lambda: (step(), timer.sync()), setup=timer.flush_cache, rounds=ROUNDS,
                       warmup_rounds=WARMUP, iterations=1)
