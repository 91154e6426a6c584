"""FLOPs, HBM bytes and collectives of one call of a compiled program, loop trip counts applied.

XLA's ``cost_analysis()`` counts the body of every ``while`` loop ONCE, whatever its trip count,
so a scanned update (micro-batches, log-prob chunks, scanned layers) or a decode loop is
under-counted by its trip count. This walk over the HLO text (:mod:`meljax.plan.hlo`) weights every
computation by how often it runs:

- a ``while`` whose condition compares its counter with a constant (``lax.scan``,
  ``fori_loop``) runs that many times (XLA's ``known_trip_count`` is used when present); a loop
  whose end depends on data (the sampler's decode loop) runs ``dynamic_trip_count`` times, an
  upper bound the caller gives (e.g. the new-token limit);
- of a ``conditional``'s branches only the costliest is counted (an upper bound);
- fusions and called computations run as often as their caller.

FLOPs are those of ``dot`` and ``convolution`` (XLA:TPU writes batched matmuls as convolutions
with padded windows; only taps on real data count, as in XLA). HBM bytes are the operands and
results of every unfused instruction, with slices and in-place updates charged only what they
touch; a fusion's operand that is only sliced (directly, through a bitcast, or in a nested
fusion: XLA:TPU fuses a scanned layer's slice of a stacked weight or KV cache that way) is
charged its slices. :func:`program_cost` gives both once per loop body and with trip counts,
so a caller can scale ``cost_analysis()`` by their ratio. On TPU a reduce-scatter is a fusion
``all-reduce-scatter*`` around an ``all-reduce`` + ``dynamic-slice``; it is reported as
``reduce-scatter``.

Loop trip counts are read by :func:`meljax.plan.hlo_loops.trip_count`.
"""

from __future__ import annotations

import dataclasses
import math
import re

from meljax.plan.hlo import (
    Collective,
    Computation,
    Instruction,
    arrays,
    collective_of,
    parse_module,
    shape_bytes,
)
from meljax.plan.hlo_loops import trip_count

# opcodes that move no HBM bytes of their own (containers, views, bookkeeping)
_NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "copy-done",
    "all-gather-done",
    "all-reduce-done",
    "collective-permute-done",
    "async-done",
    "async-update",
}
_SLICING = {"dynamic-slice", "slice", "gather"}  # read only what they return
_UPDATING = {"dynamic-update-slice", "scatter"}  # in place: write only the update
_REDUCERS = {"reduce", "all-reduce", "reduce-window", "scatter", "sort", "map", "reduce-scatter"}


def _elements(shape: str) -> int:
    return sum(math.prod(d) for _, d in arrays(shape))


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# ------------------------------------------------------------------------------ collectives


@dataclasses.dataclass(frozen=True)
class CollectiveRun:
    """A collective with what it moves per device and how often it runs per program call.

    Attributes:
      kind: its kind; an ``all-reduce`` inside an XLA:TPU ``all-reduce-scatter`` fusion is a
        ``reduce-scatter``.
      dtype, shape: its largest array (the gathered result, or the full input of a reduction).
      bytes: the full array it moves (the larger of its inputs and outputs).
      count: runs per program call (loop trip counts applied).
      group_size: devices per replica group (``None`` when not parsed).
      collective: the instruction (:class:`meljax.plan.hlo.Collective`).
    """

    kind: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    count: float
    group_size: int | None
    collective: Collective

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per run (ring algorithms): ``(n-1)/n`` of the array for
        all-gather, reduce-scatter and all-to-all, twice that for all-reduce, all of it for a
        permute or broadcast."""
        n = self.group_size or 2
        share = (n - 1) / n
        factor = {"all-reduce": 2 * share, "collective-permute": 1.0}.get(self.kind, share)
        factor = 1.0 if self.kind == "collective-broadcast" else factor
        return self.bytes * factor

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.count

    def describe(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        times = f" x{self.count:g}" if self.count != 1 else ""
        group = f" over {self.group_size}" if self.group_size else ""
        return f"{self.kind} {self.dtype}[{dims}]{group}{times}"


def _fused_params(comp: Computation) -> dict[int, str]:
    """Parameter index -> name in a fused computation."""
    return {
        int(i.literal): i.name
        for i in comp.instructions
        if i.opcode == "parameter" and i.literal.strip().isdigit()
    }


def _run(instr: Instruction, comp: Computation) -> CollectiveRun | None:
    c = collective_of(instr, comp)
    if c is None:
        return None
    kind = c.kind
    if kind == "all-reduce" and comp.name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
    operand_arrays = arrays(instr.literal) or [
        a for n in instr.operands if n in comp.by_name for a in arrays(comp.by_name[n].shape)
    ]
    candidates = list(c.shapes) + operand_arrays
    if not candidates:
        return None
    dtype, dims = max(candidates, key=lambda a: shape_bytes(f"{a[0]}[{','.join(map(str, a[1]))}]"))
    return CollectiveRun(
        kind=kind,
        dtype=dtype,
        shape=dims,
        bytes=max(c.bytes, c.operand_bytes),
        count=1.0,
        group_size=c.group_size,
        collective=c,
    )


# ------------------------------------------------------------------------------ convolutions


def _window(text: str) -> list[dict[str, tuple[int, ...]]]:
    """``{size=1x4 pad=0_0x3_3 stride=..}`` -> one dict per spatial dimension."""
    fields = dict(re.findall(r"(\w+)=([\d_x]+)", text))
    n = len(fields.get("size", "").split("x")) if "size" in fields else 0
    out: list[dict[str, tuple[int, ...]]] = [{} for _ in range(n)]
    for key, value in fields.items():
        for d, part in enumerate(value.split("x")[:n]):
            out[d][key] = tuple(int(x) for x in part.split("_"))
    return out


def _valid_taps(out_size: int, in_size: int, taps: int, w: dict) -> int:
    """Sum over the outputs along one spatial dimension of the window taps that read a real
    input element (padding and base-dilation holes excluded)."""
    lo = w.get("pad", (0, 0))[0]
    stride = w.get("stride", (1,))[0]
    rhs_dilate = w.get("rhs_dilate", (1,))[0]
    lhs_dilate = w.get("lhs_dilate", (1,))[0]
    span = (in_size - 1) * lhs_dilate + 1  # input extent in dilated coordinates
    total = 0
    for k in range(taps):
        # outputs o with 0 <= o * stride + k * rhs_dilate - lo < span
        first = max(0, -(-(lo - k * rhs_dilate) // stride))
        last = min(out_size - 1, (span - 1 + lo - k * rhs_dilate) // stride)
        if last >= first:
            count = last - first + 1
            if lhs_dilate > 1:  # only positions on the dilation grid hold data
                count = max(1, count // lhs_dilate)
            total += count
    return total


# ------------------------------------------------------------------------------ the walk


@dataclasses.dataclass
class ProgramCost:
    """FLOPs and HBM bytes of one program call (per device), from its HLO text.

    ``*_once`` count every loop body once (as XLA's ``cost_analysis()`` does); the others
    apply the trip counts. ``dynamic_loops`` is the number of loops whose end depends on data
    (counted ``dynamic_trip_count`` times).
    """

    flops: float
    bytes: float
    flops_once: float
    bytes_once: float
    dynamic_loops: int
    collectives: list[CollectiveRun]


class _Walker:
    def __init__(self, text: str, dynamic_trip_count: float):
        self.comps, self.entry = parse_module(text)
        self.dynamic = dynamic_trip_count
        self.dynamic_loops: set[str] = set()
        self.memo: dict[tuple[str, bool], tuple[float, float, list]] = {}

    def dot_flops(self, instr: Instruction, comp: Computation) -> float:
        out = _elements(instr.shape)
        if instr.opcode == "dot":
            lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
            dims = arrays(lhs.shape)[0][1] if lhs is not None and arrays(lhs.shape) else ()
            contract = _ints(instr.attr("lhs_contracting_dims") or "")
            return 2.0 * out * math.prod(dims[i] for i in contract if i < len(dims))
        # convolution: each output element sums rhs[input feature] x the window taps that
        # land on real (not padding) input elements; XLA:TPU writes batched matmuls this way
        lhs, rhs = (comp.by_name.get(n) for n in (instr.operands + ["", ""])[:2])
        labels = re.match(r"(\w+)_(\w+)->(\w+)", instr.attr("dim_labels") or "")
        if lhs is None or rhs is None or not labels or not arrays(lhs.shape):
            return 0.0
        lhs_dims, rhs_dims = arrays(lhs.shape)[0][1], arrays(rhs.shape)[0][1]
        out_dims = arrays(instr.shape)[0][1] if arrays(instr.shape) else ()
        lhs_l, rhs_l, out_l = labels.groups()
        features = rhs_dims[rhs_l.index("i")] if "i" in rhs_l else 1
        window = _window(instr.attr("window") or "")
        flops = 2.0 * features
        for d, size in enumerate(out_dims):
            label = out_l[d] if d < len(out_l) else ""
            if not label.isdigit():
                flops *= size
                continue
            sp = int(label)
            w = window[sp] if sp < len(window) else {}
            taps = rhs_dims[rhs_l.index(label)] if label in rhs_l else 1
            flops *= _valid_taps(size, lhs_dims[lhs_l.index(label)], taps, w)
        return flops

    def traffic(self, instr: Instruction, comp: Computation) -> float:
        """HBM bytes an unfused instruction reads and writes. Like XLA's cost analysis, a
        (dynamic) slice reads only its slice and an in-place update writes only the update;
        inside a fusion, a parameter only sliced costs its slices, one only updated in place
        costs nothing beyond the update."""
        operands = [comp.by_name[n] for n in instr.operands if n in comp.by_name]
        op = instr.opcode
        if op in _SLICING:
            return 2.0 * shape_bytes(instr.shape)
        if op in _UPDATING:
            return 2.0 * shape_bytes(operands[1].shape) if len(operands) > 1 else 0.0
        out = shape_bytes(instr.shape)
        reads = [shape_bytes(o.shape) for o in operands]
        names = instr.called("calls") if op == "fusion" else []
        fused = self.comps.get(names[0]) if names else None
        if fused is not None:
            for index, pname in _fused_params(fused).items():
                if index >= len(reads):
                    continue
                users = [i for i in fused.instructions if pname in i.operands]
                sliced = self.sliced_bytes(fused, pname)
                if sliced is not None:
                    reads[index] = sliced
                elif users and all(u.opcode in _UPDATING and u.operands[0] == pname for u in users):
                    reads[index] = 0.0
                    update = fused.by_name.get(users[0].operands[1])
                    written = shape_bytes(update.shape) if update is not None else 0
                    out -= shape_bytes(fused.by_name[pname].shape) - written
        return max(out, 0.0) + sum(reads)

    def sliced_bytes(self, comp: Computation, name: str, depth: int = 0) -> float | None:
        """Bytes read of value ``name`` of fused computation ``comp`` when every use of it only
        slices it, directly, through a bitcast or inside a nested fusion (XLA:TPU fuses the
        per-layer ``dynamic-slice`` of a stacked weight or KV cache into a nested loop fusion of
        the matmul's fusion); ``None`` when some use reads it whole."""
        users = [i for i in comp.instructions if name in i.operands]
        if not users or depth > 8:
            return None
        total = 0.0
        for user in users:
            if user.opcode in _SLICING and user.operands[0] == name:
                total += shape_bytes(user.shape)
                continue
            got = None
            if user.opcode == "bitcast":
                got = self.sliced_bytes(comp, user.name, depth + 1)
            elif user.opcode == "fusion" and user.operands.count(name) == 1:
                inner = self.comps.get((user.called("calls") or [""])[0])
                param = _fused_params(inner).get(user.operands.index(name)) if inner else None
                got = self.sliced_bytes(inner, param, depth + 1) if param else None
            if got is None:
                return None
            total += got
        return total

    def cost(self, name: str, loops: bool, fused: bool = False) -> tuple[float, float, list]:
        """``(flops, bytes, [(collective, count)])`` of one run of computation ``name``."""
        key = (name, loops, fused)
        if key in self.memo:
            return self.memo[key]
        comp = self.comps.get(name)
        flops, nbytes, colls = 0.0, 0.0, []
        if comp is None:
            return flops, nbytes, colls
        self.memo[key] = (0.0, 0.0, [])  # guards against (malformed) recursion
        for instr in comp.instructions:
            op = instr.opcode
            if op in ("dot", "convolution"):
                flops += self.dot_flops(instr, comp)
            run = _run(instr, comp)
            if run is not None:
                colls.append((run, 1.0))
            if not fused and op not in _NO_TRAFFIC:
                nbytes += self.traffic(instr, comp)
            if op == "while":
                trips = 1.0
                if loops:
                    n = trip_count(instr, comp, self.comps)
                    if n is None:
                        self.dynamic_loops.add(instr.name)
                        n = self.dynamic
                    trips = float(n)
                for sub in instr.called("body"):
                    f, b, c = self.cost(sub, loops)
                    flops, nbytes = flops + trips * f, nbytes + trips * b
                    colls += [(x, k * trips) for x, k in c]
            elif op == "conditional":
                branches = instr.called("branch_computations") or (
                    instr.called("true_computation") + instr.called("false_computation")
                )
                costs = [self.cost(sub, loops) for sub in branches]
                if costs:
                    f, b, c = max(costs, key=lambda x: (x[0], x[1]))
                    flops, nbytes, colls = flops + f, nbytes + b, colls + c
            else:
                inner = op in ("fusion",) or fused
                for key_name in ("calls", "to_apply"):
                    if op in _REDUCERS:
                        break  # scalar reducers
                    for sub in instr.called(key_name):
                        f, b, c = self.cost(sub, loops, fused=inner)
                        flops, nbytes, colls = flops + f, nbytes + b, colls + c
        self.memo[key] = (flops, nbytes, colls)
        return self.memo[key]


def program_cost(text: str, dynamic_trip_count: float = 1) -> ProgramCost:
    """FLOPs, HBM bytes and collectives of one call of a compiled program (per device)."""
    walker = _Walker(text, dynamic_trip_count)
    flops, nbytes, colls = walker.cost(walker.entry, loops=True)
    flops_once, bytes_once, _ = walker.cost(walker.entry, loops=False)
    merged = [dataclasses.replace(c, count=k) for c, k in colls]
    return ProgramCost(
        flops=flops,
        bytes=nbytes,
        flops_once=flops_once,
        bytes_once=bytes_once,
        dynamic_loops=len(walker.dynamic_loops),
        collectives=merged,
    )


def collective_runs(hlo_text: str, dynamic_trip_count: float = 1) -> list[CollectiveRun]:
    """Every collective of a compiled program with its per-call run count, largest total
    bytes first."""
    found = program_cost(hlo_text, dynamic_trip_count).collectives
    return sorted(found, key=lambda c: -c.total_bytes)
