"""Test setup. Without a GPU, Triton kernels run on the CPU through Triton's
interpreter, which must be switched on before triton is first imported."""
import os
import sys
from pathlib import Path

import torch

# The repository root, so tests import `benchmarks` (the authors'-style peer, the runners).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if torch.cuda.is_available():
    # The float32 reference must compute in float32: cuDNN convolutions default to TF32
    # (10-bit mantissa), which would put the reference, not our kernels, 1e-3 off.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
