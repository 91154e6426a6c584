"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this
folder is on ``sys.path``). Importing it also puts the repository root on ``sys.path``, for
the reference sampler in ``tests/``."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)


def matmul_flops_per_s(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
    """Median FLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` (2 n^3 FLOPs) on the
    default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def run_children_alternating(
    script: str, children: list[str], args: list[str], rounds: int
) -> tuple[dict[str, list[dict]], list[float]]:
    """Runs ``script --child=NAME *args`` for every child, round after round, each in a fresh
    process that prints one ``RESULT {json}`` line. Children alternate round by round, so a
    burst of load from other processes is less likely to hit only one of them.

    Returns:
      ``({child: [result per round]}, [1-minute load average after each run])``.
    """
    raw: dict[str, list[dict]] = {c: [] for c in children}
    loads = []
    for rnd in range(rounds):
        for child in children:
            t = time.time()
            proc = subprocess.run(
                [sys.executable, script, f"--child={child}", *args],
                capture_output=True,
                text=True,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{child} child failed (exit {proc.returncode})")
            raw[child].append(json.loads(line[-1][len("RESULT ") :]))
            loads.append(os.getloadavg()[0])
            print(f"[round {rnd}: {child} done in {time.time() - t:.0f} s]", flush=True)
    return raw, loads
