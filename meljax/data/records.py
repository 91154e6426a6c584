"""Problem records and readers for local or remote JSONL / JSON / Parquet files.

A *problem* is a question with one verifiable ground-truth answer. Files in the wild
store these under many layouts (nested chat messages, answers inside ``\\boxed{}`` of a
worked solution, zero-padded strings, floats...). A :class:`FieldMap` describes one
layout: where the question, answer and id live (dotted paths with list indexing such as
``prompt[0].content``) and how to normalise them. :data:`PRESETS` holds the layouts of
the benchmark and training files described in ``shared/data/README.md``.

Entry point: :func:`load_problems`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

from meljax.data.readers import READERS, Row
from meljax.rewards.extract import last_boxed

__all__ = [
    "PRESETS",
    "BadRow",
    "BadRowError",
    "GENERIC_FIELDS",
    "FieldMap",
    "LoadResult",
    "Problem",
    "generic_layout_hint",
    "get_path",
    "infer_preset",
    "layout_for_row",
    "load_problems",
    "parse_path",
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
# Dotted paths: ``prompt[0].content``, ``prompt[0]["content"]``, ``reward_model.ground_truth``.
# ---------------------------------------------------------------------------------------

_PATH_TOKEN = re.compile(
    r"""
    (?P<name>[^.\[\]"']+)            # bare key
    | \[\s*(?P<index>-?\d+)\s*\]     # [0]
    | \[\s*"(?P<dq>[^"]*)"\s*\]      # ["key"]
    | \[\s*'(?P<sq>[^']*)'\s*\]      # ['key']
    | (?P<dot>\.)
    """,
    re.VERBOSE,
)


def parse_path(path: str) -> tuple[str | int, ...]:
    """Splits a field path into keys (``str``) and list indices (``int``).

    ``'prompt[0]["content"]'`` -> ``("prompt", 0, "content")``;
    ``"reward_model.ground_truth"`` -> ``("reward_model", "ground_truth")``.

    Raises:
      ValueError: on an empty or malformed path (e.g. ``"a..b"``, ``"a[x]"``).
    """
    parts: list[str | int] = []
    pos = 0
    expect_key = True  # after a dot (or at the start) a key must follow
    while pos < len(path):
        m = _PATH_TOKEN.match(path, pos)
        if m is None:
            raise ValueError(f"Malformed field path {path!r} at character {pos}")
        if m.group("dot") is not None:
            if expect_key:
                raise ValueError(f"Malformed field path {path!r}: empty key at character {pos}")
            expect_key = True
        elif m.group("name") is not None:
            if not expect_key:
                raise ValueError(f"Malformed field path {path!r}: missing '.' at {pos}")
            parts.append(m.group("name").strip())
            expect_key = False
        else:
            if expect_key and parts:
                raise ValueError(f"Malformed field path {path!r}: '.' before '[' at {pos}")
            if m.group("index") is not None:
                parts.append(int(m.group("index")))
            else:
                parts.append(m.group("dq") if m.group("dq") is not None else m.group("sq"))
            expect_key = False
        pos = m.end()
    if not parts or expect_key:
        raise ValueError(f"Malformed field path {path!r}")
    return tuple(parts)


class _MissingField(LookupError):
    """A field path does not resolve in a row."""


def get_path(row: Any, path: str | Sequence[str | int]) -> Any:
    """Returns the value at ``path`` inside nested dicts / lists.

    Raises:
      LookupError: naming the first part of the path that does not resolve.
    """
    parts = parse_path(path) if isinstance(path, str) else tuple(path)
    value = row
    walked = ""
    for part in parts:
        where = f"{walked}[{part}]" if isinstance(part, int) else f"{walked}.{part}".lstrip(".")
        if isinstance(part, int):
            if not isinstance(value, Sequence) or isinstance(value, str | bytes):
                raise _MissingField(
                    f"{walked or '<row>'} is not a list (got {type(value).__name__})"
                )
            if not -len(value) <= part < len(value):
                raise _MissingField(f"{where} is out of range (length {len(value)})")
            value = value[part]
        else:
            if not isinstance(value, Mapping):
                raise _MissingField(
                    f"{walked or '<row>'} is not an object (got {type(value).__name__})"
                )
            if part not in value:
                keys = ", ".join(sorted(map(str, value)))[:200]
                raise _MissingField(f"no field {where!r} (available: {keys})")
            value = value[part]
        walked = where
    return value


# ---------------------------------------------------------------------------------------
# Answer / question normalisers.
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Layouts.
# ---------------------------------------------------------------------------------------

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


def _format_of(path: str, fields: FieldMap) -> FileFormat:
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


def layout_for_row(row: Any) -> FieldMap:
    """:data:`GENERIC_FIELDS`, reading ``id`` too when ``row`` has a string or integer one."""
    if isinstance(row, Mapping) and isinstance(row.get("id"), str | int):
        return dataclasses.replace(GENERIC_FIELDS, id_field="id")
    return GENERIC_FIELDS


def _top_key(path: str) -> str | int:
    return parse_path(path)[0]


GENERIC_FIELDS = FieldMap()
"""The layout of a file no preset matches: ``question`` and ``answer`` fields (``id`` too when
the first row has one), as the README describes."""


def generic_layout_hint() -> str:
    """What a row needs without a preset (for error messages)."""
    return (
        f"without a preset, rows need 'question' and 'answer' fields; name a preset "
        f"(known: {', '.join(sorted(PRESETS))}) or the fields (FieldMap(question_field=..., "
        f"answer_field=...))"
    )


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

    reader = READERS[_format_of(path, field_map)]
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
