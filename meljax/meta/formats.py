"""Analysis formats (``mel.analysis_format``): what the analysis pass asks for and how it is read.

* ``paper``: the four-section analysis of the paper (docs/mel.md) (failure point, success factors, reflective
  summary, heuristics), parsed by :func:`meljax.meta.parse.parse_analysis`. The default, for
  the paper-scale configs.
* ``compact``: one "When ..., I ..." rule and a short contrast, with a worked example in the
  instruction, parsed by :func:`meljax.meta.parse.parse_compact` (the rule is required). Small models (the demo's
  135M one) cannot hold the four-section structure within a short budget; two labelled lines
  they can.

Both formats go through the same filters (empty, truncated, malformed, leak) and the same
replay check; only the instruction, the replay prompt, the parser and the malformed rule
differ. A template given in ``mel.analysis_template`` (``mel.replay_template``) replaces the
format's instruction (replay prompt) but keeps its parser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from meljax.meta import parse, templates

__all__ = [
    "ANALYSIS_FORMATS",
    "COMPACT_ANALYSIS_TEMPLATE",
    "COMPACT_PREFIX",
    "COMPACT_REPLAY_TEMPLATE",
    "AnalysisFormat",
    "get_format",
    "lesson_text",
]

ANALYSIS_FORMATS: tuple[str, ...] = ("paper", "compact")

COMPACT_ANALYSIS_TEMPLATE = """\
Compare a wrong answer with a right answer to the same question. Then write one lesson: a \
general rule on one line, "Rule: When ..., I ...", and on the next line "Mistake:" with what \
the wrong answer did differently. Do not repeat the numbers of the question.

Example.
Question: What is 7 plus 6?
Wrong answer: 7 plus 6 is 12.
Right answer: 7 + 6 = 13
Rule: When I add two numbers, I add them again in the other order to check the sum.
Mistake: The wrong answer made a slip in the sum and did not check it.

Now you.
Question: {question}
Wrong answer: {incorrect_answer}
Right answer: {correct_answer}"""
"""Compact analysis instruction: one contrast, one rule, a worked example (this project's
wording). A small model may copy the example's rule verbatim; such a copy is not drawn from
the pair, so ``mel.filter_copies`` drops it (``meljax lessons`` counts them)."""


COMPACT_REPLAY_TEMPLATE = """\
Note to self: {experience}

Question: {question}
{instruction}"""
"""Compact replay prompt: the lesson as the policy's own note, then the question. A small
model given a preamble about "an earlier study" talks about the notes instead of answering."""

COMPACT_PREFIX = "Rule: When"
"""The compact reply starts in its format, with the rule: a small model otherwise often opens
with prose, or stops after a contrast line before writing any rule."""


@dataclasses.dataclass(frozen=True)
class AnalysisFormat:
    """One analysis format.

    Attributes:
      name: ``"paper"`` or ``"compact"``.
      analysis_template: the built-in analysis instruction (``{question}``,
        ``{incorrect_answer}``, ``{correct_answer}``).
      parse: analysis text -> parsed sections (``.malformed``, ``.as_dict()``).
      replay_template: the built-in replay prompt (``{experience}``, ``{question}``,
        ``{instruction}``).
      reply_prefix: text put after the rendered prompt, so the policy's reply starts with it
        (part of the NLL context, and of the analysis text the filters and replay see).
    """

    name: str
    analysis_template: str
    parse: Callable[[str], Any]
    replay_template: str = templates.DEFAULT_REPLAY_TEMPLATE
    reply_prefix: str = ""


_FORMATS = {
    "paper": AnalysisFormat("paper", templates.DEFAULT_ANALYSIS_TEMPLATE, parse.parse_analysis),
    "compact": AnalysisFormat(
        "compact",
        COMPACT_ANALYSIS_TEMPLATE,
        parse.parse_compact,
        replay_template=COMPACT_REPLAY_TEMPLATE,
        reply_prefix=COMPACT_PREFIX,
    ),
}


def get_format(name: str) -> AnalysisFormat:
    """The format called ``name``; raises ``ValueError`` for an unknown one."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"analysis_format={name!r} is not one of {ANALYSIS_FORMATS}") from None


def lesson_text(sections: dict[str, str | None]) -> str | None:
    """The rule a reader should see first: the compact ``rule`` or the paper ``heuristics``."""
    return sections.get("rule") or sections.get("heuristics")
