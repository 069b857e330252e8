"""The ten AIA variant names of the spec and what each is made of."""
from __future__ import annotations

# The four units and the gates each owns, in registration order (spec: C, T, H, W).
UNIT_GATES = {"C": "C", "ST": "THW", "CinST": "CTHW", "STinC": "CTHW"}
UNITS = tuple(UNIT_GATES)

# Spec order: singles, then combined variants as the spec lists them.
VARIANTS = ("C", "ST", "CinST", "STinC", "C->ST", "ST->C", "C+ST",
            "CinST->STinC", "STinC->CinST", "CinST+STinC")

COMBINATIONS = ("->", "+")

# A combined variant registers its units as eft1, eft2 in name order (A, B), except where the
# authors' network file orders them otherwise: their only CinST+STinC network is
# `STinCplusCinST`, whose eft1 is the STinC unit. The parallel mean is symmetric, so only the
# checkpoint keys depend on this; both units own the same gate names, so a wrong order loads
# strictly and computes wrong outputs.
REGISTRATION_ORDER = {"CinST+STinC": ("STinC", "CinST")}


def parse_variant(variant: str) -> tuple[str | None, tuple[str, ...]]:
    """The combination and the units in registration order (eft1, eft2):
    ``"CinST->STinC"`` -> ``("->", ("CinST", "STinC"))``; ``"CinST+STinC"`` ->
    ``("+", ("STinC", "CinST"))``; ``"C"`` -> ``(None, ("C",))``."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"unknown AIA variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    for combine in COMBINATIONS:
        if combine in variant:
            return combine, REGISTRATION_ORDER.get(variant, tuple(variant.split(combine)))
    return None, (variant,)
