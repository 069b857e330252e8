"""The ten AIA variant names of the spec and what each is made of."""
from __future__ import annotations

# The four units and the gates each owns, in registration order (spec: C, T, H, W).
UNIT_GATES = {"C": "C", "ST": "THW", "CinST": "CTHW", "STinC": "CTHW"}
UNITS = tuple(UNIT_GATES)

# Spec order: singles, then combined variants as the spec lists them.
VARIANTS = ("C", "ST", "CinST", "STinC", "C->ST", "ST->C", "C+ST",
            "CinST->STinC", "STinC->CinST", "CinST+STinC")

COMBINATIONS = ("->", "+")


def parse_variant(variant: str) -> tuple[str | None, tuple[str, ...]]:
    """``"CinST->STinC"`` -> ``("->", ("CinST", "STinC"))``; ``"C"`` -> ``(None, ("C",))``."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"unknown AIA variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    for combine in COMBINATIONS:
        if combine in variant:
            first, second = variant.split(combine)
            return combine, (first, second)
    return None, (variant,)
