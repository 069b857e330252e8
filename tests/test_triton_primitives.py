"""Each Triton primitive against the plain-torch oracle (``TorchPrimitives``) on
small random inputs: every weight shape (0, 1, 2 factors of both kinds, product
and mean), full and pooled upstreams, every BN mode, strided inputs, max ties,
and the multi-block code paths (C chunks, H row blocks)."""
import pytest
import torch

from aia_kernels.primitives import BN_BATCH, BN_NONE, BN_RUNNING, GateValue, PooledGrad, WeightValue, gate_shape
from aia_kernels.primitives.torch_impl import TorchPrimitives

triton_backend = pytest.importorskip("aia_kernels.triton")
from aia_kernels.triton import TritonPrimitives, tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V_SHAPE = (2, 3, 5, 4, 7)  # (N, T, C, H, W)
TRI, REF = TritonPrimitives(), TorchPrimitives()


def random_gate(axis, v_shape=V_SHAPE, dtype=torch.float64):
    z = torch.randn(gate_shape(v_shape, axis), dtype=dtype, device=DEVICE)
    return GateValue(axis, z, torch.tensor([0.8, -0.3], dtype=dtype, device=DEVICE))


def random_weight(spec: str, v_shape=V_SHAPE, dtype=torch.float64) -> WeightValue:
    """spec: factors separated by ',' ('C' or 'THW'), then ':prod' or ':mean'."""
    kinds, combine = spec.split(":")
    factors = tuple(tuple(random_gate(a, v_shape, dtype) for a in kind) for kind in kinds.split(",") if kind)
    return WeightValue(factors, combine)


WEIGHTS = [":prod", "C:prod", "THW:prod", "C,THW:prod", "THW,C:prod", "THW,THW:prod", "C,C:prod", "C,THW:mean",
           "THW,C:mean", "THW,THW:mean", "C,C:mean"]


def random_v(layout="contiguous", shape=V_SHAPE, dtype=torch.float64):
    n, t, c, h, w = shape
    x = torch.randn(n * t, c, h, w, dtype=dtype, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every dim strided: a slice of a bigger tensor, H and W swapped
        x = torch.randn(n * t, c, 2 * w, h, dtype=dtype, device=DEVICE)[:, :, ::2].transpose(2, 3)
    return x.view(shape)


def pooled_upstream(axes, v_shape=V_SHAPE, dtype=torch.float64):
    items = []
    for axis in axes:
        gshape = gate_shape(v_shape, axis)
        length = v_shape[{"T": 1, "C": 2, "H": 3, "W": 4}[axis]]
        grad = torch.randn(gshape[0], 2, *gshape[1:], dtype=dtype, device=DEVICE)
        argmax = torch.randint(0, length, gshape, dtype=torch.int32, device=DEVICE)
        items.append(PooledGrad(axis, grad, argmax))
    return items


def assert_lists_close(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, (list, tuple)):
            assert_lists_close(x, y, **tol)
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and x.is_contiguous()
            torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("axes", ["C", "THW"])
@pytest.mark.parametrize("spec", WEIGHTS)
def test_pool(axes, spec):
    v, weight = random_v(), random_weight(spec)
    assert_lists_close(TRI.pool(v, weight, axes), REF.pool(v, weight, axes), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("axes", ["C", "THW"])
def test_pool_strided_inputs(layout, axes):
    v, weight = random_v(layout), random_weight("C,THW:prod")
    assert_lists_close(TRI.pool(v, weight, axes), REF.pool(v, weight, axes), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("axes", ["C", "THW"])
def test_pool_ties_take_first_index(axes):
    """Integer-valued inputs tie a lot; the argmax must be the first index, like torch.max."""
    v = torch.randint(-2, 3, V_SHAPE, device=DEVICE).double()
    weight = random_weight("C:prod") if axes == "THW" else random_weight(":prod")  # constant along the axis
    assert_lists_close(TRI.pool(v, weight, axes), REF.pool(v, weight, axes), atol=1e-12, rtol=1e-10)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force several C chunks and several H row blocks (partials combined on the host)."""
    monkeypatch.setattr(tiles, "channel_tile", lambda v: tiles.Tile("channel", (2, 8), 4))
    monkeypatch.setattr(tiles, "spatiotemporal_tile",
                        lambda v: tiles.Tile("spatiotemporal", (2, 1, tiles._pow2(v.shape[4])), 4))


@pytest.mark.parametrize("axes", ["C", "THW"])
def test_pool_multi_block(small_tiles, axes):
    v = torch.randint(-2, 3, V_SHAPE, device=DEVICE).double()
    weight = random_weight("C:prod") if axes == "THW" else random_weight(":prod")
    assert_lists_close(TRI.pool(v, weight, axes), REF.pool(v, weight, axes), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("spec", ["C,THW:prod", "THW,THW:prod", "C,C:mean"])
def test_weight_grad_multi_block(small_tiles, spec):
    v, weight, up = random_v(), random_weight(spec), torch.randn(V_SHAPE, dtype=torch.float64, device=DEVICE)
    assert_lists_close(TRI.weight_grad(v, up, weight), REF.weight_grad(v, up, weight), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("spec", WEIGHTS)
def test_apply(layout, spec):
    v, weight = random_v(layout), random_weight(spec)
    out_tri = torch.empty_like(v)
    out_ref = torch.empty_like(v)
    TRI.apply(v, weight, out_tri)
    REF.apply(v, weight, out_ref)
    torch.testing.assert_close(out_tri, out_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("upstream", ["full", "stride0", "C", "THW"])
@pytest.mark.parametrize("spec", [s for s in WEIGHTS if s != ":prod"])
def test_weight_grad(upstream, spec):
    v, weight = random_v("strided"), random_weight(spec)
    if upstream == "full":
        up = random_v("channels_last")
    elif upstream == "stride0":
        up = torch.ones((), dtype=torch.float64, device=DEVICE).expand(V_SHAPE)
    else:
        up = pooled_upstream(upstream)
    assert_lists_close(TRI.weight_grad(v, up, weight), REF.weight_grad(v, up, weight), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_input_grad(layout):
    """Several terms as the executor builds them: a full upstream and pooled ones."""
    terms = [(random_weight("THW,C:prod"), random_v("strided")),
             (random_weight(":prod"), pooled_upstream("C")),
             (random_weight("C:prod"), pooled_upstream("THW")),
             (random_weight("THW,THW:prod"), pooled_upstream("C")),
             (random_weight("C,THW:mean"), pooled_upstream("THW"))]
    out_tri = random_v(layout)
    out_ref = torch.empty_like(out_tri)
    TRI.input_grad(terms, out_tri)
    REF.input_grad(terms, out_ref)
    torch.testing.assert_close(out_tri, out_ref, atol=1e-12, rtol=1e-10)


def test_input_grad_pooled_only():
    terms = [(random_weight("C:prod"), pooled_upstream("THW")), (random_weight(":prod"), pooled_upstream("C"))]
    out_tri = torch.full(V_SHAPE, float("nan"), dtype=torch.float64, device=DEVICE)
    out_ref = torch.empty_like(out_tri)
    TRI.input_grad(terms, out_tri)
    REF.input_grad(terms, out_ref)
    torch.testing.assert_close(out_tri, out_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_full_size_passes_low_precision(dtype):
    """Half inputs, float32 accumulation: the same math as the oracle up to float32 rounding."""
    v, weight = random_v(dtype=dtype), random_weight("C,THW:prod", dtype=torch.float32)
    assert_lists_close(TRI.pool(v, weight, "THW"), REF.pool(v, weight, "THW"), atol=1e-5, rtol=1e-5)
    assert_lists_close(TRI.pool(v, weight, "C"), REF.pool(v, weight, "C"), atol=1e-5, rtol=1e-5)
    up = random_v("channels_last", dtype=dtype)
    assert_lists_close(TRI.weight_grad(v, up, weight), REF.weight_grad(v, up, weight), atol=1e-5, rtol=1e-5)
    out_tri, out_ref = torch.empty_like(v), torch.empty_like(v)
    TRI.apply(v, weight, out_tri)
    REF.apply(v, weight, out_ref)
    # Both round a float32 product once; the products may differ in their last float32 bit.
    torch.testing.assert_close(out_tri, out_ref, atol=1e-5, rtol=torch.finfo(dtype).eps)


BN_MODES = {"none": BN_NONE, "batch": BN_BATCH, "running": BN_RUNNING}


def gate_inputs(axis, dtype=torch.float64):
    shape = gate_shape(V_SHAPE, axis)
    pooled = torch.randn(shape[0], 2, *shape[1:], dtype=dtype, device=DEVICE)
    conv = torch.randn(1, 2, 3, 3, 3, dtype=dtype, device=DEVICE)
    bn = [torch.tensor([1.3], dtype=dtype, device=DEVICE), torch.tensor([0.2], dtype=dtype, device=DEVICE),
          torch.tensor([0.1], dtype=dtype, device=DEVICE), torch.tensor([1.7], dtype=dtype, device=DEVICE)]
    return pooled, conv, bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", list(BN_MODES))
@pytest.mark.parametrize("axis", ["C", "W"])
def test_gate_forward(axis, mode, affine):
    pooled, conv, (gamma, beta, rmean, rvar) = gate_inputs(axis)
    if not affine:
        gamma = beta = None
    args = (pooled, conv, BN_MODES[mode], gamma, beta, rmean, rvar, 1e-5)
    assert_lists_close(TRI.gate_forward(*args), REF.gate_forward(*args), atol=1e-12, rtol=1e-10)


def test_gate_forward_variance_is_robust():
    """A large offset must not cancel the variance (two-pass / Chan merge, not E[z^2] - E[z]^2)."""
    pooled, conv, bn = gate_inputs("C", torch.float32)
    conv = torch.zeros_like(conv)
    conv[0, 0, 1, 1, 1] = 1.0
    pooled[:, 0] = pooled[:, 0] * 0.1 + 1e3  # naive float32 E[z^2] - E[z]^2 is off by ~0.06
    tri = TRI.gate_forward(pooled, conv, BN_BATCH, *bn, 1e-5)
    torch.testing.assert_close(tri.bn_stats[1], pooled[:, 0].double().var(unbiased=False).float(),
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, True), (True, False, True, False),
                                   (False, False, True, True)])
@pytest.mark.parametrize("mode", list(BN_MODES))
@pytest.mark.parametrize("axis", ["C", "T", "H"])
def test_gate_backward(axis, mode, needs):
    pooled, conv, (gamma, beta, rmean, rvar) = gate_inputs(axis)
    fw = REF.gate_forward(pooled, conv, BN_MODES[mode], gamma, beta, rmean, rvar, 1e-5)
    gate = GateValue(axis, fw.z, fw.scale_shift)
    gate_grad = torch.randn_like(fw.z)
    args = (gate_grad, pooled, gate, fw.bn_stats, conv, BN_MODES[mode], gamma, 1e-5, needs)
    tri, ref = TRI.gate_backward(*args), REF.gate_backward(*args)
    for a, b in zip(tri, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
