"""The reference against cases worked out independently of it."""
import itertools
import math

import pytest
import torch

import aia_kernels
from aia_kernels import reference

from aia_testing import randomize_bn

GATE_AXES = "CTHW"
CONV_AXES = {"C": "THW", "T": "CHW", "H": "TCW", "W": "THC"}


def naive_gate(v, axis, conv_weight, gamma, beta, eps=1e-5):
    """One gate with explicit loops: pool [max, mean], 3x3x3 conv with zero padding,
    BN with batch statistics (biased variance), sigmoid; broadcast back to v's shape."""
    dims = dict(zip("NTCHW", v.shape))
    axes = CONV_AXES[axis]
    sizes = [dims[a] for a in axes]
    n_count, length = dims["N"], dims[axis]

    def element(n, coords, pos):
        index = dict(zip(axes, coords), **{axis: pos})
        return v[n, index["T"], index["C"], index["H"], index["W"]].item()

    pooled = {}
    for n in range(n_count):
        for coords in itertools.product(*map(range, sizes)):
            values = [element(n, coords, pos) for pos in range(length)]
            pooled[(n, 0, *coords)] = max(values)            # channel 0: max
            pooled[(n, 1, *coords)] = sum(values) / length   # channel 1: mean
    z = {}
    for n in range(n_count):
        for coords in itertools.product(*map(range, sizes)):
            total = 0.0
            for ch in range(2):
                for offs in itertools.product(range(3), repeat=3):
                    src = [c + o - 1 for c, o in zip(coords, offs)]
                    if all(0 <= s < size for s, size in zip(src, sizes)):
                        total += conv_weight[0, ch, offs[0], offs[1], offs[2]].item() * pooled[(n, ch, *src)]
            z[(n, *coords)] = total
    mean = sum(z.values()) / len(z)
    var = sum((val - mean) ** 2 for val in z.values()) / len(z)
    out = torch.empty_like(v)
    for n, t, c, h, w in itertools.product(*map(range, v.shape)):
        coords = tuple(dict(T=t, C=c, H=h, W=w)[a] for a in axes)
        y = (z[(n, *coords)] - mean) / math.sqrt(var + eps) * gamma + beta
        out[n, t, c, h, w] = 1 / (1 + math.exp(-y))
    return out


@pytest.mark.parametrize("axis", GATE_AXES)
def test_gate_matches_naive_loops(axis):
    unit = aia_kernels.CinST(num_segments=2, backend="reference").double()
    randomize_bn(unit)
    v = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)  # N T C H W, all sizes distinct
    got = reference.axis_weights(v, axis, unit).expand_as(v)
    bn = getattr(unit, f"{axis}_bn")
    want = naive_gate(v, axis, getattr(unit, f"{axis}_conv").weight, bn.weight.item(), bn.bias.item())
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("axis,shape", [("C", (2, 2, 2, 4, 5)), ("T", (2, 2, 3, 4, 5)), ("H", (2, 2, 2, 3, 5)),
                                        ("W", (2, 2, 2, 4, 3))])
def test_pool_shapes_and_order(axis, shape):
    v = torch.randn(2, 2, 3, 4, 5)
    pooled = reference.pool(v, axis)
    assert pooled.shape == shape
    dim = "NTCHW".index(axis)
    reduced_max = v.amax(dim=dim)
    # Channel 0 is the max, channel 1 the mean (the paper says Concat(Avg, Max); weights expect [max, mean]).
    assert torch.equal(torch.sort(pooled[:, 0].flatten()).values, torch.sort(reduced_max.flatten()).values)
    torch.testing.assert_close(torch.sort(pooled[:, 1].flatten()).values,
                               torch.sort(v.mean(dim=dim).flatten()).values)


def test_w_gate_reads_h_before_c():
    """Spec: the W gate's conv layout is (N, 2, T, H, C)."""
    v = torch.randn(1, 2, 3, 4, 5)
    assert torch.equal(reference.pool(v, "W")[0, 0], v.amax(dim=4)[0].permute(0, 2, 1))


# --- an independent implementation in the style of the authors' code --------------------------

def _authors_gate(x5, axis, unit):
    conv, bn = getattr(unit, f"{axis}_conv"), getattr(unit, f"{axis}_bn", None)
    # Move the pooled axis next to N and the conv axes after it, as the spec's table says.
    order = {"C": (0, 2, 1, 3, 4), "T": (0, 1, 2, 3, 4), "H": (0, 3, 1, 2, 4), "W": (0, 4, 1, 3, 2)}[axis]
    p = x5.permute(*order)
    p = torch.cat([torch.max(p, 1, keepdim=True)[0], torch.mean(p, 1, keepdim=True)], 1)
    y = conv(p)
    if bn is not None:
        y = bn(y)
    back = [0] * 5
    for i, o in enumerate(order):
        back[o] = i
    return torch.sigmoid(y).permute(*back)


def _authors_unit(kind, unit, x5):
    def yc(u):
        return _authors_gate(u, "C", unit)

    def yst(u):
        return (_authors_gate(u, "T", unit) + _authors_gate(u, "H", unit) + _authors_gate(u, "W", unit)) / 3

    weights = {"C": lambda: yc(x5), "ST": lambda: yst(x5), "CinST": lambda: yst(yc(x5) * x5),
               "STinC": lambda: yc(yst(x5) * x5)}[kind]()
    return weights * x5


def _authors_forward(module, x):
    nt, c, h, w = x.shape
    x5 = x.view(nt // module.num_segments, module.num_segments, c, h, w)
    units = module.units()
    if module.combine is None:
        out = _authors_unit(units[0][0], units[0][1], x5)
    elif module.combine == "->":
        out = _authors_unit(units[1][0], units[1][1], _authors_unit(units[0][0], units[0][1], x5))
    else:
        out = 0.5 * _authors_unit(units[0][0], units[0][1], x5) + 0.5 * _authors_unit(units[1][0], units[1][1], x5)
    return out.reshape(x.shape)


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_bn", [True, False], ids=["bn", "nobn"])
def test_reference_equals_independent_float64(variant, train, use_bn):
    """Outputs, input and parameter gradients, running statistics: bit for bit in float64."""
    import copy
    module = aia_kernels.build(variant, num_segments=3, use_BN=use_bn, backend="reference").double()
    randomize_bn(module)
    module.train(train)
    other = copy.deepcopy(module)
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = module(xa), _authors_forward(other, xb)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb)
    assert torch.equal(xa.grad, xb.grad)
    for (name, pa), (_, pb) in zip(module.named_parameters(), other.named_parameters()):
        assert torch.equal(pa.grad, pb.grad), name
    for (name, ba), (_, bb) in zip(module.named_buffers(), other.named_buffers()):
        assert torch.equal(ba, bb), name


# (eft1, eft2) of each combined variant: name order, except CinST+STinC, whose eft1 is the
# STinC unit as in the authors' STinCplusCinST network (docs/semantics.md).
EFT_UNITS = {"C->ST": ("C", "ST"), "CinST->STinC": ("CinST", "STinC"), "C+ST": ("C", "ST"),
             "CinST+STinC": ("STinC", "CinST")}


@pytest.mark.parametrize("variant", EFT_UNITS)
def test_combined_variants_compose_eft1_and_eft2(variant):
    module = aia_kernels.build(variant, num_segments=3, backend="reference").double().eval()
    randomize_bn(module)
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    a, b = module.eft1, module.eft2
    want = b(a(x)) if "->" in variant else 0.5 * a(x) + 0.5 * b(x)
    torch.testing.assert_close(module(x), want, atol=1e-14, rtol=0)
    assert (type(a).__name__, type(b).__name__) == EFT_UNITS[variant]


def test_each_bn_follows_its_own_training_flag():
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="reference").double().train()
    randomize_bn(module)
    module.eft2.T_bn.eval()
    before = {n: b.clone() for n, b in module.named_buffers()}
    module(torch.randn(6, 5, 4, 7, dtype=torch.float64))
    for name, buf in module.named_buffers():
        changed = not torch.equal(buf, before[name])
        assert changed == (not name.startswith("eft2.T_bn.")), name
    # In eval mode, the BN normalises with its running statistics: moving them moves the output.
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    y0 = module(x)
    with torch.no_grad():
        module.eft2.T_bn.running_mean += 1.0
    assert not torch.allclose(module(x), y0)


def test_initialisation_follows_released_code():
    torch.manual_seed(1)
    samples = {key: [] for key in ["kaiming", "xavier", "default"]}
    for _ in range(60):
        cinst, stinc, c = aia_kernels.CinST(), aia_kernels.STinC(), aia_kernels.C()
        samples["kaiming"] += [c.C_conv.weight, cinst.C_conv.weight, stinc.T_conv.weight]
        samples["xavier"] += [stinc.C_conv.weight, cinst.T_conv.weight, cinst.H_conv.weight]
        samples["default"] += [cinst.W_conv.weight]
        for bn in (cinst.C_bn, stinc.W_bn):
            assert torch.equal(bn.weight, torch.ones(1)) and torch.equal(bn.bias, torch.zeros(1))
    std = {k: torch.cat([w.detach().flatten() for w in v]).std().item() for k, v in samples.items()}
    assert abs(std["kaiming"] - math.sqrt(2 / 27)) < 0.02   # fan_out = 1 * 27, relu gain
    assert abs(std["xavier"] - math.sqrt(2 / (54 + 27))) < 0.012
    default = torch.cat([w.detach().flatten() for w in samples["default"]])
    assert default.abs().max() <= 1 / math.sqrt(54)          # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
    assert abs(std["default"] - 1 / math.sqrt(54) / math.sqrt(3)) < 0.01


def _expected_keys(variant, use_bn):
    """state_dict keys from the spec's rules, written independently of the modules."""
    gates = {"C": "C", "ST": "THW", "CinST": "CTHW", "STinC": "CTHW"}
    bn_keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

    def unit_keys(kind, prefix):
        keys = []
        for g in gates[kind]:
            keys.append(f"{prefix}{g}_conv.weight")
            if use_bn:
                keys += [f"{prefix}{g}_bn.{k}" for k in bn_keys]
        return keys

    for sep in ("->", "+"):
        if sep in variant:
            a, b = variant.split(sep)
            return unit_keys(a, "eft1.") + unit_keys(b, "eft2.")
    return unit_keys(variant, "")


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
@pytest.mark.parametrize("use_bn", [True, False])
def test_state_dict_keys_and_strict_load(variant, use_bn):
    module = aia_kernels.build(variant, use_BN=use_bn)
    assert list(module.state_dict()) == _expected_keys(variant, use_bn)
    checkpoint = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v + 3
                  for k, v in module.state_dict().items()}
    fresh = aia_kernels.build(variant, use_BN=use_bn)
    fresh.load_state_dict(checkpoint, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, checkpoint[k])


def test_parameter_count_per_block():
    # Spec facts: CinST->STinC adds 448 parameters per block, C adds 56.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(aia_kernels.build("CinST->STinC")) == 448
    assert count(aia_kernels.build("C")) == 56


def test_variant_list_in_spec_order():
    assert aia_kernels.VARIANTS == ("C", "ST", "CinST", "STinC", "C->ST", "ST->C", "C+ST",
                                    "CinST->STinC", "STinC->CinST", "CinST+STinC")


def test_output_keeps_shape_dtype_and_memory_format():
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="reference")
    x = torch.randn(6, 5, 4, 7).to(memory_format=torch.channels_last)
    y = module(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, module(x.contiguous()))
    assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_input_is_not_modified():
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="reference")
    x = torch.randn(6, 5, 4, 7)
    before = x.clone()
    module(x)
    assert torch.equal(x, before)
