"""Mixed groups and contrastive (incorrect, correct) pair selection (docs/mel.md, step 4).

A *group* is the G answers sampled for one question. It is *mixed* when it holds at least one
correct and one incorrect answer; only mixed groups yield pairs. Pairs are drawn at random
without reuse: every answer appears in at most one pair, so a group with ``c`` correct and
``w`` incorrect answers gives ``min(c, w, max_pairs_per_query)`` pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from meljax.rewards.verify import is_correct, is_mixed

__all__ = [
    "ContrastivePair",
    "group_rewards",
    "mixed_groups",
    "pair_rng",
    "select_pairs",
]


@dataclasses.dataclass(frozen=True)
class ContrastivePair:
    """One incorrect and one correct answer to the same question.

    Attributes:
      question: index of the question in the step's batch (``0 <= question < N``).
      incorrect, correct: indices of the two answers *within* the group (``0 <= . < G``).
    """

    question: int
    incorrect: int
    correct: int

    def rows(self, group_size: int) -> tuple[int, int]:
        """Flat rollout rows ``(incorrect, correct)``; row ``i*G + g`` is answer g of question i."""
        base = self.question * group_size
        return base + self.incorrect, base + self.correct


def group_rewards(rewards: Sequence[float] | np.ndarray, group_size: int) -> np.ndarray:
    """Reshapes flat per-answer rewards ``[N*G]`` (or ``[N, G]``) to float ``[N, G]``."""
    r = np.asarray(rewards, np.float64)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if r.ndim == 2:
        if r.shape[1] != group_size:
            raise ValueError(f"rewards have shape {r.shape} but group_size={group_size}")
        return r
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(
            f"rewards of shape {r.shape} cannot be split into groups of {group_size} answers"
        )
    return r.reshape(-1, group_size)


def mixed_groups(rewards: np.ndarray) -> list[int]:
    """Indices of the questions whose group holds both a correct and an incorrect answer.

    Args:
      rewards: float ``[N, G]``; correct means :func:`meljax.rewards.is_correct`.
    """
    return [int(i) for i in np.nonzero(is_mixed(rewards))[0]]


def pair_rng(seed: int, step: int) -> np.random.Generator:
    """The generator pairs are drawn from: a pure function of ``(seed, step)``, so every host
    (and a resumed run) draws the same pairs for the same step."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    return np.random.default_rng([seed, step])


def select_pairs(
    rewards: np.ndarray,
    *,
    max_pairs_per_query: int = 2,
    rng: np.random.Generator,
) -> list[ContrastivePair]:
    """Draws contrastive pairs from every mixed group.

    For each mixed group (in question order) the correct and the incorrect answers are each
    shuffled, then zipped; the first ``max_pairs_per_query`` zipped pairs are kept. No answer is
    used twice.

    Args:
      rewards: float ``[N, G]`` per-answer rewards.
      max_pairs_per_query: at most this many pairs per question (``>= 1``).
      rng: source of randomness (see :func:`pair_rng`).

    Returns:
      The pairs, grouped by question in increasing question order.
    """
    if max_pairs_per_query < 1:
        raise ValueError(f"max_pairs_per_query must be >= 1, got {max_pairs_per_query}")
    rewards = np.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, G], got shape {rewards.shape}")
    pairs: list[ContrastivePair] = []
    for q in mixed_groups(rewards):
        right = np.asarray(is_correct(rewards[q]))
        correct = rng.permutation(np.nonzero(right)[0])
        incorrect = rng.permutation(np.nonzero(~right)[0])
        n = min(len(correct), len(incorrect), max_pairs_per_query)
        pairs.extend(
            ContrastivePair(question=q, incorrect=int(incorrect[k]), correct=int(correct[k]))
            for k in range(n)
        )
    return pairs
