"""Benchmark evaluation: Pass@1 (greedy), Avg@k and Pass@k with 95% intervals.

* :mod:`~meljax.evaluation.stats`: the one implementation of every 95% interval.
* :mod:`~meljax.evaluation.metrics`: the pure estimators.
* :mod:`~meljax.evaluation.report`: :class:`EvalConfig`, per-problem records, the table, files.
* :mod:`~meljax.evaluation.benchmarks`: ``--benchmarks`` entries and loading.
* :mod:`~meljax.evaluation.run`: :func:`evaluate`, the policy's rollouts (G = 1 greedy, G = k
  sampled) scored by the verifier, exactly as in training.

``benchmarks`` and ``run`` load on first use: they import JAX, which the statistics and the
report readers (``meljax report``, ``meljax compare``) do not need.
"""

import importlib
from typing import Any

from meljax.evaluation.metrics import (
    BenchmarkMetrics,
    benchmark_metrics,
    macro_average,
    pass_at_k,
)
from meljax.evaluation.report import EvalConfig, EvalReport, ProblemRecord
from meljax.evaluation.stats import mean_interval, wilson_interval

_LAZY = {
    "BenchmarkSpec": "meljax.evaluation.benchmarks",
    "load_benchmarks": "meljax.evaluation.benchmarks",
    "parse_benchmark_specs": "meljax.evaluation.benchmarks",
    "evaluate": "meljax.evaluation.run",
}


def __getattr__(name: str) -> Any:
    """The JAX-side names (see the module docstring), imported when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BenchmarkMetrics",
    "BenchmarkSpec",
    "EvalConfig",
    "EvalReport",
    "ProblemRecord",
    "benchmark_metrics",
    "evaluate",
    "load_benchmarks",
    "macro_average",
    "mean_interval",
    "parse_benchmark_specs",
    "pass_at_k",
    "wilson_interval",
]
