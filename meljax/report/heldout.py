"""Held-out evaluation results of a run: reading them and their 95% intervals.

A training run with ``eval.every_steps`` (or an evaluation at the start) writes one report per
evaluation, ``WORKDIR/eval/step_<N>.json``, with its per-problem records beside it
(``step_<N>.records.jsonl``). This module turns them into, per step and benchmark, the greedy
accuracy (Pass@1) and the sampled accuracy at the evaluation temperature (Avg@k), each with a
95% interval:

* read from the report when it stores one (keys ``<metric>_ci95`` / ``<metric>_ci`` as
  ``[low, high]`` or ``{"low", "high"}``, or a ``ci95`` / ``ci`` dict by metric);
* otherwise computed from the records by :mod:`meljax.evaluation.stats`, as ``meljax eval``
  computes the ones it stores (so both agree): a Wilson interval for the greedy accuracy (one
  Bernoulli outcome per problem), a mean interval over problems for Avg@k (each problem's
  fraction of correct samples), and for the macro average over benchmarks the interval of a
  mean of independent estimates.

The gain between two evaluations of the same problems (:func:`paired_gain`) is the mean of the
per-problem differences with a paired interval (``stats.paired_difference_interval``). Without
report files, the ``eval/...`` metrics of ``metrics.jsonl`` give the curves (without intervals).
The plot panel is :func:`meljax.report.heldout_panel.draw_heldout`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from meljax.evaluation.stats import (
    Z95,
    combined_interval,
    mean,
    mean_interval,
    paired_difference_interval,
    proportion_interval,
)

__all__ = [
    "AVERAGE",
    "Estimate",
    "HeldOut",
    "before_after",
    "before_after_text",
    "gain_for",
    "paired_gain",
    "read_heldout",
]

AVERAGE = "average"  # the macro average over benchmarks, as in the eval reports
_STEP_FILE = re.compile(r"step_(\d+)\.json$")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A fraction in ``[0, 1]`` (or a difference of two) with its 95% interval.

    ``low`` / ``high`` are ``None`` when nothing gives an interval (a metrics-only value).
    ``se`` is the standard error when computed here; for a stored interval, its half-width over
    ``Z95`` stands in (:meth:`standard_error`).
    """

    value: float
    low: float | None = None
    high: float | None = None
    n: int = 0  # problems behind it
    se: float | None = None

    def standard_error(self) -> float | None:
        """``se``, else the interval's half-width over ``Z95``; None without an interval."""
        if self.se is not None:
            return self.se
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / (2 * Z95)

    def text(self, signed: bool = False) -> str:
        """``"41.0% [34.5, 47.8]"`` (percent points; ``signed``: ``"+14.0 [...]"``)."""
        head = f"{100 * self.value:+.1f}" if signed else f"{100 * self.value:.1f}%"
        if self.low is None or self.high is None:
            return head
        return f"{head} [{100 * self.low:.1f}, {100 * self.high:.1f}]"

    def to_json(self) -> dict[str, Any]:
        """``value``, ``low``, ``high``, ``n`` (the standard error is internal)."""
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """One benchmark (or the average) at one evaluation step.

    Attributes:
      greedy: greedy accuracy (Pass@1); sampled: Avg@k at the evaluation temperature.
      num_samples: k of the sampled pass (0 without it).
      per_problem: ``{problem id: (greedy correct or None, fraction of samples correct or
        None)}``; empty for the average and for metrics-only results.
    """

    step: int
    benchmark: str
    greedy: Estimate | None
    sampled: Estimate | None
    num_samples: int = 0
    per_problem: Mapping[str, tuple[float | None, float | None]] = dataclasses.field(
        default_factory=dict, repr=False
    )

    def get(self, kind: str) -> Estimate | None:
        """``kind``: ``"greedy"`` or ``"sampled"``."""
        return {"greedy": self.greedy, "sampled": self.sampled}[kind]

    def text(self) -> str:
        """``greedy 44.5% [37.7, 51.3], avg@2 30.5% [25.4, 35.6]``."""
        parts = [f"greedy {self.greedy.text()}"] if self.greedy is not None else []
        if self.sampled is not None:
            parts.append(f"avg@{self.num_samples} {self.sampled.text()}")
        return ", ".join(parts) or "no result"


# -- reading


def _stored_interval(metrics: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """An interval the report stores for ``key`` (several spellings; see the module doc)."""
    candidates = [metrics.get(f"{key}_ci95"), metrics.get(f"{key}_ci")]
    for group in ("ci95", "ci"):
        if isinstance(metrics.get(group), Mapping):
            candidates.append(metrics[group].get(key))
    for c in candidates:
        if isinstance(c, Mapping):
            c = (c.get("low", c.get("lo")), c.get("high", c.get("hi")))
        if (
            isinstance(c, list | tuple)
            and len(c) == 2
            and all(isinstance(x, int | float) for x in c)
        ):
            return float(c[0]), float(c[1])
    return None


def _read_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # torn last line of a run killed mid-write
    return out


def _per_problem(records: Sequence[dict]) -> dict[str, tuple[float | None, float | None]]:
    out = {}
    for r in records:
        greedy = r.get("greedy_correct")
        n = r.get("num_samples") or 0
        out[str(r.get("id"))] = (
            None if greedy is None else float(greedy),
            (r.get("num_correct", 0) / n) if n else None,
        )
    return out


def _estimate(
    metrics: Mapping[str, Any], key: str, values: Sequence[float], binary: bool
) -> Estimate | None:
    value = metrics.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    n = int(metrics.get("num_problems") or len(values))
    stored = _stored_interval(metrics, key)
    if stored is not None:
        return Estimate(float(value), stored[0], stored[1], n)
    if not values:
        return Estimate(float(value), None, None, n)
    if binary:
        lo, hi, se = proportion_interval(int(round(sum(values))), len(values))
    else:
        lo, hi, se = mean_interval(values)
    return Estimate(float(value), lo, hi, len(values), se)


def _average(step: int, parts: Sequence[HeldOut], metrics: Mapping[str, Any]) -> HeldOut:
    """The macro average: the report's values, intervals from the benchmarks' errors."""

    def combine(kind: str, key: str) -> Estimate | None:
        ests = [p.get(kind) for p in parts]
        value = metrics.get(key)
        if any(e is None for e in ests) or not isinstance(value, int | float):
            return None
        stored = _stored_interval(metrics, key)
        n = sum(e.n for e in ests)
        if stored is not None:
            return Estimate(float(value), stored[0], stored[1], n)
        if len(ests) == 1:
            return dataclasses.replace(ests[0], value=float(value))
        ses = [e.standard_error() for e in ests]
        if any(s is None for s in ses):
            return Estimate(float(value), None, None, n)
        lo, hi, se = combined_interval(float(value), ses)
        return Estimate(float(value), lo, hi, n, se)

    k = parts[0].num_samples if parts else 0
    return HeldOut(
        step=step,
        benchmark=AVERAGE,
        greedy=combine("greedy", "pass@1"),
        sampled=combine("sampled", f"avg@{k}") if k else None,
        num_samples=k,
    )


def _from_report(step: int, path: str) -> dict[str, HeldOut]:
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    records_file = report.get("records_file") or os.path.basename(path)[:-5] + ".records.jsonl"
    records = _read_records(os.path.join(os.path.dirname(path), records_file))
    out: dict[str, HeldOut] = {}
    for name, m in (report.get("benchmarks") or {}).items():
        mine = [r for r in records if r.get("benchmark") == name]
        per = _per_problem(mine)
        k = int(m.get("num_samples") or 0)
        greedy = [g for g, _ in per.values() if g is not None]
        sampled = [s for _, s in per.values() if s is not None]
        out[name] = HeldOut(
            step=step,
            benchmark=name,
            greedy=_estimate(m, "pass@1", greedy, binary=True),
            sampled=_estimate(m, f"avg@{k}", sampled, binary=False) if k else None,
            num_samples=k,
            per_problem=per,
        )
    if out:
        out[AVERAGE] = _average(step, list(out.values()), report.get("average") or {})
    return out


def _metric_estimate(m: Mapping[str, float], key: str | None) -> Estimate | None:
    if key is None or key not in m:
        return None
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return Estimate(m[key], low, high) if low is not None and high is not None else Estimate(m[key])


def _from_metrics(records: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, HeldOut]]:
    """``eval/<name>/pass@1`` and ``eval/<name>/avg@k`` of metric records, with intervals when
    ``eval/<name>/<metric>_ci_low`` / ``_ci_high`` are there too."""
    out: dict[int, dict[str, HeldOut]] = {}
    for r in records:
        found: dict[str, dict[str, float]] = {}
        for key, v in r.items():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == "eval" and isinstance(v, int | float):
                found.setdefault("/".join(parts[1:-1]), {})[parts[-1]] = float(v)
        for name, m in found.items():
            avg_key = next((k for k in m if re.fullmatch(r"avg@\d+", k)), None)
            out.setdefault(int(r["step"]), {})[name] = HeldOut(
                step=int(r["step"]),
                benchmark=name,
                greedy=_metric_estimate(m, "pass@1"),
                sampled=_metric_estimate(m, avg_key),
                num_samples=int(avg_key[4:]) if avg_key else 0,
            )
    return out


def from_metrics(step: int, metrics: Mapping[str, Any]) -> dict[str, HeldOut]:
    """``{benchmark or "average": HeldOut}`` of one evaluation's metrics (``eval/<name>/...``)."""
    return _from_metrics([{"step": step, **metrics}]).get(step, {})


def read_heldout(
    workdir: str, metric_records: Sequence[Mapping[str, Any]] = ()
) -> dict[int, dict[str, HeldOut]]:
    """``{step: {benchmark or "average": HeldOut}}`` of a run, steps ascending.

    Reads ``WORKDIR/eval/step_*.json`` (with their records); steps with no report file fall
    back to the ``eval/...`` keys of ``metric_records`` (their ``_ci_low`` / ``_ci_high`` are the
    intervals when present). Empty when
    the run has no evaluation.
    """
    out = _from_metrics(metric_records)
    for path in glob.glob(os.path.join(workdir, "eval", "step_*.json")):
        m = _STEP_FILE.search(os.path.basename(path))
        if m:
            parsed = _from_report(int(m.group(1)), path)
            if parsed:
                out[int(m.group(1))] = parsed
    return dict(sorted(out.items()))


def before_after(
    results: Mapping[int, Mapping[str, HeldOut]], benchmark: str = AVERAGE
) -> tuple[HeldOut | None, HeldOut | None]:
    """The first and the last evaluation of ``benchmark`` (the same one when evaluated once)."""
    points = [r[benchmark] for _, r in sorted(results.items()) if benchmark in r]
    return (points[0], points[-1]) if points else (None, None)


def paired_gain(before: HeldOut, after: HeldOut, kind: str) -> Estimate | None:
    """``after - before`` on the problems both evaluated, with a paired 95% interval;
    ``None`` without per-problem records (e.g. for the average of several benchmarks)."""
    index = 0 if kind == "greedy" else 1
    shared = [
        after.per_problem[pid][index] - before.per_problem[pid][index]
        for pid in before.per_problem.keys() & after.per_problem.keys()
        if before.per_problem[pid][index] is not None and after.per_problem[pid][index] is not None
    ]
    if not shared:
        return None
    value, lo, hi, se = paired_difference_interval(shared)
    return Estimate(value, lo, hi, len(shared), se)


def gain_for(results: Mapping[int, Mapping[str, HeldOut]], kind: str) -> Estimate | None:
    """Paired gain from the first to the last evaluation, over the problems of every benchmark
    (for a single benchmark: that benchmark's gain)."""
    steps = sorted(results)
    if len(steps) < 2:
        return None
    first, last = results[steps[0]], results[steps[-1]]
    names = [n for n in first if n != AVERAGE and n in last]
    if len(names) == 1:
        return paired_gain(first[names[0]], last[names[0]], kind)
    gains = [paired_gain(first[n], last[n], kind) for n in names]
    if not gains or any(g is None for g in gains):
        return None
    value = mean([g.value for g in gains])
    lo, hi, se = combined_interval(value, [g.standard_error() for g in gains], bounds=(-1.0, 1.0))
    return Estimate(value, lo, hi, sum(g.n for g in gains), se)


def before_after_text(results: Mapping[int, Mapping[str, HeldOut]]) -> list[str]:
    """The first and last evaluation (average over benchmarks) as short lines::

    step 0 -> step 10 (95% intervals)
    greedy   41.0% [34.5, 47.8] -> 55.0% [48.1, 61.7]  gain +14.0 [8.2, 19.8]
    avg@8    38.2% [33.0, 43.4] -> 49.9% [44.7, 55.1]  gain +11.7 [7.5, 15.9]
    """
    first, last = before_after(results)
    if first is None or last is None:
        return []
    same = first.step == last.step
    lines = [f"step {last.step} (95% intervals)" if same else
             f"step {first.step} -> step {last.step} (95% intervals)"]  # fmt: skip
    for kind in ("greedy", "sampled"):
        b, a = first.get(kind), last.get(kind)
        if b is None or a is None:
            continue
        label = "greedy" if kind == "greedy" else f"avg@{last.num_samples}"
        if same:
            lines.append(f"{label:<8} {a.text()}")
            continue
        gain = gain_for(results, kind)
        tail = f"  gain {gain.text(signed=True)}" if gain is not None else ""
        lines.append(f"{label:<8} {b.text()} -> {a.text()}{tail}")
    return lines
