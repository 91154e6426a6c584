"""Several updates on one rollout batch: the host loop around ``train_step``.

:func:`train_on_batch` runs ``num_passes`` passes over the batch, each split into
``num_minibatches`` mini-batches of policy and MEL rows (optionally shuffled per pass), one
``train_step`` (``meljax.rl.update.make_train_step``) per mini-batch. With
``old_logprobs="recompute"`` the policy rows' old log-probabilities are recomputed under the
current parameters before the first update. A ``GroupedPolicyBatch`` (shared prompts,
``meljax.rl.shared_prompt``) is split by whole groups: its rows are groups.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from meljax.rl.batch import TrainBatch
from meljax.rl.shared_prompt import GroupedPolicyBatch
from meljax.rl.state import TrainState

__all__ = ["OLD_LOGPROBS", "train_on_batch"]

OLD_LOGPROBS = ("sampler", "recompute")


def _take_rows(tree, idx: np.ndarray):
    return jax.tree.map(lambda x: x[idx], tree)


def train_on_batch(
    state: TrainState,
    batch: TrainBatch,
    train_step: Callable,
    *,
    num_passes: int = 1,
    num_minibatches: int = 1,
    old_logprobs: str = "sampler",
    compute_logprobs: Callable | None = None,
    shuffle_seed: int | None = None,
) -> tuple[TrainState, list[dict[str, jax.Array]]]:
    """``num_passes * num_minibatches`` updates on one rollout batch (host loop).

    Args:
      state, batch: as for ``train_step``.
      num_passes: passes over the batch (PPO's mu).
      num_minibatches: each pass splits the policy rows and the MEL rows into this many
        mini-batches (row ``b`` into mini-batch ``b % num_minibatches`` after the optional
        shuffle), one update each. Both row counts must be divisible by it.
      old_logprobs: ``sampler`` keeps ``batch.policy.old_logprobs``; ``recompute`` replaces them
        with ``compute_logprobs(state, batch.policy.seq)`` before the first update, so the first
        update sees ``rho == 1``.
      shuffle_seed: when given, rows are permuted (differently) at every pass.

    Returns:
      ``(state, metrics)``, one metrics dict per update, in order.
    """
    if old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"old_logprobs={old_logprobs!r}; choose one of {OLD_LOGPROBS}")
    if old_logprobs == "recompute":
        if compute_logprobs is None:
            raise ValueError("old_logprobs='recompute' needs compute_logprobs")
        pol = batch.policy
        if isinstance(pol, GroupedPolicyBatch):
            pol = pol.with_answers(old_logprobs=compute_logprobs(state, pol))
        else:
            pol = pol.replace(old_logprobs=compute_logprobs(state, pol.seq))
        batch = batch.replace(policy=pol)
    n_pol = np.shape(jax.tree.leaves(batch.policy)[0])[0]
    n_mel = np.shape(batch.mel.tokens)[0]
    for name, rows in (("policy", n_pol), ("mel", n_mel)):
        if rows % num_minibatches:
            raise ValueError(
                f"train_on_batch: the {name} batch has {rows} rows, not divisible by "
                f"num_minibatches={num_minibatches}"
            )
    all_metrics = []
    for p in range(num_passes):
        if shuffle_seed is None:
            perm_pol, perm_mel = np.arange(n_pol), np.arange(n_mel)
        else:
            rng = np.random.default_rng([shuffle_seed, p])
            perm_pol, perm_mel = rng.permutation(n_pol), rng.permutation(n_mel)
        for k in range(num_minibatches):
            if num_minibatches == 1 and shuffle_seed is None:
                part = batch
            else:
                part = TrainBatch(
                    policy=_take_rows(batch.policy, perm_pol[k::num_minibatches]),
                    mel=_take_rows(batch.mel, perm_mel[k::num_minibatches]),
                )
            state, metrics = train_step(state, part)
            all_metrics.append(metrics)
    return state, all_metrics
