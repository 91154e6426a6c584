"""Host-memory allocator settings for runs whose programs execute on the CPU.

Every execution of a compiled XLA:CPU program allocates its temporaries as one block (8.7 GB
for the update step of SmolLM2-135M at 16 x 192 tokens without remat). glibc serves a block
that large from a fresh ``mmap`` and unmaps it when the program ends, so the kernel faults in
and zeroes every page again at the next step. XLA's worker threads each use their own malloc
arena, and an arena other than the main one falls back to ``mmap`` for any block over 64 MiB
whatever ``M_MMAP_MAX`` says, so three settings together keep freed blocks for reuse: one
arena, no ``mmap``'d chunks, no trimming of the heap. The update step then runs faster;
sampling gains nothing and runs slower with one arena, so only ``meljax train`` applies it
(figures: ``docs/performance.md``, "Host memory").

The price: memory freed by the process is kept by it (its peak resident size is unchanged).
That is right for a CPU run, whose peak is reached at every step anyway, but not on a TPU or
GPU host, where the big buffers live on the device and host memory is shared with data
loading; so the settings apply only where no accelerator device node exists. They must be
set before JAX starts its threads (before the first computation): ``meljax train`` does it
first. ``MELJAX_HOST_MALLOC=keep`` forces them, ``MELJAX_HOST_MALLOC=default`` turns them off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

ENV = "MELJAX_HOST_MALLOC"

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# device nodes of TPUs (/dev/accel*, /dev/vfio on newer VMs), NVIDIA and AMD GPUs
ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def accelerator_present() -> bool:
    """Whether this host has an accelerator device node (then its runs are not CPU runs)."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def keep_freed_memory() -> str:
    """Applies the settings of the module docstring where they fit; returns what was done
    (``"kept"``, or why not: ``"off"``, ``"accelerator"``, ``"not glibc"``), for logs."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "keep", "default"):
        raise ValueError(f"{ENV}={choice!r}: use auto, keep or default")
    if choice == "default":
        return "off"
    if choice == "auto" and accelerator_present():
        return "accelerator"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return "not glibc"
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim
    if not all(mallopt(param, value) == 1 for param, value in settings):
        return "not glibc"
    return "kept"


__all__ = ["ACCELERATOR_NODES", "ENV", "accelerator_present", "keep_freed_memory"]
