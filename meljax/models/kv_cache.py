"""The KV cache: layout, allocation, per-row writes.

Layout (per layer; ``B`` rows, ``K`` kv heads, ``S`` slots, ``hd`` head size):

    keys    [B, K, hd, S]   slots minor, so ``q @ K`` reads the cache in stored order
    values  [B, K, S, hd]   so ``probs @ V`` does too

A cache is a dict ``{"k": ..., "v": ...}`` in one of two forms:

- **stacked** (default): ``k`` ``[L, B, K, hd, S]`` and ``v`` ``[L, B, K, S, hd]``; the layer scan
  carries it and writes each layer's new slots in place;
- **split**: a tuple of ``L`` per-layer dicts. On CPU the decode loop runs faster with the
  layers unrolled over separate arrays (a ``[L, ...]`` operand sliced per layer is copied
  first); ``split_cache`` / ``stack_cache`` convert, once per call, outside any loop.

Slots are addressed per row: a write of ``T`` new tokens at ``index`` (a scalar, or int32 ``[B]``
for a different slot per row) fills slots ``index[b] .. index[b] + T - 1`` of row ``b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from meljax import sharding as shd
from meljax.models.config import ModelConfig

Cache = dict[str, jax.Array] | tuple[dict[str, jax.Array], ...]
_SLOT_AXIS = {"k": -1, "v": -2}


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, stacked: bool = True
) -> Cache:
    """A zeroed cache of ``max_len`` slots for ``batch`` rows (stacked or split, see above)."""
    dt = cfg.dtype if dtype is None else dtype
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if stacked:
        n = cfg.num_layers
        return {"k": jnp.zeros((n, *k_shape), dt), "v": jnp.zeros((n, *v_shape), dt)}
    return tuple(
        {"k": jnp.zeros(k_shape, dt), "v": jnp.zeros(v_shape, dt)} for _ in range(cfg.num_layers)
    )


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    """Memory of a KV cache in bytes (keys and values of every layer)."""
    dt = jnp.dtype(cfg.dtype if dtype is None else dtype)
    return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * dt.itemsize


def is_stacked(cache: Cache) -> bool:
    return isinstance(cache, dict)


def split_cache(cache: Cache) -> tuple[dict[str, jax.Array], ...]:
    """The split form of a cache (per-layer dicts)."""
    if not is_stacked(cache):
        return tuple(cache)
    return tuple({"k": k, "v": v} for k, v in zip(cache["k"], cache["v"], strict=True))


def stack_cache(cache: Cache) -> dict[str, jax.Array]:
    """The stacked form of a cache."""
    if is_stacked(cache):
        return cache
    return {name: jnp.stack([layer[name] for layer in cache]) for name in ("k", "v")}


def cache_len(cache: Cache) -> int:
    """Number of slots ``S``."""
    first = cache if is_stacked(cache) else cache[0]
    return first["k"].shape[-1]


def write_slots(buf: jax.Array, new: jax.Array, index, name: str, layer=None) -> jax.Array:
    """Writes ``new`` (one layer's ``[B, K, hd, T]`` keys or ``[B, K, T, hd]`` values) into
    ``buf`` at slot ``index`` (scalar or ``[B]``); ``buf`` is one layer, or the stacked
    ``[L, ...]`` buffer with ``layer`` (static or traced) selecting the layer.

    A scalar index is one ``dynamic_update_slice``. Per-row indices are one scatter with
    unique, sorted indices, which XLA updates in place (a ``vmap`` of ``dynamic_update_slice``
    on the stacked buffer was measured to copy the whole cache per layer: 1.5 s vs 11 ms per
    SmolLM2 decode step on CPU). Per-row slots past the end of the cache are dropped. With the
    rows split over a mesh in context, each device scatters its own rows (``shard_map``):
    XLA's partitioner would all-gather every row's new keys and values to each device first.
    """
    new = new.astype(buf.dtype)
    index = jnp.asarray(index, jnp.int32)
    slot_axis = new.ndim + _SLOT_AXIS[name]
    if index.ndim == 0:
        start = [0] * new.ndim
        start[slot_axis] = index
        if layer is None:
            return jax.lax.dynamic_update_slice(buf, new, start)
        return jax.lax.dynamic_update_slice(buf, new[None], [layer, *start])
    mesh = shd.context_mesh()
    lead = buf.ndim - new.ndim  # 1 for the stacked [L, ...] buffer
    rows_axes = (None,) * lead + ("batch", "kv_heads", None, None)
    if mesh is not None and not any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        buf_spec = shd.logical_to_spec(rows_axes, None, mesh, buf.shape)
        if buf_spec[lead] is not None:  # rows split over devices: write each shard locally
            new_spec = shd.logical_to_spec(rows_axes[lead:], None, mesh, new.shape)
            idx_spec = PartitionSpec(new_spec[0])

            def local(buf, new, index, layer):
                return _scatter_rows(buf, new, index, name, slot_axis, layer if lead else None)

            layer_arg = jnp.asarray(0 if layer is None else layer, jnp.int32)
            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(buf_spec, new_spec, idx_spec, PartitionSpec()),
                out_specs=buf_spec,
                check_vma=False,
            )(buf, new, index, layer_arg)
    return _scatter_rows(buf, new, index, name, slot_axis, layer)


def _scatter_rows(buf, new, index, name: str, slot_axis: int, layer) -> jax.Array:
    """The per-row write of ``write_slots`` as one in-place scatter (see there)."""
    b, t = new.shape[0], new.shape[slot_axis]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    slots = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    # advanced indices (rows, slots) broadcast to [B, T] and lead the indexed shape
    upd = jnp.moveaxis(new, slot_axis, 1)  # [B, T, K, hd]
    if name == "k":
        where = (rows, slice(None), slice(None), slots)
    else:
        where = (rows, slice(None), slots, slice(None))
    if layer is not None:
        where = (layer, *where)
    return buf.at[where].set(upd, unique_indices=True, indices_are_sorted=True, mode="drop")


def read_layer(cache: dict[str, jax.Array], layer, kv_len: int) -> tuple[jax.Array, jax.Array]:
    """Keys ``[B, K, hd, kv_len]`` and values ``[B, K, kv_len, hd]`` of one layer (``layer`` is
    ``None`` for a per-layer dict, else an index into the stacked buffers)."""
    k, v = cache["k"], cache["v"]
    if layer is not None:
        k = jax.lax.dynamic_index_in_dim(k, layer, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v, layer, keepdims=False)
    if kv_len < k.shape[-1]:
        k, v = k[..., :kv_len], v[:, :, :kv_len]
    return k, v
