"""The engine's programs lowered ahead of time on abstract weights (for ``meljax plan``).

:func:`lower_engine_programs` gives, for one engine run of ``num_requests`` prompts of up to
``prompt_len`` tokens with ``sampling``, the programs the run launches at their largest shapes:

- ``weights``: the training parameters cast and laid out for decoding (once per update);
- ``prefill``: the first (largest) batched prefill, every slot free;
- ``insert``: its slot copy into the pool;
- ``decode``: one decode segment over every slot at the largest ``kv_len`` (the whole cache).

Nothing is allocated: inputs are ``jax.ShapeDtypeStruct`` with their shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from meljax.runtime.buckets import bucket
from meljax.sampling import slots
from meljax.sampling.select import SamplingParams
from meljax.sampling.weights import weight_shardings, weights_program


@dataclasses.dataclass
class EngineProgram:
    """One lowered-on-demand engine program: ``lower()`` returns a ``jax.stages.Lowered``."""

    shapes: str
    lower: Callable[[], Any]
    max_trip_count: int  # iterations of its data-dependent loop at most (decode: K)


def _attach(tree, shardings):
    """``tree``'s leaves as ``ShapeDtypeStruct`` with the shardings of ``shardings`` (a prefix
    tree: a sharding may stand for a whole ``nnx.Param`` node)."""

    def one(sharding, sub):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), sub
        )

    return jax.tree.map(
        one, shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )


def lower_engine_programs(
    engine, params, num_requests: int, prompt_len: int, sampling: SamplingParams
) -> dict[str, EngineProgram]:
    """See the module docstring. ``params``: abstract training parameters with shardings."""
    mesh, g = engine.mesh, sampling.num_samples
    dp = engine._dp()
    n_slots, cache_len = engine.pool_shape(num_requests * g, prompt_len, sampling.max_new_tokens)
    static = dict(graphdef=engine.graphdef, cache_dtype=engine.cache_dtype, mesh=mesh)

    def rows(shape, dtype):
        sharding = None if mesh is None else NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    build = weights_program(engine.graphdef, params, mesh, engine.split)
    weights = jax.eval_shape(build, params)
    if mesh is not None:
        w = weight_shardings(engine.graphdef, params, mesh, engine.split)
        weights = _attach(weights, w)
    state = jax.eval_shape(
        lambda: slots.init_slots(
            slots=n_slots,
            cache_len=cache_len,
            max_new=sampling.max_new_tokens,
            split=engine.split,
            **static,
        )
    )
    if mesh is not None:
        state = _attach(state, slots.state_shardings(state, mesh))
    prompts = min(num_requests, max(1, n_slots // g))
    b = bucket(prompts, engine.batch_buckets, multiple=dp)
    p = engine.prompt_bucket(max(prompt_len - 1, 1))
    tokens = rows((b, p), jnp.int32)
    prompt_cache = jax.eval_shape(
        lambda w, t: slots.prefill(w, t, split=engine.split, **static), weights, tokens
    )
    if mesh is not None:
        prompt_cache = _attach(prompt_cache, slots.state_shardings(prompt_cache, mesh))
    width = n_slots  # the slot copy's columns: one per slot (``schedule.insert_columns``)
    ints, floats = rows((width,), jnp.int32), rows((width,), jnp.float32)
    insert_args = dict(
        src=ints,
        dst=ints,
        last_token=ints,
        pos=ints,
        max_new=ints,
        temperature=floats,
        top_p=floats,
        top_k=ints,
        request=ints,
        sample=ints,
    )
    stop_ids = rows((max(len(engine.stop_token_ids), 1),), jnp.int32)
    pad = rows((), jnp.int32)
    k = engine.segment_steps
    pool = f"{n_slots} slots x {cache_len} cache slots, G={g}"
    return {
        "weights": EngineProgram(
            "training params -> compute dtype, inference layout (once per update)",
            lambda: build.lower(params),
            1,
        ),
        "prefill": EngineProgram(
            f"{b} prompts x {p} tokens (first refill of {pool})",
            lambda: slots.prefill.lower(weights, tokens, split=engine.split, **static),
            1,
        ),
        "insert": EngineProgram(
            f"{width} slot copies of {b} prompt caches into {pool}",
            lambda: slots.insert.lower(
                state, prompt_cache, key=jax.random.key(0), mesh=mesh, **insert_args
            ),
            1,
        ),
        "decode": EngineProgram(
            f"one segment of {k} steps over {pool}, kv_len {cache_len} (the largest bucket)",
            lambda: slots.decode_segment.lower(
                weights,
                state,
                stop_ids,
                pad,
                kv_len=cache_len,
                num_steps=k,
                split=engine.split,
                segment_buffer=engine.segment_buffer,
                **static,
            ),
            k,
        ),
    }


__all__ = ["EngineProgram", "lower_engine_programs"]
