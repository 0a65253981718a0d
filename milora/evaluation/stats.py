"""Statistics of a comparison, each interval meaning what it says:

* `t_interval`: a mean over seeds and its Student-t interval (few seeds: wide, as it should be);
* `wilson`: one proportion (an accuracy on n test items) and its Wilson score interval, the item sampling that a
  spread over seeds does not show (three seeds that all score 61/68 are not "0.897 ± 0");
* `paired_t`: a difference between two methods run on the same seeds, Student-t over the per-seed differences;
* `two_level_bootstrap`: a difference of two (seeds, examples) score tables, resampling the seeds and the test
  items (crossed: every seed was scored on the same items, so one draw of the items serves every drawn seed); for
  few seeds, where the item sampling matters as much as the seeds.

A percentile bootstrap of a (3 seeds x 1 value) table is the min-max of the three values, which covers the mean
about 75 % of the time, not 95 %: one value per seed takes `paired_t`."""

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


def wilson(hits: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `hits / n` (`hits` may be a mean count, e.g. over seeds)."""
    from scipy.stats import norm

    if n <= 0:
        raise ValueError("wilson interval of no items")
    z = float(norm.ppf((1 + level) / 2))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Difference:
    """A paired difference `mean(a) - mean(b)`, its interval and how the interval was made (`method`)."""

    estimate: float
    ci_low: float
    ci_high: float
    method: str  # "paired t over seeds" | "two-level bootstrap": each constructor names its own

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict[str, float | bool | str]:
        """The numbers, for JSON."""
        return {"estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "significant": self.significant, "method": self.method}


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """`mean(a) - mean(b)` of two methods' values on the same seeds (`a[i]`, `b[i]`: seed i) with the Student-t
    interval of the per-seed differences; one seed has no spread to estimate (nan interval)."""
    if len(a) != len(b):
        raise ValueError(f"paired values must be as many for both methods, got {len(a)} and {len(b)}")
    s = t_interval([x - y for x, y in zip(a, b, strict=True)], level)
    return Difference(s.mean, s.ci_low, s.ci_high, "paired t over seeds")


def two_level_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = 10_000,
                        level: float = 0.95, seed: int = 0) -> Difference:
    """Difference of means of two paired score tables `a`, `b` of shape (seeds, examples): `a[i][j]` and `b[i][j]`
    are the two methods' scores of example j under seed i.

    Each replicate draws the seeds with replacement and the examples with replacement, the two levels crossed as
    the design is (every seed scored the same test items: one draw of the items for all drawn seeds; a draw per
    seed would treat each seed as having its own test set and understate the items' share), the same draws for
    both methods (the pairing is kept), and takes the difference of the means; the interval is the percentile
    interval of the replicates. With one example per seed it is a bootstrap over seeds alone (for 3 seeds the
    min-max: use `paired_t`). Deterministic for a given `seed`."""
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
    return Difference(float(d.mean()), float(lo), float(hi), "two-level bootstrap")
