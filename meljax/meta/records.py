"""One ``meta_experiences.jsonl`` record per generated analysis, kept or dropped.

A record says what was generated (``text``, cut to its lesson when ``trimmed``; its
``sections``; the ``lesson`` a reader looks at first; ``num_tokens`` sampled and
``lesson_tokens`` in the NLL target), from which pair (question, ground truth, the two answers' rows and texts), and what
became of it: ``status`` is ``"kept"``, ``"replay_failed"`` or the filter's drop reason
(``"empty"``, ``"truncated"``, ``"malformed"``, ``"leak"``); the replay fields are filled in by
the pipeline for analyses that reached the replay. ``meljax lessons`` reads these records.
"""

from __future__ import annotations

from typing import Any

from meljax.meta.formats import lesson_text

__all__ = ["PAIR_TEXT_CHARS", "analysis_record", "clip_middle"]

PAIR_TEXT_CHARS = 2000
"""Characters kept of each pair answer in the log: readable, without copying long rollouts."""


def clip_middle(text: str, max_chars: int = PAIR_TEXT_CHARS) -> str:
    """``text`` with its middle replaced by a marker when longer than ``max_chars``."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - max_chars} characters omitted ...]\n{text[-tail:]}"


def analysis_record(
    *,
    step: int,
    problem: Any,
    pair: Any,
    answers: tuple[str, str],
    analysis: Any,
    parsed: Any,
    analysis_format: str,
    prompt: Any,
    reason: str,
    template: str = "",
) -> dict[str, Any]:
    """The JSON-ready record of one analysis before its replay.

    Args:
      step: training step; problem: ``.id``, ``.question``, ``.answer``.
      pair: the :class:`~meljax.meta.pairs.ContrastivePair` (``.incorrect``, ``.correct``).
      answers: the (incorrect, correct) answer texts as sampled (clipped for the log).
      analysis: the :class:`~meljax.meta.trim.Analysis` (text, NLL target, tokens sampled);
      parsed: its sections (``.malformed``, ``.as_dict()``).
      analysis_format: ``"paper"`` or ``"compact"``.
      prompt: the :class:`~meljax.meta.templates.FilledPrompt` it was sampled from.
      reason: :func:`~meljax.meta.filters.filter_reason`'s verdict (``"ok"``: goes to replay).
      template: the analysis instruction; ``copied_example`` is true when the lesson occurs in
        it verbatim (a small model may copy the worked example rather than write its own).
    """
    sections = parsed.as_dict()
    lesson = lesson_text(sections)
    return {
        "step": int(step),
        "question_id": str(problem.id),
        "question": problem.question,
        "answer": problem.answer,
        "pair": {
            "incorrect": pair.incorrect,
            "correct": pair.correct,
            "incorrect_answer": clip_middle(answers[0]),
            "correct_answer": clip_middle(answers[1]),
        },
        "format": analysis_format,
        "text": analysis.text,
        "trimmed": analysis.trimmed,
        "sections": sections,
        "lesson": lesson,
        "copied_example": bool(lesson)
        and lesson.strip() in template,  # status "copied" if filtered
        "malformed": parsed.malformed,
        "prompt_tokens": len(prompt.ids),
        "omitted_tokens": list(prompt.omitted),
        "num_tokens": int(analysis.sampled_tokens),
        "lesson_tokens": len(analysis.ids),
        "empty": reason == "empty",
        "truncated": reason == "truncated",
        "leak": reason == "leak",
        "replay_failed": False,
        "replay_text": None,
        "replay_extracted": None,
        "replay_score": None,
        "status": reason,
        "kept": False,
    }
