"""The :class:`Problem` record and :func:`load_problems`, which reads problems from local or
remote JSONL / JSON / Parquet files.

A *problem* is a question with one verifiable ground-truth answer. A row of a file becomes a
:class:`Problem` through a layout (:class:`~meljax.data.layouts.FieldMap`, a preset of
:data:`~meljax.data.layouts.PRESETS` or the generic one); a row that lacks a usable question or
answer is a bad row, raised as :class:`BadRowError` or skipped and counted
(:class:`LoadResult`). :func:`problem_from_row` converts one row for random-access sources.

Entry point: :func:`load_problems`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

from meljax.data.answers import default_answer
from meljax.data.fieldpath import get_path, parse_path
from meljax.data.layouts import (
    GENERIC_FIELDS,
    PRESETS,
    FieldMap,
    file_format,
    generic_layout_hint,
    infer_preset,
    layout_for_row,
)
from meljax.data.readers import READERS, Row

__all__ = [
    "BadRow",
    "BadRowError",
    "LoadResult",
    "Problem",
    "load_problems",
    "problem_from_row",
]

OnBadRow = Literal["error", "skip"]


# ---------------------------------------------------------------------------------------
# The record.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question with a verifiable ground-truth answer.

    Attributes:
      id: identifier, unique within its source file (e.g. ``"math500/test/precalculus/807"``).
      question: the bare problem text, without any answering instruction.
      answer: the normalised ground truth as a string (e.g. ``"27"``, ``"\\frac{1}{2}"``).
      extra: the row's other fields (metadata such as subject or level). Excluded from the
        hash so that problems stay hashable even though the dict is not.
    """

    id: str
    question: str
    answer: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def to_json_dict(self) -> dict[str, Any]:
        """Returns a plain dict (``id``, ``question``, ``answer``, ``extra``) for JSON."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> Problem:
        """Inverse of :meth:`to_json_dict`; ``extra`` may be missing."""
        for key in ("id", "question", "answer"):
            if not isinstance(d.get(key), str):
                raise ValueError(f"Problem record needs a string {key!r}, got {d.get(key)!r}")
        return cls(
            id=d["id"], question=d["question"], answer=d["answer"], extra=dict(d.get("extra") or {})
        )


# ---------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------


class BadRowError(ValueError):
    """A row lacks a usable question or answer (raised when ``on_bad_row="error"``)."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A skipped row: its 0-based index in the file and why it was skipped."""

    index: int
    reason: str


@dataclasses.dataclass(frozen=True)
class LoadResult(Sequence[Problem]):
    """Problems read from one file; a random-access sequence of :class:`Problem`.

    Attributes:
      problems: the problems in file order.
      path: the file they were read from.
      preset: the preset used, or ``None`` for a custom :class:`FieldMap`.
      num_skipped: bad rows skipped (only with ``on_bad_row="skip"``).
      num_filtered: rows dropped on purpose by the layout (``drop_empty_answers``).
      bad_rows: index and reason of each skipped row.
    """

    problems: tuple[Problem, ...]
    path: str
    preset: str | None = None
    num_skipped: int = 0
    num_filtered: int = 0
    bad_rows: tuple[BadRow, ...] = ()

    @overload
    def __getitem__(self, index: int) -> Problem: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Problem, ...]: ...
    def __getitem__(self, index):
        return self.problems[index]

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


def _is_dir(path: str) -> bool:
    if "://" not in path:
        import os

        return os.path.isdir(path)
    try:
        from etils import epath

        return epath.Path(path).is_dir()
    except Exception:  # noqa: BLE001 - unknown remote: treat as a file, opening will tell
        return False


class _Filtered(Exception):
    """The layout drops this row on purpose (e.g. an empty answer in MATH train)."""


def _row_to_problem(row: Any, index: int, fields: FieldMap) -> Problem:
    """Converts one decoded row; raises ``ValueError`` / ``LookupError`` if it is bad."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, Mapping):
        raise ValueError(f"row is a {type(row).__name__}, not an object")

    try:
        raw_answer = get_path(row, fields.answer_field)
    except LookupError:
        if fields.drop_empty_answers:
            raise _Filtered() from None
        raise
    if fields.drop_empty_answers and (
        raw_answer is None or (isinstance(raw_answer, str) and not raw_answer.strip())
    ):
        raise _Filtered()

    question = get_path(row, fields.question_field)
    if not isinstance(question, str):
        raise ValueError(
            f"question {fields.question_field!r} is a {type(question).__name__}, not a string"
        )
    if fields.question_transform is not None:
        question = fields.question_transform(question)
    question = question.strip()
    if not question:
        raise ValueError(f"question {fields.question_field!r} is empty")

    transform = fields.answer_transform or default_answer
    try:
        answer = transform(raw_answer)
    except ValueError as e:
        raise ValueError(f"answer {fields.answer_field!r}: {e}") from None
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"answer {fields.answer_field!r} is empty (raw value {raw_answer!r})")

    if fields.id_field is not None:
        raw_id = get_path(row, fields.id_field)
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            raise ValueError(f"id {fields.id_field!r} is not a string or an integer: {raw_id!r}")
        problem_id = f"{fields.id_prefix}{raw_id}"
    else:
        problem_id = f"{fields.id_prefix}{index}"

    used = {_top_key(fields.question_field), _top_key(fields.answer_field)}
    if fields.extra_fields is None:
        extra = {k: v for k, v in row.items() if k not in used}
    else:
        extra = {k: row[k] for k in fields.extra_fields if k in row}
    return Problem(id=problem_id, question=question, answer=answer.strip(), extra=extra)


def problem_from_row(row: Any, index: int, fields: FieldMap) -> Problem:
    """One decoded row (a dict) -> :class:`Problem` with the layout ``fields``.

    For random-access sources (tfds records) that convert rows one at a time; the row
    ``index`` gives the id when the layout names no id field.

    Raises:
      ValueError / LookupError: the row lacks a usable question or answer (a row that the
        layout would drop on purpose, ``drop_empty_answers``, is an error here too).
    """
    try:
        return _row_to_problem(row, index, fields)
    except _Filtered:
        raise ValueError(f"answer {fields.answer_field!r} is empty") from None


def _top_key(path: str) -> str | int:
    return parse_path(path)[0]


def _first_row(reader: Callable[[str], Iterator[Row]], path: str) -> Any:
    for _, row in reader(path):
        return row
    return None


def _resolve_fields(
    path: str, preset: str | None, fields: FieldMap | Mapping[str, Any] | None
) -> tuple[str | None, FieldMap]:
    if preset is None and fields is None:
        preset = infer_preset(path)
        if preset is None:
            return None, GENERIC_FIELDS
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset] if preset is not None else FieldMap()
    if fields is None:
        return preset, base
    if isinstance(fields, FieldMap):
        return preset, fields
    try:
        return preset, dataclasses.replace(base, **dict(fields))
    except TypeError as e:
        names = ", ".join(f.name for f in dataclasses.fields(FieldMap))
        raise ValueError(f"Bad fields= override {dict(fields)!r}: {e}; fields are {names}") from e


def load_problems(
    path: str,
    preset: str | None = None,
    *,
    fields: FieldMap | Mapping[str, Any] | None = None,
    on_bad_row: OnBadRow = "error",
    limit: int | None = None,
) -> LoadResult:
    """Reads problems from a JSONL, JSON-list or Parquet file (local or remote).

    Args:
      path: a file, or a folder holding the preset's ``default_file``. Remote URLs
        (``gs://``, ``hf://``...) are opened with ``etils.epath`` or ``fsspec``.
      preset: a key of :data:`PRESETS`; inferred from the folder / file name when ``None``
        and ``fields`` is not given. When no preset matches, rows are read with the README's
        layout (:data:`GENERIC_FIELDS`: ``question``, ``answer``, and ``id`` when the first
        row has one); a row without those fields is a bad row whose message names the
        missing field.
      fields: a :class:`FieldMap` replacing the preset's layout, or a dict of
        :class:`FieldMap` attributes overriding it (e.g. ``{"answer_field": "target"}``).
      on_bad_row: ``"error"`` raises :class:`BadRowError` naming the file and the 0-based
        row index; ``"skip"`` drops the row and counts it in ``num_skipped``.
      limit: stop after this many problems (``None``: all).

    Returns:
      A :class:`LoadResult` (a sequence of :class:`Problem`).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = str(path)
    preset, field_map = _resolve_fields(path, preset, fields)
    generic = field_map is GENERIC_FIELDS
    if _is_dir(path):
        if field_map.default_file is None:
            hint = f"; name a file, or {generic_layout_hint()}" if generic else ""
            raise ValueError(f"{path!r} is a folder and the layout names no default_file{hint}")
        path = path.rstrip("/") + "/" + field_map.default_file

    reader = READERS[file_format(path, field_map)]
    if generic:
        field_map = layout_for_row(_first_row(reader, path))
    problems: list[Problem] = []
    bad_rows: list[BadRow] = []
    num_filtered = 0
    if limit == 0:
        return LoadResult(problems=(), path=path, preset=preset)
    for index, row in reader(path):
        try:
            problems.append(_row_to_problem(row, index, field_map))
        except _Filtered:
            num_filtered += 1
            continue
        except (ValueError, LookupError) as e:
            reason = str(e)
            if generic and isinstance(e, LookupError):
                reason += f" ({generic_layout_hint()})"
            if on_bad_row == "error":
                raise BadRowError(f"{path}: row {index}: {reason}") from e
            bad_rows.append(BadRow(index=index, reason=reason))
            continue
        if limit is not None and len(problems) >= limit:
            break
    return LoadResult(
        problems=tuple(problems),
        path=path,
        preset=preset,
        num_skipped=len(bad_rows),
        num_filtered=num_filtered,
        bad_rows=tuple(bad_rows),
    )
