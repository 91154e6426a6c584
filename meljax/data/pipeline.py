"""Grain pipelines that turn a random-access problem source into batches of problems.

Order of operations (all on ``grain.MapDataset``, so every step is index-based and
deterministic)::

    source -> shard (slice) -> shuffle(seed) -> repeat(num_epochs) -> batch(B) -> map(list)

* Sharding comes first so the shards of different hosts are disjoint; by default every
  shard gets the same number of items (``len // shard_count``; the few left over are
  dropped) so that all hosts take the same number of steps.
* ``repeat`` reseeds the shuffle each epoch, so epochs come in different orders.
* Batches may straddle an epoch boundary: batch ``k`` is items ``[k*B, (k+1)*B)`` of the
  endless (or ``num_epochs``-long) shuffled stream.

The iterator's state is grain's own (``{"next_index": k}``, the next batch number) plus
the pipeline's settings, so :meth:`ProblemIterator.set_state` can refuse a checkpoint
taken with a different seed, batch size, sharding or source length.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain

from meljax.data.records import Problem

__all__ = ["ProblemIterator", "make_problem_dataset", "make_problem_iterator", "to_problem"]

_STATE_VERSION = 1
_MAX_SEED = 2**32 - 1  # grain's shuffle takes a uint32 seed


def to_problem(item: Any) -> Problem:
    """Passes a :class:`Problem` through; builds one from a dict with id/question/answer."""
    if isinstance(item, Problem):
        return item
    if isinstance(item, Mapping):
        return Problem.from_json_dict(item)
    raise TypeError(f"Source item is a {type(item).__name__}, expected a Problem or a dict")


def _as_list_of_problems(batch: Sequence[Any]) -> list[Problem]:
    return [to_problem(x) for x in batch]


def _check_args(
    source: Any,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
) -> int:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            f"source must support len() and indexing (a random-access source), "
            f"got {type(source).__name__}"
        )
    n = len(source)
    if n == 0:
        raise ValueError("source is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if shard_count <= 0:
        raise ValueError(f"shard_count must be positive, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    return n


def make_problem_dataset(
    source: Sequence[Problem] | Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = False,
    even_shards: bool = True,
) -> grain.MapDataset:
    """Builds the batched ``grain.MapDataset``; element ``k`` is batch ``k`` (a list).

    Args:
      source: random-access source of :class:`Problem` (or dicts with id/question/answer):
        a list, a :class:`~meljax.data.records.LoadResult`,
        :class:`~meljax.data.procedural.ArithmeticProblems`,
        :class:`~meljax.data.tfds_builder.ArrayRecordProblems`...
      batch_size: questions per batch (``B``).
      seed: shuffle seed in ``[0, 2**32)``.
      shuffle: shuffle (differently every epoch) or keep the source order.
      num_epochs: passes over the shard; ``None`` repeats forever.
      shard_index: this process's shard, ``0 <= shard_index < shard_count``.
      shard_count: number of shards (e.g. ``jax.process_count()``).
      drop_remainder: drop the last, smaller batch of a finite stream.
      even_shards: give every shard ``len(source) // shard_count`` items, so that all
        processes produce the same number of batches; if ``False`` the first
        ``len % shard_count`` shards hold one more item.

    Returns:
      A ``grain.MapDataset`` of ``list[Problem]``, each of length ``batch_size`` (except
      possibly the last one of a finite stream when ``drop_remainder=False``).
    """
    n = _check_args(source, batch_size, seed, num_epochs, shard_index, shard_count)
    stop = (n // shard_count) * shard_count if even_shards else n
    if stop <= shard_index:
        raise ValueError(f"source has {n} items, too few for shard {shard_index} of {shard_count}")
    ds = grain.MapDataset.source(source)
    if shard_count > 1 or stop != n:
        ds = ds.slice(slice(shard_index, stop, shard_count))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_as_list_of_problems)


class ProblemIterator:
    """Checkpointable iterator over batches (``list[Problem]``) of a problem pipeline.

    ``get_state()`` returns a JSON-serialisable dict; feeding it to ``set_state`` of an
    iterator built with the same arguments resumes at exactly the next batch.
    """

    def __init__(self, dataset: grain.MapDataset, settings: dict[str, Any], num_threads: int):
        self._settings = settings
        read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=max(num_threads * 4, 0)
        )
        self._iterator = iter(dataset.to_iter_dataset(read_options))

    def __iter__(self) -> ProblemIterator:
        return self

    def __next__(self) -> list[Problem]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """``{"version", "settings", "grain"}``; ``grain`` holds the next batch number."""
        return {
            "version": _STATE_VERSION,
            "settings": dict(self._settings),
            "grain": self._iterator.get_state(),
        }

    def set_state(self, state: Mapping[str, Any] | str | bytes) -> None:
        """Restores a state from :meth:`get_state` (or its JSON text).

        Raises:
          ValueError: if the state was taken from a pipeline with other settings.
        """
        if isinstance(state, str | bytes):
            state = json.loads(state)
        if not isinstance(state, Mapping) or "grain" not in state or "settings" not in state:
            raise ValueError(f"Not a ProblemIterator state: {state!r}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"Iterator state version {state.get('version')!r} != {_STATE_VERSION}")
        saved = dict(state["settings"])
        diffs = {k: (saved.get(k), v) for k, v in self._settings.items() if saved.get(k) != v}
        if diffs:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
            raise ValueError(f"Iterator state is from a different pipeline ({detail})")
        self._iterator.set_state(dict(state["grain"]))


def make_problem_iterator(
    source: Sequence[Problem] | Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = False,
    even_shards: bool = True,
    num_threads: int = 0,
) -> ProblemIterator:
    """Returns a checkpointable iterator of batches; see :func:`make_problem_dataset`.

    Args:
      num_threads: grain reader threads prefetching batches; ``0`` reads on demand in
        the calling thread (best for in-memory sources, where threads only add GIL
        contention); use a few for file-backed sources such as array_record.
      Other arguments: as in :func:`make_problem_dataset`.
    """
    dataset = make_problem_dataset(
        source,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        drop_remainder=drop_remainder,
        even_shards=even_shards,
    )
    settings = {
        "source_len": len(source),
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "shard_index": shard_index,
        "shard_count": shard_count,
        "drop_remainder": drop_remainder,
        "even_shards": even_shards,
    }
    return ProblemIterator(dataset, settings, num_threads)
