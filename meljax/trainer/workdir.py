"""One run per workdir, and a workdir that remembers its run's config.

* :func:`hold` takes ``WORKDIR/train.lock`` for the whole run, so a second ``meljax train`` on
  the same folder stops at once with one line naming the first (host, pid, since when) instead
  of writing every record twice. On a local (or NFS) disk the lock is an ``flock`` on that
  file: the operating system drops it when its process ends, however it ends, so a lock left
  by a killed run is stale by construction and the next run takes it over. A ``gs://`` workdir
  gets no lock (an object store has no atomic create-if-absent through ``etils.epath``, and a
  lock object that a killed run leaves behind would block every restart); a warning says so.
* :func:`config_changes` compares a resumed run's config with the one saved in
  ``WORKDIR/config.json``; :func:`check_config_changes` refuses a change to anything that
  shapes the run (model, data, rollout, algorithm, mel, optim, mesh, seed, ...) unless
  ``allow`` (``meljax train --allow_config_change``); :func:`record_config` writes the new
  config and appends what changed to ``WORKDIR/config_history.jsonl``.

Only process 0 of a multi-host run holds the lock and judges the config
(:func:`on_process_0`); the other processes get the same verdict, so no host waits in a
collective that another has left.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

from meljax.runtime import files, multihost

CONFIG_FILE = "config.json"
LOCK_FILE = "train.lock"
CONFIG_HISTORY_FILE = "config_history.jsonl"

# Config keys (a name, or a section ending in ".") whose change does not alter what a resumed
# run computes: its length, what it logs, evaluates, keeps and exports, and how it is started.
HARMLESS_KEYS = (
    "total_steps",
    "logging.",
    "eval.",
    "export.",
    "distributed.",
    "checkpoint.every_steps",
    "checkpoint.max_to_keep",
    "reward.num_workers",
)


class WorkdirBusy(ValueError):
    """Another process holds the workdir's lock (a user error: one line, exit code 2)."""


def on_process_0(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on process 0 only and returns its result there (``None`` elsewhere); a
    ``ValueError`` it raises is raised on every process (a collective call).

    Why: a check that one host fails and the others pass would leave them waiting forever in
    the next collective."""
    result, error = None, None
    if multihost.process_index() == 0:
        try:
            result = fn()
        except ValueError as e:
            error = e
    messages = multihost.allgather_objects(str(error) if error is not None else None)
    if error is not None:
        raise error
    if messages[0] is not None:
        raise ValueError(f"process 0: {messages[0]}")
    return result


# -- the lock ---------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _holder_text(info: dict) -> str:
    host, pid, since = info.get("host", "?"), info.get("pid", "?"), info.get("since", "?")
    return f"host {host}, pid {pid}, since {since}"


def _read_info(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: Any) -> bool:
    """Whether ``pid`` is a running process on this host (unknown -> assumed running)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    """True while ``path`` still names the file open as ``fd`` (a releasing run unlinks it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class WorkdirLock:
    """The exclusive lock of a local workdir (see the module docstring); :meth:`release` (or
    the end of the process, however it ends) frees it."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, workdir: str) -> WorkdirLock:
        """Takes the lock or raises :class:`WorkdirBusy` naming the holder."""
        path = os.path.abspath(os.fspath(files.path(workdir, LOCK_FILE)))
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = cls._lock(fd, path)
            except BaseException:
                os.close(fd)
                raise
            if previous is not None:
                break
            os.close(fd)  # the file was released (unlinked) under us: take the new one
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        if previous and previous.get("pid") != me["pid"]:
            logging.warning(
                "workdir lock %s: the run that held it (%s) ended without releasing it; "
                "taking it over",
                path,
                _holder_text(previous),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(path, fd)

    @staticmethod
    def _lock(fd: int, path: str) -> dict | None:
        """Locks ``fd``; returns what the file held before (``{}`` if empty), or ``None`` if
        ``path`` no longer names it. Raises :class:`WorkdirBusy` when a live process holds it."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            raise WorkdirBusy(_busy_message(_read_info(fd), path)) from None
        except OSError as e:  # a filesystem without locks: trust the pid the file names
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            flocked = False
        if not _same_file(fd, path):
            return None
        previous = _read_info(fd)
        if not flocked and previous and previous.get("pid") != os.getpid():
            same_host = previous.get("host") == socket.gethostname()
            if not same_host or _pid_alive(previous.get("pid")):
                raise WorkdirBusy(_busy_message(previous, path))
        return previous

    def release(self) -> None:
        """Removes the lock file (only while it is still ours) and frees the lock."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _busy_message(info: dict, path: str) -> str:
    return (
        f"workdir {os.path.dirname(path)} is in use by another meljax train "
        f"({_holder_text(info)}); wait for it to end or stop it (if no such process "
        f"runs, delete {path})"
    )


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock for the ``with`` block (process 0 only; see the module
    docstring). Raises :class:`WorkdirBusy` (``process 0: ...`` on the other processes)."""
    if not files.is_local(workdir):
        if multihost.process_index() == 0:
            logging.warning(
                "workdir %s is not on a local disk: no workdir lock is taken, so make sure that "
                "only one run writes to it",
                workdir,
            )
        yield
        return
    lock = on_process_0(lambda: WorkdirLock.acquire(workdir))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# -- the config of a resumed run --------------------------------------------------------------


def _flat(node: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_saved(text: str) -> dict[str, Any]:
    """A saved ``config.json`` as flat JSON values, fields added since at their defaults."""
    from meljax.config.settings import config_from_json

    try:
        return _flat(json.loads(config_from_json(text).to_json()))
    except ValueError:  # a field meljax has dropped since: compare what is there
        return _flat(json.loads(text))


def config_changes(saved_text: str, cfg) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every config value that differs from the saved config."""
    old, new = _as_saved(saved_text), _flat(json.loads(cfg.to_json()))
    missing = object()
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    }


def is_harmless(key: str) -> bool:
    """Whether changing ``key`` leaves what a resumed run computes as it was."""
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_KEYS)


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


def check_config_changes(
    workdir: str, cfg, step: int | None, allow: bool = False
) -> dict[str, tuple[Any, Any]]:
    """The changes since the config saved in ``workdir`` when a run resumes from checkpoint
    ``step`` (none for a fresh start: nothing is resumed). Raises ``ValueError`` listing the
    changes that shape the run unless ``allow``.

    Why: resuming a checkpoint with another group size, model or data silently mixes two
    runs in one set of logs (or fails deep in the restore)."""
    saved = files.path(workdir, CONFIG_FILE)
    if not step or not saved.exists():
        return {}
    changes = config_changes(saved.read_text(), cfg)
    shaping = {k: v for k, v in changes.items() if not is_harmless(k)}
    if shaping and not allow:
        raise ValueError(
            f"{workdir} holds a run (step {step}) made with another config: {_describe(shaping)}; "
            "rerun with the saved values, use a new --workdir, or pass --allow_config_change "
            f"to go on with the new ones (recorded in {CONFIG_HISTORY_FILE})"
        )
    if shaping:
        logging.warning("config changed at resume (allowed): %s", _describe(shaping))
    return changes


def record_config(workdir: str, cfg, changes: dict[str, tuple[Any, Any]], step: int) -> None:
    """Writes ``config.json`` and appends the changes (if any) to the config history."""
    if changes:
        record = {
            "step": step,
            "time": _now(),
            "changes": {k: [a, b] for k, (a, b) in changes.items()},
            "allowed_by_flag": sorted(k for k in changes if not is_harmless(k)),
        }
        files.append_jsonl(files.path(workdir, CONFIG_HISTORY_FILE), [record])
        logging.info("config changes since the last start: %s", _describe(changes))
    files.write_text(files.path(workdir, CONFIG_FILE), cfg.to_json(indent=2))
