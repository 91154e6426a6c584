"""Shape bucketing: pad lengths and batch sizes to a few sizes so jitted code compiles rarely."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bucket(n: int, buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS, multiple: int = 1) -> int:
    """Smallest bucket >= ``n`` that is a multiple of ``multiple``.

    Beyond the largest bucket, sizes grow in steps of the largest bucket, so any ``n`` is
    accepted. ``multiple`` lets a batch size stay divisible by the data-parallel size.
    """
    if n < 0:
        raise ValueError(f"bucket: negative size {n}")
    for b in sorted(buckets):
        if b >= n and b % multiple == 0:
            return b
    top = max(buckets)
    step = top * multiple // _gcd(top, multiple)
    return max(step, -(-n // step) * step)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
