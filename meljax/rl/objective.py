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

Advantage estimators live in :mod:`meljax.rl.advantages`, the chunked log-probabilities in
:mod:`meljax.rl.logprobs`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from meljax.config.schema import option, validate_fields
from meljax.rl.advantages import ADV_EPS, ADVANTAGES, advantages_with_eps
from meljax.rl.batch import PolicyBatch, SequenceBatch, TrainBatch

# meljax.rl.rollout reads ADV_EPS and advantages_with_eps from this module (``losses.*``).

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

ALGORITHMS = ("grpo", "rft")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k3")
# log pi - log pi_old is clamped to this range before exp: beyond it the token is clipped for
# A > 0 anyway, and for A < 0 an unbounded ratio would only overflow to inf.
MAX_LOG_RATIO = 20.0


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


def advantages_from_config(cfg: LossConfig, rewards: jax.Array) -> jax.Array:
    """:func:`advantages_with_eps` with ``cfg.advantage`` and ``cfg.adv_eps``."""
    return advantages_with_eps(cfg.advantage, rewards, cfg.adv_eps)


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
