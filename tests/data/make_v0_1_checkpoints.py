"""Writes v0_1_cinst_plus_stinc.pt: checkpoints of CinST+STinC as aia_kernels 0.1 saved them
(its eft1 held the CinST unit), with their outputs, for tests/test_checkpoint_layout.py.

Run it against the 0.1 code, e.g. from a checkout of commit e159b3e:
    git worktree add /tmp/aia-0.1 e159b3e
    PYTHONPATH=/tmp/aia-0.1 python tests/data/make_v0_1_checkpoints.py tests/data/v0_1_cinst_plus_stinc.pt
"""
import sys

import torch

import aia_kernels
from aia_kernels.models import TSN, ResNet


def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.3)


def main(path: str) -> None:
    torch.manual_seed(0)
    x_unit = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    unit = aia_kernels.build("CinST+STinC", num_segments=3, backend="reference").double()
    randomize(unit)
    unit.eval()
    net = TSN(ResNet((1, 1), (8, 16), variant="CinST+STinC", num_segments=3, backend="reference"), 4, 3, 0.0)
    net = net.double()
    randomize(net)
    net.eval()
    x_net = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.save({"aia_kernels": aia_kernels.__version__,
                    "eft1_kind": type(unit.eft1).__name__,
                    "unit_state_dict": unit.state_dict(), "unit_input": x_unit, "unit_output": unit(x_unit),
                    "net_state_dict": net.state_dict(), "net_input": x_net, "net_output": net(x_net)}, path)


if __name__ == "__main__":
    main(sys.argv[1])
