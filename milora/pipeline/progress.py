"""A pipeline run's progress as one number from 0 to 100 (the flow's progress artifact): each step an equal
share, the train step moved within its share by the train stage's own progress file."""

from __future__ import annotations

import json
import os

from milora.pipeline.paths import Paths


def span(steps: list[str], step: str) -> tuple[float, float]:
    """Where `step`'s share of the progress bar starts and ends (percent)."""
    i, n = steps.index(step), len(steps)
    return 100.0 * i / n, 100.0 * (i + 1) / n


def within(span: tuple[float, float], fraction: float) -> float:
    """The progress `fraction` (0..1) of the way through `span`."""
    lo, hi = span
    return lo + (hi - lo) * fraction


def clamp(value: float) -> float:
    """`value` bounded to 0..100."""
    return max(0.0, min(100.0, value))


def train_fraction(root: str | os.PathLike[str], since: float) -> float | None:
    """Training progress from `checkpoints/progress.json` (written by the train stage at each log), if written
    after `since` (a file left by an earlier run says nothing about this one)."""
    path = Paths(root).checkpoints_dir / "progress.json"
    try:
        if path.stat().st_mtime < since:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return min(1.0, float(data["step"]) / float(data["max_steps"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
