"""Drop-in AIA layers: the four units, the combined variants, and ``build``.

Parameter names, registration order and initialisation follow docs/semantics.md so that
the authors' checkpoints load with ``strict=True``. Every module runs on the
backend named by its ``backend`` attribute and records in ``last_backend`` which
backend actually ran.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import backends, reference
from .exporting import check_exportable, is_exporting
from .layouts import DEFAULT_5D_LAYOUT, DEFAULT_NUM_SEGMENTS, check_layout, from_clip_view, to_clip_view
from .module_tensors import registered
from .state_loading import AtomicLoadStateDict
from .sync_bn import gate_sync
from .validation import check_input, check_num_segments
from .variants import REGISTRATION_ORDER, UNIT_GATES, parse_variant
from .warnings_once import warn_once

# Per unit kind: each gate's (axis, conv name, BN name).
_GATE_NAMES = {kind: tuple((g, f"{g}_conv", f"{g}_bn") for g in gates) for kind, gates in UNIT_GATES.items()}


@torch.compiler.assume_constant_result
def _resolve_backend(requested: str, device: torch.device) -> str:
    """``backends.resolve``, which torch.compile runs while tracing and keeps as a constant:
    loading a backend (a build, its lock) is not something to trace into a graph."""
    return backends.resolve(requested, device)


class AIAModule(AtomicLoadStateDict, nn.Module):
    """Shared by units and combined variants: validation, backend dispatch, and a
    ``load_state_dict`` that loads everything or changes nothing (``state_loading.py``)."""

    variant: str
    combine: str | None = None

    def __init__(self, num_segments: int | None = None, use_BN: bool = True, layout: str | None = None,
                 recompute: bool = True):
        super().__init__()
        self.num_segments = num_segments
        self.layout = layout
        self.use_BN = bool(use_BN)
        self.recompute = recompute
        self.last_backend: str | None = None

    @property
    def recompute(self) -> bool:
        """Fused backends: the backward pools the T, H, W gates' inputs again from the module's
        input instead of keeping their pooled tensors, argmaxes and conv outputs (True, the
        default: about 1.0-1.13x the input kept for backward instead of 2.5-5x; one more read of
        the input per T, H, W stage in the backward). Same results bit for bit either way; the
        reference backend keeps what autograd keeps (docs/design.md, "Memory")."""
        return self._recompute

    @recompute.setter
    def recompute(self, recompute: bool) -> None:
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be True or False, got {recompute!r}")
        self._recompute = recompute

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = backends.check_backend_name(name)

    def __setstate__(self, state: dict) -> None:
        # A module pickled whole before 5-D input: num_segments was a plain attribute, no layout.
        if "num_segments" in state:
            state["_num_segments"] = state.pop("num_segments")
        state.setdefault("_layout", None)
        state.setdefault("_recompute", True)  # pickled before the recompute option
        super().__setstate__(state)

    @property
    def layout(self) -> str | None:
        """How a 5-D input is laid out: ``"NCTHW"`` (the Conv3d layout) or ``"NTCHW"``; the module
        then takes 5-D input only. None (the default): 4-D input is (N*T, C, H, W), 5-D is NCTHW."""
        return self._layout

    @layout.setter
    def layout(self, layout: str | None) -> None:
        self._layout = check_layout(layout)

    @property
    def num_segments(self) -> int | None:
        """T of a 4-D (N*T, C, H, W) input: as given, else 8 (None for a module with a ``layout``,
        which takes 5-D input only). A 5-D input carries its T; a ``num_segments`` given
        explicitly is checked against it."""
        if self._num_segments is not None:
            return self._num_segments
        return DEFAULT_NUM_SEGMENTS if self.layout is None else None

    @num_segments.setter
    def num_segments(self, num_segments: int | None) -> None:
        self._num_segments = None if num_segments is None else check_num_segments(num_segments)

    def units(self) -> list[tuple[str, "AIAUnit"]]:
        raise NotImplementedError

    def gates(self) -> list[tuple[str, nn.Conv3d, nn.BatchNorm3d | None]]:
        """Every gate's (axis, conv, bn) in state_dict order: the fused kernels' gate numbering."""
        # Read from the units' registered submodules: nn.Module.__getattr__ (and an
        # AttributeError per missing BN) cost a tenth of a small module's forward.
        return [(g, unit._modules[conv], unit._modules.get(bn))
                for kind, unit in self.units() for g, conv, bn in _GATE_NAMES[kind]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five_d = isinstance(x, torch.Tensor) and x.dim() == 5
        # The first gate's conv weight stands for the module's device (cheaper than parameters()).
        check_input(x, self._num_segments if five_d else self.num_segments, (registered(self.gates()[0][1], "weight"),),
                    self.layout)
        if is_exporting():  # plain aten ops for an exported graph (exporting.py)
            check_exportable(self.variant, [bn for _, _, bn in self.gates()])
            name = "reference"
        else:
            name = _resolve_backend(self.backend, x.device)
        if name != "reference" and torch.compiler.is_compiling() and self._syncs_bn_statistics():
            # The fused ops cannot carry a process group; eager mode syncs in the fused path (sync_bn.py).
            warn_once("sync-bn-compile", "aia_kernels: a gate BatchNorm is a SyncBatchNorm in training mode "
                      "across ranks; under torch.compile the fused backends do not sync its batch statistics, "
                      "so this module runs the reference path")
            name = "reference"
        self._record_backend(name)
        if not five_d:
            return self._run(x, self.num_segments, name)
        # Every backend gets the (N, T, C, H, W) view of a 5-D input (docs/design.md, "Input layouts").
        layout = self.layout or DEFAULT_5D_LAYOUT
        v = to_clip_view(x, layout)
        return from_clip_view(self._run(v, v.shape[1], name), layout)

    def _run(self, x: torch.Tensor, num_segments: int, name: str) -> torch.Tensor:
        """The variant on ``x``, (N*T, C, H, W) or the (N, T, C, H, W) view, on backend ``name``."""
        if name == "reference":
            return reference.aia_forward(x, num_segments, self.combine, self.units())
        from .fused import fused_forward
        return fused_forward(self, x, name)

    def _record_backend(self, name: str) -> None:
        if self.__dict__.get("last_backend") != name:  # nn.Module.__setattr__ costs a few us a call
            self.last_backend = name

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        # The checkpoint's version of this module, None where it has no entry for it: load
        # post-hooks read it to tell aia_kernels 0.1's unit order from the current one.
        self.__dict__["_checkpoint_version"] = local_metadata.get("version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def _syncs_bn_statistics(self) -> bool:
        """A gate BN is a training SyncBatchNorm (torch's, or one marked ``is_sync_batchnorm``)
        and torch.distributed runs more than one rank."""
        return gate_sync([bn for _, _, bn in self.gates()]) is not None

    def extra_repr(self) -> str:
        layout = "" if self.layout is None else f", layout={self.layout!r}"
        recompute = "" if self.recompute else ", recompute=False"
        return (f"variant={self.variant!r}, num_segments={self.num_segments}{layout}, "
                f"use_BN={self.use_BN}, backend={self.backend!r}{recompute}")


class AIAUnit(AIAModule):
    """One unit; subclasses set ``kind``. Registers ``G_conv`` (and ``G_bn``) per gate."""

    kind: str

    def __init__(self, num_segments: int | None = None, use_BN: bool = True, backend: str = "auto",
                 layout: str | None = None, recompute: bool = True):
        super().__init__(num_segments, use_BN, layout, recompute)
        self.backend = backend
        self.variant = self.kind
        for g in UNIT_GATES[self.kind]:
            self.add_module(f"{g}_conv", nn.Conv3d(2, 1, kernel_size=3, padding=1, bias=False))
            if self.use_BN:
                self.add_module(f"{g}_bn", nn.BatchNorm3d(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's initialisation (docs/semantics.md, "Parameters, state_dict keys,
        initialisation")."""
        for g in UNIT_GATES[self.kind]:
            conv = getattr(self, f"{g}_conv")
            if self.kind == "STinC" and g == "C" or self.kind == "CinST" and g in "TH":
                nn.init.xavier_normal_(conv.weight)
            elif self.kind == "CinST" and g == "W":
                conv.reset_parameters()  # PyTorch's default Conv3d init
            else:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            bn = getattr(self, f"{g}_bn", None)
            if bn is not None:
                bn.reset_parameters()  # weight 1, bias 0, fresh running statistics

    def units(self):
        return [(self.kind, self)]


class C(AIAUnit):
    """Channel unit: ``Y_C(v) * v``."""
    kind = "C"


class ST(AIAUnit):
    """Spatio-temporal unit: ``Y_ST(v) * v``."""
    kind = "ST"


class CinST(AIAUnit):
    """Channel context inside spatio-temporal attention: ``Y_ST(Y_C(v) * v) * v``."""
    kind = "CinST"


class STinC(AIAUnit):
    """Spatio-temporal context inside channel attention: ``Y_C(Y_ST(v) * v) * v``."""
    kind = "STinC"


UNIT_CLASSES = {cls.kind: cls for cls in (C, ST, CinST, STinC)}


class AIACombined(AIAModule):
    """``A->B`` (``B(A(x))``) or ``A+B`` (``0.5*A(x) + 0.5*B(x)``), units named ``eft1``, ``eft2``
    in the order of ``variants.parse_variant`` (``CinST+STinC``: eft1 = STinC, as the authors').

    The two units run as one fused op, so they share one backend: ``backend`` reads and sets
    both units' (a network may expose the units themselves, see ``models.resnet``).
    """

    # 2: CinST+STinC registers eft1 = STinC, eft2 = CinST. 1 (aia_kernels 0.1): eft1 = CinST.
    _version = 2

    def __init__(self, variant: str, num_segments: int | None = None, use_BN: bool = True, backend: str = "auto",
                 layout: str | None = None, recompute: bool = True):
        super().__init__(num_segments, use_BN, layout, recompute)
        combine, (first, second) = parse_variant(variant)
        if combine is None:
            raise ValueError(f"{variant!r} is a single unit; use aia_kernels.build")
        self.variant, self.combine = variant, combine
        self.eft1 = UNIT_CLASSES[first](num_segments, use_BN, backend, layout, recompute)
        self.eft2 = UNIT_CLASSES[second](num_segments, use_BN, backend, layout, recompute)
        if variant in REGISTRATION_ORDER:
            self.register_load_state_dict_post_hook(_load_old_unit_order)

    @property
    def backend(self) -> str:
        first, second = self.eft1.backend, self.eft2.backend
        if first != second:
            raise ValueError(f"the units of a combined AIA variant run as one fused op, but eft1 asks for "
                             f"backend {first!r} and eft2 for {second!r}; set one backend on both "
                             f"(module.backend = ... sets both)")
        return first

    @backend.setter
    def backend(self, name: str) -> None:
        self.eft1.backend = self.eft2.backend = name

    def _record_backend(self, name: str) -> None:
        for module in (self, self._modules["eft1"], self._modules["eft2"]):
            AIAModule._record_backend(module, name)

    def units(self):
        first, second = self._modules["eft1"], self._modules["eft2"]
        return [(first.kind, first), (second.kind, second)]



def _load_old_unit_order(module: AIACombined, incompatible_keys) -> None:
    """Load post-hook of a standalone ``CinST+STinC``: a checkpoint whose metadata gives it
    version 1 was saved by aia_kernels 0.1 (eft1 = CinST); the loaded unit states are swapped.
    A state_dict without metadata is read in the current layout."""
    version = module.__dict__.pop("_checkpoint_version", None)
    if version is not None and version < AIACombined._version:
        swap_unit_states(module.eft1, module.eft2)
        warn_old_unit_order(module.variant)


def swap_unit_states(first: nn.Module, second: nn.Module) -> None:
    """Exchange the values of every parameter and buffer of two units of one kind of layout
    (the same gate names), in place: parameter objects (and an optimizer holding them) stay."""
    a, b = first.state_dict(keep_vars=True), second.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in a:
            kept = a[key].detach().clone()
            a[key].copy_(b[key])
            b[key].copy_(kept)


def warn_old_unit_order(variant: str) -> None:
    """One message for every block of a network (warnings shows a repeated message once)."""
    first, second = parse_variant(variant)[1]
    warnings.warn(f"aia_kernels: the checkpoint's {variant} units were saved by aia_kernels 0.1, whose eft1 "
                  f"held the {second} unit; they were loaded into the current layout (eft1 = {first}, eft2 = "
                  f"{second}, as the authors' code). Save the model again to store the current layout.",
                  RuntimeWarning, stacklevel=4)


def runs_aia(module: nn.Module) -> AIAModule | None:
    """The AIA module that ``module`` stands for: itself if it is one, or a combined module
    that it exposes as ``attention`` without registering it (over units it registers itself,
    as ``models.Bottleneck`` does so that names stay the authors' ``eft1``/``eft2``)."""
    if isinstance(module, AIAModule):
        return module
    held = getattr(module, "attention", None)
    if isinstance(held, AIAModule) and all(held is not child for child in module.children()):
        return held
    return None


def aia_modules(model: nn.Module) -> list[tuple[str, AIAModule]]:
    """(name, module) of every AIA module ``model`` runs, each once: units, and combined
    modules (named after the block that holds them, see :func:`runs_aia`), not the units of
    a combined module on their own."""
    found: list[tuple[str, AIAModule]] = []
    covered: set[int] = set()
    for name, module in model.named_modules():  # pre-order: a block comes before its units
        aia = runs_aia(module)
        if aia is not None and id(aia) not in covered:
            found.append((name, aia))
            covered.update(id(m) for m in aia.modules())
    return found


def build(variant: str, num_segments: int | None = None, use_BN: bool = True, backend: str = "auto",
          layout: str | None = None, recompute: bool = True) -> AIAModule:
    """The AIA module for one of ``aia_kernels.VARIANTS``.

    Input: (N*T, C, H, W) with T = ``num_segments`` (8 when not given), or 5-D, (N, C, T, H, W)
    by default, T read from the tensor. ``layout="NCTHW"`` or ``"NTCHW"``: 5-D input only, in
    that layout. A ``num_segments`` given explicitly is checked against a 5-D input's T.
    ``recompute=False`` keeps every gate's tensors for the backward: faster backward, more
    memory (:attr:`AIAModule.recompute`)."""
    combine, units = parse_variant(variant)
    if combine is None:
        return UNIT_CLASSES[units[0]](num_segments, use_BN, backend, layout, recompute)
    return AIACombined(variant, num_segments, use_BN, backend, layout, recompute)
