"""Filters for generated meta-experiences (docs/mel.md, "Filters"): empty, truncated, malformed,
answer leak.

A *malformed* analysis lacks one of its format's sections or its rule (the four paper sections
with a non-empty heuristics section, or the compact rule; see
:mod:`meljax.meta.parse`): a greeting or a bare list of the headings teaches
nothing, and replaying it would only measure the policy without a lesson.

An *answer leak* is the ground truth appearing in the analysis as a standalone number or
expression. Replaying a leaked analysis is meaningless (the policy can copy the answer) and
training on it would teach the answer rather than a lesson.

Matching rules (case-sensitive, on text with thousands separators removed):

* numeric answers (``"8"``, ``"-3"``, ``"2.5"``, ``"1,000"``, also ``"50\\%"`` or ``"30^\\circ"``
  whose number is taken): the number must stand alone, i.e. not be part of a longer number
  (``"18"``, ``"8.5"``, ``"2.8"``, ``"80"``), of a ratio (``"8/3"``) or of a ``\\frac``
  (``"\\frac{8}{3}"``). ``"x=8"``, ``"\\boxed{8}"``, ``"$8$"``, ``"8."`` and ``"8.0"`` match.
  A positive answer does not match its negative (``"-8"`` written as a sign) but does match a
  difference (``"10-8"``).
* ``\\frac{a}{b}`` answers also match ``a/b`` standing alone.
* single-letter answers (multiple choice ``"C"``, a variable): only in answer-like spots,
  ``(C)``, ``{C}``, ``$C$``, ``"answer is C"``, ``"option C"`` / ``"choice C"``.
* other LaTeX answers: after normalising both texts (spaces kept only between two word
  characters, no ``$``, ``\\left``/``\\right`` and spacing commands removed,
  ``\\dfrac``/``\\tfrac`` -> ``\\frac``), the answer occurs as a substring not glued to a
  neighbouring letter or digit (``"2\\sqrt{3}"`` is not found in ``"12\\sqrt{3}"``).
"""

from __future__ import annotations

import re

from meljax.meta.formats import get_format, lesson_text

__all__ = [
    "FILTER_REASONS",
    "contains_answer",
    "copies_instruction",
    "filter_reason",
    "normalize_latex",
]

FILTER_REASONS: tuple[str, ...] = ("empty", "truncated", "malformed", "leak", "copied")

_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
_UNIT_SUFFIX = re.compile(r"(?:\\?%|\^\s*\{?\\circ\}?|\\text\{[^{}]*\}|\\mbox\{[^{}]*\})\s*$")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}$")


def normalize_latex(text: str) -> str:
    """Removes what does not change a LaTeX expression's meaning for substring matching."""
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", text)
    text = re.sub(r"\\[,;:! ]", "", text)
    text = text.replace("$", "")
    # Spaces only matter between two word characters ('gives 2', not '2 \\sqrt').
    text = re.sub(r"(?<=\w)\s+(?=\w)", " ", text)
    return re.sub(r"(?<!\w)\s+|\s+(?!\w)", "", text)


def _strip_answer(answer: str) -> str:
    """``"\\boxed{x}"`` -> ``"x"``, ``"$x$"`` -> ``"x"``, surrounding spaces dropped."""
    a = answer.strip()
    m = re.fullmatch(r"\\boxed\{(.*)\}", a, re.DOTALL)
    if m:
        a = m.group(1).strip()
    return a.strip("$ ").strip()


def _remove_thousands_separators(text: str) -> str:
    # '1,000' and LaTeX '1{,}000' -> '1000' (only between digit groups of exactly three).
    return re.sub(r"(?<=\d)(?:,|\{,\})(?=\d{3}(?!\d))", "", text)


def _number_pattern(num: str) -> re.Pattern[str]:
    """A standalone occurrence of the number ``num`` (e.g. ``"8"``, ``"-2.5"``)."""
    negative = num.startswith("-")
    digits = num.lstrip("-")
    if "." in digits:
        int_part, frac_part = digits.split(".", 1)
        frac_part = frac_part.rstrip("0")
        int_part = int_part.lstrip("0") or "0"
        body = re.escape(int_part)
        # '0.5' may be written '.5'
        if int_part == "0":
            body = r"0?"
        body += (r"\." + re.escape(frac_part) + r"0*") if frac_part else r"(?:\.0+)?"
    else:
        body = re.escape(digits.lstrip("0") or "0") + r"(?:\.0+)?"
        # zero-padded answers such as AIME's '025' are the number 25
        body = r"0*" + body
    # not glued to a longer number, ratio or \frac numerator / denominator
    before = r"(?<![\d.])(?<!\d/)(?<!/)(?<!\}\{)"
    after = r"(?!\d)(?!\.\d)(?!\s*/\s*\d)(?!\}\{)"
    if negative:
        sign = r"(?:-|−|\\minus\s*)\s*"
        return re.compile(before + sign + body + after)
    # A sign directly before the number makes it the negative unless it is a binary minus
    # (preceded by an operand: '10-8', 'x - 8').
    unary_minus = r"(?<![-−])|(?<=[\w)\]}][-−])|(?<=[\w)\]}]\s[-−])"
    return re.compile(before + r"(?:" + unary_minus + r")" + body + after)


def _letter_pattern(letter: str) -> re.Pattern[str]:
    e = re.escape(letter)
    return re.compile(
        rf"\({e}\)|\{{{e}\}}|\${e}\$|\b(?i:answer|option|choice)\s+(?i:is\s+)?\(?{e}\b(?![-'])"
    )


def contains_answer(text: str, answer: str) -> bool:
    """True when ``answer`` (the ground truth) occurs in ``text`` as a standalone
    number/expression (rules in the module docstring). An empty answer never matches."""
    core = _strip_answer(answer)
    if not core:
        return False
    text = _remove_thousands_separators(text)
    core = _remove_thousands_separators(core)
    number = _UNIT_SUFFIX.sub("", core).strip()
    number = number.replace("−", "-")
    if _NUMBER.match(number):
        return bool(_number_pattern(number).search(text))
    frac = _FRAC.match(normalize_latex(core))
    if frac:
        sign, p, q = frac.groups()
        slash = re.compile(
            rf"(?<![\d./]){re.escape(sign)}{p}\s*/\s*{q}(?![\d.])(?!\s*/)"
            if sign
            else rf"(?<![\d./])(?<![\w)\]}}]-)(?<!^-){p}\s*/\s*{q}(?![\d.])(?!\s*/)"
        )
        if slash.search(text):
            return True
    if re.fullmatch(r"[A-Za-z]", core):
        return bool(_letter_pattern(core).search(text))
    needle = normalize_latex(core)
    hay = normalize_latex(text)
    start = hay.find(needle)
    while start >= 0:
        end = start + len(needle)
        glued_before = start > 0 and needle[0].isalnum() and hay[start - 1].isalnum()
        # a trailing digit glues ('2' in '25'); a trailing letter does not ('\\pi' in '\\pi r')
        glued_after = end < len(hay) and needle[-1].isdigit() and hay[end].isdigit()
        if not glued_before and not glued_after:
            return True
        start = hay.find(needle, start + 1)
    return False


def filter_reason(
    text: str,
    *,
    truncated: bool,
    answer: str,
    check_leaks: bool = True,
    check_malformed: bool = True,
    analysis_format: str = "paper",
    instruction: str = "",
    check_copies: bool = True,
) -> str:
    """Why a meta-experience is dropped before replay, or ``"ok"``.

    Checked in order (:data:`FILTER_REASONS`): ``"empty"`` (nothing but whitespace),
    ``"truncated"`` (cut off by the length limit), ``"malformed"`` (a section missing or no
    heuristic, as ``analysis_format``'s parser judges it; only with ``check_malformed``),
    ``"leak"`` (contains the ground truth; only with ``check_leaks``), ``"copied"`` (its lesson
    stands verbatim in the analysis ``instruction``, e.g. the worked example; only with
    ``check_copies``).
    """
    if not text.strip():
        return "empty"
    if truncated:
        return "truncated"
    if check_malformed and get_format(analysis_format).parse(text).malformed:
        return "malformed"
    if check_leaks and contains_answer(text, answer):
        return "leak"
    if check_copies and copies_instruction(text, instruction, analysis_format):
        return "copied"
    return "ok"


def copies_instruction(text: str, instruction: str, analysis_format: str = "paper") -> bool:
    """Whether the analysis's lesson (its rule or heuristics) stands verbatim in the analysis
    instruction: a copied example is not a lesson drawn from the pair, and replaying it only
    tests the example."""
    lesson = lesson_text(get_format(analysis_format).parse(text).as_dict())
    return bool(lesson and lesson.strip()) and lesson.strip() in instruction
