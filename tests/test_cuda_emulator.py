"""The CUDA emulator (csrc/emulation/cuda_emulator.h) on small kernels of its own: that it
runs barriers and cooperative grid syncs correctly, that its thread orders expose a
missing barrier, and that it refuses what is undefined on a GPU. It is what
test_native_cuda_emulated.py relies on to run the native CUDA kernels without a GPU."""
import pytest
import torch
from torch.utils import cpp_extension

from aia_kernels.native import CSRC

SOURCE = r"""
#include "emulation/cuda_emulator.h"
#include <torch/extension.h>

constexpr int kBlock = 64;

// Block sums by a shared-memory tree; `sync` = false drops the barrier inside the tree.
__global__ void block_sums(const float* x, float* out, bool sync) {
  __shared__ float s[kBlock];
  s[threadIdx.x] = x[blockIdx.x * kBlock + threadIdx.x];
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    if (sync) __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// Each block writes its index; after grid.sync() (if `sync`) block 0 sums them.
__global__ void grid_sum(float* partial, float* out, bool sync) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  if (threadIdx.x == 0) partial[blockIdx.x] = float(blockIdx.x + 1);
  if (sync) grid.sync();
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    float s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partial[b];
    *out = s;
  }
}

__global__ void early_exit() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

__global__ void grid_sync_in_plain_launch() { cooperative_groups::this_grid().sync(); }

__global__ void barrier_in_later_blocks_only() {
  if (blockIdx.x > 0) __syncthreads();
}

torch::Tensor run_block_sums(torch::Tensor x, bool sync) {
  torch::Tensor out = torch::zeros({x.numel() / kBlock}, x.options());
  AIA_LAUNCH(out.numel(), kBlock, nullptr, block_sums)(x.data_ptr<float>(), out.data_ptr<float>(), sync);
  return out;
}

double run_grid_sum(int64_t blocks, bool sync) {
  torch::Tensor partial = torch::zeros({blocks});
  torch::Tensor out = torch::zeros({1});
  float* p = partial.data_ptr<float>();
  float* o = out.data_ptr<float>();
  void* args[] = {&p, &o, &sync};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(grid_sum, dim3(blocks), dim3(32), args, 0, nullptr));
  return out.item<double>();
}

void run_misuse(const std::string& what) {
  if (what == "early_exit") AIA_LAUNCH(1, 32, nullptr, early_exit)();
  if (what == "grid_sync") AIA_LAUNCH(1, 32, nullptr, grid_sync_in_plain_launch)();
  if (what == "later_blocks") AIA_LAUNCH(3, 32, nullptr, barrier_in_later_blocks_only)();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sums", &run_block_sums);
  m.def("grid_sum", &run_grid_sum);
  m.def("misuse", &run_misuse);
}
"""

ORDERS = ("forward", "reverse", "shuffle:1", "shuffle:2")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return cpp_extension.load_inline(
        name="aia_cuda_emulator_selftest", cpp_sources=[SOURCE], extra_include_paths=[str(CSRC)],
        extra_cflags=["-O1", "-DAIA_CUDA_EMULATION"], build_directory=str(tmp_path_factory.mktemp("emu")))


def test_block_barriers(emu, monkeypatch):
    x = torch.randn(5 * 64)
    expected = x.view(5, 64).double().sum(1).float()
    for order in ORDERS:
        monkeypatch.setenv("AIA_CUDA_EMULATION_ORDER", order)
        torch.testing.assert_close(emu.block_sums(x, True), expected, msg=order)


def test_some_order_exposes_a_missing_barrier(emu, monkeypatch):
    x = torch.rand(5 * 64) + 1
    expected = x.view(5, 64).sum(1)
    wrong = []
    for order in ORDERS:
        monkeypatch.setenv("AIA_CUDA_EMULATION_ORDER", order)
        wrong.append(not torch.allclose(emu.block_sums(x, False), expected))
    assert any(wrong), "no thread order showed the race"


def test_cooperative_grid_sync(emu, monkeypatch):
    for order in ORDERS:
        monkeypatch.setenv("AIA_CUDA_EMULATION_ORDER", order)
        assert emu.grid_sum(6, True) == 21.0, order
    results = set()
    for order in ORDERS:
        monkeypatch.setenv("AIA_CUDA_EMULATION_ORDER", order)
        results.add(emu.grid_sum(6, False))
    assert results != {21.0}, "no block order showed the missing grid.sync()"


@pytest.mark.parametrize("what,message", [
    ("early_exit", "exited while"),
    ("grid_sync", "not cooperative"),
    ("later_blocks", "the first block run of the same launch did not"),
])
def test_refuses_undefined_behaviour(emu, monkeypatch, what, message):
    monkeypatch.setenv("AIA_CUDA_EMULATION_ORDER", "forward")  # block 0 first: it has no barrier
    with pytest.raises(RuntimeError, match=message):
        emu.misuse(what)


def test_bad_order_setting(emu, monkeypatch):
    monkeypatch.setenv("AIA_CUDA_EMULATION_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="AIA_CUDA_EMULATION_ORDER must be"):
        emu.block_sums(torch.zeros(64), True)
