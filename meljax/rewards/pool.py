"""Parallel, time-limited scoring of a batch of completions in spawned worker processes.

Workers are started with the *spawn* method (a fork of a multi-threaded JAX process can
deadlock). Each worker scores one item at a time under two time limits:

1. inside the worker, a SIGALRM timer (`setitimer`) interrupts Python code after
   `timeout_s`; the item scores 0 with reason "timeout" and the worker keeps serving;
2. in the parent, a deadline of `timeout_s + kill_grace_s` per item: a worker stuck in C
   code that ignores signals is killed, the item scores 0 ("timeout") and a fresh worker is
   spawned in its place. A worker that dies mid-item (segfault, `os._exit`, out of memory)
   gives "crash" and is replaced the same way.

So `VerifierPool.score` returns within about `timeout_s + kill_grace_s` per item per worker
and never hangs on model output. Worker start-up problems (e.g. an import error) raise
`RuntimeError` instead of being scored, since they are not the model's fault.

Spawned children re-import the parent's `__main__` module: scripts that create a pool must
keep their top-level code under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from meljax.rewards.extract import clip_tail
from meljax.rewards.verify import REASONS, RewardConfig, RewardResult, score_one

ScoreFn = Callable[[str, str, RewardConfig], RewardResult]

_READY = "ready"


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


def _set_memory_limit(max_memory_mb: int | None) -> None:
    if max_memory_mb is None:
        return
    import resource

    limit = max_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(conn: Any, score_fn: ScoreFn, max_memory_mb: int | None) -> None:
    """Worker loop: receives (task_id, completion, answer, config), sends (task_id, result).

    Exits on `None` or when the parent's end of the pipe closes.
    """
    # Ctrl-C in the trainer reaches the whole process group; the parent owns our lifetime.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_memory_limit(max_memory_mb)
    # Warm up: the first parse imports sympy and builds the ANTLR parser (about 1 s).
    run_guarded(score_one, "\\boxed{1}", "1", RewardConfig(timeout_s=60.0))
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, completion, answer, config = msg
        conn.send((task_id, run_guarded(score_fn, completion, answer, config)))


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    start_deadline: float
    ready: bool = False
    task: int | None = None  # index of the item being scored
    task_deadline: float = 0.0


def _as_answer(answer: Any, index: int) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    raise TypeError(f"answers[{index}] must be a string, got {type(answer).__name__}: {answer!r}")


def _check_batch(completions: Sequence[str], answers: Sequence[Any]) -> list[str]:
    if len(completions) != len(answers):
        raise ValueError(
            f"completions and answers differ in length: {len(completions)} != {len(answers)}"
        )
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"completions[{i}] must be a string, got {type(c).__name__}")
    return [_as_answer(a, i) for i, a in enumerate(answers)]


def score_in_process(
    completions: Sequence[str],
    answers: Sequence[Any],
    config: RewardConfig,
    score_fn: ScoreFn = score_one,
) -> list[RewardResult]:
    """Scores a batch sequentially in this process (for tests and debugging).

    Each item gets the `config.timeout_s` limit when called from the main thread only.
    """
    gold = _check_batch(completions, answers)
    return [run_guarded(score_fn, c, a, config) for c, a in zip(completions, gold, strict=True)]


class VerifierPool:
    """A reusable pool of spawned verifier processes; create once, call `score` every step.

    Example:
      with VerifierPool(num_workers=4, config=RewardConfig(mode="boxed")) as pool:
          results = pool.score(completions, answers)   # list[RewardResult], same order

    Args:
      num_workers: worker processes (>= 1; use `score_in_process` for in-process scoring).
      config: default extraction mode and limits, overridable per `score` call.
      score_fn: scores one item, `(completion, answer, config) -> RewardResult`. Must be a
        module-level function (it is pickled by reference into the spawned workers). Tests
        inject a function that hangs or crashes here; production code keeps the default.
      kill_grace_s: seconds past `config.timeout_s` after which the parent kills a worker
        that did not answer (stuck in C code that the in-worker timer cannot interrupt).
      start_timeout_s: seconds a new worker may take to import and warm up.
      max_memory_mb: address-space limit of each worker (RLIMIT_AS) in MiB, so that an
        answer like `10^{10^{10^{10}}}` cannot exhaust host memory; None for no limit.

    Workers start in the background at construction, so their start-up overlaps with other
    work (e.g. model compilation). `score` is serialised by a lock; the pool is not meant to
    be shared across processes.
    """

    def __init__(
        self,
        num_workers: int = 2,
        *,
        config: RewardConfig | None = None,
        score_fn: ScoreFn = score_one,
        kill_grace_s: float = 2.0,
        start_timeout_s: float = 120.0,
        max_memory_mb: int | None = 4096,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"VerifierPool needs num_workers >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.config = config if config is not None else RewardConfig()
        self._score_fn = score_fn
        self._kill_grace_s = kill_grace_s
        self._start_timeout_s = start_timeout_s
        self._max_memory_mb = max_memory_mb
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0  # workers replaced after a timeout kill or a crash
        self._batch = 0  # tags tasks so that a late answer cannot land in another batch
        self._workers: list[_Worker] = [self._spawn() for _ in range(num_workers)]

    # -- worker management ---------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._score_fn, self._max_memory_mb),
            name="meljax-verifier",
            daemon=True,
        )
        process.start()
        # Our copy of the child's end must go, or we would never see EOF when the child dies.
        child_conn.close()
        return _Worker(process, parent_conn, time.monotonic() + self._start_timeout_s)

    @staticmethod
    def _stop(worker: _Worker, *, graceful: bool) -> None:
        """Waits for (graceful, after a `None` was sent) or kills the worker's process."""
        if graceful:
            worker.process.join(timeout=2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5.0)
        worker.conn.close()

    def _replace(self, index: int) -> None:
        self._stop(self._workers[index], graceful=False)
        self._workers[index] = self._spawn()
        self.restarts += 1

    def _start_failed(self, worker: _Worker, what: str) -> RuntimeError:
        """Closes the whole pool (a worker that cannot start is a set-up error, and retrying
        would fail the same way) and returns the error to raise."""
        self._stop(worker, graceful=False)
        code = worker.process.exitcode
        self.close()
        return RuntimeError(
            f"verifier worker (pid {worker.process.pid}) {what} before it was ready "
            f"(exit code {code}); check that score_fn {self._score_fn!r} is a module-level "
            "function importable in a fresh interpreter and that the parent script guards its "
            "top-level code with `if __name__ == '__main__':`. The pool is closed."
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (e.g. to read their CPU time)."""
        return [w.process.pid for w in self._workers]

    # -- scoring -------------------------------------------------------------------------

    def score(
        self,
        completions: Sequence[str],
        answers: Sequence[Any],
        *,
        config: RewardConfig | None = None,
    ) -> list[RewardResult]:
        """Scores `completions[i]` against `answers[i]` for every i, in parallel.

        Args:
          completions: model outputs, [batch] strings.
          answers: ground truths, [batch] LaTeX strings (ints/floats are converted with str).
          config: overrides the pool's config for this call.

        Returns:
          [batch] `RewardResult`s in input order.
        """
        config = config if config is not None else self.config
        gold = _check_batch(completions, answers)
        if self._closed:
            raise RuntimeError("VerifierPool.score called after close()")
        # Clip before sending: a 1 MB completion should not cross the pipe.
        texts = [clip_tail(c, config.max_input_chars) for c in completions]
        with self._lock:
            self._batch += 1
            try:
                return self._run(texts, gold, config)
            except BaseException:
                # Interrupted (Ctrl-C, start-up failure): busy workers may be hung or would
                # answer for this abandoned batch, so they are replaced.
                for index, worker in enumerate(self._workers):
                    if worker.task is not None and not self._closed:
                        self._replace(index)
                raise

    def _run(self, texts: list[str], gold: list[str], config: RewardConfig) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(texts)
        pending = collections.deque(range(len(texts)))
        limit_s = config.timeout_s + self._kill_grace_s
        while pending or any(w.task is not None for w in self._workers):
            self._dispatch(pending, texts, gold, config, limit_s)
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            now = time.monotonic()
            deadlines = [
                w.task_deadline if w.task is not None else w.start_deadline for w in waiting
            ]
            timeout = max(0.0, min(deadlines) - now) if deadlines else 0.0
            readable = multiprocessing.connection.wait([w.conn for w in waiting], timeout)
            for conn in readable:
                index = next(i for i, w in enumerate(self._workers) if w.conn is conn)
                self._receive(index, results)
            self._enforce_deadlines(results)
        return [r if r is not None else RewardResult(0.0, "crash", None) for r in results]

    def _dispatch(
        self,
        pending: collections.deque[int],
        texts: list[str],
        gold: list[str],
        config: RewardConfig,
        limit_s: float,
    ) -> None:
        for index, worker in enumerate(self._workers):
            if not pending:
                return
            if not worker.ready or worker.task is not None:
                continue
            item = pending.popleft()
            try:
                worker.conn.send(((self._batch, item), texts[item], gold[item], config))
            except (OSError, ValueError):
                # Died while idle: not this item's fault, so it goes back in the queue.
                pending.appendleft(item)
                self._replace(index)
                continue
            worker.task = item
            worker.task_deadline = time.monotonic() + limit_s

    def _receive(self, index: int, results: list[RewardResult | None]) -> None:
        worker = self._workers[index]
        try:
            msg = worker.conn.recv()
        except (EOFError, OSError):
            if not worker.ready:
                raise self._start_failed(worker, "exited") from None
            if worker.task is not None:
                results[worker.task] = RewardResult(0.0, "crash", None)
            self._replace(index)
            return
        if msg == _READY:
            worker.ready = True
            return
        (batch, item), result = msg
        if batch == self._batch and item == worker.task:
            results[item] = result
            worker.task = None

    def _enforce_deadlines(self, results: list[RewardResult | None]) -> None:
        now = time.monotonic()
        for index, worker in enumerate(self._workers):
            if worker.task is not None and now >= worker.task_deadline:
                results[worker.task] = RewardResult(0.0, "timeout", None)
                self._replace(index)
            elif not worker.ready and now >= worker.start_deadline:
                raise self._start_failed(worker, f"took over {self._start_timeout_s} s to start")

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:  # ask all first, so that they wind down in parallel
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)
        for worker in self._workers:
            self._stop(worker, graceful=True)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort only; daemon workers also die with the interpreter.
        if getattr(self, "_workers", None) is not None and not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()


# -- convenience API ---------------------------------------------------------------------

_shared_pool: VerifierPool | None = None
_shared_lock = threading.Lock()


def _get_shared_pool(num_workers: int) -> VerifierPool:
    """A lazily created module-level pool, rebuilt when `num_workers` changes."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None or _shared_pool.num_workers != num_workers:
            if _shared_pool is not None:
                _shared_pool.close()
            _shared_pool = VerifierPool(num_workers)
        return _shared_pool


@atexit.register
def close_shared_pool() -> None:
    """Stops the pool used by `math_reward`/`score_batch` (also run at interpreter exit)."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is not None:
            _shared_pool.close()
            _shared_pool = None


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
    """Scores a batch; see `VerifierPool.score`.

    Args:
      completions: [batch] model outputs.
      answers: [batch] ground truths.
      mode: answer extraction mode (ignored when `config` is given).
      timeout_s: per-item limit in seconds (ignored when `config` is given).
      num_workers: worker processes of the shared pool; 0 scores in this process (the time
        limit then only applies in the main thread).
      config: full configuration, overriding `mode` and `timeout_s`.

    Returns:
      [batch] `RewardResult`s in input order.
    """
    if config is None:
        config = RewardConfig(mode=mode, timeout_s=timeout_s)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return score_in_process(completions, answers, config)
    return _get_shared_pool(num_workers).score(completions, answers, config=config)


def math_reward(
    completions: Sequence[str],
    answers: Sequence[Any],
    *,
    mode: str = "boxed",
    timeout_s: float = 5.0,
    num_workers: int = DEFAULT_NUM_WORKERS,
    config: RewardConfig | None = None,
) -> list[float]:
    """Binary rewards, 1.0 for a correct final answer and 0.0 otherwise; see `score_batch`."""
    results = score_batch(
        completions,
        answers,
        mode=mode,
        timeout_s=timeout_s,
        num_workers=num_workers,
        config=config,
    )
    return [r.score for r in results]
