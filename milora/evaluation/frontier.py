"""The forgetting-learning frontier of a learning-rate grid, and forgetting compared at matched learning.

A method's grid on one seed is a curve: each learning rate gives a point (learning, forgetting). Methods that move
the base by different amounts at the same nominal rate are compared where they have learnt equally much, not at
their own selected rates: along each curve, from the smallest rate up, forgetting is interpolated linearly in
learning between the two grid points around the first rate that reaches a level. A level is comparable when every
curve brackets it: the smallest rate of each curve learns less (or exactly as much), some rate of each learns at
least as much.

Learning is "higher is better" (an accuracy); pass a loss negated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Point = tuple[float, float, float]  # (learning rate, learning, forgetting)


def forgetting_at(points: Iterable[Point], level: float) -> float:
    """Forgetting where the curve `points` first reaches `level` of learning, going up the learning rates; linear
    between the grid points around the crossing. NaN when the curve never reaches `level`, or is above it already
    at its smallest rate (the level is not bracketed: nothing says what a smaller rate forgets)."""
    curve = sorted(points)
    if not curve:
        return math.nan
    _, learn0, forget0 = curve[0]
    if learn0 >= level:
        return forget0 if learn0 == level else math.nan
    for (_, l_lo, f_lo), (_, l_hi, f_hi) in zip(curve, curve[1:], strict=False):
        if l_lo < level <= l_hi:
            return f_lo + (f_hi - f_lo) * (level - l_lo) / (l_hi - l_lo)
    return math.nan


def matched_range(curves: Iterable[Sequence[Point]]) -> tuple[float, float] | None:
    """The learning levels every curve brackets: from the highest learning at a curve's smallest rate to the lowest
    of the curves' best learning; None when that range is empty."""
    curves = [sorted(c) for c in curves if c]
    if not curves:
        return None
    low = max(c[0][1] for c in curves)
    high = min(max(p[1] for p in c) for c in curves)
    return (low, high) if high > low else None


def matched_levels(curves: Iterable[Sequence[Point]], n: int = 3) -> list[float]:
    """`n` learning levels evenly spread over the upper part of `matched_range`: its top (exactly, so that it stays
    bracketed) and `n - 1` below it, its bottom excluded; [] when no level is common."""
    span = matched_range(curves)
    if span is None or n < 1:
        return []
    low, high = span
    return [low + (high - low) * k / n for k in range(1, n)] + [high]
