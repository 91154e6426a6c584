"""The GRPO / RFT objectives with the MEL likelihood term (pure, jittable functions).

Conventions (see ``meljax.rl.batch``): ``tokens[b, t]`` is predicted by the logits at ``t - 1``;
per-token arrays (``logp``, ``loss_mask``, ``old_logprobs`` ...) are aligned with ``tokens`` and
are ``[B, T]``; column 0 never carries loss; batch-padding rows have ``weight == 0``.

Exact micro-batching. Every loss here is written as

    loss = sum_{b, t} token_weight[b, t] * per_token_loss[b, t]

where ``token_weight`` depends only on row ``b`` itself and on *global* denominators (number of
real rows, of loss tokens, of kept meta-experiences) computed once over the whole batch by
``compute_denominators``. Splitting the batch into micro-batches and summing the per-micro-batch
losses (and gradients) therefore gives exactly the full-batch loss, not a mean of means. The
metrics are built the same way (sums already divided by global denominators), so they add up too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from meljax.config.schema import option, validate_fields
from meljax.rl.batch import PolicyBatch, SequenceBatch, TrainBatch
from meljax.runtime import sharding as shd

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

ALGORITHMS = ("grpo", "rft")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k3")
# log pi - log pi_old is clamped to this range before exp: beyond it the token is clipped for
# A > 0 anyway, and for A < 0 an unbounded ratio would only overflow to inf.
MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------------------------
# Advantages. All take rewards ``[num_questions, G]`` (G answers per question) -> same shape.
# --------------------------------------------------------------------------------------------


def _all_equal(r: jax.Array, axis=-1) -> jax.Array:
    """True where every reward along ``axis`` equals the first (exact comparison, keepdims)."""
    first = jnp.take(r, jnp.array([0]), axis=axis) if axis is not None else r.reshape(-1)[:1]
    return jnp.all(r == first, axis=axis, keepdims=axis is not None)


# Added to the std of normalised advantages (config ``algorithm.adv_eps``); one value for the
# estimators' defaults and the config's, so an unset key changes nothing.
ADV_EPS = 1e-6


def grpo_advantages(rewards: jax.Array, eps: float = ADV_EPS) -> jax.Array:
    """GRPO: ``(r - mean_group(r)) / (std_group(r) + eps)``, float32 ``[Q, G]``.

    ``std`` is the population std (ddof=0), as in the MEL spec's ``std(r) + eps``. A group whose
    rewards are all equal gets exactly 0 (not ``~0 / eps``: a float mean of equal values need not
    equal them bit for bit).
    """
    r = jnp.asarray(rewards, jnp.float32)
    mean = jnp.mean(r, axis=-1, keepdims=True)
    std = jnp.std(r, axis=-1, keepdims=True)
    return jnp.where(_all_equal(r), 0.0, (r - mean) / (std + eps))


def drgrpo_advantages(rewards: jax.Array) -> jax.Array:
    """Dr.GRPO: ``r - mean_group(r)`` (no std normalisation), float32 ``[Q, G]``; exactly 0 for
    all-equal groups."""
    r = jnp.asarray(rewards, jnp.float32)
    return jnp.where(_all_equal(r), 0.0, r - jnp.mean(r, axis=-1, keepdims=True))


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """RLOO: ``r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))``, float32 ``[Q, G]``.

    With ``G == 1`` there is no baseline sample and the advantage is 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    g = r.shape[-1]
    if g < 2:
        return jnp.zeros_like(r)
    centred = r - jnp.mean(r, axis=-1, keepdims=True)
    return jnp.where(_all_equal(r), 0.0, centred * (g / (g - 1)))


def reinforce_pp_advantages(
    rewards: jax.Array, eps: float = ADV_EPS, group_baseline: bool = False
) -> jax.Array:
    """REINFORCE++: rewards normalised over the whole batch, float32 ``[Q, G]``.

    ``A = (x - mean_batch(x)) / (std_batch(x) + eps)`` with ``x = r`` (default; the MEL paper's
    "normalized over the whole batch instead of per group"), or ``x = r - mean_group(r)`` when
    ``group_baseline`` (the "REINFORCE++-baseline" variant). Population std (ddof=0). A batch
    whose ``x`` are all equal gets exactly 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    x = r - jnp.mean(r, axis=-1, keepdims=True) if group_baseline else r
    adv = (x - jnp.mean(x)) / (jnp.std(x) + eps)
    return jnp.where(_all_equal(x, axis=None), 0.0, adv)


def raw_advantages(rewards: jax.Array) -> jax.Array:
    """The rewards themselves as advantages (no baseline), float32 ``[Q, G]``."""
    return jnp.asarray(rewards, jnp.float32)


ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "raw": raw_advantages,
    "none": raw_advantages,
}


def compute_advantages(name: str, rewards: jax.Array, **kw) -> jax.Array:
    """Advantages ``[Q, G]`` from rewards ``[Q, G]`` by estimator name (see ``ADVANTAGES``).

    Keyword arguments go to the estimator (e.g. ``eps``); unknown ones raise ``TypeError``.
    """
    try:
        fn = ADVANTAGES[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGES)}"
        ) from None
    r = jnp.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [num_questions, G], got shape {r.shape}")
    return fn(r, **kw)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Everything the objective needs (config section ``algorithm``; see ``meljax.config.schema``)."""

    name: str = option(
        "grpo",
        "grpo (clipped policy gradient; REINFORCE++ is advantage=reinforce_pp) | rft (NLL on "
        "answers with reward above rft_threshold)",
        choices=ALGORITHMS,
    )
    advantage: str = option("grpo", "advantage estimator", choices=tuple(ADVANTAGES))
    adv_eps: float = option(
        ADV_EPS, "epsilon added to the std of normalised advantages (grpo, reinforce_pp)", minimum=0
    )
    eps_low: float = option(0.2, "lower clip range of the ratio (1 - eps_low)", minimum=0)
    eps_high: float = option(0.2, "upper clip range of the ratio (1 + eps_high)", minimum=0)
    aggregation: str = option(
        "seq_mean_token_mean",
        "seq_mean_token_mean (per-answer token mean, then mean; the paper's) | token_mean | "
        "seq_mean_token_sum_norm (Dr.GRPO: per-answer token sum / max_len); also for RFT",
        choices=AGGREGATIONS,
    )
    max_len: int = option(
        1024,
        "length constant of seq_mean_token_sum_norm",
        minimum=1,
        derived="rollout.max_new_tokens",
    )
    kl_beta: float = option(
        0.0, "weight of the KL to a frozen reference (0 = none kept)", minimum=0
    )
    kl_estimator: str = option(
        "k3",
        "k1 (log pi - log pi_ref) | k3 (exp(d) - d - 1, d = log pi_ref - log pi)",
        choices=KL_ESTIMATORS,
    )
    use_mel: bool = option(True, "the MEL NLL term is in the loss", derived="mel.enabled")
    lambda_mel: float = option(
        1.0, "weight of the meta-experience NLL term", minimum=0, derived="mel.lambda_mel"
    )
    rft_threshold: float = option(0.5, "rft: answers with reward above this are trained on")
    logprob_chunk: int = option(
        256,
        "sequence chunk for log-probs (bounds [B, chunk, vocab])",
        minimum=1,
    )

    def __post_init__(self):
        validate_fields(self)
        if self.eps_low >= 1:
            raise ValueError(f"LossConfig.eps_low={self.eps_low} must be below 1")


# The estimators that divide by a std and so take ``eps``.
_NORMALISED = ("grpo", "reinforce_pp")


def advantages_with_eps(name: str, rewards: jax.Array, eps: float = ADV_EPS) -> jax.Array:
    """``compute_advantages(name, rewards)`` with ``eps`` where the estimator normalises by a
    std (ignored by the others, so every estimator takes the config's value); ``[Q, G]``."""
    kw = {"eps": eps} if name in _NORMALISED else {}
    return compute_advantages(name, rewards, **kw)


def advantages_from_config(cfg: LossConfig, rewards: jax.Array) -> jax.Array:
    """:func:`advantages_with_eps` with ``cfg.advantage`` and ``cfg.adv_eps``."""
    return advantages_with_eps(cfg.advantage, rewards, cfg.adv_eps)


# --------------------------------------------------------------------------------------------
# Chunked per-token log-probabilities
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Aggregation with global denominators
# --------------------------------------------------------------------------------------------


@struct.dataclass
class Denominators:
    """Whole-batch counts (float32 scalars) that make micro-batched losses exact.

    Attributes:
      policy: denominator of the policy (or RFT) loss under the configured aggregation.
      policy_rows: real policy rows (sum of ``weight``).
      policy_tokens: policy loss tokens of real rows.
      mel_rows: kept meta-experiences (MEL rows with ``weight > 0``).
      mel_tokens: meta-experience loss tokens.
    """

    policy: jax.Array
    policy_rows: jax.Array
    policy_tokens: jax.Array
    mel_rows: jax.Array
    mel_tokens: jax.Array


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def aggregation_denominator(
    loss_mask: jax.Array, row_weight: jax.Array, aggregation: str
) -> jax.Array:
    """Global denominator (float32 scalar) of ``aggregation`` for rows weighted by ``row_weight``
    ``[B]`` (0 drops a row) with loss tokens ``loss_mask`` ``[B, T]``."""
    w = _f32(row_weight)
    if aggregation == "token_mean":
        return jnp.sum(w * jnp.sum(_f32(loss_mask), axis=-1))
    if aggregation in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        return jnp.sum(w)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def _safe(den: jax.Array) -> jax.Array:
    """The denominator, or 1 where it is 0 (then every numerator is 0 too: the term is 0)."""
    return jnp.where(den > 0, den, 1.0)


def token_weights(
    loss_mask: jax.Array,
    row_weight: jax.Array,
    aggregation: str,
    denominator: jax.Array,
    max_len: int = 1024,
) -> jax.Array:
    """Per-token weights ``[B, T]`` such that ``sum(weights * per_token_loss)`` is the aggregated
    loss of the whole batch (given its global ``denominator``).

    ``seq_mean_token_mean``: ``w_b / |y_b| / N_rows``; ``token_mean``: ``w_b / N_tokens``;
    ``seq_mean_token_sum_norm``: ``w_b / max_len / N_rows``. Rows without loss tokens get 0.
    """
    m = _f32(loss_mask)
    w = _f32(row_weight)
    if aggregation == "seq_mean_token_mean":
        count = jnp.sum(m, axis=-1)
        row = jnp.where(count > 0, w / jnp.maximum(count, 1.0), 0.0)
    elif aggregation == "token_mean":
        row = w
    elif aggregation == "seq_mean_token_sum_norm":
        row = w / float(max_len)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    return m * (row / _safe(_f32(denominator)))[:, None]


def rft_row_weight(policy: PolicyBatch, threshold: float) -> jax.Array:
    """RFT row selection ``[B]``: ``weight`` on rows with reward > threshold, else 0."""
    return _f32(policy.seq.weight) * (_f32(policy.rewards) > threshold)


def compute_denominators(batch: TrainBatch, cfg: LossConfig) -> Denominators:
    """The global denominators of ``batch`` (call on the whole batch, before micro-batching)."""
    seq = batch.policy.seq
    w = _f32(seq.weight)
    sel = rft_row_weight(batch.policy, cfg.rft_threshold) if cfg.name == "rft" else w
    mel_w = (_f32(batch.mel.weight) > 0).astype(jnp.float32)
    return Denominators(
        policy=aggregation_denominator(seq.loss_mask, sel, cfg.aggregation),
        policy_rows=jnp.sum(w),
        policy_tokens=jnp.sum(w * jnp.sum(_f32(seq.loss_mask), axis=-1)),
        mel_rows=jnp.sum(mel_w),
        mel_tokens=jnp.sum(mel_w * jnp.sum(_f32(batch.mel.loss_mask), axis=-1)),
    )


# --------------------------------------------------------------------------------------------
# Per-token terms
# --------------------------------------------------------------------------------------------


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    eps_low: float,
    eps_high: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO clipped surrogate, per token.

    Args:
      logp, old_logp: float ``[B, T]`` log pi_theta and log pi_old of the tokens.
      advantages: float ``[B]`` (one per answer) or ``[B, T]``.
      loss_mask: ``[B, T]``; off-mask positions give 0 (their log-probs may be anything).

    Returns:
      ``(loss [B, T], clipped [B, T], log_ratio [B, T])``: ``loss = -min(rho A, clip(rho) A)``
      with ``rho = exp(logp - old_logp)``; ``clipped`` is 1 where the clipped branch is active
      (no gradient flows through that token); ``log_ratio`` is the masked ``logp - old_logp``.
    """
    mask = _f32(loss_mask) > 0
    adv = _f32(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = jnp.where(mask, _f32(logp) - _f32(old_logp), 0.0)
    rho = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = rho * adv
    clipped_obj = jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = jnp.where(mask, -jnp.minimum(unclipped, clipped_obj), 0.0)
    is_clipped = ((adv > 0) & (rho > 1.0 + eps_high)) | ((adv < 0) & (rho < 1.0 - eps_low))
    return loss, (is_clipped & mask).astype(jnp.float32), log_ratio


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate ``[B, T]`` of KL(pi_theta || pi_ref) from samples of pi_theta.

    ``k1 = logp - ref_logp``; ``k3 = exp(d) - d - 1`` with ``d = ref_logp - logp`` (unbiased,
    always >= 0). ``d`` is clamped to +-MAX_LOG_RATIO so ``exp`` cannot overflow.
    """
    if estimator == "k1":
        return _f32(logp) - _f32(ref_logp)
    if estimator == "k3":
        d = jnp.clip(_f32(ref_logp) - _f32(logp), -MAX_LOG_RATIO, MAX_LOG_RATIO)
        return jnp.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(_f32(mask) > 0, x, 0.0)


def _weighted_sum(weights: jax.Array, x: jax.Array) -> jax.Array:
    """``sum(weights * x)`` where zero-weight entries contribute exactly 0 even if ``x`` is
    inf / NaN there (e.g. log-probs of padding rows)."""
    return jnp.sum(jnp.where(weights != 0, weights * x, 0.0))


# --------------------------------------------------------------------------------------------
# Objectives. Each returns (loss contribution, metrics) where both are sums over this (micro-)
# batch already divided by global denominators: summing them over micro-batches is exact.
# --------------------------------------------------------------------------------------------


def _token_mean_metric(x: jax.Array, seq: SequenceBatch, den: jax.Array) -> jax.Array:
    w = _f32(seq.weight)[:, None] * _f32(seq.loss_mask)
    return _weighted_sum(w, x) / _safe(den)


def grpo_loss(
    logp: jax.Array,
    entropy: jax.Array,
    policy: PolicyBatch,
    cfg: LossConfig,
    den: Denominators,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss (+ ``kl_beta`` * KL to the reference).

    Args:
      logp, entropy: float32 ``[B, T]`` from ``sequence_logprobs`` under the current parameters.
      policy: the rollouts (``advantages [B]``, ``old_logprobs``/``ref_logprobs [B, T]``).
      den: global denominators of the whole batch.

    Returns:
      ``(loss, metrics)``; metrics: ``policy_loss``, ``kl_ref`` (unweighted KL term, 0 without
      KL), ``clip_frac``, ``approx_kl`` (k3 to pi_old, token mean), ``entropy`` (token mean),
      ``adv_mean`` and ``reward_mean`` (over real rows).
    """
    seq = policy.seq
    per_tok, clipped, log_ratio = clipped_surrogate(
        logp, policy.old_logprobs, policy.advantages, seq.loss_mask, cfg.eps_low, cfg.eps_high
    )
    weights = token_weights(seq.loss_mask, seq.weight, cfg.aggregation, den.policy, cfg.max_len)
    pg = _weighted_sum(weights, per_tok)
    loss = pg
    kl_ref = jnp.zeros((), jnp.float32)
    if cfg.kl_beta > 0:
        kl_tok = _masked(kl_penalty(logp, policy.ref_logprobs, cfg.kl_estimator), seq.loss_mask)
        kl_ref = _weighted_sum(weights, kl_tok)
        loss = loss + cfg.kl_beta * kl_ref
    # k3 estimate of KL(pi_old || pi_theta) from the samples (drawn from pi_old): with
    # r = pi_theta / pi_old, (r - 1) - log r >= 0.
    approx_kl = jnp.expm1(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)) - log_ratio
    w_rows = _f32(seq.weight)
    metrics = {
        "policy_loss": pg,
        "kl_ref": kl_ref,
        "clip_frac": _token_mean_metric(clipped, seq, den.policy_tokens),
        "approx_kl": _token_mean_metric(jax.lax.stop_gradient(approx_kl), seq, den.policy_tokens),
        "entropy": _token_mean_metric(jax.lax.stop_gradient(entropy), seq, den.policy_tokens),
        "adv_mean": jnp.sum(w_rows * _f32(policy.advantages)) / _safe(den.policy_rows),
        "reward_mean": jnp.sum(w_rows * _f32(policy.rewards)) / _safe(den.policy_rows),
    }
    return loss, metrics


def rft_loss(
    logp: jax.Array,
    entropy: jax.Array,
    policy: PolicyBatch,
    cfg: LossConfig,
    den: Denominators,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rejection-sampling fine-tuning: NLL of answers with reward > ``cfg.rft_threshold``,
    aggregated by ``cfg.aggregation`` over the selected rows only (0 when none is selected).

    Returns ``(loss, metrics)``; metrics: ``policy_loss`` (the NLL), ``rft_frac`` (selected
    fraction of real rows), ``entropy``, ``reward_mean``.
    """
    seq = policy.seq
    sel = rft_row_weight(policy, cfg.rft_threshold)
    weights = token_weights(seq.loss_mask, sel, cfg.aggregation, den.policy, cfg.max_len)
    nll = _weighted_sum(weights, -_f32(logp))
    w_rows = _f32(seq.weight)
    metrics = {
        "policy_loss": nll,
        "rft_frac": jnp.sum(sel) / _safe(den.policy_rows),
        "entropy": _token_mean_metric(jax.lax.stop_gradient(entropy), seq, den.policy_tokens),
        "reward_mean": jnp.sum(w_rows * _f32(policy.rewards)) / _safe(den.policy_rows),
    }
    return nll, metrics


def policy_objective(
    logp: jax.Array,
    entropy: jax.Array,
    policy: PolicyBatch,
    cfg: LossConfig,
    den: Denominators,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``grpo_loss`` or ``rft_loss`` by ``cfg.name``."""
    fn = rft_loss if cfg.name == "rft" else grpo_loss
    return fn(logp, entropy, policy, cfg, den)


def mel_loss(
    logp: jax.Array, mel: SequenceBatch, cfg: LossConfig, den: Denominators
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MEL term ``lambda_mel * L_NLL``.

    ``L_NLL = -(1 / N_kept) sum_{kept b} (1 / |M_b|) sum_t loss_mask[b, t] logp[b, t]``, where
    kept rows are those with ``weight > 0`` and ``N_kept = den.mel_rows`` counts them over the
    whole batch. With no kept row every weight is 0 and the term (and its gradient) is exactly 0.

    Args:
      logp: float32 ``[B, T]`` log-probs of ``mel.tokens`` (context tokens have loss_mask 0).

    Returns:
      ``(lambda_mel * L_NLL, metrics)``; metrics: ``mel_nll`` (``L_NLL``), ``mel_rows``
      (kept count, summed), ``mel_tokens``.
    """
    kept = (_f32(mel.weight) > 0).astype(jnp.float32)
    weights = token_weights(mel.loss_mask, kept, "seq_mean_token_mean", den.mel_rows)
    nll = _weighted_sum(weights, -_f32(logp))
    loss = cfg.lambda_mel * nll
    metrics = {
        "mel_nll": nll,
        "mel_rows": jnp.sum(kept),
        "mel_tokens": jnp.sum(kept * jnp.sum(_f32(mel.loss_mask), axis=-1)),
    }
    return loss, metrics
