"""The KV cache: layout, allocation, per-row writes.

Attention (``meljax.models.attention``) reads one layer as keys ``[B, K, hd, S]`` and values
``[B, K, S, hd]`` (``B`` rows, ``K`` kv heads, ``S`` slots, ``hd`` head size). The cache STORES
them in one of two layouts (:func:`layout`), chosen per platform:

- ``heads`` (CPU): keys ``[B, K, hd, S]``, values ``[B, K, S, hd]``: XLA:CPU's decode matmuls
  read the cache in stored order;
- ``hd_minor`` (TPU, GPU): keys and values ``[B, K, S, hd]``, the layout the TPU's batched
  matmuls read in place (compiled for v5p, ``meljax plan``); :func:`read_layer` hands attention
  the transposed key view, which the compiler folds into the matmul.

Decode segments (the engine's decode loop, ``meljax.sampling.slots.decode_segment``) on TPU
and GPU never write the cache inside the loop: each step's keys and values go to a small
segment buffer (a cache of ``N`` slots for ``N`` steps) that attention reads next to the cache
(``attention(..., extra=...)``), and :func:`merge_segment` writes the buffer into the cache
once, after the loop. (On CPU they write the cache in the loop, per row, in place: one
softmax block per layer is cheaper there; ``meljax.sampling.engine``.) A cache written
inside a ``while`` loop is stored by the TPU compiler in the layout its per-row scatter
prefers (``[B, S, K, hd]``), so the whole cache was copied into and out of every segment and
each layer was re-laid out for the matmuls at every step (a 2-layer Qwen3-8B decode segment
on v5p-64: 1.4 GiB of temporaries for a 1.25 GiB cache); read-only inside the loop, it is
used in place.

A cache is a dict ``{"k": ..., "v": ...}`` in one of two forms:

- **stacked** (default): ``[L, ...]`` buffers; the layer scan carries them and writes each
  layer's new slots in place;
- **split**: a tuple of ``L`` per-layer dicts. On CPU the decode loop runs faster with the
  layers unrolled over separate arrays (a ``[L, ...]`` operand sliced per layer is copied
  first); ``split_cache`` / ``stack_cache`` convert, once per call, outside any loop.

Slots are addressed per row: a write of ``T`` new tokens at ``index`` (a scalar, or int32 ``[B]``
for a different slot per row) fills slots ``index[b] .. index[b] + T - 1`` of row ``b``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from meljax.models.config import ModelConfig
from meljax.runtime import sharding as shd
from meljax.runtime.platform import profile

Cache = dict[str, jax.Array] | tuple[dict[str, jax.Array], ...]
_FORCED_LAYOUT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meljax_kv_layout", default=None
)
# per-layer buffer axes, by layout and buffer ("slots": cache slots, "hd": head size)
_AXES = {
    "heads": {
        "k": ("batch", "kv_heads", "hd", "slots"),
        "v": ("batch", "kv_heads", "slots", "hd"),
    },
    "hd_minor": {n: ("batch", "kv_heads", "slots", "hd") for n in ("k", "v")},
}
LAYOUTS = tuple(_AXES)
_NEW_AXES = ("batch", "slots", "kv_heads", "hd")  # a layer's new keys / values [B, T, K, hd]
_ATTENTION_AXES = _AXES["heads"]  # what attention reads


def _permute(x: jax.Array, src: tuple[str, ...], dst: tuple[str, ...]) -> jax.Array:
    return x if src == dst else x.transpose([src.index(a) for a in dst])


def layout() -> str:
    """The storage layout of caches made and read in the current context: ``heads`` when
    compiling for CPU, ``hd_minor`` for TPU and GPU (see the module docstring)."""
    forced = _FORCED_LAYOUT.get()
    if forced is not None:
        return forced
    return profile().kv_layout


@contextlib.contextmanager
def use_layout(name: str):
    """Forces the storage layout (tests: the TPU layout on CPU). Clears JAX's compilation
    caches on entry and exit, since a jitted program does not key its cache on the layout."""
    if name not in LAYOUTS:
        raise ValueError(f"KV cache layout {name!r}; choose one of {LAYOUTS}")
    token = _FORCED_LAYOUT.set(name)
    jax.clear_caches()
    try:
        yield
    finally:
        _FORCED_LAYOUT.reset(token)
        jax.clear_caches()


def buffer_axes(name: str) -> tuple[str, ...]:
    """Axes of one layer's ``name`` (``"k"``/``"v"``) buffer in the current layout (``"slots"``:
    cache slots, ``"hd"``: head size)."""
    return _AXES[layout()][name]


def slot_axis(name: str) -> int:
    """The slot axis of one layer's ``name`` buffer (0-based, per-layer)."""
    return buffer_axes(name).index("slots")


def sharding_axes(name: str) -> tuple[str | None, ...]:
    """``buffer_axes`` as logical mesh axes for ``sharding.constrain`` (rows and kv heads)."""
    return tuple(a if a in ("batch", "kv_heads") else None for a in buffer_axes(name))


def to_storage(x: jax.Array, name: str) -> jax.Array:
    """One layer's new keys or values ``[B, T, K, hd]`` in the storage layout."""
    return _permute(x, _NEW_AXES, buffer_axes(name))


def from_storage(x: jax.Array, name: str) -> jax.Array:
    """A stored buffer (one layer, or stacked ``[L, ...]``) as ``[..., B, S, K, hd]``."""
    lead = ("layers",) * (x.ndim - 4)
    return _permute(x, lead + buffer_axes(name), lead + _NEW_AXES)


def to_attention(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's stored keys and values as attention reads them: ``[B, K, hd, S]`` and
    ``[B, K, S, hd]``."""
    return tuple(_permute(x, buffer_axes(n), _ATTENTION_AXES[n]) for x, n in ((k, "k"), (v, "v")))


def _shape(cfg: ModelConfig, batch: int, max_len: int, name: str) -> tuple[int, ...]:
    sizes = {"batch": batch, "kv_heads": cfg.num_kv_heads, "slots": max_len, "hd": cfg.head_dim}
    return tuple(sizes[a] for a in buffer_axes(name))


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, stacked: bool = True
) -> Cache:
    """A zeroed cache of ``max_len`` slots for ``batch`` rows (stacked or split, see above)."""
    dt = cfg.dtype if dtype is None else dtype
    k_shape, v_shape = _shape(cfg, batch, max_len, "k"), _shape(cfg, batch, max_len, "v")
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
    k = first["k"]
    return k.shape[k.ndim - 4 + slot_axis("k")]


def write_slots(buf: jax.Array, new: jax.Array, index, name: str, layer=None) -> jax.Array:
    """Writes ``new`` (one layer's new keys or values ``[B, T, K, hd]``) into ``buf`` at slot
    ``index`` (scalar or ``[B]``); ``buf`` is one layer in the storage layout, or the stacked
    ``[L, ...]`` buffer with ``layer`` (static or traced) selecting the layer.

    A scalar index is one ``dynamic_update_slice``. Per-row indices are one scatter with
    unique, sorted indices, which XLA updates in place (a ``vmap`` of ``dynamic_update_slice``
    on the stacked buffer copies the whole cache per layer). Per-row slots past the end of the cache are dropped. With the
    rows split over a mesh in context, each device scatters its own rows (``shard_map``):
    XLA's partitioner would all-gather every row's new keys and values to each device first.
    """
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        new = to_storage(new.astype(buf.dtype), name)
        start = [0] * new.ndim
        start[slot_axis(name)] = index
        if layer is None:
            return jax.lax.dynamic_update_slice(buf, new, start)
        return jax.lax.dynamic_update_slice(buf, new[None], [layer, *start])
    new = new.astype(buf.dtype)
    mesh = shd.context_mesh()
    lead = buf.ndim - new.ndim  # 1 for the stacked [L, ...] buffer
    buf_axes = (None,) * lead + sharding_axes(name)
    if mesh is not None and not any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        buf_spec = shd.logical_to_spec(buf_axes, None, mesh, buf.shape)
        if buf_spec[lead] is not None:  # rows split over devices: write each shard locally
            kv_spec = buf_spec[lead + buffer_axes(name).index("kv_heads")]
            new_spec = PartitionSpec(buf_spec[lead], None, kv_spec, None)
            idx_spec = PartitionSpec(buf_spec[lead])

            def local(buf, new, index, layer):
                return _scatter_rows(buf, new, index, name, layer if lead else None)

            layer_arg = jnp.asarray(0 if layer is None else layer, jnp.int32)
            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(buf_spec, new_spec, idx_spec, PartitionSpec()),
                out_specs=buf_spec,
                check_vma=False,
            )(buf, new, index, layer_arg)
    return _scatter_rows(buf, new, index, name, layer)


def _scatter_rows(buf, new, index, name: str, layer) -> jax.Array:
    """The per-row write of ``write_slots`` (``new`` ``[B, T, K, hd]``) as one in-place
    scatter (see there)."""
    b, t = new.shape[:2]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    slots = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    # advanced indices (rows, slots) broadcast to [B, T] and lead the indexed shape (moved to
    # the front when a slice separates them), so the update is [B, T, K, hd] in every layout
    where = [slice(None)] * 4
    where[0], where[slot_axis(name)] = rows, slots
    where = tuple(where)
    if layer is not None:
        where = (layer, *where)
    return buf.at[where].set(new, unique_indices=True, indices_are_sorted=True, mode="drop")


def read_layer(cache: dict[str, jax.Array], layer, kv_len: int) -> tuple[jax.Array, jax.Array]:
    """Keys ``[B, K, hd, kv_len]`` and values ``[B, K, kv_len, hd]`` of one layer, as attention
    reads them (``layer`` is ``None`` for a per-layer dict, else an index into the stacked
    buffers)."""
    k, v = cache["k"], cache["v"]
    if layer is not None:
        k = jax.lax.dynamic_index_in_dim(k, layer, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v, layer, keepdims=False)
    k, v = to_attention(k, v)
    if kv_len < k.shape[-1]:
        k, v = k[..., :kv_len], v[:, :, :kv_len]
    return k, v


def merge_segment(cache: Cache, segment: Cache, start: jax.Array) -> Cache:
    """Writes a decode segment's buffer (a cache of ``N`` slots, same form and layout) into the
    cache: row ``b``'s ``N`` segment tokens go to cache slots ``start[b] .. start[b] + N - 1``
    (slots past the end are dropped). Tokens of a row that stopped early land past its last
    slot, which nothing reads before a later write.

    One ``dynamic_update_slice`` per row (a loop over the rows, each device over its own):
    the TPU compiler updates the cache in place, where a scatter of every row at once was
    given its own layout and the whole cache copied into it and back (Qwen3-14B, kv heads
    over 4 chips)."""
    if is_stacked(cache):
        return {n: _merge_buffer(cache[n], segment[n], start, n) for n in ("k", "v")}
    return tuple(
        {n: _merge_buffer(c[n], seg[n], start, n) for n in ("k", "v")}
        for c, seg in zip(cache, segment, strict=True)
    )


def _merge_buffer(buf: jax.Array, seg: jax.Array, start: jax.Array, name: str) -> jax.Array:
    lead = buf.ndim - 4  # 1 for stacked [L, ...] buffers
    mesh = shd.context_mesh()
    if mesh is not None and not any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        spec = shd.logical_to_spec((None,) * lead + sharding_axes(name), None, mesh, buf.shape)
        if spec[lead] is not None:  # rows split over devices: each merges its own rows
            return jax.shard_map(
                functools.partial(_merge_rows, name=name),
                mesh=mesh,
                in_specs=(spec, spec, PartitionSpec(spec[lead])),
                out_specs=spec,
                check_vma=False,
            )(buf, seg, start)
    return _merge_rows(buf, seg, start, name=name)


def _merge_rows(buf: jax.Array, seg: jax.Array, start: jax.Array, *, name: str) -> jax.Array:
    lead = buf.ndim - 4
    axis, row_axis = lead + slot_axis(name), lead
    size = buf.shape[axis]
    seg = jax.lax.slice_in_dim(seg, 0, min(seg.shape[axis], size), axis=axis).astype(buf.dtype)
    n = seg.shape[axis]
    # columns past the cache's end: write the last n slots, keeping those before `start`
    visible = jnp.arange(n, dtype=jnp.int32).reshape(
        [n if d == axis else 1 for d in range(buf.ndim)]
    )

    def row(b, buf):
        piece = jax.lax.dynamic_slice_in_dim(seg, b, 1, row_axis)
        at = jnp.minimum(start[b], size - n)
        shift = start[b] - at  # > 0 only near the end of the cache
        piece = jax.lax.dynamic_slice_in_dim(
            jnp.concatenate([jnp.zeros_like(piece), piece], axis), n - shift, n, axis
        )
        where = [0] * buf.ndim
        where[row_axis], where[axis] = b, at
        old = jax.lax.dynamic_slice(buf, where, piece.shape)
        return jax.lax.dynamic_update_slice(buf, jnp.where(visible >= shift, piece, old), where)

    return jax.lax.fori_loop(0, buf.shape[row_axis], row, buf)
