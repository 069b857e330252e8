"""TSN/TSM ResNets with AIA: the spec's parameter facts, key layout, checkpoints, shift."""
import pytest
import torch

from aia_kernels.models import (
    TSN,
    CheckpointMismatch,
    ResNet,
    load_checkpoint,
    temporal_shift,
    tsm_resnet50,
    tsm_resnet101,
    tsn_resnet50,
)

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
GATES = {"C": "C", "ST": "THW", "CinST": "CTHW", "STinC": "CTHW"}  # spec: the gates each unit owns


def expected_keys(layers, variant, num_classes=174):
    """The authors' checkpoint keys, written from the spec's rules (not from the model):
    {key: shape} for ``module.base_model.*`` and ``module.new_fc.*``."""
    keys = {}

    def bn(prefix, c):
        for k in BN_KEYS:
            keys[f"{prefix}.{k}"] = () if k == "num_batches_tracked" else (c,)

    base = "module.base_model"
    keys[f"{base}.conv1.weight"] = (64, 3, 7, 7)
    bn(f"{base}.bn1", 64)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for i in range(blocks):
            p = f"{base}.layer{stage}.{i}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
            carries = blocks < 23 or i % 2 == 0
            if variant is None or not carries:
                continue
            units = [variant] if variant in GATES else variant.replace("->", " ").replace("+", " ").split()
            names = ["eft"] if len(units) == 1 else ["eft1", "eft2"]
            for name, unit in zip(names, units):
                for g in GATES[unit]:
                    keys[f"{p}.{name}.{g}_conv.weight"] = (1, 2, 3, 3, 3)
                    bn(f"{p}.{name}.{g}_bn", 1)
    keys["module.new_fc.weight"] = (num_classes, 2048)
    keys["module.new_fc.bias"] = (num_classes,)
    return keys


def model_keys(model):
    return {f"module.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant,count", [(None, 23_864_558), ("CinST->STinC", 23_871_726), ("C", 23_865_454)])
def test_tsn_resnet50_parameter_facts(variant, count):
    model = tsn_resnet50(174, variant=variant, backend="reference")
    assert n_params(model) == count
    assert model_keys(model) == expected_keys((3, 4, 6, 3), variant)


@pytest.mark.parametrize("variant", ["ST", "C+ST", "STinC->CinST"])
def test_tsm_resnet50_keys(variant):
    assert model_keys(tsm_resnet50(174, variant=variant, backend="reference")) == expected_keys((3, 4, 6, 3), variant)


def test_resnet101_sparse_stage():
    model = tsm_resnet101(174, variant="CinST->STinC", backend="reference")
    assert model_keys(model) == expected_keys((3, 4, 23, 3), "CinST->STinC")
    carrying = [i for i, b in enumerate(model.base_model.layer3) if b.attention is not None]
    shifted = [i for i, b in enumerate(model.base_model.layer3) if b.shift]
    assert carrying == shifted == list(range(0, 23, 2))
    assert all(b.shift and b.attention is not None for b in model.base_model.layer2)


def test_checkpoint_roundtrip_authors_layout(tmp_path):
    src = tsn_resnet50(10, num_segments=3, variant="CinST->STinC", backend="reference")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in src.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 2)
    ckpt = {"epoch": 7, "arch": "resnet50", "best_prec1": 1.0,
            "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    path = tmp_path / "ckpt.pth.tar"
    torch.save(ckpt, path)
    dst = tsn_resnet50(10, num_segments=3, variant="CinST->STinC", backend="reference")
    report = load_checkpoint(dst, path)
    assert report.ok and len(report.loaded) == len(src.state_dict())
    src.eval(), dst.eval()
    x = torch.randn(2, 3, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))
    # A bare state_dict (no wrapper, no "module.") loads too.
    assert load_checkpoint(tsn_resnet50(10, 3, "CinST->STinC", "reference"), src.state_dict()).ok


def test_checkpoint_mismatch_is_reported():
    model = tsn_resnet50(10, num_segments=3, variant="C", backend="reference")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    del state["module.base_model.layer2.1.eft.C_conv.weight"]
    state["module.base_model.layer2.1.eft.T_conv.weight"] = torch.zeros(1, 2, 3, 3, 3)
    state["module.new_fc.weight"] = torch.zeros(11, 2048)
    with pytest.raises(CheckpointMismatch) as info:
        load_checkpoint(model, {"state_dict": state})
    report, text = info.value.report, str(info.value)
    assert report.missing == ["base_model.layer2.1.eft.C_conv.weight"]
    assert report.unexpected == ["base_model.layer2.1.eft.T_conv.weight"]
    assert report.mismatched == [("new_fc.weight", (11, 2048), (10, 2048))]
    for key in ("layer2.1.eft.C_conv.weight", "layer2.1.eft.T_conv.weight", "new_fc.weight"):
        assert key in text
    # A combined checkpoint does not load into a single-unit network.
    combined = tsn_resnet50(10, 3, "CinST->STinC", "reference").state_dict()
    with pytest.raises(CheckpointMismatch):
        load_checkpoint(model, combined)


def test_imagenet_pretrained(tmp_path):
    imagenet = ResNet((3, 4, 6, 3), num_classes=1000)  # torchvision's layout, fc included
    path = tmp_path / "resnet50.pth"
    torch.save(imagenet.state_dict(), path)
    model = tsm_resnet50(5, num_segments=3, variant="ST", backend="reference", pretrained=str(path))
    torch.testing.assert_close(model.base_model.layer4[2].conv3.weight, imagenet.layer4[2].conv3.weight)
    bad = dict(imagenet.state_dict())
    bad["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(CheckpointMismatch, match="conv1.weight"):
        tsn_resnet50(5, 3, None, pretrained=bad)


def test_tsn_forward_layouts_and_clip_score():
    torch.manual_seed(0)
    model = TSN(ResNet((1, 1), (8, 16), variant="CinST->STinC", num_segments=3, backend="reference"),
                num_classes=4, num_segments=3).eval()
    x = torch.randn(2, 3, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 4)
    torch.testing.assert_close(model(x.flatten(0, 1)), out)
    frames = model.new_fc(model.base_model(x.flatten(0, 1))).view(2, 3, 4)
    torch.testing.assert_close(out, frames.mean(1))
    with pytest.raises(ValueError):
        model(torch.randn(4, 3, 32, 32))


def test_full_resnet50_forward_backward_tiny():
    model = tsm_resnet50(7, num_segments=3, backend="auto")
    x = torch.randn(2, 3, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert model.base_model.layer1[0].attention.eft1.C_conv.weight.grad is not None
    assert model.base_model.layer1[0].attention.last_backend in ("reference", "native", "triton")


def test_plain_tsn_is_blind_to_frame_order():
    model = TSN(ResNet((1, 1), (8, 16), variant=None, num_segments=4), num_classes=3, num_segments=4).eval()
    aia = TSN(ResNet((1, 1), (8, 16), variant="C", num_segments=4, backend="reference"), 3, 4).eval()
    x = torch.randn(2, 4, 3, 16, 16)
    reverse = x.flip(1)
    torch.testing.assert_close(model(reverse), model(x))
    assert not torch.allclose(aia(reverse), aia(x))


def test_temporal_shift():
    x = torch.arange(2 * 3 * 16, dtype=torch.float32).view(6, 16, 1, 1)  # 2 clips x 3 frames, 16 channels
    out = temporal_shift(x, 3).view(2, 3, 16)
    v = x.view(2, 3, 16)
    assert torch.equal(out[:, :2, 0:2], v[:, 1:, 0:2]) and torch.equal(out[:, 2, 0:2], torch.zeros(2, 2))
    assert torch.equal(out[:, 1:, 2:4], v[:, :2, 2:4]) and torch.equal(out[:, 0, 2:4], torch.zeros(2, 2))
    assert torch.equal(out[:, :, 4:], v[:, :, 4:])


def test_tsm_wrapper_keys_are_read():
    """TSM's released code wraps a shifted block's conv1 as ``conv1.net``."""
    model = tsm_resnet50(5, num_segments=3, variant="C", backend="reference")
    state = {k.replace(".conv1.", ".conv1.net.") if ".layer" in k else k: v for k, v in model.state_dict().items()}
    assert any(".conv1.net." in k for k in state)
    assert load_checkpoint(model, {"state_dict": state}).ok


def test_channels_last_inference_matches():
    torch.manual_seed(0)
    model = TSN(ResNet((1, 1), (8, 16), variant="CinST->STinC", num_segments=3, backend="reference", shift=True),
                num_classes=4, num_segments=3).eval()
    x = torch.randn(6, 3, 32, 32)
    expected = model(x)
    for m in model.modules():  # model.to(memory_format=...) refuses the gates' 5D Conv3d weights
        if isinstance(m, torch.nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected,
                               rtol=1e-4, atol=1e-5)


def test_networks_pass_recompute_to_every_aia_module():
    """``recompute`` reaches every AIA module of the 2D and 3D networks (default True)."""
    from aia_kernels import aia_modules
    from aia_kernels.models import i3d_resnet50
    for make in (lambda **kw: tsm_resnet50(10, 4, "CinST->STinC", **kw),
                 lambda **kw: i3d_resnet50(10, "CinST->STinC", **kw)):
        assert {m.recompute for _, m in aia_modules(make())} == {True}
        modules = aia_modules(make(recompute=False))
        assert len(modules) == 16 and {m.recompute for _, m in modules} == {False}
