"""The convenience API: ``math_reward`` / ``score_batch`` on a shared :class:`Verifier`."""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Sequence
from typing import Any

from meljax.rewards.pool import Verifier
from meljax.rewards.verify import RewardConfig, RewardResult

_shared: Verifier | None = None
_shared_lock = threading.Lock()


def _get_shared(num_workers: int) -> Verifier:
    """A lazily created module-level verifier, rebuilt when ``num_workers`` changes."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.num_workers != num_workers:
            if _shared is not None:
                _shared.close()
            _shared = Verifier(RewardConfig(num_workers=num_workers), share_hosts=False)
        return _shared


@atexit.register
def close_shared_verifier() -> None:
    """Stops the verifier used by ``math_reward``/``score_batch`` (also run at exit)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


DEFAULT_NUM_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))


def score_batch(
    completions: Sequence[str],
    answers: Sequence[Any],
    *,
    mode: str = "boxed",
    timeout_s: float = 5.0,
    num_workers: int = DEFAULT_NUM_WORKERS,
    config: RewardConfig | None = None,
) -> list[RewardResult]:
    """Scores a batch with a shared :class:`Verifier` (this process only, no host sharing).

    Args:
      completions: [batch] model outputs.
      answers: [batch] ground truths.
      mode: answer extraction mode (ignored when ``config`` is given).
      timeout_s: per-item limit in seconds (ignored when ``config`` is given).
      num_workers: worker processes of the shared verifier; 0 scores in this process (the
        time limit then only applies in the main thread).
      config: full configuration, overriding ``mode`` and ``timeout_s``.

    Returns:
      [batch] ``RewardResult``s in input order.
    """
    if config is None:
        config = RewardConfig(mode=mode, timeout_s=timeout_s)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return _get_shared(num_workers).score(completions, answers, config=config)


def math_reward(
    completions: Sequence[str],
    answers: Sequence[Any],
    *,
    mode: str = "boxed",
    timeout_s: float = 5.0,
    num_workers: int = DEFAULT_NUM_WORKERS,
    config: RewardConfig | None = None,
) -> list[float]:
    """Binary rewards, 1.0 for a correct final answer and 0.0 otherwise; see ``score_batch``.

    Works from a plain script, a notebook or the CLI: the worker processes are fresh
    interpreters that never re-import the caller's ``__main__``.
    """
    results = score_batch(
        completions,
        answers,
        mode=mode,
        timeout_s=timeout_s,
        num_workers=num_workers,
        config=config,
    )
    return [r.score for r in results]
