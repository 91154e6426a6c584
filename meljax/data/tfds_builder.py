"""Store problems as an ``array_record`` dataset and read them back with random access.

Two writers, one reader:

* ``backend="tfds"`` (default): a TFDS dataset built by a small
  ``tfds.core.GeneratorBasedBuilder`` with ``file_format="array_record"``. It works
  without TensorFlow installed (checked with tensorflow-datasets 4.9.10), given one
  work-around: TFDS looks up the builder's source file through the optional
  ``importlib_resources`` package, which is not installed, so the builder reports no
  ``code_path`` (it has no checksum file to find anyway). ``tfds.core.AdhocBuilder``
  cannot be used: its split generator imports TensorFlow to test for ``tf.data``.
  The result is a folder ``{out_dir}/{name}/{version}`` with ``dataset_info.json`` and
  ``{name}-{split}.array_record-XXXXX-of-YYYYY`` shards, readable with
  ``tfds.builder_from_directory(path).as_data_source(split=...)``.
* ``backend="array_record"``: one ``{out_dir}/{name}-{split}.array_record`` file written
  with ``ArrayRecordWriter`` directly; each record is a JSON-encoded problem.

:class:`ArrayRecordProblems` reads either layout as a random-access sequence of
:class:`~meljax.data.records.Problem`, usable as a grain data source. It also reads any other
TFDS dataset prepared as array_record (a dataset folder, or a registered ``name[:version]``
prepared under a data dir; never downloaded) whose records have ``question`` / ``answer``
fields, or the fields of a :class:`~meljax.data.layouts.FieldMap` (e.g. a preset's): training
with ``data.source=tfds``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from meljax.data.layouts import FieldMap, generic_layout_hint, layout_for_row
from meljax.data.records import BadRowError, Problem, problem_from_row

__all__ = ["ArrayRecordProblems", "build_array_record"]

Backend = Literal["tfds", "array_record"]

_TFDS_INFO_FILE = "dataset_info.json"


def _encode_extra(problem: Problem) -> str:
    try:
        return json.dumps(dict(problem.extra), ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Problem {problem.id!r}: extra is not JSON-serialisable: {e}") from e


def _check_problem(problem: Any, index: int) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(f"item {index} is a {type(problem).__name__}, not a Problem")
    return problem


def _make_tfds_builder_class():
    """Defines the builder class lazily so that importing this module stays cheap."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import utils as tfds_utils

    class _ProblemsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Writes ``{id, question, answer, extra(JSON)}`` text records for one split."""

        VERSION = tfds.core.Version("1.0.0")

        @tfds_utils.classproperty
        @classmethod
        def code_path(cls):
            # The base implementation needs the uninstalled `importlib_resources`; the
            # path only serves to find a checksums file, which this builder has none of.
            return None

        def __init__(
            self,
            *,
            name: str,
            version: str,
            split: str,
            problems: Iterable[Problem] | None = None,
            **kwargs: Any,
        ) -> None:
            self.name = name  # instance attribute, as tfds' AdhocBuilder does
            self.VERSION = tfds.core.Version(version)
            self._split = split
            self._problems = problems
            super().__init__(version=version, **kwargs)

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                description="meljax problems: id, question, answer and JSON-encoded extra.",
                features=tfds.features.FeaturesDict(
                    {"id": text, "question": text, "answer": text, "extra": text}
                ),
                # Keep file order so that record i is problem i.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            for i, problem in enumerate(self._problems or ()):
                problem = _check_problem(problem, i)
                yield (
                    i,
                    {
                        "id": problem.id,
                        "question": problem.question,
                        "answer": problem.answer,
                        "extra": _encode_extra(problem),
                    },
                )

    return _ProblemsBuilder


def _build_tfds(
    problems: Iterable[Problem], out_dir: str, name: str, split: str, version: str, overwrite: bool
) -> str:
    builder_cls = _make_tfds_builder_class()
    target = os.path.join(out_dir, name, version)
    if os.path.exists(target):
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to rebuild it")
        shutil.rmtree(target)
    builder = builder_cls(
        name=name,
        version=version,
        split=split,
        problems=problems,
        data_dir=out_dir,
        file_format="array_record",
    )
    # Downloads dir is unused (nothing is downloaded); keep it out of out_dir.
    with tempfile.TemporaryDirectory() as download_dir:
        builder.download_and_prepare(download_dir=download_dir, file_format="array_record")
    return str(builder.data_path)


def _build_raw(
    problems: Iterable[Problem], out_dir: str, name: str, split: str, overwrite: bool
) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{split}.array_record")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to rebuild it")
    tmp_path = path + ".tmp"
    # group_size:1 makes every record its own chunk: cheapest random access.
    writer = ArrayRecordWriter(tmp_path, "group_size:1")
    try:
        for i, problem in enumerate(problems):
            problem = _check_problem(problem, i)
            _encode_extra(problem)  # fail with the problem's id, not a bare TypeError
            record = json.dumps(problem.to_json_dict(), ensure_ascii=False, sort_keys=True)
            writer.write(record.encode("utf-8"))
    finally:
        writer.close()
    os.replace(tmp_path, path)  # a crashed build never leaves a half-written file behind
    return path


def build_array_record(
    problems: Iterable[Problem],
    out_dir: str,
    *,
    name: str = "meljax_problems",
    split: str = "train",
    version: str = "1.0.0",
    backend: Backend = "tfds",
    overwrite: bool = False,
) -> str:
    """Writes ``problems`` as an array_record dataset; returns the path to pass to
    :class:`ArrayRecordProblems`.

    Args:
      problems: the problems, in the order they are to be indexed.
      out_dir: local output folder (created if missing).
      name: dataset name (snake_case); part of the file names.
      split: split name, e.g. ``"train"``.
      version: dataset version (``"X.Y.Z"``), tfds backend only.
      backend: ``"tfds"`` (a TFDS dataset folder) or ``"array_record"`` (one file).
      overwrite: rebuild when the output already exists (else ``FileExistsError``).

    Returns:
      ``{out_dir}/{name}/{version}`` (tfds) or ``{out_dir}/{name}-{split}.array_record``.
    """
    out_dir = os.fspath(out_dir)
    if backend == "tfds":
        return _build_tfds(problems, out_dir, name, split, version, overwrite)
    if backend == "array_record":
        return _build_raw(problems, out_dir, name, split, overwrite)
    raise ValueError(f"backend must be 'tfds' or 'array_record', got {backend!r}")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _plain(value: Any) -> Any:
    """A decoded TFDS example (bytes, numpy scalars and arrays) as plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_OWN_FIELDS = frozenset({"id", "question", "answer", "extra"})


def _decode(record: Any, index: int, fields: FieldMap | None) -> Problem:
    """A TFDS record (a dict) or a raw JSON record (bytes) -> Problem.

    This module's own records (``id``, ``question``, ``answer``, JSON ``extra``) are read as
    written unless ``fields`` is given; any other dict goes through ``fields`` (default: the
    ``question`` / ``answer`` [/ ``id``] layout).
    """
    if not isinstance(record, Mapping):
        return Problem.from_json_dict(json.loads(_text(record)))
    row = _plain(record)
    if fields is None and set(row) == _OWN_FIELDS:
        return Problem(
            id=row["id"],
            question=row["question"],
            answer=row["answer"],
            extra=json.loads(row["extra"] or "{}"),
        )
    return problem_from_row(row, index, fields or layout_for_row(row))


def _latest_version_dir(path: str) -> str | None:
    """``path`` itself when it holds ``dataset_info.json``; else its newest ``X.Y.Z`` subfolder
    that does (a dataset folder given without its version); else ``None``."""
    if os.path.exists(os.path.join(path, _TFDS_INFO_FILE)):
        return path
    versions = []
    for name in os.listdir(path):
        parts = name.split(".")
        is_version = len(parts) == 3 and all(p.isdigit() for p in parts)
        if is_version and os.path.exists(os.path.join(path, name, _TFDS_INFO_FILE)):
            versions.append((tuple(int(p) for p in parts), name))
    return os.path.join(path, max(versions)[1]) if versions else None


class ArrayRecordProblems(Sequence[Problem]):
    """Random-access problems from array_record storage (a grain data source).

    Args:
      path: a TFDS dataset folder (holding ``dataset_info.json``, or the folder of its
        versions: the newest is read), a folder of ``*.array_record`` files, one
        ``.array_record`` file, a glob pattern, or the registered name of a TFDS dataset
        (``name[/config][:version]``) already prepared as array_record under ``data_dir``.
      split: the TFDS split to read (TFDS datasets only), e.g. ``"train"``.
      fields: the layout of the records (e.g. ``PRESETS["gsm8k"]``); ``None``: this
        module's own records as written, other records by their ``question`` / ``answer``
        (and ``id`` when present, else the record index) fields.
      limit: read only the first ``limit`` records (``None``: all).
      data_dir: where named TFDS datasets are prepared (``None``: TFDS's default).

    A record without a usable question or answer raises :class:`BadRowError` naming the
    record (the first record is checked when the source is opened). The underlying reader is
    opened lazily and dropped when pickled, so instances can be sent to grain worker
    processes.
    """

    def __init__(
        self,
        path: str,
        *,
        split: str = "train",
        fields: FieldMap | None = None,
        limit: int | None = None,
        data_dir: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.split = split
        self.fields = fields
        self.data_dir = data_dir
        self._source: Any = None
        n = len(self._open())
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._len = n if limit is None else min(n, limit)
        if self._len == 0:
            raise ValueError(f"{self.path} [{self.split}] holds no records")
        self[0]  # a wrong layout fails now, not at some training step

    def _open_tfds(self) -> Any:
        import tensorflow_datasets as tfds

        folder = _latest_version_dir(self.path) if os.path.isdir(self.path) else None
        if folder is not None:
            builder = tfds.builder_from_directory(folder)
        else:
            try:
                builder = tfds.builder(self.path, data_dir=self.data_dir)
            except Exception as e:  # noqa: BLE001 - tfds raises many types for a bad name
                raise FileNotFoundError(
                    f"{self.path!r} is neither an array_record dataset folder nor a TFDS "
                    f"dataset prepared under data_dir={self.data_dir or '(tfds default)'}: {e}"
                ) from e
        if not builder.info.splits:
            raise FileNotFoundError(
                f"TFDS dataset {self.path!r} is not prepared under "
                f"{builder.data_dir}; prepare it first (nothing is downloaded here)"
            )
        split_name = self.split.split("[", 1)[0]
        if split_name not in builder.info.splits:
            raise ValueError(
                f"{self.path} has no split {split_name!r}; splits: {sorted(builder.info.splits)}"
            )
        return builder.as_data_source(split=self.split)

    def _open(self) -> Any:
        if self._source is not None:
            return self._source
        is_glob = any(ch in self.path for ch in "*?[")
        if os.path.isdir(self.path) and _latest_version_dir(self.path) is not None:
            self._source = self._open_tfds()
        elif not os.path.exists(self.path) and not is_glob:
            self._source = self._open_tfds()  # a registered dataset name
        else:
            import grain

            if os.path.isdir(self.path):
                files = sorted(glob.glob(os.path.join(self.path, "*.array_record*")))
            elif any(ch in self.path for ch in "*?["):
                files = sorted(glob.glob(self.path))
            else:
                files = [self.path] if os.path.exists(self.path) else []
            if not files:
                raise FileNotFoundError(f"No array_record files at {self.path!r}")
            self._source = grain.sources.ArrayRecordDataSource(files)
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Problem:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("ArrayRecordProblems does not support slicing; index one item")
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} problems")
        try:
            return _decode(self._open()[index], index, self.fields)
        except (ValueError, LookupError) as e:
            hint = f" ({generic_layout_hint()})" if self.fields is None else ""
            raise BadRowError(f"{self.path} [{self.split}] record {index}: {e}{hint}") from e

    def __iter__(self) -> Iterator[Problem]:
        return (self[i] for i in range(self._len))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None  # file handles do not pickle; reopened on first access
        return state

    def __repr__(self) -> str:
        return f"ArrayRecordProblems({self.path!r}, split={self.split!r}, len={self._len})"
