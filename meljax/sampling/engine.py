"""The sampling engine: requests in, per-request generations out, on a pool of decode slots.

A :class:`Request` is a prompt (token ids), its sampling controls and its group size ``G``
(``sampling.num_samples``); an engine returns, for every request, ``G`` :class:`Completion`
records (tokens, log-probabilities, finish reason). :class:`meljax.sampling.policy.Policy` is
the only caller. :class:`ContinuousEngine` batches continuously over a fixed pool of decode slots:
each prompt is prefilled once and copied into its ``G`` slots, decoding runs inside ``jit`` in
segments of ``K`` steps, finished slots are refilled between segments, and token ``j`` of sample
``g`` of request ``r`` is drawn with ``fold_in(fold_in(fold_in(key, r), g), j)`` so a request's
output does not depend on the pool, the segments or its neighbours. Its platform defaults (KV
buckets, segment buffer, tail shrink, per-layer weights) come from
:mod:`meljax.runtime.platform`. The full design (prefill and refill, length buckets, the decode
weights' layout, pool size, the tail shrink, compiled-program reuse): ``docs/architecture.md``,
"The rollout engine".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meljax.models.config import resolve_dtype
from meljax.models.kv_cache import cache_bytes
from meljax.runtime import sharding as shd
from meljax.runtime.buckets import DEFAULT_BATCH_BUCKETS, DEFAULT_LENGTH_BUCKETS, bucket
from meljax.runtime.platform import profile
from meljax.sampling import schedule, slots, warm
from meljax.sampling.protocol import Completion, Engine, EngineStats, Request, checked_prompts
from meljax.sampling.select import config_from_graphdef, format_bytes
from meljax.sampling.weights import InferenceWeights, inference_mesh, prepare_weights


class ContinuousEngine:
    """:class:`Engine` with continuous batching (see the module docstring).

    Args:
      graphdef: ``nnx.split(model)[0]`` of a meljax ``Transformer``.
      stop_token_ids: a sample ends after any of these (kept in its tokens).
      pad_id: the token of unused output columns and prompt padding.
      mesh: the training mesh (or ``None``); decoding runs on its :func:`inference_mesh`.
      cache_dtype: KV-cache dtype (default: the model's compute dtype).
      max_prompt_len: longer prompts are cut from the left (logged, counted); ``None``: none.
      max_slots: most decode slots (0: one per sample of the call).
      kv_budget_gib: most KV-cache GiB per device (0: no limit); fewer slots when it binds.
      segment_steps: decode steps per segment ``K`` (between harvests / refills).
      tensor_parallel: tensor-parallel size of the inference layout (divides the devices).
      prompt_buckets, batch_buckets, kv_buckets: shape buckets (prompt length, prompts per
        prefill / slots, attended cache length; ``kv_buckets`` ``None``: none on CPU, where
        they measured slower (module docstring), ``DEFAULT_LENGTH_BUCKETS`` elsewhere;
        ``()``: always the whole cache).
      segment_buffer: decode segments read the cache read-only and write a segment buffer
        merged after the loop (``True``), or write the cache in the loop (``False``);
        ``None``: the buffer except on CPU (module docstring).
      shrink_tail: once the queue is empty, the live samples fit in half the pool and more
        than one segment may be left, move them into the smallest batch bucket that holds
        them (module docstring, "Tail"); ``None``: on CPU only.
    """

    def __init__(
        self,
        graphdef,
        *,
        stop_token_ids: Sequence[int],
        pad_id: int,
        mesh=None,
        cache_dtype=None,
        max_prompt_len: int | None = None,
        max_slots: int = 0,
        kv_budget_gib: float = 0.0,
        segment_steps: int = 16,
        tensor_parallel: int = 1,
        prompt_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        kv_buckets: Sequence[int] | None = None,
        segment_buffer: bool | None = None,
        shrink_tail: bool | None = None,
    ):
        if max_slots < 0 or kv_budget_gib < 0 or segment_steps < 1 or tensor_parallel < 1:
            raise ValueError(
                f"ContinuousEngine: max_slots={max_slots}, kv_budget_gib={kv_budget_gib} must "
                f"be >= 0, segment_steps={segment_steps}, tensor_parallel={tensor_parallel} >= 1"
            )
        self.graphdef = graphdef
        self.config = config_from_graphdef(graphdef)
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.pad_id = int(pad_id)
        self.train_mesh = mesh
        self.mesh = inference_mesh(mesh, tensor_parallel)
        self.cache_dtype = None if cache_dtype is None else resolve_dtype(cache_dtype)
        self.max_prompt_len = max_prompt_len
        self.max_slots = max_slots
        self.kv_budget_gib = kv_budget_gib
        self.segment_steps = segment_steps
        self.tensor_parallel = tensor_parallel
        self.prompt_buckets = tuple(prompt_buckets)
        self.batch_buckets = tuple(batch_buckets)
        # the platform profile of the decode mesh's devices (an AOT plan for TPU on this host
        # takes the TPU profile); explicit arguments override it
        self.profile = profile(
            jax.default_backend() if self.mesh is None else self.mesh.devices.flat[0].platform
        )
        self.split = self.profile.split_layers
        self.segment_buffer = (
            self.profile.segment_buffer if segment_buffer is None else segment_buffer
        )
        self.kv_buckets = tuple(self.profile.kv_buckets if kv_buckets is None else kv_buckets)
        self.shrink_tail = self.profile.shrink_tail if shrink_tail is None else shrink_tail
        self.num_truncated_prompts = 0
        self.last_stats = EngineStats()
        vocab = self.config.vocab_size
        for t in (*self.stop_token_ids, self.pad_id):
            if not 0 <= t < vocab:
                raise ValueError(
                    f"engine: stop/pad token id {t} outside the vocabulary [0, {vocab})"
                )

    # -- weights

    def prepare(self, params) -> InferenceWeights:
        """The decode weights of ``params`` (compute dtype, inference layout): call once per
        update; :meth:`generate` takes the result (or prepares raw params itself)."""
        if isinstance(params, InferenceWeights):
            return params
        return prepare_weights(self.graphdef, params, self.mesh, self.split)

    # -- shapes

    def _dp(self) -> int:
        return 1 if self.mesh is None else shd.data_parallel_size(self.mesh)

    def prompt_bucket(self, n: int) -> int:
        p = bucket(n, self.prompt_buckets)
        return min(p, self.max_prompt_len) if self.max_prompt_len else p

    def slot_bytes(self, cache_len: int) -> int:
        """KV-cache bytes of one slot on one device (kv heads split over ``tensor``)."""
        cfg = self.config
        shards = self.tensor_parallel if cfg.num_kv_heads % self.tensor_parallel == 0 else 1
        return cache_bytes(cfg, 1, cache_len, self.cache_dtype) // shards

    def pool_shape(self, num_samples: int, prompt_len: int, max_new: int) -> tuple[int, int]:
        """``(slots, cache_len)`` of a call with ``num_samples`` samples in all, prompts of up
        to ``prompt_len`` tokens and up to ``max_new`` new tokens."""
        dp = self._dp()
        cache_len = self.prompt_bucket(prompt_len) + max_new
        want = bucket(num_samples, self.batch_buckets, multiple=dp)
        cap = self.max_slots or want
        if self.kv_budget_gib:
            per_device = int(self.kv_budget_gib * 2**30) // self.slot_bytes(cache_len)
            if per_device < 1:
                raise ValueError(
                    f"rollout.kv_budget_gib={self.kv_budget_gib} holds no slot of {cache_len} "
                    f"cache slots ({format_bytes(self.slot_bytes(cache_len))} per device)"
                )
            cap = min(cap, per_device * dp)
        return min(want, max(dp, cap // dp * dp)), cache_len

    def describe(self, num_samples: int, prompt_len: int, max_new: int) -> str:
        """One line on the pool a call of these sizes gets (printed at the start of a run)."""
        s, c = self.pool_shape(num_samples, prompt_len, max_new)
        per_dev = s // self._dp() * self.slot_bytes(c)
        kv = self.cache_dtype.__name__ if self.cache_dtype else jnp.dtype(self.config.dtype).name
        budget = f"budget {self.kv_budget_gib:g} GiB" if self.kv_budget_gib else "no KV budget"
        return (
            f"{s} decode slots x {c} cache slots ({kv}), KV pool {format_bytes(per_dev)} per "
            f"device ({budget}, max_slots={self.max_slots or 'auto'}), segments of "
            f"{self.segment_steps} steps, decode mesh {_mesh_text(self.mesh)}"
        )

    def _kv_len(self, longest: int, cache_len: int) -> int:
        """Attended cache slots for a segment whose longest live slot sits at ``longest``: with
        a segment buffer a segment reads the cache below each slot's position at its start
        (its own tokens are in the buffer); writing the cache in the loop, it also reads the
        slots its steps write."""
        if not self.kv_buckets:
            return cache_len
        if not self.segment_buffer:
            longest += self.segment_steps
        return min(bucket(max(longest, 1), self.kv_buckets), cache_len)

    # -- host loop

    def _prepare_prompts(self, requests: Sequence[Request]) -> list[list[int]]:
        for r in requests:
            r.sampling.validate()
        prompts, cut = checked_prompts(
            [r.prompt_ids for r in requests], self.config.vocab_size, self.max_prompt_len, "engine"
        )
        self.num_truncated_prompts += cut
        return prompts

    def _put(self, x: np.ndarray):
        return x if self.mesh is None else shd.put_global(x, shd.replicated(self.mesh))

    def generate(
        self,
        params: Any,
        requests: Sequence[Request],
        key: jax.Array,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        if not requests:
            return []
        weights = self.prepare(params)
        prompts = self._prepare_prompts(requests)
        total = sum(r.sampling.num_samples for r in requests)
        max_new = max(r.sampling.max_new_tokens for r in requests)
        n_slots, cache_len = self.pool_shape(total, max(len(p) for p in prompts), max_new)
        stats = EngineStats(slots=n_slots, cache_len=cache_len)
        self.last_stats = stats
        static = dict(graphdef=self.graphdef, cache_dtype=self.cache_dtype, mesh=self.mesh)
        state = slots.init_slots(
            slots=n_slots, cache_len=cache_len, max_new=max_new, split=self.split, **static
        )
        stop_ids = self._put(np.asarray(self.stop_token_ids, np.int32).reshape(-1))
        pad_id = self._put(np.asarray(self.pad_id, np.int32))
        queue = [
            schedule.Part(i, lo, min(n_slots, r.sampling.num_samples - lo))
            for i, r in enumerate(requests)
            for lo in range(0, r.sampling.num_samples, n_slots)
        ]
        out: list[list[Completion | None]] = [[None] * r.sampling.num_samples for r in requests]
        pending = [r.sampling.num_samples for r in requests]
        occupant: list[tuple[int, int] | None] = [None] * n_slots
        sizes = schedule.tail_sizes(n_slots, self._dp(), self.batch_buckets)
        pool_key = (n_slots, cache_len, max_new, self.segment_steps, sizes)

        decode = functools.partial(  # decode(state, kv_len): one segment
            slots.decode_segment,
            weights,
            stop_ids=stop_ids,
            pad_id=pad_id,
            num_steps=self.segment_steps,
            split=self.split,
            segment_buffer=self.segment_buffer,
            **static,
        )

        kept = None  # the prompt cache of a split part's rest (``_refill``)
        steps_done = np.zeros(n_slots, np.int64)  # tokens each slot has produced

        while True:
            free = [s for s in range(n_slots) if occupant[s] is None]
            admitted, queue = schedule.admit(queue, len(free), split=self._dp() == 1)
            if admitted:
                it = iter(free)  # the parts take the first free slots, in order
                slots_of = [[next(it) for _ in range(p.count)] for p in admitted]
                state, kept = self._refill(
                    weights, state, admitted, slots_of, requests, prompts, key, kept, queue
                )
                for part, dst in zip(admitted, slots_of, strict=True):
                    for g, s in zip(range(part.first, part.first + part.count), dst, strict=True):
                        occupant[s] = (part.request, g)
                        steps_done[s] = 0
            live = [s for s in range(n_slots) if occupant[s] is not None]
            if not live:
                break
            plan = None
            # only when more than one segment may be left: a last segment cannot repay the
            # move (and, the first time, the compile of a smaller pool's program)
            left = max(  # most tokens a live sample may still add
                requests[occupant[s][0]].sampling.max_new_tokens - steps_done[s] for s in live
            )
            if self.shrink_tail and not queue and left > self.segment_steps:
                plan = schedule.shrink_plan(live, n_slots, self._dp(), sizes)
            # a slot's first unfed token sits at its prompt length - 1
            longest = max(len(prompts[occupant[s][0]]) - 1 + int(steps_done[s]) for s in live)
            kv_len = self._kv_len(longest, cache_len)
            if plan is not None:  # the tail: the live samples move into a smaller pool
                state = self._shrink(state, plan, sizes, (*pool_key, kv_len), decode)
                src, keep = plan
                occupant = [occupant[s] if on else None for s, on in zip(src, keep, strict=True)]
                steps_done, n_slots = steps_done[src], len(src)
                live = [s for s in range(n_slots) if occupant[s] is not None]
            state, ran = decode(state, kv_len=kv_len)
            done, steps, stopped, ran = shd.to_host((*slots.peek(state), ran))
            steps_done = np.array(steps, np.int64)
            stats.segments += 1
            stats.slot_steps += int(ran) * n_slots
            stats.steps += int(ran)
            stats.pools[n_slots] = stats.pools.get(n_slots, 0) + 1
            stats.kv_lens[kv_len] = stats.kv_lens.get(kv_len, 0) + 1
            finished = [s for s in live if done[s]]
            if not finished:
                continue
            idx = np.zeros(n_slots, np.int32)  # one width per pool: one program
            idx[: len(finished)] = finished
            tokens, logprobs = shd.to_host(slots.take_rows(state, self._put(idx)))
            completed = 0
            for row, s in enumerate(finished):
                r, g = occupant[s]
                n = int(steps_done[s])
                out[r][g] = Completion(
                    tokens=np.asarray(tokens[row, :n], np.int32),
                    logprobs=np.asarray(logprobs[row, :n], np.float32),
                    finish_reason="stop" if stopped[s] else "length",
                )
                stats.useful_tokens += n
                occupant[s] = None
                pending[r] -= 1
                completed += pending[r] == 0
            if progress is not None and completed:
                progress(completed)
        return out  # type: ignore[return-value]

    def _shrink(self, state, plan, sizes, key, decode):
        """``state`` moved by ``plan`` (``(src, keep)``) into its smaller pool. The first time
        a pool of this shape (``key``) shrinks, the programs of every tail size are compiled
        first (:func:`~meljax.sampling.warm.warm_tail`), so later calls compile none."""
        kv_len = key[-1]
        key = (*key, self.graphdef, self.cache_dtype, self.mesh, self.split, self.segment_buffer)
        if key not in warm.WARMED:  # once per process: the programs are module-level
            warm.WARMED.add(key)

            def run(pool):
                return decode(pool, kv_len=kv_len)[0]

            warm.warm_tail(state, sizes, self._dp(), put=self._put, decode=run, mesh=self.mesh)
        src, keep = plan
        return slots.compact(state, self._put(src), self._put(keep), mesh=self.mesh)

    def _refill(self, weights, state, admitted, slots_of, requests, prompts, key, kept, queue):
        """Puts the ``admitted`` parts into their slots ``slots_of``; returns the state and
        the prompt cache to keep for the head of ``queue`` (``(cache, {request: row})`` when
        that part was split, else ``None``). Prompts whose cache was kept (``kept``, from the
        refill that split their part) are copied from it; the others get one batched
        prefill (:func:`~meljax.sampling.schedule.prefill_rows`)."""
        old_rows = {} if kept is None else kept[1]
        fresh = [i for i, p in enumerate(admitted) if p.request not in old_rows]
        old = [i for i, p in enumerate(admitted) if p.request in old_rows]
        n_slots, dp = len(state.done), self._dp()
        sizes = dict(n_slots=n_slots, dp=dp, batch_buckets=self.batch_buckets)
        keep = None
        for group, fresh_group in ((fresh, True), (old, False)):
            if not group:
                continue
            parts, dsts = [admitted[i] for i in group], [slots_of[i] for i in group]
            if fresh_group:
                tokens, row_of = schedule.prefill_rows(
                    parts,
                    dsts,
                    prompts,
                    prompt_bucket=self.prompt_bucket,
                    pad_id=self.pad_id,
                    **sizes,
                )
                cache = slots.prefill(
                    weights,
                    self._put(tokens),
                    graphdef=self.graphdef,
                    cache_dtype=self.cache_dtype,
                    mesh=self.mesh,
                    split=self.split,
                )
                self.last_stats.prefills += 1
            else:
                cache, row_of = kept[0], {(0, r): row for r, row in old_rows.items()}
            cols = schedule.insert_columns(parts, dsts, row_of, requests, prompts, **sizes)
            args = {name: self._put(v) for name, v in cols.items()}
            state = slots.insert(state, cache, key=key, mesh=self.mesh, **args)
            head = queue[0].request if queue else None
            if dp == 1 and any(p.request == head for p in parts):  # its rest waits
                keep = (cache, {head: row_of[0, head]})
        return state, keep


def _mesh_text(mesh) -> str:
    if mesh is None:
        return "none (one device)"
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"


__all__ = [
    "ContinuousEngine",
    "Engine",
    "EngineStats",
    "Completion",
    "InferenceWeights",
    "Request",
]
