"""The one file layer of a run's outputs: ``etils.epath`` paths, local or remote (gs://, ...).

Everything a run writes into its workdir (metrics, config, meta-experience log, evaluation
reports, TensorBoard events, the exported model) goes through here, so a ``gs://`` workdir gets
all of it, not only the orbax checkpoints. Appending is used where the filesystem supports it;
object stores that do not (GCS) get the file rewritten instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_local(target):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    else:
        target.write_text(text, encoding="utf-8")


def write_json(p: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(p, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_jsonl(p: str | os.PathLike) -> list[dict]:
    """The records of a JSON Lines file; a malformed trailing line (a killed write) ends it."""
    target = path(p)
    if not target.exists():
        return []
    out = []
    for line in target.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


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


def truncate_jsonl(p: str | os.PathLike, keep: Callable[[dict], bool]) -> int:
    """Keeps only the records for which ``keep`` is true; returns how many were dropped."""
    target = path(p)
    if not target.exists():
        return 0
    records = read_jsonl(target)
    kept = [r for r in records if keep(r)]
    raw_lines = len(target.read_text(encoding="utf-8").splitlines())
    if len(kept) != raw_lines:
        write_text(target, _lines(kept))
    return raw_lines - len(kept)


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
