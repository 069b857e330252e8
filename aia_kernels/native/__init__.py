"""The native backend: C++ (CPU) and CUDA kernels of the six primitives, from ``csrc/``.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja)
into the default torch extensions directory, or into ``$AIA_KERNELS_BUILD_DIR``. A
CPU-only torch builds only the C++ sources; the CUDA sources are added when
``torch.cuda.is_available()`` and a CUDA toolkit (``CUDA_HOME``) exist. An ahead-of-time
build (``AIA_KERNELS_BUILD_NATIVE=1`` for ``setup.py``) is used instead when it was made
for this torch version and CPU (``AIA_NATIVE_PREBUILT`` selects; :func:`build_info` says).
Sources and flags: ``build_config.py``. The first-use build says on stderr what it compiles
and where before it starts, and runs under a lock that a killed build does not leave
behind (``build_lock.py``). A build that fails is remembered for the process: ``load``
raises with the compiler's message, and ``backend="auto"`` runs the next backend, warning once.

The CUDA kernels have never run on a GPU: ``unavailable_reason`` refuses CUDA devices
unless ``AIA_NATIVE_CUDA=1`` is set, so ``backend="auto"`` never picks them.

:class:`NativePrimitives` adapts the primitive contract (``aia_kernels.primitives``)
to the flat ``torch.ops.aia_native.*`` schemas (see ``csrc/aia_ops.cpp``), and offers
the whole plan in one op per direction (``csrc/aia_plan.cpp``), which the executor in
``aia_kernels/executor.py`` prefers. On CUDA, small problems run that forward, and that
backward, as one cooperative launch each (``csrc/aia_cuda_persistent.cu``;
``AIA_NATIVE_CUDA_PERSISTENT`` selects).

``AIA_NATIVE_CUDA_EMULATION=1`` (a test tool; set before the first build in a process)
builds the CUDA sources with the host compiler against a CPU emulator of the CUDA
runtime (``csrc/emulation/``): CPU tensors then run the CUDA kernels, slowly, so they
can be checked against the reference without a GPU (``tests/test_native_cuda_emulated.py``).
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import threading
import warnings
from pathlib import Path

import torch

from ..layouts import clip_shape
from ..plan import decode_plan, encode_plan
from ..primitives import GateForward, GateGrads, WeightValue, gate_shape
from . import thread_policy
from .build_config import (
    CPU_SOURCES,
    CUDA_FLAGS,
    CUDA_SOURCES,
    CXX_FLAGS,
    EMULATION_FLAGS,
    EMULATION_SOURCES,
    LD_FLAGS,
    NVCC_FLAGS,
    PREBUILT_METADATA,
    cpu_fingerprint,
    machine_specific,
    sources_digest,
)
from .build_lock import exclusive_build, needs_build, say

# The source tree's csrc/, or the copy a regular install puts inside the package.
CSRC = next((p for p in (Path(__file__).resolve().parents[2] / "csrc", Path(__file__).resolve().parents[1] / "csrc")
             if p.is_dir()), Path(__file__).resolve().parents[2] / "csrc")

_lock = threading.Lock()
# "error": build failure message, "cuda": built with CUDA, "emulated": the CUDA emulation
# build, "library": the prebuilt library loaded, "loaded"
_state: dict[str, object] = {}


def _with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.cuda.is_available() and CUDA_HOME is not None


def emulating_cuda() -> bool:
    """Whether this process builds (or built) the CUDA emulation build."""
    return _state.get("emulated", os.environ.get("AIA_NATIVE_CUDA_EMULATION") == "1")


def _extension_name(cuda: bool, emulated: bool = False) -> str:
    """torch caches builds by name, sources and flags, not by CPU: with -march=native the
    name carries a fingerprint of this CPU so another CPU never loads this build."""
    name = "aia_native_cuda_emulated" if emulated else "aia_native_cuda" if cuda else "aia_native"
    return f"{name}_{cpu_fingerprint()}" if machine_specific(CXX_FLAGS) else name


def build_directory() -> str | None:
    """``$AIA_KERNELS_BUILD_DIR`` (created if missing), else torch's default extensions dir."""
    path = os.environ.get("AIA_KERNELS_BUILD_DIR")
    if not path:
        return None
    os.makedirs(path, exist_ok=True)
    return path


def _torch_build_directory(name: str, verbose: bool) -> str:
    """Where torch's load() builds ``name`` when not told (its extensions dir, created)."""
    from torch.utils.cpp_extension import _get_build_directory
    return _get_build_directory(name, verbose)


PACKAGE_DIR = Path(__file__).resolve().parent


def _prebuilt_candidate() -> tuple[Path | None, bool]:
    """(the ahead-of-time library to try, whether AIA_NATIVE_PREBUILT named it).
    AIA_NATIVE_PREBUILT: unset, the one setup.py put in this package if any; 0, none; else a path."""
    setting = os.environ.get("AIA_NATIVE_PREBUILT", "")
    if setting == "0":
        return None, False
    if setting:
        return Path(setting), True
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (PACKAGE_DIR / f"_aia_native{suffix}").exists():
            return PACKAGE_DIR / f"_aia_native{suffix}", False
    return None, False


def _prebuilt_metadata(library: Path) -> tuple[dict | None, str | None]:
    """(what setup.py recorded of the library, or why it cannot be used in this process)."""
    if not library.is_file():
        return None, "it does not exist"
    path = library.with_name(PREBUILT_METADATA)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"its metadata {path} cannot be read ({exc})"
    if meta.get("torch") != torch.__version__:  # the C++ ABI follows the torch version
        return None, f"it was built for torch {meta.get('torch')}, this is torch {torch.__version__}"
    if meta.get("cpu") and meta["cpu"] != cpu_fingerprint():
        return None, "it was built with -march=native on another CPU"
    if meta.get("cxx_flags") != CXX_FLAGS:  # AIA_NATIVE_CXXFLAGS differs from the build's
        return None, f"it was built with C++ flags {meta.get('cxx_flags')}, this process asks for {CXX_FLAGS}"
    if _with_cuda() and not meta.get("cuda"):
        return None, "it has no CUDA kernels, and this process can build them"
    if meta.get("sources") != sources_digest(CSRC):
        return None, f"it was built from other sources than {CSRC} holds now"
    return meta, None


def _load_prebuilt() -> bool:
    """Load the ahead-of-time library when there is a usable one; warns when one is found
    but unusable (and the first-use build runs instead), raises if AIA_NATIVE_PREBUILT named it."""
    library, named = _prebuilt_candidate()
    if library is None:
        return False
    meta, reason = _prebuilt_metadata(library)
    if reason is not None:
        message = f"aia_kernels.native: the prebuilt library {library} is not used: {reason}"
        if named:
            _state["error"] = message + " (unset AIA_NATIVE_PREBUILT to build on first use)"
            raise RuntimeError(_state["error"])
        warnings.warn(message + "; building on first use instead", stacklevel=3)
        return False
    torch.ops.load_library(str(library))
    _state.update(cuda=bool(meta["cuda"]), library=str(library))
    return True


def build_info() -> dict:
    """How the loaded extension was built: {"source": "prebuilt" | "first use", "library"
    (the prebuilt file or None), "build_directory" (of the first-use build, with its
    build.ninja; else None), "cuda", "emulated"}; loads it first."""
    load()
    return {"source": "prebuilt" if "library" in _state else "first use", "library": _state.get("library"),
            "build_directory": _state.get("build_directory"), "cuda": _state["cuda"], "emulated": _state["emulated"]}


def load(verbose: bool = False) -> None:
    """Load the extension: the ahead-of-time build if setup.py made one for this torch
    and CPU, else compile it on first use (once per build dir). Raises RuntimeError with
    the compiler's message if the build fails."""
    with _lock:
        if "loaded" in _state:
            return
        if "error" in _state:
            raise RuntimeError(_state["error"])
        emulated = emulating_cuda()
        if not emulated and _load_prebuilt():
            _register_fakes()
            _state["emulated"] = False
            _state["loaded"] = True
            return
        from torch.utils.cpp_extension import load as load_extension
        cuda = _with_cuda() and not emulated
        sources = [str(CSRC / s) for s in (EMULATION_SOURCES if emulated else
                                             CPU_SOURCES + (CUDA_SOURCES if cuda else ()))]
        defines = EMULATION_FLAGS if emulated else CUDA_FLAGS if cuda else []
        if emulated:
            warnings.warn("aia_kernels.native: AIA_NATIVE_CUDA_EMULATION=1: CPU tensors run the CUDA kernels on "
                          "a slow CPU emulator (a test tool, csrc/emulation/), not the C++ CPU kernels",
                          stacklevel=2)
        name = _extension_name(cuda, emulated)
        try:
            directory = build_directory() or _torch_build_directory(name, verbose)
            with exclusive_build(directory):
                if needs_build(directory, name, CSRC):
                    what = "CUDA and C++" if cuda else "emulated CUDA and C++" if emulated else "C++"
                    say(f"compiling the native {what} kernels ({name}) on first use, about "
                        f"{'2-5 minutes' if cuda or emulated else '1-2 minutes'}; cached in {directory}")
                load_extension(name=name, sources=sources,
                               extra_cflags=CXX_FLAGS + defines, extra_cuda_cflags=NVCC_FLAGS + defines,
                               extra_ldflags=LD_FLAGS, extra_include_paths=[str(CSRC)], build_directory=directory,
                               is_python_module=False, verbose=verbose)
        except Exception as exc:  # the message carries the compiler's output
            _state["error"] = f"building the aia_kernels native extension from {CSRC} failed: {exc}"
            raise RuntimeError(_state["error"]) from exc
        _register_fakes()
        _state.update(cuda=cuda, emulated=emulated, build_directory=directory, loaded=True)


def running_stats_op():
    """``aia_native::update_running_stats`` (CPU buffers) once the extension is loaded, else None:
    used only where the native backend ran, never a reason to build it."""
    return torch.ops.aia_native.update_running_stats if _state.get("loaded") else None


def unavailable_reason(device: torch.device) -> str | None:
    if _state.get("loaded") and getattr(device, "type", None) == "cpu":  # asked at every call
        return None
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"no native kernels for device type {device.type!r}"
    if device.type == "cuda" and emulating_cuda():
        return "this process uses the CUDA emulation build (AIA_NATIVE_CUDA_EMULATION=1): CPU tensors only"
    if device.type == "cuda" and os.environ.get("AIA_NATIVE_CUDA") != "1":
        return ("the native CUDA kernels are compiled but untested on a GPU; set AIA_NATIVE_CUDA=1 "
                "to use them anyway")
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    if device.type == "cuda" and not _state["cuda"]:
        return "the native extension was built without CUDA (no GPU or no CUDA toolkit at build time)"
    return None


# ---- the contract, flattened for the op schemas ----

class _Flat:
    """Gates, weights and upstream gradients as the ops' flat argument lists."""

    def __init__(self):
        self.gate_z, self.gate_ss, self.gate_axes, self.weight_desc = [], [], [], []
        self.douts, self.up_grads, self.up_argmax, self.up_axes, self.up_counts = [], [], [], [], []

    def add_weight(self, weight: WeightValue) -> None:
        self.weight_desc += [1 if weight.combine == "mean" else 0, len(weight.factors)]
        for factor in weight.factors:
            self.weight_desc.append(len(factor))
            for gate in factor:
                self.gate_z.append(gate.z)
                self.gate_ss.append(gate.scale_shift)
                self.gate_axes.append(gate.axis)

    def add_upstream(self, upstream, dtype: torch.dtype) -> None:
        if isinstance(upstream, torch.Tensor):
            self.douts.append(upstream if upstream.dtype == dtype else upstream.to(dtype))
            self.up_counts.append(-1)
            return
        self.up_counts.append(len(upstream))
        for item in upstream:
            self.up_grads.append(item.grad)
            self.up_argmax.append(item.argmax)
            self.up_axes.append(item.axis)

    def gates(self):
        return self.gate_z, self.gate_ss, "".join(self.gate_axes), self.weight_desc

    def upstreams(self):
        return self.douts, self.up_grads, self.up_argmax, "".join(self.up_axes), self.up_counts


def _weight_only(weight: WeightValue) -> _Flat:
    flat = _Flat()
    flat.add_weight(weight)
    return flat


def _none_if_empty(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """The ops return empty tensors for gradients not computed (BN ones without BN)."""
    return t if needed and t.numel() > 0 else None


# The native CPU plan ops run on torch's threads or on the calling thread, whichever is
# faster here and now (thread_policy.py); thread_policy.POLICY.decisions() says which.
def _on_cpu_threads(direction: str, codes: tuple, x: torch.Tensor, op):
    if x.device.type != "cpu":
        return op()
    return thread_policy.POLICY.run((direction, codes, tuple(x.shape), tuple(x.stride()), x.dtype), op)


class NativePrimitives:
    """The six primitives as ``aia_native`` ops, plus the whole plan in one op
    (``forward_plan``/``backward_plan``, which the executor in ``executor.py`` prefers: no
    Python between primitives, gate values computed once per direction)."""

    name = "native"

    def forward_plan(self, plan, x, num_segments, conv_weights, bn_weights, bn_biases, running_means,
                     running_vars, bn_modes, eps):
        codes = encode_plan(plan)
        out, saved, stats = _on_cpu_threads("forward", codes, x, lambda: torch.ops.aia_native.plan_forward(
            x, num_segments, list(codes), conv_weights, bn_weights, bn_biases, running_means,
            running_vars, bn_modes, eps))
        return out, list(saved), stats

    def backward_plan(self, plan, grad_out, x, num_segments, conv_weights, bn_weights, bn_modes, eps, saved,
                      bn_stats, needs):
        codes = encode_plan(plan)
        gx, d_conv, d_bn_w, d_bn_b = _on_cpu_threads("backward", codes, x, lambda: torch.ops.aia_native.plan_backward(
            grad_out, x, num_segments, list(codes), conv_weights, bn_weights, bn_modes, eps, saved,
            bn_stats, [int(n) for n in needs]))
        n = len(conv_weights)

        def grads(ts, params, flags):  # empty -> not computed; accumulation dtype -> the parameter's
            return [g if g is None or g.dtype == p.dtype else g.to(p.dtype)
                    for g, p in zip((_none_if_empty(t, flag) for t, flag in zip(ts, flags)), params)]

        return (gx if needs[0] else None, grads(d_conv, conv_weights, needs[1:1 + n]),
                grads(d_bn_w, bn_weights, needs[1 + n:1 + 2 * n]), grads(d_bn_b, bn_weights, needs[1 + 2 * n:]))

    def pool(self, v, weight, axes):
        out = torch.ops.aia_native.pool(v, *_weight_only(weight).gates(), axes)
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(axes))]

    def gate_forward(self, pooled, conv_weight, bn_mode, bn_weight, bn_bias, running_mean, running_var, eps):
        return GateForward(*torch.ops.aia_native.gate_forward(pooled, conv_weight, bn_mode, bn_weight, bn_bias,
                                                             running_mean, running_var, eps))

    def apply(self, v, weight, out):
        torch.ops.aia_native.apply(v, *_weight_only(weight).gates(), out)

    def weight_grad(self, v, upstream, weight):
        flat = _weight_only(weight)
        flat.add_upstream(upstream, v.dtype)
        grads = torch.ops.aia_native.weight_grad(v, *flat.upstreams(), *flat.gates())
        result, pos = [], 0
        for factor in weight.factors:
            result.append(list(grads[pos:pos + len(factor)]))
            pos += len(factor)
        return result

    def gate_backward(self, gate_grad, pooled, gate, bn_stats, conv_weight, bn_mode, bn_weight, eps, needs):
        grads = torch.ops.aia_native.gate_backward(gate_grad, pooled, gate.z, gate.scale_shift, bn_stats,
                                                   conv_weight, bn_mode, bn_weight, eps, [int(n) for n in needs])
        return GateGrads(*(_none_if_empty(g, n) for g, n in zip(grads, needs)))

    def input_grad(self, terms, out):
        flat = _Flat()
        for weight, upstream in terms:
            flat.add_weight(weight)
            flat.add_upstream(upstream, out.dtype)
        torch.ops.aia_native.input_grad(*flat.upstreams(), *flat.gates(), out)


# ---- fake (meta) kernels, so the ops trace under torch.compile and pass opcheck ----

def _register_fakes() -> None:
    lib = "aia_native::"

    def acc(v):
        return torch.float64 if v.dtype == torch.float64 else torch.float32

    @torch.library.register_fake(lib + "pool")
    def _(v, gate_z, gate_ss, gate_axes, weight_desc, axes, with_argmax=True):
        out = []
        for axis in axes:
            shape = gate_shape(v.shape, axis)
            out.append(v.new_empty((shape[0], 2, *shape[1:]), dtype=acc(v)))
            out.append(v.new_empty(shape if with_argmax else (0,), dtype=torch.int32))
        return out

    @torch.library.register_fake(lib + "apply")
    def _(v, gate_z, gate_ss, gate_axes, weight_desc, out):
        return None

    @torch.library.register_fake(lib + "weight_grad")
    def _(v, douts, up_grads, up_argmax, up_axes, up_counts, gate_z, gate_ss, gate_axes, weight_desc):
        return [v.new_empty(gate_shape(v.shape, axis), dtype=acc(v)) for axis in gate_axes]

    @torch.library.register_fake(lib + "input_grad")
    def _(douts, up_grads, up_argmax, up_axes, up_counts, gate_z, gate_ss, gate_axes, weight_desc, out):
        return None

    @torch.library.register_fake(lib + "update_running_stats")
    def _(stats, running_means, running_vars, num_batches_tracked, momentum, gates, counts):
        return None

    @torch.library.register_fake(lib + "gate_forward")
    def _(pooled, conv_weight, bn_mode, bn_weight, bn_bias, running_mean, running_var, eps):
        z = pooled.new_empty((pooled.shape[0], *pooled.shape[2:]))
        return z, pooled.new_empty(2), pooled.new_empty(2)

    @torch.library.register_fake(lib + "plan_forward")
    def _(x, num_segments, plan, conv_weights, bn_weights, bn_biases, running_means, running_vars, bn_modes, eps):
        v_shape = clip_shape(x.shape, num_segments)
        decoded = decode_plan(plan)
        recomputed = {g for stage in decoded.stages if stage.recompute for g in stage.gates}
        saved = []
        for g, axis in enumerate(decoded.gate_axes):
            shape = gate_shape(v_shape, axis)
            pooled = (shape[0], 2, *shape[1:])
            if g in recomputed:  # the backward pools its stage again: only scale_shift is kept
                shape = pooled = (0,)
            saved += [x.new_empty(pooled, dtype=acc(x)), x.new_empty(shape, dtype=torch.int32),
                      x.new_empty(shape, dtype=acc(x)), x.new_empty(2, dtype=acc(x))]
        return torch.empty_like(x), saved, x.new_empty((len(decoded.gate_axes), 2), dtype=acc(x))

    @torch.library.register_fake(lib + "plan_backward")
    def _(grad_out, x, num_segments, plan, conv_weights, bn_weights, bn_modes, eps, saved, bn_stats, needs):
        n = len(decode_plan(plan).gate_axes)

        def maybe(flag, shape):
            return x.new_empty(shape if flag else (0,), dtype=acc(x))
        return (torch.empty_like(x) if needs[0] else x.new_empty(0),
                [maybe(needs[1 + g], (1, 2, 3, 3, 3)) for g in range(n)],
                [maybe(needs[1 + n + g] and bn_modes[g] != 0, (1,)) for g in range(n)],
                [maybe(needs[1 + 2 * n + g] and bn_modes[g] != 0, (1,)) for g in range(n)])

    @torch.library.register_fake(lib + "gate_backward")
    def _(gate_grad, pooled, z, scale_shift, bn_stats, conv_weight, bn_mode, bn_weight, eps, needs):
        def maybe(flag, shape):
            return pooled.new_empty(shape if flag else (0,))
        return (maybe(needs[0], pooled.shape), maybe(needs[1], (1, 2, 3, 3, 3)),
                maybe(needs[2] and bn_mode != 0, (1,)), maybe(needs[3] and bn_mode != 0, (1,)))


# What the backend registry (aia_kernels/backends.py) reads from this module.
primitives = NativePrimitives()
