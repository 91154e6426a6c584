"""The engine's pool of decode slots as data: :class:`SlotState` and where its arrays live.

Every leaf of a :class:`SlotState` is slot-major: ``[S, ...]``, or ``[(L,) S, K, ., .]`` for a
cache buffer (``L`` layers when stacked, ``K`` kv heads). On a mesh the slots (and a prompt
cache's rows) go over the data axes and the cache's kv heads over ``tensor``
(:func:`state_shardings`, :func:`constrain_rows`, :func:`constrain_cache`);
:func:`in_mesh_context` traces a program with its ``mesh`` in context so that the model's
activation constraints apply. The programs that run on the pool are in
:mod:`meljax.sampling.slots`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meljax.models import kv_cache
from meljax.runtime import sharding as shd

__all__ = [
    "SlotState",
    "cache_map",
    "constrain_cache",
    "constrain_rows",
    "in_mesh_context",
    "leaf_spec",
    "slot_axis",
    "state_shardings",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Every slot's decode state (``S`` slots, ``C`` cache slots each, ``M`` output columns).

    cache: stacked or split KV cache of ``[S, ..., C]``; last_token, pos, step, max_new: int32
    ``[S]`` (the unfed token, its cache slot, tokens produced, the limit); temperature, top_p:
    float32 ``[S]``; top_k: int32 ``[S]``; keys: uint32 ``[S, ...]`` raw key data of each
    sample; done, stopped: bool ``[S]`` (free slots are done; stopped: a stop token came);
    tokens int32 / logprobs float32 ``[S, M]`` (column ``j`` = completion token ``j``).
    """

    cache: Any
    last_token: jax.Array
    pos: jax.Array
    step: jax.Array
    max_new: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    keys: jax.Array
    done: jax.Array
    stopped: jax.Array
    tokens: jax.Array
    logprobs: jax.Array


def constrain_rows(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Shards a batch-major array over the data axes of ``mesh`` (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim))


def cache_map(fn, cache):
    """Applies ``fn(array, batch_axis, name)`` to every buffer (``name`` ``"k"``/``"v"``) of a
    stacked or split cache."""
    axis = 1 if kv_cache.is_stacked(cache) else 0
    layers = [cache] if kv_cache.is_stacked(cache) else cache
    out = [{n: fn(layer[n], axis, n) for n in ("k", "v")} for layer in layers]
    return out[0] if kv_cache.is_stacked(cache) else tuple(out)


def constrain_cache(c: jax.Array, batch_axis: int, name: str) -> jax.Array:
    """Rows over the data axes, kv heads over ``tensor`` (no-op without a mesh in context)."""
    return shd.constrain(c, (None,) * batch_axis + kv_cache.sharding_axes(name))


def in_mesh_context(fn):
    """Runs ``fn`` with its ``mesh`` keyword in context (``sharding.use_mesh``), so the model's
    activation constraints apply while it is traced."""

    @functools.wraps(fn)
    def wrapped(*args, mesh=None, **kw):
        with shd.use_mesh(mesh):
            return fn(*args, mesh=mesh, **kw)

    return wrapped


def slot_axis(x) -> int:
    """The slot axis of a :class:`SlotState` leaf: a cache buffer is ``[(L,) S, K, ., .]``,
    every other leaf ``[S, ...]``."""
    return x.ndim - 4 if x.ndim >= 4 else 0


def leaf_spec(x, mesh: Mesh) -> PartitionSpec:
    """Rows over the data axes, cache kv heads over ``tensor``."""
    if x.ndim >= 4:
        axes = (None,) * slot_axis(x) + ("batch", "kv_heads", None, None)
    else:
        axes = ("batch",) + (None,) * (x.ndim - 1)
    return shd.logical_to_spec(axes, None, mesh, x.shape)


def state_shardings(state, mesh: Mesh):
    """``NamedSharding`` tree of a (abstract) :class:`SlotState` or prompt cache: rows over
    the data axes, cache kv heads over ``tensor``."""
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x, mesh)), state)
