"""The native CPU kernels' thread policy (aia_kernels/native/thread_policy.py): it times the
plan ops on torch's threads and on the calling thread and runs the faster, without changing
any result."""
import pytest
import torch

from aia_kernels.native import thread_policy
from aia_kernels.native.thread_policy import EXPLORE_EVERY, SERIAL, TORCH, WINDOW, ThreadPolicy

from aia_testing import assert_equal_results, make_pair, run


class FakeMachine:
    """A clock where an op takes ``cost[arm]`` seconds, and the serial switch it records."""

    def __init__(self, torch_s: float, serial_s: float, threads: int = 2):
        self.cost = {False: torch_s, True: serial_s}
        self.serial, self.now, self.threads, self.switches = False, 0.0, threads, []

    def set_serial(self, serial: bool) -> None:
        self.serial = serial
        self.switches.append(serial)

    def op(self):
        self.now += self.cost[self.serial]
        return "serial" if self.serial else "torch"

    def policy(self) -> ThreadPolicy:
        return ThreadPolicy(self.set_serial, clock=lambda: self.now, threads=lambda: self.threads)


@pytest.mark.parametrize("torch_s,serial_s,best", [(1.0, 3.0, TORCH), (3.0, 1.0, SERIAL)])
def test_runs_the_faster_setting_and_measures_the_other_now_and_then(torch_s, serial_s, best):
    machine = FakeMachine(torch_s, serial_s)
    policy = machine.policy()
    ran = [policy.run(("k",), machine.op) for _ in range(2 + 2 * WINDOW + 3 * EXPLORE_EVERY)]
    assert ran[:2] == ["torch", "serial"]  # one warm-up call each, not timed
    assert policy.decisions() == {("k",): best}
    settled = ran[2 + 2 * WINDOW:]
    chosen = "serial" if best == SERIAL else "torch"
    others = [i for i, r in enumerate(settled) if r != chosen]
    assert 2 <= len(others) <= 4, others  # the other setting about once every EXPLORE_EVERY calls
    assert not machine.serial  # the switch is off again after every call


def test_follows_a_change_of_load():
    machine = FakeMachine(1.0, 2.0)
    policy = machine.policy()
    for _ in range(2 + 2 * WINDOW + EXPLORE_EVERY):
        policy.run(("k",), machine.op)
    assert policy.decisions()[("k",)] == TORCH
    machine.cost[False] = 5.0  # another process now keeps a core busy: threads got slow
    for _ in range(3 * EXPLORE_EVERY):
        policy.run(("k",), machine.op)
    assert policy.decisions()[("k",)] == SERIAL


def test_keys_are_separate():
    machine = FakeMachine(1.0, 2.0)
    policy = machine.policy()
    for _ in range(2 + 2 * WINDOW):
        policy.run(("a",), machine.op)
    assert set(policy.decisions()) == {("a",)}


def test_does_nothing_with_one_thread_or_when_switched_off(monkeypatch):
    machine = FakeMachine(1.0, 2.0, threads=1)
    policy = machine.policy()
    assert [policy.run(("k",), machine.op) for _ in range(10)] == ["torch"] * 10
    assert machine.switches == [] and policy.decisions() == {}
    machine.threads = 2
    monkeypatch.setenv("AIA_NATIVE_ADAPTIVE_THREADS", "0")
    assert [policy.run(("k",), machine.op) for _ in range(10)] == ["torch"] * 10
    assert machine.switches == []


def test_switch_restored_when_the_op_raises():
    machine = FakeMachine(1.0, 2.0)
    policy = machine.policy()
    policy.run(("k",), machine.op)  # warm-up on torch's threads; the next call is serial

    def failing():
        raise RuntimeError("bad input")

    with pytest.raises(RuntimeError, match="bad input"):
        policy.run(("k",), failing)
    assert machine.switches == [True, False] and not machine.serial


native = pytest.importorskip("aia_kernels.native")


def test_native_serial_results_equal_threaded(monkeypatch):
    """The real switch: serial and 2-thread runs of the plan ops are bitwise equal."""
    monkeypatch.setenv("AIA_NATIVE_ADAPTIVE_THREADS", "0")  # this test sets the switch itself
    native.load()
    ref, module = make_pair("CinST->STinC", "native", dtype=torch.float32, num_segments=4)
    x, g = torch.randn(16, 24, 9, 10), torch.randn(16, 24, 9, 10)
    old = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(2)
        for serial in (False, True):
            torch.ops.aia_native.set_cpu_serial(serial)
            assert torch.ops.aia_native.cpu_serial() is serial
            module.load_state_dict(ref.state_dict())
            results.append(run(module, x, g))
    finally:
        torch.ops.aia_native.set_cpu_serial(False)
        torch.set_num_threads(old)
    assert_equal_results(results[0], results[1])


def test_native_module_goes_through_the_policy():
    """A module's forward and backward plan ops are timed per key with 2 threads."""
    thread_policy.POLICY.reset()
    _, module = make_pair("C+ST", "native", dtype=torch.float32, num_segments=2)
    x, g = torch.randn(4, 6, 5, 7), torch.randn(4, 6, 5, 7)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(2 + 2 * WINDOW):
            run(module, x, g)
    finally:
        torch.set_num_threads(old)
    decided = thread_policy.POLICY.decisions()
    assert sorted(key[0] for key in decided) == ["backward", "forward"], decided
    assert all(key[2] in ((4, 6, 5, 7), (2, 2, 6, 5, 7)) and choice in (TORCH, SERIAL)
               for key, choice in decided.items())
    assert torch.ops.aia_native.cpu_serial() is False
