"""Pure evaluation metrics: Pass@1 (greedy), Avg@k and Pass@k, their 95% intervals, averages.

* **Pass@1**: one greedy completion per problem; the fraction right, with a Wilson interval.
* **Avg@k**: ``k`` sampled completions per problem; the mean over problems of ``c / k``. The k
  samples of one problem are correlated (an easy problem gets many right), so the interval is a
  normal interval over the per-problem means, not a binomial one over all ``n k`` samples.
* **Pass@k**: the unbiased estimator of Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)``
  averaged over problems, with a normal interval over the per-problem estimates.
* **Macro average** over benchmarks (each weighs the same), with the interval of a mean of
  independent estimates, ``mean +- z sqrt(sum se_b^2) / B``, where ``se_b`` is each
  benchmark's interval half-width over z (so a 0% benchmark still counts its uncertainty).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from meljax.evaluation.stats import combined_interval, mean, mean_interval, proportion_interval

__all__ = [
    "BenchmarkMetrics",
    "benchmark_metrics",
    "macro_average",
    "pass_at_k",
]


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"pass_at_k: {name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    The probability that a random ``k``-subset of the ``n`` samples holds at least one correct
    one: ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` so
    that no large binomial is ever formed.

    Args:
      n: samples drawn (>= 1).
      c: correct samples, ``0 <= c <= n``.
      k: subset size, ``1 <= k <= n``.

    Returns:
      A float in ``[0, 1]``; exactly ``1.0`` when ``n - c < k`` (every subset has a correct one)
      and ``0.0`` when ``c == 0``.

    Raises:
      TypeError: a non-integer argument. ValueError: ``c`` or ``k`` out of range.
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (i - k) / i
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


@dataclasses.dataclass(frozen=True)
class BenchmarkMetrics:
    """Metrics of one benchmark (or their macro average); fractions in ``[0, 1]``.

    Attributes:
      num_problems: problems evaluated (for the average: the total over benchmarks).
      pass1: greedy accuracy, ``None`` without the greedy pass.
      avg: Avg@n, mean of ``c / n``; ``None`` without the sampled pass.
      pass_at: ``{k: Pass@k}`` from the ``n`` samples.
      num_samples: ``n``.
      greedy_truncated: fraction of greedy completions cut by ``max_new_tokens``.
      mean_greedy_tokens: mean greedy completion length (tokens).
      ci: 95% interval per reported metric name (``pass@1``, ``avg@n``, ``pass@k``).
      se: standard error per metric name (what the macro average's interval combines).
    """

    num_problems: int
    pass1: float | None
    avg: float | None
    pass_at: Mapping[int, float]
    num_samples: int
    greedy_truncated: float | None = None
    mean_greedy_tokens: float | None = None
    ci: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    se: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def names(self) -> dict[str, float | None]:
        """``{reported name: value}``: ``pass@1`` (greedy), ``avg@n``, ``pass@k``."""
        out: dict[str, float | None] = {"pass@1": self.pass1}
        if self.num_samples:
            out[f"avg@{self.num_samples}"] = self.avg
            for k, v in sorted(self.pass_at.items()):
                # Sampled pass@1 equals avg@n; name it apart from the greedy Pass@1.
                out["sampled_pass@1" if k == 1 else f"pass@{k}"] = v
        return out

    def to_json(self) -> dict[str, Any]:
        """Flat dict: ``pass@1``, ``avg@n``, ``pass@k`` and each one's ``<name>_ci95``."""
        out: dict[str, Any] = {"num_problems": self.num_problems}
        for name, value in self.names().items():
            out[name] = value
            if name in self.ci:
                out[f"{name}_ci95"] = list(self.ci[name])
        out["num_samples"] = self.num_samples
        out["greedy_truncated"] = self.greedy_truncated
        out["mean_greedy_tokens"] = self.mean_greedy_tokens
        return out


def benchmark_metrics(
    records: Sequence[Any], num_samples: int, pass_ks: Sequence[int]
) -> BenchmarkMetrics:
    """Pass@1, Avg@n and Pass@k of one benchmark's records (see the module docstring).

    ``records`` are :class:`meljax.evaluation.ProblemRecord`s (``greedy_correct``,
    ``num_samples``, ``num_correct``, ``greedy_truncated``, ``greedy_tokens``).
    """
    if not records:
        raise ValueError("benchmark_metrics: no records")
    greedy = [r for r in records if r.greedy_correct is not None]
    pass1 = mean([float(r.greedy_correct) for r in greedy])
    ci: dict[str, tuple[float, float]] = {}
    se: dict[str, float] = {}
    if greedy:
        lo, hi, s = proportion_interval(sum(bool(r.greedy_correct) for r in greedy), len(greedy))
        ci["pass@1"], se["pass@1"] = (lo, hi), s
    avg, pass_at = None, {}
    if num_samples:
        for r in records:
            if r.num_samples != num_samples:
                raise ValueError(
                    f"benchmark_metrics: problem {r.id!r} has {r.num_samples} samples, "
                    f"expected {num_samples}"
                )
        per_problem = {"avg": [r.num_correct / num_samples for r in records]}
        for k in pass_ks:
            per_problem[k] = [pass_at_k(num_samples, r.num_correct, k) for r in records]
        avg = mean(per_problem["avg"])
        pass_at = {k: mean(per_problem[k]) for k in pass_ks}
        for key, values in per_problem.items():
            name = (
                f"avg@{num_samples}"
                if key == "avg"
                else "sampled_pass@1"
                if key == 1
                else f"pass@{key}"
            )
            lo, hi, s = mean_interval(values)
            ci[name], se[name] = (lo, hi), s
    return BenchmarkMetrics(
        num_problems=len(records),
        pass1=pass1,
        avg=avg,
        pass_at=pass_at,
        num_samples=num_samples,
        greedy_truncated=mean([float(bool(r.greedy_truncated)) for r in greedy]),
        mean_greedy_tokens=mean([float(r.greedy_tokens or 0) for r in greedy]),
        ci=ci,
        se=se,
    )


def macro_average(metrics: Sequence[BenchmarkMetrics]) -> BenchmarkMetrics:
    """Unweighted mean over benchmarks of every metric; ``num_problems`` is the total."""
    if not metrics:
        raise ValueError("macro_average: no benchmarks")

    def avg_of(get: Callable[[BenchmarkMetrics], float | None]) -> float | None:
        values = [get(m) for m in metrics]
        return None if any(v is None for v in values) else mean(values)

    ks = sorted(set.intersection(*(set(m.pass_at) for m in metrics)))
    out = BenchmarkMetrics(
        num_problems=sum(m.num_problems for m in metrics),
        pass1=avg_of(lambda m: m.pass1),
        avg=avg_of(lambda m: m.avg),
        pass_at={k: mean([m.pass_at[k] for m in metrics]) for k in ks},
        num_samples=metrics[0].num_samples,
        greedy_truncated=avg_of(lambda m: m.greedy_truncated),
        mean_greedy_tokens=avg_of(lambda m: m.mean_greedy_tokens),
    )
    ci, se = {}, {}
    for name, value in out.names().items():
        parts = [m.se.get(name) for m in metrics]
        if value is None or any(p is None or math.isnan(p) for p in parts):
            continue
        lo, hi, s = combined_interval(value, parts)
        ci[name], se[name] = (lo, hi), s
    return dataclasses.replace(out, ci=ci, se=se)
