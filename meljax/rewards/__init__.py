"""Verifiable math rewards: answer extraction + math-verify comparison in worker processes.

Public API:
  Verifier(config, *, score_fn=...)   # .score(completions, answers), .close(), context manager
  math_reward(completions, answers, *, mode="boxed", timeout_s=5.0, num_workers=...)
      -> list[float]
  score_batch(completions, answers, *, mode=..., timeout_s=..., num_workers=..., config=None)
      -> list[RewardResult]
  is_correct(score) -> bool: the one definition of a correct answer
  is_mixed(rewards) -> bool [N]: groups with a correct and an incorrect answer
  extract_answer(text, mode) -> str | None;  last_boxed(text) -> str | None
  RewardConfig, RewardResult, REASONS, MODES
"""

from meljax.rewards.extract import MODES, extract_answer, last_boxed, last_boxed_span, last_number
from meljax.rewards.guard import run_guarded
from meljax.rewards.pool import Scorer, Verifier
from meljax.rewards.simple import close_shared_verifier, math_reward, score_batch
from meljax.rewards.verify import (
    CORRECT_SCORE,
    REASONS,
    RewardConfig,
    RewardResult,
    is_correct,
    is_mixed,
    score_one,
)

__all__ = [
    "CORRECT_SCORE",
    "MODES",
    "REASONS",
    "RewardConfig",
    "RewardResult",
    "Scorer",
    "Verifier",
    "close_shared_verifier",
    "extract_answer",
    "is_correct",
    "is_mixed",
    "last_boxed",
    "last_boxed_span",
    "last_number",
    "math_reward",
    "run_guarded",
    "score_batch",
    "score_one",
]
