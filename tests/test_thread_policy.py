"""The native CPU kernels' thread policy (aia_kernels/native/thread_policy.py): it times the
plan ops on torch's threads and on the calling thread and runs the faster, without changing
any result."""
import pytest
import torch

from aia_kernels.native import thread_policy
from aia_kernels.native.thread_policy import EXPLORE_EVERY, SERIAL, TORCH, WINDOW, ThreadPolicy

from aia_testing import assert_equal_results, make_pair, run


class FakeMachine:
    """A clock where an op takes ``cost[threads]`` seconds, and the thread counts it was set to."""

    def __init__(self, torch_s: float, serial_s: float, threads: int = 2):
        self.cost = {threads: torch_s, 1: serial_s}
        self.now, self.threads, self.switches = 0.0, threads, []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.switches.append(n)

    def op(self):
        self.now += self.cost[self.threads]
        return "serial" if self.threads == 1 else "torch"

    def policy(self) -> ThreadPolicy:
        return ThreadPolicy(clock=lambda: self.now, get_threads=lambda: self.threads, set_threads=self.set_threads)


@pytest.mark.parametrize("torch_s,serial_s,best", [(1.0, 3.0, TORCH), (3.0, 1.0, SERIAL)])
def test_runs_the_faster_setting_and_measures_the_other_now_and_then(torch_s, serial_s, best):
    machine = FakeMachine(torch_s, serial_s)
    policy = machine.policy()
    ran = [policy.run(("k",), machine.op) for _ in range(2 + 2 * WINDOW + 4 * EXPLORE_EVERY)]
    assert ran[:2] == ["torch", "serial"]  # one warm-up call each, not timed
    assert policy.decisions() == {("k",): best}
    settled = ran[2 + 2 * WINDOW:]
    chosen = "serial" if best == SERIAL else "torch"
    others = [i for i, r in enumerate(settled) if r != chosen]
    # the other setting EXPLORE_EVERY calls after the decision, then twice as long after each
    assert others == [EXPLORE_EVERY, 3 * EXPLORE_EVERY], others
    assert machine.threads == 2  # restored after every call


def test_follows_a_change_of_load():
    machine = FakeMachine(1.0, 2.0)
    policy = machine.policy()
    for _ in range(2 + 2 * WINDOW + EXPLORE_EVERY):
        policy.run(("k",), machine.op)
    assert policy.decisions()[("k",)] == TORCH
    machine.cost[2] = 5.0  # another process now keeps a core busy: threads got slow
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
    assert [policy.run(("k",), machine.op) for _ in range(10)] == ["serial"] * 10  # one thread: as it is
    assert machine.switches == [] and policy.decisions() == {}
    machine = FakeMachine(1.0, 2.0)
    policy = machine.policy()
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
    assert machine.switches == [1, 2] and machine.threads == 2


native = pytest.importorskip("aia_kernels.native")


def test_native_one_thread_results_equal_two():
    """What the policy switches between gives bitwise equal results (plan ops at 1 and 2 threads)."""
    ref, module = make_pair("CinST->STinC", "native", dtype=torch.float32, num_segments=4)
    x, g = torch.randn(16, 24, 9, 10), torch.randn(16, 24, 9, 10)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            thread_policy.POLICY.reset()  # the first calls run on torch's threads
            module.load_state_dict(ref.state_dict())
            results.append(run(module, x, g))
    finally:
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
            assert torch.get_num_threads() == 2  # restored after the serial calls
    finally:
        torch.set_num_threads(old)
    decided = thread_policy.POLICY.decisions()
    assert sorted(key[0] for key in decided) == ["backward", "forward"], decided
    assert all(key[2] in ((4, 6, 5, 7), (2, 2, 6, 5, 7)) and choice in (TORCH, SERIAL)
               for key, choice in decided.items())
    assert torch.get_num_threads() == old
