"""Public API, backend selection and clear errors for bad input."""
import warnings

import pytest
import torch

import aia_kernels
from aia_kernels import backends, demo, warnings_once


@pytest.fixture
def no_fused_backends(monkeypatch):
    """An install of aia_kernels in which no fused backend's module can be imported."""
    for name in backends.FUSED_BACKENDS:
        monkeypatch.setitem(backends.BACKEND_MODULES, name, f"aia_kernels.no_such_{name}_module")
    monkeypatch.setattr(warnings_once, "_warned", set())


def test_build_returns_modules_of_the_right_class():
    assert isinstance(aia_kernels.build("C"), aia_kernels.C)
    assert isinstance(aia_kernels.build("STinC"), aia_kernels.STinC)
    combined = aia_kernels.build("CinST->STinC", num_segments=4, use_BN=False, backend="reference")
    assert isinstance(combined.eft1, aia_kernels.CinST) and isinstance(combined.eft2, aia_kernels.STinC)
    assert combined.num_segments == 4 and combined.backend == "reference" and not combined.use_BN
    unit = aia_kernels.ST(num_segments=5, use_BN=True, backend="auto")
    assert unit.num_segments == 5 and unit.variant == "ST"


@pytest.mark.parametrize("shape", [(6, 5, 4), (2, 3, 5, 4, 7), (6,)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match="rank"):
        aia_kernels.build("C", num_segments=3, backend="reference")(torch.randn(shape))


def test_frames_not_divisible_by_segments():
    with pytest.raises(ValueError, match="not divisible by num_segments = 4"):
        aia_kernels.build("C", num_segments=4, backend="reference")(torch.randn(6, 5, 4, 7))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_and_bool_inputs(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        aia_kernels.build("ST", num_segments=3, backend="reference")(torch.zeros(6, 5, 4, 7, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        aia_kernels.build("C", num_segments=3)(None)


@pytest.mark.parametrize("name", ["CinST->C", "c", "", "ST+C", None])
def test_unknown_variant(name):
    with pytest.raises(ValueError, match="unknown AIA variant"):
        aia_kernels.build(name)


@pytest.mark.parametrize("name", ["cuda", "Triton", "", None])
def test_unknown_backend(name):
    with pytest.raises(ValueError, match="unknown AIA backend"):
        aia_kernels.build("C", backend=name)
    module = aia_kernels.build("C")
    with pytest.raises(ValueError, match="unknown AIA backend"):
        module.backend = name


@pytest.mark.parametrize("segments", [0, -1, 2.0, True])
def test_bad_num_segments(segments):
    with pytest.raises(ValueError, match="num_segments"):
        aia_kernels.build("C", num_segments=segments)


def test_mismatched_devices():
    module = aia_kernels.build("C", num_segments=3, backend="reference")
    with pytest.raises(ValueError, match="same device"):
        module(torch.randn(6, 5, 4, 7, device="meta"))


def test_backend_is_settable_and_recorded():
    module = aia_kernels.build("CinST->STinC", num_segments=3, backend="auto")
    module.backend = "reference"
    module(torch.randn(6, 5, 4, 7))
    assert module.backend == "reference" and module.last_backend == "reference"
    assert "backend='reference'" in repr(module)


@pytest.mark.parametrize("name", ["triton", "native"])
def test_backend_whose_import_fails_says_why(no_fused_backends, name):
    module = aia_kernels.build("C", num_segments=3, backend=name)
    with pytest.raises(RuntimeError, match=f"{name}.*ModuleNotFoundError: No module named 'aia_kernels.no_such_{name}"):
        module(torch.randn(6, 5, 4, 7))
    assert not backends.is_available(name, torch.device("cpu"))


def test_auto_falls_back_visibly(no_fused_backends):
    module = aia_kernels.build("C", num_segments=3, backend="auto")
    with pytest.warns(RuntimeWarning, match="reference"):
        module(torch.randn(6, 5, 4, 7))
    assert module.last_backend == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once, not on every call
        module(torch.randn(6, 5, 4, 7))


def test_fused_backend_unusable_on_device(monkeypatch):
    monkeypatch.setitem(backends.stand_ins, "native", backends.FusedBackend(
        "native", object(), lambda device: "no kernels for this device"))
    module = aia_kernels.build("C", num_segments=3, backend="native")
    with pytest.raises(RuntimeError, match="no kernels for this device"):
        module(torch.randn(6, 5, 4, 7))


def test_demo_runs_every_available_backend(capsys):
    rows = demo.main(["--shape", "6", "4", "3", "5", "--segments", "3", "--variants", "C", "CinST->STinC"])
    out = capsys.readouterr().out
    assert "CinST->STinC" in out and "max|dy|" in out
    ran = {row["backend"] for row in rows}
    assert "reference" in ran
    for name in backends.FUSED_BACKENDS:
        assert (name in ran) == backends.is_available(name, torch.device("cpu"))
    for row in rows:
        assert row["out_err"] < 1e-4 and row["grad_err"] < 1e-4, row
