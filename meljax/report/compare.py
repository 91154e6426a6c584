"""Runs side by side: one figure and one table (``meljax compare WORKDIR [WORKDIR ...]``).

Each run folder contributes its ``metrics.jsonl`` (reward, retention, step time per step), its
``config.json`` (algorithm, seed) and its held-out evaluations (:mod:`meljax.report.heldout`). The
table (Markdown, also printed) and its JSON twin hold, per run: the algorithm, seed and steps;
the mean training reward (all steps and the last quarter); the mean retention ratio and the
kept / generated meta-experiences; the steady step time; and the first and last held-out
evaluation (greedy and sampled) with 95% intervals and the paired gain between them.

Runs of several seeds per algorithm form *arms* (``arms=[("grpo", [DIR, ...]), ...]``, or
grouped by algorithm when one algorithm has two runs or more): the Markdown and the JSON then
add one row per arm and, per pair of arms, the held-out difference paired by seed and problem
with its 95% intervals (:mod:`meljax.report.arms`; JSON keys ``arms`` and ``paired``).

Public API:
  load_run(workdir, label=None) -> Run
  run_row(run) -> dict;  markdown_table(rows) -> str
  render_comparison(runs, output, summary=None) -> str   # the PNG
  compare(workdirs, output=None, labels=None, arms=None) -> Comparison
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from meljax.evaluation.stats import finite_mean
from meljax.report.arms import (
    Arm,
    arm_row,
    arms_markdown,
    arms_text,
    compare_arms,
    group_by_algorithm,
)
from meljax.report.heldout import (
    AVERAGE,
    HeldOut,
    before_after,
    gain_for,
    read_heldout,
)
from meljax.report.heldout_panel import draw_heldout
from meljax.report.run_report import load_records, retention_series, series, summarize

__all__ = ["Comparison", "Run", "compare", "load_run", "markdown_table", "render_comparison"]

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclasses.dataclass
class Run:
    """One run folder, read."""

    label: str
    workdir: str
    records: list[dict]
    heldout: dict[int, dict[str, HeldOut]]
    config: dict[str, Any]

    @property
    def algorithm(self) -> str:
        """``"grpo+mel"``, ``"grpo"``, ``"rft"``... from the run's config (``"?"`` without)."""
        algo = (self.config.get("algorithm") or {}).get("name", "?")
        mel = (self.config.get("mel") or {}).get("enabled")
        return f"{algo}+mel" if mel else algo


def load_run(workdir: str, label: str | None = None) -> Run:
    """Reads a run folder (see :func:`meljax.report.run_report.load_records` for the errors)."""
    records = load_records(workdir)
    config = {}
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    label = label or os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    return Run(label, workdir, records, read_heldout(workdir, records), config)


def run_row(run: Run) -> dict[str, Any]:
    """The table row of a run (JSON-ready; ``None`` where the run has no such value)."""
    s = summarize(run.records)
    reward = series(run.records, "reward_mean")
    quarter = max(1, len(reward) // 4)
    first, last = before_after(run.heldout)
    row: dict[str, Any] = {
        "run": run.label,
        "workdir": run.workdir,
        "algorithm": run.algorithm,
        "seed": run.config.get("seed"),
        "steps": s.last_step,
        "reward_mean": finite_mean(reward),
        "reward_mean_last_quarter": finite_mean(reward[-quarter:]),
        "reward_first": s.reward_first,
        "reward_last": s.reward_last,
        "retention_mean": s.retention_mean,
        "kept": s.kept_total,
        "generated": s.generated_total,
        "step_time_s": s.step_time_steady if s.step_time_steady is not None else s.step_time_mean,
        "heldout_steps": [first.step, last.step] if first is not None else None,
    }
    for kind in ("greedy", "sampled"):
        b = first.get(kind) if first is not None else None
        a = last.get(kind) if last is not None else None
        g = gain_for(run.heldout, kind) if first is not None and first.step != last.step else None
        row[f"heldout_{kind}_before"] = b.to_json() if b else None
        row[f"heldout_{kind}_after"] = a.to_json() if a else None
        row[f"heldout_{kind}_gain"] = g.to_json() if g else None
    row["heldout_num_samples"] = last.num_samples if last is not None else None
    return row


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _est(e: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not e:
        return "-"
    head = f"{100 * e['value']:+.1f}" if signed else f"{100 * e['value']:.1f}"
    if e.get("low") is None or e.get("high") is None:
        return head
    return f"{head} [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as a Markdown table (held-out accuracies in percent, 95% intervals)."""
    k = next((r["heldout_num_samples"] for r in rows if r.get("heldout_num_samples")), None)
    header = [
        "run", "algorithm", "seed", "steps", "reward (all / last 25%)", "retention",
        "kept / generated", "s / step", "held-out steps", "greedy before", "greedy after",
        "greedy gain", f"avg@{k or '?'} before", f"avg@{k or '?'} after", f"avg@{k or '?'} gain",
    ]  # fmt: skip
    body = []
    for r in rows:
        kept = "-" if r["generated"] is None else f"{r['kept']} / {r['generated']}"
        steps = r["heldout_steps"]
        body.append([
            str(r["run"]), r["algorithm"], str(r["seed"]), str(r["steps"]),
            f"{_f(r['reward_mean'])} / {_f(r['reward_mean_last_quarter'])}",
            _f(r["retention_mean"]), kept, _f(r["step_time_s"], ".1f"),
            "-" if not steps else f"{steps[0]} -> {steps[1]}",
            _est(r["heldout_greedy_before"]), _est(r["heldout_greedy_after"]),
            _est(r["heldout_greedy_gain"], signed=True),
            _est(r["heldout_sampled_before"]), _est(r["heldout_sampled_after"]),
            _est(r["heldout_sampled_gain"], signed=True),
        ])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _rolling(xs: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(xs)):
        m = finite_mean(xs[max(0, i - window + 1) : i + 1])
        out.append(math.nan if m is None else m)
    return out


def _steps_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _curves(ax, runs: Sequence[Run], values, title: str, ylabel: str, smooth: bool = False):
    ax.set_title(title)
    _steps_axis(ax)
    ax.set_ylabel(ylabel)
    drawn = False
    for i, run in enumerate(runs):
        x = [int(r["step"]) for r in run.records]
        y = values(run)
        if all(math.isnan(v) for v in y):
            continue
        color = COLORS[i % len(COLORS)]
        if smooth and len(y) >= 10:
            ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
            ax.plot(x, _rolling(y, 5), color=color, label=f"{run.label} (mean of 5 steps)")
        else:
            ax.plot(x, y, color=color, marker="o", markersize=3, label=run.label)
        drawn = True
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _final_eval(ax, runs: Sequence[Run]) -> None:
    """The last held-out evaluation of each run (bars, 95% intervals), first one as a mark."""
    ax.set_title("held-out: last evaluation (bars) vs first (marks), 95% intervals")
    kinds = ("greedy", "sampled")
    width = 0.8 / max(1, len(runs))
    any_bar = False
    for i, run in enumerate(runs):
        first, last = before_after(run.heldout)
        if last is None:
            continue
        for j, kind in enumerate(kinds):
            a, b = last.get(kind), first.get(kind)
            if a is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            low = a.value if a.low is None else a.low
            high = a.value if a.high is None else a.high
            err = [[max(0.0, 100 * (a.value - low))], [max(0.0, 100 * (high - a.value))]]
            color = COLORS[i % len(COLORS)]
            ax.bar([x], [100 * a.value], width=width, color=color, alpha=0.7,
                   label=run.label if j == 0 else None)  # fmt: skip
            ax.errorbar([x], [100 * a.value], yerr=err, fmt="none", ecolor="black", capsize=4)
            if b is not None and first.step != last.step:
                ax.plot([x], [100 * b.value], marker="_", markersize=18, color="black")
            any_bar = True
    if not any_bar:
        ax.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
        return
    ax.set_xticks([0, 1], ["greedy (Pass@1)", "sampled (Avg@k)"])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="best")


def _summary(rows: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for r in rows:
        out.append(f"{r['run']}  ({r['algorithm']}, seed {r['seed']}, {r['steps']} steps)")
        out.append(
            f"  reward mean {_f(r['reward_mean'])}, last 25% {_f(r['reward_mean_last_quarter'])}"
        )
        if r["generated"] is not None:
            out.append(
                f"  retention {_f(r['retention_mean'])}, kept {r['kept']} / {r['generated']}"
            )
        out.append(f"  {_f(r['step_time_s'], '.1f')} s / step")
        for kind, name in (("greedy", "greedy"), ("sampled", "sampled")):
            if r[f"heldout_{kind}_after"]:
                gain = r[f"heldout_{kind}_gain"]
                tail = f", gain {_est(gain, signed=True)}" if gain else ""
                out.append(
                    f"  {name}: {_est(r[f'heldout_{kind}_before'])} -> "
                    f"{_est(r[f'heldout_{kind}_after'])}{tail}"
                )
    return "\n".join(out)


def render_comparison(runs: Sequence[Run], output: str, summary: str | None = None) -> str:
    """Six panels: reward, held-out curves, last evaluation, retention, step time, summary
    (``summary``, e.g. the paired differences of arms; default the runs' headline numbers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 10), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    _curves(axes[0, 0], runs, lambda r: series(r.records, "reward_mean"),
            "training reward (mean per step)", "reward", smooth=True)  # fmt: skip
    ax = axes[0, 1]
    ax.set_title("held-out accuracy (average; greedy solid, sampled dashed; 95% bands)")
    _steps_axis(ax)
    if draw_heldout(ax, [(run.label, run.heldout) for run in runs]):
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    _final_eval(axes[0, 2], runs)
    _curves(axes[1, 0], runs, lambda r: retention_series(r.records),
            "retention ratio (kept / generated)", "ratio")  # fmt: skip
    _curves(axes[1, 1], runs, lambda r: series(r.records, "time/step"),
            "step time", "seconds")  # fmt: skip
    ax = axes[1, 2]
    ax.axis("off")
    ax.set_title("summary (held-out in %, 95% intervals)")
    text = summary if summary is not None else _summary([run_row(r) for r in runs])
    ax.text(0.0, 1.0, text, va="top", ha="left",
            family="monospace", fontsize=8, transform=ax.transAxes)  # fmt: skip
    fig.suptitle("comparison: " + " vs ".join(r.label for r in runs))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, format="png")
    return output


@dataclasses.dataclass
class Comparison:
    """What :func:`compare` wrote: the PNG, the Markdown, its JSON, and the Markdown text.

    ``table`` is the whole Markdown: the runs' table, then (with arms) the arms' table and the
    paired differences. ``arms`` / ``paired``: :func:`meljax.report.arms.arm_row` /
    :func:`meljax.report.arms.compare_arms` of each arm / pair of arms (empty without arms).
    """

    png: str
    markdown: str
    json: str
    table: str
    rows: list[dict[str, Any]]
    arms: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    paired: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def default_output(workdirs: Sequence[str]) -> str:
    """``<the runs' common parent folder>/compare`` (``./compare`` when they share none)."""
    paths = [os.path.abspath(w) for w in workdirs]
    parent = os.path.commonpath([os.path.dirname(p) for p in paths])
    return os.path.join(parent if parent != os.sep else os.getcwd(), "compare")


def _unique_labels(workdirs: Sequence[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
    return [n if names.count(n) == 1 else w for n, w in zip(names, workdirs, strict=True)]


def compare(
    workdirs: Sequence[str] = (),
    output: str | None = None,
    labels: Sequence[str] | None = None,
    arms: Sequence[tuple[str, Sequence[str]]] | Mapping[str, Sequence[str]] | None = None,
) -> Comparison:
    """Reads the runs and writes ``OUTPUT.png``, ``OUTPUT.md`` and ``OUTPUT.json``.

    Args:
      workdirs: run folders; with no ``arms``, grouped into arms by algorithm when one
        algorithm has two runs or more (:func:`meljax.report.arms.group_by_algorithm`).
      output: path prefix of the three files; default :func:`default_output`.
      labels: one label per run (the runs of ``arms`` in order after ``workdirs``); default
        the folder names (made unique).
      arms: ``[(name, [run folder, ...])]`` (or a dict): runs of one arm differ by seed; arms
        are compared pairwise, later minus earlier, paired by seed.
    """
    arm_specs = list(arms.items()) if isinstance(arms, Mapping) else list(arms or [])
    names = [name for name, _ in arm_specs]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must differ, got {', '.join(names)}")
    for name, dirs in arm_specs:
        if not dirs:
            raise ValueError(f"arm {name!r} names no run folder")
    all_dirs = [*workdirs, *(d for _, dirs in arm_specs for d in dirs)]
    if not all_dirs:
        raise ValueError("compare needs at least one run folder")
    if labels is not None and len(labels) != len(all_dirs):
        raise ValueError(f"{len(labels)} labels for {len(all_dirs)} run folders")
    if labels is None:
        labels = _unique_labels(all_dirs)
    runs = [load_run(w, label) for w, label in zip(all_dirs, labels, strict=True)]
    if arm_specs:
        groups, i = [], len(workdirs)
        for name, dirs in arm_specs:
            groups.append(Arm(name, runs[i : i + len(dirs)]))
            i += len(dirs)
    else:
        groups = group_by_algorithm(runs)
    output = output or default_output(all_dirs)
    output = output[: -len(".png")] if output.endswith(".png") else output
    rows = [run_row(r) for r in runs]
    arm_rows = [arm_row(a) for a in groups]
    paired = [compare_arms(a, b) for i, a in enumerate(groups) for b in groups[i + 1 :]]
    table = markdown_table(rows)
    if arm_rows:
        table += "\n\n" + arms_markdown(arm_rows, paired).rstrip()
    png = render_comparison(runs, output + ".png", arms_text(paired) if paired else None)
    with open(output + ".md", "w") as f:
        f.write(table + "\n")
    with open(output + ".json", "w") as f:
        json.dump({"runs": rows, "benchmark": AVERAGE, "arms": arm_rows, "paired": paired}, f,
                  indent=2)  # fmt: skip
        f.write("\n")
    return Comparison(png, output + ".md", output + ".json", table, rows, arm_rows, paired)
