"""The generic executor (plan + hand-written backward) with the plain-torch primitives
must equal the autograd reference: this checks the plan and the primitive contract
that every fused backend implements, independently of any kernel."""
import pytest
import torch

import aia_kernels
from aia_kernels import backends
from aia_kernels.plan import build_plan
from aia_kernels.primitives.torch_impl import TorchPrimitives

from aia_testing import compare_with_reference


@pytest.fixture
def torch_backend(monkeypatch):
    """Serve the plain-torch primitives under the name 'native' for this test only."""
    monkeypatch.setitem(backends.stand_ins, "native",
                        backends.FusedBackend("native", TorchPrimitives(), lambda device: None))
    return "native"


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_bn", [True, False], ids=["bn", "nobn"])
def test_executor_matches_reference(torch_backend, variant, train, use_bn):
    compare_with_reference(variant, torch_backend, use_bn=use_bn, train=train, atol=1e-12, rtol=1e-10)


def test_plan_of_paper_module():
    """CinST->STinC: C, ST on v; ST, C on u = Y_ST1 * v; output Y_C2 * Y_ST1 (docs/design.md, "The plan")."""
    plan = build_plan("CinST->STinC")
    assert [s.axes for s in plan.stages] == ["C", "THW", "THW", "C"]
    assert [s.weight.factors for s in plan.stages] == [(), ((0,),), ((1, 2, 3),), ((1, 2, 3), (5, 6, 7))]
    assert plan.output.factors == ((1, 2, 3), (4,)) and plan.output.combine == "prod"
    assert build_plan("CinST+STinC").output.combine == "mean"


@pytest.mark.parametrize("variant", ["C", "CinST->STinC"])
def test_opcheck_fused_forward(torch_backend, variant):
    ref = aia_kernels.build(variant, num_segments=3).double()
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64, requires_grad=True)
    gates = ref.gates()
    args = (x, variant, 3, torch_backend, [c.weight for _, c, _ in gates], [b.weight for _, _, b in gates],
            [b.bias for _, _, b in gates], [b.running_mean for _, _, b in gates],
            [b.running_var for _, _, b in gates],
            [1] * len(gates), [1e-5] * len(gates), True)
    torch.library.opcheck(torch.ops.aia_kernels.fused_forward.default, args)


def test_compile_fullgraph(torch_backend):
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend=torch_backend).double()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64, requires_grad=True)
    eager = aia_kernels.build("CinST->STinC", num_segments=3, backend="reference").double()
    eager.load_state_dict(module.state_dict())
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager(x))


@pytest.mark.parametrize("variant", ["C", "CinST->STinC", "CinST+STinC"])
def test_eager_autograd_paths_agree_bitwise(torch_backend, monkeypatch, variant):
    """The autograd.Function that eager mode uses and the library op's registered autograd
    (what torch.compile traces) give the same outputs, gradients and BN buffers."""
    from aia_kernels import fused
    torch.manual_seed(0)
    module = aia_kernels.build(variant, num_segments=3, backend=torch_backend).double().train()
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    results = []
    for path in (fused.forward_with_autograd_function, fused.forward_with_library_op):
        monkeypatch.setattr(fused, "EAGER_FORWARD", path)
        module.load_state_dict(state)
        module.zero_grad()
        x.grad = None
        out = module(x)
        out.backward(grad)
        results.append([out, x.grad] + [p.grad for p in module.parameters()] + list(module.state_dict().values()))
    names = [type(r[0].grad_fn).__name__ for r in results]
    assert names == ["_EagerFusedBackward", "GeneratedBackwardFor_aia_kernels_fused_forward_defaultBackward"]
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)
