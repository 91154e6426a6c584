"""Row readers of JSONL / JSON-list / Parquet files (local or remote) for ``load_problems``.

Each reader yields ``(row index, row)``, where a row that cannot be decoded (bytes that are not
UTF-8, a line that is not JSON) is the ``ValueError`` saying why, with its line: the loader
then skips and counts it or stops with one line naming the file and the row
(``data.on_bad_row``), as for any other bad row.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

Row = tuple[int, Any]  # (row index, decoded row or the exception that decoding raised)


def open_binary(path: str) -> io.BufferedIOBase:
    """Opens a local or remote (``gs://``, ``s3://``, ``hf://``...) file for reading."""
    if "://" not in path:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    try:
        from etils import epath

        return epath.Path(path).open("rb")
    except Exception as epath_error:  # noqa: BLE001 - fall back to fsspec's own backends
        try:
            import fsspec

            return fsspec.open(path, "rb").open()
        except Exception as fsspec_error:
            raise OSError(
                f"Cannot open {path!r} with etils.epath ({epath_error}) "
                f"nor fsspec ({fsspec_error}); is the filesystem's package installed?"
            ) from fsspec_error


def not_utf8(e: UnicodeDecodeError, line: int | None = None) -> ValueError:
    """The reason of a row with bytes that are not UTF-8: the byte, its line and column."""
    where = f"line {line}, column {e.start + 1}" if line is not None else f"offset {e.start}"
    return ValueError(f"not valid UTF-8: byte 0x{e.object[e.start]:02x} at {where}")


def iter_jsonl(path: str) -> Iterator[Row]:
    """One row per non-blank line; a line that is not UTF-8 or not JSON is a bad row."""
    with open_binary(path) as f:
        index = 0
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                yield index, not_utf8(e, line)
                index += 1
                continue
            if not text:
                continue  # blank lines carry no row, so they do not count as rows either
            try:
                yield index, json.loads(text)
            except json.JSONDecodeError as e:
                yield index, ValueError(f"invalid JSON on line {line}: {e}")
            index += 1


def _escaped_byte(value: Any) -> int | None:
    """The first byte of ``value`` (keys and nested values too) that was not UTF-8 (decoded
    with ``surrogateescape`` to U+DC80..U+DCFF), or ``None``."""
    if isinstance(value, str):
        for ch in value:
            if 0xDC80 <= ord(ch) <= 0xDCFF:
                return ord(ch) - 0xDC00
        return None
    items = value.items() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        for part in item if isinstance(value, dict) else (item,):
            byte = _escaped_byte(part)
            if byte is not None:
                return byte
    return None


def iter_json(path: str) -> Iterator[Row]:
    """The rows of a JSON list; a row holding bytes that are not UTF-8 is a bad row."""
    with open_binary(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        byte = _escaped_byte(row)
        yield index, row if byte is None else ValueError(f"not valid UTF-8: byte 0x{byte:02x}")


def iter_parquet(path: str) -> Iterator[Row]:
    """The rows of a Parquet file, decoded a batch at a time (``limit=`` stays cheap)."""
    import pyarrow.parquet as pq

    with open_binary(path) as f:
        parquet = pq.ParquetFile(f)
        index = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield index, row
                index += 1


READERS: dict[str, Callable[[str], Iterator[Row]]] = {
    "jsonl": iter_jsonl,
    "json": iter_json,
    "parquet": iter_parquet,
}
