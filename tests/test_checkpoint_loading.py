"""Loading a checkpoint never half-applies: on a truncated file, a missing, unexpected or
mis-shaped key, a value that is no tensor or cannot be copied, or a load hook that raises,
the model keeps every parameter and buffer (the same objects, the same values) and the error
says what was wrong. Both for ``load_checkpoint`` and for plain ``load_state_dict`` of this
package's modules and networks."""
import warnings
from collections import OrderedDict

import pytest
import torch

import aia_kernels
from aia_kernels.models import TSN, CheckpointMismatch, CheckpointReadError, ResNet, ResNet3d, load_checkpoint

T = 3


def small_tsn() -> TSN:
    return TSN(ResNet((1, 1), (4, 8), variant="CinST->STinC", num_segments=T, backend="reference"), 5, T, 0.5)


def other_values(state: dict) -> dict:
    """The same keys and shapes, every value different."""
    return {k: (v + 1 if v.is_floating_point() else v + 3) for k, v in state.items()}


class Unchanged:
    """Records a module's parameter and buffer objects and values; ``check()`` asserts both stayed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.objects = dict(module.state_dict(keep_vars=True))
        self.values = {k: v.detach().clone() for k, v in self.objects.items()}

    def check(self) -> None:
        now = self.module.state_dict(keep_vars=True)
        assert list(now) == list(self.objects)
        for key, tensor in now.items():
            assert tensor is self.objects[key], f"{key} was replaced"
            torch.testing.assert_close(tensor.detach(), self.values[key], rtol=0, atol=0, msg=f"{key} changed")


def test_a_good_checkpoint_loads_everything(tmp_path):
    model = small_tsn()
    state = other_values(model.state_dict())
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "good.pth.tar")
    report = load_checkpoint(model, tmp_path / "good.pth.tar")
    assert report.ok
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_file(tmp_path, keep):
    model = small_tsn()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": other_values(model.state_dict())}, path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    unchanged = Unchanged(model)
    with pytest.raises(CheckpointReadError, match="truncated, corrupt or not a torch checkpoint") as info:
        load_checkpoint(model, path)
    assert str(path) in str(info.value)
    unchanged.check()


def test_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(small_tsn(), tmp_path / "nowhere.pth")


def mutate(state: dict, how: str) -> tuple[dict, str]:
    """A checkpoint with every value changed and one defect; the text the error must carry."""
    state = other_values(state)
    key = next(k for k in state if k.endswith("eft1.C_conv.weight"))
    if how == "missing":
        del state[key]
        return state, f"missing from the checkpoint (1):\n    {key}"
    if how == "unexpected":
        state["base_model.extra.weight"] = torch.zeros(1)
        return state, "unexpected in the checkpoint (1):\n    base_model.extra.weight"
    if how == "shape":
        state[key] = torch.zeros(1, 2, 3, 3, 1)
        return state, f"{key}: (1, 2, 3, 3, 1) vs (1, 2, 3, 3, 3)"
    if how == "not a tensor":
        state[key] = [1.0, 2.0]
        return state, f"{key}: not a tensor (list)"
    if how == "dtype":
        state[key] = torch.zeros(state[key].shape, dtype=torch.complex64)
        return state, f"{key}: dtype torch.complex64 for a torch.float32 tensor"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape", "not a tensor", "dtype"])
def test_load_checkpoint_mismatch_changes_nothing(how):
    model = small_tsn()
    state, expected = mutate(model.state_dict(), how)
    unchanged = Unchanged(model)
    with pytest.raises(CheckpointMismatch, match="the model is unchanged") as info:
        load_checkpoint(model, state)
    assert expected in str(info.value)
    unchanged.check()


def test_value_that_cannot_be_copied_changes_nothing():
    model = small_tsn()
    state = other_values(model.state_dict())
    key = "base_model.fc.weight" if "base_model.fc.weight" in state else "new_fc.weight"
    state[key] = torch.empty(state[key].shape, device="meta")  # the right shape, no data to copy
    unchanged = Unchanged(model)
    with pytest.raises(RuntimeError, match=key):
        load_checkpoint(model, state)
    unchanged.check()


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape"])
@pytest.mark.parametrize("assign", [False, True])
def test_plain_load_state_dict_of_a_network_changes_nothing(how, assign):
    model = small_tsn()
    state, _ = mutate(model.state_dict(), how)
    unchanged = Unchanged(model)
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
        model.load_state_dict(state, assign=assign)
    unchanged.check()
    model.base_model.load_state_dict({k[len("base_model."):]: v for k, v in model.state_dict().items()
                                      if k.startswith("base_model.")})  # the ResNet alone loads its own


@pytest.mark.parametrize("how", ["missing", "shape"])
def test_plain_load_state_dict_of_a_3d_network_changes_nothing(how):
    model = ResNet3d((1, 1), (4, 8), num_classes=5, variant="CinST+STinC", backend="reference")
    state, _ = mutate(model.state_dict(), how)
    unchanged = Unchanged(model)
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
        model.load_state_dict(state)
    unchanged.check()


@pytest.mark.parametrize("variant", ["CinST", "CinST+STinC"])
def test_plain_load_state_dict_of_a_module_changes_nothing(variant):
    module = aia_kernels.build(variant, num_segments=T)
    state = other_values(module.state_dict())
    key = next(k for k in state if k.endswith("_bn.weight"))
    state[key] = torch.zeros(2)
    unchanged = Unchanged(module)
    with pytest.raises(RuntimeError, match=f"size mismatch for {key}"):
        module.load_state_dict(state)
    unchanged.check()
    del state[key]
    with pytest.raises(RuntimeError, match=f"Missing key\\(s\\) in state_dict: \"{key}\""):
        module.load_state_dict(state)
    unchanged.check()


def test_failure_after_the_old_unit_order_swap_changes_nothing():
    """A standalone CinST+STinC saved by aia_kernels 0.1 has its units swapped by a load
    post-hook; an error found after that hook ran still leaves the module as it was."""
    module = aia_kernels.build("CinST+STinC", num_segments=T)
    state = OrderedDict(other_values(module.state_dict()))
    state["unexpected.key"] = torch.zeros(1)
    state._metadata = {"": {"version": 1}}
    unchanged = Unchanged(module)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="Unexpected key\\(s\\)"):
        warnings.simplefilter("always")
        module.load_state_dict(state)
    assert any("0.1" in str(w.message) for w in caught)  # the swapping hook ran
    unchanged.check()


def test_a_raising_load_hook_changes_nothing():
    module = aia_kernels.build("C+ST", num_segments=T)

    def fail(*_):
        raise ValueError("a hook that fails")
    module.eft2.register_load_state_dict_post_hook(fail)
    unchanged = Unchanged(module)
    with pytest.raises(ValueError, match="a hook that fails"):
        module.load_state_dict(other_values(module.state_dict()))
    unchanged.check()
