"""Layouts of problem files: where a row keeps its question, answer and id.

Files in the wild store problems under many layouts (nested chat messages, answers inside
``\\boxed{}`` of a worked solution, zero-padded strings, floats...). A :class:`FieldMap`
describes one: the field paths (:mod:`meljax.data.fieldpath`) of the question, answer and id,
their normalisers (:mod:`meljax.data.answers`) and the file format. :data:`PRESETS` holds the
layouts of the benchmark and training files described in ``shared/data/README.md``;
:func:`infer_preset` picks one from a file's path, and :data:`GENERIC_FIELDS` is the layout of
a file no preset matches.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from meljax.data.answers import (
    answer_after_hashes,
    answer_from_boxed,
    answer_integer_string,
    answer_number,
    answer_without_dollars,
    question_without_instruction,
)
from meljax.data.fieldpath import parse_path

__all__ = [
    "GENERIC_FIELDS",
    "PRESETS",
    "FieldMap",
    "file_format",
    "generic_layout_hint",
    "infer_preset",
    "layout_for_row",
]

FileFormat = Literal["jsonl", "json", "parquet"]


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Where a file keeps question, answer and id, and how to normalise them.

    Attributes:
      question_field: path to the question (``"problem"``, ``"prompt[0].content"``).
      answer_field: path to the ground truth (``"reward_model.ground_truth"``).
      id_field: path to an id, or ``None`` to use ``"{id_prefix}{row_index}"``.
      answer_transform: raw answer value -> answer string; raises ``ValueError`` for a bad
        value. Defaults to :func:`default_answer`.
      question_transform: question string -> bare question (e.g. drop an instruction).
      drop_empty_answers: rows whose answer is ``None`` or blank are filtered out silently
        (counted in :attr:`LoadResult.num_filtered`) instead of being bad rows.
      extra_fields: top-level fields copied into :attr:`Problem.extra`; ``None`` copies
        every top-level field except the question's and answer's own.
      file_format: ``"jsonl"``, ``"json"`` or ``"parquet"``; ``None`` infers it from the
        file suffix.
      default_file: file name used when :func:`load_problems` is given a folder.
      id_prefix: prefix of ids built from row indices (and of ``id_field`` values).
    """

    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    answer_transform: Callable[[Any], str] | None = None
    question_transform: Callable[[str], str] | None = None
    drop_empty_answers: bool = False
    extra_fields: tuple[str, ...] | None = None
    file_format: FileFormat | None = None
    default_file: str | None = None
    id_prefix: str = ""

    def __post_init__(self) -> None:
        # Fail at construction, not at row 0, on a malformed path.
        for name in ("question_field", "answer_field", "id_field"):
            value = getattr(self, name)
            if value is not None:
                parse_path(value)


PRESETS: dict[str, FieldMap] = {
    "dapo_math_17k": FieldMap(
        question_field='prompt[0]["content"]',
        answer_field='reward_model["ground_truth"]',
        id_field="extra_info.index",
        answer_transform=answer_integer_string,
        extra_fields=("data_source", "ability"),
        file_format="parquet",
        default_file="dapo_math_17k.parquet",
        id_prefix="dapo_math_17k/",
    ),
    "math": FieldMap(
        question_field="problem",
        answer_field="answer",
        id_field="unique_id",
        default_file="test.jsonl",
        id_prefix="math/",
    ),
    "math500": FieldMap(
        question_field="problem",
        answer_field="answer",
        id_field="unique_id",
        default_file="test.jsonl",
        id_prefix="math500/",
    ),
    "math_train": FieldMap(
        question_field="problem",
        answer_field="answer",
        drop_empty_answers=True,
        default_file="math.json",
        id_prefix="math_train/",
    ),
    "math_test": FieldMap(
        question_field="problem",
        answer_field="solution",
        id_field="idx",
        answer_transform=answer_from_boxed,
        extra_fields=("level", "type", "solution"),
        default_file="test.jsonl",
        id_prefix="math_test/",
    ),
    "minerva_math": FieldMap(
        question_field="problem",
        answer_field="solution",
        id_field="idx",
        answer_transform=answer_from_boxed,
        extra_fields=("type", "solution"),
        default_file="test.jsonl",
        id_prefix="minerva_math/",
    ),
    "gsm8k": FieldMap(
        question_field="question",
        answer_field="answer",
        answer_transform=answer_after_hashes,
        default_file="test.jsonl",
        id_prefix="gsm8k/",
    ),
    "aime24": FieldMap(
        question_field="problem",
        answer_field="answer",
        id_field="id",
        answer_transform=answer_integer_string,
        extra_fields=("url", "solution"),
        default_file="test.jsonl",
        id_prefix="aime24/",
    ),
    "aime25": FieldMap(
        question_field="prompt",
        answer_field="answer",
        answer_transform=answer_integer_string,
        question_transform=question_without_instruction,
        default_file="aime25.jsonl",
        id_prefix="aime25/",
    ),
    "amc23": FieldMap(
        question_field="problem",
        answer_field="answer",
        id_field="id",
        answer_transform=answer_number,
        extra_fields=("url",),
        default_file="test.jsonl",
        id_prefix="amc23/",
    ),
    "olympiadbench": FieldMap(
        question_field="question",
        answer_field="final_answer[0]",
        id_field="id",
        answer_transform=answer_without_dollars,
        extra_fields=("subfield", "is_multiple_answer", "unit", "answer_type", "error"),
        default_file="test.jsonl",
        id_prefix="olympiadbench/",
    ),
}
"""Layouts of the files in ``shared/data/`` (see its README), by folder name."""


def _split_path(path: str) -> list[str]:
    """Path components without a scheme, e.g. ``gs://b/x/y.jsonl`` -> ``[b, x, y.jsonl]``."""
    return [p for p in re.sub(r"^[a-zA-Z][\w+.-]*://", "", path).split("/") if p]


def _stem(name: str) -> str:
    return name.split(".", 1)[0]


def infer_preset(path: str) -> str | None:
    """Guesses a preset from the file's folder name, then from the file name itself.

    ``.../math500/test.jsonl`` -> ``"math500"``; ``.../aime25.jsonl`` -> ``"aime25"``;
    a folder path such as ``.../gsm8k`` -> ``"gsm8k"``. Returns ``None`` when nothing
    matches.
    """
    parts = _split_path(path)
    if not parts:
        return None
    last = parts[-1]
    # The folder name comes before the file stem: math_train/math.json is "math_train",
    # not "math".
    candidates = [last] if "." not in last else []
    if len(parts) >= 2:
        candidates.append(parts[-2])
    candidates.append(_stem(last))
    return next((c for c in candidates if c in PRESETS), None)


def file_format(path: str, fields: FieldMap) -> FileFormat:
    """The format ``path`` is read as: ``fields.file_format``, else from its suffix."""
    if fields.file_format is not None:
        return fields.file_format
    name = _split_path(path)[-1].lower() if _split_path(path) else path
    if name.endswith((".jsonl", ".ndjson", ".jsonl.txt")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(
        f"Cannot tell the format of {path!r} from its suffix; use a .jsonl, .json or "
        f".parquet file or set FieldMap.file_format"
    )


GENERIC_FIELDS = FieldMap()
"""The layout of a file no preset matches: ``question`` and ``answer`` fields (``id`` too when
the first row has one), as the README describes."""


def layout_for_row(row: Any) -> FieldMap:
    """:data:`GENERIC_FIELDS`, reading ``id`` too when ``row`` has a string or integer one."""
    if isinstance(row, Mapping) and isinstance(row.get("id"), str | int):
        return dataclasses.replace(GENERIC_FIELDS, id_field="id")
    return GENERIC_FIELDS


def generic_layout_hint() -> str:
    """What a row needs without a preset (for error messages)."""
    return (
        f"without a preset, rows need 'question' and 'answer' fields; name a preset "
        f"(known: {', '.join(sorted(PRESETS))}) or the fields (FieldMap(question_field=..., "
        f"answer_field=...))"
    )
