"""A run's curves as one PNG plus a plain-text summary (``meljax report``, the notebook).

The figure itself is drawn by :mod:`meljax.report.figure`.

Reads ``WORKDIR/metrics.jsonl`` (one record per step, written by the trainer) and, for
examples, ``WORKDIR/meta_experiences.jsonl`` (one record per generated analysis). Every metric
is optional: a GRPO run has no ``mel/*`` keys, a failed measurement is ``null``; missing values
become gaps in the curves and are left out of the summary statistics.

Public API:
  load_records(workdir) -> list[dict]                 # checked, sorted by step
  series(records, *keys) / retention_series(records) / mel_nll_series(records) -> [steps]
  summarize(records) -> RunSummary                    # pure; RunSummary.text()
  summary_text(records, heldout=None) -> str          # summary + held-out before / after
  render_report(workdir, output=None) -> (png_path, summary_text)   # held-out results too
  read_meta_experiences(workdir) -> list[dict]
  kept_examples(records, n) -> list[dict];  format_example(record, max_chars=...) -> str
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from meljax.evaluation.stats import finite_mean
from meljax.report.heldout import HeldOut, before_after_text, read_heldout
from meljax.trainer.metrics import METRICS_FILE, read_metrics

__all__ = [
    "PHASES",
    "REPORT_FILE",
    "RunSummary",
    "format_example",
    "kept_examples",
    "load_records",
    "mel_nll_series",
    "read_meta_experiences",
    "render_report",
    "retention_series",
    "series",
    "shorten",
    "summarize",
    "summary_text",
]

REPORT_FILE = "report.png"
META_FILE = "meta_experiences.jsonl"  # same name as meljax.meta.META_LOG_FILE (no jax import)
# Phases of a step, in execution order; ``time/step`` also covers what is not listed here
# (reference log-probs, bookkeeping), shown as "other".
PHASES = ("rollout", "reward", "meta_analysis", "meta_replay", "update")


# -- reading


def load_records(workdir: str) -> list[dict]:
    """The metric records of a run, one per step, sorted by step.

    A resumed run may have written a step twice before the trainer truncated the file; the
    later record wins.

    Raises:
      FileNotFoundError: no ``metrics.jsonl`` in ``workdir``.
      ValueError: the file holds no record, or a record has no integer ``step``.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file {path} (has the run made a step yet?)")
    rows = read_metrics(workdir)
    if not rows:
        raise ValueError(f"metrics file {path} holds no records")
    by_step: dict[int, dict] = {}
    for i, row in enumerate(rows, start=1):
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{path}, line {i}: a record needs an integer 'step', got {row!r:.80}")
        by_step[step] = row
    return [by_step[s] for s in sorted(by_step)]


def _value(row: dict, *keys: str) -> float:
    """The first present, finite numeric value among ``keys``; NaN when there is none."""
    for key in keys:
        v = row.get(key)
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, int | float) and math.isfinite(v):
            return float(v)
    return math.nan


def series(records: Sequence[dict], *keys: str) -> list[float]:
    """``[steps]`` values of a metric (first key present wins, NaN where missing/null)."""
    return [_value(r, *keys) for r in records]


def retention_series(records: Sequence[dict]) -> list[float]:
    """``[steps]`` retention ratios, NaN where the step generated no analysis.

    The trainer logs ratio 0 for such a step; plotted or averaged it would read as "every
    analysis was dropped" when there was nothing to keep.
    """
    ratio = series(records, "retention_ratio", "mel/retention_ratio")
    generated = series(records, "mel/generated")
    return [math.nan if g == 0 else r for r, g in zip(ratio, generated, strict=True)]


def mel_nll_series(records: Sequence[dict]) -> list[float]:
    """``[steps]`` MEL NLL, NaN where the step trained on no meta-experience token (the
    trainer logs 0 there: an empty batch, not a perfect fit)."""
    nll = series(records, "train/mel_nll")
    tokens = series(records, "train/mel_tokens")
    return [math.nan if t == 0 else v for v, t in zip(nll, tokens, strict=True)]


def _zeros_for_nan(xs: Sequence[float]) -> list[float]:
    return [0.0 if math.isnan(x) else x for x in xs]


def _finite(xs: Sequence[float]) -> list[float]:
    return [x for x in xs if not math.isnan(x)]


# -- summary


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """Headline numbers of a run (``None``: the run has no such metric).

    Attributes:
      steps: records (steps) in the file; first_step, last_step: their step numbers.
      reward_first, reward_last, reward_best: ``reward_mean`` of the first/last/best step
        that has one; best_step: the step of the best (the first one on ties).
      accuracy_start: ``accuracy`` of the first step that has one.
      retention_mean: mean per-step retention ratio (``kept / generated``) over the steps
        that generated analyses (a step with none has no ratio to average).
      kept_total, generated_total: meta-experiences kept / generated over the run.
      step_time_mean: mean ``time/step`` in seconds, all steps.
      step_time_steady: mean ``time/step`` of the steps after the first timed one (whose time
        includes JAX compilation); ``None`` with fewer than two timed steps.
      phase_shares: phase -> share of the summed ``time/step``, ``"other"`` for the
        remainder; over the steps after the first timed one when there are two or more (the
        steady state, compilation left out), else over that one step; empty without step
        times.
    """

    steps: int
    first_step: int
    last_step: int
    reward_first: float | None
    reward_last: float | None
    reward_best: float | None
    best_step: int | None
    accuracy_start: float | None
    retention_mean: float | None
    kept_total: int | None
    generated_total: int | None
    step_time_mean: float | None
    step_time_steady: float | None
    phase_shares: dict[str, float]

    def text(self) -> str:
        """A short two-column table."""

        def f(x: float | None, fmt: str = ".3f") -> str:
            return "n/a" if x is None else format(x, fmt)

        rows = [
            ("steps", f"{self.steps} (step {self.first_step} to {self.last_step})"),
            ("reward first / last", f"{f(self.reward_first)} / {f(self.reward_last)}"),
            (
                "reward best",
                f"{f(self.reward_best)}"
                + (f" (step {self.best_step})" if self.best_step is not None else ""),
            ),
            ("starting accuracy", f(self.accuracy_start)),
        ]
        if self.generated_total is None:
            rows.append(("meta-experiences", "n/a (no MEL metrics: GRPO run?)"))
        else:
            overall = self.kept_total / self.generated_total if self.generated_total else None
            rows.append(("mean retention ratio", f(self.retention_mean)))
            rows.append(
                (
                    "kept / generated",
                    f"{self.kept_total} / {self.generated_total} (overall {f(overall)})",
                )
            )
        step_time = "n/a" if self.step_time_mean is None else f"{self.step_time_mean:.2f} s"
        if self.step_time_steady is not None:
            step_time += f" (after the first: {self.step_time_steady:.2f} s)"
        rows.append(("mean step time", step_time))
        label = "time shares" + (" (after the first)" if self.step_time_steady is not None else "")
        for i, (phase, share) in enumerate(self.phase_shares.items()):
            rows.append((label if i == 0 else "", f"{100 * share:5.1f}%  {phase}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _total(records: Sequence[dict], key: str) -> int | None:
    vals = _finite(series(records, key))
    return int(round(sum(vals))) if vals else None


def _timed(records: Sequence[dict]) -> list[dict]:
    """Records with a step time, without the first one (compilation) when two or more."""
    timed = [r for r in records if not math.isnan(_value(r, "time/step"))]
    return timed[1:] if len(timed) >= 2 else timed


def _phase_shares(records: Sequence[dict]) -> dict[str, float]:
    timed = _timed(records)
    total = sum(_value(r, "time/step") for r in timed)
    if not timed or total <= 0:
        return {}
    shares = {}
    for phase in PHASES:
        vals = _finite(series(timed, f"time/{phase}"))
        if vals:
            shares[phase] = sum(vals) / total
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def summarize(records: Sequence[dict]) -> RunSummary:
    """Headline numbers of ``records`` (as :func:`load_records` returns them, non-empty)."""
    if not records:
        raise ValueError("summarize() needs at least one metrics record")
    steps = [int(r["step"]) for r in records]
    reward = series(records, "reward_mean")
    rewarded = [(s, x) for s, x in zip(steps, reward, strict=True) if not math.isnan(x)]
    best = max(rewarded, key=lambda sx: sx[1]) if rewarded else None  # first max on ties
    accuracy = _finite(series(records, "accuracy"))
    step_times = _finite(series(records, "time/step"))
    return RunSummary(
        steps=len(records),
        first_step=steps[0],
        last_step=steps[-1],
        reward_first=rewarded[0][1] if rewarded else None,
        reward_last=rewarded[-1][1] if rewarded else None,
        reward_best=best[1] if best else None,
        best_step=best[0] if best else None,
        accuracy_start=accuracy[0] if accuracy else None,
        retention_mean=finite_mean(retention_series(records)),
        kept_total=_total(records, "mel/kept"),
        generated_total=_total(records, "mel/generated"),
        step_time_mean=finite_mean(step_times),
        step_time_steady=finite_mean(step_times[1:]) if len(step_times) >= 2 else None,
        phase_shares=_phase_shares(records),
    )


def summary_text(
    records: Sequence[dict], heldout: Mapping[int, Mapping[str, HeldOut]] | None = None
) -> str:
    """:meth:`RunSummary.text` plus, with held-out results, the first and last evaluation."""
    text = summarize(records).text()
    lines = before_after_text(heldout or {})
    if lines:
        text += "\nheld-out, " + lines[0] + "\n" + "\n".join(f"  {line}" for line in lines[1:])
    return text


def render_report(workdir: str, output: str | None = None) -> tuple[str, str]:
    """Plots a run's curves to ``output`` (default ``WORKDIR/report.png``), with the held-out
    evaluation when the run has one (``WORKDIR/eval/step_*.json`` or ``eval/...`` metrics).

    Returns:
      ``(png_path, summary_text)``.

    Raises:
      FileNotFoundError / ValueError: see :func:`load_records`.
    """
    records = load_records(workdir)
    heldout = read_heldout(workdir, records)
    output = output or os.path.join(workdir, REPORT_FILE)
    title = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    from meljax.report.figure import render_figure

    png = render_figure(records, output, title=f"run {title}", heldout=heldout)
    return png, summary_text(records, heldout)


# -- meta-experience examples


def read_meta_experiences(workdir: str) -> list[dict]:
    """Records of ``WORKDIR/meta_experiences.jsonl`` (``[]`` if absent; a malformed trailing
    line, from a run killed mid-write, is ignored)."""
    path = os.path.join(workdir, META_FILE)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(rec, dict):
                out.append(rec)
    return out


def kept_examples(records: Sequence[dict], n: int) -> list[dict]:
    """The ``n`` most recent kept meta-experiences (latest policy first)."""
    if n <= 0:
        return []
    kept = [r for r in records if r.get("kept") is True]
    return kept[::-1][:n]


def shorten(text: Any, max_chars: int) -> str:
    """``text`` on one line, cut in the middle to at most ``max_chars`` characters."""
    s = " ".join(str(text).split())
    if len(s) <= max_chars:
        return s
    marker = " ... "
    head = max(1, (max_chars - len(marker)) * 2 // 3)
    tail = max(0, max_chars - len(marker) - head)
    return s[:head] + marker + (s[-tail:] if tail else "")


def format_example(record: dict, max_chars: int = 400) -> str:
    """A meta-experience record in a few short lines."""
    lines = [
        f"step {record.get('step', '?')}  question {record.get('question_id', '?')}  "
        f"status {record.get('status', 'kept' if record.get('kept') else '?')}",
        f"  question: {shorten(record.get('question', ''), max_chars // 2)}",
        f"  answer:   {shorten(record.get('answer', ''), 60)}"
        + (
            f"  (replay answered {shorten(record['replay_extracted'], 40)})"
            if record.get("replay_extracted") is not None
            else ""
        ),
        f"  analysis: {shorten(record.get('text', ''), max_chars)}",
    ]
    return "\n".join(lines)
