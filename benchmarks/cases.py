"""What is benchmarked: shapes, dtypes, modes, implementations, and one callable per case.

An *implementation* ("impl") is how a module runs:

- ``eager``: the pure-PyTorch reference (``backend="reference"``),
- ``authors``: the same module written the way the authors' released code writes it
  (``authors_style.py``: the eager code a user would otherwise run), same weights; a bf16
  input runs it under ``torch.autocast`` (its convs take the input's dtype),
- ``compile-default`` / ``compile-max-autotune``: the reference under ``torch.compile``
  (default mode, and ``mode="max-autotune-no-cudagraphs"``); the faster of the two is
  *the compiled peer*,
- ``triton`` / ``native``: the fused backends, whenever ``aia_kernels`` has them and they
  can run on the device (otherwise the case is reported as not available),
- ``native-walk`` / ``native-1launch``: the native backend with its CUDA forward and
  backward forced onto the multi-launch walk or the one-launch cooperative kernels
  (``AIA_NATIVE_CUDA_PERSISTENT`` = 0 / 1 during the step; ``native`` itself chooses by
  size). Asked for by name only, not part of ``all``: they exist to set that threshold.

Every impl of a case runs a deep copy of the same module (same weights and BN state).
"""
from __future__ import annotations

import copy
import os
import re
from typing import Callable

import torch

import aia_kernels
from aia_kernels import backends

from . import authors_style
from .bytes_model import MODES

NUM_SEGMENTS = 8
HEADLINE = "CinST->STinC"
# The spec's ResNet-50 shapes (N*T, C, H, W), 8 clips x 8 frames, largest first.
SPEC_SHAPES = ((64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7))
SHAPE_SETS = {
    "spec": SPEC_SHAPES,
    "small": tuple((NUM_SEGMENTS, *s[1:]) for s in SPEC_SHAPES),  # one clip (N*T = 8)
    "tiny": ((NUM_SEGMENTS, 8, 8, 8),),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_MODES = {"compile-default": "default", "compile-max-autotune": "max-autotune-no-cudagraphs"}
FUSED = ("triton", "native")
NATIVE_PATHS = {"native-walk": "0", "native-1launch": "1"}  # AIA_NATIVE_CUDA_PERSISTENT while timed
PATH_ENV = "AIA_NATIVE_CUDA_PERSISTENT"
_USER_PATH_SETTING = os.environ.get(PATH_ENV)  # what plain ``native`` runs with
IMPLS = ("eager", "authors", *COMPILE_MODES, *FUSED, *NATIVE_PATHS)
IMPL_GROUPS = {"all": ("eager", "authors", *COMPILE_MODES, *FUSED), "compile": tuple(COMPILE_MODES), "fused": FUSED,
               "native-paths": tuple(NATIVE_PATHS)}
INTERPRETER_NOTE = "not timed: Triton runs through its interpreter on CPU (TRITON_INTERPRET=1)"


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """Comma-separated set names (spec, small, tiny) and/or shapes such as ``64x64x56x56``."""
    shapes: list[tuple[int, ...]] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item in SHAPE_SETS:
            shapes += SHAPE_SETS[item]
        elif re.fullmatch(r"\d+x\d+x\d+x\d+", item):
            shape = tuple(int(s) for s in item.split("x"))
            if shape[0] % NUM_SEGMENTS:
                raise ValueError(f"shape {item}: N*T = {shape[0]} is not a multiple of T = {NUM_SEGMENTS}")
            shapes.append(shape)
        else:
            raise ValueError(f"bad shape {item!r}: use {', '.join(SHAPE_SETS)} or NTxCxHxW")
    return list(dict.fromkeys(shapes))


def parse_list(text: str, allowed, groups: dict | None = None, name: str = "value") -> list[str]:
    """Comma-separated names from ``allowed`` (plus ``all`` and any group names)."""
    groups = {"all": tuple(allowed), **(groups or {})}
    out: list[str] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item in groups:
            out += groups[item]
        elif item in allowed:
            out.append(item)
        else:
            raise ValueError(f"unknown {name} {item!r}; expected {', '.join([*allowed, *groups])}")
    return list(dict.fromkeys(out))


def unavailable_reason(impl: str, device: torch.device, interpreter: bool = False) -> str | None:
    """Why ``impl`` is not timed on ``device``, or None when it is. ``interpreter``: Triton
    through its interpreter on CPU counts as available (a dry run of the code, not a timing)."""
    if impl in NATIVE_PATHS:
        if device.type != "cuda":
            return "the native backend's walk / one-launch choice exists on CUDA only"
        impl = "native"
    if impl not in FUSED:
        return None
    if not backends.is_available(impl, device):
        try:
            backends.get(impl, device)
        except Exception as exc:  # the registry's own explanation
            return str(exc)
        return "not available"
    if impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and not interpreter:
        return INTERPRETER_NOTE
    return None


def make_input(shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def make_module(variant: str, mode: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The variant with fp32 parameters (also for bf16 inputs: the module is used as-is),
    BN in train mode for ``fwd-train``/``fwd-bwd`` and eval mode for ``fwd-infer``."""
    torch.manual_seed(seed)
    module = aia_kernels.build(variant, num_segments=NUM_SEGMENTS, backend="reference").to(device)
    return module.train(mode != "fwd-infer")


def _with_path_setting(value: str | None, fn: Callable) -> Callable:
    """``fn`` with AIA_NATIVE_CUDA_PERSISTENT = ``value`` (None: unset) at each call; the
    C++ reads it per call, and impls of one run alternate (a dict lookup when unchanged)."""
    def call(*args):
        if os.environ.get(PATH_ENV) != value:
            if value is None:
                os.environ.pop(PATH_ENV, None)
            else:
                os.environ[PATH_ENV] = value
        return fn(*args)
    return call


def prepare_impl(base: torch.nn.Module, impl: str) -> tuple[torch.nn.Module, Callable]:
    """(the copy whose parameters get gradients, the callable to run) for ``impl``."""
    module = copy.deepcopy(base)
    if impl in NATIVE_PATHS or impl == "native":
        module.backend = "native"
        return module, _with_path_setting(NATIVE_PATHS.get(impl, _USER_PATH_SETTING), module)
    if impl in FUSED:
        module.backend = impl
        return module, module
    if impl in COMPILE_MODES:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
        return module, torch.compile(module, mode=COMPILE_MODES[impl])
    if impl == "eager":
        return module, module
    if impl == "authors":
        authors = authors_style.copy_of(module)
        return authors, _autocast_for_half_inputs(authors)
    raise ValueError(f"unknown impl {impl!r}")


def _autocast_for_half_inputs(module: torch.nn.Module) -> Callable:
    """``module`` as a user of an fp32 module runs it on half inputs: under autocast to the
    input's dtype, the output in that dtype."""
    def call(x):
        if x.dtype not in (torch.bfloat16, torch.float16):
            return module(x)
        with torch.autocast(x.device.type, dtype=x.dtype):
            out = module(x)
        return out.to(x.dtype)
    return call


def make_step(module: torch.nn.Module, fn: Callable, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """One timed call: forward without grad (``fwd-infer``), forward building the autograd
    graph (``fwd-train``), or forward + backward to the input and every parameter (``fwd-bwd``)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "fwd-infer":
        x = x.detach()

        def step():
            with torch.no_grad():
                return fn(x)
        return step
    x = x.detach().requires_grad_()
    if mode == "fwd-train":
        return lambda: fn(x)
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]
    grad_out = make_input(x.shape, x.dtype, x.device, seed=1)

    def step():
        return torch.autograd.grad(fn(x), inputs, grad_out)
    return step
