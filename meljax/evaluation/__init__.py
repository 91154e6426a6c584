"""Benchmark evaluation: Pass@1 (greedy), Avg@k and Pass@k with 95% intervals.

* :mod:`~meljax.evaluation.metrics`: the pure estimators and intervals.
* :mod:`~meljax.evaluation.report`: :class:`EvalConfig`, per-problem records, the table, files.
* :mod:`~meljax.evaluation.benchmarks`: ``--benchmarks`` entries and loading.
* :mod:`~meljax.evaluation.run`: :func:`evaluate`, the policy's rollouts (G = 1 greedy, G = k
  sampled) scored by the verifier, exactly as in training.
"""

from meljax.evaluation.benchmarks import BenchmarkSpec, load_benchmarks, parse_benchmark_specs
from meljax.evaluation.metrics import (
    BenchmarkMetrics,
    benchmark_metrics,
    macro_average,
    mean_interval,
    pass_at_k,
    wilson_interval,
)
from meljax.evaluation.report import EvalConfig, EvalReport, ProblemRecord
from meljax.evaluation.run import evaluate

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
