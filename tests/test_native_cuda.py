"""The native backend's CUDA kernels (csrc/aia_cuda.cu, and the plan ops' CUDA
registration) against the reference on a GPU. They are refused unless
AIA_NATIVE_CUDA=1, which this module sets for its own tests. Without a CUDA device
every test here skips: the kernels can only be compiled there (test_native_cuda_compile)."""
import pytest
import torch
from torch.func import functional_call

import aia_kernels

from aia_testing import SHAPE, compare_with_reference, make_pair, run

native = pytest.importorskip("aia_kernels.native")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run the CUDA kernels")
SUBSET = ("C", "ST", "CinST->STinC", "C+ST", "STinC->CinST")


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv("AIA_NATIVE_CUDA", "1")
    reason = native.unavailable_reason(torch.device("cuda"))
    assert reason is None, reason  # a CUDA build that failed fails here, with the compiler's message


def compare(variant, **kwargs):
    return compare_with_reference(variant, "native", device="cuda", **kwargs)


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_bn", [True, False], ids=["bn", "nobn"])
def test_float64_matches_reference(variant, train, use_bn):
    compare(variant, use_bn=use_bn, train=train, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_float32_matches_reference(variant):
    compare(variant, dtype=torch.float32, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("variant", SUBSET)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_half_inputs(variant, dtype, tol):
    _, out = compare(variant, dtype=dtype, atol=tol, rtol=tol)
    assert out.grad_x.dtype == dtype


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("variant", ["CinST->STinC", "C+ST"])
def test_strided_inputs(variant, layout):
    if layout == "channels_last":
        x = torch.randn(SHAPE, dtype=torch.float64, device="cuda").to(memory_format=torch.channels_last)
    else:
        x = torch.randn(SHAPE[0], SHAPE[1] * 2, SHAPE[2], SHAPE[3] + 3, dtype=torch.float64,
                        device="cuda")[:, ::2, :, 1:-2]
    _, out = compare(variant, x=x, atol=1e-10, rtol=1e-8)
    if layout == "channels_last":
        assert out.out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(16, 64, 14, 14), (8, 37, 9, 70)], ids=["wide_c", "long_rows"])
def test_larger_shapes(shape):
    """More entries than one block, rows longer than a warp: the grid-stride loops and tap trees."""
    x = torch.randn(shape, device="cuda")
    compare("CinST->STinC", dtype=torch.float32, x=x, num_segments=8, atol=3e-4, rtol=3e-4)


def test_gradcheck():
    module = aia_kernels.build("CinST->STinC", num_segments=2, backend="native").to("cuda", torch.float64).train()
    names, params = zip(*module.named_parameters())
    x = torch.randn(4, 3, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)

    def f(x, *ps):
        return functional_call(module, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params]), eps=1e-6,
                                    atol=1e-6, rtol=1e-4)


def test_deterministic_and_equal_to_cpu():
    """No atomics: bitwise equal run to run; and the same function as the CPU kernels (float64)."""
    ref, module = make_pair("CinST->STinC", "native", dtype=torch.float64, num_segments=4)
    x = torch.randn(16, 12, 9, 10, dtype=torch.float64)
    g = torch.randn_like(x)
    cpu = run(module, x, g)
    module.load_state_dict(ref.state_dict())
    module.cuda()
    gpu = [run(module, x.cuda(), g.cuda())]
    module.load_state_dict(ref.state_dict())
    gpu.append(run(module, x.cuda(), g.cuda()))
    assert module.last_backend == "native"
    assert torch.equal(gpu[0].out, gpu[1].out) and torch.equal(gpu[0].grad_x, gpu[1].grad_x)
    for name in gpu[0].grads:
        assert torch.equal(gpu[0].grads[name], gpu[1].grads[name]), name
    torch.testing.assert_close(gpu[0].out.cpu(), cpu.out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gpu[0].grad_x.cpu(), cpu.grad_x, atol=1e-12, rtol=1e-10)
    for name in cpu.grads:
        torch.testing.assert_close(gpu[0].grads[name].cpu(), cpu.grads[name], atol=1e-10, rtol=1e-8)


def test_opcheck_plan_ops_on_cuda():
    from aia_kernels.fused import bn_mode
    from aia_kernels.plan import build_plan
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="native").to("cuda", torch.float64).train()
    gates = module.gates()
    bns = [bn for _, _, bn in gates]
    x = torch.randn(SHAPE, dtype=torch.float64, device="cuda")
    args = (x, 3, list(native.encode_plan(build_plan("CinST->STinC"))), [c.weight.detach() for _, c, _ in gates],
            [bn.weight.detach() for bn in bns], [bn.bias.detach() for bn in bns], [bn.running_mean for bn in bns],
            [bn.running_var for bn in bns], [bn_mode(bn) for bn in bns], [bn.eps for bn in bns])
    ops = torch.ops.aia_native
    torch.library.opcheck(ops.plan_forward.default, args)
    _, saved, stats = ops.plan_forward(*args)
    torch.library.opcheck(ops.plan_backward.default, (torch.randn_like(x), x, 3, args[2], args[3], args[4], args[8],
                                                      args[9], saved, stats, [1] * (1 + 3 * len(gates))))


def test_auto_never_picks_native_cuda():
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="auto").cuda()
    module(torch.randn(SHAPE, device="cuda"))
    assert module.last_backend != "native"
