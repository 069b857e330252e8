"""What is specific to the native backend's CUDA kernels (csrc/aia_cuda.cu,
csrc/aia_cuda_persistent.cu and the plan ops' CUDA registration): larger shapes, the same
function as the C++ CPU kernels, the plan ops' schemas on CUDA, and the one-launch paths
against the multi-launch walk. The variant x mode x dtype matrix against the reference is
test_conformance.py's native-cuda target (test_native_cuda_emulated.py runs both files on
the emulator).

On a GPU: they are refused unless AIA_NATIVE_CUDA=1, which this module sets for its own
tests. Without one, every test here skips, unless the process runs the CUDA emulation build
(AIA_NATIVE_CUDA_EMULATION=1: the same kernels on CPU tensors, through the emulator of
csrc/emulation/; tests/test_native_cuda_emulated.py runs this file that way in a
subprocess). Two tests need a real device and skip under emulation, saying why.

The forward has two CUDA paths (AIA_NATIVE_CUDA_PERSISTENT: 0 the multi-launch walk, 1
the one-launch cooperative kernel of csrc/aia_cuda_persistent.cu, unset: by size); the
tests at the end run both on the same module and inputs and compare, and check through
aia_native::plan_forward_cuda_paths which path ran."""
import copy
import itertools

import pytest
import torch

import aia_kernels

from aia_testing import (
    FULL_MATRIX,
    NUM_SEGMENTS,
    SHAPE,
    VIDEO_LAYOUTS,
    assert_close_results,
    assert_equal_results,
    compare_with_reference,
    diagonal,
    make_pair,
    plan_op_args,
    run,
    video_input,
)

native = pytest.importorskip("aia_kernels.native")
EMULATED = native.emulating_cuda()
DEVICE = "cpu" if EMULATED else "cuda"  # the emulator runs the CUDA kernels on CPU tensors
SUBSET = ("C", "ST", "CinST->STinC", "C+ST", "STinC->CinST")  # for the tests the emulator makes slow
pytestmark = pytest.mark.skipif(not (EMULATED or torch.cuda.is_available()),
                                reason="needs a CUDA GPU to run the CUDA kernels (test_native_cuda_emulated.py "
                                       "runs them on the CPU emulator)")
needs_device = pytest.mark.skipif(EMULATED, reason="needs a real CUDA device: the emulation build has no C++ CPU "
                                                   "kernels and no CUDA tensors")


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv("AIA_NATIVE_CUDA", "1")
    reason = native.unavailable_reason(torch.device(DEVICE))
    assert reason is None, reason  # a CUDA build that failed fails here, with the compiler's message


def compare(variant, **kwargs):
    return compare_with_reference(variant, "native", device=DEVICE, **kwargs)


def _strided_x(layout):
    """A float64 CUDA input of SHAPE, channels_last or a strided slice of a larger tensor."""
    if layout == "channels_last":
        return torch.randn(SHAPE, dtype=torch.float64, device=DEVICE).to(memory_format=torch.channels_last)
    return torch.randn(SHAPE[0], SHAPE[1] * 2, SHAPE[2], SHAPE[3] + 3, dtype=torch.float64,
                       device=DEVICE)[:, ::2, :, 1:-2]


@pytest.mark.parametrize("shape", [(16, 64, 14, 14), (8, 37, 9, 70)], ids=["wide_c", "long_rows"])
def test_larger_shapes(shape):
    """More entries than one block, rows longer than a warp: the grid-stride loops and tap trees."""
    x = torch.randn(shape, device=DEVICE)
    compare("CinST->STinC", dtype=torch.float32, x=x, num_segments=8, atol=3e-4, rtol=3e-4)


@needs_device
def test_deterministic_and_equal_to_cpu():
    """No atomics: bitwise equal run to run; and the same function as the CPU kernels (float64)."""
    ref, module = make_pair("CinST->STinC", "native", dtype=torch.float64, num_segments=4)
    x = torch.randn(16, 12, 9, 10, dtype=torch.float64)
    g = torch.randn_like(x)
    cpu = run(module, x, g)
    module.load_state_dict(ref.state_dict())
    module.to(DEVICE)
    gpu = [run(module, x.to(DEVICE), g.to(DEVICE))]
    module.load_state_dict(ref.state_dict())
    gpu.append(run(module, x.to(DEVICE), g.to(DEVICE)))
    assert module.last_backend == "native"
    assert_equal_results(gpu[0], gpu[1])
    torch.testing.assert_close(gpu[0].out.cpu(), cpu.out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gpu[0].grad_x.cpu(), cpu.grad_x, atol=1e-12, rtol=1e-10)
    for name in cpu.grads:
        torch.testing.assert_close(gpu[0].grads[name].cpu(), cpu.grads[name], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("persistent", ["0", "1"], ids=["multi_launch", "persistent"])
def test_opcheck_plan_ops_on_cuda(monkeypatch, persistent):
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", persistent)
    module, args = plan_op_args(device=DEVICE)
    x, gates = args[0], module.gates()
    ops = torch.ops.aia_native
    torch.library.opcheck(ops.plan_forward.default, args)
    _, saved, stats = ops.plan_forward(*args)
    torch.library.opcheck(ops.plan_backward.default, (torch.randn_like(x), x, 3, args[2], args[3], args[4], args[8],
                                                      args[9], saved, stats, [1] * (1 + 3 * len(gates))))


@needs_device
def test_auto_never_picks_native_cuda():
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="auto").to(DEVICE)
    module(torch.randn(SHAPE, device=DEVICE))
    assert module.last_backend != "native"


# ---- the one-launch forward (AIA_NATIVE_CUDA_PERSISTENT=1) against the multi-launch walk (=0) ----

def _paths() -> list[int]:
    """[multi-launch, persistent]: CUDA plan_forward calls of each path since the library loaded."""
    return list(torch.ops.aia_native.plan_forward_cuda_paths())


def _backward_paths() -> list[int]:
    return list(torch.ops.aia_native.plan_backward_cuda_paths())


def _run_path(monkeypatch, persistent: bool, module, x, grad_out):
    """One forward + backward, both on the chosen path, checking that they ran there."""
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", "1" if persistent else "0")
    before, before_bwd = _paths(), _backward_paths()
    result = run(module, x, grad_out)
    after, after_bwd = _paths(), _backward_paths()
    assert module.last_backend == "native"
    expected = [0, 1] if persistent else [1, 0]
    assert [a - b for a, b in zip(after, before)] == expected, (before, after)
    assert [a - b for a, b in zip(after_bwd, before_bwd)] == expected, (before_bwd, after_bwd)
    return result


def _both_paths(monkeypatch, variant, *, dtype=torch.float64, use_bn=True, train=True, x=None,
                num_segments=NUM_SEGMENTS, prepare=None, layout=None):
    """(multi-launch result, persistent result) of two copies of one module on the same x."""
    multi, persistent = make_pair(variant, "native", use_bn=use_bn, train=train, dtype=dtype,
                                  num_segments=num_segments, device=DEVICE, layout=layout)
    multi.backend = "native"
    for module in (multi, persistent):
        if prepare is not None:
            prepare(module)
    if x is None:
        x = torch.randn(SHAPE, dtype=dtype, device=DEVICE)
    grad_out = torch.randn(x.shape, dtype=dtype, device=DEVICE)
    return _run_path(monkeypatch, False, multi, x, grad_out), _run_path(monkeypatch, True, persistent, x, grad_out)


MODES = {(True, True): "bn-train", (False, True): "nobn-train", (True, False): "bn-eval", (False, False): "nobn-eval"}


def matrix(cases, emulated_cases):
    """The cases on a GPU, the covering subset on the emulator (seconds a call there)
    unless FULL_MATRIX."""
    return emulated_cases if EMULATED and not FULL_MATRIX else cases


@pytest.mark.parametrize("variant,train,use_bn", [
    pytest.param(v, t, b, id=f"{MODES[b, t]}-{v}") for v, t, b in matrix(
        list(itertools.product(aia_kernels.VARIANTS, [True, False], [True, False])),
        diagonal(aia_kernels.VARIANTS, [True, False], [True, False]))])
def test_persistent_float64_matches_multi_launch(monkeypatch, variant, train, use_bn):
    """Outputs, input and parameter gradients (through plan_backward on the persistent
    path's saved tensors) and running statistics (from its BN stats)."""
    multi, persistent = _both_paths(monkeypatch, variant, use_bn=use_bn, train=train)
    assert_close_results(multi, persistent, atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("variant,train", [
    pytest.param(v, t, id=f"{'train' if t else 'eval'}-{v}") for v, t in matrix(
        list(itertools.product(aia_kernels.VARIANTS, [True, False])), diagonal(aia_kernels.VARIANTS, [True, False]))])
def test_persistent_float32_matches_multi_launch(monkeypatch, variant, train):
    multi, persistent = _both_paths(monkeypatch, variant, dtype=torch.float32, train=train)
    assert_close_results(multi, persistent, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("variant", ["C", "ST", "CinST->STinC", "CinST+STinC"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_persistent_half_inputs(monkeypatch, variant, dtype):
    """Both accumulate in float32; out and grad_x may differ by a rounding of the half type."""
    multi, persistent = _both_paths(monkeypatch, variant, dtype=dtype)
    assert persistent.out.dtype == dtype and persistent.grad_x.dtype == dtype
    assert_close_results(multi, persistent, atol=1e-2, rtol=1e-2)


def _mixed_bn_modes(module):
    """Every other BN in eval mode: a stage mixes batch and running statistics."""
    for i, bn in enumerate(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm3d)):
        bn.train(i % 2 == 0)


@pytest.mark.parametrize("variant", ["CinST->STinC", "STinC->CinST", "C+ST"])
def test_persistent_mixed_bn_modes(monkeypatch, variant):
    multi, persistent = _both_paths(monkeypatch, variant, prepare=_mixed_bn_modes)
    assert_close_results(multi, persistent, atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_persistent_strided_inputs(monkeypatch, layout):
    multi, persistent = _both_paths(monkeypatch, "CinST->STinC", x=_strided_x(layout))
    assert_close_results(multi, persistent, atol=1e-12, rtol=1e-11)
    if layout == "channels_last":
        assert persistent.out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout_name", VIDEO_LAYOUTS)
def test_persistent_video_layouts(monkeypatch, layout_name):
    x, layout = video_input(layout_name, device=DEVICE)
    multi, persistent = _both_paths(monkeypatch, "CinST->STinC", x=x, layout=layout)
    assert_close_results(multi, persistent, atol=1e-12, rtol=1e-11)
    assert persistent.out.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_persistent_many_blocks(monkeypatch, dtype):
    """More elements than the co-resident grid has threads: grid-stride loops take several
    turns, and the BN merge reads more block partials than a block has threads."""
    x = torch.randn(24, 67, 15, 13, dtype=dtype, device=DEVICE)
    multi, persistent = _both_paths(monkeypatch, "CinST->STinC", dtype=dtype, x=x, num_segments=8)
    tol = 1e-12 if dtype == torch.float64 else 5e-5
    assert_close_results(multi, persistent, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", ["C", "CinST->STinC", "STinC->CinST", "C+ST"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_persistent_split_c_axis(monkeypatch, variant, dtype):
    """Many channels, few (t, h, w) entries: the one-launch kernels split a C gate's axis
    into segments (pool and weight gradient), merged in order; the walk does not."""
    x = torch.randn(4, 96, 3, 5, dtype=dtype, device=DEVICE)
    multi, persistent = _both_paths(monkeypatch, variant, dtype=dtype, x=x, num_segments=2)
    tol = 1e-12 if dtype == torch.float64 else 5e-5
    assert_close_results(multi, persistent, atol=tol, rtol=tol)


def test_persistent_deterministic(monkeypatch):
    """No atomics: bitwise equal run to run, outputs, gradients and running statistics."""
    ref, module = make_pair("CinST->STinC", "native", dtype=torch.float32, device=DEVICE)
    x = torch.randn(12, 9, 11, 13, device=DEVICE)
    g = torch.randn_like(x)
    results = []
    for _ in range(2):
        module.load_state_dict(ref.state_dict())
        results.append(_run_path(monkeypatch, True, module, x, g))
    a, b = results
    assert_equal_results(a, b)


def test_persistent_selection(monkeypatch):
    """Unset: small problems take one launch, larger than the threshold the walk; bad values raise."""
    module = aia_kernels.build("C+ST", num_segments=3, backend="native").to(DEVICE)
    x = torch.randn(SHAPE, device=DEVICE)
    monkeypatch.delenv("AIA_NATIVE_CUDA_PERSISTENT", raising=False)
    for limit, expected in ((None, [0, 1]), (str(x.numel()), [0, 1]), (str(x.numel() - 1), [1, 0])):
        if limit is None:
            monkeypatch.delenv("AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS", raising=False)
        else:
            monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS", limit)
        before = _paths()
        module(x)
        assert [a - b for a, b in zip(_paths(), before)] == expected, limit
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", "yes")
    with pytest.raises(RuntimeError, match="AIA_NATIVE_CUDA_PERSISTENT must be"):
        module(x)
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", "")
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS", "lots")
    with pytest.raises(RuntimeError, match="AIA_NATIVE_CUDA_PERSISTENT_MAX_ELEMENTS must be"):
        module(x)


def test_persistent_saved_tensors_match(monkeypatch):
    """What plan_backward reads: the plan op's saved tensors and BN stats, path against path
    (argmax exactly), shapes and dtypes included."""
    _, args = plan_op_args(device=DEVICE)
    results = []
    for persistent in ("0", "1"):
        monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", persistent)
        results.append(torch.ops.aia_native.plan_forward(*args))
    (out_m, saved_m, stats_m), (out_p, saved_p, stats_p) = results
    torch.testing.assert_close(out_p, out_m, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(stats_p, stats_m, atol=1e-12, rtol=1e-11)
    assert len(saved_p) == len(saved_m)
    for i, (p, m) in enumerate(zip(saved_p, saved_m)):
        assert p.shape == m.shape and p.dtype == m.dtype, i
        if p.dtype == torch.int32:
            assert torch.equal(p, m), i
        else:
            torch.testing.assert_close(p, m, atol=1e-12, rtol=1e-11, msg=f"saved {i}")


# ---- emulation only: results must not depend on the order threads run between barriers ----

@pytest.mark.skipif(not EMULATED, reason="AIA_CUDA_EMULATION_ORDER is a setting of the CPU emulator only")
@pytest.mark.parametrize("persistent", ["0", "1"], ids=["multi_launch", "persistent"])
def test_emulated_thread_order_does_not_matter(monkeypatch, persistent):
    """The emulator runs a block's threads one after the other between barriers; forward,
    reverse and shuffled orders must give bitwise equal results, or two threads of one
    barrier interval touch the same memory (a missing __syncthreads or grid.sync)."""
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", persistent)
    ref, module = make_pair("CinST->STinC", "native", dtype=torch.float32, device=DEVICE)
    x = torch.randn(12, 9, 11, 13)
    g = torch.randn_like(x)
    results = []
    for order in ("forward", "reverse", "shuffle:1", "shuffle:2"):
        monkeypatch.setenv("AIA_CUDA_EMULATION_ORDER", order)
        module.load_state_dict(ref.state_dict())
        results.append(run(module, x, g))
    for other in results[1:]:
        assert_equal_results(results[0], other)


@pytest.mark.parametrize("needs", ["all", "no_x", "params_only_last", "nothing_but_x"])
def test_persistent_backward_needs(monkeypatch, needs):
    """plan_backward with some gradients not asked for: the one-launch backward returns
    what the walk returns (empty where not needed), values included."""
    _, args = plan_op_args(device=DEVICE)
    x = args[0]
    n = len(args[3])
    flags = {"all": [1] * (1 + 3 * n),
             "no_x": [0] + [1] * (3 * n),
             "params_only_last": [0] + ([0] * (n - 1) + [1]) * 3,
             "nothing_but_x": [1] + [0] * (3 * n)}[needs]
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", "0")
    _, saved, stats = torch.ops.aia_native.plan_forward(*args)
    grad_out = torch.randn_like(x)
    results = []
    for persistent in ("0", "1"):
        monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", persistent)
        before = _backward_paths()
        results.append(torch.ops.aia_native.plan_backward(grad_out, x, NUM_SEGMENTS, args[2], args[3], args[4],
                                                          args[8], args[9], saved, stats, flags))
        assert _backward_paths()[int(persistent)] == before[int(persistent)] + 1
    (gx_m, *lists_m), (gx_p, *lists_p) = results
    assert gx_p.shape == gx_m.shape
    torch.testing.assert_close(gx_p, gx_m, atol=1e-12, rtol=1e-11)
    for kind, (list_m, list_p) in enumerate(zip(lists_m, lists_p)):
        for g, (m, p) in enumerate(zip(list_m, list_p)):
            assert p.shape == m.shape and p.dtype == m.dtype, (kind, g)
            torch.testing.assert_close(p, m, atol=1e-12, rtol=1e-11, msg=f"output {kind} of gate {g}")


# ---- recompute (Stage.recompute, tests/test_training_memory.py) on both CUDA paths ----

def _run_paths(monkeypatch, module, x, grad_out, forward_persistent, backward_persistent):
    """One train step, the forward on one path and the backward on the other or the same."""
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", "1" if forward_persistent else "0")
    x = x.detach().clone().requires_grad_()
    before = _backward_paths()
    out = module(x)
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", "1" if backward_persistent else "0")
    out.backward(grad_out)
    assert [a - b for a, b in zip(_backward_paths(), before)] == ([0, 1] if backward_persistent else [1, 0])
    return [out, x.grad, *(p.grad for p in module.parameters()), *(b.clone() for b in module.buffers())]


PATHS = {(False, False): "multi", (True, True): "persistent", (True, False): "persistent_then_multi",
         (False, True): "multi_then_persistent"}


@pytest.mark.parametrize("variant,dtype,paths", [
    pytest.param(v, d, p, id=f"{PATHS[p]}-{'f64' if d == torch.float64 else 'f32'}-{v}") for v, d, p in matrix(
        list(itertools.product(SUBSET, [torch.float64, torch.float32], PATHS)),
        [(v, d, p) for (v, d), p in diagonal(list(itertools.product(SUBSET, [torch.float64, torch.float32])),
                                             PATHS)])])
def test_recompute_on_both_paths(monkeypatch, variant, dtype, paths):
    """The recomputed stages pool with their path's code: on the forward's path, bitwise the
    plan that keeps everything; with AIA_NATIVE_CUDA_PERSISTENT changed between forward and
    backward (the recompute then uses the other path's gate values), equal to rounding."""
    _, module = make_pair(variant, "native", dtype=dtype, device=DEVICE)
    kept_module = copy.deepcopy(module)
    kept_module.recompute = False
    x = torch.randn(SHAPE, dtype=dtype, device=DEVICE)
    grad_out = torch.randn_like(x)
    recomputed = _run_paths(monkeypatch, module, x, grad_out, *paths)
    kept = _run_paths(monkeypatch, kept_module, x, grad_out, *paths)
    assert len(kept) == len(recomputed)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    for i, (a, b) in enumerate(zip(kept, recomputed)):
        if paths[0] == paths[1]:
            assert torch.equal(a, b), i
        else:
            torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=f"result {i}")


def test_both_passes_take_one_launch_only_where_both_can(monkeypatch):
    """A plan that recomputes stages takes the one-launch forward only where the one-launch
    backward applies too (so the default, by size, never mixes the paths)."""
    monkeypatch.setenv("AIA_NATIVE_CUDA_PERSISTENT", "1")
    _, module = make_pair("CinST->STinC", "native", device=DEVICE)
    x = torch.randn(SHAPE, dtype=torch.float64, device=DEVICE, requires_grad=True)
    before, before_bwd = _paths(), _backward_paths()
    module(x).sum().backward()
    assert [a - b for a, b in zip(_paths(), before)] == [0, 1]
    assert [a - b for a, b in zip(_backward_paths(), before_bwd)] == [0, 1]
