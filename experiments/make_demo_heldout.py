"""Writes the demo's fixed held-out set, ``configs/demo_heldout.jsonl`` (research script).

``N`` distinct problems of the demo task (``configs/demo.py``: the operands, operators and
phrasing of its ``data`` section), drawn with a seed of their own. The demo config names the
file twice: as its evaluation benchmark and as ``data.arithmetic_exclude``, so training never
draws these questions and the before/after evaluation measures generalisation, not recall.

    PYTHONPATH=. python experiments/make_demo_heldout.py [--n 200] [--seed 1234]

The committed file is this script's output with the defaults; rerunning it rewrites the same
file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def heldout_rows(n: int, seed: int) -> list[dict]:
    """``n`` distinct problems of the demo's arithmetic task as ``{id, question, answer}``."""
    from meljax.data import ArithmeticProblems

    d = demo_config().data
    source = ArithmeticProblems(
        seed=seed, min_value=d.arithmetic_min, max_value=d.arithmetic_max, ops=d.arithmetic_ops
    )
    rows, seen = [], set()
    for i in range(100 * n):
        p = source[i]
        if p.question not in seen:
            seen.add(p.question)
            rows.append({"id": f"heldout-{len(rows)}", "question": p.question, "answer": p.answer})
            if len(rows) == n:
                return rows
    raise ValueError(f"the demo task has fewer than {n} distinct problems")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", default=os.path.join(ROOT, "configs", "demo_heldout.jsonl"))
    args = parser.parse_args()
    rows = heldout_rows(args.n, args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} problems to {args.output}")


if __name__ == "__main__":
    main()
