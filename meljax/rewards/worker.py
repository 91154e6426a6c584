"""A verifier worker process: ``python -m meljax.rewards.worker FD``.

The parent (:class:`meljax.rewards.Verifier`) starts this module as a fresh interpreter with
one end of a socket pair inherited as file descriptor ``FD``; messages are pickled by
``multiprocessing.connection.Connection``. Unlike ``multiprocessing``'s *spawn* start method,
nothing re-imports the caller's ``__main__``: a plain script, a notebook and the CLI can all
score answers without an ``if __name__ == "__main__":`` guard.

Protocol (parent -> worker, then worker -> parent):

1. ``(sys_path, score_fn_ref, max_memory_mb)``: the parent's import path (so a ``score_fn``
   from a test module or a user package imports the same way), the scoring function as
   ``"module:qualname"`` and the address-space limit in MiB (``None``: none).
2. The worker imports, warms up (the first parse builds sympy's and the ANTLR parser's state,
   the first symbolic comparison sympy's polynomials: about 1 s) and sends ``"ready"``.
3. Then, per item: ``(task_id, completion, answer, config, hang)`` -> ``(task_id, result)``.
   ``hang`` is a test hook (``MELJAX_TEST_VERIFIER_HANG_ROWS``): the item sleeps until its
   time limit interrupts it, exercising the real timeout path.
4. ``None`` or the parent's end closing ends the worker; so does the parent's death (a
   watchdog thread notices a new parent pid), so no orphan outlives a killed trainer.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any


def _set_memory_limit(max_memory_mb: int | None) -> None:
    if max_memory_mb is None:
        return
    import resource

    limit = max_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def serve(conn: Any) -> None:
    """The worker loop (see the module docstring)."""
    from meljax.rewards.guard import READY, hang_for_test, resolve_function, run_guarded, warm_up

    # Ctrl-C in the trainer reaches the whole process group; the parent owns our lifetime.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    sys_path, ref, max_memory_mb = conn.recv()
    sys.path[:] = list(sys_path)
    score_fn = resolve_function(ref)
    _set_memory_limit(max_memory_mb)
    warm_up()
    conn.send(READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, completion, answer, config, hang = msg
        fn = hang_for_test if hang else score_fn
        conn.send((task_id, run_guarded(fn, completion, answer, config)))


def main(argv: list[str]) -> None:
    from multiprocessing.connection import Connection

    serve(Connection(int(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
