"""Splits a generated analysis into its four sections and judges whether it holds a lesson.

The analysis instruction asks for, in order: 1. failure point and error pattern, 2. success
factors, 3. reflective summary, 4. heuristics. Models format headings in many ways
(``"1. Failure point"``, ``"**2. Success Factors:**"``, ``"### Heuristics"``), so a heading is
a line that starts with the section's number (``"3."`` / ``"3)"``) or a markdown heading / bold
marker, followed by one of the section's key words; text after a colon on the heading line
belongs to the section.

An analysis is *malformed* when a section is missing (or out of order) or when its heuristics
section holds no words (a bare list of the headings, a greeting, "I'm ready to help"): there is
no lesson to replay or train on. The pipeline drops malformed analyses (``mel.filter_malformed``)
and counts them; parsing itself never raises.

The compact format (:func:`parse_compact`) is a ``Rule: ...`` line with an optional
``Mistake: ...`` contrast next to it; it is malformed when the rule is missing or too short to
teach.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = [
    "COMPACT_SECTION_NAMES",
    "SECTION_NAMES",
    "CompactAnalysis",
    "ParsedAnalysis",
    "parse_analysis",
    "parse_compact",
]

SECTION_NAMES: tuple[str, ...] = ("failure", "success", "summary", "heuristics")

_KEYWORDS: tuple[str, ...] = (
    r"failure\s+points?|error\s+patterns?|failure",
    r"success\s+factors?|success",
    r"(?:first[- ]person\s+)?reflective\s+summary|reflection|summary",
    r"heuristics?|general\s+rules?",
)


def _heading_re(index: int) -> re.Pattern[str]:
    """A heading line of section ``index`` (0-based); group ``rest`` is the line's tail."""
    number = rf"(?:section\s*)?{index + 1}\s*[.):]"
    decoration = r"(?:\#{1,6}\s*|[*_]{1,2})"
    return re.compile(
        rf"""^[ \t]*
        (?:{decoration}[ \t]*)*                     # '### ', '**'
        (?:(?P<num>{number})[ \t]*(?:[*_]{{1,2}}[ \t]*)?)?  # '1.' or '1)' (maybe bold)
        (?:[A-Za-z'-]+[ \t]+){{0,3}}?                # 'The', 'Key', 'Identifying the'
        (?P<kw>{_KEYWORDS[index]})\b
        (?P<rest>[^\n]*)$""",
        re.IGNORECASE | re.MULTILINE | re.VERBOSE,
    )


_HEADINGS = tuple(_heading_re(i) for i in range(4))
# A word of two or more letters (any script): what a heuristic needs at the least. Bullets,
# numbers, punctuation and "..." alone are no rule.
_WORD = re.compile(r"[^\W\d_]{2,}")


def _is_heading(match: re.Match[str]) -> bool:
    """Numbered, or decorated (markdown heading / bold): plain prose that merely starts with
    'Success' is not a heading."""
    if match.group("num"):
        return True
    prefix = match.string[match.start() : match.start("kw")]
    return bool(re.search(r"[#*_]", prefix))


def _heading_tail(rest: str) -> str:
    """Inline content after the heading words: what follows the first colon (if any)."""
    rest = rest.strip()
    if ":" not in rest:
        return ""
    return rest.split(":", 1)[1].strip().lstrip("*_ ").strip()


@dataclasses.dataclass(frozen=True)
class ParsedAnalysis:
    """The sections found in an analysis (``None`` where missing)."""

    failure: str | None
    success: str | None
    summary: str | None
    heuristics: str | None

    @property
    def missing_sections(self) -> tuple[str, ...]:
        """Names of the sections not found (in order)."""
        return tuple(name for name in SECTION_NAMES if getattr(self, name) is None)

    @property
    def has_heuristic(self) -> bool:
        """The heuristics section exists and holds at least one word."""
        return self.heuristics is not None and _WORD.search(self.heuristics) is not None

    @property
    def malformed(self) -> bool:
        """True unless all four sections were found, in order, with a non-empty heuristic."""
        return bool(self.missing_sections) or not self.has_heuristic

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in SECTION_NAMES}


def parse_analysis(text: str) -> ParsedAnalysis:
    """Finds the four sections in order; each runs from its heading to the next found heading.

    A section whose heading does not occur after the previous section's heading is ``None``.
    """
    found: list[tuple[int, int, int, str]] = []  # (section, heading start, body start, tail)
    pos = 0
    for i, pattern in enumerate(_HEADINGS):
        for m in pattern.finditer(text, pos):
            if _is_heading(m):
                found.append((i, m.start(), m.end(), _heading_tail(m.group("rest"))))
                pos = m.end()
                break
    sections: dict[str, str | None] = dict.fromkeys(SECTION_NAMES)
    for k, (i, _, body_start, tail) in enumerate(found):
        end = found[k + 1][1] if k + 1 < len(found) else len(text)
        body = text[body_start:end].strip()
        sections[SECTION_NAMES[i]] = "\n".join(s for s in (tail, body) if s)
    return ParsedAnalysis(**sections)


# ----------------------------------------------------------------------------- compact format
#
# The compact analysis (``mel.analysis_format=compact``) is one rule on one line
# (``Rule: When ..., I ...``), with a short contrast (``Mistake: ...``) on the line before or
# after it. A label may carry markdown decoration or a bullet (``**Rule:**``, ``- Rule:``) and
# may start a new sentence on the previous label's line. The rule is the lesson and is
# required; the contrast is optional, because a small model often stops after one line. The
# analysis ends where the rule's line (or a contrast line right after it) ends: whatever a
# small model writes after that (a repeated example, a new question) is not part of it.

COMPACT_SECTION_NAMES: tuple[str, ...] = ("mistake", "rule")
COMPACT_MIN_RULE_WORDS = 3
"""A rule needs this many words: "Be careful." is no lesson a replay can act on."""

_COMPACT_LABEL = re.compile(
    r"(?:^|(?<=[.!?])[ \t]+)"  # a line's start, or a new sentence ('... them. Rule: When')
    r"[ \t]*(?:[-*>#][ \t]*)*(?:[*_]{1,2}[ \t]*)?(?P<label>mistake|contrast|rule|lesson)"
    r"[ \t]*(?:[*_]{1,2}[ \t]*)?:(?:[ \t]*[*_]{1,2})?",
    re.IGNORECASE | re.MULTILINE,
)
_LABEL_SECTION = {"mistake": "mistake", "contrast": "mistake", "rule": "rule", "lesson": "rule"}


@dataclasses.dataclass(frozen=True)
class CompactAnalysis:
    """The sections of a compact analysis (``None`` where missing).

    Attributes:
      mistake, rule: the sections' texts.
      end: character offset where the analysis ends (the lesson is ``text[:end]``); ``None``
        without a rule.
      closed: a newline follows ``end`` (so text cut off after it left the lesson whole).
    """

    mistake: str | None
    rule: str | None
    end: int | None = None
    closed: bool = False

    @property
    def missing_sections(self) -> tuple[str, ...]:
        return tuple(n for n in COMPACT_SECTION_NAMES if getattr(self, n) is None)

    @property
    def has_heuristic(self) -> bool:
        """The rule exists and holds at least :data:`COMPACT_MIN_RULE_WORDS` words."""
        return self.rule is not None and len(_WORD.findall(self.rule)) >= COMPACT_MIN_RULE_WORDS

    @property
    def malformed(self) -> bool:
        """True unless a rule of enough words was found."""
        return not self.has_heuristic

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in COMPACT_SECTION_NAMES}


def _line_end(text: str, pos: int) -> int:
    newline = text.find("\n", pos)
    return len(text) if newline < 0 else newline


def parse_compact(text: str) -> CompactAnalysis:
    """Finds the first rule label and a contrast right before or right after the rule's line.

    The rule is the rest of its label's line. A contrast before it runs from its label to the
    rule's label; one after it (the next label, on the next line) is the rest of its line.
    """
    labels = [(m, _LABEL_SECTION[m.group("label").lower()]) for m in _COMPACT_LABEL.finditer(text)]
    k = next((i for i, (_, name) in enumerate(labels) if name == "rule"), None)
    if k is None:
        return CompactAnalysis(None, None)
    rule_label = labels[k][0]
    end = _line_end(text, rule_label.end())
    rule = text[rule_label.end() : end].strip()
    mistake = None
    if k > 0 and labels[k - 1][1] == "mistake":
        mistake = text[labels[k - 1][0].end() : rule_label.start()].strip()
    elif k + 1 < len(labels) and labels[k + 1][1] == "mistake":
        after = labels[k + 1][0]
        if not text[end : after.start()].strip():  # the very next line
            end = _line_end(text, after.end())
            mistake = text[after.end() : end].strip()
    return CompactAnalysis(mistake, rule, end=end, closed=end < len(text))
