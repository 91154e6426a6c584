"""Stopping on SIGTERM (a preempted VM): at the next phase boundary, after a checkpoint."""

from __future__ import annotations

import signal
import threading

from absl import logging

from meljax.runtime import multihost


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; rerun the command to resume."""

    def __init__(self, step: int, saved: int, workdir: str):
        self.step, self.saved, self.workdir = step, saved, workdir
        where = f"the checkpoint of step {saved} is in {workdir}" if saved else "no step finished"
        super().__init__(
            f"stopped by SIGTERM during step {step}; {where}; rerun the same command to resume"
        )


class StopSignal:
    """SIGTERM asks the run to stop at its next phase boundary (a second one kills at once).

    :meth:`requested` is a collective on several hosts: all hosts stop at the same boundary, so
    they save the same step (orbax saves are collective too).
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True
        logging.warning("SIGTERM: stopping at the next phase boundary, then saving")
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def requested(self) -> bool:
        return multihost.any_process(self._flag)

    def close(self) -> None:
        if self._previous is not None and not self._flag:
            signal.signal(signal.SIGTERM, self._previous)
