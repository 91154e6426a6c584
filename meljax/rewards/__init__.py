"""Verifiable math rewards: answer extraction + math-verify comparison in spawned workers.

Public API:
  math_reward(completions, answers, *, mode="boxed", timeout_s=5.0, num_workers=...)
      -> list[float]
  score_batch(completions, answers, *, mode=..., timeout_s=..., num_workers=..., config=None)
      -> list[RewardResult]
  VerifierPool(num_workers, *, config=..., score_fn=...)   # .score(...), .close(), context manager
  extract_answer(text, mode) -> str | None;  last_boxed(text) -> str | None
  RewardConfig, RewardResult, REASONS, MODES
"""

from meljax.rewards.extract import MODES, extract_answer, last_boxed, last_boxed_span, last_number
from meljax.rewards.pool import (
    VerifierPool,
    close_shared_pool,
    math_reward,
    run_guarded,
    score_batch,
    score_in_process,
)
from meljax.rewards.verify import REASONS, RewardConfig, RewardResult, score_one

__all__ = [
    "MODES",
    "REASONS",
    "RewardConfig",
    "RewardResult",
    "VerifierPool",
    "close_shared_pool",
    "extract_answer",
    "last_boxed",
    "last_boxed_span",
    "last_number",
    "math_reward",
    "run_guarded",
    "score_batch",
    "score_in_process",
    "score_one",
]
