"""The one statistics module: its intervals at the edges, and `meljax report`'s fallback (intervals
recomputed from the records) equal to what `meljax eval` stores."""

from __future__ import annotations

import json
import math
import os

import pytest

from meljax.evaluation import stats
from meljax.evaluation.metrics import benchmark_metrics, macro_average
from meljax.evaluation.report import ProblemRecord
from meljax.report import heldout


def test_wilson_contains_the_proportion_exactly_at_the_edges():
    # Rounding alone gives 0 of 7 a low of ~3e-17 and 10 of 10 a high of 1 - 1e-16.
    for n in range(1, 200):
        assert stats.wilson_interval(0, n)[0] == 0.0
        assert stats.wilson_interval(n, n)[1] == 1.0
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        stats.wilson_interval(3, 2)


def test_mean_interval_without_spread_is_the_wilson_interval():
    # Nothing solved, everything solved, one problem: never a zero-width interval.
    assert stats.mean_interval([0.0, 0.0, 0.0])[:2] == stats.wilson_interval(0, 3)
    assert stats.mean_interval([1.0, 1.0])[:2] == stats.wilson_interval(2, 2)
    low, high, se = stats.mean_interval([0.5])
    assert (low, high) == stats.wilson_interval(0.5, 1) and se == (high - low) / (2 * stats.Z95)


def test_paired_difference_interval_is_normal_and_clipped():
    value, low, high, se = stats.paired_difference_interval([1.0, 0.0, 1.0])
    sd = math.sqrt(sum((x - 2 / 3) ** 2 for x in [1.0, 0.0, 1.0]) / 2)
    assert value == pytest.approx(2 / 3) and se == pytest.approx(sd / math.sqrt(3))
    assert low == pytest.approx(2 / 3 - stats.Z95 * se) and high == 1.0
    assert stats.paired_difference_interval([0.5, 0.5]) == (0.5, 0.5, 0.5, 0.0)


def test_combined_interval():
    low, high, se = stats.combined_interval(0.5, [0.1, 0.2])
    assert se == pytest.approx(math.sqrt(0.05) / 2)
    assert (low, high) == pytest.approx((0.5 - stats.Z95 * se, 0.5 + stats.Z95 * se))
    assert stats.combined_interval(0.02, [0.1])[0] == 0.0


def test_means():
    assert stats.mean([]) is None and stats.mean([1.0, 2.0]) == 1.5
    assert stats.finite_mean([1.0, math.nan, 3.0]) == 2.0
    assert stats.finite_mean([math.nan]) is None


def _records(name: str, greedy: list[bool], correct: list[int], k: int) -> list[ProblemRecord]:
    fixed = {"question": "q", "answer": "a", "prompt_tokens": 3, "greedy_tokens": 5}
    return [
        ProblemRecord(
            name,
            f"{name}{i}",
            greedy_correct=g,
            greedy_truncated=False,
            num_samples=k,
            num_correct=c,
            **fixed,
        )  # fmt: skip
        for i, (g, c) in enumerate(zip(greedy, correct, strict=True))
    ]


@pytest.mark.parametrize(
    "greedy_a, correct_a",
    [
        ([False] * 7, [0] * 7),  # nothing solved: the edge where the two sets of intervals split
        ([True] * 10, [4] * 10),  # everything solved
        ([True], [2]),  # one problem
        ([True, False, True, False, False], [1, 0, 4, 2, 0]),
    ],
)
def test_report_fallback_equals_the_stored_interval(tmp_path, greedy_a, correct_a):
    k = 4
    benches = {
        "a": _records("a", greedy_a, correct_a, k),
        "b": _records("b", [True, False, False], [3, 0, 1], k),
    }
    metrics = {name: benchmark_metrics(recs, k, (1,)) for name, recs in benches.items()}
    average = macro_average(list(metrics.values()))

    def bare(m):  # the report without its stored intervals
        return {key: v for key, v in m.to_json().items() if not key.endswith("_ci95")}

    os.makedirs(tmp_path / "eval")
    report = {"benchmarks": {n: bare(m) for n, m in metrics.items()}, "average": bare(average),
              "records_file": "step_0.records.jsonl"}  # fmt: skip
    (tmp_path / "eval" / "step_0.json").write_text(json.dumps(report))
    lines = [json.dumps(r.to_json()) for recs in benches.values() for r in recs]
    (tmp_path / "eval" / "step_0.records.jsonl").write_text("\n".join(lines) + "\n")

    got = heldout.read_heldout(str(tmp_path))[0]
    for name, stored in [*metrics.items(), (heldout.AVERAGE, average)]:
        assert (got[name].greedy.low, got[name].greedy.high) == stored.ci["pass@1"], name
        assert (got[name].sampled.low, got[name].sampled.high) == stored.ci[f"avg@{k}"], name
