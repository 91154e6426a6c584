"""Dotted field paths into decoded rows (nested dicts and lists).

A path names keys and list indices: ``prompt[0].content``, ``prompt[0]["content"]``,
``reward_model.ground_truth``. :func:`parse_path` splits a path into its parts (``ValueError``
on a malformed one); :func:`get_path` resolves it in a row, raising ``LookupError`` that names
the first part that does not resolve. :class:`~meljax.data.layouts.FieldMap` points at a file's
question, answer and id with these paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["get_path", "parse_path"]

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
