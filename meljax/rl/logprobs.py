"""Per-token log-probabilities of sequences under the model, chunk by chunk (jittable).

:func:`sequence_logprobs` gives ``log p(tokens[b, t] | tokens[b, <t])`` aligned with the tokens
(column 0 is 0; see ``meljax.rl.batch``), with the entropy of each predictive distribution.
The output projection runs over sequence chunks (:func:`chunk_layout`) inside
:func:`chunked_logprobs`, whose custom VJP recomputes each chunk's logits in the backward
pass, so no pass holds the ``[B, T, V]`` logits, only one ``[B, C, V]`` chunk.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from meljax.rl.batch import SequenceBatch
from meljax.runtime import sharding as shd

__all__ = ["chunk_layout", "chunked_logprobs", "sequence_logprobs"]


def _chunk_forward(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, with_entropy: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[B, C, D] @ [D, V]`` -> log-prob of ``targets``, entropy and log-sum-exp, each
    ``[B, C]`` (float32)."""
    hidden = shd.constrain(hidden, ("batch", None, None))
    logits = jnp.einsum("bcd,dv->bcv", hidden, kernel, preferred_element_type=jnp.float32)
    logits = shd.constrain(logits, ("batch", None, "vocab"))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if not with_entropy:
        lse = jax.nn.logsumexp(logits, axis=-1)
        return picked - lse, jnp.zeros_like(picked), lse
    # one exp over [B, C, V] serves the log-sum-exp and the entropy (the vocabulary-wide
    # elementwise passes cost about as much as a small matmul on CPU)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnorm = jnp.exp(logits - top)
    total = jnp.sum(unnorm, axis=-1)
    lse = jnp.log(total) + top[..., 0]
    mean_logit = jnp.sum(unnorm * logits, axis=-1) / total  # E_p[logits]
    return picked - lse, lse - mean_logit, lse


def _batch_groups(rows: int) -> int:
    """Row groups of the kernel-gradient accumulator: one per data-parallel shard of the mesh
    in context (1 without a mesh, or when the rows do not split evenly)."""
    mesh = shd.context_mesh()
    groups = 1 if mesh is None else shd.data_parallel_size(mesh)
    return groups if rows % groups == 0 else 1


def _scan_chunks(fn, carry, xs, chunk: int):
    """``lax.scan`` of ``fn`` over ``[B, n * chunk, ...]`` arrays cut into ``n`` chunks."""

    def split(x):
        b, t = x.shape[:2]
        return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)

    def merge(y):
        n, b, c = y.shape[:3]
        return jnp.moveaxis(y, 0, 1).reshape(b, n * c, *y.shape[3:])

    carry, ys = jax.lax.scan(fn, carry, jax.tree.map(split, xs))
    return carry, jax.tree.map(merge, ys)


def chunk_layout(length: int, chunk_size: int) -> tuple[int, int]:
    """``(chunk, chunks)`` for ``length`` positions in chunks of at most ``chunk_size``: the
    fewest chunks, as even as possible, so that little is padded (192 positions with a limit of
    128 run as 2 x 96, not 2 x 128 with 64 positions of padding: 25% of the output projection's
    work). A padded chunk is rounded up to a multiple of 8 positions (tile-friendly) when that
    stays within the limit."""
    limit = max(1, min(int(chunk_size), length))
    chunks = -(-length // limit)
    chunk = -(-length // chunks)
    if chunk * chunks != length and chunk % 8:
        chunk = min(-(-chunk // 8) * 8, limit)
    return chunk, -(-length // chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(hidden, kernel, targets, chunk: int, with_entropy: bool):
    return _chunked_fwd(hidden, kernel, targets, chunk, with_entropy)[0]


def _chunked_fwd(hidden, kernel, targets, chunk, with_entropy):
    # cast on each shard, then one all-gather (over the data axes) in the compute dtype
    w = shd.constrain(kernel.astype(hidden.dtype), (None, "vocab"))

    def body(_, xs):
        return None, _chunk_forward(xs[0], w, xs[1], with_entropy)

    _, (logp, ent, lse) = _scan_chunks(body, None, (hidden, targets), chunk)
    dtype_witness = jnp.zeros((), kernel.dtype)
    return (logp, ent), (hidden, w, targets, lse, dtype_witness)


def _chunked_bwd(chunk, with_entropy, res, cotangents):
    """Recomputes each chunk's logits; the kernel gradient is summed in float32 per row group
    (one group per data shard: no communication inside the loop) and reduced once at the end.
    The entropy is a metric: its cotangent is ignored."""
    hidden, kernel, targets, lse, dtype_witness = res
    g_logp = cotangents[0]
    b, _, d = hidden.shape
    v = kernel.shape[1]
    groups = _batch_groups(b)

    def body(acc, xs):
        h, y, lse_c, g = xs
        h = shd.constrain(h, ("batch", None, None))
        logits = jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)
        logits = shd.constrain(logits, ("batch", None, "vocab"))
        probs = jnp.exp(logits - lse_c[..., None])
        d_logits = g[..., None] * (jax.nn.one_hot(y, v, dtype=jnp.float32) - probs)
        d_logits = shd.constrain(d_logits.astype(kernel.dtype), ("batch", None, "vocab"))
        d_h = jnp.einsum("bcv,dv->bcd", d_logits, kernel, preferred_element_type=jnp.float32)
        hg = h.reshape(groups, b // groups, *h.shape[1:])
        dg = d_logits.reshape(groups, b // groups, *d_logits.shape[1:])
        acc = acc + jnp.einsum("sbcd,sbcv->sdv", hg, dg, preferred_element_type=jnp.float32)
        return shd.constrain(acc, ("batch", None, "vocab")), d_h.astype(h.dtype)

    acc = shd.constrain(jnp.zeros((groups, d, v), jnp.float32), ("batch", None, "vocab"))
    acc, d_hidden = _scan_chunks(body, acc, (hidden, targets, lse, g_logp), chunk)
    # one reduce-scatter to the parameter layout (not an all-reduce), in float32: the
    # cotangent then flows straight into the float32 gradient accumulator
    d_kernel = shd.sum_row_groups(acc, ("embed", "vocab")).astype(dtype_witness.dtype)
    return d_hidden, d_kernel, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_logprobs(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 128,
    with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """``log softmax(hidden @ kernel)[targets]`` without materialising ``[B, T, V]``.

    Args:
      hidden: ``[B, T, D]`` final hidden states (compute dtype).
      kernel: ``[D, V]`` output projection in its parameter dtype and layout; it is cast to
        ``hidden.dtype`` for the matmuls (logits accumulate in f32), its gradient comes back in
        its own dtype.
      targets: int ``[B, T]``: the token whose log-prob is wanted at each position.
      chunk_size: most positions per chunk; the sequence is cut into the fewest chunks of at
        most this size, as even as possible (padded by less than 8 positions per chunk).
      with_entropy: also return the entropy of the full distribution (no gradient).

    Returns:
      ``(logp, entropy)``, both float32 ``[B, T]``.

    A custom VJP recomputes each chunk's logits in the backward pass (only the per-position
    log-sum-exp is kept), so neither pass holds more than one ``[B, C, V]`` chunk. The kernel
    gradient is accumulated in float32. With a mesh in context (``sharding.use_mesh``) the
    chunks are row-sharded over the data axes with the vocabulary over ``tensor``, the kernel
    is all-gathered once (in its compute dtype) before the loop, each device sums its own rows'
    kernel gradient inside the loop and the sum is reduce-scattered once after it.
    """
    b, t, d = hidden.shape
    c, n = chunk_layout(t, chunk_size)
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    logp, ent = _chunked(hidden, kernel, targets, c, with_entropy)
    return logp[:, :t], jax.lax.stop_gradient(ent[:, :t])


def sequence_logprobs(
    model: nnx.Module | tuple[Any, Any],
    seq: SequenceBatch,
    *,
    chunk_size: int = 128,
    with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of ``seq.tokens`` under the model, aligned with the tokens.

    Args:
      model: a ``Transformer`` or a ``(graphdef, params)`` pair (merged here, e.g. inside jit).
      seq: the batch; ``tokens``, ``positions``, ``kv_mask`` ``[B, T]`` are used.
      chunk_size: sequence positions per chunk of the output projection.

    Returns:
      ``(logp, entropy)``, float32 ``[B, T]``: ``logp[b, t] = log p(tokens[b, t] | tokens[b, <t])``
      and ``entropy[b, t]`` the entropy of that predictive distribution; column 0 is 0 in both.
      Values at padding positions are meaningless (mask them with ``loss_mask``).
    """
    if isinstance(model, tuple):
        model = nnx.merge(*model)
    tokens = jnp.asarray(seq.tokens)
    hidden, _ = model.forward_hidden(tokens, jnp.asarray(seq.positions), jnp.asarray(seq.kv_mask))
    kernel = model.lm_head_kernel()  # parameter dtype and layout: cast and gathered inside
    # position t predicts tokens[t + 1]; the last position's target is a dummy (dropped below).
    next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    logp, ent = chunked_logprobs(
        hidden, kernel, next_tokens, chunk_size=chunk_size, with_entropy=with_entropy
    )
    zero = jnp.zeros_like(logp[:, :1])
    return (
        jnp.concatenate([zero, logp[:, :-1]], axis=1),
        jnp.concatenate([zero, ent[:, :-1]], axis=1),
    )
