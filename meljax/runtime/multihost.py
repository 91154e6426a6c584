"""Host-side agreement between the processes of one run (a TPU pod slice, several GPU nodes).

Every jitted call must get the same global inputs on every host. Host-side work that is a pure
function of values all hosts share (sampler outputs, decoded text, seeded draws) agrees by
itself; work with wall-clock limits (the verifier) does not, so its results are computed once
(each host a slice) and all-gathered (:func:`allgather_objects`). :func:`check_agreement`
compares a digest of each step's decisions across hosts and fails loudly instead of letting a
collective hang on differently shaped inputs.

On one process every function here is a no-op (no JAX import is needed for that).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def process_count() -> int:
    """Processes in the run; 1 when JAX is not even imported (a plain scoring script)."""
    jax = sys.modules.get("jax")
    return 1 if jax is None else jax.process_count()


def process_index() -> int:
    jax = sys.modules.get("jax")
    return 0 if jax is None else jax.process_index()


def _allgather(x: np.ndarray) -> np.ndarray:
    """``[processes, *x.shape]``: every process's ``x`` (same shape and dtype on all)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable ``obj``, in process order (a collective call)."""
    if process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = _allgather(np.asarray([data.size], np.int64))[:, 0]
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[: data.size] = data
    rows = _allgather(padded)
    return [json.loads(bytes(rows[i, : int(n)]).decode()) for i, n in enumerate(lengths)]


def any_process(flag: bool) -> bool:
    """True when ``flag`` is set on at least one process (a collective call)."""
    if process_count() == 1:
        return bool(flag)
    return bool(_allgather(np.asarray([int(bool(flag))], np.int32)).any())


def digest(*values: Any) -> str:
    """A short hash of arrays, numbers, strings and nested lists/dicts of them."""
    h = hashlib.sha256()

    def add(v: Any) -> None:
        if isinstance(v, np.ndarray) or hasattr(v, "__array__"):
            a = np.asarray(v)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                add(v[k])
        elif isinstance(v, list | tuple):
            h.update(f"[{len(v)}".encode())
            for x in v:
                add(x)
        else:
            h.update(repr(v).encode())

    for v in values:
        add(v)
    return h.hexdigest()[:16]


def check_agreement(what: str, parts: dict[str, Any]) -> None:
    """Raises ``RuntimeError`` naming the parts whose digests differ between processes.

    Args:
      what: where in the run this is (e.g. ``"step 12"``), for the message.
      parts: name -> value (anything :func:`digest` takes); the same names on every process.
    """
    if process_count() == 1:
        return
    mine = {name: digest(value) for name, value in parts.items()}
    everyone: Sequence[dict[str, str]] = allgather_objects(mine)
    differing = sorted(k for k in mine if len({d.get(k) for d in everyone}) > 1)
    if differing:
        raise RuntimeError(
            f"{what}: hosts disagree on {', '.join(differing)} (process {process_index()}); "
            f"a host-side decision was not shared, so the next jitted call would get "
            f"different inputs per host"
        )
