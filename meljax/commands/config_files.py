"""Where ``--config`` files come from: a path, or the name of a config shipped with meljax.

The configs live inside the package (``meljax/configs``, also reachable as ``configs/`` in a
checkout) so that ``meljax train`` works after a plain ``pip install`` from any folder:
``--config=demo`` or ``--config=qwen3_8b_mel.py:arg`` name a shipped file when no such path
exists where the command runs.
"""

from __future__ import annotations

import os

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped(name: str) -> str:
    """Path of the shipped config ``name`` (``demo`` or ``demo.py``)."""
    base = name if name.endswith(".py") else name + ".py"
    return os.path.join(SHIPPED_DIR, base)


def shipped_names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(SHIPPED_DIR) if f.endswith(".py"))


def resolve(value: str) -> str:
    """``value`` as given when it names an existing file (after ``:arg``), else a shipped one.

    ``configs/X.py`` (the README's spelling) also finds the shipped file outside a checkout.
    """
    path, sep, arg = value.partition(":")
    if os.path.exists(os.path.expanduser(path)):
        return value
    name = os.path.basename(path) if path.startswith(("configs/", "./configs/")) else path
    if os.sep in name or not os.path.exists(shipped(name)):
        return value  # not ours: the config loader reports the missing file
    return shipped(name) + sep + arg


def resolve_argv(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config=V`` / ``--config V`` passed through :func:`resolve`."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve(a[len("--config=") :])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out
