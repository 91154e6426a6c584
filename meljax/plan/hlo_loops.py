"""Trip counts of ``while`` loops in compiled HLO text (:mod:`meljax.plan.hlo`).

:func:`trip_count` reads how many times a ``while`` instruction runs: XLA's
``known_trip_count`` when present, else a condition that compares the loop counter with a
constant (``lax.scan``, ``fori_loop``), the counter's start and step read from the init tuple
and the body. It returns ``None`` for a loop whose end depends on data (the caller then picks
a bound, as :mod:`meljax.plan.hlo_cost` does with ``dynamic_trip_count``).
"""

from __future__ import annotations

import re

from meljax.plan.hlo import Computation, Instruction

__all__ = ["trip_count"]


def _constant(instr: Instruction | None) -> int | None:
    if instr is None or instr.opcode != "constant":
        return None
    try:
        return int(instr.literal.strip())
    except ValueError:
        return None


def trip_count(loop: Instruction, caller: Computation, comps: dict[str, Computation]) -> int | None:
    """Iterations of a ``while`` instruction, or ``None`` when its end depends on data.

    Recognises ``known_trip_count`` and conditions of the form ``counter < N`` / ``counter <= N``
    (either operand order), the counter starting at the init tuple's constant (else 0) and
    advancing by the constant the body adds to it (else 1).
    """
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    if m:
        return int(m.group(1))
    names = loop.called("condition")
    cond = comps.get(names[0]) if names else None
    if cond is None:
        return None
    root = cond.by_name.get(cond.root)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = root.attr("direction") or ""
    a, b = (cond.by_name.get(n) for n in root.operands)
    if a is not None and a.opcode == "constant":
        a, b = b, a
        direction = {"GT": "LT", "GE": "LE"}.get(direction, "")
    limit = _constant(b)
    if a is None or a.opcode != "get-tuple-element" or limit is None:
        return None
    start = 0
    init = caller.by_name.get(loop.operands[0]) if loop.operands else None
    index = int(a.attr("index") or 0)
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
        start = _constant(caller.by_name.get(init.operands[index])) or 0
    step = _counter_step(loop, comps, index)
    if direction == "LT":
        return max(-(-(limit - start) // step), 0)
    if direction == "LE":
        return max((limit - start) // step + 1, 0)
    return None


def _counter_step(loop: Instruction, comps: dict[str, Computation], index: int) -> int:
    """How much the body adds to the loop counter (tuple element ``index``) per iteration;
    XLA's bidirectional windowed einsums step by 2. Defaults to 1."""
    names = loop.called("body")
    body = comps.get(names[0]) if names else None
    root = body.by_name.get(body.root) if body is not None else None
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return 1
    update = body.by_name.get(root.operands[index])
    if update is None or update.opcode != "add":
        return 1
    steps = [_constant(body.by_name.get(n)) for n in update.operands]
    steps = [x for x in steps if x is not None and x > 0]
    return steps[0] if steps else 1
