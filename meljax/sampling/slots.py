"""The continuous-batching engine's jitted programs over a pool of ``S`` decode slots.

A slot holds one sample (request ``r``, sample ``g``). Its cache row is LEFT-aligned: prompt
token ``i`` at cache slot ``i``, completion token ``j`` at slot ``len(prompt) + j``, so a slot's
RoPE position equals its cache slot and causality alone masks the unwritten (or stale) tail:
no padding mask. The last token of the sequence so far (``last_token``, at slot ``pos``) has not
been fed yet: a decode step feeds it, writes its keys and values at ``pos``, and samples the
next token from the logits it produces.

Programs (each jitted once per static shape; the engine host in ``engine.py`` drives them):

- :func:`prefill`: ``B`` prompts (without their last token), RIGHT-padded to a bucket ``P``,
  into a fresh ``[B, P]`` cache;
- :func:`insert` (the slot copy): copies prompt ``src[i]``'s cache into slot ``dst[i]`` (a
  prompt with ``G`` samples goes to ``G`` slots: prefilled once, copied ``G`` times) and sets
  the slot's controls and its sampling key ``fold_in(fold_in(key, r), g)``;
- :func:`decode_segment`: up to ``num_steps`` decode steps in a ``lax.while_loop`` over every
  slot, attending to the first ``kv_len`` cache slots only; it stops early once every slot is
  done. With ``segment_buffer`` (TPU, GPU) the cache is read-only in the loop: each step's
  keys and values go to a segment buffer that attention reads next to it, merged into the
  cache after the loop (the TPU compiler then keeps the cache in place:
  ``meljax.models.kv_cache``, "Decode segments"); without it (CPU) each step writes its
  slot of the cache in place.
  Token ``j`` of a slot is drawn with ``fold_in(slot key, j)``, so a sample's tokens do not
  depend on its slot, its segment or its neighbours;
- :func:`peek` / :func:`take_rows`: the host's small per-slot arrays, then the finished rows.

The pool's state (:class:`~meljax.sampling.slot_state.SlotState`) and its sharding rules are in
:mod:`meljax.sampling.slot_state`; ``SlotState`` and ``state_shardings`` are re-exported here.

Weights: an :class:`~meljax.sampling.weights.InferenceWeights` (made once per policy update by
:func:`~meljax.sampling.weights.prepare_weights`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from meljax.models import kv_cache
from meljax.models.kv_cache import init_cache
from meljax.runtime import sharding as shd
from meljax.sampling.select import config_from_graphdef, select_tokens_rows, token_logprobs
from meljax.sampling.slot_state import (
    SlotState,
    cache_map,
    constrain_cache,
    constrain_rows,
    in_mesh_context,
    leaf_spec,
    slot_axis,
    state_shardings,
)

__all__ = [
    "SlotState",
    "compact",
    "copy_rows",
    "decode_segment",
    "init_slots",
    "insert",
    "peek",
    "prefill",
    "state_shardings",
    "take_rows",
]


def _merge(graphdef, weights):
    model = nnx.merge(graphdef, weights.state)
    return model, model.cfg, weights.layers


_STATIC = ("graphdef", "cache_dtype", "mesh", "split")


@functools.partial(jax.jit, static_argnames=("slots", "cache_len", "max_new", *_STATIC))
@in_mesh_context
def init_slots(
    *, graphdef, slots: int, cache_len: int, max_new: int, cache_dtype, mesh, split: bool
) -> SlotState:
    """An empty pool: every slot free (done), a zeroed cache."""
    cfg = config_from_graphdef(graphdef)
    cache = init_cache(cfg, slots, cache_len, cache_dtype, stacked=not split)
    zeros_i = jnp.zeros((slots,), jnp.int32)
    key_data = jax.random.key_data(jax.random.key(0))

    def rows(x):
        return constrain_rows(x, mesh)

    return SlotState(
        cache=cache_map(constrain_cache, cache),
        last_token=rows(zeros_i),
        pos=rows(zeros_i),
        step=rows(zeros_i),
        max_new=rows(zeros_i),
        temperature=rows(jnp.zeros((slots,), jnp.float32)),
        top_p=rows(jnp.ones((slots,), jnp.float32)),
        top_k=rows(zeros_i),
        keys=rows(jnp.zeros((slots, *key_data.shape), key_data.dtype)),
        done=rows(jnp.ones((slots,), bool)),
        stopped=rows(jnp.zeros((slots,), bool)),
        tokens=rows(jnp.zeros((slots, max_new), jnp.int32)),
        logprobs=rows(jnp.zeros((slots, max_new), jnp.float32)),
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
@in_mesh_context
def prefill(weights, tokens: jax.Array, *, graphdef, cache_dtype, mesh, split: bool):
    """The cache ``[B, ..., P]`` of prompts ``tokens`` int32 ``[B, P]`` (RIGHT-padded; each
    prompt WITHOUT its last token, which the first decode step feeds). Padding slots hold
    garbage that causality hides and decoding overwrites."""
    model, cfg, layers = _merge(graphdef, weights)
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    cache = cache_map(constrain_cache, init_cache(cfg, b, p, cache_dtype, stacked=not split))
    _, cache = model.prefill(
        tokens, positions, jnp.ones((b, p), bool), cache, cfg.prefill_chunk_size, layers=layers
    )
    return cache


def copy_rows(
    pool: jax.Array, new: jax.Array, src_of: jax.Array, has: jax.Array, name: str
) -> jax.Array:
    """One layer's slot copy: slot ``s`` of ``pool`` (one layer's ``name`` buffer of ``S`` slots
    and ``C`` cache slots each) gets prompt ``src_of[s]`` of ``new`` (the same buffer of ``B``
    prompts and ``P`` cache slots) in its first ``P`` cache slots where ``has[s]``; other
    slots are unchanged.

    With the rows split over the data axes of a mesh in context, prompt ``src_of[s]`` must
    sit on the device that holds slot ``s`` (the engine's refill places each prompt there:
    prefill rows and slots are split in equal contiguous blocks), and each device copies its
    own rows (``shard_map``): no collective. (Letting XLA partition a gather of prompt rows
    all-gathered every layer of every prompt to every chip: 232 GB per MEL analysis refill
    at 8B on v5p-64.)"""
    col = kv_cache.slot_axis(name)
    mesh = shd.context_mesh()
    if mesh is not None and not any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        axes = kv_cache.sharding_axes(name)
        pool_spec = shd.logical_to_spec(axes, None, mesh, pool.shape)
        new_spec = shd.logical_to_spec(axes, None, mesh, new.shape)
        if pool_spec[0] is not None:
            if new_spec[0] != pool_spec[0]:
                raise ValueError(
                    f"slot copy: {new.shape[0]} prompt rows do not split over the mesh like "
                    f"the {pool.shape[0]} slots ({new_spec[0]} vs {pool_spec[0]})"
                )
            rows = PartitionSpec(pool_spec[0])

            def local(pool, new, src_of, has):
                # this device's prompts are rows [d * b, (d + 1) * b) of the batch
                return _copy_local(pool, new, src_of % new.shape[0], has, col)

            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(pool_spec, new_spec, rows, rows),
                out_specs=pool_spec,
                check_vma=False,
            )(pool, new, src_of, has)
    return _copy_local(pool, new, src_of, has, col)


def _copy_local(pool, new, src_of, has, col: int) -> jax.Array:
    rows = jnp.take(new, src_of, axis=0).astype(pool.dtype)
    head = jax.lax.slice_in_dim(pool, 0, new.shape[col], axis=col)
    head = jnp.where(has[:, None, None, None], rows, head)
    return jax.lax.dynamic_update_slice_in_dim(pool, head, 0, axis=col)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("state",))
@in_mesh_context
def insert(
    state: SlotState,
    prompt_cache,
    src: jax.Array,
    dst: jax.Array,
    last_token: jax.Array,
    pos: jax.Array,
    max_new: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
    request: jax.Array,
    sample: jax.Array,
    key: jax.Array,
    *,
    mesh,
) -> SlotState:
    """The slot copy: entry ``i`` (all args ``[n]``) puts prompt ``src[i]`` of ``prompt_cache``
    into slot ``dst[i]`` (``dst == S`` marks padding entries, dropped) with its controls and
    the key of sample ``sample[i]`` of request ``request[i]``. On a mesh that splits rows,
    prompt ``src[i]`` must be on the device of slot ``dst[i]`` (see :func:`copy_rows`)."""
    num_slots = state.done.shape[0]
    # slot s <- prompt src_of[s] where `has[s]`: the copy as a per-slot select, so each device
    # gathers its own slots' rows (a scatter into a row-sharded pool is partitioned by
    # replicating every update: 167 GiB at 8B x 1024 slots on v5p-64)
    entry = (
        jnp.full((num_slots,), -1, jnp.int32)
        .at[dst]
        .set(jnp.arange(dst.shape[0], dtype=jnp.int32), mode="drop")
    )
    has = constrain_rows(entry >= 0, mesh)
    src_of = constrain_rows(jnp.take(src, jnp.maximum(entry, 0)), mesh)

    if kv_cache.is_stacked(state.cache):

        def layer(i, cache):
            return {
                n: jax.lax.dynamic_update_index_in_dim(
                    cache[n], copy_rows(cache[n][i], prompt_cache[n][i], src_of, has, n), i, 0
                )
                for n in ("k", "v")
            }

        cache = jax.lax.fori_loop(0, state.cache["k"].shape[0], layer, state.cache)
        cache = cache_map(constrain_cache, cache)
    else:
        cache = tuple(
            {n: copy_rows(pool[n], new[n], src_of, has, n) for n in ("k", "v")}
            for pool, new in zip(state.cache, prompt_cache, strict=True)
        )
    keys = jax.vmap(lambda r, g: jax.random.fold_in(jax.random.fold_in(key, r), g))(request, sample)

    def put(buf, values):
        return constrain_rows(buf.at[dst].set(values.astype(buf.dtype), mode="drop"), mesh)

    n = dst.shape[0]
    return dataclasses.replace(
        state,
        cache=cache,
        last_token=put(state.last_token, last_token),
        pos=put(state.pos, pos),
        step=put(state.step, jnp.zeros((n,), jnp.int32)),
        max_new=put(state.max_new, max_new),
        temperature=put(state.temperature, temperature),
        top_p=put(state.top_p, top_p),
        top_k=put(state.top_k, top_k),
        keys=put(state.keys, jax.random.key_data(keys)),
        done=put(state.done, jnp.zeros((n,), bool)),
        stopped=put(state.stopped, jnp.zeros((n,), bool)),
    )


@functools.partial(
    jax.jit,
    static_argnames=("kv_len", "num_steps", "segment_buffer", *_STATIC),
    donate_argnames=("state",),
)
@in_mesh_context
def decode_segment(
    weights,
    state: SlotState,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    *,
    graphdef,
    kv_len: int,
    num_steps: int,
    cache_dtype=None,
    mesh=None,
    split: bool = False,
    segment_buffer: bool = True,
) -> tuple[SlotState, jax.Array]:
    """Up to ``num_steps`` decode steps of every slot; returns the state and the steps run.

    Each step feeds every slot's ``last_token`` at its ``pos``, samples the next token with
    the slot's controls and key, and records it. With ``segment_buffer`` it attends to the
    cache slots before the slot's ``pos`` at the segment start (the caller guarantees that
    ``kv_len`` covers them for live slots) and to the segment's earlier tokens, kept in a
    ``[S, num_steps]`` segment buffer and merged into the cache after the loop; without, it
    writes the cache at ``pos`` and attends to the slots up to ``pos`` (``kv_len`` must also
    cover the segment's own slots). A slot is done after a stop
    token (kept, ``stopped``) or ``max_new`` tokens. Done slots still run (fixed shapes) but
    change nothing. The loop ends early once every slot is done.
    """
    del cache_dtype  # the cache arrives allocated
    model, cfg, layers = _merge(graphdef, weights)
    s, m = state.tokens.shape
    rows = jnp.arange(s, dtype=jnp.int32)
    # with a segment buffer the cache is read-only in the loop: a slot sees its slots before
    # the segment there and this segment's tokens in the buffer (kv_cache, "Decode segments");
    # without one, the loop carries the cache itself as its "segment" and writes it in place
    cache, start = state.cache, state.pos
    if segment_buffer:
        kv_mask = jnp.arange(kv_len, dtype=jnp.int32)[None, :] < start[:, None]
        dtype = (cache if kv_cache.is_stacked(cache) else cache[0])["k"].dtype
        # a live slot writes at most cache-length tokens, so a longer segment is never needed
        width = min(num_steps, kv_cache.cache_len(cache))
        segment = init_cache(cfg, s, width, dtype, stacked=kv_cache.is_stacked(cache))
        segment = cache_map(constrain_cache, segment)
    else:  # causality alone masks each row's unwritten tail (left-aligned rows)
        kv_mask = jnp.ones((s, kv_len), bool)
        segment = cache

    def body(carry):
        i, st, segment = carry
        live = ~st.done
        hidden, segment = model.forward_hidden(
            st.last_token[:, None],
            st.pos[:, None],
            kv_mask,
            cache if segment_buffer else segment,
            st.pos,
            kv_len=kv_len,
            layers=layers,
            segment=segment if segment_buffer else None,
            segment_step=i,
        )
        logits = model.project_rows(hidden[:, 0])  # [S, V]
        keys = jax.random.wrap_key_data(st.keys)
        token_keys = jax.vmap(jax.random.fold_in)(keys, st.step)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(token_keys)
        tok = select_tokens_rows(logits, u, st.temperature, st.top_p, st.top_k)
        lp = token_logprobs(logits, tok)
        tok = jnp.where(live, tok, pad_id)
        col = jnp.where(live, st.step, m)  # finished slots write nowhere
        tokens = st.tokens.at[rows, col].set(tok, mode="drop")
        logprobs = st.logprobs.at[rows, col].set(lp, mode="drop")
        stop = live & (tok[:, None] == stop_ids[None, :]).any(axis=-1)
        step = st.step + live.astype(jnp.int32)
        new = dataclasses.replace(
            st,
            last_token=constrain_rows(jnp.where(live, tok, st.last_token), mesh),
            pos=constrain_rows(st.pos + live.astype(jnp.int32), mesh),
            step=constrain_rows(step, mesh),
            done=constrain_rows(st.done | stop | (step >= st.max_new), mesh),
            stopped=constrain_rows(st.stopped | stop, mesh),
            tokens=constrain_rows(tokens, mesh),
            logprobs=constrain_rows(logprobs, mesh),
        )
        return i + 1, new, cache_map(constrain_cache, segment)

    def cond(carry):
        i, st, _ = carry
        return (i < num_steps) & ~jnp.all(st.done)

    carry = (jnp.int32(0), dataclasses.replace(state, cache=None), segment)
    steps, state, segment = jax.lax.while_loop(cond, body, carry)
    cache = kv_cache.merge_segment(cache, segment, start) if segment_buffer else segment
    return dataclasses.replace(state, cache=cache_map(constrain_cache, cache)), steps


@functools.partial(jax.jit, static_argnames=("mesh",))  # a new shape: nothing to donate
@in_mesh_context
def compact(state: SlotState, src: jax.Array, keep: jax.Array, *, mesh) -> SlotState:
    """A pool of ``S'`` slots (``src``, ``keep``: ``[S']``): slot ``i`` takes everything of old
    slot ``src[i]`` (cache row, controls, key, tokens so far) where ``keep[i]``, and is a free
    (done) slot elsewhere. The engine's tail: once its queue is empty and few slots are live,
    they move into a smaller pool, whose decode steps cost less.

    With the rows split over the data axes of a mesh, entry ``i`` must name a slot on the
    device that will hold slot ``i`` (both pools split in equal contiguous blocks), and each
    device gathers its own rows (``shard_map``): nothing moves between devices."""

    def gather(x: jax.Array) -> jax.Array:
        axis = slot_axis(x)
        spec = None if mesh is None else leaf_spec(x, mesh)
        if spec is None or spec[axis] is None:
            return jnp.take(x, src, axis=axis)

        def local(x, src):  # this device's block of old slots
            return jnp.take(x, src % x.shape[axis], axis=axis)

        rows = PartitionSpec(spec[axis])
        return jax.shard_map(
            local, mesh=mesh, in_specs=(spec, rows), out_specs=spec, check_vma=False
        )(x, src)

    out = jax.tree.map(gather, state)
    out = dataclasses.replace(out, done=out.done | ~keep, stopped=out.stopped & keep)
    return jax.tree.map(
        lambda x: (
            x
            if mesh is None
            else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, leaf_spec(x, mesh)))
        ),
        out,
    )


@jax.jit
def peek(state: SlotState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``done``, ``step`` and ``stopped`` ``[S]``: what the host reads after every segment."""
    return state.done, state.step, state.stopped


@jax.jit
def take_rows(state: SlotState, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens and log-probs ``[n, M]`` of slots ``idx`` (the finished ones)."""
    return state.tokens[idx], state.logprobs[idx]
