"""Normalisers of a problem file's ground-truth answers and questions.

An answer normaliser takes the raw field value (a string, a number...) and returns the
canonical answer string, raising ``ValueError`` for a value it cannot read; a question
normaliser takes the question string and returns the bare question. A
:class:`~meljax.data.layouts.FieldMap` names one of each (``answer_transform``,
``question_transform``); :func:`default_answer` is used when it names none.
"""

from __future__ import annotations

import math
import re
from typing import Any

from meljax.rewards.extract import last_boxed

__all__ = [
    "answer_after_hashes",
    "answer_from_boxed",
    "answer_integer_string",
    "answer_number",
    "answer_without_dollars",
    "default_answer",
    "question_without_instruction",
]


def _number_to_str(value: int | float) -> str:
    """``27.0`` -> ``"27"``, ``-1.0`` -> ``"-1"``, ``0.5`` -> ``"0.5"``, ``7`` -> ``"7"``."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"answer is not a finite number: {value!r}")
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def default_answer(value: Any) -> str:
    """Default answer normaliser: strings are stripped, numbers printed without ``.0``.

    Raises:
      ValueError: for ``None``, booleans, containers and other non-scalar values.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"answer must be a string or a number, got {value!r}")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float):
        return _number_to_str(value)
    raise ValueError(f"answer must be a string or a number, got {type(value).__name__}")


def answer_after_hashes(value: Any) -> str:
    """GSM8K: the text after the last ``####``, with thousands separators removed."""
    if not isinstance(value, str) or "####" not in value:
        raise ValueError("GSM8K answer has no '####' final-answer marker")
    return value.rsplit("####", 1)[1].strip().replace(",", "")


def answer_integer_string(value: Any) -> str:
    """AIME: ``"025"`` / ``25`` / ``25.0`` -> ``"25"`` (the answer must be an integer)."""
    if isinstance(value, bool):
        raise ValueError(f"answer must be an integer, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return str(int(value))
    raise ValueError(f"answer must be an integer, got {value!r}")


def answer_number(value: Any) -> str:
    """AMC: a number (possibly a float such as ``27.0``) printed as ``"27"``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"answer must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value) if re.search(r"[.eE]", value) else int(value)
        except ValueError as e:
            raise ValueError(f"answer must be a number, got {value!r}") from e
    return _number_to_str(value)


def answer_without_dollars(value: Any) -> str:
    """OlympiadBench: ``"$\\frac{1}{2}$"`` -> ``"\\frac{1}{2}"``; every ``$`` is removed."""
    if not isinstance(value, str):
        raise ValueError(f"answer must be a string, got {value!r}")
    return value.replace("$", "").strip()


def answer_from_boxed(value: Any) -> str:
    """MATH / Minerva: the last ``\\boxed{}`` of a worked solution, read by the verifier's
    extractor (:func:`meljax.rewards.extract.last_boxed`) so that the ground truth and the
    model's answer are taken from a box the same way."""
    if not isinstance(value, str):
        raise ValueError(f"solution must be a string, got {type(value).__name__}")
    boxed = last_boxed(value)
    if boxed is None:
        raise ValueError("solution has no complete, non-empty \\boxed{...} answer")
    return boxed


_TRAILING_INSTRUCTION = re.compile(r"\n[^\n]*(?:please reason|\\boxed\{\})[^\n]*\s*$", re.I)


def question_without_instruction(value: str) -> str:
    """AIME 2025 (QwQ copy): drops the trailing "Please reason step by step..." line.

    Only a last line that looks like an answering instruction is dropped, so a question
    without it passes through unchanged.
    """
    return _TRAILING_INSTRUCTION.sub("", value).strip()
