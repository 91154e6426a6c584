"""The platform profile: every default that differs between CPU, TPU and GPU, in one place.

Each choice is made for the platform a program is compiled for (the context mesh's devices,
so an ahead-of-time compile for a TPU topology on a CPU host takes the TPU profile) and can be
overridden where its setting lives (``rollout.shrink_tail``, ``model.remat``, the engine's
keywords). ``meljax train`` prints the profile it runs with.
"""

from __future__ import annotations

import dataclasses

from meljax.runtime import sharding as shd
from meljax.runtime.buckets import DEFAULT_LENGTH_BUCKETS


@dataclasses.dataclass(frozen=True)
class Profile:
    """The platform's defaults, each with the one-line reason it differs.

    Attributes:
      platform: ``cpu``, ``tpu`` or ``gpu``.
      split_layers: decoding runs over per-layer weight copies (CPU copies a slice of a
        stacked ``[L, ...]`` weight before each matmul; accelerators slice it in place).
      segment_buffer: decode segments read the KV cache and write a side buffer merged after
        the segment (keeps the TPU cache in place; on CPU writing the cache is cheaper).
      kv_buckets: attended lengths decode segments are compiled for; ``()``: the exact filled
        length (CPU compiles fast and pays for every padded position).
      shrink_tail: once no request waits, live samples move into a smaller slot pool (CPU time
        scales with slots; an accelerator's step barely does).
      remat: the ``auto`` rematerialisation policy (accelerator memory limits the batch; CPU
        memory does not, and recomputation costs CPU time).
      attention_kernel: the ``auto`` attention kernel (``None``: dense, or chunked when long).
      kv_layout: KV-cache storage layout (``heads`` on CPU, ``hd_minor`` on TPU and GPU).
      weight_matmul_vjp: the CPU custom VJP of unsharded weight matmuls.
      keep_freed_memory: ``meljax train`` sets glibc to keep freed blocks (XLA:CPU allocates
        each program's temporaries as one block). Decided before JAX starts, by the host
        having no accelerator device node (:mod:`meljax.runtime.hostmem`).
    """

    platform: str
    split_layers: bool
    segment_buffer: bool
    kv_buckets: tuple[int, ...]
    shrink_tail: bool
    remat: str
    attention_kernel: str | None
    kv_layout: str
    weight_matmul_vjp: bool
    keep_freed_memory: bool

    def describe(self) -> str:
        kv = "exact" if not self.kv_buckets else f"buckets up to {self.kv_buckets[-1]}"
        return (
            f"{self.platform}: decode over {'per-layer' if self.split_layers else 'stacked'} "
            f"weights, KV cache {self.kv_layout} ({kv}"
            f"{', segment buffer' if self.segment_buffer else ''}), "
            f"tail shrink {'on' if self.shrink_tail else 'off'}, remat {self.remat}, "
            f"attention {self.attention_kernel or 'dense/chunked'}"
            f"{', host malloc keeps freed blocks' if self.keep_freed_memory else ''}"
        )


_ACCELERATOR = dict(
    split_layers=False,
    segment_buffer=True,
    kv_buckets=DEFAULT_LENGTH_BUCKETS,
    shrink_tail=False,
    remat="full",
    kv_layout="hd_minor",
    weight_matmul_vjp=False,
    keep_freed_memory=False,
)
PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        platform="cpu",
        split_layers=True,
        segment_buffer=False,
        kv_buckets=(),
        shrink_tail=True,
        remat="none",
        attention_kernel=None,
        kv_layout="heads",
        weight_matmul_vjp=True,
        keep_freed_memory=True,
    ),
    "tpu": Profile(platform="tpu", attention_kernel="splash", **_ACCELERATOR),
    "gpu": Profile(platform="gpu", attention_kernel="cudnn", **_ACCELERATOR),
}
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def profile(platform: str | None = None) -> Profile:
    """The profile of ``platform`` (default: what the code in context compiles for)."""
    name = platform or shd.current_platform()
    name = _ALIASES.get(name, name)
    return PROFILES.get(name, PROFILES["cpu"])


__all__ = ["PROFILES", "Profile", "profile"]
