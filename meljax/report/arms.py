"""Arms of several seeds compared by seed: ``meljax compare --arm grpo=D1,D2 --arm mel=D3,D4``.

An *arm* is a group of runs of one algorithm that differ by their seed (``config.json``'s
``seed``). Arms come from ``--arm NAME=DIR,DIR,...`` or, for plain run folders, from the runs'
algorithm labels (:func:`group_by_algorithm`). Two arms are compared seed by seed: a seed
present in one arm only (or twice in one arm, or without a held-out evaluation) is reported
and left out of the paired figures.

The held-out difference of two arms and its three 95% intervals (B minus A, A the first arm)
are :mod:`meljax.report.paired`'s; :func:`compare_arms` pairs the runs and collects the cells.

Per arm (:func:`arm_row`; mean and sample standard deviation over its runs): the last held-out
accuracy, the gain from step 0 (``meljax.report.heldout.gain_for``, for runs evaluated at
step 0), the retention ratio, kept / generated meta-experiences (summed), the NLL share of the
loss, ``train/mel_rows`` per step and the steady step time (median ``time/step`` after the
first timed step, whose time includes compilation).

The NLL share of a step is ``lambda * L_NLL / (|L_policy| + lambda * L_NLL)`` from
``train/mel_nll``, ``train/policy_loss`` (``train/loss`` minus the NLL term when absent) and
``mel.lambda_mel`` of ``config.json``, averaged over the steps that log both. The absolute
value: GRPO's surrogate loss is near zero and of either sign (the advantages have zero mean
in each group), so ``lambda * L_NLL / L`` would divide by a number near zero. For the same
reason the share reads close to 1 on a step with kept rows and 0 on a step without: it
measures the loss value, not the gradient. Runs that log no ``train/mel_nll`` (GRPO) have
none.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from meljax.evaluation.stats import mean
from meljax.report.heldout import AVERAGE, HeldOut, before_after, gain_for
from meljax.report.paired import paired_difference, t_quantile  # t_quantile: re-exported
from meljax.report.run_report import retention_series, series, summarize

if TYPE_CHECKING:
    from meljax.report.compare import Run

__all__ = [
    "Arm",
    "arm_row",
    "arms_markdown",
    "arms_text",
    "compare_arms",
    "group_by_algorithm",
    "paired_difference",
    "parse_arm",
    "t_quantile",
]

# -- arms


@dataclasses.dataclass
class Arm:
    """A named group of runs, one per seed."""

    name: str
    runs: list[Run]


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """``"grpo=DIR1,DIR2"`` -> ``("grpo", ["DIR1", "DIR2"])``."""
    name, sep, dirs = spec.partition("=")
    folders = [d.strip() for d in dirs.split(",") if d.strip()]
    if not sep or not name.strip() or not folders:
        raise ValueError(f"--arm {spec!r}: expected NAME=DIR[,DIR...], e.g. grpo=runs/g0,runs/g1")
    return name.strip(), folders


def group_by_algorithm(runs: Sequence[Run]) -> list[Arm]:
    """Runs grouped by their algorithm label (``"grpo"``, ``"grpo+mel"``...), MEL arms after
    the others, else in order of first appearance; ``[]`` unless one group has two runs (then
    single runs side by side stay what they were)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.algorithm, []).append(run)
    if all(len(g) < 2 for g in groups.values()):
        return []
    names = sorted(groups, key=lambda n: n.endswith("+mel"))  # stable: GRPO first
    return [Arm(n, groups[n]) for n in names]


def _seed(run: Run) -> Any:
    return run.config.get("seed")


def _seed_key(seed: Any) -> tuple[str, Any]:
    return (type(seed).__name__, seed)  # ints in order, then strings


def _pair_by_seed(a: Arm, b: Arm) -> tuple[list[tuple[Any, Run, Run]], list[dict[str, Any]]]:
    """``([(seed, run of a, run of b)], left out)``, seeds in ascending order."""
    left_out: list[dict[str, Any]] = []
    by_seed: list[dict[Any, Run]] = []
    for arm in (a, b):
        seen: dict[Any, list[Run]] = {}
        for run in arm.runs:
            seen.setdefault(_seed(run), []).append(run)
        mine = {}
        for seed, runs in seen.items():
            if seed is None:
                for run in runs:
                    left_out.append({"seed": None, "arm": arm.name, "run": run.label,
                                     "reason": "no seed in config.json"})  # fmt: skip
            elif len(runs) > 1:
                left_out.append({"seed": seed, "arm": arm.name, "run": ",".join(r.label for r in runs),
                                 "reason": f"seed {seed} twice in {arm.name}"})  # fmt: skip
            else:
                mine[seed] = runs[0]
        by_seed.append(mine)
    ra, rb = by_seed
    for seed in sorted(ra.keys() ^ rb.keys(), key=_seed_key):
        arm, run = (a, ra[seed]) if seed in ra else (b, rb[seed])
        other = b if arm is a else a
        left_out.append({"seed": seed, "arm": arm.name, "run": run.label,
                         "reason": f"seed {seed} only in {arm.name}, not in {other.name}"})  # fmt: skip
    pairs = [(s, ra[s], rb[s]) for s in sorted(ra.keys() & rb.keys(), key=_seed_key)]
    return pairs, left_out


def _evaluated_steps(run: Run) -> dict[int, dict[str, HeldOut]]:
    """Steps whose evaluation has per-problem records: ``{step: {benchmark: HeldOut}}``."""
    out = {}
    for step, results in run.heldout.items():
        parts = {n: h for n, h in results.items() if n != AVERAGE and h.per_problem}
        if parts:
            out[step] = parts
    return out


def _cells(a: Mapping[str, HeldOut], b: Mapping[str, HeldOut], kind: str) -> list[float]:
    """B minus A per problem both evaluated (``kind``: ``"greedy"`` or ``"sampled"``)."""
    index = 0 if kind == "greedy" else 1
    out = []
    for name in sorted(a.keys() & b.keys()):
        pa, pb = a[name].per_problem, b[name].per_problem
        for pid in sorted(pa.keys() & pb.keys()):
            va, vb = pa[pid][index], pb[pid][index]
            if va is not None and vb is not None:
                out.append(vb - va)
    return out


# -- per run and per arm


def _steady_median(records: Sequence[dict]) -> float | None:
    """Median ``time/step`` after the first timed step (compilation); that one step alone."""
    times = [x for x in series(records, "time/step") if not math.isnan(x)]
    times = times[1:] if len(times) >= 2 else times
    return statistics.median(times) if times else None


def _nll_share(run: Run) -> float | None:
    """Mean per-step ``lambda * L_NLL / (|L_policy| + lambda * L_NLL)`` (module docstring)."""
    lam = (run.config.get("mel") or {}).get("lambda_mel", 1.0)
    shares = []
    for r in run.records:
        nll = r.get("train/mel_nll")
        if not isinstance(nll, int | float) or not math.isfinite(nll):
            continue
        term = lam * nll
        policy = r.get("train/policy_loss")
        if not isinstance(policy, int | float):
            total = r.get("train/loss")
            if not isinstance(total, int | float):
                continue
            policy = total - term
        denom = abs(policy) + abs(term)
        if math.isfinite(denom) and denom > 0:
            shares.append(abs(term) / denom)
    return mean(shares)


def _finite_values(records: Sequence[dict], key: str) -> list[float]:
    return [x for x in series(records, key) if not math.isnan(x)]


def run_figures(run: Run) -> dict[str, Any]:
    """What an arm averages, for one run (``None`` where the run has no such value)."""
    s = summarize(run.records)
    first, last = before_after(run.heldout)
    rows = _finite_values(run.records, "train/mel_rows")
    out: dict[str, Any] = {
        "run": run.label,
        "seed": _seed(run),
        "eval_step": last.step if last is not None else None,
        "retention": mean([x for x in retention_series(run.records) if not math.isnan(x)]),
        "kept": s.kept_total,
        "generated": s.generated_total,
        "nll_share": _nll_share(run),
        "mel_rows_per_step": mean(rows),
        "step_time_s": _steady_median(run.records),
        "num_samples": last.num_samples if last is not None else 0,
    }
    for kind in ("greedy", "sampled"):
        e = last.get(kind) if last is not None else None
        out[f"heldout_{kind}"] = e.value if e is not None else None
        gain = None
        if first is not None and first.step == 0 and last.step != 0:
            g = gain_for(run.heldout, kind)
            gain = g.value if g is not None else None
        out[f"gain_{kind}_from_0"] = gain
    return out


def _spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    """``{"mean", "sd", "n"}`` over the values that are not ``None`` (``sd`` None for one)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"mean": mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def arm_row(arm: Arm) -> dict[str, Any]:
    """The arms-table row of ``arm`` (JSON-ready): spreads are ``{"mean", "sd", "n"}``."""
    per_run = [run_figures(r) for r in arm.runs]
    kept = [f["kept"] for f in per_run if f["kept"] is not None]
    generated = [f["generated"] for f in per_run if f["generated"] is not None]
    row: dict[str, Any] = {
        "arm": arm.name,
        "runs": [f["run"] for f in per_run],
        "seeds": [f["seed"] for f in per_run],
        "algorithms": sorted({r.algorithm for r in arm.runs}),
        "eval_steps": sorted({f["eval_step"] for f in per_run if f["eval_step"] is not None}),
        "num_samples": max((f["num_samples"] for f in per_run), default=0),
        "kept": sum(kept) if kept else None,
        "generated": sum(generated) if generated else None,
    }
    for key in ("heldout_greedy", "heldout_sampled", "gain_greedy_from_0",
                "gain_sampled_from_0", "retention", "nll_share", "mel_rows_per_step",
                "step_time_s"):  # fmt: skip
        row[key] = _spread([f[key] for f in per_run])
    row["per_run"] = per_run
    return row


def compare_arms(a: Arm, b: Arm) -> dict[str, Any]:
    """B minus A, paired by seed: the held-out difference (greedy and sampled) at the last
    evaluation both runs of a seed share, the seeds left out, and the step time."""
    pairs, left_out = _pair_by_seed(a, b)
    notes: list[str] = []
    cells: dict[str, dict[Any, list[float]]] = {"greedy": {}, "sampled": {}}
    steps: dict[str, int] = {}
    for seed, ra, rb in pairs:
        ea, eb = _evaluated_steps(ra), _evaluated_steps(rb)
        shared = sorted(ea.keys() & eb.keys())
        if not shared:
            left_out.append({"seed": seed, "arm": f"{a.name}, {b.name}", "run": f"{ra.label}, {rb.label}",
                             "reason": f"seed {seed}: no evaluation with per-problem records "
                                       "at a step both runs share"})  # fmt: skip
            continue
        step = shared[-1]
        if step != max(ea) or step != max(eb):
            notes.append(f"seed {seed}: last shared evaluation at step {step} (last: "
                         f"{a.name} {max(ea)}, {b.name} {max(eb)})")  # fmt: skip
        steps[str(seed)] = step
        for kind in cells:
            d = _cells(ea[step], eb[step], kind)
            if d:
                cells[kind][seed] = d
    ta = _spread([_steady_median(r.records) for r in a.runs])
    tb = _spread([_steady_median(r.records) for r in b.runs])
    step_time = None
    if ta is not None and tb is not None:
        extra = tb["mean"] - ta["mean"]
        pct = 100 * extra / ta["mean"] if ta["mean"] > 0 else None
        step_time = {"a_s": ta["mean"], "b_s": tb["mean"], "extra_s": extra, "extra_pct": pct}
    k = max((h.num_samples for r in (*a.runs, *b.runs) for h in _last(r)), default=0)
    return {
        "a": a.name,
        "b": b.name,
        "seeds": [s for s, *_ in pairs if str(s) in steps],
        "left_out": left_out,
        "steps": steps,
        "num_samples": k,
        "greedy": paired_difference(cells["greedy"]),
        "sampled": paired_difference(cells["sampled"]),
        "step_time": step_time,
        "notes": notes,
    }


def _last(run: Run) -> list[HeldOut]:
    _, last = before_after(run.heldout)
    return [last] if last is not None else []


# -- text


def _pm(s: Mapping[str, Any] | None, scale: float = 1.0, fmt: str = ".1f", sign: bool = False):
    if not s:
        return "-"
    head = format(scale * s["mean"], ("+" if sign else "") + fmt)
    return head if s["sd"] is None else f"{head} ± {format(scale * s['sd'], fmt)}"


def _k(rows: Sequence[Mapping[str, Any]]) -> str:
    k = max((r.get("num_samples") or 0 for r in rows), default=0)
    return str(k) if k else "?"


def _arms_table(rows: Sequence[Mapping[str, Any]]) -> str:
    k = _k(rows)
    header = [
        "arm", "runs", "seeds", "eval step", "greedy", f"avg@{k}", "greedy gain from 0",
        f"avg@{k} gain from 0", "retention", "kept / generated", "NLL share", "MEL rows / step",
        "s / step (median)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        kept = "-" if r["generated"] is None else f"{r['kept']} / {r['generated']}"
        cells = [
            r["arm"], str(len(r["runs"])), ", ".join(str(s) for s in r["seeds"]),
            ", ".join(str(s) for s in r["eval_steps"]) or "-",
            _pm(r["heldout_greedy"], 100), _pm(r["heldout_sampled"], 100),
            _pm(r["gain_greedy_from_0"], 100, sign=True),
            _pm(r["gain_sampled_from_0"], 100, sign=True),
            _pm(r["retention"], fmt=".3f"), kept, _pm(r["nll_share"], fmt=".2f"),
            _pm(r["mel_rows_per_step"], fmt=".2f"), _pm(r["step_time_s"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _iv(e: Mapping[str, Any] | None) -> str:
    return "-" if not e else f"[{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"


def _paired_lines(p: Mapping[str, Any]) -> list[str]:
    seeds = ", ".join(str(s) for s in p["seeds"]) or "none"
    steps = sorted(set(p["steps"].values()))
    head = f"**{p['b']} minus {p['a']}**, paired by seed (seeds {seeds}"
    head += f"; last evaluation: step {', '.join(map(str, steps))})" if steps else ")"
    lines = [head]
    df = next((p[k]["over_seeds"]["df"] for k in ("greedy", "sampled")
               if p[k] and p[k]["over_seeds"]), None)  # fmt: skip
    rows = [(kind, name) for kind, name in (("greedy", "greedy"),
            ("sampled", f"avg@{p['num_samples'] or '?'}")) if p[kind]]  # fmt: skip
    if rows:
        lines += [
            "",
            "| held-out | difference (points) | two-level 95% | over seeds, t df "
            f"{df if df is not None else '-'} | over cells (normal) | seeds × problems |",
            "|---|---|---|---|---|---|",
        ]
        for kind, name in rows:
            d = p[kind]
            lines.append(
                f"| {name} | {100 * d['value']:+.1f} | {_iv(d['two_level'])} | "
                f"{_iv(d['over_seeds'])} | {_iv(d['over_cells'])} | "
                f"{d['seeds']} × {d['cells'] // max(1, d['seeds'])} |"
            )
        lines.append("")
    else:
        lines.append("- held-out: no paired per-problem records")
    t = p["step_time"]
    if t is not None:
        pct = "" if t["extra_pct"] is None else f" ({t['extra_pct']:+.1f}%)"
        lines.append(
            f"- step time: {t['extra_s']:+.1f} s / step{pct} for {p['b']} over {p['a']} "
            f"({t['b_s']:.1f} vs {t['a_s']:.1f} s, median of steady steps, mean over runs)"
        )
    for x in p["left_out"]:
        lines.append(f"- left out: {x['run']} ({x['reason']})")
    lines += [f"- note: {n}" for n in p["notes"]]
    return lines


def arms_markdown(rows: Sequence[Mapping[str, Any]], paired: Sequence[Mapping[str, Any]]) -> str:
    """The arms table and, per pair of arms, the paired differences (Markdown)."""
    parts = ["## Arms (mean ± sd over runs; held-out in %)", "", _arms_table(rows)]
    for p in paired:
        parts += ["", *_paired_lines(p)]
    return "\n".join(parts).rstrip() + "\n"


def arms_text(paired: Sequence[Mapping[str, Any]]) -> str:
    """Short plain lines of the paired differences (the figure's summary panel)."""
    out = []
    for p in paired:
        out.append(f"{p['b']} - {p['a']}, seeds {', '.join(map(str, p['seeds'])) or 'none'}")
        for kind, name in (("greedy", "greedy"), ("sampled", f"avg@{p['num_samples']}")):
            d = p[kind]
            if d is None:
                continue
            out.append(f"  {name}: {100 * d['value']:+.1f} points")
            out.append(f"    two-level {_iv(d['two_level'])}")
            if d["over_seeds"]:
                out.append(f"    seeds (t, df {d['over_seeds']['df']}) {_iv(d['over_seeds'])}")
            out.append(f"    cells {_iv(d['over_cells'])}")
        t = p["step_time"]
        if t is not None:
            pct = "" if t["extra_pct"] is None else f" ({t['extra_pct']:+.1f}%)"
            out.append(f"  step time {t['extra_s']:+.1f} s{pct}")
        for x in p["left_out"]:
            out.append(f"  left out: {x['reason']}")
    return "\n".join(out)
