"""The continuous engine's host-side scheduling, as pure functions over numpy and lists.

:class:`~meljax.sampling.engine.ContinuousEngine` runs these between decode segments:
which waiting parts of requests enter the free slots (:func:`admit`), the prompt rows of a
refill's prefill (:func:`prefill_rows`) and the columns of its slot copy
(:func:`insert_columns`), and the tail's move into a smaller pool (:func:`tail_sizes`,
:func:`shrink_plan`). Slots and prefill rows are split over ``dp`` data-parallel devices in
equal contiguous blocks.

Shapes: every array these functions size for a jitted program takes its shape from the pool
(the slot copy's columns: ``n_slots``) or from a short fixed list (the tail's pool sizes), not
from how many samples happen to finish or enter at one point, so a second call of the same
workload runs the programs the first one compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from meljax.runtime.buckets import bucket
from meljax.sampling.protocol import Request


@dataclasses.dataclass
class Part:
    """Samples ``first .. first + count - 1`` of request ``request`` (one slot copy)."""

    request: int
    first: int
    count: int


def admit(queue: list[Part], room: int, split: bool) -> tuple[list[Part], list[Part]]:
    """``(admitted, still queued)`` for ``room`` free slots: whole parts in queue order (a
    later, smaller part may pass one that does not fit). With ``split``, the first part that
    does not fit is split to fill the room, its rest keeping its place at the head of the
    queue (the engine keeps its prompt cache for it)."""
    admitted, rest = [], []
    for part in queue:
        if part.count <= room:
            admitted.append(part)
            room -= part.count
        elif split and room and not rest:
            admitted.append(Part(part.request, part.first, room))
            rest.append(Part(part.request, part.first + room, part.count - room))
            room = 0
        else:
            rest.append(part)
    return admitted, rest


def prefill_rows(
    parts: Sequence[Part],
    slots_of: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    *,
    n_slots: int,
    dp: int,
    batch_buckets: Sequence[int],
    prompt_bucket: Callable[[int], int],
    pad_id: int,
) -> tuple[np.ndarray, dict[tuple[int, int], int]]:
    """The prefill of ``parts`` going to slots ``slots_of`` (of a pool of ``n_slots``):
    tokens int32 ``[B, P]`` (each prompt without its last token, right-padded) and
    ``{(device, request): row}``. Each device's block of rows holds the prompts of the
    samples going to its own slots (a prompt whose slots span two devices is prefilled on
    both), so the slot copy moves nothing between devices."""
    per_device = n_slots // dp
    blocks: list[list[int]] = [[] for _ in range(dp)]  # requests by device
    for part, dst in zip(parts, slots_of, strict=True):
        for slot in dst:
            block = blocks[slot // per_device]
            if part.request not in block:
                block.append(part.request)
    b = bucket(dp * max(len(x) for x in blocks), batch_buckets, multiple=dp)
    rows = b // dp
    body = {p.request: prompts[p.request][:-1] for p in parts}
    p_len = prompt_bucket(max(max(len(x) for x in body.values()), 1))
    tokens = np.full((b, p_len), pad_id, np.int32)
    row_of = {}
    for d, block in enumerate(blocks):
        for k, r in enumerate(block):
            tokens[d * rows + k, : len(body[r])] = body[r]
            row_of[d, r] = d * rows + k
    return tokens, row_of


def insert_columns(
    parts: Sequence[Part],
    slots_of: Sequence[Sequence[int]],
    row_of: dict[tuple[int, int], int],
    requests: Sequence[Request],
    prompts: Sequence[Sequence[int]],
    *,
    n_slots: int,
    dp: int,
    batch_buckets: Sequence[int],
) -> dict[str, np.ndarray]:
    """The arguments of :func:`meljax.sampling.slots.insert` (``[n_slots]`` each; padding
    entries have ``dst == n_slots``) that put sample ``g`` of each part into its slot, copied
    from prompt row ``row_of[device of the slot, request]``. One width per pool: the copy
    reads every slot anyway, and a width per refill size was one more compiled program."""
    del batch_buckets  # the width is the pool's
    per_device = n_slots // dp
    width = n_slots
    dtypes = dict(
        src=np.int32,
        dst=np.int32,
        last_token=np.int32,
        pos=np.int32,
        max_new=np.int32,
        temperature=np.float32,
        top_p=np.float32,
        top_k=np.int32,
        request=np.int32,
        sample=np.int32,
    )
    cols = {name: np.zeros(width, dt) for name, dt in dtypes.items()}
    cols["dst"][:] = n_slots  # out of range: padding, dropped
    i = 0
    for part, dst in zip(parts, slots_of, strict=True):
        prompt, sp = prompts[part.request], requests[part.request].sampling
        for g, slot in zip(range(part.first, part.first + part.count), dst, strict=True):
            values = dict(
                src=row_of[slot // per_device, part.request],
                dst=slot,
                last_token=prompt[-1],
                pos=len(prompt) - 1,
                max_new=sp.max_new_tokens,
                temperature=sp.temperature,
                top_p=sp.top_p,
                top_k=sp.top_k,
                request=part.request,
                sample=g,
            )
            for name, v in values.items():
                cols[name][i] = v
            i += 1
    return cols


def tail_sizes(n_slots: int, dp: int, batch_buckets: Sequence[int]) -> tuple[int, ...]:
    """The pool sizes the tail of a pool of ``n_slots`` may move into, largest first: batch
    buckets (multiples of ``dp``) from a quarter of the pool up to half of it. Each is one
    more decode program, compiled once; below a quarter a step saves little (the per-step
    cost that does not scale with the slots dominates there)."""
    floor = bucket(-(-n_slots // 4), batch_buckets, multiple=dp)
    sizes = {b for b in batch_buckets if b % dp == 0 and floor <= b <= n_slots // 2}
    return tuple(sorted(sizes, reverse=True))


def shrink_plan(
    live: Sequence[int], n_slots: int, dp: int, sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(src, keep)`` of :func:`meljax.sampling.slots.compact` into the smallest of
    ``sizes`` (:func:`tail_sizes`) that holds the ``live`` slots, or ``None`` unless that
    halves the pool at least. Each device keeps its own live slots (the new pool's equal
    blocks are sized by the device with the most), so the move stays on the device."""
    old_block = n_slots // dp
    by_device: list[list[int]] = [[] for _ in range(dp)]
    for s in live:
        by_device[s // old_block].append(s)
    need = dp * max(len(x) for x in by_device)
    fits = [b for b in sizes if b % dp == 0 and need <= b <= n_slots // 2]
    if not fits:
        return None
    new = min(fits)
    block = new // dp
    src = np.repeat(np.arange(dp, dtype=np.int32) * old_block, block)  # padding: any own slot
    keep = np.zeros(new, bool)
    for d, own in enumerate(by_device):
        src[d * block : d * block + len(own)] = own
        keep[d * block : d * block + len(own)] = True
    return src, keep


def empty_plan(n_slots: int, new: int, dp: int) -> tuple[np.ndarray, np.ndarray]:
    """``(src, keep)`` of :func:`meljax.sampling.slots.compact` into an empty pool of ``new``
    slots (every entry names a slot of its own device; nothing kept): the shapes of a move
    from ``n_slots`` to ``new``, for compiling its programs before the tail needs them."""
    block = new // dp
    src = np.repeat(np.arange(dp, dtype=np.int32) * (n_slots // dp), block)
    return src, np.zeros(new, bool)
