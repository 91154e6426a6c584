"""Reading compiled HLO text: its computations and instructions, and the collectives it runs.

``compiled.as_text()`` (TPU, GPU or CPU) lists computations; each instruction reads
``%name = SHAPE opcode(%operand, ...), attr=..., ...``. :func:`parse_module` gives them as
:class:`Computation` / :class:`Instruction` objects (the loop-aware cost walk of ``meljax plan``,
:mod:`meljax.plan.hlo_cost`, reads them). ``collectives(text)`` lists every collective
instruction (``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``,
``ragged-all-to-all``, ``collective-permute``, ``collective-broadcast``, and their async
``-start`` forms; ``-done`` halves are skipped so nothing counts twice), once per appearance in
the program text: a collective inside a loop body (layer scan, micro-batches) runs once per
iteration, which ``computation`` lets a caller tell apart (``meljax.plan.hlo_cost`` applies the
trip counts).

    from meljax.plan import hlo
    for c in hlo.collectives(compiled.as_text()):
        print(c.kind, c.shapes, c.bytes, c.computation)
    hlo.summary(hlo.collectives(text))  # {"all-gather": (count, bytes), ...}
"""

from __future__ import annotations

import dataclasses
import math
import re

# bytes per element (4-bit types count half a byte)
DTYPE_BYTES = {"s4": 0.5, "u4": 0.5, "c64": 8, "c128": 16}
DTYPE_BYTES |= {t: 1 for t in ("pred", "s8", "u8", "f8e4m3", "f8e4m3fn", "f8e4m3fnuz")}
DTYPE_BYTES |= {t: 1 for t in ("f8e5m2", "f8e5m2fnuz")}
DTYPE_BYTES |= {t: 2 for t in ("s16", "u16", "f16", "bf16")}
DTYPE_BYTES |= {t: 4 for t in ("s32", "u32", "f32")}
DTYPE_BYTES |= {t: 8 for t in ("s64", "u64", "f64")}
KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # result shape text, e.g. "bf16[8,128]{1,0}" or a tuple "(f32[], s32[2])"
    opcode: str
    operands: list[str]  # operand instruction names
    literal: str  # the raw text between the opcode's parentheses (a constant's value)
    attrs: str  # everything after the operand list

    def attr(self, key: str) -> str | None:
        """The value of ``key=...`` (up to the next top-level comma), or ``None``."""
        m = re.search(rf"(?:^|[ ,]){re.escape(key)}=", self.attrs)
        if not m:
            return None
        return _balanced_prefix(self.attrs[m.end() :], stop=",").strip()

    def called(self, key: str) -> list[str]:
        """Computation names in ``key=%c`` or ``key={%a, %b}``."""
        return re.findall(r"%?([\w.\-]+)", self.attr(key) or "")


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    root: str
    is_entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}


def _balanced_prefix(text: str, stop: str) -> str:
    """``text`` up to the first ``stop`` character outside brackets / quotes (or up to an
    unmatched closing bracket)."""
    depth, quote = 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            quote = not quote
        elif quote:
            continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return text[:i]
        elif ch in stop and depth == 0:
            return text[:i]
    return text


def _split_instruction(rest: str) -> tuple[str, str, str, str] | None:
    """``SHAPE opcode(operands), attrs`` -> (shape, opcode, operand text, attrs)."""
    if rest.startswith("("):  # tuple shape
        shape = "(" + _balanced_prefix(rest[1:], stop="") + ")"
    else:
        shape = _balanced_prefix(rest, stop=" ")
    tail = rest[len(shape) :].lstrip()
    m = re.match(r"([\w\-]+)\(", tail)
    if not m:
        return None
    body = _balanced_prefix(tail[m.end() :], stop="")
    attrs = tail[m.end() + len(body) + 1 :].lstrip(", ")
    return shape, m.group(1), body, attrs


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """All computations of an HLO module text, and the name of the entry computation."""
    comps: dict[str, Computation] = {}
    entry = ""
    current: list[Instruction] | None = None
    name, is_entry, root = "", False, ""
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                name, is_entry, current, root = m.group(2), bool(m.group(1)), [], ""
            continue
        if line.strip() == "}":  # a closing brace alone (attributes may span lines)
            root = root or (current[-1].name if current else "")
            comps[name] = Computation(name, current, root, is_entry)
            if is_entry:
                entry = name
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        parts = _split_instruction(m.group(3))
        if parts is None:
            continue
        shape, opcode, body, attrs = parts
        names = re.findall(r"%([\w.\-]+)", body)
        current.append(Instruction(m.group(2), shape, opcode, names, body, attrs))
        if m.group(1):
            root = m.group(2)
    if not entry and comps:
        entry = list(comps)[-1]
    return comps, entry


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array in a shape text (tuples flattened)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def shape_bytes(shape: str) -> int:
    """Bytes of a shape text (all tuple elements)."""
    return int(sum(DTYPE_BYTES[t] * math.prod(d) for t, d in arrays(shape)))


def _elements(shape: str) -> int:
    return sum(math.prod(d) for _, d in arrays(shape))


# ------------------------------------------------------------------------------ collectives


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
      operand_bytes: total bytes of its inputs (larger than ``bytes`` for a reduce-scatter).
      op_name: the JAX operation it came from (metadata), when present.
    """

    kind: str
    name: str
    computation: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bytes: int
    replica_groups: str = ""
    operand_bytes: int = 0
    op_name: str = ""

    @property
    def largest(self) -> tuple[str, tuple[int, ...]]:
        """The biggest array it produces."""
        return max(self.shapes, key=lambda s: _nbytes(*s))

    @property
    def group_size(self) -> int | None:
        """Devices per replica group, from any of XLA's three ``replica_groups`` spellings."""
        text = self.replica_groups
        if text.startswith("mesh["):  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}
            sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", text)}
            used = re.search(r"\]\s*\{([^}]*)\}", text)
            axes = re.findall(r"'(\w+)'", used.group(1)) if used else list(sizes)
            return math.prod(sizes[a] for a in axes if a in sizes)
        m = re.match(r"\[(\d+),(\d+)\]<=", text)  # iota: [num_groups, group_size]<=[N]
        if m:
            return int(m.group(2))
        m = re.match(r"\{\{([^}]*)\}", text)  # explicit groups {{0,1,2,3},{...}}
        if m:
            return len(re.findall(r"\d+", m.group(1)))
        return None


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return int(DTYPE_BYTES.get(dtype, 4) * math.prod(dims))


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


def _outputs(kind: str, is_start: bool, shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Arrays a collective produces. An async all-gather / collective-permute / all-to-all
    ``-start`` returns ``(operands, outputs[, context])``: keep the outputs only."""
    found = arrays(shape)
    if not is_start or kind in ("all-reduce", "reduce-scatter"):
        return found
    inner = shape.strip()
    if inner.startswith("(") and inner.endswith(")"):
        parts = _split_top(inner[1:-1])
        if len(parts) >= 2:
            return arrays(parts[1])
    return found


def collective_of(instr: Instruction, comp: Computation) -> Collective | None:
    """The :class:`Collective` an instruction is, or ``None``."""
    kind = instr.opcode.removesuffix("-start")
    if kind not in KINDS:
        return None
    shapes = tuple(_outputs(kind, instr.opcode.endswith("-start"), instr.shape))
    inline = arrays(instr.literal)  # operands printed with their shapes (CPU / GPU text)
    operands = inline or [
        a for n in instr.operands if n in comp.by_name for a in arrays(comp.by_name[n].shape)
    ]
    m = re.search(r'op_name="([^"]*)"', instr.attrs)
    return Collective(
        kind=kind,
        name=instr.name,
        computation=comp.name,
        shapes=shapes,
        bytes=sum(_nbytes(*s) for s in shapes),
        replica_groups=instr.attr("replica_groups") or "",
        operand_bytes=sum(_nbytes(*s) for s in operands),
        op_name=m.group(1) if m else "",
    )


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an HLO module's text (``compiled.as_text()``), in program order."""
    comps, _ = parse_module(hlo_text)
    out = []
    for comp in comps.values():
        for instr in comp.instructions:
            c = collective_of(instr, comp)
            if c is not None:
                out.append(c)
    return out


def summary(colls: list[Collective]) -> dict[str, tuple[int, int]]:
    """``{kind: (count, bytes)}`` over a list of collectives (each appearance counted once)."""
    out: dict[str, tuple[int, int]] = {}
    for c in colls:
        n, b = out.get(c.kind, (0, 0))
        out[c.kind] = (n + 1, b + c.bytes)
    return out
