"""Benchmark files for evaluation: ``--benchmarks`` entries and their loading."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from absl import logging

from meljax.data.layouts import PRESETS, infer_preset
from meljax.data.records import load_problems

__all__ = ["BenchmarkSpec", "load_benchmarks", "parse_benchmark_specs"]


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """One ``--benchmarks`` entry: report name, layout preset (``None``: inferred), path."""

    name: str
    preset: str | None
    path: str


def _file_name(path: str) -> str:
    """``data/my_bench.jsonl`` -> ``my_bench``; ``data/sums/test.jsonl`` -> ``sums``."""
    parts = [p for p in path.rstrip("/").split("/") if p]
    stem = parts[-1].split(".", 1)[0] if parts else path
    if stem in ("test", "train", "validation", "val", "dev", "data") and len(parts) > 1:
        return parts[-2]
    return stem or path


def parse_benchmark_specs(entries: str | Sequence[str]) -> list[BenchmarkSpec]:
    """``["math500=data/m5", "data/gsm8k/test.jsonl"]`` -> specs with unique names.

    ``entries`` may also be one comma-separated string (as in the ``eval.benchmarks`` config).

    The name is the preset (given or inferred from the path); the file stem is appended when
    two entries share a preset (``gsm8k/test``, ``gsm8k/train``). A path no preset matches is
    read with ``question`` / ``answer`` fields and named after its file (or its folder when
    the file is ``test``/``train``...).

    Raises:
      ValueError: an empty entry, an empty path, or an unknown preset.
    """
    if isinstance(entries, str):
        entries = entries.split(",")
    specs: list[tuple[str, str | None, str]] = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            raise ValueError("benchmark list has an empty entry")
        preset: str | None = None
        path = entry
        head, sep, tail = entry.partition("=")
        if sep and "/" not in head:  # PRESET=PATH (a bare path may itself contain '=')
            preset, path = head.strip(), tail.strip()
            if preset not in PRESETS:
                raise ValueError(
                    f"benchmark entry {entry!r}: unknown preset {preset!r}; "
                    f"known: {', '.join(sorted(PRESETS))}"
                )
            if not path:
                raise ValueError(f"benchmark entry {entry!r} has no path")
        # No preset: the file is read with question / answer fields, named after the file.
        name = preset or infer_preset(path) or _file_name(path)
        specs.append((name, preset, path))
    counts: dict[str, int] = {}
    for name, _, _ in specs:
        counts[name] = counts.get(name, 0) + 1
    out: list[BenchmarkSpec] = []
    seen: set[str] = set()
    for name, preset, path in specs:
        if counts[name] > 1:
            stem = os.path.basename(path.rstrip("/")).split(".", 1)[0]
            name = f"{name}/{stem}"
        base, i = name, 2
        while name in seen:
            name, i = f"{base}#{i}", i + 1
        seen.add(name)
        out.append(BenchmarkSpec(name=name, preset=preset, path=path))
    return out


def load_benchmarks(
    specs: Sequence[BenchmarkSpec], *, limit: int = 0, on_bad_row: str = "error"
) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """Loads each benchmark; returns ``({name: problems}, {name: file info for the report})``.

    Raises:
      FileNotFoundError: a local benchmark path does not exist.
      ValueError: a file without problems, or the loader's own errors (bad rows...).
    """
    problems: dict[str, list[Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if "://" not in spec.path and not os.path.exists(spec.path):
            raise FileNotFoundError(f"benchmark {spec.name!r}: no such file or folder: {spec.path}")
        loaded = load_problems(spec.path, spec.preset, on_bad_row=on_bad_row, limit=limit or None)
        if len(loaded) == 0:
            raise ValueError(f"benchmark {spec.name!r}: no problems in {loaded.path!r}")
        if loaded.num_skipped:
            logging.warning(
                "benchmark %s: skipped %d bad rows of %s",
                spec.name,
                loaded.num_skipped,
                loaded.path,
            )
        problems[spec.name] = list(loaded)
        info[spec.name] = {
            "path": loaded.path,
            "preset": loaded.preset,
            "num_problems": len(loaded),
            "num_skipped": loaded.num_skipped,
        }
    return problems, info
