"""The run figure of ``meljax report``: reward, held-out accuracy, meta-experiences, losses,
lengths and step time by phase (the data and the summary come from :mod:`meljax.report.run_report`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from meljax.report.heldout import HeldOut, before_after, gain_for
from meljax.report.heldout_panel import draw_heldout
from meljax.report.run_report import (
    PHASES,
    _finite,
    _zeros_for_nan,
    mel_nll_series,
    retention_series,
    series,
    summary_text,
)

__all__ = ["render_figure"]


def _plot(ax, x, y, label, **kw) -> bool:
    """Draws a curve if it has any value; markers keep single points visible."""
    if not _finite(y):
        return False
    ax.plot(x, y, marker="o" if len(x) <= 60 else None, markersize=3, label=label, **kw)
    return True


def _no_data(ax, text: str, y: float = 0.5) -> None:
    ax.text(0.5, y, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _legend(*axes) -> None:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        # On the top-most axes (the twin, drawn last) so no curve is drawn over the legend.
        axes[-1].legend(handles, labels, fontsize=7, loc="best")


def render_figure(
    records: Sequence[dict],
    output: str,
    *,
    title: str = "",
    heldout: Mapping[int, Mapping[str, HeldOut]] | None = None,
) -> str:
    """Draws the figure of ``records`` to ``output`` (PNG); returns ``output``.

    Six panels (13 x 11 inches); with held-out results (:func:`meljax.report.heldout.read_heldout`)
    eight (13 x 14.5): the held-out accuracy over steps next to the reward curve, and the
    first and last evaluation side by side with their 95% intervals.

    Uses a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so it neither needs a
    display nor changes pyplot's backend (safe inside notebooks).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = [int(r["step"]) for r in records]
    with_eval = bool(heldout)
    fig = Figure(figsize=(13, 14.5 if with_eval else 11), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(4 if with_eval else 3, 2)
    names = ["reward", "meta", "losses", "lengths", "time", "summary"]
    if with_eval:
        names = ["reward", "heldout", "meta", "losses", "lengths", "time", "before_after"]
        names.append("summary")
    axes = dict(zip(names, grid.flat, strict=True))
    curve_panels = ["reward", "meta", "losses", "lengths", "time"]
    if with_eval:
        curve_panels.append("heldout")
        eval_steps = list(heldout)
        ticks = sorted(set(x + eval_steps))  # an evaluation at the start is step 0
    else:
        ticks = x
    x_lim = (min(ticks), max(ticks))
    for ax in (axes[n] for n in curve_panels):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ticks) <= 12:
            ax.set_xticks(ticks)  # every step (the integer locator falls back to fractions)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Same steps on every panel, with room for the bars (width 0.8) at both ends.
        ax.set_xlim(x_lim[0] - 0.6, x_lim[1] + 0.6)

    ax = axes["reward"]
    ax.set_title("reward and accuracy")
    drawn = [
        _plot(ax, x, series(records, "reward_mean"), "reward mean"),
        _plot(ax, x, series(records, "accuracy"), "accuracy"),
        _plot(ax, x, series(records, "pass_at_group"), "pass@group", linestyle=":"),
    ]
    if any(drawn):
        _legend(ax)
    else:
        _no_data(ax, "no reward metrics")

    if with_eval:
        _draw_heldout_panels(axes["heldout"], axes["before_after"], heldout)

    ax = axes["meta"]
    ax.set_title("meta-experiences: kept / generated, retention ratio")
    generated = series(records, "mel/generated")
    kept = series(records, "mel/kept")
    has_counts = bool(_finite(generated) or _finite(kept))
    if has_counts:
        width = 0.4
        ax.bar(
            [s - width / 2 for s in x],
            _zeros_for_nan(generated),
            width=width,
            alpha=0.4,
            color="tab:gray",
            label="generated",
        )
        ax.bar(
            [s + width / 2 for s in x],
            _zeros_for_nan(kept),
            width=width,
            alpha=0.6,
            color="tab:green",
            label="kept",
        )
        ax.set_ylabel("analyses per step")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, max(_finite(generated) + _finite(kept) + [1.0]) * 1.3)
    # The twin axes is drawn above ``ax``: the ratio line stays visible over the bars.
    twin = ax.twinx()
    ratio = retention_series(records)
    if _plot(twin, x, ratio, "retention ratio", color="tab:blue"):
        twin.set_ylim(-0.05, 1.3)
        twin.set_ylabel("retention ratio (kept / generated)")
    else:
        twin.set_axis_off()
    if has_counts or _finite(ratio):
        _legend(ax, twin)
        if not any(g > 0 for g in _finite(generated)):
            _no_data(ax, "no analysis generated (no group had both right and wrong answers)")
    else:
        _no_data(ax, "no MEL metrics (GRPO run)")

    ax = axes["losses"]
    ax.set_title("losses")
    ax.set_ylabel("MEL NLL (nats / token)")
    nll_drawn = _plot(ax, x, mel_nll_series(records), "MEL NLL")
    # The policy loss sits near 0 while the NLL is O(1): it gets its own scale.
    twin = ax.twinx()
    pg_drawn = _plot(
        twin, x, series(records, "train/policy_loss"), "policy loss", color="tab:orange"
    )
    if pg_drawn:
        twin.set_ylabel("policy loss")
    else:
        twin.set_axis_off()
    if nll_drawn or pg_drawn:
        _legend(ax, twin)
        if not nll_drawn:
            _no_data(ax, "no MEL NLL (no meta-experience trained on)", y=0.95)
    else:
        _no_data(ax, "no loss metrics")

    ax = axes["lengths"]
    ax.set_title("completion length and truncation")
    ax.set_ylabel("tokens")
    drawn = [
        _plot(ax, x, series(records, "completion_len_mean"), "length mean"),
        _plot(ax, x, series(records, "completion_len_max"), "length max"),
    ]
    trunc = series(records, "truncation_rate")
    twin = None
    if _finite(trunc):
        twin = ax.twinx()
        _plot(twin, x, trunc, "truncation rate", color="tab:red", linestyle="--")
        twin.set_ylabel("truncation rate")
        twin.set_ylim(-0.05, 1.05)
    if any(drawn) or twin is not None:
        _legend(ax, *([twin] if twin is not None else []))
    else:
        _no_data(ax, "no length metrics")

    ax = axes["time"]
    ax.set_title("step time by phase")
    ax.set_ylabel("seconds")
    bottom = [0.0] * len(x)
    any_phase = False
    for phase in PHASES:
        vals = series(records, f"time/{phase}")
        if not _finite(vals):
            continue
        vals = _zeros_for_nan(vals)
        ax.bar(x, vals, bottom=bottom, label=phase, width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        any_phase = True
    step_time = series(records, "time/step")
    if _finite(step_time):
        other = [
            max(0.0, t - b) if not math.isnan(t) else 0.0
            for t, b in zip(step_time, bottom, strict=True)
        ]
        ax.bar(x, other, bottom=bottom, label="other", width=0.8, color="lightgray")
        any_phase = True
    if any_phase:
        ax.set_ylim(0, max(bottom + _finite(step_time) + [1e-3]) * 1.35)  # room for the legend
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    else:
        _no_data(ax, "no timings")

    ax = axes["summary"]
    ax.axis("off")
    ax.set_title("summary")
    ax.text(
        0.0,
        1.0,
        summary_text(records, heldout),
        va="top",
        ha="left",
        family="monospace",
        fontsize=8.5,
        transform=ax.transAxes,
        wrap=True,
    )

    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, format="png")
    return output


def _draw_heldout_panels(ax_curve, ax_bars, heldout: Mapping[int, Mapping[str, HeldOut]]):
    """The held-out curve (average over benchmarks) and the first/last evaluation bars."""
    ax_curve.set_title("held-out accuracy (greedy solid, sampled dashed; 95% bands)")
    draw_heldout(ax_curve, [("", heldout)])
    ax_curve.legend(fontsize=7, loc="best")

    first, last = before_after(heldout)
    ax_bars.set_title(f"held-out before / after: step {first.step} vs step {last.step}")
    kinds = [k for k in ("greedy", "sampled") if last.get(k) is not None]
    width = 0.38
    for j, (point, color) in enumerate(((first, "tab:gray"), (last, "tab:blue"))):
        xs, ys, errs = [], [], [[], []]
        for i, kind in enumerate(kinds):
            e = point.get(kind)
            if e is None:
                continue
            xs.append(i + (j - 0.5) * width)
            ys.append(100 * e.value)
            low = e.value if e.low is None else e.low
            high = e.value if e.high is None else e.high
            errs[0].append(max(0.0, 100 * (e.value - low)))
            errs[1].append(max(0.0, 100 * (high - e.value)))
        ax_bars.bar(xs, ys, width=width, color=color, alpha=0.7, label=f"step {point.step}")
        ax_bars.errorbar(xs, ys, yerr=errs, fmt="none", ecolor="black", capsize=4)
        for xx, yy in zip(xs, ys, strict=True):
            ax_bars.text(xx, yy + 1, f"{yy:.1f}", ha="center", va="bottom", fontsize=8)
    labels = [
        "greedy (Pass@1)" if k == "greedy" else f"sampled (Avg@{last.num_samples})" for k in kinds
    ]
    ax_bars.set_xticks(range(len(kinds)), labels)
    ax_bars.set_ylim(0, 115)
    ax_bars.set_ylabel("accuracy (%)")
    gains = [(k, gain_for(heldout, k)) for k in kinds]
    gain_text = "  ".join(f"{k} gain {g.text(signed=True)}" for k, g in gains if g is not None)
    if gain_text and first.step != last.step:
        ax_bars.text(0.5, 0.97, gain_text, ha="center", va="top", fontsize=8,
                     transform=ax_bars.transAxes)  # fmt: skip
    ax_bars.legend(fontsize=7, loc="upper right")
