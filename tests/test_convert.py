"""aia_kernels.convert on our modules and on a hand-written authors'-style network."""
import pytest
import torch
from torch import nn

import aia_kernels
from aia_kernels import reference
from aia_kernels.models import tsn_resnet50


class AuthorsCinST(nn.Module):
    """Written the way the released code writes a unit: its own forward, the spec's children."""

    def __init__(self, n_segment=3):
        super().__init__()
        self.n_segment = n_segment
        for g in "CTHW":
            setattr(self, f"{g}_conv", nn.Conv3d(2, 1, kernel_size=3, padding=1, bias=False))
            setattr(self, f"{g}_bn", nn.BatchNorm3d(1))

    def forward(self, x):
        nt, c, h, w = x.shape
        v = x.view(nt // self.n_segment, self.n_segment, c, h, w)
        m = reference.spatiotemporal_weights(reference.channel_weights(v, self) * v, self)
        return (m * v).view_as(x)


class AuthorsC(nn.Module):
    def __init__(self):
        super().__init__()
        self.C_conv = nn.Conv3d(2, 1, 3, padding=1, bias=False)  # no BN: use_BN=False

    def forward(self, x):
        v = x.view(-1, 3, *x.shape[1:])
        return (reference.channel_weights(v, self) * v).view_as(x)


class AuthorsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.eft1 = AuthorsCinST()
        self.eft2 = AuthorsC()

    def forward(self, x):
        return self.eft2(self.eft1(self.conv(x)))


def test_convert_foreign_modules_keeps_weights_and_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(AuthorsBlock(), nn.ReLU())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    net[0].eft1.T_bn.eval()  # a single BN in eval mode: its flag must survive
    params_before = {n: p for n, p in net.named_parameters()}
    keys_before = list(net.state_dict())
    x = torch.randn(6, 4, 5, 7)
    before = net(x)
    report = aia_kernels.convert(net, backend="reference", num_segments=3)
    assert len(report) == 2 and "0.eft1" in str(report) and "CinST" in str(report)
    assert isinstance(net[0].eft1, aia_kernels.CinST) and isinstance(net[0].eft2, aia_kernels.C)
    assert not net[0].eft2.use_BN and net[0].eft1.num_segments == 3
    assert list(net.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in net.named_parameters())  # the very same parameters
    assert not net[0].eft1.T_bn.training and net[0].eft1.C_bn.training
    torch.testing.assert_close(net(x), before)
    assert net[0].eft1.last_backend == "reference"


def test_convert_outputs_match():
    torch.manual_seed(1)
    a = nn.Sequential(AuthorsBlock()).eval()
    x = torch.randn(6, 4, 5, 7)
    before = a(x)
    aia_kernels.convert(a, backend="auto", num_segments=3)
    a[0].eft1.backend = a[0].eft2.backend = "reference"  # CPU: compare with the reference path
    torch.testing.assert_close(a(x), before)


def test_convert_our_model_sets_backend():
    model = tsn_resnet50(5, num_segments=3, variant="CinST->STinC", backend="reference")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = aia_kernels.convert(model, backend="auto")
    assert len(report) == 16
    assert all(m.backend == "auto" for m in model.modules() if isinstance(m, aia_kernels.AIAModule))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        aia_kernels.convert(model, backend="cuda")


def test_ambiguous_foreign_unit_needs_a_kind():
    class Unit(AuthorsCinST):  # a class name that does not say CinST or STinC
        pass
    net = nn.Sequential(Unit())
    with pytest.raises(ValueError, match="CinST or STinC"):
        aia_kernels.convert(net)
    assert isinstance(aia_kernels.convert(net, unit_kinds={"0": "STinC"}) and net[0], aia_kernels.STinC)


def test_converted_network_runs_fused_and_matches_reference(monkeypatch):
    """A whole TSN on a fused backend (a stand-in one, the plain-torch primitives, so
    this runs without the real kernels) agrees with the reference network."""
    import copy

    from aia_kernels import backends
    from aia_kernels.models import TSN, ResNet
    from aia_kernels.primitives.torch_impl import TorchPrimitives
    monkeypatch.setitem(backends.stand_ins, "native", backends.FusedBackend("native", TorchPrimitives(),
                                                                            lambda device: None))
    torch.manual_seed(0)
    ref = TSN(ResNet((1, 1), (4, 8), variant="CinST->STinC", num_segments=3, backend="reference"), 3, 3, 0.0)
    ref = ref.double()
    fused = copy.deepcopy(ref)
    assert len(aia_kernels.convert(fused, backend="native")) == 2
    x = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)
    out_ref, out_fused = ref(x), fused(x)
    out_ref.sum().backward()
    out_fused.sum().backward()
    torch.testing.assert_close(out_fused, out_ref)
    assert {b.attention.last_backend for b in (fused.base_model.layer1[0], fused.base_model.layer2[0])} == {"native"}
    grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    for (name, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
