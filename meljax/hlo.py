"""Reading compiled HLO text: the collectives a program runs, with their shapes and bytes.

``collectives(compiled.as_text())`` lists every collective instruction of an XLA program
(``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``, ``collective-permute``,
``collective-broadcast``, ``ragged-all-to-all``, and their async ``-start`` forms; ``-done``
halves are skipped so nothing counts twice). Each one is reported once per appearance in the
program text: a collective inside a loop body (layer scan, micro-batches) runs once per
iteration, which ``computation`` lets a caller tell apart.

    from meljax import hlo
    for c in hlo.collectives(compiled.as_text()):
        print(c.kind, c.shapes, c.bytes, c.computation)
    hlo.summary(hlo.collectives(text))  # {"all-gather": (count, bytes), ...}
"""

from __future__ import annotations

import dataclasses
import re

KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_BITS = {
    "pred": 8,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "f8e4m3fn": 8,
    "f8e5m2": 8,
    "f8e4m3": 8,
    "f8e4m3fnuz": 8,
    "f8e5m2fnuz": 8,
    "s16": 16,
    "u16": 16,
    "f16": 16,
    "bf16": 16,
    "s32": 32,
    "u32": 32,
    "f32": 32,
    "s64": 64,
    "u64": 64,
    "f64": 64,
    "c64": 64,
    "c128": 128,
}
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<kind>" + "|".join(sorted(KINDS, key=len, reverse=True)) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s")  # headers start at column 0
_GROUPS = re.compile(r"replica_groups=(\{[^}]*\}(?:\})?|\[[^\]]*\][^,\s]*)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction.

    Attributes:
      kind: one of ``KINDS`` (an async ``-start`` reports its base kind).
      name: the HLO instruction name.
      computation: the HLO computation it sits in (a loop body shows up here).
      shapes: ``(dtype, dims)`` of each array it produces (several for combined collectives).
      bytes: total bytes of those arrays.
      replica_groups: the ``replica_groups`` attribute as written (``""`` if absent).
    """

    kind: str
    name: str
    computation: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bytes: int
    replica_groups: str = ""

    @property
    def largest(self) -> tuple[str, tuple[int, ...]]:
        """The biggest array it produces."""
        return max(self.shapes, key=lambda s: _nbytes(*s))


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n * _BITS.get(dtype, 32) // 8


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _BITS:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _outputs(kind: str, is_start: bool, shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Arrays a collective produces. An async all-gather / collective-permute / all-to-all
    ``-start`` returns ``(operands, outputs[, context])``: keep the outputs only."""
    arrays = _arrays(shape_text)
    if not is_start or kind in ("all-reduce", "reduce-scatter"):
        return arrays
    inner = shape_text.strip()
    if inner.startswith("(") and inner.endswith(")"):
        parts = _split_top(inner[1:-1])
        if len(parts) >= 2:
            return _arrays(parts[1])
    return arrays


def _split_top(text: str) -> list[str]:
    """Splits ``a, (b, c), d`` at top-level commas."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an HLO module's text (``compiled.as_text()``), in program order."""
    out = []
    computation = ""
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if m is None:
            c = _COMPUTATION.match(line)
            if c is not None and line.rstrip().endswith("{"):
                computation = c.group("name")
            continue
        kind = m.group("kind")
        shapes = tuple(_outputs(kind, m.group("start") is not None, m.group("shape")))
        groups = _GROUPS.search(line)
        out.append(
            Collective(
                kind=kind,
                name=m.group("name"),
                computation=computation,
                shapes=shapes,
                bytes=sum(_nbytes(*s) for s in shapes),
                replica_groups=groups.group(1) if groups else "",
            )
        )
    return out


def summary(colls: list[Collective]) -> dict[str, tuple[int, int]]:
    """``{kind: (count, bytes)}`` over a list of collectives (each appearance counted once)."""
    out: dict[str, tuple[int, int]] = {}
    for c in colls:
        n, b = out.get(c.kind, (0, 0))
        out[c.kind] = (n + 1, b + c.bytes)
    return out
