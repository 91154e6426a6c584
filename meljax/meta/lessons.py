"""What a run's meta-experience loop did, from its logs: yield per reason, cost, lessons by step.

Pure functions over ``meta_experiences.jsonl`` records (:mod:`meljax.meta.records`) and
``metrics.jsonl`` rows; ``meljax lessons`` and the end-of-run summary print them. They accept
records written before a field existed (older runs lack ``lesson``, ``format`` and the pair
texts) so an old run folder still reads.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "STATUSES",
    "by_step",
    "mel_overhead",
    "overhead_line",
    "pair_texts",
    "status_counts",
    "token_share",
    "yield_lines",
]

STATUSES: tuple[str, ...] = (
    "kept",
    "replay_failed",
    "empty",
    "truncated",
    "malformed",
    "leak",
    "copied",
)
"""Every fate of an analysis: kept, or the first reason it was dropped."""


def status_counts(records: Iterable[dict]) -> dict[str, int]:
    """Analyses per status, every status of :data:`STATUSES` present (unknown ones appended)."""
    counts = collections.Counter(str(r.get("status", "?")) for r in records)
    out = {s: counts.pop(s, 0) for s in STATUSES}
    out.update(sorted(counts.items()))
    return out


def token_share(records: Iterable[dict]) -> tuple[int, int]:
    """``(NLL target tokens of kept analyses, tokens sampled by the analysis pass)``: what of the
    pass's output reached the NLL term (``lesson_tokens``; older logs: ``num_tokens``)."""
    kept = total = 0
    for r in records:
        total += int(r.get("num_tokens") or 0)
        if r.get("kept") is True:
            kept += int(r.get("lesson_tokens") or r.get("num_tokens") or 0)
    return kept, total


def by_step(records: Iterable[dict]) -> dict[int, list[dict]]:
    """Records grouped by training step, in step order."""
    out: dict[int, list[dict]] = collections.defaultdict(list)
    for r in records:
        out[int(r.get("step", 0))].append(r)
    return dict(sorted(out.items()))


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def yield_lines(records: Sequence[dict]) -> list[str]:
    """The yield summary: kept / generated, analyses per reason, kept token share, and how many
    kept lessons merely copy the instruction's worked example."""
    if not records:
        return ["no meta-experience was generated"]
    counts = status_counts(records)
    n = len(records)
    steps = by_step(records)
    with_kept = sum(1 for rows in steps.values() if any(r.get("kept") is True for r in rows))
    kept_tokens, all_tokens = token_share(records)
    reasons = ", ".join(f"{s} {c} ({_pct(c, n)})" for s, c in counts.items())
    kept = [r for r in records if r.get("kept") is True]
    copied = sum(1 for r in kept if r.get("copied_example"))
    return [
        f"analyses kept / generated: {counts['kept']} / {n} ({_pct(counts['kept'], n)}); "
        f"steps with a kept lesson: {with_kept} / {len(steps)}",
        f"by reason: {reasons}",
        f"analysis tokens in kept lessons: {kept_tokens} / {all_tokens} "
        f"({_pct(kept_tokens, all_tokens)})",
        f"kept lessons copied verbatim from the instruction's example: {copied} / {len(kept)}",
    ]


def mel_overhead(rows: Iterable[dict]) -> dict[str, float] | None:
    """Mean seconds per training step of the analysis pass, the replay pass and the whole step
    (``analysis_s``, ``replay_s``, ``step_s``) over steps that ran MEL; ``None`` without any."""
    timed = [
        r
        for r in rows
        if r.get("time/meta_analysis") is not None and r.get("time/step") is not None
    ]
    if not timed:
        return None
    n = len(timed)
    return {
        "steps": float(n),
        "analysis_s": sum(float(r["time/meta_analysis"]) for r in timed) / n,
        "replay_s": sum(float(r.get("time/meta_replay") or 0.0) for r in timed) / n,
        "step_s": sum(float(r["time/step"]) for r in timed) / n,
    }


def overhead_line(rows: Iterable[dict]) -> str | None:
    """One line: MEL's time per step and its share of the step (``None`` when MEL never ran)."""
    o = mel_overhead(rows)
    if o is None:
        return None
    mel = o["analysis_s"] + o["replay_s"]
    return (
        f"MEL overhead per step: {mel:.1f} s of {o['step_s']:.1f} s ({_pct(mel, o['step_s'])}: "
        f"analysis {o['analysis_s']:.1f} s, replay {o['replay_s']:.1f} s; "
        f"mean over {int(o['steps'])} steps)"
    )


def pair_texts(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """The (incorrect, correct) answers a record's analysis compared, when the log has them."""
    pair = record.get("pair") or {}
    return pair.get("incorrect_answer"), pair.get("correct_answer")
