"""Compile every Triton kernel launch of the backend for an H100 (sm_90) without a GPU:
the Triton analogue of ``nvcc -c``. Nothing runs on a device.

``python -m aia_kernels.triton.compile_check`` runs the forward and backward of every
variant (float64, float32, bfloat16; contiguous and channels_last; BN in train and eval
mode and without BN; frozen parameters) on CPU tensors with the real Triton compiler:
a stand-in driver reports an sm_90 CUDA target, and each launch becomes a warmup, which
specializes and compiles the kernel (Triton IR -> PTX -> cubin with the bundled ptxas)
but launches nothing. Outputs are therefore uninitialized memory; only the host code
and the compiler are exercised. Prints one JSON line: for each kernel, how many
specializations were compiled, the ``.target`` of their PTX, the most registers a thread
uses (most and median) and the specializations that spill.

``--shapes spec`` compiles instead the launches of the spec's four ResNet-50 shapes
(N*T = 64; float32 and bfloat16, both layouts, BN in train mode), the tiles the
heuristics pick for real work, and reports each kernel's registers and stack frame from
the cubin (``cuobjdump -res-usage``, bundled with Triton): a stack frame means spilled
registers, local-memory traffic no CPU test can see.

Run it with TRITON_INTERPRET unset (the interpreter would bypass the compiler).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ARCH = 90  # H100
SHAPE = (6, 5, 4, 7)  # (N*T, C, H, W), odd sizes
NUM_SEGMENTS = 3
SPEC_SHAPES = ((64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7))
SPEC_NUM_SEGMENTS = 8


def _nvidia_bin(tool: str) -> Path:
    return Path(importlib.util.find_spec("triton.backends.nvidia").origin).parent / "bin" / tool


def unavailable_reason() -> str | None:
    """Why the check cannot run here (no NVIDIA backend or no ptxas), else None."""
    try:
        import triton.backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as error:
        return f"triton is not importable: {error}"
    if "nvidia" not in triton.backends.backends:
        return "triton has no NVIDIA backend"
    bundled = _nvidia_bin("ptxas")
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


def compile_all_launches(spec_shapes: bool = False) -> dict[str, list]:
    """Run every variant through backend="triton"; {kernel name: [(CompiledKernel, its
    BLOCK_* and num_warps), ...]}. ``spec_shapes``: the spec's shapes (float32, bfloat16;
    BN in train mode) instead of the small odd shape and the full matrix.
    Patches triton for the rest of the process (driver, launches): run it in its own process."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter would bypass the compiler")
    import torch
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import aia_kernels
    import aia_kernels.triton as triton_backend

    driver.set_active(SM90Driver())
    compiled: dict[str, list] = {}
    launch = JITFunction.run

    def compile_without_launching(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        tile = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k == "num_warps"}
        compiled.setdefault(kernel.name, []).append((kernel, tile))
        return kernel

    JITFunction.run = compile_without_launching
    # CPU tensors stand in for CUDA ones (the registry asks the module each time).
    triton_backend.unavailable_reason = lambda device: None

    def forward_backward(variant, dtype, *, shape=SHAPE, segments=NUM_SEGMENTS, layout="contiguous", use_bn=True,
                         train=True, frozen=False):
        module = aia_kernels.build(variant, num_segments=segments, use_BN=use_bn, backend="triton")
        # Half inputs run with float32 parameters, as in the tests.
        module = module.to(torch.float64 if dtype == torch.float64 else torch.float32).train(train)
        if frozen:  # only the first gate's parameters train: gate_backward skips what is not needed
            first = next(iter(module.named_parameters()))[0].split("_")[0]
            for name, p in module.named_parameters():
                p.requires_grad_(name.startswith(first))
        x = torch.randn(shape, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        module(x).backward(torch.randn_like(x))

    for variant in aia_kernels.VARIANTS:
        if spec_shapes:
            for shape in SPEC_SHAPES:
                for dtype in (torch.float32, torch.bfloat16):
                    for layout in ("contiguous", "channels_last"):
                        forward_backward(variant, dtype, shape=shape, segments=SPEC_NUM_SEGMENTS, layout=layout)
            continue
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for layout in ("contiguous", "channels_last"):
                forward_backward(variant, dtype, layout=layout)
        forward_backward(variant, torch.float64, train=False)
        forward_backward(variant, torch.float64, use_bn=False)
        forward_backward(variant, torch.float64, frozen=True)
    return compiled


def resource_usage(kernel) -> tuple[int, int] | None:
    """(registers, stack frame bytes) a thread of the compiled kernel uses, from its cubin
    (Triton's bundled ``cuobjdump -res-usage``); None without cuobjdump."""
    tool = _nvidia_bin("cuobjdump")
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out[-500:]}")
    return int(match.group(1)), int(match.group(2))


def ptx_targets(kernels) -> list[str]:
    return sorted({m.group(1) for k in kernels for m in re.finditer(r"^\.target\s+(\S+)", k.asm["ptx"], re.M)})


def report(launches) -> dict:
    """One kernel's entry of the JSON line: specializations, PTX targets, cubins, and (when
    cuobjdump is there) the most registers a thread uses (most and median) and the specializations that spill."""
    unique = {k.hash: (k, tile) for k, tile in launches}
    kernels = [k for k, _ in unique.values()]
    entry = {"specializations": len(unique), "ptx_targets": ptx_targets(kernels),
             "has_cubin": all(k.asm.get("cubin") for k in kernels)}
    usage = {h: resource_usage(k) for h, (k, _) in unique.items()} if entry["has_cubin"] else {}
    if usage and all(u is not None for u in usage.values()):
        entry["max_registers"] = max(u[0] for u in usage.values())
        entry["median_registers"] = statistics.median(u[0] for u in usage.values())
        entry["spilling"] = [{**unique[h][1], "registers": u[0], "stack_bytes": u[1]}
                             for h, u in usage.items() if u[1] > 0]
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aia_kernels.triton.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=("small", "spec"), default="small",
                        help="small: one odd shape, every dtype and mode (default); spec: the spec's shapes")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return 2
    compiled = compile_all_launches(spec_shapes=args.shapes == "spec")
    print(json.dumps({name: report(launches) for name, launches in sorted(compiled.items())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
