"""The 3D ResNets (aia_kernels.models.i3d): the architecture's choices, names and
parameter counts, AIA on 5-D features in both memory formats, fused vs reference."""
import copy

import pytest
import torch

from aia_kernels.models import ResNet3d, i3d_resnet50
from aia_kernels.models.report import format_report, report


@pytest.mark.parametrize("arch,variant,params", [
    ("i3d", None, 28_043_472), ("i3d", "CinST->STinC", 28_050_640), ("i3d", "C", 28_044_368),
    ("slow", None, 32_454_096), ("slow", "CinST->STinC", 32_461_264)])
def test_parameter_counts(arch, variant, params):
    """400 classes; AIA adds 448 parameters per Bottleneck for CinST->STinC (16 blocks), 56 for C."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        model = i3d_resnet50(400, variant, arch=arch)
    assert sum(p.numel() for p in model.parameters()) == params


def test_names_and_placement_as_the_2d_networks():
    with torch.device("meta"):
        model, unit = i3d_resnet50(10, "CinST->STinC"), i3d_resnet50(10, "C")
    keys = model.state_dict().keys()
    assert "layer1.0.eft1.C_conv.weight" in keys and "layer4.2.eft2.T_bn.running_var" in keys
    assert len(model.aia_modules()) == 16
    assert "layer3.5.eft.C_conv.weight" in unit.state_dict()
    for aia in model.aia_modules():
        assert aia.num_segments is None and aia.layout == "NCTHW"  # 5-D only, T from each tensor


@pytest.mark.parametrize("arch,kernels,stem", [
    ("i3d", [[3, 3, 3], [3, 1, 3, 1], [3, 1, 3, 1, 3, 1], [1, 3, 1]], 5),
    ("slow", [[1, 1, 1], [1, 1, 1, 1], [3, 3, 3, 3, 3, 3], [3, 3, 3]], 1)])
def test_temporal_kernels(arch, kernels, stem):
    """Inflated first convs as documented; second convs 1x3x3; no stage strides in time."""
    with torch.device("meta"):
        model = i3d_resnet50(10, arch=arch)
    assert model.conv1.kernel_size == (stem, 7, 7) and model.conv1.stride == (1, 2, 2)
    for i, expected in enumerate(kernels):
        layer = getattr(model, f"layer{i + 1}")
        assert [b.conv1.kernel_size[0] for b in layer] == expected
        assert all(b.conv2.kernel_size == (1, 3, 3) and b.conv2.stride[0] == 1 for b in layer)


def test_t_changes_through_the_network_and_aia_follows():
    """The I3D form halves T after layer1: AIA sees T = 8 there and T = 4 after."""
    model = ResNet3d((1, 1), (4, 8), num_classes=3, variant="C", arch="i3d", backend="reference", stem_width=8)
    seen = []
    for aia in model.aia_modules():
        aia.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[2]))
    assert model(torch.randn(2, 3, 8, 32, 32)).shape == (2, 3)
    assert seen == [8, 4]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_native_matches_reference_in_a_training_step(memory_format):
    """A small ResNet3d with AIA on the native kernels vs the same on the reference: logits,
    every parameter's gradient and the BN buffers."""
    pytest.importorskip("aia_kernels.native").load()
    torch.manual_seed(0)
    ref = ResNet3d((1, 1), (4, 8), num_classes=3, variant="CinST->STinC", backend="reference",
                   stem_width=8, dropout=0.0).double().to(memory_format=memory_format)
    fused = copy.deepcopy(ref)
    for aia in fused.aia_modules():
        aia.backend = "native"
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64).contiguous(memory_format=memory_format)
    outs = []
    for model in (ref, fused):
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    assert {m.last_backend for m in fused.aia_modules()} == {"native"}
    torch.testing.assert_close(outs[1], outs[0], atol=1e-10, rtol=1e-8)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-7, msg=name)
    for (name, b), c in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, atol=1e-10, rtol=1e-8, msg=name)


def test_clips_must_be_5d_rgb():
    model = ResNet3d((1,), (4,), num_classes=3, stem_width=8)
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\), got \(2, 8, 3, 32, 32\)"):
        model(torch.randn(2, 8, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown 3D ResNet arch"):
        ResNet3d(arch="x3d")


def test_report_counts_the_3d_networks():
    rows = report(8, 224, 400, "i3d", variants=(None, "CinST->STinC"))
    assert [r["params"] for r in rows] == [28_043_472, 28_050_640]
    # Every Conv3d of the network counted as a network conv, the gates' as AIA's.
    assert round(rows[0]["conv/fc MACs"] / 1e9, 2) == 28.41 and rows[0]["AIA conv3d MACs"] == 0
    assert round(rows[1]["AIA conv3d MACs"] / 1e9, 3) == 0.218
    text = format_report(rows, 8, 224, 400, "i3d")
    assert text.startswith("I3D-ResNet-50") and "28,050,640" in text
