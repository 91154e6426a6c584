"""One item under a time limit, and how worker processes find their scoring function."""

from __future__ import annotations

import dataclasses
import importlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from meljax.rewards.verify import REASONS, RewardConfig, RewardResult, score_one

ScoreFn = Callable[[str, str, RewardConfig], RewardResult]

READY = "ready"  # a worker's first message


def function_ref(fn: Callable) -> str:
    """``"module:qualname"`` of a module-level function, or ``ValueError`` naming the problem."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise ValueError(
            f"score_fn {fn!r} must be a module-level function of an importable module (not "
            f"defined in __main__, a notebook cell or a closure): the verifier's worker "
            f"processes import it by name"
        )
    return f"{module}:{name}"


def resolve_function(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def batch_limit(config: RewardConfig, batch_timed_out: bool) -> RewardConfig:
    """THE per-batch time budget of answer checks: an answer gets ``config.timeout_s``; once
    an answer of its batch has timed out, answers that start later get
    ``config.timeout_after_first_s`` (when smaller). Hanging answers then cost about one
    timeout per batch instead of one each, while normal answers, which take milliseconds
    (the first symbolic one is checked at warm-up, outside any limit), score the same."""
    if not batch_timed_out or config.timeout_after_first_s >= config.timeout_s:
        return config
    return dataclasses.replace(config, timeout_s=config.timeout_after_first_s)


def warm_up() -> None:
    """Scores a number and a symbolic answer with ``score_one``, without a time limit:
    sympy's first parse and first polynomial comparison (about 1 s) then never count
    against an answer's limit."""
    config = RewardConfig(timeout_s=60.0)
    run_guarded(score_one, "\\boxed{1}", "1", config)
    run_guarded(score_one, "\\boxed{x^2+2x+1}", "(x+1)^2", config)


def hang_for_test(completion: str, answer: str, config: Any) -> Any:
    """Sleeps until the item's time limit interrupts it (the test hook's score function)."""
    time.sleep(10_000)


class _ItemTimeout(BaseException):
    """Raised by the SIGALRM handler. A BaseException so that math-verify's and sympy's
    `except Exception` blocks do not swallow it."""


def _raise_item_timeout(signum: int, frame: Any) -> None:
    raise _ItemTimeout()


def run_guarded(
    score_fn: ScoreFn, completion: str, answer: str, config: RewardConfig
) -> RewardResult:
    """Runs `score_fn` with a `config.timeout_s` wall-clock limit; never raises.

    The limit is a SIGALRM timer, which Python only allows in the main thread: called from
    another thread, the item runs without a limit. Exceptions give reason "crash"; a result
    that is not a `RewardResult` with a known reason gives "crash" too. Any timer the caller
    had armed (e.g. pytest-timeout) is re-armed afterwards with its remaining time.
    """
    use_timer = threading.current_thread() is threading.main_thread()
    old_handler = None
    old_delay = 0.0
    started = time.monotonic()
    try:
        if use_timer:
            old_handler = signal.signal(signal.SIGALRM, _raise_item_timeout)
            old_delay, _ = signal.setitimer(signal.ITIMER_REAL, config.timeout_s)
        try:
            result = score_fn(completion, answer, config)
        finally:
            if use_timer:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return RewardResult(0.0, "timeout", None)
    except Exception:
        return RewardResult(0.0, "crash", None)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            remaining = old_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3))
    if not isinstance(result, RewardResult) or result.reason not in REASONS:
        return RewardResult(0.0, "crash", None)
    return result
