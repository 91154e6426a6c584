"""Token batches consumed by the update step, and the host-side builders that make them.

Alignment convention (used by every loss): ``tokens[b, t]`` is predicted by the logits at
position ``t - 1``. Per-token arrays (``loss_mask``, ``old_logprobs`` ...) are aligned with
``tokens``: ``loss_mask[b, t] = 1`` means "the log-probability of ``tokens[b, t]`` carries loss".
Column 0 never carries loss. Padding rows (to reach a bucketed batch size) have all-zero masks
and ``weight == 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import struct

from meljax.runtime.buckets import DEFAULT_BATCH_BUCKETS, DEFAULT_LENGTH_BUCKETS, bucket


@struct.dataclass
class SequenceBatch:
    """Context + target sequences, left-aligned (right padding).

    Attributes:
      tokens: int32 ``[B, T]`` context tokens followed by target tokens, then padding.
      kv_mask: bool ``[B, T]`` real (non-padding) tokens.
      positions: int32 ``[B, T]`` RoPE positions (0, 1, 2, ... over real tokens).
      loss_mask: float32 ``[B, T]`` 1 on target tokens that carry loss.
      weight: float32 ``[B]`` 1 for real rows, 0 for batch-padding rows.
    """

    tokens: np.ndarray
    kv_mask: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    weight: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


@struct.dataclass
class PolicyBatch:
    """A rollout batch for the policy-gradient loss.

    Attributes:
      seq: the sequences (prompt as context, completion as target).
      advantages: float32 ``[B]`` one advantage per completion.
      old_logprobs: float32 ``[B, T]`` log pi_old of ``tokens[b, t]`` (0 off the loss mask).
      ref_logprobs: float32 ``[B, T]`` log pi_ref (only used with a KL term; zeros otherwise).
      rewards: float32 ``[B]`` scalar rewards (for RFT, which trains on correct answers only).
      group_index: int32 ``[B]`` which question a row belongs to (-1 for padding rows).
    """

    seq: SequenceBatch
    advantages: np.ndarray
    old_logprobs: np.ndarray
    ref_logprobs: np.ndarray
    rewards: np.ndarray
    group_index: np.ndarray


@struct.dataclass
class TrainBatch:
    """What one update consumes: rollouts plus the meta-experience NLL batch (maybe all-padding)."""

    policy: PolicyBatch
    mel: SequenceBatch


def build_sequence_batch(
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
    min_rows: int = 1,
    batch_multiple: int = 1,
    max_len: int | None = None,
) -> SequenceBatch:
    """Packs ``context + target`` rows, padded to bucketed ``[B, T]``.

    Args:
      contexts, targets: token id lists per row (same count). Targets carry the loss.
      min_rows: pad the batch to at least this many rows (so an empty batch keeps its shape).
      batch_multiple: B is a multiple of this (e.g. the data-parallel size).
      max_len: when given, T is exactly this (rows longer than it raise ``ValueError``).
    """
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    n = len(contexts)
    longest = max([len(c) + len(t) for c, t in zip(contexts, targets, strict=True)] or [1])
    if max_len is not None:
        if longest > max_len:
            raise ValueError(f"a row of {longest} tokens exceeds max_len={max_len}")
        t_len = max_len
    else:
        t_len = bucket(longest, length_buckets)
    b = bucket(max(n, min_rows), batch_buckets, multiple=batch_multiple)
    tokens = np.full((b, t_len), pad_id, np.int32)
    kv_mask = np.zeros((b, t_len), bool)
    loss_mask = np.zeros((b, t_len), np.float32)
    for i, (c, t) in enumerate(zip(contexts, targets, strict=True)):
        row = list(c) + list(t)
        tokens[i, : len(row)] = row
        kv_mask[i, : len(row)] = True
        loss_mask[i, len(c) : len(row)] = 1.0
    loss_mask[:, 0] = 0.0  # nothing predicts the first token
    positions = np.maximum(np.cumsum(kv_mask, axis=1) - 1, 0).astype(np.int32)
    weight = np.zeros((b,), np.float32)
    weight[:n] = 1.0
    return SequenceBatch(tokens, kv_mask, positions, loss_mask, weight)


def scatter_per_token(
    seq: SequenceBatch, values: Sequence[Sequence[float]] | np.ndarray, lengths: Sequence[int]
) -> np.ndarray:
    """Places per-target-token values (e.g. sampler log-probs ``[N, L]``) at the target slots of
    ``seq`` (where ``loss_mask`` is 1), returning float32 ``[B, T]``."""
    out = np.zeros(seq.tokens.shape, np.float32)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        cols = np.nonzero(seq.loss_mask[i])[0]
        if len(cols) != n:
            raise ValueError(f"row {i}: {len(cols)} target slots but {n} values")
        out[i, cols] = np.asarray(values[i][:n], np.float32)
    return out


def build_policy_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    advantages: Sequence[float],
    rewards: Sequence[float],
    group_index: Sequence[int],
    old_logprobs: Sequence[Sequence[float]] | None = None,
    pad_id: int = 0,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
    batch_multiple: int = 1,
    max_len: int | None = None,
) -> PolicyBatch:
    """Builds the rollout batch from per-row prompt and completion token lists.

    ``old_logprobs[i]`` holds one value per completion token (as returned by the sampler); when
    ``None`` they are zeros and the update step must recompute them.
    """
    seq = build_sequence_batch(
        prompts,
        completions,
        pad_id=pad_id,
        length_buckets=length_buckets,
        batch_buckets=batch_buckets,
        batch_multiple=batch_multiple,
        max_len=max_len,
    )
    b = seq.tokens.shape[0]
    n = len(prompts)

    def pad_rows(x, fill, dtype):
        out = np.full((b,), fill, dtype)
        out[:n] = np.asarray(x, dtype)
        return out

    lengths = [len(c) for c in completions]
    old = (
        scatter_per_token(seq, old_logprobs, lengths)
        if old_logprobs is not None
        else np.zeros(seq.tokens.shape, np.float32)
    )
    return PolicyBatch(
        seq=seq,
        advantages=pad_rows(advantages, 0.0, np.float32),
        old_logprobs=old,
        ref_logprobs=np.zeros(seq.tokens.shape, np.float32),
        rewards=pad_rows(rewards, 0.0, np.float32),
        group_index=pad_rows(group_index, -1, np.int32),
    )
