"""Throughput of the math verifier (meljax.rewards) on realistic completions.

Completions are built from MATH-500: each problem's reference `solution` (which ends with a
`\\boxed{}` answer) serves as a correct completion; for every second item the boxed answer
is altered so that it is wrong. Expected accuracy is therefore about 50%.

Usage (from the repository root):
  .venv/bin/python benchmarks/verifier.py --workers 2 --num-completions 1000
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

from meljax.rewards import RewardConfig, Verifier, last_boxed_span

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data" / "math500" / "test.jsonl"

_INTEGER = re.compile(r"-?\d+")


def load_problems(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of a MATH-500 style jsonl file (fields problem/answer/solution)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if len(rows) >= limit:
                break
            row = json.loads(line)
            for field in ("answer", "solution"):
                if not isinstance(row.get(field), str):
                    raise ValueError(f"{path}:{line_no}: field {field!r} missing or not a string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def wrong_answer(answer: str) -> str:
    """An answer that differs from `answer`: integer + 1, otherwise `answer + 1`."""
    if _INTEGER.fullmatch(answer.strip()):
        return str(int(answer) + 1)
    return f"{answer}+1"


def make_completion(solution: str, make_wrong: bool) -> str:
    """The reference solution, with its last boxed answer replaced when `make_wrong`."""
    span = last_boxed_span(solution)
    if not make_wrong or span is None:
        return solution
    start, end = span
    return solution[:start] + wrong_answer(solution[start:end]) + solution[end:]


def build_batch(
    rows: list[dict], size: int, group_size: int = 1
) -> tuple[list[str], list[str], list[bool]]:
    """[size] completions, gold answers and whether each completion was left correct.

    Consecutive groups of `group_size` completions share a problem, as in a GRPO step.
    """
    completions, answers, intended = [], [], []
    for i in range(size):
        row = rows[(i // group_size) % len(rows)]
        # Alternate correct/altered, and flip the pattern on each pass over the problems so
        # that a repeated problem does not repeat the same completion (which caches would hit).
        correct = (i + i // (len(rows) * group_size)) % 2 == 0
        completions.append(make_completion(row["solution"], make_wrong=not correct))
        answers.append(row["answer"])
        intended.append(correct)
    return completions, answers, intended


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of processes `pids` from /proc (Linux), None elsewhere."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="MATH-500 jsonl file (default: ../shared/data)",
    )
    parser.add_argument("--num-problems", type=int, default=500, help="first N problems used")
    parser.add_argument("--num-completions", type=int, default=1000, help="batch size")
    parser.add_argument(
        "--group-size", type=int, default=1, help="completions per problem, e.g. 8 as in GRPO"
    )
    parser.add_argument("--workers", type=int, default=2, help="0 = in this process")
    parser.add_argument("--runs", type=int, default=3, help="timed runs; the median is shown")
    parser.add_argument(
        "--reuse-pool", action="store_true", help="one pool for all runs (warm sympy caches)"
    )
    parser.add_argument("--timeout-s", type=float, default=5.0, help="per-item limit")
    parser.add_argument("--mode", default="boxed", help="answer extraction mode")
    parser.add_argument("--step-time-s", type=float, default=60.0, help="assumed RL step time")
    parser.add_argument(
        "--step-completions", type=int, default=1024, help="completions per step (128 x G=8)"
    )
    args = parser.parse_args()
    if not args.data.is_file():
        print(
            f"verifier benchmark skipped: no MATH-500 file at {args.data.resolve()} "
            f"(pass --data=PATH of a MATH-500 test.jsonl)",
            file=sys.stderr,
        )
        return

    rows = load_problems(args.data.resolve(), args.num_problems)
    completions, answers, intended = build_batch(rows, args.num_completions, args.group_size)
    config = RewardConfig(mode=args.mode, timeout_s=args.timeout_s, num_workers=args.workers)
    print(
        f"data: {args.data.resolve()} ({len(rows)} problems), batch {len(completions)}, "
        f"mean completion {statistics.mean(map(len, completions)):.0f} chars, "
        f"group size {args.group_size}, workers {args.workers}, mode {args.mode}, timeout {args.timeout_s} s"
    )

    # Each timed run gets fresh workers by default: sympy caches results process-wide, so a
    # reused pool would see the same 1000 expressions again and look faster than training,
    # where completions are new every step. Start-up is timed separately.
    times, startups, cpu_times, results = [], [], [], []
    restarts = 0
    pool = None
    try:
        for run in range(args.runs):
            if args.workers > 0 and (pool is None or not args.reuse_pool):
                if pool is not None:
                    restarts += pool.restarts
                    pool.close()
                start = time.perf_counter()
                pool = Verifier(config)
                pool.score(["\\boxed{1}"] * args.workers, ["1"] * args.workers)  # waits for start
                startups.append(time.perf_counter() - start)
            pids = pool.worker_pids() if pool is not None else []
            cpu_before = cpu_seconds(pids) if pool is not None else time.process_time()
            start = time.perf_counter()
            if pool is not None:
                results = pool.score(completions, answers)
            else:
                with Verifier(config) as in_process:
                    results = in_process.score(completions, answers)
            times.append(time.perf_counter() - start)
            cpu_after = cpu_seconds(pids) if pool is not None else time.process_time()
            if cpu_before is not None and cpu_after is not None:
                cpu_times.append(cpu_after - cpu_before)
            print(f"run {run + 1}: {times[-1]:.2f} s, {len(completions) / times[-1]:.1f} answers/s")
    finally:
        if pool is not None:
            restarts += pool.restarts
            pool.close()
    if startups:
        print(f"pool start-up: {statistics.median(startups):.2f} s; worker restarts: {restarts}")

    median_s = statistics.median(times)
    rate = len(completions) / median_s
    accuracy = statistics.mean(r.score for r in results)
    kept = [r.score for r, ok in zip(results, intended, strict=True) if ok]
    altered = [r.score for r, ok in zip(results, intended, strict=True) if not ok]
    reasons = collections.Counter(r.reason for r in results)
    step_s = args.step_completions / rate
    print(f"throughput: {rate:.1f} answers/s (median of {args.runs} runs, {median_s:.2f} s)")
    if len(cpu_times) == len(times):
        cpu_ms = 1e3 * statistics.median(cpu_times) / len(completions)
        print(
            f"verifier CPU time: {cpu_ms:.2f} ms per answer (median; workers' user+sys, "
            f"{1e3 / cpu_ms:.0f} answers per CPU-second; a loaded machine slows the wall "
            "clock, not this)"
        )
    print(
        f"accuracy: {accuracy:.1%} overall (expected ~50%); "
        f"{statistics.mean(kept):.1%} of unaltered solutions correct, "
        f"{statistics.mean(altered):.1%} of altered ones accepted"
    )
    print(f"reasons: {dict(reasons.most_common())}")
    print(
        f"a step of {args.step_completions} completions: {step_s:.2f} s of verification = "
        f"{step_s / args.step_time_s:.1%} of a {args.step_time_s:.0f} s step"
    )


if __name__ == "__main__":
    main()
