"""Statistics of a comparison: Student-t confidence intervals over seeds and paired-bootstrap intervals of
differences between methods (paired over seeds and examples)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and Student-t confidence interval of a sample."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        """Half the width of the confidence interval."""
        return (self.ci_high - self.ci_low) / 2

    def as_dict(self) -> dict[str, float]:
        """The numbers, for JSON."""
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci_low": self.ci_low, "ci_high": self.ci_high}


def t_interval(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean, sample std (n - 1) and the two-sided Student-t interval `mean ± t_{(1+level)/2, n-1} std / sqrt(n)`.

    One value has no spread to estimate: its interval is unbounded (nan)."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval of no values")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, float("nan"), float("nan"), float("nan"))
    std = float(x.std(ddof=1))
    half = float(t.ppf((1 + level) / 2, x.size - 1)) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """A paired difference `mean(a) - mean(b)` and its bootstrap percentile interval."""

    estimate: float
    ci_low: float
    ci_high: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict[str, float | bool]:
        """The numbers, for JSON."""
        return {"estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "significant": self.significant}


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = 10_000,
                     level: float = 0.95, seed: int = 0) -> Difference:
    """Difference of means of two paired score tables `a`, `b` of shape (seeds, examples): `a[i][j]` and `b[i][j]`
    are the two methods' scores of example j under seed i.

    Each replicate resamples the seeds and the examples with replacement, the same indices for both methods (so
    the pairing of seed and example across methods is kept), and takes the difference of the means; the interval
    is the percentile interval of the replicates. Deterministic for a given `seed`."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.size == 0:
        raise ValueError(f"paired tables must have the same (seeds, examples) shape, got {x.shape} and {y.shape}")
    d = x - y
    n_seeds, n_ex = d.shape
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for k in range(n_boot):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_ex, n_ex)
        reps[k] = d[np.ix_(rows, cols)].mean()
    alpha = (1 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return Difference(float(d.mean()), float(lo), float(hi))
