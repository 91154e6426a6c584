"""What one MEL step reports: the questions it reads (:class:`ProblemLike`), its counts
(:class:`MetaCounts`) and its result (:class:`MetaResult`: the NLL batch, the counts, the
timings and the log records)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from meljax.rl.batch import SequenceBatch


class ProblemLike(Protocol):
    """``meljax.data.Problem`` or anything with the same three fields."""

    id: str
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class MetaCounts:
    """What happened in one step (every count is a number of analyses unless said otherwise).

    Attributes:
      questions: questions in the step; mixed_groups: those with a mixed group.
      pairs: contrastive pairs drawn; too_long: pairs skipped because the question alone
        overflows the analysis prompt limit; generated: analyses sampled ((pairs - too_long) x
        ``analyses_per_pair``).
      empty, truncated, malformed, leak, copied: dropped by that filter (each analysis counts
        once, first reason in this order; malformed: a section missing or no heuristic, counted
        only when ``filter_malformed`` is on; copied: the lesson copies the instruction).
      replayed: analyses that passed the filters; kept: replay answer correct.
      shortened: analysis prompts whose answers were shortened.
      analysis_tokens, kept_tokens: analysis tokens sampled, and those of kept analyses (what
        the analysis pass spent, and what of it reached the NLL term).
    """

    questions: int = 0
    mixed_groups: int = 0
    pairs: int = 0
    too_long: int = 0
    generated: int = 0
    empty: int = 0
    truncated: int = 0
    malformed: int = 0
    leak: int = 0
    copied: int = 0
    replayed: int = 0
    kept: int = 0
    shortened: int = 0
    analysis_tokens: int = 0
    kept_tokens: int = 0

    @property
    def replay_failed(self) -> int:
        return self.replayed - self.kept


@dataclasses.dataclass
class MetaResult:
    """Output of one pipeline step.

    Attributes:
      batch: the NLL batch (``[rows, nll_length]``; all padding with weight 0 when nothing is
        kept).
      counts: see :class:`MetaCounts`.
      retention_ratio: ``kept / generated`` (0 when nothing was generated).
      replay_pass_ratio: ``kept / replayed`` (0 when nothing was replayed).
      timings: seconds per phase: ``analysis_s`` (prompt filling, sampling, decoding,
        parsing), ``replay_s`` (replay prompts, sampling, verification), ``total_s``.
      records: one JSON-ready dict per generated analysis (what the log file gets).
    """

    batch: SequenceBatch
    counts: MetaCounts
    retention_ratio: float
    replay_pass_ratio: float
    timings: dict[str, float]
    records: list[dict[str, Any]]

    def metrics(self, prefix: str = "mel/") -> dict[str, float]:
        """Flat scalars for a metrics writer."""
        out = {f"{prefix}{k}": float(v) for k, v in dataclasses.asdict(self.counts).items()}
        out[f"{prefix}replay_failed"] = float(self.counts.replay_failed)
        out[f"{prefix}retention_ratio"] = self.retention_ratio
        out[f"{prefix}replay_pass_ratio"] = self.replay_pass_ratio
        out.update({f"{prefix}{k}": float(v) for k, v in self.timings.items()})
        return out
