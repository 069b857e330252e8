"""The temporal-order experiment: its data carry order only, and the pipeline runs.

The claim itself (plain TSN at chance, AIA far above) is the full run's, whose
results are committed under aia_kernels/experiments/results/.
"""
import json

import torch

from aia_kernels.experiments import temporal_order as exp


def test_classes_differ_only_in_order():
    clips, labels = exp.make_clips(40, seed=3, distractors=0, noise=0.0)
    assert clips.shape == (40, exp.T, 3, exp.SIZE, exp.SIZE) and labels.sum() == 20
    position = clips.sum(dim=(2, 3)).argmax(-1).float()  # the square's left column per frame
    steps = position[:, 1:] - position[:, :-1]
    assert (steps[labels == 0] == exp.SPEED).all() and (steps[labels == 1] == -exp.SPEED).all()


def test_tiny_run_writes_results(tmp_path):
    torch.manual_seed(0)
    exp.main(["--epochs", "1", "--train-size", "64", "--test-size", "32", "--variants", "plain", "C",
              "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in data["results"]] == ["plain", "C"]
    for r in data["results"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and len(r["history"]["test_acc"]) == 1
        assert r["history"]["train_loss"][0] > 0
    assert data["torch"] == torch.__version__ and "temporal_order" in data["command"]
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert "held-out accuracy" in (tmp_path / "results.md").read_text()


def test_aia_sees_order_plain_tsn_does_not():
    """A small fixed-seed run: AIA (C) learns the direction, plain TSN cannot (its
    held-out accuracy is chance up to sampling noise of 256 clips)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tensors are tiny; also makes the run reproducible
    try:
        results = {r["variant"]: r["test_acc"] for r in exp.run(epochs=8, train_size=768, test_size=256, seed=0,
                                                                variants=("plain", "C"), backend="reference",
                                                                log=lambda s: None)}
    finally:
        torch.set_num_threads(threads)
    assert results["C"] >= 0.75
    assert results["C"] >= results["plain"] + 0.2
    assert results["plain"] <= 0.66


def test_small_slow_pathway_without_aia_is_order_invariant():
    """The slow-pathway form's first two stages (all the small one has) have no temporal conv:
    without AIA it scores a clip and the clip played backwards alike, as a TSN does; AIA on
    its 5-D features breaks that invariance."""
    clips, _ = exp.make_clips(4, seed=5)
    for variant, invariant in (("plain", True), ("C", False)):
        torch.manual_seed(0)
        model = exp.build_model(variant, network="slow", backend="reference").eval()
        with torch.no_grad():
            forward, backward = model(clips), model(clips.flip(1))
        assert torch.allclose(forward, backward, atol=1e-6) == invariant, variant


def test_aia_sees_order_plain_slow_pathway_does_not():
    """A small fixed-seed run of the 3D network with AIA on 5-D features (the slow-pathway
    form, where the plain network sees no order): AIA (C) learns the direction, the plain
    network cannot (chance up to the sampling noise of 256 clips)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {r["variant"]: r["test_acc"] for r in exp.run(epochs=8, train_size=768, test_size=256, seed=0,
                                                                variants=("plain", "C"), backend="auto",
                                                                log=lambda s: None, network="slow")}
    finally:
        torch.set_num_threads(threads)
    assert results["C"] >= 0.75
    assert results["C"] >= results["plain"] + 0.2
    assert results["plain"] <= 0.66
