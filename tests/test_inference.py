"""Inference in PyTorch stays on the fused backend: no_grad / inference_mode save nothing
for backward, eval mode leaves the BN statistics alone, and torch.compile(fullgraph=True)
traces a whole network with AIA (the fused custom ops, not the reference path)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import aia_kernels

from aia_testing import randomize_bn, small_tsm

T = 2


def _count_saved(module: nn.Module, x: torch.Tensor, context) -> tuple[torch.Tensor, int]:
    """(output, how many tensors autograd saved for backward while ``module`` ran in ``context``)."""
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context():
        out = module(x)
    return out, len(saved)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("variant", ["CinST->STinC", "C+ST"])
def test_no_grad_and_inference_mode_save_nothing(variant, context):
    module = aia_kernels.build(variant, num_segments=T, backend="native")
    randomize_bn(module)
    module.eval()
    x = torch.randn(2 * T, 5, 4, 6, requires_grad=True)
    out, saved = _count_saved(module, x, context)
    assert module.last_backend == "native"
    assert saved == 0 and out.grad_fn is None and not out.requires_grad
    _, saved_with_grad = _count_saved(module, x, torch.enable_grad)
    assert saved_with_grad > 0  # the hook sees what a training step saves
    reference = copy.deepcopy(module)
    reference.backend = "reference"
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "reference-primitives"])
def test_a_forward_no_backward_follows_runs_the_inference_plan(backend, monkeypatch):
    """Grad disabled, or nothing requiring it: the fused forward runs plan.for_inference (every
    stage recomputed: nothing kept, no max positions tracked by the native pools), with the
    same output bit for bit; a forward that a backward may follow runs the usual plan."""
    from aia_kernels import fused, plan
    used = []
    monkeypatch.setattr(fused, "for_inference", lambda variant: used.append(variant) or plan.for_inference(variant))
    module = aia_kernels.build("CinST->STinC", num_segments=T, backend="native")
    if backend == "reference-primitives":
        from aia_kernels.primitives.torch_impl import TorchPrimitives
        monkeypatch.setattr(fused, "_primitives", lambda backend, device: TorchPrimitives())
    randomize_bn(module)
    module.eval()
    x = torch.randn(2 * T, 5, 4, 6)
    with torch.no_grad():
        inferred = module(x)
    assert used == ["CinST->STinC"]
    frozen = copy.deepcopy(module).requires_grad_(False)
    assert torch.equal(frozen(x), inferred) and len(used) == 2
    trained = module(x.clone().requires_grad_())
    assert len(used) == 2 and trained.requires_grad
    assert torch.equal(trained.detach(), inferred)
    assert all(stage.recompute for stage in plan.for_inference("CinST->STinC").stages)
    assert not all(stage.recompute for stage in plan.build_plan("CinST->STinC").stages)


def test_eval_mode_leaves_bn_statistics_alone():
    """Eval normalises with the running statistics and updates nothing; train does update."""
    module = aia_kernels.build("CinST+STinC", num_segments=T, backend="native")
    randomize_bn(module)
    before = {name: b.clone() for name, b in module.named_buffers()}
    x = torch.randn(2 * T, 5, 4, 6)
    with torch.no_grad():
        module.eval()(x)
        assert all(torch.equal(b, before[name]) for name, b in module.named_buffers())
        module.train()(x)
        assert not all(torch.equal(b, before[name]) for name, b in module.named_buffers())


@pytest.mark.parametrize("variant", ["CinST->STinC", "C+ST"])
def test_compile_fullgraph_of_a_network_runs_the_fused_ops(variant):
    torch._dynamo.reset()
    model = small_tsm(variant, T)
    reference = copy.deepcopy(model)
    for aia in reference.base_model.aia_modules():
        aia.backend = "reference"
    graphs = []

    def recording_aot_eager(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=recording_aot_eager)
    x = torch.randn(3, T, 3, 32, 32)
    with torch.no_grad():
        out = compiled(x)
        expected = reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (graph,) = graphs
    fused = [n for n in graph.graph.nodes if "aia_kernels.fused_forward" in str(n.target)]
    assert len(fused) == len(model.base_model.aia_modules()) == 4
