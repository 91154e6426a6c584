"""Shared helpers of the command modules: clean error exits and multi-host start-up."""

from __future__ import annotations

import contextlib
import os
import sys

from absl import logging

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_user_error(e: BaseException) -> bool:
    """A bad config, a missing file or bad data: a ``ValueError`` / ``FileNotFoundError`` that
    meljax itself raised with a message for the user. Anything else (a ``TypeError``, an
    ``AttributeError``, an error from inside a library) is a bug and keeps its traceback."""
    if not isinstance(e, ValueError | FileNotFoundError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE)


def error_message(e: BaseException) -> str:
    """The message as raised: quotes in it are its own (a path's ``'...'``). Only a
    ``KeyError``, whose ``str`` is the repr of its key, is shown without that repr."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e) or type(e).__name__


@contextlib.contextmanager
def clean_errors(command: str):
    """Turns user errors (bad config, missing files, bad data) into one line and exit code 2;
    internal errors keep their traceback (see :func:`is_user_error`)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MELJAX_TRACEBACK") or not is_user_error(e):
            raise
        msg = error_message(e)
        print(f"meljax {command}: error: {msg}", file=sys.stderr)
        print("(set MELJAX_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)


def multihost_environment() -> bool:
    """True when this process is one of several hosts (TPU pod slice, SLURM, explicit)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def maybe_initialize_distributed(dist) -> None:
    """Calls ``jax.distributed.initialize()`` when running on several hosts (or when asked).

    ``dist`` is the config's ``distributed`` section. With ``coordinator_address``,
    ``num_processes`` and ``process_id`` set, those are passed on (GPU nodes without SLURM,
    several processes on one machine); otherwise JAX detects the cluster itself.
    """
    from meljax.config.settings import validate_distributed

    validate_distributed(dist)
    explicit = bool(dist.coordinator_address)
    if dist.initialize == "never" or (
        dist.initialize == "auto" and not explicit and not multihost_environment()
    ):
        return
    import jax

    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=dist.coordinator_address,
            num_processes=dist.num_processes,
            process_id=dist.process_id,
        )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
