"""backend="triton" end to end: every variant against the reference (outputs, input
and parameter gradients, running statistics), gradcheck, layouts, odd shapes,
determinism, no full-size intermediates, torch.library/compile/autocast
integration. Without CUDA the kernels run through Triton's interpreter
(conftest.py), so shapes stay tiny."""
import copy

import pytest
import torch

import aia_kernels
from aia_kernels import backends

from aia_testing import (
    FullSizeAllocations,
    GPU_MACHINE_VERSIONS,
    NUM_SEGMENTS,
    SHAPE,
    as_function_of_flat_params,
    assert_equal_results,
    compare_with_reference,
    make_pair,
    run,
)

pytest.importorskip("aia_kernels.triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ALL = aia_kernels.VARIANTS
# Variants covering every plan shape (C / THW stages, 0-2 factors, prod and mean) for the slower matrices.
SUBSET = ("C", "ST", "CinST->STinC", "C+ST")


def compare(variant, **kwargs):
    kwargs.setdefault("device", DEVICE)
    return compare_with_reference(variant, "triton", **kwargs)


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_bn", [True, False], ids=["bn", "nobn"])
def test_float64_matches_reference(variant, train, use_bn):
    compare(variant, use_bn=use_bn, train=train, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("variant", ALL)
def test_float32_matches_reference(variant):
    compare(variant, dtype=torch.float32, atol=1e-5, rtol=1e-5)


# Half types: the reference runs in float32 on the same rounded input (aia_testing), so what is
# measured is our own rounding: the output and grad_x are stored in the half type (relative error
# up to one half-ulp: 2^-11 for float16, 2^-8 for bfloat16, on values up to ~4), while everything
# else accumulates in float32 (parameter gradients and running statistics agree to ~1e-5).
HALF_TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3)}


@pytest.mark.parametrize("dtype", list(HALF_TOL), ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant,train", [("C", True), ("ST", False), ("CinST->STinC", True), ("C+ST", True),
                                           ("STinC", False)])
def test_half_matches_reference(variant, dtype, train):
    compare(variant, dtype=dtype, train=train, **HALF_TOL[dtype])


@pytest.mark.parametrize("variant", ALL)
def test_gradcheck(variant):
    """Float64, train mode, input and every parameter. BN momentum 0 keeps the running stats fixed."""
    module = aia_kernels.build(variant, num_segments=2, backend="triton").double().to(DEVICE)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = 0.0
    x = torch.randn(4, 3, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn, inputs = as_function_of_flat_params(module, x)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant,layout", [("ST", "channels_last"), ("STinC->CinST", "channels_last"),
                                            ("STinC->CinST", "transposed"), ("C", "sliced")])
def test_strided_inputs(variant, layout):
    base = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # (N*T, C, W', H') storage seen as (N*T, C, H, W)
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        x = torch.randn(SHAPE[0], 2 * SHAPE[1], SHAPE[2], SHAPE[3] + 1, dtype=torch.float64,
                        device=DEVICE)[:, ::2, :, 1:]
    _, result = compare(variant, x=x)
    if layout == "channels_last":
        assert result.out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("variant", ["C->ST", "CinST+STinC"])
def test_stride0_grad_out(variant):
    """``out.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    ref, tri = make_pair(variant, "triton", device=DEVICE)
    x = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE)
    results = []
    for module in (ref, tri):
        xi = x.clone().requires_grad_()
        module(xi).sum().backward()
        results.append((xi.grad, [p.grad for p in module.parameters()]))
    torch.testing.assert_close(results[1], results[0], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("variant,shape,num_segments", [
    ("CinST", (3, 1, 4, 5), 3), ("ST->C", (4, 3, 1, 5), 2), ("CinST+STinC", (4, 3, 5, 1), 2),
    ("STinC->CinST", (2, 3, 5, 6), 1), ("C->ST", (3, 2, 1, 9), 3), ("ST", (1, 2, 3, 17), 1)],
    ids=["C1", "H1", "W1", "T1", "H1-W9", "N1-W17"])
def test_odd_shapes(variant, shape, num_segments):
    compare(variant, x=torch.randn(shape, dtype=torch.float64, device=DEVICE), num_segments=num_segments)


@pytest.mark.parametrize("variant", ["STinC", "CinST->STinC"])
def test_deterministic(variant):
    """Same inputs, bitwise identical outputs, gradients and buffers (no atomics)."""
    ref, tri = make_pair(variant, "triton", dtype=torch.float32, device=DEVICE)
    x = torch.randn(SHAPE, device=DEVICE)
    grad_out = torch.randn(SHAPE, device=DEVICE)
    first = run(copy.deepcopy(tri), x, grad_out)
    second = run(copy.deepcopy(tri), x, grad_out)
    assert_equal_results(first, second)


@pytest.mark.parametrize("variant", ALL)
def test_no_full_size_intermediates(variant):
    """Only ``out`` (forward) and ``grad_x`` (backward) are full-size."""
    module = aia_kernels.build(variant, num_segments=NUM_SEGMENTS, backend="triton").double().to(DEVICE)
    x = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE)
    with FullSizeAllocations(x.numel()) as forward:
        out = module(x)
    with FullSizeAllocations(x.numel()) as backward:
        out.backward(grad_out)
    assert [shape for _, shape in forward.allocations] == [SHAPE], forward.allocations
    assert [shape for _, shape in backward.allocations] == [SHAPE], backward.allocations
    assert x.grad is not None


@pytest.mark.parametrize("variant", ["C", "CinST->STinC"])
def test_opcheck_fused_forward(variant):
    ref = aia_kernels.build(variant, num_segments=3).double().to(DEVICE)
    x = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE, requires_grad=True)
    gates = ref.gates()
    args = (x, variant, 3, "triton", [c.weight for _, c, _ in gates], [b.weight for _, _, b in gates],
            [b.bias for _, _, b in gates], [b.running_mean for _, _, b in gates],
            [b.running_var for _, _, b in gates], [1] * len(gates), [1e-5] * len(gates))
    torch.library.opcheck(torch.ops.aia_kernels.fused_forward.default, args)


def test_compile_fullgraph():
    """A small model around the module compiles as one graph (aot_eager on CPU, inductor on CUDA)."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 5, 1),
                                aia_kernels.build("CinST->STinC", num_segments=3, backend="triton"),
                                torch.nn.ReLU()).double().to(DEVICE)
    eager = copy.deepcopy(model)
    eager[1].backend = "reference"
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    x = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = eager(x_ref)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)


def test_autocast():
    """Under autocast the op keeps its own precision: a half input stays half, accumulation is float32."""
    dtype = torch.float16 if CUDA else torch.bfloat16
    ref, tri = make_pair("C->ST", "triton", dtype=torch.float32, device=DEVICE)
    conv = torch.nn.Conv2d(5, 5, 1).to(DEVICE)
    x = torch.randn(SHAPE, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        h = conv(x)  # autocast makes this half
        assert h.dtype == dtype
        out = tri(h)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref(h.float()), **HALF_TOL[dtype])
    out.float().sum().backward()
    assert all(p.grad is not None for p in tri.parameters())


def test_frozen_parameters_get_no_grad_and_no_work(monkeypatch):
    """requires_grad=False parameters: no gradient, and gate_backward is not asked for them."""
    ref, tri = make_pair("CinST", "triton", device=DEVICE)
    for name, p in tri.named_parameters():
        if not name.startswith("T_"):
            p.requires_grad_(False)
    asked = []
    prims = backends.get("triton", torch.device(DEVICE)).primitives
    original = prims.gate_backward

    def spy(*args, **kwargs):
        asked.append(args[-1])
        return original(*args, **kwargs)
    monkeypatch.setattr(prims, "gate_backward", spy)
    x = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE, requires_grad=True)
    tri(x).sum().backward()
    for name, p in tri.named_parameters():
        assert (p.grad is not None) == name.startswith("T_"), name
    # needs = (pooled, conv, bn weight, bn bias): only the T gate asks for parameter gradients.
    assert sum(any(needs[1:]) for needs in asked) == 1
    # Nothing asks for anything when neither the input nor any parameter needs a gradient.
    asked.clear()
    tri.requires_grad_(False)
    assert not tri(x.detach()).requires_grad and not asked


def test_momentum_none_running_stats():
    """momentum=None: cumulative moving average over steps, as nn.BatchNorm3d does."""
    ref, tri = make_pair("C+ST", "triton", device=DEVICE)
    for module in (ref, tri):
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.momentum = None
    for _ in range(3):
        x = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE)
        torch.testing.assert_close(tri(x), ref(x), atol=1e-10, rtol=1e-8)
    for (name, a), (_, b) in zip(ref.named_buffers(), tri.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("machine", ["this", "gpu"])
def test_unavailable_without_interpreter_or_cuda(monkeypatch, machine):
    """CUDA tensors always; CPU tensors only through the interpreter, and then only where
    the interpreter works with the installed NumPy: on the GPU machine (Triton 3.6, NumPy
    2.5.2) it does not, and the CPU is refused with that reason."""
    import numpy
    import triton

    from aia_kernels.triton import interpreter_problem, unavailable_reason
    if machine == "gpu":
        monkeypatch.setattr(triton, "__version__", GPU_MACHINE_VERSIONS["triton"])
        monkeypatch.setattr(numpy, "__version__", GPU_MACHINE_VERSIONS["numpy"])
        assert "9171" in interpreter_problem()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in unavailable_reason(torch.device("cpu"))
    assert unavailable_reason(torch.device("cuda", 0)) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason(torch.device("cpu")) == interpreter_problem()
    assert unavailable_reason(torch.device("cuda", 0)) is None


def test_interpreter_refused_where_triton_and_numpy_clash(monkeypatch):
    """Triton < 3.7's interpreter with NumPy >= 2.4 fails every launch (triton-lang/triton#9171):
    the backend says so instead."""
    import numpy
    import triton

    from aia_kernels.triton import unavailable_reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton_version, numpy_version, refused in (("3.6.0", "2.4.6", True), ("3.6.0", "2.5.2", True),
                                                   ("3.6.0", "2.3.5", False),
                                                   ("3.7.0", "2.4.6", False), ("3.10.1", "2.5.0rc1", False),
                                                   ("3.5.1", "3.0.0", True)):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        reason = unavailable_reason(torch.device("cpu"))
        assert (reason is not None and "9171" in reason and "numpy<2.4" in reason) == refused, (
            triton_version, numpy_version, reason)
    assert unavailable_reason(torch.device("cuda", 0)) is None  # the compiler is not affected


@pytest.mark.skipif(not CUDA, reason="GPU-only: the interpreter is not representative of kernel speed")
@pytest.mark.parametrize("shape", [(64, 64, 56, 56), (64, 512, 7, 7)])
def test_resnet_shapes_on_gpu(shape):
    """The ResNet-50 AIA shapes in float32 and channels_last agree with the reference on the GPU."""
    x = torch.randn(shape, device="cuda")
    compare("CinST->STinC", x=x, dtype=torch.float32, num_segments=8, atol=1e-4, rtol=1e-4)
    compare("CinST->STinC", x=x.contiguous(memory_format=torch.channels_last), dtype=torch.float32,
            num_segments=8, atol=1e-4, rtol=1e-4)
