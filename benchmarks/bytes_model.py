"""How many bytes an AIA variant *must* move: the roofline's numerator."""
from __future__ import annotations

import math

import torch

from aia_kernels.plan import build_plan

MODES = ("fwd-infer", "fwd-train", "fwd-bwd")


def design_passes(variant: str, mode: str) -> dict[str, int]:
    """Full-size tensor passes that the fused design of ``variant`` needs, from its plan.

    One *pass* is one read or one write of a tensor the size of the input
    (``x.numel() * x.element_size()`` bytes). Small tensors (pooled maps, gates,
    argmax, conv/BN parameters and statistics) are ignored: they are a factor of
    C or T*H*W smaller than the input.

    Forward (``fwd-infer`` and ``fwd-train``, which differ only in small tensors):
      - one read of ``v`` per pool stage of the plan (``len(plan.stages)``),
      - ``apply``: one read of ``v`` and one write of ``out`` (2).
    Backward (added for ``fwd-bwd``):
      - the output weight's ``weight_grad``: read ``dout`` and ``v`` (2),
      - one read of ``v`` for the ``weight_grad`` of every stage whose weight has
        factors (a stage pooling plain ``v`` has no gate gradient to propagate),
      - ``input_grad``: read ``dout``, write ``grad_x`` (2); the stages' terms are
        expanded on the fly from small pooled gradients,
      - one read of ``v`` per stage the backward recomputes (``Stage.recompute``: the
        T, H, W stages, pooled again instead of kept; docs/design.md, "Memory").

    Returns ``{"forward": f, "backward": b, "total": f + b}``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    plan = build_plan(variant)
    forward = len(plan.stages) + 2
    backward = 0
    if mode == "fwd-bwd":
        backward = (2 if plan.output.factors else 0) \
            + sum(1 for stage in plan.stages if stage.weight.factors) + 2 \
            + sum(1 for stage in plan.stages if stage.recompute)
    return {"forward": forward, "backward": backward, "total": forward + backward}


def design_bytes(variant: str, shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    """Bytes the design must move for one call: passes x one full-size tensor."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return design_passes(variant, mode)["total"] * math.prod(shape) * element_size


def copy_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes ``x.clone()`` moves: one read and one write of ``x`` (the roofline's reference)."""
    return 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
