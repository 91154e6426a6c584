"""JAX's persistent compilation cache for meljax's commands: a second process does not compile.

Every command compiles the same programs again in each new process (the engine's decode
segments, the update step); XLA can store the compiled executables on disk and load them when
the same program, shapes, flags and backend come back. On by default under the meljax cache
(``~/.cache/meljax/jax-compile``); ``MELJAX_COMPILE_CACHE=DIR`` moves it, ``=off`` turns it off;
a ``JAX_COMPILATION_CACHE_DIR`` set by the user is left to JAX.
"""

from __future__ import annotations

import os

OFF = ("off", "0", "false", "none", "no")


def cache_path() -> str | None:
    """Where the cache goes, or ``None`` when it is off or JAX's own setting rules."""
    setting = os.environ.get("MELJAX_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if setting:
        return os.path.expanduser(setting)
    from meljax.models.sources import cache_dir

    return os.path.join(cache_dir(), "jax-compile")


def enable() -> str | None:
    """Points JAX's persistent compilation cache at :func:`cache_path`; returns the folder."""
    path = cache_path()
    if path is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    # every program, not only those over JAX's 1 s default: which ones cross a time threshold
    # would depend on the machine's load, and a loaded second process would compile again
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
