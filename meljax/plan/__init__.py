"""``meljax plan``: will a run fit, and how fast can it go, on a TPU slice it has never seen?

:func:`plan` builds the run's model and training state abstractly (no weights, nothing
allocated), lays them out on the config's mesh over the target's devices (a TPU topology
compiled with libtpu on this host, or simulated CPU devices), compiles every program the run
launches at its worst-case shapes (:mod:`meljax.plan.programs`) and measures each
(:mod:`meljax.plan.analysis`)::

    from meljax.plan import plan
    report = plan(cfg, "v5p-64")
    print(report.table())
    report.fits  # False when any program exceeds the device memory
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meljax.plan.targets import CHIPS, TARGET_HELP, Chip, Target, prepare_process, resolve_target

if TYPE_CHECKING:  # the compile machinery is imported when a plan runs, not with the package
    import ml_collections

    from meljax.plan.analysis import ProgramReport

GIB = 2**30


@dataclasses.dataclass
class PlanReport:
    """A plan's findings; ``table()`` for people, ``to_json()`` for scripts."""

    target: Target
    mesh: dict[str, int]
    model: dict[str, Any]
    resident: dict[str, int]
    programs: list[ProgramReport]
    capacity: float

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def problems(self) -> list[str]:
        """One message per program that does not fit (or is tight), naming what to change."""
        out = []
        for p in self.programs:
            need = f"{p.total / GIB:.1f} GiB of {self.capacity / GIB:.1f} GiB per device"
            if p.status == "over":
                out.append(f"{p.name} does not fit: needs {need} ({p.shapes}). To fit: {p.fix}.")
            elif p.status == "tight":
                out.append(
                    f"warning: {p.name} leaves only {100 * p.headroom:.0f}% headroom ({need}); "
                    f"below 10% one more buffer may not fit. "
                    f"Room to gain: {p.fix}."
                )
        return out

    def to_json(self) -> dict[str, Any]:
        t = self.target
        return {
            "target": {
                "name": t.name,
                "platform": t.platform,
                "topology": t.topology,
                "chips": t.chips,
                "devices": len(t.devices),
                "device_memory_bytes": self.capacity,
                "chip": dataclasses.asdict(t.chip),
            },
            "mesh": self.mesh,
            "model": self.model,
            "resident_bytes_per_device": self.resident,
            "programs": [dataclasses.asdict(p) | {"fits": p.fits} for p in self.programs],
            "fits": self.fits,
            "problems": self.problems(),
        }

    def table(self) -> str:
        t, m = self.target, self.model
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"target: {t.name} ({t.topology}, {t.chips} chips, {len(t.devices)} devices, "
            f"{self.capacity / GIB:.2f} GiB per device)",
            f"model: {m['source']}; {m['params'] / 1e6:,.1f}M params, compute {m['dtype']}, "
            f"master weights + Adam {m['master_dtype']}; mesh {mesh}",
            "resident per device: "
            + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in self.resident.items()),
            "",
        ]
        head = (
            f"{'program':<17}{'args':>8}{'temp':>8}{'out':>7}{'resid':>7}{'total':>8}"
            f"{'free':>7}{'TFLOP':>9}{'HBM GB':>9}{'coll GB':>9}{'est s':>9}  bound"
        )
        lines += [head + "   (memory in GiB per device; work per device and call)", "-" * 108]
        for p in self.programs:

            def gib(x):
                return f"{x / GIB:.1f}"

            est = f"{p.estimate_s:.3f}" if p.estimate_s is not None else "-"
            flag = {"over": "  <- DOES NOT FIT", "tight": "  <- under 10% free"}.get(p.status, "")
            lines.append(
                f"{p.name:<17}{gib(p.arguments):>8}{gib(p.temporaries):>8}{gib(p.outputs):>7}"
                f"{gib(p.resident):>7}{gib(p.total):>8}{100 * p.headroom:>6.0f}%"
                f"{p.flops / 1e12:>9.2f}{p.hbm_bytes / 1e9:>9.1f}{p.collective_bytes / 1e9:>9.1f}"
                f"{est:>9}  {p.bound}{flag}"
            )
        lines.append("")
        for p in self.programs:
            lines.append(f"{p.name}: {p.shapes} (compiled in {p.compile_s:.0f} s)")
            if p.error:
                lines.append(f"  compiler: {p.error}")
            if p.dynamic_loops:
                lines.append("  decode loop costed at its new-token limit (no early stop)")
            for c in p.collectives:
                lines.append(f"  {c['what']}: {c['total_bytes'] / 1e9:.2f} GB")
        problems = self.problems()
        if problems:
            lines += [""] + problems
        return "\n".join(lines)


def plan(
    cfg: ml_collections.ConfigDict,
    topology: str,
    *,
    programs: Sequence[str] | None = None,
    model_config: str | None = None,
    capacity_gib: float | None = None,
    progress: Callable[[str], None] | None = None,
    dump_dir: str | None = None,
) -> PlanReport:
    """Compiles every program of the run ``cfg`` for ``topology`` and measures it.

    Args:
      cfg: a run config (``configs/*.py`` with overrides).
      topology: ``v5p-64``, ``v6e-32``, ``v5e-16`` ..., a libtpu name (``v5p:2x4x4``) or
        ``cpu:N`` (see ``TARGET_HELP``).
      programs: only these programs (names as in the report, or their prefix: ``rollout``
        selects ``rollout_weights``, ``rollout_prefill``, ...); default all.
      model_config: a ``config.json`` (file or folder) overriding ``cfg.model.path``.
      capacity_gib: device memory to plan against instead of the chip's.
      progress: called with a line before and after each compile.
      dump_dir: write each compiled program's HLO text there (``<name>.hlo.txt``).
    """
    from meljax.config.settings import validate
    from meljax.plan.analysis import analyse
    from meljax.plan.architectures import resolve_model_config
    from meljax.plan.programs import build_run_model, run_programs
    from meljax.runtime import sharding as shd

    target = resolve_target(topology)
    validate(cfg, len(target.devices))
    mesh = shd.make_mesh(
        {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor},
        devices=list(target.devices),
    )
    model_cfg, source = resolve_model_config(cfg, model_config)
    run = build_run_model(cfg, mesh, model_cfg, source)
    found = run_programs(cfg, mesh, run)
    if programs:  # a name also selects its parts: ``rollout`` -> ``rollout_prefill`` ...

        def selects(query: str, name: str) -> bool:
            return name == query or name.startswith(query + "_")

        names = [p.name for p in found]
        unknown = sorted(q for q in programs if not any(selects(q, n) for n in names))
        if unknown:
            raise ValueError(f"unknown program(s) {unknown}; this run launches {names}")
        found = [p for p in found if any(selects(q, p.name) for q in programs)]
    capacity = capacity_gib * GIB if capacity_gib else target.chip.hbm_bytes
    reports = []
    for p in found:
        if progress is not None:
            progress(f"compiling {p.name}: {p.shapes}")
        r = analyse(p, target, run.resident, capacity=capacity, dump_dir=dump_dir)
        reports.append(r)
        if progress is not None:
            est = f", roofline {r.estimate_s:.3g} s ({r.bound})" if r.estimate_s else ""
            progress(
                f"  {r.name}: {r.total / GIB:.1f} GiB per device, {100 * r.headroom:.0f}% free"
                f"{est}, compiled in {r.compile_s:.0f} s"
            )
    return PlanReport(
        target=target,
        mesh=dict(mesh.shape),
        model={
            "source": source,
            "params": model_cfg.num_params,
            "layers": model_cfg.num_layers,
            "dtype": str(cfg.model.dtype),
            "param_dtype": str(cfg.model.param_dtype),
            "master_dtype": str(cfg.optim.master_dtype),
        },
        resident=run.resident,
        programs=reports,
        capacity=capacity,
    )


__all__ = [
    "CHIPS",
    "TARGET_HELP",
    "Chip",
    "PlanReport",
    "Target",
    "plan",
    "prepare_process",
    "resolve_target",
]
