"""Cutting a compact analysis down to its lesson (``mel.analysis_format=compact``).

A small model that has written its ``Rule:`` line often goes on (repeats the example, starts a
new question) until the length limit cuts it. The compact format ends at the rule's line, so
the analysis is trimmed there: its text (what the replay sees and the filters judge) and its
tokens (the NLL target: the sampled tokens through the rule's line, then a stop token, so the
policy also learns to stop). A trimmed analysis counts as cut off only when the cut fell inside
the lesson; it still goes through every filter and the replay.

The paper format is never trimmed: its four sections have no marked end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from meljax.meta.parse import parse_compact

__all__ = ["Analysis", "trim_compact"]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One sampled analysis after trimming.

    Attributes:
      ids: the NLL target (sampled tokens, stop token included).
      text: the analysis text the filters, the replay and the log see.
      truncated: the length limit cut the analysis (for compact: cut inside the lesson).
      sampled_tokens: tokens the analysis pass spent on it (before trimming).
      trimmed: text after the lesson was removed.
    """

    ids: list[int]
    text: str
    truncated: bool
    sampled_tokens: int
    trimmed: bool = False


def _covering_prefix(ids: Sequence[int], lesson: str, decode: Callable[[list[int]], str]) -> int:
    """The fewest leading tokens whose text holds all of ``lesson`` (0 when none does).

    Binary search, as for stop strings: a longer prefix holds whatever a shorter one does."""
    want = lesson.strip()

    def holds(j: int) -> bool:
        return decode(list(ids[:j])).strip().startswith(want)

    lo, hi = 1, len(ids)
    if hi == 0 or not holds(hi):
        return 0
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo


def trim_compact(
    ids: Sequence[int],
    text: str,
    truncated: bool,
    *,
    decode: Callable[[list[int]], str],
    stop_id: int,
) -> Analysis:
    """The analysis through its rule's line, or as sampled when there is nothing to trim.

    Args:
      ids: sampled tokens (stop token included when the sample stopped by itself).
      text: their decoded text (without the stop token); truncated: the length limit hit.
      decode: token ids -> text, as the sampler decodes them.
      stop_id: appended after a trimmed lesson's tokens.

    Nothing is trimmed when the rule is missing, when a sample that stopped by itself has
    nothing after the rule's line, or when a cut sample's rule line was not finished (then the lesson itself is cut off and stays
    ``truncated``).
    """
    whole = Analysis(list(ids), text, truncated, len(ids))
    parsed = parse_compact(text)
    if parsed.end is None or (not truncated and not text[parsed.end :].strip()):
        return whole
    if truncated and not parsed.closed:
        return whole
    lesson = text[: parsed.end].rstrip()
    j = _covering_prefix(ids, lesson, decode)
    if j == 0:
        return whole
    return Analysis(list(ids[:j]) + [int(stop_id)], lesson, False, len(ids), trimmed=True)
