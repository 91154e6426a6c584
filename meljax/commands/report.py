"""``meljax report --workdir=DIR [--output=PNG] [--examples=N]``.

Plots the run's curves (reward, retention ratio, losses, lengths, step time by phase) to a PNG
(default ``DIR/report.png``), prints a short summary and up to N kept meta-experiences.
Works while the run is still going (it reads what has been written so far).
"""

from __future__ import annotations

from absl import app, flags

from meljax.commands.common import clean_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (holds metrics.jsonl).")
_OUTPUT = flags.DEFINE_string("output", None, "PNG path (default: WORKDIR/report.png).")
_EXAMPLES = flags.DEFINE_integer(
    "examples", 2, "Kept meta-experiences to print (most recent first; 0 = none).", lower_bound=0
)
_MAX_CHARS = flags.DEFINE_integer(
    "max_chars", 400, "Analyses longer than this are shortened in the middle.", lower_bound=40
)


def report_text(workdir: str, output: str | None, examples: int, max_chars: int = 400) -> str:
    """What the command prints: summary, PNG path, kept examples."""
    from meljax.report.run_report import (
        format_example,
        kept_examples,
        read_meta_experiences,
        render_report,
    )

    png, summary = render_report(workdir, output)
    parts = [summary, "", f"figure: {png}"]
    if examples > 0:
        records = read_meta_experiences(workdir)
        chosen = kept_examples(records, examples)
        if chosen:
            total = sum(1 for r in records if r.get("kept") is True)
            parts += ["", f"kept meta-experiences ({len(chosen)} of {total}, most recent first):"]
            parts += [format_example(r, max_chars) for r in chosen]
        elif records:
            parts += ["", f"no kept meta-experience among {len(records)} generated"]
        else:
            parts += ["", "no meta-experience log (meta_experiences.jsonl) in the run folder"]
    return "\n".join(parts)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    with clean_errors("report"):
        text = report_text(_WORKDIR.value, _OUTPUT.value, _EXAMPLES.value, _MAX_CHARS.value)
    print(text)


if __name__ == "__main__":
    app.run(main)
