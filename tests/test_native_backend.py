"""What is specific to the native backend (csrc/, C++ on CPU): long rows (vector chunks),
determinism across thread counts, the build (compiler errors, C++17, a portable build),
its own ops (opcheck, bad arguments, the plan ops against the primitive walk), bad inputs,
and what backend="auto" picks. The variant x mode x dtype matrix against the reference,
gradcheck and layouts are test_conformance.py's native-cpu target. The extension is built
on first use (the first test pays)."""
import copy
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

import aia_kernels
from aia_kernels import backends, warnings_once
from aia_kernels.primitives import PrimitivesOnly

from aia_testing import (
    SHAPE,
    assert_equal_results,
    compare_with_reference,
    make_pair,
    plan_op_args,
    report_cuda_available,
    run,
)

native = pytest.importorskip("aia_kernels.native")


@pytest.fixture(scope="module", autouse=True)
def built():
    native.load()  # a build failure fails here, with the compiler's message


# Rows longer than one vector (16 floats, 8 doubles) take several chunks; past 4 chunks,
# several column groups (the default shapes have 7-wide rows: one chunk).
@pytest.mark.parametrize("variant", ["CinST->STinC", "STinC->CinST", "C+ST", "ST"])
@pytest.mark.parametrize("dtype,shape", [(torch.float64, (6, 3, 5, 37)), (torch.float32, (6, 3, 4, 70)),
                                         (torch.float32, (6, 2, 3, 17))])
def test_long_rows(variant, dtype, shape):
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (2e-4, 1e-4)
    compare_with_reference(variant, "native", dtype=dtype, x=torch.randn(shape, dtype=dtype), atol=atol, rtol=rtol)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    compare_with_reference(variant, "native", dtype=dtype, x=x, atol=atol, rtol=rtol)


# A row shorter than a vector is one partial chunk, loaded and stored by lane count (with
# AVX2 the store is made of 4-, 2- and 1-lane pieces): every width up to a vector and past it.
@pytest.mark.parametrize("dtype,width", [(torch.float32, w) for w in range(1, 10)]
                         + [(torch.float64, w) for w in range(1, 6)])
def test_every_partial_row_width(dtype, width):
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (2e-4, 1e-4)
    x = torch.randn(6, 3, 3, width, dtype=dtype)
    compare_with_reference("CinST->STinC", "native", dtype=dtype, x=x, atol=atol, rtol=rtol)


def test_deterministic_across_runs_and_thread_counts():
    """Bitwise equal results run to run and with 1 or 2 threads: every parallel task owns
    its outputs (no atomics) and reductions are split in fixed chunks, not per thread."""
    ref, module = make_pair("CinST->STinC", "native", dtype=torch.float32, num_segments=4)
    x = torch.randn(16, 24, 9, 10)
    g = torch.randn_like(x)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            module.load_state_dict(ref.state_dict())
            results.append(run(module, x, g))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        assert_equal_results(results[0], other)


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_structure_compiled_loops_give_the_generic_loops_bits(variant):
    """Float passes over unit-stride rows run loops compiled per weight and upstream structure
    (csrc/aia_cpu_chunks.h); other strides run the loops that read the structure per chunk.
    A channels_last input takes the latter: both must give the same bits (same arithmetic,
    same order; the build contracts no multiply-adds). Planes up to 20x20 take the lanes
    walks either way (csrc/aia_cpu_lanes.h: a strided plane is copied first), larger ones
    the row walk: rows of two 16-lane chunks, of one 8-lane chunk, of several chunks."""
    for shape in [(8, 8, 5, 20), (8, 16, 3, 7), (8, 8, 21, 20), (8, 8, 2, 40)]:
        _, module = make_pair(variant, "native", dtype=torch.float32, num_segments=4)
        other = copy.deepcopy(module)
        x, g = torch.randn(shape), torch.randn(shape)
        compiled = run(module, x, g)
        generic = run(other, x.contiguous(memory_format=torch.channels_last),
                      g.contiguous(memory_format=torch.channels_last))
        assert_equal_results(compiled, generic)


def test_auto_uses_native_on_cpu():
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="auto")
    module(torch.randn(SHAPE))
    assert module.last_backend == "native"


def test_auto_falls_back_to_reference_with_warning(monkeypatch):
    monkeypatch.setitem(backends.stand_ins, "native",
                        backends.FusedBackend("native", native.NativePrimitives(), lambda device: "not built"))
    monkeypatch.setattr(warnings_once, "_warned", set())
    module = aia_kernels.build("C", num_segments=3, backend="auto")
    with pytest.warns(RuntimeWarning, match="reference"):
        module(torch.randn(SHAPE))
    assert module.last_backend == "reference"


def test_cuda_refused_unless_opted_in(monkeypatch):
    """The CUDA kernels are compiled but have never run on a GPU: auto must not pick them."""
    monkeypatch.delenv("AIA_NATIVE_CUDA", raising=False)
    assert "untested" in native.unavailable_reason(torch.device("cuda"))
    assert native.unavailable_reason(torch.device("cpu")) is None


@pytest.mark.parametrize("machine", ["this", "gpu"])
def test_build_failure_reports_compiler_message(monkeypatch, tmp_path, machine):
    """A source folder holding one broken C++ file: the compiler's message is the error, also
    where the build would add the CUDA sources (the GPU machine), which that folder lacks."""
    if machine == "gpu":
        report_cuda_available(monkeypatch)
        assert native._with_cuda()
    (tmp_path / "broken.cpp").write_text("int main() { return undeclared_name_xyz; }\n")
    monkeypatch.setattr(native, "CSRC", tmp_path)
    monkeypatch.setattr(native, "CPU_SOURCES", ("broken.cpp",))
    monkeypatch.setattr(native, "CUDA_SOURCES", ())
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("AIA_KERNELS_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(RuntimeError, match="undeclared_name_xyz"):
        native.load()
    reason = native.unavailable_reason(torch.device("cpu"))
    assert "undeclared_name_xyz" in reason and os.path.isdir(tmp_path / "build")


def test_every_source_is_built_as_cxx17():
    """The extension is compiled as C++17, the standard of the GPU machine's torch (2.11),
    also under a torch whose default is C++20 (2.13, CI's): the last -std of each compile
    line that torch wrote into build.ninja."""
    info = native.build_info()
    if info["build_directory"] is None:
        pytest.skip("a prebuilt library is loaded (setup.py builds it with the same flags, native.CXX_FLAGS)")
    text = (Path(info["build_directory"]) / "build.ninja").read_text()
    lines = dict(re.findall(r"^((?:cuda_)?cflags) = (.*)$", text, flags=re.M))
    assert "cflags" in lines and ("cuda_cflags" in lines) == info["cuda"], sorted(lines)
    for key, line in lines.items():
        assert re.findall(r"-std=(\S+)", line)[-1] == "c++17", (key, line)


# ---- the ops directly ----

def _sample_gate_args(v):
    """A C factor and an ST factor with random gates, as the ops' flat arguments."""
    from aia_kernels.primitives import gate_shape
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    axes = "CTHW"
    zs = [torch.randn(gate_shape(v.shape, a), dtype=acc) for a in axes]
    ss = [torch.tensor([1.5, -0.2], dtype=acc) for _ in axes]
    return zs, ss, axes, [0, 2, 1, 3]  # product of (C) and (T, H, W)


def _sample_pooled(v, axes):
    from aia_kernels.primitives import gate_shape
    grads, argmaxes = [], []
    for a in axes:
        shape = gate_shape(v.shape, a)
        length = v.shape[{"T": 1, "C": 2, "H": 3, "W": 4}[a]]
        grads.append(torch.randn(shape[0], 2, *shape[1:], dtype=v.dtype))
        argmaxes.append(torch.randint(0, length, shape, dtype=torch.int32))
    return grads, argmaxes


def test_opcheck_native_ops():
    ops = torch.ops.aia_native
    v = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    zs, ss, axes, desc = _sample_gate_args(v)
    opcheck = torch.library.opcheck
    opcheck(ops.pool.default, (v, zs, ss, axes, desc, "THW"))
    opcheck(ops.pool.default, (v, [], [], "", [0, 0], "C"))
    opcheck(ops.pool.default, (v, zs, ss, axes, desc, "THW", False))
    opcheck(ops.apply.default, (v, zs, ss, axes, desc, torch.empty_like(v)))
    grads, argmaxes = _sample_pooled(v, "THW")
    opcheck(ops.weight_grad.default, (v, [torch.randn_like(v)], [], [], "", [-1], zs, ss, axes, desc))
    opcheck(ops.weight_grad.default, (v, [], grads, argmaxes, "THW", [3], zs, ss, axes, desc))
    opcheck(ops.input_grad.default, ([torch.randn_like(v)], grads, argmaxes, "THW", [-1, 3], zs + zs, ss + ss,
                                     axes + axes, desc + desc, torch.empty_like(v)))
    pooled = torch.randn(2, 2, 3, 5, 6, dtype=torch.float64)
    w = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for mode in (0, 1, 2):
        opcheck(ops.gate_forward.default, (pooled, w, mode, one, zero, zero, one, 1e-5))
    z, scale_shift, stats = ops.gate_forward(pooled, w, 1, one, zero, None, None, 1e-5)
    opcheck(ops.gate_backward.default, (torch.randn_like(z), pooled, z, scale_shift, stats, w, 1, one, 1e-5,
                                        [1, 1, 1, 1]))


def test_opcheck_plan_ops():
    ops = torch.ops.aia_native
    _, args = plan_op_args()
    torch.library.opcheck(ops.plan_forward.default, args)
    x, segments, plan, conv_w, bn_w, _, _, _, modes, eps = args
    _, saved, stats = ops.plan_forward(*args)
    n = len(conv_w)
    for needs in ([1] * (1 + 3 * n), [0] + [1] * n + [0] * 2 * n):
        torch.library.opcheck(ops.plan_backward.default, (torch.randn_like(x), x, segments, plan, conv_w, bn_w, modes,
                                                          eps, saved, stats, needs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d1,d2,d3", [(3, 4, 1), (2, 5, 5), (3, 2, 10), (2, 3, 15), (2, 2, 16), (2, 3, 17), (1, 1, 3)])
def test_gate_conv_matches_torch(d1, d2, d3, dtype):
    """The gate's Conv3d(2, 1, 3, padding=1) without BN (z) and its input and weight
    gradients (through the sigmoid) against torch's, at rows shorter than, as long as and
    longer than a float vector (csrc/aia_cpu_gate.cpp pads short rows 16 entries at a time),
    padded slices that are and are not whole vectors."""
    torch.manual_seed(d1 * 100 + d2 * 10 + d3)
    pooled = torch.randn(2, 2, d1, d2, d3, dtype=dtype, requires_grad=True)
    w = torch.randn(1, 2, 3, 3, 3, dtype=dtype, requires_grad=True)
    ops = torch.ops.aia_native
    z, scale_shift, stats = ops.gate_forward(pooled.detach(), w.detach(), 0, None, None, None, None, 1e-5)
    want_z = torch.nn.functional.conv3d(pooled, w, padding=1)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(z.reshape(want_z.shape), want_z.detach(), **tol)
    grad = torch.randn_like(want_z)
    torch.sigmoid(want_z).backward(grad)
    dpooled, dw, _, _ = ops.gate_backward(grad.reshape(z.shape), pooled.detach(), z, scale_shift, stats, w.detach(), 0,
                                          None, 1e-5, [1, 1, 0, 0])
    torch.testing.assert_close(dpooled, pooled.grad, **tol)
    torch.testing.assert_close(dw.reshape(w.shape), w.grad, **tol)


@pytest.mark.parametrize("scale_shift", [(1.0, 0.0), (0.7, -0.3)])
def test_float_gate_values_match_torch_sigmoid(scale_shift):
    """The CPU gate values of float32 gates (csrc/aia_cpu_gate.cpp, own vectorised sigmoid)
    against torch.sigmoid: within 2 ulp, NaN kept, the float range's ends and a partial
    vector at the end. Read through `apply` on a tensor of ones (out = the C gate)."""
    torch.manual_seed(0)
    t, h, w = 4, 50, 53
    ends = [0.0, -0.0, 88.0, -88.0, 89.0, -89.0, 100.0, -100.0, float("inf"), float("-inf"), float("nan"), 1e-30]
    z = torch.cat([torch.randn(t * h * w - len(ends)) * 6, torch.tensor(ends)]).reshape(1, t, h, w)
    v = torch.ones(1, t, 1, h, w)
    out = torch.empty_like(v)
    ss = torch.tensor(scale_shift)
    torch.ops.aia_native.apply(v, [z], [ss], "C", [0, 1, 1], out)
    got, want = out[:, :, 0], torch.sigmoid(z * ss[0] + ss[1])
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    ulp = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()[~nan]
    assert ulp.max() <= 2, ulp.max()


def _gate_bns(momenta):
    bns = [torch.nn.BatchNorm3d(1, momentum=m) for m in momenta]
    for i, bn in enumerate(bns):
        bn.running_mean.fill_(0.1 * i - 0.3)
        bn.running_var.fill_(1.0 + 0.37 * i)
        bn.num_batches_tracked.fill_(i)
    return bns


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64])
def test_running_stats_op_equals_foreach_path(stats_dtype, monkeypatch):
    """aia_native::update_running_stats leaves the bits the foreach ops leave (buffers and
    num_batches_tracked), for a subset of the gates (one BN in eval mode is left alone,
    momentum None takes the slow path)."""
    from aia_kernels import running_stats
    momenta = [0.1, 0.01, None, 0.3, 0.999]
    stats = torch.randn(len(momenta), 2, dtype=stats_dtype).abs()
    counts = [2, 49, 3, 1568, 7]
    results = []
    for native_op in (True, False):
        bns = _gate_bns(momenta)
        bns[1].eval()  # not tracking in this step: left alone
        if not native_op:
            monkeypatch.setattr(running_stats, "_native_op", lambda stats: None)
        assert (running_stats._native_op(stats) is not None) == native_op
        for _ in range(3):
            running_stats.update_running_stats(bns, stats, counts)
        results.append([t.clone() for bn in bns for t in bn.buffers()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], _gate_bns(momenta)[0].running_mean)  # it did update


def test_opcheck_running_stats_op():
    bns = _gate_bns([0.1, 0.2])
    args = (torch.rand(3, 2), [bn.running_mean for bn in bns], [bn.running_var for bn in bns],
            [bn.num_batches_tracked for bn in bns], [0.1, 0.2], [2, 0], [10, 20])
    torch.library.opcheck(torch.ops.aia_native.update_running_stats.default, args)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.aia_native.update_running_stats(args[0], [m.double() for m in args[1]], *args[2:])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.aia_native.update_running_stats(*args[:5], [2, 3], args[6])


@pytest.mark.parametrize("variant", ["CinST->STinC", "C+ST", "STinC->CinST", "ST"])
def test_plan_ops_equal_primitive_walk(variant, monkeypatch):
    """plan_forward/backward run the same kernels in the generic executor's order: bitwise equal."""
    from aia_kernels import fused
    torch.manual_seed(0)
    module = aia_kernels.build(variant, num_segments=3, backend="native").double().train()
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(SHAPE, dtype=torch.float64)
    results = []
    for prims in (None, PrimitivesOnly(native.NativePrimitives())):
        if prims is not None:
            assert not hasattr(prims, "forward_plan")
            monkeypatch.setattr(fused, "_primitives", lambda backend, device, p=prims: p)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        x.grad = None
        module.zero_grad()
        out = module(x)
        out.backward(grad)
        results.append([out, x.grad] + [p.grad for p in module.parameters()] + list(module.state_dict().values()))
        module.load_state_dict(state)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("variant", ["CinST->STinC", "C+ST"])
def test_plan_forward_eval_gate_values_without_z(variant, use_bn, monkeypatch):
    """In eval, float32, plan_forward makes each gate's values in its conv's blocks (no z,
    cpu::conv_forward_value); the primitive walk makes z, then the values: bitwise equal,
    on planes of whole and partial vectors."""
    from aia_kernels import fused
    torch.manual_seed(0)
    module = aia_kernels.build(variant, num_segments=2, use_BN=use_bn, backend="native")
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if "running_mean" in name:
                buffer.uniform_(-0.3, 0.3)
            if "running_var" in name:
                buffer.uniform_(0.5, 2.0)
    module.eval()
    for shape in [(4, 24, 9, 13), (2, 16, 20, 33)]:
        x = torch.randn(shape)
        outputs = []
        for prims in (None, PrimitivesOnly(native.NativePrimitives())):
            if prims is not None:
                monkeypatch.setattr(fused, "_primitives", lambda backend, device, p=prims: p)
            with torch.no_grad():
                outputs.append(module(x))
            monkeypatch.undo()
        assert torch.equal(outputs[0], outputs[1])
    assert module.last_backend == "native"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# 32-byte chunks (floats), one 64-byte chunk, 3 and 4 per row (ResNet's 56), two column groups
@pytest.mark.parametrize("width", [7, 12, 37, 56, 70])
@pytest.mark.parametrize("special", ["ties_and_infinities", "nans"])
def test_pool_without_argmax_keeps_the_maxima(width, special, dtype):
    """plan_forward pools a stage the backward pools again without tracking its max positions
    (nothing keeps them): the pool op's with_argmax=False. Its pooled tensors must be those of
    the tracking kernels bit for bit (the first-maximum rule and the NaN walk decide the max
    too), with ties, infinities and NaNs in the rows, unweighted and weighted."""
    ops = torch.ops.aia_native
    torch.manual_seed(width)
    v = torch.randint(-2, 3, (2, 3, 4, 5, width)).to(dtype)
    v[0, 0, 0, 0] = float("-inf")
    v[0, 1, 1, 2] = float("inf")
    if special == "nans":
        v[1, 2, 3, 1, width // 2] = float("nan")
        v[1, 0, 2, 4, 0] = float("nan")
    zs, ss, gate_axes, desc = _sample_gate_args(v)
    for weight in (([], [], "", [0, 0]), (zs, ss, gate_axes, desc)):
        for axes in ("C", "THW", "TW"):
            tracked = ops.pool(v, *weight, axes)
            untracked = ops.pool(v, *weight, axes, False)
            for i in range(len(axes)):
                torch.testing.assert_close(untracked[2 * i], tracked[2 * i], atol=0, rtol=0, equal_nan=True)
                assert untracked[2 * i + 1].numel() == 0


@pytest.mark.parametrize("width", [7, 12, 37])
def test_plan_forward_without_argmax_equals_primitive_walk_on_ties(width, monkeypatch):
    """The same through a module: plan_forward (no max positions for the stages the backward
    pools again) and the primitive walk (every pool tracks them) give the same eval output and
    train step bit for bit on integer inputs (ties everywhere)."""
    from aia_kernels import fused
    torch.manual_seed(width)
    x = torch.randint(-2, 3, (6, 3, 5, width)).float()
    grad = torch.randn_like(x)
    results = []
    for prims in (None, PrimitivesOnly(native.NativePrimitives())):
        if prims is not None:
            monkeypatch.setattr(fused, "_primitives", lambda backend, device, p=prims: p)
        torch.manual_seed(1)
        module = aia_kernels.build("CinST->STinC", num_segments=3, backend="native")
        with torch.no_grad():
            evaluated = module.eval()(x)
        xt = x.clone().requires_grad_()
        out = module.train()(xt)
        out.backward(grad)
        results.append([evaluated, out, xt.grad] + [p.grad for p in module.parameters()])
    assert all(t.isfinite().all() for t in results[0])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["too_short", "too_long", "bad_axis", "factor", "stage_axis", "recompute_flag",
                                  "combine", "segments", "needs"])
def test_bad_plan_arguments(case):
    ops = torch.ops.aia_native
    _, args = plan_op_args("C")
    x, segments, plan, *rest = args
    # "C": 1 gate (axis C); 1 stage pooling C with no weight, gate 0, kept (0); output weight = the C gate.
    assert plan == [1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0]
    bad = {"too_short": plan[:-1], "too_long": plan + [0], "bad_axis": [1, 7] + plan[2:],
           "factor": plan[:-2] + [3, 0], "stage_axis": plan[:3] + [1] + plan[4:],
           "recompute_flag": plan[:8] + [2] + plan[9:], "combine": plan[:9] + [2] + plan[10:]}
    with pytest.raises(RuntimeError, match="aia_native"):
        if case == "segments":
            ops.plan_forward(x, 4, plan, *rest)
        elif case == "needs":
            _, saved, stats = ops.plan_forward(*args)
            ops.plan_backward(torch.randn_like(x), x, segments, plan, rest[0], rest[1], rest[5], rest[6], saved, stats,
                              [1, 1])
        else:
            ops.plan_forward(x, segments, bad[case], *rest)


@pytest.mark.parametrize("case", ["inference_plan", "other_input", "missing"])
def test_backward_rejects_saved_tensors_of_another_forward(case):
    """plan_backward checks the saved tensors it reads against its plan and input (it read an
    inference forward's empty ones out of bounds before)."""
    from aia_kernels.plan import for_inference
    ops = torch.ops.aia_native
    _, args = plan_op_args("CinST->STinC")
    x, segments, plan, *rest = args
    forward_plan, forward_x = plan, x
    if case == "inference_plan":  # every stage recomputed: no P, argmax or z kept
        forward_plan = list(native.encode_plan(for_inference("CinST->STinC")))
    elif case == "other_input":
        forward_x = torch.randn(x.shape[0], x.shape[1], x.shape[2] + 1, x.shape[3], dtype=x.dtype)
    _, saved, stats = ops.plan_forward(forward_x, segments, forward_plan, *rest)
    if case == "missing":
        saved = list(saved)
        saved[0] = torch.empty(0, dtype=x.dtype)  # the C stage's pooled tensor
    with pytest.raises(RuntimeError, match="saved .* of gate"):
        ops.plan_backward(torch.randn_like(x), x, segments, plan, rest[0], rest[1], rest[5], rest[6], saved, stats,
                          [1] * (1 + 3 * len(rest[0])))


@pytest.mark.parametrize("case", ["bn_stats", "bn_weight", "running_mean"])
def test_plan_ops_reject_bad_bn_arguments(case):
    """BN scalars and the statistics list have fixed sizes; other sizes raise (a three-entry BN
    weight was read as its first entry, a short bn_stats failed in ATen's select)."""
    ops = torch.ops.aia_native
    _, args = plan_op_args("CinST->STinC")
    x, segments, plan, conv_w, bn_w, bn_b, means, vars_, modes, eps = args
    n = len(conv_w)
    with pytest.raises(RuntimeError, match="aia_native: (bn_stats|BN parameters)"):
        if case == "running_mean":
            ops.plan_forward(x, segments, plan, conv_w, bn_w, bn_b, [torch.zeros(3, dtype=x.dtype)] * n, vars_,
                             [2] * n, eps)
        else:
            _, saved, stats = ops.plan_forward(*args)
            if case == "bn_stats":
                stats = stats[:3]
            else:
                bn_w = [torch.ones(3, dtype=x.dtype)] * n
            ops.plan_backward(torch.randn_like(x), x, segments, plan, conv_w, bn_w, modes, eps, saved, stats,
                              [1] * (1 + 3 * n))


def test_primitives_match_torch_primitives():
    """pool's argmax and every small output equal the plain-torch primitives exactly in float64."""
    from aia_kernels.primitives import GateValue, WeightValue
    from aia_kernels.primitives.torch_impl import TorchPrimitives
    v = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64).transpose(3, 4).contiguous().transpose(3, 4)
    zs, ss, axes, _ = _sample_gate_args(v)
    gates = [GateValue(a, z, s) for a, z, s in zip(axes, zs, ss)]
    for weight in (WeightValue((), "prod"), WeightValue(((gates[0],), tuple(gates[1:])), "mean")):
        for stage_axes in ("C", "THW"):
            for (p1, a1), (p2, a2) in zip(native.NativePrimitives().pool(v, weight, stage_axes),
                                          TorchPrimitives().pool(v, weight, stage_axes)):
                torch.testing.assert_close(p1, p2, atol=1e-12, rtol=1e-12)
                assert torch.equal(a1, a2)


def _pool_both(v, axes):
    from aia_kernels.primitives import WeightValue
    from aia_kernels.primitives.torch_impl import TorchPrimitives
    weight = WeightValue((), "prod")
    return zip(native.NativePrimitives().pool(v, weight, axes), TorchPrimitives().pool(v, weight, axes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("height,width", [(5, 3), (5, 7), (19, 7), (5, 12), (19, 12), (5, 19), (5, 37), (19, 56),
                                          (5, 70)])
def test_pool_ties_and_infinities(height, width, dtype):
    """Pooling along each axis, rows of one chunk (half and whole vectors) and of several,
    planes shorter and taller than a vector is wide: integer values (many ties: the first
    position wins) and rows of -inf and +inf, equal to the plain-torch primitives. Six
    channels: the C pass's blocks of four and a remainder."""
    torch.manual_seed(width)
    v = torch.randint(-2, 3, (2, 3, 6, height, width)).to(dtype)
    v[0, 0, 0, 0] = float("-inf")
    v[0, 1, 1, 2] = float("inf")
    v[0, 2, 1, 3, -1] = float("-inf")
    for axes in ("C", "THW"):
        for (p1, a1), (p2, a2) in _pool_both(v, axes):
            torch.testing.assert_close(p1, p2, atol=0, rtol=0)
            assert torch.equal(a1, a2), axes


@pytest.mark.parametrize("width", [7, 12, 37, 56, 70])
def test_pool_nans(width):
    """A NaN makes the mean of every line through it NaN; lines without one pool as the
    plain-torch primitives do. (Where a line holds a NaN, the max and its position follow
    the kernels' in-order strict >, not torch.max's NaN propagation: the spec is silent.)"""
    torch.manual_seed(width)
    v = torch.randint(-2, 3, (2, 3, 4, 5, width)).float()
    v[1, 2, 3, 1, width // 2] = float("nan")
    v[1, 0, 2, 4, 0] = float("nan")
    for axes in ("C", "THW"):
        has_nan = [ref[0][:, :1] > 0 for _, ref in _pool_both(v.isnan().float(), axes)]  # max channel: 1 if a NaN
        for hit, ((p1, a1), (p2, a2)) in zip(has_nan, _pool_both(v, axes)):
            assert hit.any()
            mean1, mean2 = p1[:, 1:], p2[:, 1:]
            assert torch.equal(mean1.isnan(), hit) and torch.equal(mean2.isnan(), hit)
            clean = ~hit.expand_as(p1)
            torch.testing.assert_close(p1[clean], p2[clean], atol=0, rtol=0)
            assert torch.equal(a1[~hit[:, 0]], a2[~hit[:, 0]]), axes


@pytest.mark.parametrize("case", ["rank", "gate_shape", "axis", "dout_dtype", "desc", "pooled_dtype"])
def test_bad_op_arguments(case):
    ops = torch.ops.aia_native
    v = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    zs, ss, axes, desc = _sample_gate_args(v)
    with pytest.raises(RuntimeError, match="aia_native"):
        if case == "rank":
            ops.pool(v[0], [], [], "", [0, 0], "C")
        elif case == "gate_shape":
            ops.pool(v, [zs[1]] + zs[1:], ss, axes, desc, "C")
        elif case == "axis":
            ops.pool(v, [], [], "", [0, 0], "X")
        elif case == "dout_dtype":
            ops.weight_grad(v, [torch.randn_like(v).float()], [], [], "", [-1], zs, ss, axes, desc)
        elif case == "desc":
            ops.pool(v, zs, ss, axes, [0, 1, 2], "C")
        else:
            ops.gate_forward(torch.randn(1, 2, 3, 3, 3, dtype=torch.float16), torch.randn(1, 2, 3, 3, 3), 0,
                             None, None, None, None, 1e-5)


def test_bad_module_inputs():
    module = aia_kernels.build("C", num_segments=3, backend="native")
    with pytest.raises(TypeError):
        module(torch.zeros(SHAPE, dtype=torch.int64))
    with pytest.raises(ValueError):
        module(torch.randn(5, 5, 4, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(torch.randn(SHAPE))


def test_parametrized_gate_weight_is_read_through_its_parametrization():
    """The fused path reads registered parameters directly (module_tensors.registered); a
    parametrized conv weight has none registered and must still be read through getattr."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    fused = aia_kernels.build("CinST->STinC", num_segments=8, backend="native").eval()
    ref = aia_kernels.build("CinST->STinC", num_segments=8, backend="reference").eval()
    ref.load_state_dict(fused.state_dict())
    parametrize.register_parametrization(fused.gates()[1][1], "weight", Double())
    with torch.no_grad():
        ref.gates()[1][1].weight.mul_(2)
        x = torch.randn(8, 16, 7, 7)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
