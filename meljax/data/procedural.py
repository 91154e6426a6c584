"""Procedurally generated arithmetic problems: a file-free source for the CPU demo.

:class:`ArithmeticProblems` is a random-access sequence (``len`` + ``__getitem__``), so
it plugs straight into :func:`meljax.data.pipeline.make_problem_iterator` / grain. Item
``i`` depends only on ``(seed, i)``, which makes it reproducible across processes and
resumable from a checkpointed index.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import numpy as np

from meljax.data.records import Problem

__all__ = ["OP_WORDS", "ArithmeticProblems"]

OP_WORDS: dict[str, str] = {"+": "plus", "-": "minus", "*": "times"}
"""Supported operators and the word used for each in the question text."""

DEFAULT_PHRASING = "What is {a} {op} {b}?"


class ArithmeticProblems(Sequence[Problem]):
    """Binary arithmetic questions such as ``"What is 3 plus 5?"`` -> ``"8"``.

    Args:
      seed: base seed; item ``i`` is drawn from a generator seeded with ``(seed, i)``.
      min_value: smallest operand (inclusive).
      max_value: largest operand (inclusive).
      ops: operators to draw from, uniformly; any of ``"+"``, ``"-"``, ``"*"``.
      phrasing: question template with the fields ``{a}``, ``{b}``, ``{op}`` (the operator
        word, e.g. ``"plus"``) and ``{sym}`` (the symbol, e.g. ``"+"``).
      length: number of items (the sequence is virtual, so this is just an upper bound on
        indices; large by default so that it behaves like an endless stream).
      allow_negative: if ``False``, subtraction operands are ordered so that ``a >= b``
        and answers are never negative (easier for tiny demo models).
      exclude: question texts never to produce (a held-out set): an item that would be one of
        them is drawn again from the same generator, so training never sees them.
    """

    def __init__(
        self,
        seed: int = 0,
        min_value: int = 0,
        max_value: int = 9,
        ops: Sequence[str] = ("+",),
        phrasing: str = DEFAULT_PHRASING,
        *,
        length: int = 10**6,
        allow_negative: bool = False,
        exclude: Collection[str] = (),
    ) -> None:
        if min_value > max_value:
            raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
        ops = tuple(ops)
        if not ops:
            raise ValueError("ops must name at least one operator")
        unknown = [op for op in ops if op not in OP_WORDS]
        if unknown:
            raise ValueError(f"Unsupported ops {unknown}; supported: {list(OP_WORDS)}")
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        try:
            phrasing.format(a=1, b=2, op="plus", sym="+")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"phrasing {phrasing!r} must only use the fields {{a}}, {{b}}, {{op}}, {{sym}}"
                f" (double literal braces): {e!r}"
            ) from None
        self.seed = int(seed)
        self.min_value = int(min_value)
        self.max_value = int(max_value)
        self.ops = ops
        self.phrasing = phrasing
        self.length = int(length)
        self.allow_negative = allow_negative
        self.exclude = frozenset(exclude)
        if self.exclude and all(
            self._draw(0, a, b, op).question in self.exclude
            for op in ops
            for a in range(min_value, max_value + 1)
            for b in range(min_value, max_value + 1)
        ):
            raise ValueError("exclude holds every question of this task: nothing left to draw")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Problem:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("ArithmeticProblems does not support slicing; index one item")
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} problems")
        # Seeding with the pair (seed, index) gives independent, order-free draws.
        rng = np.random.default_rng((self.seed, index))
        while True:  # ends: the constructor checked that some question is not excluded
            a, b = (int(x) for x in rng.integers(self.min_value, self.max_value + 1, size=2))
            op = self.ops[int(rng.integers(len(self.ops)))]
            problem = self._draw(index, a, b, op)
            if problem.question not in self.exclude:
                return problem

    def _draw(self, index: int, a: int, b: int, op: str) -> Problem:
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = self.phrasing.format(a=a, b=b, op=OP_WORDS[op], sym=op)
        return Problem(
            id=f"arith/{self.seed}/{index}",
            question=question,
            answer=str(answer),
            extra={"a": a, "b": b, "op": op},
        )

    def __iter__(self) -> Iterator[Problem]:
        return (self[i] for i in range(self.length))

    def __repr__(self) -> str:
        return (
            f"ArithmeticProblems(seed={self.seed}, min_value={self.min_value}, "
            f"max_value={self.max_value}, ops={self.ops}, length={self.length})"
        )
