"""Compiling the tail's programs before the tail needs them.

:class:`~meljax.sampling.engine.ContinuousEngine` moves the live samples of a pool's tail
into smaller pools (:func:`~meljax.sampling.schedule.tail_sizes`). Which of those sizes a
call reaches depends on when its samples end, so a later call of the same workload could
reach one the earlier calls did not and compile its programs mid-run. :func:`warm_tail` runs
every program of every size on empty pools the first time a pool shrinks, which puts them
all in the jit cache at once; an empty pool's decode segment runs no step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from meljax.sampling import schedule, slots

# the pools (shapes and static settings, the engine's key) whose tail programs this process
# has compiled: the programs are module-level jits, so a fresh engine needs no second warm-up
WARMED: set = set()


def warm_tail(
    state: slots.SlotState,
    sizes: Sequence[int],
    dp: int,
    *,
    put: Callable[[np.ndarray], Any],
    decode: Callable[[slots.SlotState], slots.SlotState],
    mesh: Any,
) -> None:
    """Runs, for every size ``r`` of ``sizes`` (largest first), the move of ``state``'s pool
    into an empty pool of ``r`` slots, a decode segment, :func:`~meljax.sampling.slots.peek`
    and :func:`~meljax.sampling.slots.take_rows` there, and the moves from ``r`` into every
    smaller size. ``state`` is left as it was (moves do not donate their input); ``decode``
    runs one segment on a pool (the engine's static settings bound)."""
    n_slots = int(state.done.shape[0])
    for i, r in enumerate(sizes):
        src, keep = schedule.empty_plan(n_slots, r, dp)
        pool = decode(slots.compact(state, put(src), put(keep), mesh=mesh))
        slots.peek(pool)
        slots.take_rows(pool, put(np.zeros(r, np.int32)))
        for q in sizes[i + 1 :]:
            src, keep = schedule.empty_plan(r, q, dp)
            slots.compact(pool, put(src), put(keep), mesh=mesh)
        del pool
