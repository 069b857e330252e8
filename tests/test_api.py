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


@pytest.mark.parametrize("shape", [(6, 5, 4), (1, 2, 3, 5, 4, 7), (6,)])
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


def test_demo_shows_backends_agreement_and_network_speed(capsys):
    """The demo on its default device (CUDA where there is one): the backends that run there
    are the ones it says run and checks, they agree with the reference, and the network
    comparison runs the backend "auto" picks there."""
    result = demo.main(["--variants", "C", "CinST->STinC", "--resolution", "32", "--rounds", "1"])
    out = capsys.readouterr().out
    device = result["device"]
    assert device == torch.device(demo.default_device())
    checked = {(row["variant"], row["backend"]) for row in result["rows"]}
    for name in backends.FUSED_BACKENDS:
        runs = backends.is_available(name, device)
        assert (result["backends"][name] is None) == runs
        assert (("C", name) in checked) == runs
        if runs and not (name == "triton" and device.type == "cpu"):  # the interpreter checks one variant
            assert ("CinST->STinC", name) in checked
    for row in result["rows"]:
        assert row["out_err"] < 1e-4 and row["grad_err"] < 1e-4 and row["param_err"] < 1e-3, row
    auto = backends.resolve("auto", device)
    if auto == "reference":
        assert result["network"] is None
    else:
        network = result["network"]
        assert network["fused"] == auto and network["score_err"] < 1e-4 and network["speedup"] > 0
        assert set(network["ms"]) == {"reference", auto, "no AIA"} and min(network["ms"].values()) > 0
    assert "TSM-ResNet-50" in out and "max|dx|" in out


def test_demo_runs_on_cuda_where_there_is_one(monkeypatch):
    """On the GPU machine the demo's default device is CUDA (and the test above then checks
    what runs on CUDA, not on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.default_device() == "cuda" and demo.parse_args([]).device == "cuda"
