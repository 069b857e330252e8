"""Drop-in AIA layers: the four units, the combined variants, and ``build``.

Parameter names, registration order and initialisation follow docs/semantics.md so that
the authors' checkpoints load with ``strict=True``. Every module runs on the
backend named by its ``backend`` attribute and records in ``last_backend`` which
backend actually ran.
"""
from __future__ import annotations

import torch
from torch import nn

from . import backends, reference
from .validation import check_input, check_num_segments
from .variants import UNIT_GATES, parse_variant


class AIAModule(nn.Module):
    """Shared by units and combined variants: validation and backend dispatch."""

    variant: str
    combine: str | None = None

    def __init__(self, num_segments: int = 8, use_BN: bool = True, backend: str = "auto"):
        super().__init__()
        self.num_segments = check_num_segments(num_segments)
        self.use_BN = bool(use_BN)
        self.backend = backend
        self.last_backend: str | None = None

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = backends.check_backend_name(name)

    def units(self) -> list[tuple[str, "AIAUnit"]]:
        raise NotImplementedError

    def gates(self) -> list[tuple[str, nn.Conv3d, nn.BatchNorm3d | None]]:
        """Every gate's (axis, conv, bn) in state_dict order: the fused kernels' gate numbering."""
        return [(g, getattr(unit, f"{g}_conv"), getattr(unit, f"{g}_bn", None))
                for kind, unit in self.units() for g in UNIT_GATES[kind]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_segments, self.parameters())
        name = backends.resolve(self.backend, x.device)
        if name != "reference" and self._syncs_bn_statistics():
            backends.warn_once("sync-bn", "aia_kernels: a gate BatchNorm is a SyncBatchNorm in training mode "
                               "across ranks; the fused backends would not sync its batch statistics, so "
                               "this module runs the reference path")
            name = "reference"
        self.last_backend = name
        if name == "reference":
            return reference.aia_forward(x, self.num_segments, self.combine, self.units())
        from .fused import fused_forward
        return fused_forward(self, x, name)

    def _syncs_bn_statistics(self) -> bool:
        """A gate BN is a training SyncBatchNorm (torch's, or one marked ``is_sync_batchnorm``)
        and torch.distributed runs more than one rank."""
        dist = torch.distributed
        return (dist.is_available() and dist.is_initialized()
                and any((isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "is_sync_batchnorm", False)) and bn.training
                        and dist.get_world_size(bn.process_group) > 1 for _, _, bn in self.gates()))

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, num_segments={self.num_segments}, "
                f"use_BN={self.use_BN}, backend={self.backend!r}")


class AIAUnit(AIAModule):
    """One unit; subclasses set ``kind``. Registers ``G_conv`` (and ``G_bn``) per gate."""

    kind: str

    def __init__(self, num_segments: int = 8, use_BN: bool = True, backend: str = "auto"):
        super().__init__(num_segments, use_BN, backend)
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
    """``A->B`` (``B(A(x))``) or ``A+B`` (``0.5*A(x) + 0.5*B(x)``), units named ``eft1``, ``eft2``."""

    def __init__(self, variant: str, num_segments: int = 8, use_BN: bool = True, backend: str = "auto"):
        super().__init__(num_segments, use_BN, backend)
        combine, (first, second) = parse_variant(variant)
        if combine is None:
            raise ValueError(f"{variant!r} is a single unit; use aia_kernels.build")
        self.variant, self.combine = variant, combine
        self.eft1 = UNIT_CLASSES[first](num_segments, use_BN, backend)
        self.eft2 = UNIT_CLASSES[second](num_segments, use_BN, backend)

    def units(self):
        return [(self.eft1.kind, self.eft1), (self.eft2.kind, self.eft2)]


def build(variant: str, num_segments: int = 8, use_BN: bool = True, backend: str = "auto") -> AIAModule:
    """The AIA module for one of ``aia_kernels.VARIANTS``."""
    combine, units = parse_variant(variant)
    if combine is None:
        return UNIT_CLASSES[units[0]](num_segments, use_BN, backend)
    return AIACombined(variant, num_segments, use_BN, backend)
