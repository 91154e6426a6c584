"""The analysis instruction and the replay prompt (docs/mel.md, steps 5 and 7), and prompt filling.

Templates are plain text with named placeholders in braces. Only the known placeholders are
replaced, in a single pass, so LaTeX braces such as ``\\boxed{}`` need no escaping and text that
happens to contain ``{question}`` (inside an answer, say) is never substituted again.

* analysis template: ``{question}``, ``{incorrect_answer}``, ``{correct_answer}`` (all required).
* replay template: ``{experience}``, ``{question}`` (required), ``{instruction}`` (optional; the
  answering instruction, so a run that asks for a bare number can say so here too).

A user replaces either template with :func:`load_template`: a file path or the template text.

The filled analysis prompt must fit ``max_prompt_tokens`` after chat rendering. When it does
not, each answer is shortened in its middle (head and tail kept, a marker such as
``"\\n[... 120 tokens omitted ...]\\n"`` between); the question is never shortened.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "ANALYSIS_FIELDS",
    "DEFAULT_ANALYSIS_TEMPLATE",
    "DEFAULT_REPLAY_INSTRUCTION",
    "DEFAULT_REPLAY_TEMPLATE",
    "REPLAY_FIELDS",
    "FilledPrompt",
    "TokenCutter",
    "fill_analysis_prompt",
    "fill_replay_prompt",
    "fill_template",
    "load_template",
    "omission_marker",
    "shorten_middle",
]

DEFAULT_ANALYSIS_TEMPLATE = """\
You are an analyst of mathematical reasoning. Below are several solutions to one problem. Each \
one is labelled Correct or Incorrect, judged by its final answer only.

Study them and write an analysis that meets these requirements:
1. Correct solutions: explain what made their reasoning robust, or where they noticed and \
repaired a slip.
2. Incorrect solutions: find the exact step where the reasoning first went wrong (the \
bifurcation point), name the faulty habit behind it, and state the fact or constraint it broke.
3. Comparison: explain why the correct solution avoided the trap that caught the incorrect one.
4. Generalization: state every lesson as an abstract rule ("If ..., then ...", "When dealing \
with ..., I must check ..."). Never mention this problem's specific numbers, variables or final \
answer.

Write the analysis in these four sections, in this order:
1. Failure point and error pattern
2. Success factors
3. Reflective summary (first person: review, insight, action)
4. Heuristics (general rules)

<question>
{question}
</question>

Solution 1:
<answer>
{incorrect_answer}
</answer>
<judge>Incorrect</judge>

Solution 2:
<answer>
{correct_answer}
</answer>
<judge>Correct</judge>"""
"""Default analysis instruction (the paper's structure, this project's wording)."""

DEFAULT_REPLAY_INSTRUCTION = (
    "Please reason step by step, and put your final answer within \\boxed{}."
)
"""Default answering instruction inserted at the replay template's ``{instruction}``."""

DEFAULT_REPLAY_TEMPLATE = """\
An earlier study of this problem produced the following notes on key approaches, typical \
mistakes and heuristics:

<experience>
{experience}
</experience>

Take these notes in as your own experience, then solve the problem below yourself.
{instruction}

<question>
{question}
</question>"""
"""Default replay prompt (the paper's structure, this project's wording)."""

ANALYSIS_FIELDS: tuple[str, ...] = ("question", "incorrect_answer", "correct_answer")
REPLAY_FIELDS: tuple[str, ...] = ("experience", "question")


def _placeholder_names(template: str) -> set[str]:
    return set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template))


def load_template(
    spec: str | None, *, default: str, required: Sequence[str], what: str = "template"
) -> str:
    """Resolves a template given in a config.

    Args:
      spec: ``None`` or ``""`` (use ``default``), a path to a UTF-8 text file, or the template
        text itself. A single-line string naming an existing file is read as a file; a
        single-line string with no placeholder is taken for a missing file.
      default: the built-in template.
      required: placeholders the template must contain.
      what: name used in error messages (e.g. ``"analysis_template"``).

    Raises:
      FileNotFoundError: ``spec`` looks like a path but no such file exists.
      ValueError: the template lacks a required placeholder.
    """
    if not spec:
        text = default
        source = "the default"
    elif "\n" not in spec and os.path.isfile(os.path.expanduser(spec)):
        path = os.path.expanduser(spec)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        source = path
    elif "\n" not in spec and not _placeholder_names(spec):
        raise FileNotFoundError(
            f"{what}: {spec!r} is neither an existing file nor a template with placeholders"
        )
    else:
        text = spec
        source = "the given text"
    missing = [f for f in required if "{" + f + "}" not in text]
    if missing:
        fields = ", ".join("{" + f + "}" for f in missing)
        raise ValueError(f"{what} ({source}) lacks the placeholder(s) {fields}")
    return text


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Replaces each ``{name}`` whose ``name`` is a key of ``values``, in one pass.

    Other brace groups (``\\boxed{}``, ``{x}``) are left as they are, and substituted text is
    never scanned again.
    """
    if not values:
        return template
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


def omission_marker(n: int) -> str:
    """The text put in place of ``n`` omitted tokens of a shortened answer."""
    return f"\n[... {n} tokens omitted ...]\n"


class TokenCutter:
    """Counts tokens and cuts texts at token boundaries with a ``transformers`` tokenizer.

    Uses the fast tokenizer's character offsets when available, so a cut never splits a
    multi-byte character; otherwise decodes token slices.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def split(self, text: str, head: int, tail: int) -> tuple[str, str, int]:
        """Returns ``(first head tokens, last tail tokens, total token count)`` of ``text``."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            n = len(offsets)
            if head + tail >= n:
                return text, "", n
            head_end = offsets[head - 1][1] if head > 0 else 0
            tail_start = offsets[n - tail][0] if tail > 0 else len(text)
            return text[:head_end], text[tail_start:], n
        ids = self.ids(text)
        n = len(ids)
        if head + tail >= n:
            return text, "", n
        dec = self.tokenizer.decode
        return dec(ids[:head]), dec(ids[n - tail :]) if tail else "", n


def shorten_middle(text: str, max_tokens: int, cutter: TokenCutter) -> tuple[str, int]:
    """Shortens ``text`` to about ``max_tokens`` tokens by replacing its middle with a marker.

    The head keeps the larger half of the kept tokens. The marker's own tokens count towards
    ``max_tokens``; tokenizers that merge across the seams may add a token or two, which the
    caller's re-check absorbs.

    Returns:
      ``(text, omitted)``: the (possibly) shortened text and how many tokens were dropped
      (0 when the text already fits).
    """
    n = cutter.count(text)
    if n <= max_tokens:
        return text, 0
    omitted = n - max_tokens
    for _ in range(3):  # the marker's length depends on the number it prints
        keep = max(0, max_tokens - cutter.count(omission_marker(omitted)))
        omitted = n - keep
    head = (keep + 1) // 2
    tail = keep - head
    head_text, tail_text, _ = cutter.split(text, head, tail)
    return head_text + omission_marker(omitted) + tail_text, omitted


@dataclasses.dataclass(frozen=True)
class FilledPrompt:
    """A rendered analysis prompt.

    Attributes:
      text: the full prompt as the policy sees it (chat template applied).
      ids: its token ids ``[len]`` (what the sampler gets and the NLL context is).
      omitted: tokens dropped from (incorrect answer, correct answer); 0 when not shortened.
    """

    text: str
    ids: list[int]
    omitted: tuple[int, int]


def _split_budget(budget: int, lengths: tuple[int, int]) -> tuple[int, int]:
    """Shares ``budget`` tokens between two answers: a short one keeps all it has, the other
    gets the rest; two long ones get half each."""
    a, b = lengths
    half = budget // 2
    if a <= half:
        return a, budget - a
    if b <= budget - half:
        return budget - b, b
    return budget - half, half


def fill_analysis_prompt(
    question: str,
    incorrect_answer: str,
    correct_answer: str,
    *,
    template: str,
    render: Callable[[str], str],
    encode: Callable[[str], list[int]],
    cutter: TokenCutter,
    max_prompt_tokens: int,
    min_answer_tokens: int = 16,
) -> FilledPrompt | None:
    """Fills the analysis template and renders it, shortening the answers to fit.

    Args:
      question, incorrect_answer, correct_answer: the texts (the answers as sampled).
      template: the analysis template (see :data:`DEFAULT_ANALYSIS_TEMPLATE`).
      render: user-message text -> full prompt text (chat template and all).
      encode: full prompt text -> token ids, exactly as the sampler is fed.
      cutter: counts and cuts the answers' tokens.
      max_prompt_tokens: the rendered prompt's token limit.
      min_answer_tokens: an answer is never cut below this many tokens (head + tail + marker).

    Returns:
      The filled prompt, or ``None`` when even answers of ``min_answer_tokens`` do not fit
      (the question and template alone are too long).
    """

    def build(inc: str, cor: str) -> tuple[str, list[int]]:
        values = {"question": question, "incorrect_answer": inc, "correct_answer": cor}
        text = render(fill_template(template, values))
        return text, list(encode(text))

    text, ids = build(incorrect_answer, correct_answer)
    if len(ids) <= max_prompt_tokens:
        return FilledPrompt(text, ids, (0, 0))
    _, base_ids = build("", "")
    budget = max_prompt_tokens - len(base_ids)
    lengths = (cutter.count(incorrect_answer), cutter.count(correct_answer))
    # Token counts are not additive across the seams, so re-check and tighten a few times.
    for _ in range(4):
        if budget < 2 * min_answer_tokens:
            return None
        limits = _split_budget(budget, lengths)
        inc, omit_inc = shorten_middle(incorrect_answer, limits[0], cutter)
        cor, omit_cor = shorten_middle(correct_answer, limits[1], cutter)
        text, ids = build(inc, cor)
        if len(ids) <= max_prompt_tokens:
            return FilledPrompt(text, ids, (omit_inc, omit_cor))
        budget -= len(ids) - max_prompt_tokens
    return None


def fill_replay_prompt(
    experience: str, question: str, *, template: str, instruction: str = DEFAULT_REPLAY_INSTRUCTION
) -> str:
    """The replay user message: the meta-experience, the instruction and the question."""
    return fill_template(
        template,
        {"experience": experience.strip(), "question": question, "instruction": instruction},
    )
