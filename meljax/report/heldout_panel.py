"""The held-out accuracy panel: :func:`draw_heldout` plots, per run, the greedy and the sampled
accuracy (macro average over benchmarks) over evaluation steps on a matplotlib axis, each with
its 95% interval as a band. The results it draws are those of
:func:`meljax.report.heldout.read_heldout`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meljax.report.heldout import AVERAGE, HeldOut

__all__ = ["draw_heldout"]


def draw_heldout(ax, runs: Sequence[tuple[str, Mapping[int, Mapping[str, HeldOut]]]]) -> bool:
    """Held-out accuracy over evaluation steps on ``ax``: per run, the greedy accuracy (solid)
    and the sampled one (dashed), each with its 95% interval as a band. Returns whether
    anything was drawn."""
    drawn = False
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (label, results) in enumerate(runs):
        color = colors[i % len(colors)]
        prefix = f"{label}: " if label else ""
        for kind, style in (("greedy", "-"), ("sampled", "--")):
            points = [(s, r[AVERAGE].get(kind)) for s, r in results.items() if AVERAGE in r]
            points = [(s, e) for s, e in points if e is not None]
            if not points:
                continue
            xs = [s for s, _ in points]
            ax.plot(
                xs,
                [100 * e.value for _, e in points],
                linestyle=style,
                marker="o",
                markersize=4,
                color=color,
                label=f"{prefix}{kind}",
            )
            with_ci = [(s, e) for s, e in points if e.low is not None and e.high is not None]
            if with_ci:
                ax.fill_between(
                    [s for s, _ in with_ci],
                    [100 * e.low for _, e in with_ci],
                    [100 * e.high for _, e in with_ci],
                    color=color,
                    alpha=0.12 if style == "-" else 0.06,
                )
            drawn = True
    if drawn:
        ax.set_ylabel("held-out accuracy (%) with 95% interval")
        ax.set_ylim(-2, 102)
    return drawn
