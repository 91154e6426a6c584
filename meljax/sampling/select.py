"""Token selection shared by every decoder: sampling controls, filters, draws, log-probs.

Log-probabilities. ``token_logprobs`` is ``log_softmax`` of the model's RAW logits at the chosen
token, i.e. BEFORE temperature, top-k and top-p are applied: the quantity a training forward
pass recomputes (``model(tokens)`` then ``log_softmax``), so the RL importance ratio compares
like with like. It is not the log-probability under the filtered, tempered distribution the
token was actually drawn from.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from meljax.models.config import ModelConfig

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling controls of a request (or of one reference ``Sampler.sample`` call).

    Attributes:
      max_new_tokens: completion length limit per row (>= 1).
      temperature: softmax temperature; ``0`` means greedy (argmax of the raw logits).
      top_p: nucleus mass in ``(0, 1]``; ``1`` disables it.
      top_k: keep the ``k`` most likely tokens; ``0`` disables it.
      num_samples: completions per prompt (the GRPO group size ``G``).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.num_samples < 1:
            raise ValueError(f"SamplingParams.num_samples must be >= 1, got {self.num_samples}")


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the float32 values ``x`` (``-inf`` lowest)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key ``tau`` with ``sum(weights[keys >= tau]) >= target`` ``[R]``.

    An exact bisection over the 32-bit key space (32 masked reductions over ``[R, V]``): much
    cheaper on CPU than sorting the vocabulary, and ties are treated alike (all kept or not).
    ``weights`` must be non-negative; when even the full sum misses ``target`` the result is 0
    (every key qualifies).
    """

    def body(_, bounds):
        lo, hi = bounds  # invariant: lo qualifies, the answer lies in [lo, hi]
        gap = hi - lo
        mid = lo + gap // 2 + gap % 2  # upper middle, no uint32 overflow
        mass = jnp.sum(jnp.where(keys >= mid[:, None], weights, 0), axis=-1)
        ok = mass >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    rows = keys.shape[0]
    lo = jnp.zeros((rows,), jnp.uint32)
    hi = jnp.full((rows,), 0xFFFFFFFF, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Sets every token outside the top-k set and the nucleus (top-p) to ``-inf``.

    Args:
      logits: float32 ``[R, V]`` (already divided by the temperature).
      top_p: in ``(0, 1]``, a scalar or one per row ``[R]``; a token is kept iff the
        probability mass of the tokens more likely than it is ``< top_p`` (so the most likely
        token is always kept); ``>= 1`` keeps all.
      top_k: int, a scalar or ``[R]``; keeps the tokens whose logit is ``>=`` the k-th
        largest; ``0`` keeps all.

    The nucleus is computed on the distribution left after top-k (Hugging Face order). Tokens
    tied with the last kept one are kept too. Each active filter costs one bisection
    (``_largest_threshold``), run only when that filter is on.
    """
    keys = _order_keys(logits)
    rows, v = logits.shape
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (rows,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (rows,))
    no_cut = jnp.zeros((rows,), jnp.uint32)

    def kth_largest(keys):
        ones = jnp.ones(keys.shape, jnp.float32)
        cut = _largest_threshold(keys, ones, jnp.minimum(top_k, v).astype(jnp.float32))
        return jnp.where(top_k > 0, cut, no_cut)

    k_cut = jax.lax.cond(jnp.any(top_k > 0), kth_largest, lambda _: no_cut, keys)
    logits = jnp.where(keys >= k_cut[:, None], logits, _NEG_INF)

    def nucleus(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.where(top_p < 1.0, _largest_threshold(keys, probs, top_p), no_cut)

    p_cut = jax.lax.cond(jnp.any(top_p < 1.0), nucleus, lambda _: no_cut, logits)
    return jnp.where(keys >= p_cut[:, None], logits, _NEG_INF)


def argmax_last(x: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first index among ties) as int32 ``[...]``.

    A max followed by a masked min over the indices: two vectorised reductions, several times
    faster on CPU than XLA's variadic (value, index) reduction behind ``jnp.argmax``.
    """
    v = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.where(x == top, jnp.arange(v, dtype=jnp.int32), v)
    return jnp.minimum(jnp.min(idx, axis=-1), v - 1)


def _last_positive(x: jax.Array) -> jax.Array:
    """Index of the last strictly positive entry along the last axis ``[...]`` (0 if none)."""
    v = x.shape[-1]
    return jnp.max(jnp.where(x > 0, jnp.arange(v, dtype=jnp.int32), 0), axis=-1)


def categorical(key: jax.Array, logits: jax.Array, block: int = 128) -> jax.Array:
    """One draw per row from ``softmax(logits)`` ``[R, V]`` (``-inf`` = excluded), int32 ``[R]``
    (one uniform per row from ``key``; see :func:`categorical_from_uniform`)."""
    u = jax.random.uniform(key, (logits.shape[0],), jnp.float32)
    return categorical_from_uniform(u, logits, block)


def categorical_from_uniform(u: jax.Array, logits: jax.Array, block: int = 128) -> jax.Array:
    """The draw of :func:`categorical` for given uniforms ``u`` ``[R]`` in ``[0, 1)``.

    Inverse-CDF sampling with one uniform per row and a two-level cumulative sum (over blocks of
    ``block`` tokens, then inside the chosen block). ``jax.random.categorical`` draws ``V``
    Gumbel variates per row instead, which dominates a CPU decode step for a 50k vocabulary.
    A token of zero probability is never returned (indices are clamped to positive mass, which
    only matters when float rounding puts the draw on the very edge of the total).
    """
    rows, v = logits.shape
    nb = -(-v // block)
    logits = jnp.pad(logits, ((0, 0), (0, nb * block - v)), constant_values=_NEG_INF)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).reshape(rows, nb, block)
    block_mass = probs.sum(axis=-1)  # [R, nb]
    block_cum = jnp.cumsum(block_mass, axis=-1)
    target = u * block_cum[:, -1]
    bi = jnp.sum(block_cum <= target[:, None], axis=-1).astype(jnp.int32)
    bi = jnp.minimum(bi, _last_positive(block_mass))
    before = jnp.where(bi > 0, jnp.take_along_axis(block_cum, (bi - 1)[:, None], axis=-1)[:, 0], 0)
    chosen = jnp.take_along_axis(probs, bi[:, None, None], axis=1)[:, 0]  # [R, block]
    inner = jnp.sum(jnp.cumsum(chosen, axis=-1) <= (target - before)[:, None], axis=-1)
    inner = jnp.minimum(inner.astype(jnp.int32), _last_positive(chosen))
    return bi * block + inner


def select_tokens(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
) -> jax.Array:
    """Next tokens ``[R]`` (int32) from raw logits ``[R, V]``.

    ``temperature == 0`` takes the argmax; otherwise draws from ``softmax(filter(logits / T))``.
    Both branches sit behind ``lax.cond`` so greedy decoding never pays for the random draw,
    and the filters of ``filter_logits`` only run when top-p or top-k is active.
    """

    def greedy(_):
        return argmax_last(logits)

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        active = (top_p < 1.0) | (top_k > 0)
        scaled = jax.lax.cond(active, lambda x: filter_logits(x, top_p, top_k), lambda x: x, scaled)
        return categorical(key, scaled)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def select_tokens_rows(
    logits: jax.Array,
    uniforms: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
) -> jax.Array:
    """Next tokens ``[R]`` from raw logits ``[R, V]`` with per-row controls (all ``[R]``).

    Row ``r`` takes the argmax when ``temperature[r] == 0``, else the inverse-CDF draw of
    ``uniforms[r]`` from ``softmax(filter(logits / T))``: a row's token depends on its own
    logits, uniform and controls only, whatever else shares the batch. The draw and the
    filters run only when some row needs them (``lax.cond`` on the batch), so an all-greedy
    pool never pays for them; likewise the argmax (two passes over ``[R, V]``) runs only when
    some row is greedy.
    """
    sampled_rows = temperature > 0

    def greedy(_):
        return argmax_last(logits)

    def sample(_):
        t = jnp.where(sampled_rows, temperature, 1.0)[:, None]
        scaled = logits / jnp.maximum(t, 1e-6)
        active = jnp.any(sampled_rows & ((top_p < 1.0) | (top_k > 0)))
        scaled = jax.lax.cond(active, lambda x: filter_logits(x, top_p, top_k), lambda x: x, scaled)
        drawn = categorical_from_uniform(uniforms, scaled)
        mixed = jnp.any(~sampled_rows)
        return jnp.where(sampled_rows, drawn, jax.lax.cond(mixed, greedy, lambda _: drawn, None))

    return jax.lax.cond(jnp.any(sampled_rows), sample, greedy, None)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[r, tokens[r]]`` ``[R]`` (float32) from raw logits ``[R, V]``."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse


def config_from_graphdef(graphdef: nnx.GraphDef) -> ModelConfig:
    """The ``ModelConfig`` stored as a static attribute in a ``Transformer`` graph definition."""
    for _, attr in getattr(graphdef, "attributes", ()):
        value = getattr(attr, "value", None)
        if isinstance(value, ModelConfig):
            return value
    raise ValueError("no ModelConfig found in the graphdef; is it a meljax Transformer?")


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0 if n < 1024 else min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}" if i else f"{int(n)} B"
