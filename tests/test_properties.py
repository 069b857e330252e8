"""Property-based tests (hypothesis): random sizes (1 and primes among them), input layouts
(slices, transposes, channels-last), upstream-gradient layouts (expanded, transposed), dtypes,
variants, BatchNorm modes and train/eval, on every fused backend that runs here, against the
reference: the output, every gradient and every buffer (running statistics included), or the
same kind of error where the reference refuses the input.

CI runs a small, derandomized (seeded) profile; ``AIA_HYPOTHESIS_PROFILE=long`` runs many
more examples with fresh randomness. What these tests find is fixed and kept as a plain
regression test beside the code it concerns."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aia_kernels

from aia_testing import assert_close_results, make_pair, run

settings.register_profile("ci", max_examples=20, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("AIA_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# The Triton interpreter runs a kernel in Python: a few small examples only.
TRITON_EXAMPLES = 3 if PROFILE == "ci" else 40

SIDES = [1, 2, 3, 5, 7]
BN_MODES = ["none", "train", "eval", "untracked", "cumulative"]
TOLERANCE = {torch.float64: (1e-9, 1e-7), torch.float32: (5e-4, 5e-4),
             torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 2e-2)}


@st.composite
def cases(draw, dtypes, max_side=7):
    sides = [s for s in SIDES if s <= max_side]
    return dict(
        variant=draw(st.sampled_from(aia_kernels.VARIANTS)),
        num_segments=draw(st.sampled_from([1, 2, 3, 5])),
        clips=draw(st.integers(1, 2)),
        channels=draw(st.sampled_from(sides)),
        height=draw(st.sampled_from(sides)),
        width=draw(st.sampled_from(sides + [11] if max_side >= 7 else sides)),
        dtype=draw(st.sampled_from(dtypes)),
        bn=draw(st.sampled_from(BN_MODES)),
        layout=draw(st.sampled_from(["contiguous", "slice", "transpose", "channels_last"])),
        grad_layout=draw(st.sampled_from(["contiguous", "expanded", "transpose"])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def tensor(shape, layout: str, dtype) -> torch.Tensor:
    """A random (N*T, C, H, W) tensor with the given memory layout."""
    n, c, h, w = shape
    if layout == "slice":
        return torch.randn(n, 2 * c, h, w + 2, dtype=dtype)[:, ::2, :, 1:-1]
    if layout == "transpose":
        return torch.randn(n, c, w, h, dtype=dtype).transpose(2, 3)
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if layout == "expanded":
        return torch.randn(1, c, h, w, dtype=dtype).expand(shape)
    return torch.randn(shape, dtype=dtype)


def set_bn_mode(module: torch.nn.Module, mode: str) -> None:
    for _, _, bn in module.gates():
        if mode == "untracked":  # batch statistics in train and eval, no buffers
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
        elif mode == "cumulative":
            bn.momentum = None


def check_against_reference(backend: str, case: dict) -> None:
    torch.manual_seed(case["seed"])
    dtype, bn = case["dtype"], case["bn"]
    ref, other = make_pair(case["variant"], backend, use_bn=bn != "none", train=bn != "eval", dtype=dtype,
                           num_segments=case["num_segments"])
    for module in (ref, other):
        set_bn_mode(module, bn)
    shape = (case["clips"] * case["num_segments"], case["channels"], case["height"], case["width"])
    x = tensor(shape, case["layout"], dtype)
    grad_out = tensor(shape, case["grad_layout"], dtype)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    try:
        expected = run(ref, x.to(ref_dtype), grad_out.to(ref_dtype))
    except (ValueError, RuntimeError) as exc:  # e.g. one value per BN channel in training
        with pytest.raises(type(exc)):
            run(other, x, grad_out)
        return
    got = run(other, x, grad_out)
    assert other.last_backend == backend
    assert got.out.dtype == dtype and got.out.shape == shape and got.grad_x.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    assert_close_results(expected, got, atol, rtol)


@given(case=cases([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_native_matches_reference(case):
    pytest.importorskip("aia_kernels.native").load()  # a build failure fails, with the compiler's message
    check_against_reference("native", case)


@settings(max_examples=TRITON_EXAMPLES)
@given(case=cases([torch.float64, torch.float32], max_side=3))
def test_triton_matches_reference(case):
    pytest.importorskip("aia_kernels.triton")
    check_against_reference("triton", case)
