"""Shared helpers: build a reference module and a copy on another backend, run both,
and compare outputs, every gradient and every buffer."""
from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import aia_kernels
from aia_kernels.fused import fused_backward_op, fused_forward_op

# Small, odd sizes: (N*T, C, H, W) with T = 3.
NUM_SEGMENTS = 3
SHAPE = (6, 5, 4, 7)
# The same clip sizes as a 5-D video tensor: N = 2, C = 5, T = 3, H = 4, W = 7.
VIDEO_SHAPE = (2, 5, 3, 4, 7)
# 5-D inputs by name: (module layout argument, how the tensor is made from an NCTHW one).
VIDEO_LAYOUTS = ("NCTHW", "channels_last_3d", "NTCHW")


def video_input(name: str, shape=VIDEO_SHAPE, dtype=torch.float64, device="cpu") -> tuple[torch.Tensor, str | None]:
    """(x, layout argument) for a 5-D input named in VIDEO_LAYOUTS; ``shape`` is (N, C, T, H, W)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    if name == "NCTHW":
        return x, None
    if name == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d), None
    if name == "NTCHW":
        return x.transpose(1, 2).contiguous(), "NTCHW"
    raise ValueError(name)


def randomize_bn(module: nn.Module) -> None:
    """Non-trivial BN parameters and running statistics, so eval mode tests something."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def make_pair(variant: str, backend: str, *, use_bn: bool = True, train: bool = True,
              dtype: torch.dtype = torch.float64, num_segments: int | None = NUM_SEGMENTS, device="cpu",
              layout: str | None = None):
    """(reference module, same weights on ``backend``)."""
    ref = aia_kernels.build(variant, num_segments=num_segments, use_BN=use_bn, backend="reference", layout=layout)
    ref = ref.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    randomize_bn(ref)
    ref.train(train)
    other = copy.deepcopy(ref)
    other.backend = backend
    return ref, other


@dataclass
class Result:
    out: torch.Tensor
    grad_x: torch.Tensor
    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def run(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Result:
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(grad_out)
    return Result(out.detach(), x.grad,
                  {n: p.grad for n, p in module.named_parameters() if p.grad is not None},
                  {n: b.detach().clone() for n, b in module.named_buffers()})


def as_function_of_flat_params(module, x):
    """(fn, inputs): fn(x, flat) runs the module with its parameters taken from one flat
    vector, so that gradcheck perturbs two inputs instead of one per parameter (the
    interpreter is slow); every parameter still gets checked."""
    names, shapes = zip(*[(n, p.shape) for n, p in module.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).requires_grad_()

    def fn(x, flat):
        params = dict(zip(names, (f.view(s) for f, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return functional_call(module, params, (x,))
    return fn, (x, flat)


def assert_close_results(a: Result, b: Result, atol: float, rtol: float) -> None:
    torch.testing.assert_close(b.out.to(a.out.dtype), a.out, atol=atol, rtol=rtol, msg="output")
    torch.testing.assert_close(b.grad_x.to(a.grad_x.dtype), a.grad_x, atol=atol, rtol=rtol, msg="grad of input")
    assert a.grads.keys() == b.grads.keys()
    for name in a.grads:
        torch.testing.assert_close(b.grads[name].to(a.grads[name].dtype), a.grads[name], atol=atol, rtol=rtol,
                                   msg=f"grad of {name}")
    for name in a.buffers:
        torch.testing.assert_close(b.buffers[name].to(a.buffers[name].dtype), a.buffers[name], atol=atol,
                                   rtol=rtol, msg=f"buffer {name}")


def assert_equal_results(a: Result, b: Result) -> None:
    """Bitwise equality of outputs, every gradient and every buffer (determinism checks)."""
    assert torch.equal(a.out, b.out), "output"
    assert torch.equal(a.grad_x, b.grad_x), "grad of input"
    assert a.grads.keys() == b.grads.keys()
    for name in a.grads:
        assert torch.equal(a.grads[name], b.grads[name]), name
    for name in a.buffers:
        assert torch.equal(a.buffers[name], b.buffers[name]), name


def compare_with_reference(variant: str, backend: str, *, use_bn=True, train=True, dtype=torch.float64,
                           x: torch.Tensor | None = None, atol=1e-10, rtol=1e-8, device="cpu",
                           num_segments: int | None = NUM_SEGMENTS, layout: str | None = None) -> tuple[Result, Result]:
    """Run ``variant`` on the reference and on ``backend`` and assert they agree; the
    output and grad_x have x's strides where x is dense (its memory format).

    For half types the reference runs in float32 on the same (rounded) input, so the
    tolerance measures the fused backend's own rounding only.
    """
    ref, other = make_pair(variant, backend, use_bn=use_bn, train=train, dtype=dtype,
                           num_segments=num_segments, device=device, layout=layout)
    if x is None:
        x = torch.randn(SHAPE, dtype=dtype, device=device)
    grad_out = torch.randn(x.shape, dtype=dtype, device=device)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    a = run(ref, x.to(ref_dtype), grad_out.to(ref_dtype))
    b = run(other, x, grad_out)
    assert other.last_backend == backend
    assert b.out.dtype == x.dtype and b.out.shape == x.shape
    if x.dim() == 5 and torch.empty_like(x).stride() == x.stride():  # dense: out and grad_x keep its memory format
        assert b.out.stride() == x.stride() and b.grad_x.stride() == x.stride(), (b.out.stride(), x.stride())
    assert_close_results(a, b, atol, rtol)
    return a, b


class FullSizeAllocations(TorchDispatchMode):
    """Records every op output with at least ``numel`` elements that is a new allocation
    (not a view of an input). The fused ops are run from their Python implementation
    with the mode still active, so the allocations inside them are seen too."""

    def __init__(self, numel):
        super().__init__()
        self.numel = numel
        self.allocations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aia_kernels":
            impl = {"fused_forward": fused_forward_op,
                    "fused_backward": fused_backward_op}[func.__name__.split(".")[0]]._init_fn
            with self:
                return impl(*args, **kwargs)
        result = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(result)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in inputs):
                self.allocations.append((str(func), tuple(t.shape)))
        return result


def plan_op_args(variant: str = "CinST->STinC", dtype: torch.dtype = torch.float64, device="cpu"):
    """(module, arguments of aia_native::plan_forward) for a small module in train mode."""
    from aia_kernels import native
    from aia_kernels.fused import bn_mode
    from aia_kernels.plan import build_plan
    module = aia_kernels.build(variant, num_segments=NUM_SEGMENTS, backend="native").to(device, dtype).train()
    gates = module.gates()
    x = torch.randn(SHAPE, dtype=dtype, device=device)
    bns = [bn for _, _, bn in gates]
    args = (x, NUM_SEGMENTS, list(native.encode_plan(build_plan(variant))),
            [conv.weight.detach() for _, conv, _ in gates],
            [bn.weight.detach() for bn in bns], [bn.bias.detach() for bn in bns], [bn.running_mean for bn in bns],
            [bn.running_var for bn in bns], [bn_mode(bn) for bn in bns], [bn.eps for bn in bns])
    return module, args


# ---- the GPU machine's conditions, reproduced on a CPU machine ----
# What benchmarks/gpu_run.sh meets there (README, "GPU run"): CUDA available and a CUDA
# toolkit, so the native extension is built with its CUDA kernels, and these versions.
GPU_MACHINE_VERSIONS = {"torch": "2.11.0+cu130", "triton": "3.6.0", "numpy": "2.5.2"}


def report_cuda_available(monkeypatch) -> None:
    """This process says what the GPU machine says: CUDA available, a CUDA toolkit present
    (nothing can run on a CUDA device; for the code paths that choose by it)."""
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME or "/usr/local/cuda")


# Prepended to a child process's script: where this machine has no CUDA, the child reports
# CUDA available (and a CUDA toolkit) as the GPU machine does, unless CUDA_VISIBLE_DEVICES=""
# hides it, as it would hide a real GPU. On a GPU machine it changes nothing.
AS_ON_A_GPU_MACHINE = (
    "import os as _os, torch as _torch, torch.utils.cpp_extension as _ext\n"
    "if not _torch.cuda.is_available() and _os.environ.get('CUDA_VISIBLE_DEVICES') != '':\n"
    "    _torch.cuda.is_available = lambda: True\n"
    "    _ext.CUDA_HOME = _ext.CUDA_HOME or '/usr/local/cuda'\n")


def cuda_hidden(env: dict) -> dict:
    """``env`` for a child process that must build and run the C++ CPU code only, also on a
    GPU machine (where the native build would otherwise add the CUDA kernels: minutes of nvcc)."""
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


def randomize_network_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics in every BN of a network (eval mode uses them)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def small_tsm(variant: str, num_segments: int, backend: str = "native") -> nn.Module:
    """A TSM network in eval mode with the whole ResNet structure (stem, four stages, the
    shift, AIA in every block, TSN's head) but one narrow block per stage: cheap to export
    and to compile on a CPU."""
    from aia_kernels.models import TSN, ResNet
    base = ResNet(layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), variant=variant, num_segments=num_segments,
                  backend=backend, shift=True, stem_width=8)
    return randomize_network_bn(TSN(base, num_classes=3, num_segments=num_segments)).eval()


def run_shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every worker of this test run shares (created if missing): under pytest-xdist
    each worker has its own basetemp, and their common parent is the run's. Tests that build
    or compile the same thing use it, with a lock, so a second worker waits for the first's
    result instead of repeating minutes of CPU."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    path.mkdir(exist_ok=True)
    return path


def assert_standard_onnx(model_proto) -> None:
    """Standard ONNX operators only: no custom domain, no local functions left."""
    domains = {node.domain for node in model_proto.graph.node} | {f.domain for f in model_proto.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains: {domains}"


def diagonal(first, *rest) -> list[tuple]:
    """Each value of ``first`` once, paired in turn with the combinations of ``rest``: every
    value of every parameter appears, in len(first) cases instead of the whole product.
    Where kernels run interpreted or emulated (seconds a call) a matrix runs this subset,
    unless FULL_MATRIX."""
    combos = list(itertools.product(*rest))
    return [(f, *combos[i % len(combos)]) for i, f in enumerate(first)]


# AIA_TEST_FULL_MATRIX=1: the whole product on the interpreted and emulated targets too,
# not their covering subsets (CI runs the subsets; the product adds several minutes on 2 cores).
FULL_MATRIX = os.environ.get("AIA_TEST_FULL_MATRIX", "0") == "1"
