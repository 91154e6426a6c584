"""Shared-prompt GRPO batches: each prompt's forward runs once per group of ``G`` answers.

In the flat :class:`~meljax.rl.batch.PolicyBatch` every answer row repeats its prompt, so the
update (and the old / reference log-prob passes) run each prompt's forward and backward ``G``
times. A :class:`GroupedPolicyBatch` stores each prompt once (``[P, Lp]``) next to its ``G``
answers (every answer leaf ``[P, G, ...]``). :func:`shared_logprobs` runs, layer by layer,
the prompts (causal, ``[P, Lp]``) and then the answers ``[P * G, La]``, whose keys and values
are the layer's prompt keys and values repeated ``G`` times (``jnp.repeat`` along the rows:
autodiff sums their gradient over the ``G`` answers) followed by the answers' own. Answer
tokens sit at RoPE positions ``prompt_length + j``, the prompt's padding slots are masked, so
every log-prob equals the flat computation's up to float rounding. The first answer token is
predicted by the prompt's hidden state at its last real token.

Every leaf leads with the group axis ``P``: micro-batches, mini-batches and the data axes of
the mesh split whole groups (``P`` must be divisible by them, as rows are in the flat batch).
The loss reads the answers as a flat ``PolicyBatch`` of ``[P * G, La]`` rows
(:meth:`GroupedPolicyBatch.flat_answers`), so the objective is the flat one.

:func:`group_policy_batch` builds the grouped batch from a flat one on the host, or returns
``None`` when its rows are not whole groups of ``G`` answers to one prompt (the caller then
keeps the flat batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx, struct

from meljax.models import kv_cache
from meljax.models.layers import RESIDUAL, LayerInputs, decoder_layer, rms_norm, rope_inv_freq
from meljax.models.transformer import resolve_remat
from meljax.rl.batch import PolicyBatch, SequenceBatch
from meljax.rl.logprobs import chunked_logprobs
from meljax.runtime import sharding as shd
from meljax.runtime.buckets import DEFAULT_BATCH_BUCKETS, DEFAULT_LENGTH_BUCKETS, bucket

__all__ = [
    "GroupedPolicyBatch",
    "group_policy_batch",
    "maybe_group",
    "shared_hidden",
    "shared_logprobs",
    "ungroup_per_token",
    "with_ref_logprobs",
]


@struct.dataclass
class GroupedPolicyBatch:
    """A rollout batch with each prompt stored once.

    Attributes:
      prompt_tokens: int32 ``[P, Lp]`` prompts, right-padded; batch-padding groups are empty.
      prompt_lengths: int32 ``[P]`` real prompt tokens (0 for batch-padding groups).
      answers: a :class:`PolicyBatch` whose leaves are ``[P, G, ...]``: ``seq`` holds the
        answers only (``tokens``, ``kv_mask``, ``loss_mask`` ``[P, G, La]``; ``positions``
        ``prompt_length + j``), per-token arrays aligned with the answer tokens.
    """

    prompt_tokens: np.ndarray
    prompt_lengths: np.ndarray
    answers: PolicyBatch

    @property
    def group_size(self) -> int:
        return int(np.shape(self.answers.advantages)[1])

    def flat_answers(self) -> PolicyBatch:
        """The answers as a flat ``PolicyBatch`` of ``[P * G, ...]`` rows (what the loss reads)."""
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), self.answers)

    def with_answers(self, **fields) -> GroupedPolicyBatch:
        """A copy with answer fields replaced (e.g. ``old_logprobs=[P, G, La]``)."""
        return self.replace(answers=self.answers.replace(**fields))


def _prompt_lengths(seq: SequenceBatch) -> np.ndarray:
    """Per flat row: real tokens before the first loss token (all real tokens without one)."""
    loss = np.asarray(seq.loss_mask) > 0
    first = np.where(loss.any(1), loss.argmax(1), np.asarray(seq.kv_mask).sum(1))
    return first.astype(np.int64)


def group_policy_batch(
    batch: PolicyBatch,
    group_size: int,
    *,
    batch_multiple: int = 1,
    pad_id: int = 0,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
) -> GroupedPolicyBatch | None:
    """The grouped form of a flat rollout batch, or ``None`` when it has none.

    The flat batch must hold its real rows first, group ``i`` in rows ``i*G .. i*G + G - 1``
    (``group_index``), every row of a group with the same prompt (the tokens before its first
    loss token) and its loss tokens contiguous after it; otherwise (uneven or reordered
    groups) the result is ``None``. ``Lp`` is the bucketed longest prompt, ``La`` the rest of
    the flat row width (at least the longest answer); ``P`` the bucketed group count, a
    multiple of ``batch_multiple`` (data-parallel size times micro-batches), padded with
    empty groups of weight 0.
    """
    g = int(group_size)
    seq = batch.seq
    tokens, kv, loss = (np.asarray(x) for x in (seq.tokens, seq.kv_mask, seq.loss_mask))
    gi = np.asarray(batch.group_index)
    n = int((gi >= 0).sum())
    if g < 1 or n == 0 or n % g or not np.all(gi[:n] >= 0):
        return None
    groups = n // g
    if not np.array_equal(gi[:n], np.repeat(np.arange(groups), g)):
        return None
    plen = _prompt_lengths(seq)[:n]
    ends = kv.sum(1)[:n]
    alen = ends - plen
    if np.any(plen < 1) or not np.all(loss[:n].sum(1) == alen):
        return None
    for i in range(groups):
        rows = range(i * g, (i + 1) * g)
        first = tokens[i * g, : plen[i * g]]
        if any(
            plen[r] != plen[i * g] or not np.array_equal(tokens[r, : plen[r]], first) for r in rows
        ):
            return None
    t = tokens.shape[1]
    lp = bucket(int(plen.max()), length_buckets)
    la = max(t - lp, int(alen.max()), 1)
    p = bucket(groups, batch_buckets, multiple=batch_multiple)
    prompt_tokens = np.full((p, lp), pad_id, np.int32)
    prompt_lengths = np.zeros((p,), np.int32)
    a_tok = np.full((p, g, la), pad_id, np.int32)
    a_kv = np.zeros((p, g, la), bool)
    a_loss = np.zeros((p, g, la), np.float32)
    a_old = np.zeros((p, g, la), np.float32)
    a_ref = np.zeros((p, g, la), np.float32)
    a_pos = np.zeros((p, g, la), np.int32)
    weight, adv, rew = (np.zeros((p, g), np.float32) for _ in range(3))
    group_index = np.full((p, g), -1, np.int32)
    old, ref = np.asarray(batch.old_logprobs), np.asarray(batch.ref_logprobs)
    for r in range(n):
        i, j = divmod(r, g)
        s = int(plen[r])
        w = min(la, t - s)
        if j == 0:
            prompt_tokens[i, :s] = tokens[r, :s]
            prompt_lengths[i] = s
        a_tok[i, j, :w] = tokens[r, s : s + w]
        a_kv[i, j, :w] = kv[r, s : s + w]
        a_loss[i, j, :w] = loss[r, s : s + w]
        a_old[i, j, :w] = old[r, s : s + w]
        a_ref[i, j, :w] = ref[r, s : s + w]
        a_pos[i, j] = s + np.arange(la)
        weight[i, j] = np.asarray(seq.weight)[r]
        adv[i, j] = np.asarray(batch.advantages)[r]
        rew[i, j] = np.asarray(batch.rewards)[r]
        group_index[i, j] = gi[r]
    answers = PolicyBatch(
        seq=SequenceBatch(a_tok, a_kv, a_pos, a_loss, weight),
        advantages=adv,
        old_logprobs=a_old,
        ref_logprobs=a_ref,
        rewards=rew,
        group_index=group_index,
    )
    return GroupedPolicyBatch(prompt_tokens, prompt_lengths, answers)


def ungroup_per_token(
    grouped: GroupedPolicyBatch, values: Any, shape: tuple[int, int]
) -> np.ndarray:
    """Per-answer-token ``values`` ``[P, G, La]`` placed at the flat batch's columns (float32
    ``shape`` ``[B, T]``): row ``i*G + j``, columns from the prompt's length on. Zeros
    elsewhere (batch-padding groups are dropped)."""
    values = np.asarray(values, np.float32)
    out = np.zeros(shape, np.float32)
    p, g, la = values.shape
    lengths = np.asarray(grouped.prompt_lengths)
    for i in range(p):
        s = int(lengths[i])
        if s == 0:
            continue
        w = min(la, shape[1] - s)
        out[i * g : (i + 1) * g, s : s + w] = values[i, :, :w]
    return out


# --------------------------------------------------------------------------------------------
# The shared forward (jittable)
# --------------------------------------------------------------------------------------------


def _repeat_cache(cache: dict[str, jax.Array], g: int, la: int) -> dict[str, jax.Array]:
    """One layer's prompt cache ``[P, ..., Lp]`` -> ``[P * G, ..., Lp + La]``: each prompt's
    keys and values for its ``G`` answers, then ``La`` empty slots for the answers' own."""
    out = {}
    for name, x in cache.items():
        x = jnp.repeat(x, g, axis=0)
        pad = [(0, 0)] * x.ndim
        pad[kv_cache.slot_axis(name)] = (0, la)
        out[name] = shd.constrain(jnp.pad(x, pad), kv_cache.sharding_axes(name))
    return out


def shared_hidden(
    model: nnx.Module,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    answer_tokens: jax.Array,
    answer_positions: jax.Array,
    answer_mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Final hidden states of the prompts ``[P, Lp, D]`` and of the answers ``[P * G, La, D]``
    (answer rows ``i*G .. i*G + G - 1`` follow prompt ``i``; ``answer_mask`` marks real answer
    tokens, ``answer_positions`` their RoPE positions)."""
    cfg = model.cfg
    p, lp = prompt_tokens.shape
    b, la = answer_tokens.shape
    g = b // p
    slots = jnp.arange(lp, dtype=jnp.int32)
    prompt_mask = slots[None, :] < prompt_lengths[:, None]
    answer_kv = jnp.concatenate(
        [jnp.repeat(prompt_mask, g, axis=0), answer_mask.astype(bool)], axis=1
    )
    inv = rope_inv_freq(cfg)
    shared = {"inv_freq": inv, "impl": cfg.attention_impl, "block_size": cfg.attention_block_size}
    in_p = LayerInputs(
        positions=jnp.broadcast_to(slots, (p, lp)),
        kv_valid=prompt_mask,
        cache_index=0,
        kv_len=lp,
        **shared,
    )
    in_a = LayerInputs(
        positions=answer_positions.astype(jnp.int32),
        kv_valid=answer_kv,
        cache_index=lp,
        kv_len=lp + la,
        **shared,
    )
    embed = model.embed[...]

    def embed_rows(tokens):
        return shd.constrain(jnp.take(embed, tokens, axis=0).astype(cfg.dtype), RESIDUAL)

    def layer(carry, w):
        xp, xa = carry
        empty = kv_cache.init_cache(cfg, p, lp, stacked=False)[0]
        xp, cache = decoder_layer(cfg, w, xp, in_p, empty)
        xa, _ = decoder_layer(cfg, w, xa, in_a, _repeat_cache(cache, g, la))
        return xp, xa

    policy = resolve_remat(cfg.remat_policy)
    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)
    weights = model.layers.weights(cfg)
    carry = (embed_rows(prompt_tokens), embed_rows(answer_tokens))
    if cfg.scan_layers:
        carry, _ = jax.lax.scan(lambda c, w: (layer(c, w), None), carry, weights)
    else:
        for i in range(cfg.num_layers):
            carry = layer(carry, {k: v[i] for k, v in weights.items()})
    xp, xa = carry
    norm = model.final_norm[...]
    return rms_norm(xp, norm, cfg.rms_norm_eps), rms_norm(xa, norm, cfg.rms_norm_eps)


def shared_logprobs(
    model: nnx.Module | tuple[Any, Any],
    grouped: GroupedPolicyBatch,
    *,
    chunk_size: int = 128,
    with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities (and entropies) of the answer tokens, float32 ``[P * G, La]``:
    ``logp[r, j] = log p(answer[r, j] | prompt, answer[r, <j])``, the flat batch's values at
    the answer's columns. Values off ``loss_mask`` are meaningless."""
    if isinstance(model, tuple):
        model = nnx.merge(*model)
    ans = grouped.flat_answers().seq
    tokens = jnp.asarray(ans.tokens)
    lengths = jnp.asarray(grouped.prompt_lengths, jnp.int32)
    h_p, h_a = shared_hidden(
        model,
        jnp.asarray(grouped.prompt_tokens),
        lengths,
        tokens,
        jnp.asarray(ans.positions),
        jnp.asarray(ans.kv_mask),
    )
    g = tokens.shape[0] // h_p.shape[0]
    last = jnp.take_along_axis(h_p, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    last = shd.constrain(jnp.repeat(last, g, axis=0), RESIDUAL)
    hidden = jnp.concatenate([last, h_a[:, :-1]], axis=1)  # position j predicts answer[j]
    return chunked_logprobs(
        hidden, model.lm_head_kernel(), tokens, chunk_size=chunk_size, with_entropy=with_entropy
    )


# --------------------------------------------------------------------------------------------
# What a run's update calls (meljax.trainer.run)
# --------------------------------------------------------------------------------------------


def maybe_group(
    batch: PolicyBatch, enabled: bool, group_size: int, *, batch_multiple: int = 1
) -> tuple[PolicyBatch | GroupedPolicyBatch, bool]:
    """``(batch for the update, shared)``: the grouped batch when ``enabled`` and the rows are
    whole groups, else the flat batch (a warning is logged when ``enabled``; the caller
    reports ``shared``).

    Groups are split whole over ``batch_multiple`` (data-parallel devices x micro-batches),
    so their count is padded to a multiple of it; where that pads more answer rows than the
    flat batch has (e.g. 128 groups over 32 devices x 8 micro-batches), the flat batch is
    cheaper and is kept, without building the grouped one.
    """
    if not enabled:
        return batch, False
    flat_rows = int(np.shape(batch.group_index)[0])
    groups = int((np.asarray(batch.group_index) >= 0).sum()) // max(group_size, 1)
    padded = bucket(groups, DEFAULT_BATCH_BUCKETS, multiple=batch_multiple)
    if padded * group_size > flat_rows:
        logging.log_first_n(
            logging.INFO,
            "algorithm.share_prompt: %d groups padded to %d (a multiple of %d data-parallel "
            "devices x micro-batches) would hold %d answer rows against %d flat rows; the "
            "update runs on the flat batch",
            1,
            groups,
            padded,
            batch_multiple,
            padded * group_size,
            flat_rows,
        )
        return batch, False
    grouped = group_policy_batch(batch, group_size, batch_multiple=batch_multiple)
    if grouped is None:
        logging.warning(
            "algorithm.share_prompt: the rollout batch is not whole groups of %d answers to "
            "one prompt; this update runs on the flat batch",
            group_size,
        )
        return batch, False
    return grouped, True


def with_ref_logprobs(policy, compute_logprobs, ref_params):
    """``policy`` (flat or grouped) with ``ref_logprobs`` computed under ``ref_params``."""
    if isinstance(policy, GroupedPolicyBatch):
        return policy.with_answers(ref_logprobs=compute_logprobs(ref_params, policy))
    return policy.replace(ref_logprobs=compute_logprobs(ref_params, policy.seq))
