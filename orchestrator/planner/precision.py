"""Which precision a group of cards trains in. The cards' compute capability decides what `auto` means."""

from __future__ import annotations


def resolve_precision(requested: str, cards) -> str:
    """auto: bf16 only if every card is sm_80+, fp16 if every card is sm_70+ (dynamic loss scaling), else fp32."""
    return precision_for(requested, min(c.compute_capability for c in cards))


def precision_for(requested: str, lowest: tuple[int, int]) -> str:
    """The precision cards down to compute capability `lowest` run (see resolve_precision)."""
    if requested != "auto":
        return requested
    return "bf16" if lowest >= (8, 0) else ("fp16" if lowest >= (7, 0) else "fp32")
