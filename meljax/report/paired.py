"""The paired held-out difference of two arms and its 95% intervals (:func:`paired_difference`).

The statistics behind ``meljax compare --arm``: given, per seed, the B-minus-A differences per
problem (``meljax.report.arms.compare_arms`` pairs the runs of two arms by seed and collects
them), the estimate and three intervals below; and Student's t quantile (:func:`t_quantile`)
they use. Pure arithmetic on floats: no run folders.

B minus A, A the first arm
--------------------------

For every paired seed ``s`` the last held-out evaluation the two runs share (normally both
runs' last) gives one *cell* per problem ``p`` evaluated by both::

    d[s, p] = correct_B(s, p) - correct_A(s, p)

with ``correct`` the greedy correctness (0 or 1) or the fraction of correct samples (Avg@k).
With ``S`` paired seeds, ``P_s`` problems in seed ``s``, ``m_s = mean_p d[s, p]``:

* **estimate**: the mean over all cells, ``mean_{s,p} d[s, p]`` (the mean of the ``m_s``
  when every seed has the same problems, as it has for runs of one config).
* **two-level interval** (the headline): ``mean_s m_s +- z * se`` with
  ``se^2 = var_s(m_s) / S + (1 / S^2) sum_s var_p(d[s, .]) / P_s``: the between-seed variance
  of the seed means plus the within-seed (problem) variance of each seed's mean; ``z`` the
  normal 97.5% quantile. ``var_s(m_s)`` already holds each seed's problem noise, so the within
  term counts it a second time: a little conservative, which partly makes up for taking the
  between term, estimated from ``S`` seeds, at a normal quantile. ``None`` with one seed.
* **(a) over seeds**: ``mean_s m_s +- t(S - 1) * sd_s(m_s) / sqrt(S)``, Student's t with
  ``S - 1`` degrees of freedom. Treats the seed as the unit, so it answers "would another
  training seed give the same difference" without assuming anything about problems; honest
  but wide for few seeds (``t = 4.30`` for 3 seeds, ``12.7`` for 2). ``None`` with one seed.
* **(b) over cells**: ``mean +- z * sd_{s,p}(d) / sqrt(sum_s P_s)``
  (``stats.paired_difference_interval``), every (seed, problem) cell taken as independent.
  Counts the problem variance but ignores that one seed's cells share one trained model: too
  narrow when seeds differ more than their problems' noise explains.

Both (a) and (b) are reported beside the two-level interval because each is right under one
reading: (a) when the seed-to-seed spread is the uncertainty that matters (it is what a
reviewer asks for), (b) when the runs differ only by sampling noise on the problems. When the
three agree on the sign the comparison has decided; when only (b) excludes zero the
difference may be a seed effect. All intervals are clipped to ``[-1, 1]``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from meljax.evaluation.stats import Z95, mean, paired_difference_interval

__all__ = ["T975", "paired_difference", "t_quantile"]

# Two-sided 95% quantiles of Student's t, t(0.975, df) for df = 1..30 (scipy.stats.t.ppf to 4
# decimals; scipy is not a dependency of meljax). Above 30: the Cornish-Fisher expansion.
T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95%) for ``df >= 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile: need df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


def _interval(center: float, se: float, q: float) -> dict[str, float]:
    return {"value": center, "low": max(-1.0, center - q * se),
            "high": min(1.0, center + q * se), "se": se}  # fmt: skip


def paired_difference(cells: Mapping[Any, Sequence[float]]) -> dict[str, Any] | None:
    """The estimate and the three 95% intervals of the module docstring.

    Args:
      cells: ``{seed: [B minus A per problem]}``; seeds without cells are left out.

    Returns:
      ``None`` without any cell; else ``value`` (mean over cells), ``seeds`` / ``cells`` (counts),
      ``seed_means`` (``[{"seed", "value", "n"}]``), ``between_var`` (``var_s(m_s) / S``),
      ``within_var`` (``sum_s var_p / P_s / S^2``), and the intervals ``two_level``,
      ``over_seeds`` (with ``df`` and ``t``) and ``over_cells``, each ``{"value", "low",
      "high", "se"}`` or ``None``.
    """
    used = {s: [float(x) for x in d] for s, d in cells.items() if len(d)}
    if not used:
        return None
    flat = [x for d in used.values() for x in d]
    value, lo, hi, se = paired_difference_interval(flat)
    seed_means = {s: mean(d) for s, d in used.items()}
    out: dict[str, Any] = {
        "value": value,
        "seeds": len(used),
        "cells": len(flat),
        "seed_means": [{"seed": s, "value": m, "n": len(used[s])} for s, m in seed_means.items()],
        "between_var": None,
        "within_var": None,
        "two_level": None,
        "over_seeds": None,
        "over_cells": {"value": value, "low": lo, "high": hi, "se": se},
    }
    n_seeds = len(used)
    if n_seeds < 2:
        return out
    center = mean(list(seed_means.values()))
    between = statistics.variance(seed_means.values()) / n_seeds
    within = sum(statistics.variance(d) / len(d) for d in used.values() if len(d) > 1)
    within /= n_seeds * n_seeds
    t = t_quantile(n_seeds - 1)
    out["between_var"], out["within_var"] = between, within
    out["two_level"] = _interval(center, math.sqrt(between + within), Z95)
    out["over_seeds"] = _interval(center, math.sqrt(between), t) | {"df": n_seeds - 1, "t": t}
    return out
