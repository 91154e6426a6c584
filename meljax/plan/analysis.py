"""Compiles one program and measures it: per-device memory, FLOPs and bytes, collectives, and a
roofline estimate of its run time."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

from meljax.plan import hlo_cost
from meljax.plan.programs import Program
from meljax.plan.targets import Target

TIGHT_HEADROOM = 0.10  # below this a program "fits" but one allocation more may not


@dataclasses.dataclass
class ProgramReport:
    """What one compiled program needs per device (bytes unless said otherwise).

    Attributes:
      name, shapes, fix: from the :class:`~meljax.plan.programs.Program`.
      status: ``ok``, ``tight`` (headroom below 10%), ``over`` (does not fit) or ``error``
        (did not compile for another reason; see ``error``).
      arguments, outputs, aliased, temporaries, code: XLA's ``memory_analysis()``.
      resident: the run's long-lived buffers that are not arguments (optimizer state, the
        reference weights) but occupy the device while this program runs.
      total: ``arguments + outputs - aliased + temporaries + code + resident``.
      capacity: device memory; headroom: ``1 - total / capacity``.
      flops, hbm_bytes: per device and call, loop trip counts applied (``cost_analysis()``
        scaled by the HLO walk of :mod:`meljax.plan.hlo_cost`); ``xla_flops`` / ``xla_bytes`` are
        ``cost_analysis()`` as reported (loop bodies counted once).
      collective_bytes: bytes moved by collectives per device and call (array sizes x runs);
        collectives: the largest ones.
      compute_s, memory_s, ici_s: ``flops / peak``, ``hbm_bytes / HBM bandwidth``, wire bytes /
        ICI bandwidth (all links); estimate_s: their max (perfect overlap), bound: which one.
      dynamic_loops: loops with a data-dependent end, costed at their upper bound.
      compile_s: wall time of the compile here.
    """

    name: str
    shapes: str
    fix: str
    status: str
    error: str = ""
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    code: int = 0
    resident: int = 0
    total: int = 0
    capacity: float = 0.0
    headroom: float = 0.0
    flops: float = 0.0
    hbm_bytes: float = 0.0
    xla_flops: float = 0.0
    xla_bytes: float = 0.0
    collective_bytes: float = 0.0
    collectives: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    compute_s: float | None = None
    memory_s: float | None = None
    ici_s: float | None = None
    estimate_s: float | None = None
    bound: str = ""
    dynamic_loops: int = 0
    compile_s: float = 0.0

    @property
    def fits(self) -> bool:
        return self.status in ("ok", "tight")


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per device
        cost = cost[0] if cost else {}
    return dict(cost or {})


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _oom_temporaries(message: str) -> float | None:
    """Temporaries the TPU compiler asked for in a RESOURCE_EXHAUSTED message (bytes)."""
    m = _OOM.search(message)
    if not m:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def analyse(
    program: Program,
    target: Target,
    resident: dict[str, int],
    *,
    capacity: float | None = None,
    top_collectives: int = 5,
    dump_dir: str | None = None,
) -> ProgramReport:
    """Compiles ``program`` for ``target`` and measures it (see :class:`ProgramReport`); with
    ``dump_dir`` the compiled HLO is written to ``DUMP_DIR/<name>.hlo.txt``."""
    capacity = capacity if capacity is not None else target.chip.hbm_bytes
    extra = sum(resident[k] for k in program.resident_extra)
    report = ProgramReport(
        name=program.name,
        shapes=program.shapes,
        fix=program.fix,
        status="ok",
        resident=extra,
        capacity=capacity,
    )
    t0 = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except Exception as e:  # XLA reports out-of-memory as a runtime error at compile time
        report.compile_s = time.perf_counter() - t0
        message = str(e)
        temps = _oom_temporaries(message)
        if "RESOURCE_EXHAUSTED" in message and temps is not None:
            report.status = "over"
            report.temporaries = int(temps)
            report.total = int(temps) + extra
            report.headroom = 1 - report.total / capacity
            report.error = message.strip().splitlines()[0][:300]
            return report
        raise
    report.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    report.arguments = int(mem.argument_size_in_bytes)
    report.outputs = int(mem.output_size_in_bytes)
    report.aliased = int(mem.alias_size_in_bytes)
    report.temporaries = int(mem.temp_size_in_bytes)
    report.code = int(mem.generated_code_size_in_bytes)
    report.total = (
        report.arguments
        + report.outputs
        - report.aliased
        + report.temporaries
        + report.code
        + extra
    )
    report.headroom = 1 - report.total / capacity
    if report.headroom < 0:
        report.status = "over"
    elif report.headroom < TIGHT_HEADROOM:
        report.status = "tight"

    text = compiled.as_text()
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{program.name}.hlo.txt"), "w") as f:
            f.write(text)
    cost = _cost(compiled)
    walk = hlo_cost.program_cost(text, program.dynamic_trip_count)
    report.xla_flops = float(cost.get("flops", 0.0))
    report.xla_bytes = float(cost.get("bytes accessed", 0.0))
    # XLA counts every loop body once; scale by the trip-count-weighted HLO walk
    report.flops = report.xla_flops * (walk.flops / walk.flops_once if walk.flops_once else 1.0)
    report.hbm_bytes = report.xla_bytes * (walk.bytes / walk.bytes_once if walk.bytes_once else 1.0)
    report.dynamic_loops = walk.dynamic_loops
    colls = sorted(walk.collectives, key=lambda c: -c.total_bytes)
    report.collective_bytes = sum(c.total_bytes for c in colls)
    report.collectives = [
        {
            "kind": c.kind,
            "dtype": c.dtype,
            "shape": list(c.shape),
            "bytes": c.bytes,
            "count": c.count,
            "group_size": c.group_size,
            "total_bytes": c.total_bytes,
            "what": c.describe(),
        }
        for c in colls[:top_collectives]
    ]
    chip = target.chip
    per_device = chip.devices_per_chip
    if chip.peak_flops and chip.hbm_bandwidth and chip.ici_bandwidth:
        report.compute_s = report.flops / (chip.peak_flops / per_device)
        report.memory_s = report.hbm_bytes / (chip.hbm_bandwidth / per_device)
        wire = sum(c.wire_bytes * c.count for c in colls)
        report.ici_s = wire / (chip.ici_bandwidth / per_device)
        terms = {"compute": report.compute_s, "HBM": report.memory_s, "ICI": report.ici_s}
        report.bound = max(terms, key=terms.get)
        report.estimate_s = terms[report.bound]
    return report
