"""One decoder-only transformer for the Llama / SmolLM2 / Qwen2 / Qwen3 family (flax nnx).

Weights are stored in JAX layout (``[in, out]``, heads split out) and each carries logical axis
names under the ``logical_axes`` metadata key (see ``meljax.runtime.sharding``). Every per-layer weight is
stacked along a leading ``[num_layers]`` axis (logical axis ``"layers"``, never sharded) under
``model.layers`` (paths like ``("layers", "attn", "q_proj")``, see ``layers.layer_weights``).

The layers run under ``jax.lax.scan`` when ``cfg.scan_layers`` (one compiled layer, fast
compiles for deep models) or as an unrolled loop over static slices otherwise; both give the
same numbers. Without a cache, each layer is rematerialised in the backward pass according to
``cfg.remat_policy`` (``resolve_remat``).

Forward with a KV cache (``forward_hidden(tokens, positions, kv_mask, cache, cache_index,
kv_len=...)``; cache layout in ``meljax.models.kv_cache``):

- ``kv_mask`` bool ``[B, S]`` marks valid cache slots (including the ``T`` slots being written);
- ``cache_index`` is the slot of the first new token: a Python int, a scalar, or int32 ``[B]``
  (each row writes its ``T`` new tokens at its own slots ``cache_index[b] + t``);
- only the first ``kv_len`` slots are attended (static; default ``cache_index + T`` when the
  index is a Python int, else ``S``), so a decode segment costs what the filled part costs;
- query ``t`` of row ``b`` (slot ``s_q = cache_index[b] + t``) sees slot ``s`` iff
  ``kv_mask[b, s] and s <= s_q``. Positions (for RoPE) are passed explicitly, so left padding
  costs nothing in correctness.

Without a cache, ``kv_mask`` ``[B, T]`` marks real tokens and attention is causal over slots.
``prefill`` writes a long prompt chunk by chunk, each chunk attending to the cache prefix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from meljax.models import kv_cache
from meljax.models.config import REMAT_POLICIES, ModelConfig
from meljax.models.kv_cache import Cache, cache_bytes, init_cache
from meljax.models.layers import (
    RESIDUAL,
    LayerInputs,
    decoder_layer,
    layer_weights,
    rms_norm,
    rope_inv_freq,
)
from meljax.runtime import sharding as shd
from meljax.runtime.platform import profile

_INITS = {
    "normal": nnx.initializers.normal(0.02),
    "zeros": nnx.initializers.zeros,
    "ones": nnx.initializers.ones,
}
# "auto" on CPU: no remat, the fastest update step there (docs/performance.md).

LayerWeights = dict[str, jax.Array] | tuple[dict[str, jax.Array], ...]


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str) -> nnx.Param:
    return nnx.Param(_INITS[init](rngs.params(), shape, dtype), logical_axes=axes)


class _Group(nnx.Module):
    """A named group of stacked weights (``attn`` / ``mlp``)."""

    def __init__(self, params: dict[str, nnx.Param]):
        for name, p in params.items():
            setattr(self, name, p)


class LayerStack(nnx.Module):
    """All decoder layers' weights, each ``[num_layers, ...]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        groups: dict[str, dict[str, nnx.Param]] = {"attn": {}, "mlp": {}}
        for name, info in layer_weights(cfg).items():
            shape = (cfg.num_layers, *info.shape)
            p = _param(rngs, shape, ("layers", *info.axes), cfg.param_dtype, info.init)
            if info.group:
                groups[info.group][name] = p
            else:
                setattr(self, name, p)
        self.attn = _Group(groups["attn"])
        self.mlp = _Group(groups["mlp"])

    def weights(self, cfg: ModelConfig) -> dict[str, jax.Array]:
        """Flat ``name -> [L, ...]`` arrays (the scan's ``xs``)."""
        out = {}
        for name, info in layer_weights(cfg).items():
            owner = getattr(self, info.group) if info.group else self
            out[name] = getattr(owner, name)[...]
        return out


def resolve_remat(policy: str):
    """``None`` (no rematerialisation) or the ``jax.checkpoint`` policy for ``policy``.

    ``full`` saves only each layer's input (recomputes the whole layer), ``dots`` keeps every
    matmul output, ``dots_no_batch`` the matmuls without batch dimensions (weight products),
    ``auto``: the platform profile's (:mod:`meljax.runtime.platform`).
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {policy!r}; choose one of {REMAT_POLICIES}")
    if policy == "auto":
        policy = profile().remat
    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    }[policy]


def prefer_split_layers() -> bool:
    """Whether decoding should unroll the layers over separate arrays (``split_layers`` and a
    split cache): on CPU a stacked ``[L, ...]`` weight sliced per layer is copied before each
    matmul, which a split layout avoids (the platform profile's ``split_layers``)."""
    return profile().split_layers


def run_layers(
    cfg: ModelConfig,
    weights: LayerWeights,
    x: jax.Array,
    inputs: LayerInputs,
    cache: Cache | None,
    segment: Cache | None = None,
) -> tuple[jax.Array, Cache | None]:
    """All decoder layers on ``x`` ``[B, T, D]``: scanned (stacked weights and
    ``cfg.scan_layers``) or unrolled (split weights, or ``scan_layers=False``). Returns the
    updated cache, or with ``segment`` (a decode-segment buffer shaped like the cache) the
    updated buffer and the cache untouched."""
    layer = functools.partial(decoder_layer, cfg)
    n = cfg.num_layers
    if segment is not None:
        return _run_layers_on_segment(layer, weights, x, inputs, cache, segment, cfg.scan_layers)
    if cache is None:
        policy = resolve_remat(cfg.remat_policy)

        def body(x, w):
            return layer(w, x, inputs)[0]

        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)
    split = isinstance(weights, tuple)
    if not split and cfg.scan_layers:
        if cache is None:
            x, _ = jax.lax.scan(lambda x, w: (body(x, w), None), x, weights)
            return x, None

        def step(carry, xs):
            x, c = carry
            x, c = layer(xs[0], x, inputs, c, xs[1])
            return (x, c), None

        xs = (weights, jnp.arange(n, dtype=jnp.int32))
        (x, cache), _ = jax.lax.scan(step, (x, kv_cache.stack_cache(cache)), xs)
        return x, cache
    stacked_cache = cache is not None and kv_cache.is_stacked(cache)
    new_cache = [] if cache is not None and not stacked_cache else None
    for i in range(n):
        w = weights[i] if split else {k: v[i] for k, v in weights.items()}
        if cache is None:
            x = body(x, w)
        elif stacked_cache:
            x, cache = layer(w, x, inputs, cache, i)
        else:
            x, c = layer(w, x, inputs, cache[i])
            new_cache.append(c)
    return x, (cache if new_cache is None else tuple(new_cache))


def _run_layers_on_segment(layer, weights, x, inputs, cache, segment, scan: bool):
    """``run_layers`` of a decode-segment step: the cache is read-only (scanned over as an
    input when stacked, so each layer reads its slice in place) and the segment buffer is
    rewritten."""
    if not isinstance(weights, tuple) and scan and kv_cache.is_stacked(cache):

        def step(x, xs):
            w, c, seg = xs
            return layer(w, x, inputs, c, None, seg)

        return jax.lax.scan(step, x, (weights, cache, segment))
    new = []
    for i in range(len(segment) if isinstance(segment, tuple) else segment["k"].shape[0]):
        w = weights[i] if isinstance(weights, tuple) else {k: v[i] for k, v in weights.items()}
        c = cache[i] if isinstance(cache, tuple) else {k: v[i] for k, v in cache.items()}
        seg = segment[i] if isinstance(segment, tuple) else {k: v[i] for k, v in segment.items()}
        x, seg = layer(w, x, inputs, c, None, seg)
        new.append(seg)
    if isinstance(segment, tuple):
        return x, tuple(new)
    return x, {k: jnp.stack([s[k] for s in new]) for k in ("k", "v")}


class Transformer(nnx.Module):
    """Decoder-only LM. ``model(tokens)`` maps int32 ``[batch, seq]`` to f32 logits
    ``[batch, seq, vocab]``; ``forward_hidden`` exposes the cache-aware core."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, d, v = cfg.param_dtype, cfg.hidden_size, cfg.vocab_size
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), pd, "normal")
        self.layers = LayerStack(cfg, rngs=rngs)
        self.final_norm = _param(rngs, (d,), ("norm",), pd, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), pd, "normal")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[B, T, V]`` (float32) for tokens ``[B, T]``.

        ``kv_mask`` ``[B, T]`` (bool) marks real tokens; ``positions`` defaults to the count of real
        tokens before each slot, so left- and right-padded batches both work.
        """
        if kv_mask is None:
            kv_mask = jnp.ones(tokens.shape, bool)
        if positions is None:
            positions = default_positions(kv_mask)
        hidden, _ = self.forward_hidden(tokens, positions, kv_mask)
        return self.project(hidden)

    def split_layers(self, dtype=None) -> tuple[dict[str, jax.Array], ...]:
        """Per-layer weight dicts (one copy, in ``dtype`` when given): pass as ``layers=`` to
        decode with the layers unrolled over separate arrays (see ``prefer_split_layers``)."""
        stacked = self.layers.weights(self.cfg)
        if dtype is not None:
            stacked = {k: v.astype(dtype) for k, v in stacked.items()}
        return tuple({k: v[i] for k, v in stacked.items()} for i in range(self.cfg.num_layers))

    def forward_hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_mask: jax.Array,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        *,
        kv_len: int | None = None,
        layers: LayerWeights | None = None,
        segment: Cache | None = None,
        segment_step: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Final normalised hidden states ``[B, T, D]`` and the updated cache (with
        ``segment``: the updated segment buffer).

        Args:
          tokens: int32 ``[B, T]``.
          positions: int32 ``[B, T]`` RoPE positions.
          kv_mask: bool ``[B, T]`` without a cache, else ``[B, S]`` over cache slots (including
            the ``T`` slots being written now).
          cache: stacked or split cache (``meljax.models.kv_cache``), or ``None``.
          cache_index: first cache slot written by these tokens: int, scalar or int32 ``[B]``.
          kv_len: attend to the first ``kv_len`` cache slots only (static; see module doc).
          layers: the layer weights to use (default: this model's stacked weights), e.g. the
            per-layer dicts of ``split_layers``.
          segment / segment_step: a decode segment (``kv_cache``, "Decode segments"; ``T ==
            1``): the buffer (``kv_cache.init_segment``) and the scalar column this step
            writes. The cache is then only read; ``kv_mask`` must hide its slots from the
            segment's first one on.
        """
        cfg = self.cfg
        t = tokens.shape[1]
        if cache is None:
            kv_len, kv_valid = t, kv_mask.astype(bool)
        else:
            s = kv_cache.cache_len(cache)
            if kv_len is None:
                kv_len = min(cache_index + t, s) if isinstance(cache_index, int) else s
            kv_valid = kv_mask[:, :kv_len].astype(bool)
        inputs = LayerInputs(
            positions=positions,
            inv_freq=rope_inv_freq(cfg),
            kv_valid=kv_valid,
            cache_index=cache_index,
            kv_len=kv_len,
            impl=cfg.attention_impl,
            block_size=cfg.attention_block_size,
            segment_step=segment_step,
        )
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
        x = shd.constrain(x, RESIDUAL)
        weights = self.layers.weights(cfg) if layers is None else layers
        x, cache = run_layers(cfg, weights, x, inputs, cache, segment)
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), cache

    def prefill(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_mask: jax.Array,
        cache: Cache,
        chunk_size: int | None = None,
        *,
        layers: LayerWeights | None = None,
    ) -> tuple[jax.Array, Cache]:
        """Writes a prompt ``[B, P]`` into cache slots ``0 .. P-1`` chunk by chunk (each chunk
        of ``chunk_size`` tokens attends to the cache prefix written so far, so no ``[P, P]``
        score tensor exists); returns the hidden states ``[B, P, D]`` and the cache."""
        p = tokens.shape[1]
        chunk = p if not chunk_size else min(chunk_size, p)
        hidden = []
        for start in range(0, p, chunk):
            stop = min(start + chunk, p)
            h, cache = self.forward_hidden(
                tokens[:, start:stop],
                positions[:, start:stop],
                kv_mask,
                cache,
                start,
                layers=layers,
            )
            hidden.append(h)
        return (hidden[0] if len(hidden) == 1 else jnp.concatenate(hidden, axis=1)), cache

    def lm_head_kernel(self) -> jax.Array:
        """Output projection ``[D, V]`` (the transposed embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def project(self, hidden: jax.Array) -> jax.Array:
        """Logits ``[..., V]`` in float32 from hidden states ``[..., D]``."""
        w = self.lm_head_kernel().astype(self.cfg.dtype)
        return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)

    def project_rows(self, hidden: jax.Array) -> jax.Array:
        """Logits ``[R, V]`` (float32) for a few rows of hidden states ``[R, D]`` (decoding).

        Same values as ``project``. With tied embeddings the output matrix is the vocab-major
        embedding ``[V, D]``; computing ``(E @ hidden^T)^T`` streams it row by row as the left
        operand, faster on CPU for a few rows than ``hidden @ E^T``. The barrier
        keeps XLA from folding the small transpose back into the slower orientation. An
        untied ``[D, V]`` head is already in its fast orientation.
        """
        if not self.cfg.tie_word_embeddings:
            return self.project(hidden)
        emb = self.embed[...].astype(self.cfg.dtype)
        logits_t = jnp.einsum("vd,rd->vr", emb, hidden, preferred_element_type=jnp.float32)
        return jax.lax.optimization_barrier(logits_t).T

    def init_cache(self, batch: int, max_len: int, dtype=None, *, stacked: bool = True) -> Cache:
        """Zeroed KV cache (see ``meljax.models.kv_cache.init_cache``)."""
        return init_cache(self.cfg, batch, max_len, dtype, stacked=stacked)


def default_positions(kv_mask: jax.Array) -> jax.Array:
    """RoPE positions ``[B, T]``: the number of real tokens before each slot (0 on padding)."""
    m = kv_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


__all__ = [
    "Cache",
    "Transformer",
    "cache_bytes",
    "default_positions",
    "init_cache",
    "prefer_split_layers",
    "resolve_remat",
    "run_layers",
]
