"""Export: torch.export and ONNX of AIA modules and of whole TSN / TSM networks.

While exported, AIA modules run the reference path (aia_kernels/exporting.py), so the
exported program is plain aten (core aten after ``run_decompositions()``) and the ONNX
model is standard operators, which ONNX Runtime runs without this package. Eager mode
keeps the fused backend: every comparison is against the eager module on ``native``.
"""
from __future__ import annotations

import functools
import operator

import pytest
import torch
from torch import nn
from torch.export import Dim

import aia_kernels
from aia_kernels.models import convert_sync_batchnorm, tsn_resnet50

from aia_testing import assert_standard_onnx, randomize_bn, randomize_network_bn, small_tsm

T = 2  # frames per clip
SHAPE = (5, 4, 6)  # C, H, W of a module's input
# The AIA computation written out: pooling, the gate conv, BN, sigmoid, the products.
AIA_OPS = {"aten.max.dim", "aten.mean.dim", "aten.convolution.default",
           "aten._native_batch_norm_legit_no_training.default", "aten.sigmoid.default", "aten.mul.Tensor"}


def _module(variant: str) -> nn.Module:
    torch.manual_seed(0)
    module = aia_kernels.build(variant, num_segments=T, backend="native")
    randomize_bn(module)
    return module.eval()


@functools.lru_cache(maxsize=None)
def _exported_module(variant: str):
    """(eager module, its ExportedProgram with a dynamic number of clips); one export per variant.
    torch.export specialises a module's program to 2 or more clips (a size-1 clip dimension
    would change its contiguity); a network's batch dimension stays free (tests below)."""
    module = _module(variant)
    x = torch.randn(2 * T, *SHAPE)
    return module, torch.export.export(module, (x,), dynamic_shapes=({0: T * Dim("clips")},))


def call_targets(program) -> set[str]:
    return {str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and node.target is not operator.getitem}


def assert_core_aten(program) -> None:
    """Every op of the program is a core aten op (torch.Tag.core): no custom op, no assertion
    op. Python's ``operator`` functions (getitem, and size arithmetic of a dynamic shape) are
    not tensor ops."""
    not_core = {str(node.target) for node in program.graph.nodes if node.op == "call_function"
                and getattr(node.target, "__module__", None) != operator.getitem.__module__  # "_operator"
                and not (isinstance(node.target, torch._ops.OpOverload) and torch.Tag.core in node.target.tags)}
    assert not not_core, f"not core aten: {sorted(not_core)}"


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_module_export_equals_eager_and_decomposes_to_core_aten(variant):
    module, program = _exported_module(variant)
    for clips in (2, 3):
        x = torch.randn(clips * T, *SHAPE)
        with torch.no_grad():
            expected = module(x)
        assert module.last_backend == "native"  # eager stays on the fused backend
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)
    assert not any("aia_kernels" in t for t in call_targets(program))
    core = program.run_decompositions()
    assert_core_aten(core)
    assert AIA_OPS <= call_targets(core)
    x = torch.randn(3 * T, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(core.module()(x), module(x), atol=1e-5, rtol=1e-5)


def _onnx_session(program):
    import onnxruntime
    proto = torch.onnx.export(program, dynamo=True, verbose=False).model_proto
    assert_standard_onnx(proto)
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _assert_matches(session, x: torch.Tensor, expected: torch.Tensor) -> None:
    """ONNX Runtime's output against PyTorch's: float32, 1e-4 relative to the largest value."""
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_module_onnx_runs_in_onnxruntime(variant):
    module, program = _exported_module(variant)
    session = _onnx_session(program)
    for clips in (2, 3):  # the number of clips is dynamic
        x = torch.randn(clips * T, *SHAPE)
        with torch.no_grad():
            _assert_matches(session, x, module(x))


CLIP = (T, 3, 64, 64)  # the real ResNet-50 at a small resolution: 2 frames of 64x64


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_network_export_equals_eager(variant):
    """Every variant in a TSM network (stem, stages, shift, a combined variant's units run
    through the block's ``attention``): a narrow one, since the AIA modules are what varies."""
    torch.manual_seed(0)
    model = small_tsm(variant, T)
    program = torch.export.export(model, (torch.randn(2, T, 3, 32, 32),), dynamic_shapes=({0: Dim("batch")},))
    assert not any("aia_kernels" in t for t in call_targets(program))
    for batch in (1, 3):
        x = torch.randn(batch, T, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
        assert {m.last_backend for m in model.base_model.aia_modules()} == {"native"}
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)


def test_network_decomposes_to_core_aten():
    torch.manual_seed(0)
    model = small_tsm("CinST->STinC", T)
    program = torch.export.export(model, (torch.randn(2, T, 3, 32, 32),), dynamic_shapes=({0: Dim("batch")},))
    core = program.run_decompositions()
    assert_core_aten(core)
    assert AIA_OPS <= call_targets(core)
    x = torch.randn(1, T, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(core.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_tsn_resnet50_export_equals_eager():
    """The real ResNet-50 (at 64x64, 2 frames, 3 classes). Its ONNX model (from a checkpoint):
    tests/test_export_cli.py with tsm_resnet50; a ResNet-50's decomposition and ONNX export
    take minutes of CPU time, so the suite has one of each, there."""
    torch.manual_seed(0)
    model = randomize_network_bn(tsn_resnet50(num_classes=3, num_segments=T, variant="CinST+STinC",
                                              backend="native")).eval()
    program = torch.export.export(model, (torch.randn(2, *CLIP),), dynamic_shapes=({0: Dim("batch")},))
    assert not any("aia_kernels" in t for t in call_targets(program))
    for batch in (1, 3):
        x = torch.randn(batch, *CLIP)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)


def test_strict_export_and_jit_trace_record_the_reference_path():
    module = _module("CinST->STinC")
    x = torch.randn(2 * T, *SHAPE)
    with torch.no_grad():
        expected = module(x)
    program = torch.export.export(module, (x,), strict=True)
    assert not any("aia_kernels" in t for t in call_targets(program))
    torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)
    traced = torch.jit.trace(module, (x,), check_trace=False)
    assert "aia_kernels::" not in str(traced.graph) and "sigmoid" in str(traced.graph)
    torch.testing.assert_close(traced(x), expected, atol=1e-5, rtol=1e-5)


# Bad input: training mode, SyncBatchNorm.

@pytest.mark.parametrize("variant", ["C", "CinST+STinC"])
def test_export_in_training_mode_says_call_eval(variant):
    module = _module(variant).train()
    with pytest.raises(RuntimeError, match=r"training mode.*Call model\.eval\(\)"):
        torch.export.export(module, (torch.randn(2 * T, *SHAPE),))


def test_onnx_export_in_training_mode_says_call_eval():
    module = _module("CinST->STinC").train()
    with pytest.raises(Exception, match=r"Call model\.eval\(\)"):
        torch.onnx.export(module, (torch.randn(2 * T, *SHAPE),), dynamo=True, verbose=False)


def test_module_without_bn_exports_in_training_mode():
    """No gate BN: training and eval compute the same, so export works in either mode."""
    module = aia_kernels.build("STinC", num_segments=T, use_BN=False, backend="native").train()
    x = torch.randn(2 * T, *SHAPE)
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x), module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sync_bn", ["aia_kernels", "torch"])
def test_sync_batchnorm_exports_as_batchnorm_in_eval_and_raises_in_training(sync_bn):
    """A SyncBatchNorm in eval mode normalises with its running statistics, like a BatchNorm,
    and exports as one; in training mode export raises as for any BatchNorm."""
    module = _module("CinST->STinC")
    if sync_bn == "aia_kernels":
        module = convert_sync_batchnorm(module)
    else:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    kinds = {type(bn) for _, _, bn in module.gates()}
    assert len(kinds) == 1 and next(iter(kinds)) is not nn.BatchNorm3d
    x = torch.randn(2 * T, *SHAPE)
    module.eval()
    expected = _module("CinST->STinC")(x)
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)
    assert_core_aten(program.run_decompositions())
    with pytest.raises(RuntimeError, match="SyncBatchNorm.*Call model.eval()"):
        torch.export.export(module.train(), (x,))
