"""The one file layer of a run's outputs: ``etils.epath`` paths, local or remote (gs://, ...).

Everything a run writes into its workdir (metrics, config, meta-experience log, evaluation
reports, TensorBoard events, the exported model) goes through here, so a ``gs://`` workdir gets
all of it, not only the orbax checkpoints. Appending is used where the filesystem supports it;
object stores that do not (GCS) get the file rewritten instead. A JSON Lines log with a bad
line keeps every other record: readers skip the line, truncation keeps it (or moves it aside).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from absl import logging
from etils import epath


def path(p: str | os.PathLike, *parts: str) -> epath.Path:
    """``p / parts...`` as an epath ``Path`` (``~`` expanded for local paths)."""
    p = os.fspath(p)
    if "://" not in p:
        p = os.path.expanduser(p)
    return epath.Path(p).joinpath(*parts)


def is_local(p: str | os.PathLike) -> bool:
    return "://" not in os.fspath(p)


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8), creating parent folders; atomic on a local filesystem."""
    write_bytes(p, text.encode("utf-8"))


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Writes ``data``, creating parent folders; atomic on a local filesystem."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_local(target):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    else:
        target.write_bytes(data)


def write_json(p: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(p, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _scan(data: bytes) -> list[tuple[int, bytes, dict | None]]:
    """``(line number, raw bytes, record or None)`` of each non-blank line."""
    out = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        out.append((number, raw, record if isinstance(record, dict) else None))
    return out


def scan_jsonl(p: str | os.PathLike) -> tuple[list[dict], list[tuple[int, bytes]]]:
    """``(records, unreadable)`` of a JSON Lines file: the JSON objects in order, and the
    ``(line number, raw bytes)`` of every other non-blank line (not JSON, not an object, not
    UTF-8, or a write cut short). One bad line hides nothing after it."""
    target = path(p)
    if not target.exists():
        return [], []
    lines = _scan(target.read_bytes())
    return [r for _, _, r in lines if r is not None], [(n, b) for n, b, r in lines if r is None]


def read_jsonl(p: str | os.PathLike) -> list[dict]:
    """The records of a JSON Lines file; unreadable lines are skipped with a warning."""
    records, unreadable = scan_jsonl(p)
    if unreadable:
        logging.warning("%s: %s skipped", path(p), _describe(unreadable))
    return records


def _describe(unreadable: list[tuple[int, bytes]]) -> str:
    numbers = ", ".join(str(n) for n, _ in unreadable[:5])
    more = ", ..." if len(unreadable) > 5 else ""
    s = "s" if len(unreadable) > 1 else ""
    return f"{len(unreadable)} unreadable line{s} (line{s} {numbers}{more})"


def json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _lines(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json_line(r) for r in records)


def append_jsonl(p: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends records (one JSON object per line), creating the file and its folders."""
    text = _lines(records)
    if not text:
        return
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with target.open("a") as f:
            f.write(text)
        return
    except (NotImplementedError, ValueError, OSError):
        if is_local(target):
            raise
    old = target.read_text(encoding="utf-8") if target.exists() else ""
    target.write_text(old + text, encoding="utf-8")  # object stores cannot append


def unreadable_path(p: str | os.PathLike) -> epath.Path:
    """Where :func:`truncate_jsonl` moves the unreadable lines of ``p``: ``p.unreadable``."""
    target = path(p)
    return target.with_name(target.name + ".unreadable")


def truncate_jsonl(p: str | os.PathLike, keep: Callable[[dict], bool]) -> int:
    """Drops the records for which ``keep`` is false (e.g. steps after the checkpoint a run
    resumes from); returns how many were dropped. Kept lines stay byte for byte.

    Unreadable lines are never dropped, and never end the file: they are counted and left
    where they are when nothing else changes (a finished run's restart leaves the file as it
    was), or moved to ``p.unreadable`` (see :func:`unreadable_path`) when the file is rewritten
    (records to drop, or a last line cut short, which the next append would run into). Either
    way one warning says how many, which lines and where they are.
    """
    target = path(p)
    if not target.exists():
        return 0
    data = target.read_bytes()
    lines = _scan(data)
    unreadable = [(n, raw) for n, raw, r in lines if r is None]
    kept = [raw for _, raw, r in lines if r is not None and keep(r)]
    dropped = len(lines) - len(unreadable) - len(kept)
    if not lines or (not dropped and data.endswith(b"\n")):
        if unreadable:
            logging.warning("%s: %s kept as they are", target, _describe(unreadable))
        return 0
    if unreadable:
        side = unreadable_path(target)
        old = side.read_bytes() if side.exists() else b""
        side.write_bytes(old + b"".join(raw + b"\n" for _, raw in unreadable))
        logging.warning("%s: %s moved to %s", target, _describe(unreadable), side)
    write_bytes(target, b"".join(raw + b"\n" for raw in kept))
    return dropped


def copy_tree(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copies a local folder's files into ``dest`` (any filesystem), replacing same names."""
    src = os.fspath(src)
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = path(dest) if rel == "." else path(dest, rel)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                (out / name).write_bytes(f.read())
