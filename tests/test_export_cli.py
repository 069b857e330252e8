"""python -m aia_kernels.export: a TSM network to ONNX from a checkpoint in the authors'
layout, checked by ONNX Runtime. The command runs as a user runs it, on a narrow network
registered as an extra --arch (the whole ResNet structure, one narrow block per stage): the
real TSM-ResNet-50 took over two minutes of a CI run here, most of it in onnxscript's graph
optimizer, whose time grows with the graph, not with anything this package does
differently at full size; benchmarks/onnx_network.py exports the full-size networks. C->ST:
every variant's ONNX export is tested on the module alone in test_export.py."""
from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch

from aia_kernels import export
from aia_kernels.models import TSN, ResNet, tsm_resnet50

from aia_testing import assert_standard_onnx, randomize_network_bn

T = 2


def narrow_tsm(num_classes: int, num_segments: int, variant: str | None, dropout: float = 0.5) -> TSN:
    """tsm_resnet50's structure and state_dict names with one narrow block per stage."""
    base = ResNet(layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), variant=variant, num_segments=num_segments, shift=True,
                  stem_width=8)
    return TSN(base, num_classes=num_classes, num_segments=num_segments, dropout=dropout)


def test_cli_exports_checkpoint_with_dynamic_batch(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(export.ARCHS, "narrow_tsm", narrow_tsm)
    torch.manual_seed(0)
    trained = randomize_network_bn(narrow_tsm(num_classes=3, num_segments=T, variant="C->ST")).eval()
    # The authors' layout: DataParallel's "module." prefix, inside {"state_dict": ..., "epoch": ...}.
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "ckpt.pth.tar")
    out = tmp_path / "model.onnx"
    rc = export.main(["--arch", "narrow_tsm", "--variant", "C->ST", "--num-classes", "3",
                      "--num-segments", str(T), "--resolution", "64", "--checkpoint", str(tmp_path / "ckpt.pth.tar"),
                      "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"({out.stat().st_size} bytes)" in printed and "max abs difference" in printed
    assert_standard_onnx(onnx.load(str(out)))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["clips"]
    x = torch.randn(3, T, 3, 64, 64)  # exported with a batch of 2, checked by the command with 1
    (scores,) = session.run(None, {"clips": x.numpy()})
    with torch.no_grad():
        expected = trained(x)
    torch.testing.assert_close(torch.from_numpy(scores), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_without_checkpoint_random_weights_and_a_warning():
    with pytest.warns(UserWarning, match="random weights"):
        model = export.build_model("tsn_resnet50", "C", num_classes=4, num_segments=T, checkpoint=None)
    assert not model.training and model.new_fc.out_features == 4


def test_checkpoint_without_new_fc_was_trained_without_dropout(tmp_path):
    """A model trained with dropout 0 has its classifier as base_model.fc; that layout loads too."""
    trained = tsm_resnet50(num_classes=4, num_segments=T, variant="C", dropout=0.0)
    torch.save(trained.state_dict(), tmp_path / "ckpt.pt")
    model = export.build_model("tsm_resnet50", "C", num_classes=4, num_segments=T, checkpoint=tmp_path / "ckpt.pt")
    assert model.new_fc is None
    assert torch.equal(model.base_model.fc.weight, trained.base_model.fc.weight)


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        export.main(["--arch", "tsm_resnet50", "--variant", "CinST", "--num-classes", "3", "--out", "x.onnx",
                     "--variant", "STinC>C"])
    assert "invalid choice" in capsys.readouterr().err
