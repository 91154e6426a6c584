"""Scoring of one completion against its ground truth with math-verify.

The model's text never reaches eval/exec/sympify: we extract the answer ourselves
(:mod:`meljax.rewards.extract`) and give math-verify only its LaTeX extraction target, whose
parser is an ANTLR grammar. math-verify's plain-expression target (`ExprExtractionConfig`)
is not used because it runs `sympy.parse_expr`, which evaluates Python code.

`score_one` has no time limit of its own: callers run it under `meljax.rewards.pool`, which
adds a per-item timer and worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any

from meljax.config.schema import option, validate_fields
from meljax.rewards.extract import MODES, clip_tail, extract_answer, nesting_depth

REASONS: tuple[str, ...] = ("correct", "no_answer", "parse_error", "mismatch", "timeout", "crash")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How completions are scored (config section ``reward``; see ``meljax.config.schema``)."""

    mode: str = option(
        "boxed", "answer extraction: boxed | last_number | boxed_or_last_number", choices=MODES
    )
    timeout_s: float = option(
        5.0, "per-answer time limit (s); a hung answer scores 0", minimum=1e-3
    )
    timeout_after_first_s: float = option(
        0.5,
        "once an answer of a batch has timed out, the answers that start after it get this "
        "limit (s; at most timeout_s): a batch of hanging answers costs about one timeout, not "
        "one each",
        minimum=1e-3,
    )
    num_workers: int = option(2, "verifier processes (0 = in the calling process)", minimum=0)
    max_input_chars: int = option(
        20_000, "completions are clipped to their last this many characters first", minimum=1
    )
    max_answer_chars: int = option(1_000, "the extracted answer is clipped to this", minimum=1)
    max_nesting_depth: int = option(
        12, "answers nesting (), [] and {} deeper score 0 (parse_error) unparsed", minimum=1
    )
    float_rounding: int = option(6, "decimal places math-verify rounds floats to")
    numeric_precision: int = option(15, "significant digits of math-verify's comparison")
    strict: bool = option(True, "math-verify strict mode (variable names matter)")

    def __post_init__(self) -> None:
        validate_fields(self)


CORRECT_SCORE = 1.0
"""The score of a verified answer; every other outcome scores 0."""


def is_correct(score: Any) -> Any:
    """THE definition of a correct answer, for rollouts, MEL pairs and replay, and evaluation:
    its reward is the verified score (a float, or an array of them, elementwise)."""
    import numpy as np

    out = np.asarray(score) >= CORRECT_SCORE
    return bool(out) if out.ndim == 0 else out


def is_mixed(rewards: Any) -> Any:
    """bool ``[N]``: groups (rows of ``rewards [N, G]``) with both a correct and an incorrect
    answer; the groups MEL draws pairs from and the ones with a non-zero GRPO advantage."""
    import numpy as np

    correct = np.atleast_2d(is_correct(rewards))
    return correct.any(axis=1) & ~correct.all(axis=1)


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Score of one completion.

    Attributes:
      score: 1.0 when the answer matches the ground truth, else 0.0.
      reason: one of `REASONS`.
      extracted: the answer extracted from the completion (clipped), or None when none was
        found or the item timed out / crashed.
    """

    score: float
    reason: str
    extracted: str | None = None


def _drop_timeout_disabled_warning(record: logging.LogRecord) -> bool:
    # We switch math-verify's own signal timeouts off on purpose (our pool times items out),
    # so its "Timeout is disabled" warning is noise in every worker's stderr.
    return "Timeout is disabled" not in str(record.msg)


_math_verify: Any = None


def _mv() -> Any:
    """Imports math-verify on first use, so that `import meljax` stays light."""
    global _math_verify
    if _math_verify is None:
        import math_verify

        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_drop_timeout_disabled_warning)
        _math_verify = math_verify
    return _math_verify


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _strip_math_delimiters(answer: str) -> str:
    """`$5$` -> `5`: a box's content is already math, delimiters would confuse the parser.

    Escaped dollars (`\\$36`, a currency sign) are kept.
    """
    answer = answer.strip()
    while (
        len(answer) >= 2 and answer[0] == "$" and _UNESCAPED_DOLLAR.match(answer, len(answer) - 1)
    ):
        answer = answer[1:-1].strip()
    return answer


def _parse(latex: str) -> list[Any]:
    """math-verify parse with only its LaTeX target (no `parse_expr`), never raising.

    Returns [sympy object, normalised string] on success, [string] when only the string
    fallback exists, [] when nothing matched.
    """
    mv = _mv()
    return mv.parse(
        latex,
        extraction_config=[mv.LatexExtractionConfig()],
        fallback_mode="first_match",
        parsing_timeout=None,
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(answer: str) -> tuple[Any, ...]:
    if "\\boxed" in answer or _UNESCAPED_DOLLAR.search(answer):
        return tuple(_parse(answer))
    return tuple(_parse("\\boxed{" + answer + "}"))


def parse_gold(answer: str) -> list[Any]:
    """Parses a ground-truth answer; a bare string is wrapped in `\\boxed{}` first.

    Cached per process: a GRPO step scores G completions per question against the same gold,
    and parsing the gold costs about as much as parsing the prediction. (An interrupted parse
    raises, so it is never cached.)
    """
    return list(_parse_gold_cached(answer.strip()))


def _has_math(parsed: list[Any]) -> bool:
    return any(not isinstance(p, str) for p in parsed)


def score_one(completion: str, answer: str, config: RewardConfig) -> RewardResult:
    """Scores one completion against its ground truth, in the calling process.

    Args:
      completion: the model's text (any length; clipped to `config.max_input_chars`).
      answer: the ground-truth answer, a LaTeX string such as "\\frac{1}{2}" or "025".
      config: extraction mode and limits.

    Returns:
      A `RewardResult` with reason "correct", "no_answer", "parse_error" or "mismatch".
      No time limit is applied here (see `meljax.rewards.pool`).
    """
    text = clip_tail(completion, config.max_input_chars)
    extracted = extract_answer(text, config.mode)
    if extracted is None:
        return RewardResult(0.0, "no_answer", None)
    extracted = _strip_math_delimiters(extracted)[: config.max_answer_chars]
    if not extracted:
        return RewardResult(0.0, "no_answer", None)
    if nesting_depth(extracted) > config.max_nesting_depth:
        return RewardResult(0.0, "parse_error", extracted)

    gold = parse_gold(answer)
    pred = _parse("\\boxed{" + extracted + "}")
    if not pred:
        return RewardResult(0.0, "parse_error", extracted)
    # Gold first: math-verify's comparison is not symmetric (e.g. `x=3` gold accepts `3`).
    ok = _mv().verify(
        gold,
        pred,
        float_rounding=config.float_rounding,
        numeric_precision=config.numeric_precision,
        strict=config.strict,
        timeout_seconds=None,
    )
    if ok:
        return RewardResult(1.0, "correct", extracted)
    if not (_has_math(gold) and _has_math(pred)):
        return RewardResult(0.0, "parse_error", extracted)
    return RewardResult(0.0, "mismatch", extracted)
