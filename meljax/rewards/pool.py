"""The verifier: parallel, time-limited scoring of completions in worker processes.

:class:`Verifier` is the one way meljax scores answers (training rollouts, the MEL replay,
evaluation, :func:`math_reward`). With ``config.num_workers = 0`` it scores in the calling
process; otherwise each item goes to one of ``num_workers`` processes started as
``python -m meljax.rewards.worker`` (see that module): they never re-import the caller's
``__main__``, so a plain script or a notebook needs no ``if __name__ == "__main__":`` guard.

Each item is scored under two time limits:

1. a SIGALRM timer (in the worker, or in the calling process's main thread) interrupts Python
   code after ``timeout_s``; the item scores 0 with reason "timeout";
2. in the parent, a deadline of ``timeout_s + kill_grace_s`` per item: a worker stuck in C code
   that ignores signals is killed, the item scores 0 ("timeout") and a fresh worker takes its
   place. A worker that dies mid-item (segfault, ``os._exit``, out of memory) gives "crash"
   and is replaced the same way.

Per batch, once an answer has timed out, the answers that start after it get the shorter
``timeout_after_first_s`` (:func:`~meljax.rewards.guard.batch_limit`): a batch of hanging
answers (``10^{10^{10^{10}}}`` from a policy that learned to write them) costs about one
timeout, not one per answer. Every timed-out answer scores 0, reason "timeout", and is counted
in :attr:`Verifier.timeouts`.

Several hosts. Timeouts depend on each host's load, so hosts would disagree if each scored
the whole batch. With ``share_hosts`` (the default) host ``h`` of ``n`` scores items
``h::n`` and the results are all-gathered: every host gets the same rewards, and the work is
divided between hosts. Every host must then call :meth:`Verifier.score` with the same batch.

Test hook: ``MELJAX_TEST_VERIFIER_HANG_ROWS=1,3`` makes the items at those indices of every
batch (the ones this host scores) hang until their time limit, through the real timeout path.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from meljax.rewards.extract import clip_tail
from meljax.rewards.guard import (
    READY,
    batch_limit,
    function_ref,
    hang_for_test,
    run_guarded,
    warm_up,
)
from meljax.rewards.verify import RewardConfig, RewardResult, score_one
from meljax.runtime import multihost

ScoreFn = Callable[[str, str, RewardConfig], RewardResult]

HANG_ROWS_ENV = "MELJAX_TEST_VERIFIER_HANG_ROWS"


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


class Scorer(Protocol):
    """What every caller needs from a verifier (:class:`Verifier` is the implementation; tests
    may pass a scripted one)."""

    def score(self, completions: Sequence[str], answers: Sequence[Any]) -> list[RewardResult]:
        """``[batch]`` results in input order, the same on every host."""
        ...


def _hang_rows() -> frozenset[int]:
    value = os.environ.get(HANG_ROWS_ENV, "")
    return frozenset(int(x) for x in value.split(",") if x.strip())


@dataclasses.dataclass
class _Worker:
    process: subprocess.Popen
    conn: Any
    start_deadline: float
    ready: bool = False
    task: int | None = None  # index of the item being scored
    task_deadline: float = 0.0


def _package_root() -> str:
    """The folder that holds the ``meljax`` package (so the worker imports this copy)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Verifier:
    """Scores completions against ground truths; create once, call :meth:`score` every step.

    Example:
      with Verifier(RewardConfig(mode="boxed", num_workers=4)) as verifier:
          results = verifier.score(completions, answers)   # list[RewardResult], same order

    Args:
      config: extraction mode, limits and ``num_workers`` (0: score in this process).
      score_fn: scores one item, ``(completion, answer, config) -> RewardResult``; a
        module-level function of an importable module (workers import it by name). Tests
        inject a function that hangs or crashes here; production code keeps the default.
      kill_grace_s: seconds past ``config.timeout_s`` after which a worker that did not answer
        (stuck in C code that its timer cannot interrupt) is killed.
      start_timeout_s: seconds a new worker may take to import and warm up.
      max_memory_mb: address-space limit of each worker (RLIMIT_AS) in MiB, so that an answer
        like ``10^{10^{10^{10}}}`` cannot exhaust host memory; None for no limit.
      share_hosts: on several JAX processes, split each batch between hosts and all-gather
        the results (see the module docstring); every host must then call :meth:`score`.

    Workers start in the background at construction, so their start-up overlaps with other
    work (e.g. model compilation). ``score`` is serialised by a lock.
    """

    def __init__(
        self,
        config: RewardConfig | None = None,
        *,
        score_fn: ScoreFn = score_one,
        kill_grace_s: float = 2.0,
        start_timeout_s: float = 120.0,
        max_memory_mb: int | None = 4096,
        share_hosts: bool = True,
    ) -> None:
        self.config = config if config is not None else RewardConfig()
        self.num_workers = self.config.num_workers
        self._score_fn = score_fn
        self._score_ref = function_ref(score_fn) if self.num_workers else ""
        self._kill_grace_s = kill_grace_s
        self._start_timeout_s = start_timeout_s
        self._max_memory_mb = max_memory_mb
        self._share_hosts = share_hosts
        self._hang = _hang_rows()
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0  # workers replaced after a timeout kill or a crash
        self.timeouts = 0  # answers that scored 0 because they ran out of time
        self._timed_out = False  # an answer of the current batch timed out (batch_limit)
        self._batch = 0  # tags tasks so that a late answer cannot land in another batch
        self._workers: list[_Worker] = [self._spawn() for _ in range(self.num_workers)]
        if not self._workers:
            warm_up()  # outside any item's time limit, as the workers do before "ready"

    # -- worker management ---------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
        fd = child_conn.fileno()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [_package_root(), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "meljax.rewards.worker", str(fd)],
            pass_fds=(fd,),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        # Our copy of the child's end must go, or we would never see EOF when the child dies.
        child_conn.close()
        parent_conn.send((list(sys.path), self._score_ref, self._max_memory_mb))
        return _Worker(process, parent_conn, time.monotonic() + self._start_timeout_s)

    @staticmethod
    def _stop(worker: _Worker, *, graceful: bool) -> None:
        """Waits for (graceful, after a ``None`` was sent) or kills the worker's process."""
        if graceful:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=2.0)
        if worker.process.poll() is None:
            worker.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=5.0)
        worker.conn.close()

    def _replace(self, index: int) -> None:
        self._stop(self._workers[index], graceful=False)
        self._workers[index] = self._spawn()
        self.restarts += 1

    def _start_failed(self, worker: _Worker, what: str) -> RuntimeError:
        """Closes the whole verifier (a worker that cannot start is a set-up error, and
        retrying would fail the same way) and returns the error to raise."""
        self._stop(worker, graceful=False)
        code = worker.process.returncode
        self.close()
        return RuntimeError(
            f"verifier worker (pid {worker.process.pid}) {what} before it was ready "
            f"(exit code {code}); check that score_fn {self._score_ref!r} imports in a fresh "
            "interpreter (its error is printed above). The verifier is closed."
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
        """Scores ``completions[i]`` against ``answers[i]`` for every i.

        Args:
          completions: model outputs, [batch] strings.
          answers: ground truths, [batch] LaTeX strings (ints/floats are converted with str).
          config: overrides the verifier's limits and mode for this call.

        Returns:
          [batch] ``RewardResult``s in input order, the same on every host.
        """
        config = config if config is not None else self.config
        gold = _check_batch(completions, answers)
        if self._closed:
            raise RuntimeError("Verifier.score called after close()")
        # Clip before sending: a 1 MB completion should not cross the pipe.
        texts = [clip_tail(c, config.max_input_chars) for c in completions]
        hosts = multihost.process_count() if self._share_hosts else 1
        mine = list(range(multihost.process_index() % hosts, len(texts), hosts))
        local = self._score_items(mine, texts, gold, config)
        self.timeouts += sum(r.reason == "timeout" for r in local)
        if hosts == 1:
            return local
        gathered = multihost.allgather_objects([dataclasses.astuple(r) for r in local])
        results: list[RewardResult | None] = [None] * len(texts)
        for h, part in enumerate(gathered):
            for i, fields in zip(range(h, len(texts), hosts), part, strict=True):
                results[i] = RewardResult(*fields)
        return results  # type: ignore[return-value]

    def _score_items(
        self, items: list[int], texts: list[str], gold: list[str], config: RewardConfig
    ) -> list[RewardResult]:
        if not self._workers:
            self._timed_out, out = False, []
            for i in items:
                fn = hang_for_test if i in self._hang else self._score_fn
                out.append(run_guarded(fn, texts[i], gold[i], batch_limit(config, self._timed_out)))
                self._timed_out |= out[-1].reason == "timeout"
            return out
        with self._lock:
            self._batch += 1
            self._timed_out = False
            try:
                return self._run(items, texts, gold, config)
            except BaseException:
                # Interrupted (Ctrl-C, start-up failure): busy workers may be hung or would
                # answer for this abandoned batch, so they are replaced.
                for index, worker in enumerate(self._workers):
                    if worker.task is not None and not self._closed:
                        self._replace(index)
                raise

    def _run(
        self, items: list[int], texts: list[str], gold: list[str], config: RewardConfig
    ) -> list[RewardResult]:
        results: dict[int, RewardResult] = {}
        pending = collections.deque(items)
        while pending or any(w.task is not None for w in self._workers):
            self._dispatch(pending, texts, gold, batch_limit(config, self._timed_out))
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
        return [results.get(i, RewardResult(0.0, "crash", None)) for i in items]

    def _dispatch(
        self,
        pending: collections.deque[int],
        texts: list[str],
        gold: list[str],
        config: RewardConfig,
    ) -> None:
        limit_s = config.timeout_s + self._kill_grace_s
        for index, worker in enumerate(self._workers):
            if not pending:
                return
            if not worker.ready or worker.task is not None:
                continue
            item = pending.popleft()
            msg = ((self._batch, item), texts[item], gold[item], config, item in self._hang)
            try:
                worker.conn.send(msg)
            except (OSError, ValueError):
                # Died while idle: not this item's fault, so it goes back in the queue.
                pending.appendleft(item)
                self._replace(index)
                continue
            worker.task = item
            worker.task_deadline = time.monotonic() + limit_s

    def _receive(self, index: int, results: dict[int, RewardResult]) -> None:
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
        if msg == READY:
            worker.ready = True
            return
        (batch, item), result = msg
        if batch == self._batch and item == worker.task:
            results[item] = result
            worker.task = None
            self._timed_out |= result.reason == "timeout"

    def _enforce_deadlines(self, results: dict[int, RewardResult]) -> None:
        now = time.monotonic()
        for index, worker in enumerate(self._workers):
            if worker.task is not None and now >= worker.task_deadline:
                results[worker.task] = RewardResult(0.0, "timeout", None)
                self._timed_out = True
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

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort only; workers also exit when this process's end of their pipe closes.
        if getattr(self, "_workers", None) is not None and not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()
