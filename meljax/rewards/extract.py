"""Final-answer extraction from model completions (pure string work, no math parsing).

Everything here is linear-time string scanning: no regex with nested quantifiers over model
output, no eval/exec/sympify. The extracted answer is later handed to math-verify's LaTeX
parser by :mod:`meljax.rewards.verify`.
"""

from __future__ import annotations

import re
from typing import Literal

ExtractMode = Literal["boxed", "last_number", "boxed_or_last_number"]
MODES: tuple[str, ...] = ("boxed", "last_number", "boxed_or_last_number")

# A box command: `\boxed` or `\fbox` as a whole control word (not `\fboxsep`), then any
# whitespace; its argument starts where the match ends.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")

# A number as written in prose. Alternatives, tried left to right at each position:
#   1,000 / -12,345.5  (thousands commas: groups of exactly three digits)
#   3/4 / -3.5 / 42     (integer fraction, decimal, integer)
#   .5                  (leading-dot decimal)
# The minus sign counts only when it is not a binary minus ("3-5" gives 5, not -5), and a
# number glued to a word or a dot on its left ("x2", "v1.2") is not taken.
_NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?:(?<![\w)\]}])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]\d)"
    r"|\d+(?:\.\d+)?(?:/\d+)?"
    r"|\.\d+)"
    r"(?!\d)"
)


def clip_tail(text: str, max_chars: int) -> str:
    """Keeps the last `max_chars` characters of `text` (the final answer sits at the end)."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    return text if len(text) <= max_chars else text[-max_chars:]


def match_braces(text: str, start: int) -> int | None:
    """Index just past the `}` closing the group whose content starts at `text[start]`.

    Escaped braces (`\\{`, `\\}`) and any other backslash pair are skipped, so LaTeX sets
    such as `\\{1, 2\\}` do not disturb the count. Returns None when the group never closes.
    """
    depth = 1
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _bare_argument_end(text: str, start: int) -> int | None:
    """End of a brace-less box argument (`\\boxed 5`) starting at `text[start]`.

    It runs to the next whitespace, `$` or unmatched `}`; brace groups inside it are skipped
    whole (`\\boxed x^{2}` gives `x^{2}`). TeX would take a single token, but `\\boxed 42`
    means 42 wherever it is written (the MATH convention). None when a group never closes.
    """
    i, n = start, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace() or ch in "$}":
            break
        if ch == "\\":
            i += 2
        elif ch == "{":
            end = match_braces(text, i + 1)
            if end is None:
                return None
            i = end
        else:
            i += 1
    return min(i, n)


def last_boxed_span(text: str) -> tuple[int, int] | None:
    """`(start, end)` of the argument of the last `\\boxed` / `\\fbox` command in `text`.

    The argument is a brace group (`\\boxed{...}`, `\\boxed {...}`; `text[start:end]` is its
    content without the outer braces) or, as LaTeX also accepts, a brace-less word
    (`\\boxed 5`, see `_bare_argument_end`). None when there is no box or the last one has no
    complete argument (a truncated completion): the last box is the answer, never an earlier one.
    """
    last = None
    for last in _BOX_COMMAND.finditer(text):  # noqa: B007 - only the last match is needed
        pass
    if last is None:
        return None
    start = last.end()
    if text.startswith("{", start):
        end = match_braces(text, start + 1)
        return None if end is None else (start + 1, end - 1)
    end = _bare_argument_end(text, start)
    return None if end is None or end == start else (start, end)


def last_boxed(text: str) -> str | None:
    """The final answer in the last box of `text`: the content of its argument, stripped.

    The one boxed-answer extractor: the verifier reads completions with it and the data
    readers read worked solutions (MATH, Minerva) with it, so both agree on what a box holds.
    Nested braces are kept (`\\boxed{\\frac{a}{b^{2}}}` gives `\\frac{a}{b^{2}}`). Returns None
    when there is no box, when the last box is never closed (a truncated completion), or when
    it is empty.
    """
    span = last_boxed_span(text)
    if span is None:
        return None
    content = text[span[0] : span[1]].strip()
    return content or None


def last_number(text: str) -> str | None:
    """The last number written in `text`, normalised for parsing, or None.

    Handles integers, decimals, negative numbers, thousands commas and simple integer fractions:
    "3 + 5 = 8." gives "8", "The answer is 1,000" gives "1000", "-3.5" gives "-3.5",
    "3/4" gives "3/4". Thousands commas are removed because a bare "1,000" would otherwise be
    read as the set {1, 0} by a LaTeX parser.
    """
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - only the last match is needed
        pass
    if last is None:
        return None
    return last.group(0).replace(",", "")


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    """Extracts the final answer of a completion.

    Args:
      text: the completion (callers clip it first, see `clip_tail`).
      mode: "boxed" (last complete `\\boxed{}`), "last_number" (last number in the text) or
        "boxed_or_last_number" (the last complete box when there is one, else the last number).

    Returns:
      The answer string, or None when nothing could be extracted.
    """
    if mode == "boxed":
        return last_boxed(text)
    if mode == "last_number":
        return last_number(text)
    if mode == "boxed_or_last_number":
        boxed = last_boxed(text)
        return boxed if boxed is not None else last_number(text)
    raise ValueError(f"unknown extraction mode {mode!r}; expected one of {MODES}")


def nesting_depth(text: str) -> int:
    """Deepest nesting of (), [] and {} in `text`, all counted together, escaped or not.

    Used to reject adversarial answers before parsing: the LaTeX grammar's run time grows
    very fast with nesting (measured with math-verify 0.9 on one core: about 1.7 s for 10
    nested braces, 6.5 s for 20).
    """
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            best = max(best, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return best
