"""What is specific to backend="triton": no full-size intermediates, frozen parameters
asking for no work, where it can run (the interpreter and its NumPy clash), the ResNet
shapes on a GPU. The variant x mode x dtype matrix against the reference, gradcheck,
layouts, determinism and the op/compile/autocast integration are test_conformance.py's
triton targets. Without CUDA the kernels run through Triton's interpreter (conftest.py),
so shapes stay tiny."""

import pytest
import torch

import aia_kernels
from aia_kernels import backends

from aia_testing import (
    GPU_MACHINE_VERSIONS,
    NUM_SEGMENTS,
    SHAPE,
    FullSizeAllocations,
    compare_with_reference,
    make_pair,
)

pytest.importorskip("aia_kernels.triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ALL = aia_kernels.VARIANTS


def compare(variant, **kwargs):
    kwargs.setdefault("device", DEVICE)
    return compare_with_reference(variant, "triton", **kwargs)





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
