"""5-D video input, (N, C, T, H, W) contiguous or channels_last_3d and (N, T, C, H, W),
on every backend: the spec's semantics on the (N, T, C, H, W) view, values and every
gradient against the reference, fp64 gradcheck, determinism, no full-size copy of the
input or the output, torch.compile(fullgraph=True), opcheck, clear errors.

The backends: the generic executor on plain-torch primitives ("executor", which checks
the plan and the 5-D view handling without any kernel), the native C++ kernels, and the
Triton kernels (through the interpreter on CPU: a smaller matrix). Every backend target,
the CUDA ones included, also gets the three layouts in test_conformance.py."""
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import aia_kernels
from aia_kernels import backends
from aia_kernels.primitives.torch_impl import TorchPrimitives

from aia_testing import (
    NUM_SEGMENTS,
    VIDEO_LAYOUTS,
    VIDEO_SHAPE,
    FullSizeAllocations,
    as_function_of_flat_params,
    assert_close_results,
    assert_equal_results,
    compare_with_reference,
    make_pair,
    run,
    video_input,
)

# Variants covering every plan shape (C / THW stages, 0-2 factors, prod and mean).
SUBSET = ("C", "ST", "CinST->STinC", "C+ST")
FUSED = ["executor", "native", "triton"]


@pytest.fixture(params=FUSED)
def backend(request, monkeypatch):
    """A fused backend's name; "executor" serves the plain-torch primitives under the name
    'native' for the test."""
    name = request.param
    if name == "executor":
        monkeypatch.setitem(backends.stand_ins, "native",
                            backends.FusedBackend("native", TorchPrimitives(), lambda device: None))
        return "native"
    pytest.importorskip(f"aia_kernels.{name}")
    reason = backends.unavailable_reason(name, torch.device("cpu"))
    assert reason is None, reason  # a native build failure fails here, with the compiler's message
    return name


def _to_4d(x: torch.Tensor, layout: str | None) -> torch.Tensor:
    """A 5-D input as the (N*T, C, H, W) tensor of a 2D network (a copy)."""
    v = x.transpose(1, 2) if layout in (None, "NCTHW") else x
    return v.reshape(-1, *v.shape[2:])


# ---- semantics: the reference on 5-D input is the spec on the (N, T, C, H, W) view ----

@pytest.mark.parametrize("layout_name", VIDEO_LAYOUTS)
@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_reference_on_5d_equals_4d_of_the_same_clips(variant, layout_name):
    x, layout = video_input(layout_name)
    module = aia_kernels.build(variant, backend="reference", layout=layout).double()
    four_d = copy.deepcopy(module)
    four_d.layout, four_d.num_segments = None, NUM_SEGMENTS
    x5 = x.clone().requires_grad_()
    x4 = _to_4d(x, layout).requires_grad_()
    out5, out4 = module(x5), four_d(x4)
    assert out5.shape == x.shape and out5.stride() == x.stride()
    torch.testing.assert_close(_to_4d(out5, layout), out4, atol=1e-14, rtol=1e-12)  # summation order
    grad = torch.randn_like(out4)
    (_to_4d(out5, layout) * grad).sum().backward()
    (out4 * grad).sum().backward()
    torch.testing.assert_close(_to_4d(x5.grad, layout), x4.grad, atol=1e-14, rtol=1e-12)
    for (name, p), q in zip(module.named_parameters(), four_d.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10, msg=name)
    for (name, b), c in zip(module.named_buffers(), four_d.buffers()):
        torch.testing.assert_close(b, c, atol=1e-14, rtol=1e-12, msg=name)


# ---- every backend against the reference ----

# Triton gets the three layouts in test_conformance.py (the interpreter is slow).
@pytest.mark.parametrize("layout_name", VIDEO_LAYOUTS)
@pytest.mark.parametrize("backend,variant", [(b, v) for b in ("executor", "native") for v in SUBSET],
                         indirect=["backend"])
def test_matches_reference(backend, variant, layout_name):
    x, layout = video_input(layout_name)
    compare_with_reference(variant, backend, x=x, layout=layout, num_segments=None)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["STinC->CinST", "CinST+STinC", "CinST", "STinC", "C->ST", "ST->C"])
def test_other_variants_match_reference(variant, train):
    """The rest of the ten, on the native kernels, channels_last_3d."""
    pytest.importorskip("aia_kernels.native").load()
    x, layout = video_input("channels_last_3d")
    compare_with_reference(variant, "native", x=x, layout=layout, num_segments=None, train=train)


@pytest.mark.parametrize("backend", ["executor", "native"], indirect=True)
def test_float32_and_explicit_num_segments(backend):
    """float32; a module built with num_segments (as a 2D network's) takes 5-D input of that T."""
    x, _ = video_input("channels_last_3d", dtype=torch.float32)
    compare_with_reference("CinST->STinC", backend, x=x, dtype=torch.float32, num_segments=NUM_SEGMENTS,
                           atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 1, 4, 5), (2, 1, 4, 3, 1), (1, 2, 5, 1, 6)], ids=["T1", "C1-W1", "N1-H1"])
def test_odd_shapes(shape):
    pytest.importorskip("aia_kernels.native").load()
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    compare_with_reference("CinST->STinC", "native", x=x, num_segments=None)


def test_sliced_5d_input(backend):
    """A non-dense 5-D view (every other channel and frame of a larger tensor): any strides."""
    x = torch.randn(2, 10, 6, 4, 8, dtype=torch.float64)[:, ::2, ::2, :, 1:]
    compare_with_reference("CinST->STinC", backend, x=x, num_segments=None)


@pytest.mark.parametrize("backend,layout_name", [("executor", "channels_last_3d"), ("executor", "NTCHW"),
                                                 ("native", "channels_last_3d"), ("native", "NTCHW")],
                         indirect=["backend"])
def test_gradcheck(backend, layout_name):
    """float64, train mode, the input and every parameter (BN momentum 0 keeps the running stats fixed)."""
    x, layout = video_input(layout_name, shape=(2, 3, 2, 3, 4))
    module = aia_kernels.build("CinST->STinC", backend=backend, layout=layout).double()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = 0.0
    fn, inputs = as_function_of_flat_params(module, x.requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-6, rtol=1e-4)


# Triton: test_conformance.py (its interpreter is slow; the kernels are those of 4-D input).
@pytest.mark.parametrize("backend", ["executor", "native"], indirect=True)
def test_deterministic(backend):
    """Same inputs, bitwise identical outputs, gradients and buffers."""
    _, module = make_pair("CinST->STinC", backend, dtype=torch.float32, num_segments=None)
    x, _ = video_input("channels_last_3d", dtype=torch.float32)
    grad_out = torch.randn_like(x)
    assert_equal_results(run(copy.deepcopy(module), x, grad_out), run(copy.deepcopy(module), x, grad_out))


# ---- no copies ----

def _profiled_full_size_allocations(fn, nbytes):
    """Allocations of at least ``nbytes`` made by any ATen op while ``fn`` runs, also inside
    C++ ops (the profiler sees every op the native kernels call)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.self_cpu_memory_usage >= nbytes]


@pytest.mark.parametrize("layout_name", VIDEO_LAYOUTS)
@pytest.mark.parametrize("name", ["native", "triton"])
def test_no_full_size_copies(name, layout_name):
    """The forward allocates one full-size tensor, ``out``, with x's strides; the backward
    one, ``grad_x``. No copy of the input or the output in any layout."""
    pytest.importorskip(f"aia_kernels.{name}")
    x, layout = video_input(layout_name)
    x.requires_grad_()
    module = aia_kernels.build("CinST->STinC", backend=name, layout=layout).double()
    grad_out = torch.randn_like(x)
    with FullSizeAllocations(x.numel()) as forward:
        out = module(x)
    with FullSizeAllocations(x.numel()) as backward:
        out.backward(grad_out)
    v_shape = tuple(x.transpose(1, 2).shape if layout is None else x.shape)  # (N, T, C, H, W)
    assert [shape for _, shape in forward.allocations] == [v_shape], forward.allocations
    assert [shape for _, shape in backward.allocations] == [v_shape], backward.allocations
    assert out.stride() == x.stride() and x.grad.stride() == x.stride()
    if name == "native":  # inside the C++ op too
        nbytes = x.numel() * x.element_size()
        assert _profiled_full_size_allocations(lambda: module(x), nbytes) == ["aten::empty_strided"]
        out = module(x)
        assert _profiled_full_size_allocations(lambda: out.backward(grad_out), nbytes) == ["aten::empty_strided"]


# ---- torch.library / torch.compile ----

def _fused_forward_args(module, x, backend):
    gates = module.gates()
    return (x, module.variant, x.shape[1], backend, [c.weight for _, c, _ in gates], [b.weight for _, _, b in gates],
            [b.bias for _, _, b in gates], [b.running_mean for _, _, b in gates],
            [b.running_var for _, _, b in gates], [1] * len(gates), [1e-5] * len(gates), True)


@pytest.mark.parametrize("backend", ["executor", "native"], indirect=True)  # triton: test_conformance.py
def test_opcheck_fused_forward_on_the_clip_view(backend):
    """The op receives the (N, T, C, H, W) view with the input's strides (channels_last_3d:
    C innermost; the other layouts' views pass through the same schema)."""
    x, _ = video_input("channels_last_3d")
    module = aia_kernels.build("CinST->STinC").double()
    args = _fused_forward_args(module, x.transpose(1, 2).requires_grad_(), backend)
    torch.library.opcheck(torch.ops.aia_kernels.fused_forward.default, args)


def test_opcheck_native_plan_ops_on_the_clip_view():
    from aia_testing import plan_op_args
    native = pytest.importorskip("aia_kernels.native")
    native.load()
    _, args = plan_op_args()
    x, _ = video_input("channels_last_3d")
    v = x.transpose(1, 2)
    args = (v, v.shape[1], *args[2:])
    ops = torch.ops.aia_native
    torch.library.opcheck(ops.plan_forward.default, args)
    _, saved, stats = ops.plan_forward(*args)
    _, _, plan, conv_w, bn_w, _, _, _, modes, eps = args
    n = len(conv_w)
    torch.library.opcheck(ops.plan_backward.default, (torch.randn_like(v), v, v.shape[1], plan, conv_w, bn_w, modes,
                                                      eps, saved, stats, [1] * (1 + 3 * n)))


@pytest.mark.parametrize("backend", ["executor", "native", "triton"], indirect=True)
def test_compile_fullgraph(backend):
    """A Conv3d network around the module, channels_last_3d, compiles as one graph and
    matches eager on the reference, values and gradients."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv3d(5, 5, (3, 1, 1), padding=(1, 0, 0)),
                                aia_kernels.build("CinST->STinC", backend=backend), torch.nn.ReLU()).double()
    model = model.to(memory_format=torch.channels_last_3d)
    eager = copy.deepcopy(model)
    eager[1].backend = "reference"
    x, _ = video_input("channels_last_3d")
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y_ref = eager(x_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-8)


# ---- the 4-D path and the layout argument ----

def test_one_module_takes_4d_and_5d():
    """A module built without num_segments and layout: 4-D with T = 8 (the default, as
    before), 5-D NCTHW with T from each tensor (T changes through a 3D network)."""
    module = aia_kernels.build("CinST->STinC", backend="reference")
    assert module.num_segments == 8 and module.layout is None
    assert module(torch.randn(16, 5, 4, 7)).shape == (16, 5, 4, 7)
    for t in (8, 4, 1):
        assert module(torch.randn(2, 5, t, 4, 7)).shape == (2, 5, t, 4, 7)


def test_layout_is_set_on_every_unit_and_shown():
    module = aia_kernels.build("CinST->STinC", layout="NTCHW")
    assert module.layout == module.eft1.layout == module.eft2.layout == "NTCHW"
    assert module.num_segments is None
    assert "layout='NTCHW'" in repr(module)
    assert aia_kernels.build("C", num_segments=4).extra_repr().startswith("variant='C', num_segments=4,")


def test_state_dict_does_not_depend_on_the_layout():
    plain = aia_kernels.build("CinST->STinC", num_segments=8)
    video = aia_kernels.build("CinST->STinC", layout="NCTHW")
    assert list(plain.state_dict()) == list(video.state_dict())
    video.load_state_dict(plain.state_dict())


# ---- bad input: a clear error naming the shape ----

def test_5d_whose_t_disagrees_with_num_segments():
    module = aia_kernels.build("C", num_segments=8, backend="reference")
    with pytest.raises(ValueError, match=r"shape \(2, 5, 3, 4, 7\) read as \(N, C, T, H, W\).*T = 3.*"
                                         r"num_segments = 8.*layout='NTCHW'"):
        module(torch.randn(2, 5, 3, 4, 7))


def test_ntchw_tensor_given_as_nchtw_names_the_other_layout():
    module = aia_kernels.build("C", num_segments=3, backend="reference")
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 4, 7\).*T = 5.*num_segments = 3"):
        module(torch.randn(2, 3, 5, 4, 7))
    module.layout = "NTCHW"
    assert module(torch.randn(2, 3, 5, 4, 7)).shape == (2, 3, 5, 4, 7)


@pytest.mark.parametrize("layout", ["NCTHW", "NTCHW"])
def test_4d_given_to_a_module_told_to_expect_5d(layout):
    module = aia_kernels.build("ST", layout=layout, backend="reference")
    with pytest.raises(ValueError, match=rf"expects 5-D input .*layout='{layout}'.*shape \(6, 5, 4, 7\)"):
        module(torch.randn(6, 5, 4, 7))


@pytest.mark.parametrize("shape,layout", [((2, 5, 0, 4, 7), None), ((2, 0, 5, 4, 7), "NTCHW")])
def test_zero_frames(shape, layout):
    module = aia_kernels.build("ST", backend="reference", layout=layout)
    with pytest.raises(ValueError, match=rf"{tuple(shape)}".replace("(", r"\(").replace(")", r"\)") + ".*T = 0"):
        module(torch.randn(shape))


@pytest.mark.parametrize("layout", ["NHWC", "nthwc", "", 5])
def test_unknown_layout(layout):
    with pytest.raises(ValueError, match="unknown AIA input layout"):
        aia_kernels.build("C", layout=layout)


@pytest.mark.parametrize("shape", [(6, 5, 4), (1, 2, 3, 5, 4, 7), (6,)])
def test_wrong_rank_names_both_shapes(shape):
    with pytest.raises(ValueError, match=r"rank 4\) or \(N, C, T, H, W\) \(rank 5\)"):
        aia_kernels.build("C", backend="reference")(torch.randn(shape))


def test_native_op_refuses_a_view_whose_t_disagrees():
    native = pytest.importorskip("aia_kernels.native")
    native.load()
    from aia_testing import plan_op_args
    _, args = plan_op_args()
    v = torch.randn(VIDEO_SHAPE, dtype=torch.float64).transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"has T = 3 but num_segments = 4"):
        torch.ops.aia_native.plan_forward(v, 4, *args[2:])


def test_half_precision_channels_last_3d():
    """bfloat16 5-D input on the native kernels (float32 accumulation); the reference runs float32."""
    pytest.importorskip("aia_kernels.native").load()
    x, _ = video_input("channels_last_3d", dtype=torch.bfloat16)
    a, b = compare_with_reference("C+ST", "native", x=x, dtype=torch.bfloat16, num_segments=None, atol=1.6e-2,
                                  rtol=8e-3)
    assert b.out.dtype == torch.bfloat16
    assert_close_results(a, b, atol=1.6e-2, rtol=8e-3)


def test_module_pickled_before_5d_input_unpickles():
    """A whole module pickled by an earlier version (num_segments a plain attribute, no layout)."""
    module = aia_kernels.build("CinST->STinC", num_segments=4)
    old = module.__dict__.copy()
    old["num_segments"] = old.pop("_num_segments")
    del old["_layout"]
    restored = type(module).__new__(type(module))
    restored.__setstate__(old)
    assert restored.num_segments == 4 and restored.layout is None
