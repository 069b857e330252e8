"""Every fused backend on every device it is made for, against the reference: the ten
variants x train/eval x BN or not x dtypes (outputs, the input's and every parameter's
gradient, BN running statistics), layouts (strided 4-D, 5-D video), odd shapes, gradcheck in float64, determinism,
opcheck of the fused op, torch.compile, autocast.

A target is one line of TARGETS; a new backend gets the whole matrix by adding its line.
Tolerances are one table, TOLERANCE, by dtype. What is specific to one backend (its build,
tiles, emulator, own ops, thread counts, paths) stays in that backend's test file.

Where targets run:
- CPU targets run in every CI process; Triton's runs through its interpreter (conftest.py),
  which is only used where there is no GPU.
- CUDA targets skip without a GPU, saying so. The native CUDA kernels also run without one,
  on the CPU emulator of csrc/emulation/: test_native_cuda_emulated.py runs this file's
  native-cuda target in a process built that way (there CPU tensors run the CUDA kernels,
  and the other targets skip).
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
from dataclasses import dataclass

import pytest
import torch

import aia_kernels
from aia_kernels import backends

from aia_testing import (
    FULL_MATRIX,
    SHAPE,
    VIDEO_LAYOUTS,
    as_function_of_flat_params,
    assert_equal_results,
    compare_with_reference,
    diagonal,
    make_pair,
    run,
    video_input,
)


@dataclass(frozen=True)
class Target:
    backend: str
    device_type: str  # what the kernels are made for: "cpu" or "cuda"
    # gradcheck's fast mode (random projections of the Jacobians) where full Jacobians
    # take minutes (Triton's interpreter; the CUDA emulator always takes it).
    fast_gradcheck: bool = False

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device_type}"


# The one table: a new backend adds its line(s) here.
TARGETS = (
    Target("native", "cpu"),
    Target("triton", "cpu", fast_gradcheck=True),  # Triton's interpreter
    Target("native", "cuda"),  # also on the CPU emulator, see above
    Target("triton", "cuda", fast_gradcheck=True),
)

# (atol, rtol) against the reference, by dtype. float64: the same math in another order.
# float32: the same, rounded in float32 (native sums rows in vector lanes and fused passes).
# Measured on the CPU targets (seed 0, every float32 and half case of the matrix), the
# smallest t with atol = rtol = t that passes: float32 4.1e-6, float16 2.8e-4, bfloat16 4.8e-3.
# Half types: the reference runs in float32 on the same rounded input and upstream gradient
# (aia_testing), and both sides accumulate in float32, so what differs is the final rounding
# of `out` and `grad_x` to the half type (one ulp relative: bf16 2**-8 = 3.9e-3, fp16 2**-11 =
# 4.9e-4, on values up to ~4) plus a little where a value rounds across a gate's sigmoid;
# parameter gradients and running statistics stay near float32.
TOLERANCE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 8e-3),
}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _emulating_cuda() -> bool:
    if importlib.util.find_spec("aia_kernels.native") is None:
        return False
    from aia_kernels import native
    return native.emulating_cuda()


EMULATED = _emulating_cuda()
EMULATED_TARGET = "native-cuda"  # what the emulation build runs, on CPU tensors
GPU = torch.cuda.is_available()


def not_here(target: Target) -> str | None:
    """Why ``target`` does not run in this process (a skip reason), or None."""
    if EMULATED:
        if target.id == EMULATED_TARGET:
            return None
        return ("this process runs the native CUDA emulation build (AIA_NATIVE_CUDA_EMULATION=1), in which CPU "
                "tensors run the CUDA kernels: only the native-cuda target runs here, the others in the main process")
    if target.device_type == "cuda" and not GPU:
        return ("needs a CUDA GPU" + (" (the native CUDA kernels also run on the CPU emulator: "
                                      "test_native_cuda_emulated.py)" if target.backend == "native" else ""))
    if target.backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if target.device_type == "cpu" and GPU:
            return "Triton runs CPU tensors only through its interpreter, which a machine with a GPU does not use"
    return None


def tensor_device(target: Target) -> str:
    """Where the target's tensors live: on the CPU for the CUDA emulator."""
    return "cpu" if EMULATED and target.id == EMULATED_TARGET else target.device_type


@pytest.fixture(params=TARGETS, ids=[t.id for t in TARGETS])
def target(request, monkeypatch):
    """A target that runs here, checked available: a build that failed fails here, with its reason."""
    t = request.param
    reason = not_here(t)
    if reason is not None:
        pytest.skip(reason)
    if t.id == "native-cuda":
        # auto never picks the native CUDA kernels (untested on a GPU); asked for by name, they run.
        monkeypatch.setenv("AIA_NATIVE_CUDA", "1")
    device = torch.device(tensor_device(t))
    reason = backends.unavailable_reason(t.backend, device)
    assert reason is None, f"{t.id} should run here: {reason}"
    return t


def slow_here(target: Target) -> bool:
    """The target runs here through an interpreter or an emulator: seconds per module call."""
    return (target.backend == "triton" and target.device_type == "cpu") or (EMULATED and target.id == EMULATED_TARGET)


def _id(value) -> str:
    return DTYPE_IDS.get(value, str(value))


def on_targets(names: str, cases, slow_cases=None, ids=None):
    """``pytest.mark.parametrize("target," + names)``: every case on every target, but only
    ``slow_cases`` (a subset covering each parameter's values) on a target that is
    :func:`slow_here`, unless FULL_MATRIX. The whole matrix runs where the kernels run
    natively (CPU, a GPU)."""
    ids = ids or (lambda case: "-".join(_id(v) for v in case))
    params = []
    for t in TARGETS:
        subset = slow_cases is not None and slow_here(t) and not FULL_MATRIX
        for case in (slow_cases if subset else cases):
            case = case if isinstance(case, tuple) else (case,)
            params.append(pytest.param(t, *case, id=f"{t.id}-{ids(case)}"))
    return pytest.mark.parametrize("target," + names, params, indirect=["target"])


def compare(target: Target, variant: str, *, dtype=torch.float64, **kwargs):
    atol, rtol = TOLERANCE[dtype]
    return compare_with_reference(variant, target.backend, dtype=dtype, device=tensor_device(target),
                                  atol=atol, rtol=rtol, **kwargs)


# ---- the matrix ----

MODES = {(True, True): "train-bn", (True, False): "train-nobn", (False, True): "eval-bn", (False, False): "eval-nobn"}
VARIANTS = aia_kernels.VARIANTS


@on_targets("variant,train,use_bn", list(itertools.product(VARIANTS, [True, False], [True, False])),
            diagonal(VARIANTS, [True, False], [True, False]), ids=lambda c: f"{c[0]}-{MODES[c[1:]]}")
def test_float64_matches_reference(target, variant, train, use_bn):
    compare(target, variant, use_bn=use_bn, train=train)


@on_targets("variant,train", list(itertools.product(VARIANTS, [True, False])), diagonal(VARIANTS, [True, False]),
            ids=lambda c: f"{c[0]}-{'train' if c[1] else 'eval'}")
def test_float32_matches_reference(target, variant, train):
    compare(target, variant, dtype=torch.float32, train=train)


# Variants covering every plan shape (C / THW stages, 0-2 factors, prod and mean), train and eval.
HALF_CASES = [("C", True), ("ST", True), ("ST", False), ("CinST->STinC", True), ("CinST+STinC", True),
              ("C+ST", True), ("STinC", False), ("STinC->CinST", True)]


@on_targets("variant,train,dtype", [(v, t, d) for v, t in HALF_CASES for d in (torch.float16, torch.bfloat16)],
            [(v, t, d) for (v, t), d in diagonal(HALF_CASES, (torch.float16, torch.bfloat16))])
def test_half_matches_reference(target, variant, train, dtype):
    _, result = compare(target, variant, dtype=dtype, train=train)
    assert result.grad_x.dtype == dtype


# ---- layouts and shapes ----

def strided_input(layout: str, device) -> torch.Tensor:
    """A float64 input of SHAPE whose strides are not the contiguous ones."""
    if layout == "channels_last":
        return torch.randn(SHAPE, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # (N*T, C, W, H) storage seen as (N*T, C, H, W)
        return torch.randn(SHAPE, dtype=torch.float64, device=device).transpose(2, 3).contiguous().transpose(2, 3)
    assert layout == "sliced"  # every other channel, and an inner window of each row
    return torch.randn(SHAPE[0], SHAPE[1] * 2, SHAPE[2], SHAPE[3] + 3, dtype=torch.float64,
                       device=device)[:, ::2, :, 1:-2]


STRIDED_CASES = [
    ("CinST->STinC", "channels_last"), ("CinST->STinC", "transposed"), ("CinST->STinC", "sliced"),
    ("C+ST", "channels_last"), ("C+ST", "transposed"), ("C+ST", "sliced"),
    ("ST", "channels_last"), ("STinC->CinST", "channels_last"), ("STinC->CinST", "transposed"), ("C", "sliced")]


@on_targets("variant,layout", STRIDED_CASES, STRIDED_CASES[0:3] + [("C+ST", "channels_last"), ("C", "sliced")])
def test_strided_inputs(target, variant, layout):
    """Any strides are read in place; the output keeps x's layout."""
    x = strided_input(layout, tensor_device(target))
    assert x.shape == SHAPE and not x.is_contiguous()
    _, result = compare(target, variant, x=x)
    if layout == "channels_last":
        assert result.out.is_contiguous(memory_format=torch.channels_last)


@on_targets("variant,layout_name", list(itertools.product(["CinST->STinC", "C+ST"], VIDEO_LAYOUTS)),
            [(v, layout) for layout, v in diagonal(VIDEO_LAYOUTS, ["CinST->STinC", "C+ST"])])
def test_video_layouts(target, variant, layout_name):
    """5-D input (docs/design.md, "Input layouts"): the kernels get the (N, T, C, H, W) view
    with the input's strides; the output has the input's shape and memory format."""
    x, layout = video_input(layout_name, device=tensor_device(target))
    _, result = compare(target, variant, x=x, layout=layout, num_segments=None)
    assert result.out.shape == x.shape and result.out.stride() == x.stride()


@pytest.mark.parametrize("variant,shape,num_segments", [
    ("CinST", (3, 1, 4, 5), 3), ("ST->C", (4, 3, 1, 5), 2), ("CinST+STinC", (4, 3, 5, 1), 2),
    ("STinC->CinST", (2, 3, 5, 6), 1), ("C->ST", (3, 2, 1, 9), 3), ("ST", (1, 2, 3, 17), 1)],
    ids=["C1", "H1", "W1", "T1", "H1-W9", "N1-W17"])
def test_odd_shapes(target, variant, shape, num_segments):
    x = torch.randn(shape, dtype=torch.float64, device=tensor_device(target))
    compare(target, variant, x=x, num_segments=num_segments)


@pytest.mark.parametrize("variant,shape,num_segments", [
    ("CinST->STinC", (3, 1, 4, 5), 3), ("ST->C", (4, 9, 1, 5), 2), ("CinST+STinC", (4, 3, 5, 1), 2),
    ("STinC->CinST", (2, 17, 5, 6), 1)], ids=["C1", "H1-C9", "W1", "T1-C17"])
def test_odd_shapes_float32(target, variant, shape, num_segments):
    """float32 at small planes takes the native CPU lanes walks (8 channels a vector): planes of
    one row or column, channel counts that leave a partial block of 8."""
    x = torch.randn(shape, dtype=torch.float32, device=tensor_device(target))
    compare(target, variant, x=x, dtype=torch.float32, num_segments=num_segments)


@pytest.mark.parametrize("variant", ["C->ST", "CinST+STinC"])
def test_stride0_grad_out(target, variant):
    """``out.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    ref, fused = make_pair(variant, target.backend, device=tensor_device(target))
    x = torch.randn(SHAPE, dtype=torch.float64, device=tensor_device(target))
    results = []
    for module in (ref, fused):
        xi = x.clone().requires_grad_()
        module(xi).sum().backward()
        results.append((xi.grad, [p.grad for p in module.parameters()]))
    assert fused.last_backend == target.backend
    torch.testing.assert_close(results[1], results[0], atol=1e-10, rtol=1e-8)


# ---- gradients, running statistics, determinism ----

def _gradcheck(target: Target, variant: str, use_bn: bool):
    """Float64, train mode, the input and every parameter. BN momentum 0 keeps the running
    statistics fixed (they do not feed the train-mode output anyway)."""
    device = tensor_device(target)
    module = aia_kernels.build(variant, num_segments=2, use_BN=use_bn, backend=target.backend)
    module = module.to(device, torch.float64).train()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = 0.0
    x = torch.randn(4, 3, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    fn, inputs = as_function_of_flat_params(module, x)
    fast = target.fast_gradcheck or EMULATED
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)
    assert module.last_backend == target.backend


# On slow targets: a unit, a chain and a parallel mean (the matrix compares every variant's gradients).
@on_targets("variant", VARIANTS, ["ST", "CinST->STinC", "C+ST"])
def test_gradcheck(target, variant):
    _gradcheck(target, variant, use_bn=True)


def test_gradcheck_without_bn(target):
    _gradcheck(target, "CinST->STinC", use_bn=False)


def test_momentum_none_running_stats(target):
    """momentum=None: cumulative moving average over steps, as nn.BatchNorm3d does."""
    device = tensor_device(target)
    ref, fused = make_pair("C+ST", target.backend, device=device)
    for module in (ref, fused):
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.momentum = None
    for _ in range(3):
        x = torch.randn(SHAPE, dtype=torch.float64, device=device)
        torch.testing.assert_close(fused(x), ref(x), atol=1e-10, rtol=1e-8)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("variant", ["STinC", "CinST->STinC"])
def test_deterministic(target, variant):
    """Same inputs, bitwise identical outputs, gradients and buffers (no atomics)."""
    device = tensor_device(target)
    _, fused = make_pair(variant, target.backend, dtype=torch.float32, device=device)
    x = torch.randn(SHAPE, device=device)
    grad_out = torch.randn(SHAPE, device=device)
    first = run(copy.deepcopy(fused), x, grad_out)
    second = run(copy.deepcopy(fused), x, grad_out)
    assert_equal_results(first, second)


# ---- integration: the torch.library op, torch.compile, autocast ----

@on_targets("variant", ["C", "CinST->STinC"], ["C"])
def test_opcheck_fused_forward(target, variant):
    device = tensor_device(target)
    ref = aia_kernels.build(variant, num_segments=3).double().to(device)
    x = torch.randn(SHAPE, dtype=torch.float64, device=device, requires_grad=True)
    gates = ref.gates()
    args = (x, variant, 3, target.backend, [c.weight for _, c, _ in gates], [b.weight for _, _, b in gates],
            [b.bias for _, _, b in gates], [b.running_mean for _, _, b in gates],
            [b.running_var for _, _, b in gates], [1] * len(gates), [1e-5] * len(gates), True)
    torch.library.opcheck(torch.ops.aia_kernels.fused_forward.default, args)


# Targets known not to compile as one graph, and why: the test expects that failure
# (strict: it fails once the target compiles, so the entry must then go).
def test_compile_fullgraph(target):
    """A small model around the module compiles as one graph (aot_eager on CPU, inductor on CUDA)."""
    device = tensor_device(target)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 5, 1),
                                aia_kernels.build("CinST->STinC", num_segments=3, backend=target.backend),
                                torch.nn.ReLU()).double().to(device)
    eager = copy.deepcopy(model)
    eager[1].backend = "reference"
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    x = torch.randn(SHAPE, dtype=torch.float64, device=device, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = eager(x_ref)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)


def test_autocast(target):
    """Under autocast the op keeps its own precision: a half input stays half, accumulation is float32."""
    device = tensor_device(target)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    ref, fused = make_pair("C->ST", target.backend, dtype=torch.float32, device=device)
    conv = torch.nn.Conv2d(5, 5, 1).to(device)
    x = torch.randn(SHAPE, device=device)
    with torch.autocast(device, dtype=dtype):
        h = conv(x)  # autocast makes this half
        assert h.dtype == dtype
        out = fused(h)
    assert out.dtype == dtype and fused.last_backend == target.backend
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref(h.float()), atol=atol, rtol=rtol)
    out.float().sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
