"""The statistics behind every 95% interval meljax prints or stores (pure Python and numpy).

One implementation serves ``meljax eval`` (which stores intervals in its reports) and
``meljax report`` / ``meljax compare`` (which recompute them from the per-problem records when a
report stores none), so both give the same interval for the same records.

* :func:`wilson_interval` / :func:`proportion_interval`: a proportion of ``n`` Bernoulli
  outcomes (greedy Pass@1).
* :func:`mean_interval`: the mean of per-problem fractions in ``[0, 1]`` (Avg@k, Pass@k): a
  normal interval, or the Wilson interval when the values have no spread.
* :func:`paired_difference_interval`: the mean of per-problem differences in ``[-1, 1]``
  between two evaluations of the same problems (a normal interval).
* :func:`combined_interval`: the mean of independent estimates from their standard errors
  (the macro average over benchmarks).

Each interval comes with its standard error, the half-width over ``z`` before clipping, which
is what :func:`combined_interval` combines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile

__all__ = [
    "Z95",
    "combined_interval",
    "finite_mean",
    "mean",
    "mean_interval",
    "paired_difference_interval",
    "proportion_interval",
    "wilson_interval",
]


def mean(xs: Sequence[float]) -> float | None:
    """Arithmetic mean (numpy's pairwise sum), ``None`` for no values.

    numpy's summation, not ``sum``: the evaluation accuracies have always been computed so.
    """
    return float(np.mean(xs)) if len(xs) else None


def finite_mean(xs: Sequence[float]) -> float | None:
    """:func:`mean` of the values that are not NaN (a NaN marks a step without the metric)."""
    return mean([x for x in xs if not math.isnan(x)])


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``successes / n`` (``0 <= successes <= n``).

    The interval always contains ``successes / n`` and lies in ``[0, 1]``: rounding would
    otherwise leave 0 of n a hair above 0 and n of n a hair below 1.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(
            f"wilson_interval: need 0 <= successes <= n and n >= 1, got {successes}, {n}"
        )
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(p, max(0.0, center - half)), max(p, min(1.0, center + half))


def proportion_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float, float]:
    """``(low, high, se)``: :func:`wilson_interval` with ``se`` its half-width over ``z``."""
    lo, hi = wilson_interval(successes, n, z)
    return lo, hi, (hi - lo) / (2 * z)


def _normal(values: Sequence[float], z: float, bounds: tuple[float, float]):
    """``(mean, low, high, se)``: normal interval with the sample standard deviation (ddof 1)
    over ``sqrt(n)``, clipped to ``bounds``; ``se`` is 0 for a single value."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("mean interval of no values")
    m = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return m, max(bounds[0], m - z * se), min(bounds[1], m + z * se), se


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """``(low, high, se)`` of the mean of per-problem values in ``[0, 1]``.

    A normal interval over problems, clipped to ``[0, 1]`` (the samples of one problem are
    correlated, so the problem is the unit). When every value is the same (e.g. nothing
    solved, or one problem) the spread says nothing, so the Wilson interval of the mean over
    the problems is returned instead, with ``se`` its half-width over ``z``: a zero-width
    interval would claim certainty that a handful of problems cannot give.
    """
    m, lo, hi, se = _normal(values, z, (0.0, 1.0))
    if se == 0.0:
        return proportion_interval(m * len(values), len(values), z)
    return lo, hi, se


def paired_difference_interval(
    differences: Sequence[float], z: float = Z95
) -> tuple[float, float, float, float]:
    """``(mean, low, high, se)`` of per-problem differences in ``[-1, 1]`` (after - before).

    Pairing removes the between-problem variance that two separate intervals would count twice.
    A normal interval clipped to ``[-1, 1]``; no spread gives a zero-width interval (there is no
    Wilson analogue for a difference).
    """
    return _normal(differences, z, (-1.0, 1.0))


def combined_interval(
    value: float,
    standard_errors: Sequence[float],
    z: float = Z95,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[float, float, float]:
    """``(low, high, se)`` of ``value``, the unweighted mean of independent estimates with these
    standard errors: ``se = sqrt(sum se_i^2) / B``, the interval clipped to ``bounds``."""
    se = math.sqrt(sum(s * s for s in standard_errors)) / len(standard_errors)
    return max(bounds[0], value - z * se), min(bounds[1], value + z * se), se
