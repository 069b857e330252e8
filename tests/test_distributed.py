"""Gate BatchNorms synced across ranks on the fused backends: 2 CPU processes, gloo.

Both ranks see different clips. Per rank, the fused path (its kernels for the full-size
passes, aia_kernels/sync_bn.py for the synced gate statistics) gives the outputs, input
and parameter gradients and running statistics of the reference path, where the
SyncBatchNorm layers sync themselves. After one DDP training step the whole state
(parameters and BN running statistics, AIA gates included) equals that of one process
on the concatenated batch.
"""
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import aia_kernels
from aia_kernels import backends
from aia_kernels.models import TSN, ResNet
from aia_kernels.models.distributed import SyncBatchNorm, convert_sync_batchnorm
from aia_kernels.primitives.torch_impl import TorchPrimitives

T, CLIPS_PER_RANK, WORLD = 3, 2, 2


def make_model():
    torch.manual_seed(0)
    net = TSN(ResNet((1, 1), (4, 8), variant="CinST->STinC", num_segments=T, backend="reference"),
              num_classes=3, num_segments=T, dropout=0.0)
    with torch.no_grad():  # non-trivial AIA BN parameters so their gradients matter
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 2), m.bias.uniform_(-0.5, 0.5)
    return net


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * CLIPS_PER_RANK, T, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 1])


def step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _train_step_outputs(model, x):
    """Output, input gradient and parameter gradients of one forward/backward (no DDP)."""
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


def _worker(rank, port, path, backend):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        if backend == "executor":  # the executor's walk on the plain-torch primitives, as a fused backend
            backends.stand_ins["triton"] = backends.FusedBackend("triton", TorchPrimitives(), lambda device: None)
            backend = "triton"
        x, y = make_batch()
        part = slice(rank * CLIPS_PER_RANK, (rank + 1) * CLIPS_PER_RANK)
        results = {}
        for name in ("reference", backend):
            model = convert_sync_batchnorm(make_model())
            aia_kernels.convert(model, backend=name)
            results[name] = _train_step_outputs(model, x[part]) + [b.clone() for b in model.buffers()]

        model = convert_sync_batchnorm(make_model())
        aia_kernels.convert(model, backend=backend)
        ddp = nn.parallel.DistributedDataParallel(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(ddp, x[part], y[part])
        aia = [m for _, m in aia_kernels.aia_modules(model)]
        result = {"state": model.state_dict(), "last_backends": {m.last_backend for m in aia},
                  "warnings": [str(w.message) for w in caught], "backend": backend,
                  "n_sync": sum(isinstance(m, SyncBatchNorm) for m in model.modules()),
                  "fused": results[backend], "reference": results["reference"]}
        torch.save(result, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["native", "executor"])
def test_ddp_sync_bn_on_fused_backend(tmp_path, backend):
    if backend == "native":
        pytest.importorskip("aia_kernels.native").load()
    mp.spawn(_worker, args=(free_port(), str(tmp_path), backend), nprocs=WORLD, join=True)
    single = make_model()
    step(single, *make_batch())
    expected = single.state_dict()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        # The fused path ran, synced, and agrees with the reference SyncBatchNorm path on this rank.
        assert got["last_backends"] == {got["backend"]}, got["last_backends"]
        assert not [w for w in got["warnings"] if "aia_kernels" in w], got["warnings"]
        assert len(got["fused"]) == len(got["reference"])
        for i, (f, r) in enumerate(zip(got["fused"], got["reference"])):
            torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5, msg=f"rank {rank}, result {i}")
        # One DDP step: the state of one process on the concatenated batch.
        assert got["n_sync"] == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in single.modules())
        assert got["state"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        aia_stats = [k for k in expected if "_bn.running" in k]
        assert len(aia_stats) == 2 * 8 * 2  # 2 AIA blocks x 8 gates x (mean, var)


def test_sync_bn_is_plain_bn_without_distributed():
    torch.manual_seed(0)
    bn, sync = nn.BatchNorm3d(2), convert_sync_batchnorm(nn.BatchNorm3d(2))
    x = torch.randn(3, 2, 2, 3, 4)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)
