"""Which unit a combined variant's ``eft1``/``eft2`` hold, in modules, networks and checkpoints.

The authors' only ``CinST+STinC`` network file is ``STinCplusCinST``: its ``eft1`` is the STinC
unit. Both units own the same gate names, so a wrong order loads strictly and computes wrong
outputs; these tests build the authors' units from the contract's rules
(benchmarks/authors_style.py), independently of aia_kernels' module and reference code.
"""
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import aia_kernels
from aia_kernels import backends, variants
from aia_kernels.models import TSN, ResNet, load_checkpoint, tsn_resnet50
from aia_kernels.plan import build_plan
from benchmarks import authors_style

T = 3
V0_1 = Path(__file__).parent / "data" / "v0_1_cinst_plus_stinc.pt"


def authors_stinc_plus_cinst() -> nn.Module:
    """The authors' parallel pair as their STinCplusCinST network holds it: eft1 = STinC,
    eft2 = CinST, the mean of both (benchmarks/authors_style.py: written from the contract,
    not from aia_kernels' modules or reference)."""
    return authors_style.AuthorsCombined("+", "STinC", "CinST", num_segments=T)


def randomized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.3)
    return module


def fused_backends_here():
    return [name for name in backends.FUSED_BACKENDS if backends.is_available(name, torch.device("cpu"))]


def test_units_are_registered_in_the_authors_order():
    assert variants.parse_variant("CinST+STinC") == ("+", ("STinC", "CinST"))
    combined = aia_kernels.build("CinST+STinC", num_segments=T)
    assert isinstance(combined.eft1, aia_kernels.STinC) and isinstance(combined.eft2, aia_kernels.CinST)
    assert [kind for kind, _ in combined.units()] == ["STinC", "CinST"]
    # The plan numbers gates in state_dict order: STinC's stages (T/H/W, then C) come first.
    assert [stage.axes for stage in build_plan("CinST+STinC").stages] == ["THW", "C", "C", "THW"]
    block = tsn_resnet50(10, T, "CinST+STinC", "reference").base_model.layer1[0]
    assert isinstance(block.eft1, aia_kernels.STinC) and isinstance(block.eft2, aia_kernels.CinST)
    for variant, (first, second) in [("CinST->STinC", ("CinST", "STinC")), ("C+ST", ("C", "ST"))]:
        module = aia_kernels.build(variant, num_segments=T)
        assert (type(module.eft1).__name__, type(module.eft2).__name__) == (first, second)


@pytest.mark.parametrize("train", [False, True])
def test_authors_checkpoint_gives_the_authors_outputs(train, monkeypatch):
    torch.manual_seed(0)
    authors = randomized(authors_stinc_plus_cinst().double()).train(train)
    # One block's AIA weights taken out of their network checkpoint: a plain dict, no metadata.
    state = dict(authors.state_dict())
    x = torch.randn(2 * T, 5, 4, 7, dtype=torch.float64)
    with torch.no_grad():
        want = authors(x)
    for backend in ["reference"] + fused_backends_here():
        ours = aia_kernels.build("CinST+STinC", num_segments=T, backend=backend).double().train(train)
        ours.load_state_dict(state)  # strict
        with torch.no_grad():
            got = ours(x)
        assert ours.last_backend == backend
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=backend)
    # The mapping of aia_kernels 0.1 (eft1 = CinST) loads the same keys strictly, and is wrong.
    monkeypatch.setattr(variants, "REGISTRATION_ORDER", {})
    old = aia_kernels.build("CinST+STinC", num_segments=T, backend="reference").double().train(train)
    assert isinstance(old.eft1, aia_kernels.CinST)
    old.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(old(x), want, rtol=1e-3, atol=1e-3)


def test_networks_name_units_as_the_authors_do():
    model = tsn_resnet50(10, T, "CinST->STinC", "reference")
    names = [n for n, _ in model.named_parameters()]
    assert "base_model.layer1.0.eft1.C_conv.weight" in names and "base_model.layer4.2.eft2.W_bn.bias" in names
    assert not any(".aia." in n for n in names + [n for n, _ in model.named_modules()])
    assert names == [k for k in model.state_dict() if k in dict(model.named_parameters())]
    unit = model.base_model.layer1[0].eft2
    assert model.get_parameter("base_model.layer1.0.eft2.T_conv.weight") is unit.T_conv.weight
    assert isinstance(model.get_submodule("base_model.layer2.1.eft1"), aia_kernels.CinST)
    # The block runs both units as one fused op, over the registered units themselves.
    block = model.base_model.layer1[0]
    assert block.attention.eft1 is block.eft1 and block.attention.eft2 is block.eft2
    assert [m for m in aia_kernels.aia_modules(model)][0] == ("base_model.layer1.0", block.attention)
    assert len(aia_kernels.aia_modules(model)) == 16


def test_unit_backends_of_a_combined_module():
    block = tsn_resnet50(10, T, "CinST+STinC", "reference").base_model.layer1[0]
    block.attention.backend = "auto"
    assert block.eft1.backend == block.eft2.backend == "auto"
    block.eft1.backend = "reference"
    with pytest.raises(ValueError, match="eft1 asks for backend 'reference' and eft2 for 'auto'"):
        block(torch.randn(2 * T, 64, 8, 8))
    block.eft2.backend = "reference"
    block(torch.randn(2 * T, 64, 8, 8))
    assert block.attention.last_backend == block.eft1.last_backend == block.eft2.last_backend == "reference"


def _authors_file(state: OrderedDict) -> dict:
    """``state`` as the authors' training script saves it: DataParallel's ``module.`` prefix
    on every key and every module name of the metadata, and the wrapper's own entry."""
    wrapped = OrderedDict((f"module.{k}", v) for k, v in state.items())
    wrapped._metadata = OrderedDict([("", {"version": 1})] + [(f"module.{k}".rstrip("."), m)
                                                                for k, m in state._metadata.items()])
    return {"epoch": 3, "arch": "resnet50", "state_dict": wrapped}


def small_tsn():
    return TSN(ResNet((1, 1), (8, 16), variant="CinST+STinC", num_segments=T, backend="reference"), 4, T, 0.0)


def test_authors_network_checkpoint_loads_unchanged(tmp_path):
    """Their blocks are version 1 with eft1/eft2 entries of their own: nothing is swapped."""
    src = randomized(small_tsn())
    state = src.state_dict()
    for name, meta in state._metadata.items():
        meta["version"] = 1  # every module of theirs has torch's default version
    path = tmp_path / "theirs.pth.tar"
    torch.save(_authors_file(state), path)
    dst = small_tsn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(dst, path).ok
    for (name, a), b in zip(dst.state_dict().items(), state.values()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def v0_1():
    """Checkpoints written by aia_kernels 0.1 itself (tests/data/make_v0_1_checkpoints.py)."""
    data = torch.load(V0_1, weights_only=True)
    assert data["aia_kernels"] == "0.1.0" and data["eft1_kind"] == "CinST"
    return data


def test_v0_1_module_checkpoint_is_converted_with_a_warning(v0_1):
    for backend in ["reference"] + fused_backends_here():
        module = aia_kernels.build("CinST+STinC", num_segments=T, backend=backend).double().eval()
        with pytest.warns(RuntimeWarning, match="saved by aia_kernels 0.1, whose eft1 held the CinST unit"):
            module.load_state_dict(v0_1["unit_state_dict"])
        with torch.no_grad():
            torch.testing.assert_close(module(v0_1["unit_input"]), v0_1["unit_output"], rtol=1e-9, atol=1e-10,
                                       msg=backend)
    # Its keys stripped of their metadata read in the current layout: the outputs then differ.
    plain = aia_kernels.build("CinST+STinC", num_segments=T, backend="reference").double().eval()
    plain.load_state_dict(dict(v0_1["unit_state_dict"]))
    with torch.no_grad():
        assert not torch.allclose(plain(v0_1["unit_input"]), v0_1["unit_output"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("how", ["load_state_dict", "load_checkpoint", "authors_file"])
def test_v0_1_network_checkpoint_is_converted_with_a_warning(v0_1, how, tmp_path):
    model = small_tsn().double().eval()
    state = v0_1["net_state_dict"]
    with pytest.warns(RuntimeWarning, match="saved by aia_kernels 0.1, whose eft1 held the CinST unit"):
        if how == "load_state_dict":
            model.load_state_dict(state)
        elif how == "load_checkpoint":
            assert load_checkpoint(model, state).ok
        else:
            torch.save(_authors_file(state), tmp_path / "ckpt.pth.tar")
            assert load_checkpoint(model, tmp_path / "ckpt.pth.tar").ok
    with torch.no_grad():
        torch.testing.assert_close(model(v0_1["net_input"]), v0_1["net_output"], rtol=1e-9, atol=1e-10)


def test_current_checkpoints_round_trip_without_a_warning(tmp_path):
    src = randomized(small_tsn()).eval()
    torch.save(src.state_dict(), tmp_path / "net.pt")
    module = randomized(aia_kernels.build("CinST+STinC", num_segments=T)).eval()
    torch.save(module.state_dict(), tmp_path / "module.pt")
    assert src.state_dict()._metadata["base_model.layer1.0"]["version"] == 2
    assert module.state_dict()._metadata[""]["version"] == 2
    net, unit = small_tsn().eval(), aia_kernels.build("CinST+STinC", num_segments=T).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.load_state_dict(torch.load(tmp_path / "net.pt"))
        assert load_checkpoint(small_tsn(), tmp_path / "net.pt").ok
        unit.load_state_dict(torch.load(tmp_path / "module.pt"))
    x = torch.randn(2, T, 3, 16, 16)
    torch.testing.assert_close(net(x), src(x))
    y = torch.randn(2 * T, 5, 4, 7)
    torch.testing.assert_close(unit(y), module(y))
