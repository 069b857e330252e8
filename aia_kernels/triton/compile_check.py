"""Compile every Triton kernel launch of the backend for an H100 (sm_90) without a GPU:
the Triton analogue of ``nvcc -c``. Nothing runs on a device.

``python -m aia_kernels.triton.compile_check`` runs the forward and backward of every
variant (float64, float32, bfloat16; contiguous and channels_last; BN in train and eval
mode and without BN; frozen parameters) on CPU tensors with the real Triton compiler:
a stand-in driver reports an sm_90 CUDA target, and each launch becomes a warmup, which
specializes and compiles the kernel (Triton IR -> PTX -> cubin with the bundled ptxas)
but launches nothing. Outputs are therefore uninitialized memory; only the host code
and the compiler are exercised. Prints one JSON line: for each kernel, how many
specializations were compiled and the ``.target`` of their PTX.

Run it with TRITON_INTERPRET unset (the interpreter would bypass the compiler).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

ARCH = 90  # H100
SHAPE = (6, 5, 4, 7)  # (N*T, C, H, W), odd sizes
NUM_SEGMENTS = 3


def unavailable_reason() -> str | None:
    """Why the check cannot run here (no NVIDIA backend or no ptxas), else None."""
    try:
        import triton.backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as error:
        return f"triton is not importable: {error}"
    if "nvidia" not in triton.backends.backends:
        return "triton has no NVIDIA backend"
    bundled = Path(importlib.util.find_spec("triton.backends.nvidia").origin).parent / "bin" / "ptxas"
    if not (bundled.exists() or os.environ.get("TRITON_PTXAS_PATH") or shutil.which("ptxas")):
        return "no ptxas (neither bundled with triton's NVIDIA backend nor on PATH)"
    return None


class SM90Driver:
    """Stands in for the CUDA driver: the current device is an sm_90 GPU; nothing else exists."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass


def compile_all_launches() -> dict[str, list]:
    """Run every variant through backend="triton"; {kernel name: [CompiledKernel, ...]}.
    Patches triton for the rest of the process (driver, launches): run it in its own process."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter would bypass the compiler")
    import torch
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import aia_kernels
    from aia_kernels import backends

    driver.set_active(SM90Driver())
    compiled: dict[str, list] = {}
    launch = JITFunction.run

    def compile_without_launching(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.setdefault(kernel.name, []).append(kernel)
        return kernel

    JITFunction.run = compile_without_launching
    triton_backend = backends.get("triton", torch.device("cuda"))  # CUDA is available (as far as it knows)
    triton_backend.unavailable_reason = lambda device: None  # CPU tensors stand in for CUDA ones

    def forward_backward(variant, dtype, *, layout="contiguous", use_bn=True, train=True, frozen=False):
        module = aia_kernels.build(variant, num_segments=NUM_SEGMENTS, use_BN=use_bn, backend="triton")
        # Half inputs run with float32 parameters, as in the tests.
        module = module.to(torch.float64 if dtype == torch.float64 else torch.float32).train(train)
        if frozen:  # only the first gate's parameters train: gate_backward skips what is not needed
            first = next(iter(module.named_parameters()))[0].split("_")[0]
            for name, p in module.named_parameters():
                p.requires_grad_(name.startswith(first))
        x = torch.randn(SHAPE, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        module(x).backward(torch.randn_like(x))

    for variant in aia_kernels.VARIANTS:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for layout in ("contiguous", "channels_last"):
                forward_backward(variant, dtype, layout=layout)
        forward_backward(variant, torch.float64, train=False)
        forward_backward(variant, torch.float64, use_bn=False)
        forward_backward(variant, torch.float64, frozen=True)
    return compiled


def ptx_targets(kernels) -> list[str]:
    return sorted({m.group(1) for k in kernels for m in re.finditer(r"^\.target\s+(\S+)", k.asm["ptx"], re.M)})


def main() -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return 2
    compiled = compile_all_launches()
    print(json.dumps({name: {"specializations": len({k.hash for k in kernels}), "ptx_targets": ptx_targets(kernels),
                             "has_cubin": all(k.asm.get("cubin") for k in kernels)}
                      for name, kernels in sorted(compiled.items())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
