"""Small statistics shared by the alert engine and drift: one place for how a rate's noise is judged."""

from __future__ import annotations


def clamped_rate(p: float, n: float) -> float:
    """``p`` kept half an observation away from 0 and 1: a rate seen as 0% or 100% over ``n`` calls
    is not certainty, and a binomial standard error of exactly 0 would call any move significant."""
    edge = 0.5 / max(n, 1.0)
    return min(max(p, edge), 1.0 - edge)
